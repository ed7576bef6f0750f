"""The FFN up-projection's fused epilogue (ops.linear_act, NOTES change 30): when the encoder runs
bertfast_C::linear_act, that bertfast/measured.py says what the benchmark results say, and the encoder's plumbing.

bertfast_C::linear_act has CUDA kernels only. On the CPU the plumbing is checked with a stand-in CPU kernel
registered for the op inside the test (a float64 computation, and a record of every call); the real kernel's
numbers are checked by test_cpp_ops.py's CUDA tests and by the CUDA tests at the end of this file."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers as T

import bertfast
from benchmarks import decide
from bertfast import measured, ops
from helpers import random_batch, real

HAS_CUDA = torch.cuda.is_available()
REFERENCE_ACT = {"gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu}
EPILOGUE_ACT = {epilogue: activation for activation, epilogue in ops.LINEAR_EPILOGUES.items()}


@pytest.fixture
def settings(monkeypatch):
    """Set BERTFAST_LINEAR_EPILOGUE / BERTFAST_BACKEND; the decision's cache is cleared around the test."""
    ops._linear_epilogue_cache_clear()
    monkeypatch.delenv("BERTFAST_BACKEND", raising=False)
    monkeypatch.delenv("BERTFAST_LINEAR_EPILOGUE", raising=False)

    def set_(linear=None, backend=None):
        for name, value in (("BERTFAST_LINEAR_EPILOGUE", linear), ("BERTFAST_BACKEND", backend)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
    yield set_
    ops._linear_epilogue_cache_clear()


@pytest.fixture
def cpu_kernel(settings):
    """A stand-in CPU kernel for bertfast_C::linear_act: the float64 result in x's dtype; records (epilogue, dtype)
    of every call. Deregistered after the test."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("bertfast_C::linear_act", "CPU"):
        pytest.fail("bertfast_C::linear_act already has a CPU kernel: this file's stand-in would shadow it")
    calls = []

    def stand_in(x, weight, bias, epilogue):
        # what the CUDA kernel requires (csrc/cuda/linear_act.cu's checks)
        for name, t in (("x", x), ("weight", weight), ("bias", bias)):
            if not t.is_contiguous() or t.dtype != x.dtype:
                raise RuntimeError(f"bertfast_C::linear_act: {name} must be contiguous and in x's dtype")
        if x.dim() != 2:
            raise RuntimeError("bertfast_C::linear_act: x must be 2-D")
        calls.append((epilogue, x.dtype))
        z = x.double() @ weight.double().t() + bias.double()
        return REFERENCE_ACT[EPILOGUE_ACT[epilogue]](z).to(x.dtype)

    lib = torch.library.Library("bertfast_C", "IMPL")
    lib.impl("linear_act", stand_in, "CPU")
    ops._linear_epilogue_cache_clear()
    try:
        yield calls
    finally:
        lib._destroy()
        ops._linear_epilogue_cache_clear()
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("bertfast_C::linear_act", "CPU")


def _operands(n=37, k=24, o=40, dtype=torch.float32, device="cpu"):
    x = torch.randn(n, k, device=device).to(dtype)
    w = (torch.randn(o, k, device=device) / k ** 0.5).to(dtype)
    b = torch.randn(o, device=device).to(dtype)
    return x, w, b


# --------------------------------------------------------------------------------------------------------------
# bertfast/measured.py and benchmarks/decide.py

def test_measured_matches_the_committed_results():
    """bertfast/measured.py is what `python -m benchmarks.decide` derives from benchmarks/results/ now."""
    assert (decide.TARGET.read_text() == decide.render(decide.linear_epilogue(decide.load_runs()))), \
        "bertfast/measured.py is out of date: run python -m benchmarks.decide"
    res = subprocess.run([sys.executable, "-m", "benchmarks.decide", "--check"], cwd=decide.ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # the H200 run of 2026-11-26 measured gelu_tanh fp16 at 0.1734 [0.1719-0.1748] ms unfused against 0.1407
    # [0.1389-0.1425] ms fused: p20 over p80
    speedup, source = measured.LINEAR_EPILOGUE["NVIDIA H200"]["gelu_tanh/float16"]
    assert speedup == pytest.approx(0.1719 / 0.1425, abs=0.002) and "results/h200" in source


def _row(name, shape, dtype, impl, ms):
    return dict(bench="bench_linear_act", name=name, shape=shape, dtype=dtype, impl=impl, ms=ms)


def _run(device, date, rows, device_type="cuda", commit="abcdef0123"):
    return dict(environment=dict(device=device, device_type=device_type, date=date, commit=commit), rows=rows)


def test_decide_takes_the_slowest_shape_and_the_newest_run():
    a = [_row("ffn up + gelu_tanh", "s1", "float16", "unfused", 2.0), _row("ffn up + gelu_tanh", "s1", "float16",
                                                                             "lt-fused", 1.0),
         _row("ffn up + gelu_tanh", "s2", "float16", "unfused", 1.1), _row("ffn up + gelu_tanh", "s2", "float16",
                                                                             "lt-fused", 1.0),
         # the label of runs before change 30
         _row("ffn up + relu", "s1", "bfloat16", "encoder", 3.0), _row("ffn up + relu", "s1", "bfloat16",
                                                                         "lt-fused", 2.0),
         # no fused row (exact GELU) and an error row: nothing to decide
         _row("ffn up + gelu", "s1", "float16", "unfused", 1.0),
         dict(bench="bench_linear_act", name="ffn up + relu", shape="s1", dtype="float16", impl="lt-fused",
              error="x"),
         # other benchmarks' rows are not read
         dict(bench="bench_norm_act", name="ffn up + relu", shape="s1", dtype="float16", impl="lt-fused", ms=0.1)]
    older = [_row("ffn up + gelu_tanh", "s1", "float16", "unfused", 1.0),
             _row("ffn up + gelu_tanh", "s1", "float16", "lt-fused", 2.0)]
    cpu = [_row("ffn up + gelu_tanh", "s1", "float32", "unfused", 1.0),
           _row("ffn up + gelu_tanh", "s1", "float32", "lt-fused", 0.5)]
    table = decide.linear_epilogue([("new", _run("GPU X", "2026-11-30T00:00", a)),
                                    ("old", _run("GPU X", "2026-11-01T00:00", older)),
                                    ("cpu", _run("cpu", "2026-12-01", cpu, device_type="cpu"))])
    assert table == {"GPU X": {"gelu_tanh/float16": (1.1, "benchmarks/results/new abcdef0 2026-11-30"),
                               "relu/bfloat16": (1.5, "benchmarks/results/new abcdef0 2026-11-30")}}
    # a fused row that failed makes its key 0, in the newest run as much as in any
    failed = [_row("ffn up + gelu_tanh", "s1", "float16", "unfused", 1.0),
              dict(bench="bench_linear_act", name="ffn up + gelu_tanh", shape="s1", dtype="float16", impl="lt-fused",
                   error="RuntimeError: boom")]
    # the whole encoder with the epilogue on against off counts for gelu_tanh, slowest workload first; dates
    # compare as times (the later run is written with an earlier clock time in another zone)
    encoder = [_row("ffn up + gelu_tanh", "s1", "float16", "unfused", 2.0),
               _row("ffn up + gelu_tanh", "s1", "float16", "lt-fused", 1.0),
               _row("encoder gelu_new", "1x128 bert-base", "float16", "epilogue off", 1.0),
               _row("encoder gelu_new", "1x128 bert-base", "float16", "epilogue on", 1.25),
               _row("encoder gelu_new", "32x128 bert-base", "float16", "epilogue off", 1.2),
               _row("encoder gelu_new", "32x128 bert-base", "float16", "epilogue on", 1.0)]
    assert decide.linear_epilogue([("a", _run("GPU Y", "2026-11-30T10:00:00+00:00", a)),
                                   ("b", _run("GPU Y", "2026-11-30T09:00:00-02:00", failed))]) == \
        {"GPU Y": {"gelu_tanh/float16": (0.0, "benchmarks/results/b abcdef0 2026-11-30"),
                   "relu/bfloat16": (1.5, "benchmarks/results/a abcdef0 2026-11-30")}}
    assert decide.linear_epilogue([("e", _run("GPU Z", "2026-12-01", encoder))]) == \
        {"GPU Z": {"gelu_tanh/float16": (0.8, "benchmarks/results/e abcdef0 2026-12-01")}}
    text = decide.render(table)
    namespace = {}
    exec(compile(text, "measured.py", "exec"), namespace)
    assert namespace["LINEAR_EPILOGUE"] == table


def test_decide_reads_the_spreads_and_skips_incomplete_runs():
    """A speedup is the unfused row's p20 over the fused row's p80: medians 1.05x apart with overlapping spreads
    do not switch the default on; and a run cut at its time limit (complete: false) decides nothing, even when
    it is the newest."""
    def row(impl, ms, q20, q80):
        return dict(_row("ffn up + relu", "s1", "float16", impl, ms), ms_q20=q20, ms_q80=q80)
    noisy = [row("unfused", 1.05, 0.98, 1.10), row("lt-fused", 1.0, 0.97, 1.04)]
    table = decide.linear_epilogue([("n", _run("GPU N", "2026-11-30", noisy))])
    speedup = table["GPU N"]["relu/float16"][0]
    assert speedup == pytest.approx(0.98 / 1.04, abs=1e-3) and speedup < ops.LINEAR_EPILOGUE_MIN_SPEEDUP
    clear = [row("unfused", 2.0, 1.95, 2.05), row("lt-fused", 1.0, 0.98, 1.02)]
    cut = dict(_run("GPU N", "2026-12-01", noisy), complete=False)
    assert decide.linear_epilogue([("a", _run("GPU N", "2026-11-30", clear)), ("b", cut)]) == \
        {"GPU N": {"relu/float16": (1.911, "benchmarks/results/a abcdef0 2026-11-30")}}    # 1.9118 rounded down


def test_decide_skips_pairs_timed_differently():
    """A fused row replayed from a CUDA graph against an unfused row timed as called (its capture failed: "eager
    (not captured: ...)") compares kernels with host time: that shape decides nothing, the others still do. A
    fused row whose capture failed where the unfused one's worked counts as a failure (0): a graph user could
    not run it."""
    graph, eager = dict(timing="cuda graph"), dict(timing="eager (not captured: a sync)")
    rows = [dict(_row("ffn up + relu", "s1", "float16", "unfused", 5.0), **eager),
            dict(_row("ffn up + relu", "s1", "float16", "lt-fused", 1.0), **graph),
            dict(_row("ffn up + relu", "s2", "float16", "unfused", 1.2), **graph),
            dict(_row("ffn up + relu", "s2", "float16", "lt-fused", 1.0), **graph),
            dict(_row("ffn up + gelu_tanh", "s1", "float16", "unfused", 1.2), **graph),
            dict(_row("ffn up + gelu_tanh", "s1", "float16", "lt-fused", 1.0), **eager)]
    assert decide.linear_epilogue([("m", _run("GPU M", "2026-11-30", rows))]) == \
        {"GPU M": {"relu/float16": (1.2, "benchmarks/results/m abcdef0 2026-11-30"),
                   "gelu_tanh/float16": (0.0, "benchmarks/results/m abcdef0 2026-11-30")}}


def test_linear_act_speedups_compare_rows_timed_alike():
    """bench_linear_act's speedup column: over the group's unfused row, None where the two were timed differently."""
    from benchmarks import bench_linear_act
    group = bench_linear_act._finish([dict(impl="unfused", ms=2.0, timing="cuda graph"),
                                      dict(impl="lt-fused", ms=1.0, timing="cuda graph"),
                                      dict(impl="lt-unfused", ms=1.0, timing="eager (not captured: x)"),
                                      dict(impl="broken", error="x")], None)
    assert [g.get("speedup") for g in group] == [1.0, 2.0, None, None]


def test_decide_reads_only_its_rows_and_prefers_the_unfused_label():
    """Only bench_linear_act's FFN rows and its gelu_new encoder rows decide: another benchmark's rows of the same
    names, and encoder rows of another activation, decide nothing. In a group with both labels of the unfused path
    (runs before change 30 said "encoder"), the "unfused" row is the baseline whichever comes first, and a failed
    "unfused" row leaves the other standing; a fused row with an error is a failure even where it has a time."""
    other_bench = [dict(_row("ffn up + relu", "s1", "float16", impl, ms), bench="bench_cuda_ops")
                   for impl, ms in (("unfused", 2.0), ("lt-fused", 1.0))]
    gelu_encoder = [_row("encoder gelu", "1x128 bert-base", "float16", "epilogue off", 2.0),
                    _row("encoder gelu", "1x128 bert-base", "float16", "epilogue on", 1.0)]
    assert decide.linear_epilogue([("o", _run("GPU O", "2026-11-30", other_bench + gelu_encoder))]) == {}
    source = "benchmarks/results/l abcdef0 2026-11-30"
    ms = {"encoder": 3.0, "unfused": 1.5}
    for order in (("encoder", "unfused"), ("unfused", "encoder")):
        rows = [_row("ffn up + relu", "s1", "float16", impl, ms[impl]) for impl in order]
        rows.append(_row("ffn up + relu", "s1", "float16", "lt-fused", 1.0))
        assert decide.linear_epilogue([("l", _run("GPU L", "2026-11-30", rows))]) == \
            {"GPU L": {"relu/float16": (1.5, source)}}, order
    failed_unfused = [_row("ffn up + relu", "s1", "float16", "encoder", 3.0),
                      dict(bench="bench_linear_act", name="ffn up + relu", shape="s1", dtype="float16",
                           impl="unfused", error="RuntimeError: boom"),
                      _row("ffn up + relu", "s1", "float16", "lt-fused", 1.0)]
    assert decide.linear_epilogue([("l", _run("GPU L", "2026-11-30", failed_unfused))]) == \
        {"GPU L": {"relu/float16": (3.0, source)}}
    timed_then_failed = [_row("ffn up + relu", "s1", "float16", "unfused", 2.0),
                         dict(_row("ffn up + relu", "s1", "float16", "lt-fused", 1.0), error="wrong result")]
    assert decide.linear_epilogue([("l", _run("GPU L", "2026-11-30", timed_then_failed))]) == \
        {"GPU L": {"relu/float16": (0.0, source)}}


def test_decide_never_rounds_a_speedup_up_to_the_threshold():
    """A measured 1.0195 (below LINEAR_EPILOGUE_MIN_SPEEDUP, 1.02) is stored rounded down, so the ops layer does
    not fuse on it (rounded to nearest it read 1.02 and passed); 1.0205 passes."""
    for unfused, fuses in ((1.0195, False), (1.0205, True)):
        rows = [_row("ffn up + gelu_tanh", "s1", "float16", "unfused", unfused),
                _row("ffn up + gelu_tanh", "s1", "float16", "lt-fused", 1.0)]
        speedup = decide.linear_epilogue([("r", _run("GPU R", "2026-12-01", rows))])["GPU R"]["gelu_tanh/float16"][0]
        assert speedup <= unfused and (speedup >= ops.LINEAR_EPILOGUE_MIN_SPEEDUP) is fuses, (unfused, speedup)


def test_decide_dates_undated_runs_and_offsets():
    """An undated run counts as the oldest, whatever its folder's place in the listing; a date without a UTC offset
    is UTC, and compares with dates that have one (naive against aware datetimes would raise)."""
    fast = [_row("ffn up + relu", "s1", "float16", "unfused", 2.0),
            _row("ffn up + relu", "s1", "float16", "lt-fused", 1.0)]
    even = [_row("ffn up + relu", "s1", "float16", "unfused", 1.0),
            _row("ffn up + relu", "s1", "float16", "lt-fused", 1.0)]
    assert decide.linear_epilogue([("a", _run("GPU D", "2026-11-01", fast)), ("z", _run("GPU D", None, even))]) == \
        {"GPU D": {"relu/float16": (2.0, "benchmarks/results/a abcdef0 2026-11-01")}}
    # 12:00 without an offset is 12:00 UTC: later than 13:30+02:00 (11:30 UTC), earlier than 13:30+01:00
    for aware, newer in (("2026-11-30T13:30:00+02:00", "naive"), ("2026-11-30T13:30:00+01:00", "aware")):
        table = decide.linear_epilogue([("naive", _run("GPU D", "2026-11-30T12:00", fast)),
                                        ("aware", _run("GPU D", aware, even))])
        assert table["GPU D"]["relu/float16"][1].startswith(f"benchmarks/results/{newer} "), (aware, table)


def test_decide_check_fails_on_a_stale_file_and_main_writes_it(tmp_path, monkeypatch, capsys):
    """`python -m benchmarks.decide --check` exits 1 (and writes nothing) when bertfast/measured.py differs from
    what the results say; without --check it writes the file, which --check then accepts."""
    target = tmp_path / "measured.py"
    monkeypatch.setattr(decide, "TARGET", target)
    target.write_text("LINEAR_EPILOGUE = {}\n")
    assert decide.main(["--check"]) == 1
    assert "is out of date" in capsys.readouterr().err
    assert target.read_text() == "LINEAR_EPILOGUE = {}\n"
    assert decide.main([]) == 0
    assert target.read_text() == decide.render(decide.linear_epilogue(decide.load_runs()))
    assert decide.main(["--check"]) == 0


# --------------------------------------------------------------------------------------------------------------
# the decision

@pytest.mark.parametrize("value", ["fused", "yes", "1"])
def test_bad_setting_names_the_variable(settings, value):
    settings(linear=value)
    x, w, b = _operands()
    with pytest.raises(ValueError, match="BERTFAST_LINEAR_EPILOGUE=.* is not one of auto, on, off, approximate"):
        ops.linear_act(x, w, b, "gelu_tanh")


def test_no_cpu_kernel_runs_torch_gemm_and_says_why(settings):
    """On the CPU (no kernel for linear_act) every setting computes F.linear + bias_act; a setting that asks for the
    epilogue is told, once, that it cannot run here."""
    for value in (None, "on", "off", "approximate"):
        settings(linear=value)
        table = ops.linear_epilogue_table("cpu", torch.float32)
        assert all(v.startswith("F.linear + bias_act") for v in table.values()), table
    settings(linear="on")
    assert "bertfast_C::linear_act has no cpu kernel" in ops.linear_epilogue_table("cpu")["gelu_tanh"]
    assert any("BERTFAST_LINEAR_EPILOGUE=on: the fused epilogue does not run on cpu" in m for m in ops.notices().values())


def test_reasons(cpu_kernel, settings, monkeypatch):
    """Every branch of the decision, with a kernel for the device (the stand-in)."""
    dev, f32 = torch.device("cpu"), torch.float32

    def decide_(activation, dtype=f32, has_bias=True, records=False, plain=True):
        return ops._linear_epilogue(dev, dtype, activation, has_bias, records, plain)

    settings(linear="on")
    assert decide_("gelu_tanh") == ("bias_gelu_tanh", "BERTFAST_LINEAR_EPILOGUE=on")
    assert decide_("relu") == ("bias_relu", "BERTFAST_LINEAR_EPILOGUE=on")
    assert decide_("gelu")[0] is None and "approximate opts in" in decide_("gelu")[1]
    assert decide_("silu") == (None, "cuBLASLt has no silu epilogue")
    assert decide_("gelu_tanh", records=True)[0] is None and "gradient" in decide_("gelu_tanh", records=True)[1]
    assert decide_("gelu_tanh", has_bias=False) == (None, "the linear has no bias")
    assert decide_("gelu_tanh", dtype=torch.float64)[0] is None
    assert decide_("gelu_tanh", plain=False)[0] is None and "subclass" in decide_("gelu_tanh", plain=False)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decide_("gelu_tanh")[0] is None and "autocast" in decide_("gelu_tanh")[1]
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        assert decide_("gelu_tanh")[0] is None and "forward-mode AD" in decide_("gelu_tanh")[1]
    # devices the dispatcher has no kernel key of ours for: no kernel, not an error
    assert ops._linear_epilogue(torch.device("meta"), f32, "gelu_tanh", True, False) == \
        (None, "bertfast_C::linear_act has no meta kernel")
    settings(linear="approximate")
    assert decide_("gelu") == ("bias_gelu_tanh", "BERTFAST_LINEAR_EPILOGUE=approximate")
    settings(linear="off")
    assert decide_("gelu_tanh") == (None, "BERTFAST_LINEAR_EPILOGUE=off")
    for backend in ("reference", "triton"):
        settings(linear="on", backend=backend)
        assert decide_("gelu_tanh") == (None, f"BERTFAST_BACKEND={backend}")
    assert any("BERTFAST_LINEAR_EPILOGUE=on: the fused epilogue does not run on cpu: BERTFAST_BACKEND=triton" in m
               for m in ops.notices().values())
    settings(linear="on", backend="cpp")
    assert decide_("gelu_tanh")[0] == "bias_gelu_tanh"
    # auto: the measured table of this device's name
    settings()
    monkeypatch.setattr(measured, "LINEAR_EPILOGUE", {"cpu": {"gelu_tanh/float32": (1.3, "run A"),
                                                              "relu/float32": (1.01, "run B")}})
    ops._linear_epilogue_cache_clear()
    assert decide_("gelu_tanh") == ("bias_gelu_tanh", "measured 1.30x the unfused path for gelu_tanh/float32 on "
                                                      "cpu (run A)")
    assert decide_("relu")[0] is None and "measured 1.01x" in decide_("relu")[1]    # below the noise threshold
    assert decide_("gelu_tanh", dtype=torch.float16)[0] is None
    assert "not measured for gelu_tanh/float16 on cpu" in decide_("gelu_tanh", dtype=torch.float16)[1]
    assert decide_("gelu")[0] is None          # auto never approximates exact GELU


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("shape", [(37, 24, 40), (1, 1, 1), (0, 8, 5), ((3, 5), 16, 7)])
def test_linear_act_takes_the_epilogue(cpu_kernel, settings, activation, shape):
    settings(linear="on")
    n, k, o = shape
    lead = n if isinstance(n, tuple) else (n,)
    x = torch.randn(*lead, k)
    _, w, b = _operands(1, k, o)
    y = ops.linear_act(x, w, b, activation)
    assert cpu_kernel == [(ops.LINEAR_EPILOGUES[activation], torch.float32)]
    ref = REFERENCE_ACT[activation](x.double() @ w.double().t() + b.double())
    assert y.shape == (*lead, o) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)


def test_linear_act_unfused_paths_agree(cpu_kernel, settings):
    """Where the epilogue does not run, linear_act is F.linear + bias_act (exact GELU, SiLU, gradients, off)."""
    x, w, b = _operands()
    settings(linear="on")
    for activation in ("gelu", "silu"):
        y = ops.linear_act(x, w, b, activation)
        torch.testing.assert_close(y, ops.bias_act(F.linear(x, w), b, activation), rtol=0, atol=0)
    assert cpu_kernel == []
    wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = ops.linear_act(x, wl, bl, "gelu_tanh")
    assert cpu_kernel == [] and y.requires_grad
    y.sum().backward()
    assert wl.grad is not None and bl.grad is not None
    settings(linear="off")
    torch.testing.assert_close(ops.linear_act(x, w, b, "gelu_tanh"), ops.bias_act(F.linear(x, w), b, "gelu_tanh"))
    assert cpu_kernel == []


def test_linear_act_bad_input(settings):
    x, w, b = _operands()
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.linear_act(x, w, b, "tanh")
    with pytest.raises(ValueError, match=r"linear_act takes x \[..., K\] and weight \[O, K\]"):
        ops.linear_act(x, w[:, :5], b, "gelu")


def test_linear_act_bad_input_on_the_epilogue(cpu_kernel, settings):
    settings(linear="on")
    x, w, b = _operands()
    with pytest.raises(ValueError, match="weight has dtype torch.float16 but x has dtype torch.float32"):
        ops.linear_act(x, w.half(), b, "gelu_tanh")
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        ops.linear_act(x, w, b[:3], "gelu_tanh")
    assert cpu_kernel == []


def test_linear_act_autocast_and_subclasses_stay_unfused(cpu_kernel, settings):
    """Under torch.autocast (F.linear reuses autocast's weight casts; float64 is never cast) and for tensor
    subclasses (a quantised weight implements F.linear itself) linear_act is F.linear + bias_act."""
    settings(linear="on")
    x, w, b = _operands()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear_act(x, w, b, "gelu_tanh")
        ref = ops.bias_act(F.linear(x, w), b, "gelu_tanh")
        y64 = ops.linear_act(x.double(), w.double(), b.double(), "gelu_tanh")
    assert cpu_kernel == []
    assert y.dtype == ref.dtype == torch.bfloat16 and torch.equal(y, ref)
    assert y64.dtype == torch.float64

    class Marked(torch.Tensor):
        """A subclass that sees every op on it (as a quantised weight's does)."""
        ops_seen: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.ops_seen.append(getattr(func, "__name__", str(func)))
            return super().__torch_function__(func, types, args, kwargs or {})

    wm = w.as_subclass(Marked)
    y = ops.linear_act(x, wm, b, "gelu_tanh")
    assert cpu_kernel == [] and "linear" in Marked.ops_seen
    torch.testing.assert_close(y.as_subclass(torch.Tensor), ops.bias_act(F.linear(x, w), b, "gelu_tanh"))


def test_linear_act_noncontiguous_bias(cpu_kernel, settings):
    """The epilogue gets a contiguous bias (the unfused path's bias_act makes it contiguous too)."""
    settings(linear="on")
    x, w, _ = _operands()
    b = torch.randn(w.shape[0], 2)[:, 1]
    assert not b.is_contiguous()
    y = ops.linear_act(x, w.t().contiguous().t(), b, "relu")      # a transposed weight too
    assert cpu_kernel == [("bias_relu", torch.float32)]
    torch.testing.assert_close(y.double(), F.relu(x.double() @ w.double().t() + b.double()))


# --------------------------------------------------------------------------------------------------------------
# the encoder

def _gelu_new_models(family="bert"):
    common = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=96, vocab_size=150,
                  max_position_embeddings=72, hidden_act="gelu_new", hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    if family == "albert":
        cfg, cls = T.AlbertConfig(**common, embedding_size=32, num_hidden_groups=1), T.AlbertModel
    else:
        cfg, cls = T.BertConfig(**common), T.BertModel
    hf = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    return cfg, hf, bertfast.AutoModel.from_hf(hf).eval()


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_encoder_forward_uses_the_epilogue(cpu_kernel, settings, family):
    """A gelu_new model at inference runs the epilogue once a layer (ALBERT: once a layer of the schedule) and
    matches transformers; the same model training does not run it, and gets its gradients."""
    torch.manual_seed(3)
    settings(linear="on")
    cfg, hf, ours = _gelu_new_models(family)
    ids, mask, types = random_batch(5, 19, cfg.vocab_size)
    with torch.inference_mode():
        ref = hf(ids, attention_mask=mask).last_hidden_state
        out = ours(ids, attention_mask=mask).last_hidden_state
    assert cpu_kernel == [("bias_gelu_tanh", torch.float32)] * cfg.num_hidden_layers
    q = real(mask)
    torch.testing.assert_close(out[q], ref[q], rtol=1e-4, atol=1e-5)
    cpu_kernel.clear()
    ours.train()
    ours(ids, attention_mask=mask).last_hidden_state[q].square().sum().backward()
    assert cpu_kernel == []
    assert all(p.grad is not None for n, p in ours.named_parameters() if "intermediate" in n)


def test_encoder_hooks_and_off(cpu_kernel, settings):
    """A hooked FFN linear is called as a module (no epilogue); BERTFAST_LINEAR_EPILOGUE=off and an exact-GELU
    model never take it; =approximate takes it for exact GELU."""
    torch.manual_seed(4)
    cfg, hf, ours = _gelu_new_models()
    ids, mask, _ = random_batch(3, 11, cfg.vocab_size)
    settings(linear="off")
    with torch.inference_mode():
        ours(ids, attention_mask=mask)
    assert cpu_kernel == []
    settings(linear="on")
    handle = ours.encoder.layer[0].intermediate.dense.register_forward_hook(lambda *a: None)
    with torch.inference_mode():
        ours(ids, attention_mask=mask)
    handle.remove()
    assert len(cpu_kernel) == cfg.num_hidden_layers - 1
    cpu_kernel.clear()
    exact = bertfast.BertModel.from_hf(T.BertModel._from_config(T.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, vocab_size=150))).eval()
    with torch.inference_mode():
        ref = exact(ids, attention_mask=mask).last_hidden_state
        assert cpu_kernel == []
        settings(linear="approximate")
        approx = exact(ids, attention_mask=mask).last_hidden_state
    assert cpu_kernel == [("bias_gelu_tanh", torch.float32)] * 2
    q = real(mask)
    # the tanh form differs from exact GELU by at most 4.8e-4 an element, before the LayerNorms
    assert 0 < (approx[q] - ref[q]).abs().max().item() < 0.05


def test_info_prints_the_choice():
    res = subprocess.run([sys.executable, "-m", "bertfast", "info"], cwd=decide.ROOT, capture_output=True,
                         text=True, env={**__import__("os").environ, "BERTFAST_LINEAR_EPILOGUE": "off"})
    assert res.returncode == 0, res.stderr
    assert "FFN up-projection at inference on cpu (float32), per activation (BERTFAST_LINEAR_EPILOGUE=off)" \
        in res.stdout
    assert "gelu_tanh          F.linear + bias_act  (BERTFAST_LINEAR_EPILOGUE=off)" in res.stdout


# --------------------------------------------------------------------------------------------------------------
# on a GPU: the real kernel through ops.linear_act and the encoder

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


class CountLinearAct(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the calls of bertfast_C::linear_act that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.bertfast_C.linear_act.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_dispatch_counter_sees_the_op(cpu_kernel, settings):
    """CountLinearAct (used by the CUDA tests below) counts the calls of the fused epilogue."""
    settings(linear="on")
    x, w, b = _operands()
    with CountLinearAct() as counter:
        ops.linear_act(x, w, b, "gelu_tanh")
        ops.linear_act(x, w, b, "gelu")
    assert counter.calls == 1 == len(cpu_kernel)


def _torch_error(y, x, w, b, activation):
    """(bertfast's error, torch's own error in x's dtype) against float64."""
    ref = REFERENCE_ACT[activation](x.double() @ w.double().t() + b.double())
    low = REFERENCE_ACT[activation](F.linear(x, w, b))
    return (y.double() - ref).abs().max().item(), (low.double() - ref).abs().max().item()


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_cuda_linear_act_epilogue(settings, dtype, activation, n):
    settings(linear="on")
    x, w, b = _operands(n, 768, 3072, dtype, "cuda")
    y = ops.linear_act(x, w, b, activation)
    err, torch_err = _torch_error(y, x, w, b, activation)
    assert y.dtype == dtype and err <= 2 * torch_err + 1e-6, (err, torch_err)


@cuda_only
def test_cuda_linear_act_autocast(settings):
    settings(linear="on")
    x, w, b = _operands(33, 256, 512, torch.float32, "cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        y = ops.linear_act(x, w, b, "gelu_tanh")
    assert y.dtype == torch.float16
    err, torch_err = _torch_error(y, x.half(), w.half(), b.half(), "gelu_tanh")
    assert err <= 2 * torch_err + 1e-6


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", ["on", "off"])
def test_cuda_encoder_gelu_new_parity(settings, dtype, value):
    """A gelu_new encoder with the epilogue on and off: its error against float64 transformers within 3x
    transformers' own in the dtype (test_gpu_model's rule)."""
    settings(linear=value)
    torch.manual_seed(5)
    cfg = T.BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
                       vocab_size=500, max_position_embeddings=300, hidden_act="gelu_new")
    ref = T.BertModel._from_config(copy.deepcopy(cfg), attn_implementation="eager").to("cuda", torch.float64).eval()
    hf = T.BertModel._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").to("cuda", dtype).eval()
    hf.load_state_dict(ref.state_dict())
    ours = bertfast.BertModel.from_hf(hf).eval()
    ids, mask, _ = (t.cuda() for t in random_batch(6, 131, cfg.vocab_size))
    with torch.inference_mode():
        r = ref(ids, attention_mask=mask).last_hidden_state
        a = hf(ids, attention_mask=mask).last_hidden_state
        with CountLinearAct() as counter:
            o = ours(ids, attention_mask=mask).last_hidden_state
    assert counter.calls == (cfg.num_hidden_layers if value == "on" else 0)
    q = real(mask)
    err_hf = (a[q].double() - r[q]).abs().max().item()
    err = (o[q].double() - r[q]).abs().max().item()
    assert err <= 3 * err_hf + 1e-6, (err, err_hf)
    table = ops.linear_epilogue_table("cuda", dtype)
    assert table["gelu_tanh"].startswith("fused" if value == "on" else "F.linear"), table


@cuda_only
def test_cuda_graphs_with_the_epilogue(settings):
    """enable_cuda_graphs captures the fused epilogue and replays it to the eager result: bit for bit on an
    unpadded batch (the graph's GEMMs have eager's row counts); on a padded batch the graph packs to a bucketed
    length, so cuBLAS may pick another kernel for the GEMMs' other row count: a few fp16 ulps of the largest value."""
    settings(linear="on")
    torch.manual_seed(6)
    cfg = T.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                       vocab_size=300, hidden_act="gelu_new")
    ours = bertfast.BertModel.from_hf(T.BertModel._from_config(cfg)).to("cuda", torch.float16).eval()
    ids, padded, _ = (t.cuda() for t in random_batch(4, 40, cfg.vocab_size))
    with torch.inference_mode():
        eager = {}
        for name, mask in (("full", torch.ones_like(ids)), ("padded", padded)):
            with CountLinearAct() as counter:
                eager[name] = ours(ids, attention_mask=mask).last_hidden_state.clone()
            assert counter.calls == cfg.num_hidden_layers
        ours.enable_cuda_graphs()
        for name, mask in (("full", torch.ones_like(ids)), ("padded", padded)):
            with CountLinearAct() as counter:   # warm-up and capture run the epilogue eagerly
                first = ours(ids, attention_mask=mask).last_hidden_state.clone()
            assert counter.calls >= cfg.num_hidden_layers and counter.calls % cfg.num_hidden_layers == 0, name
            with CountLinearAct() as counter:   # a replay runs no op from Python
                graphed = ours(ids, attention_mask=mask).last_hidden_state
            assert counter.calls == 0, name
            ref = eager[name]
            bound = 0 if name == "full" else 16 * torch.finfo(torch.float16).eps * ref.abs().max().item()
            for out in (first, graphed):
                q = mask.bool()
                assert (out[q].float() - ref[q].float()).abs().max().item() <= bound, name
                assert not out[~q].any(), name
