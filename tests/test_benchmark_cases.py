"""The GPU benchmarks' cases run here too (CPU tensors, Triton interpreter, small shapes), so that a GPU run - rare
and short - does not lose a benchmark to a Python error in its setup (the first H100 run lost bench_attention to
one). Nothing here measures anything."""
import os

import pytest
import torch

from benchmarks import bench_attention, bench_linear_act, bench_norm_act
from bertfast.kernels import layer_norm as ln

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks themselves run")


@pytest.mark.parametrize("backward", [False, True])
def test_attention_cases_run(backward):
    lengths = [5, 17, 1]
    impls = bench_attention._impls(lengths, torch.float32, "cpu", backward)
    assert {"bertfast", "sdpa-flash", "sdpa-math", "sdpa-math+mask", "sdpa-efficient+mask"} <= set(impls)
    ran = []
    for name, fn in impls.items():
        try:
            fn()
        except RuntimeError as err:          # an SDPA backend this CPU build lacks: the benchmark reports it
            assert name.startswith("sdpa-"), (name, err)
            continue
        ran.append(name)
    assert "bertfast" in ran and "sdpa-math" in ran and "sdpa-math+mask" in ran


@pytest.mark.parametrize("make,shape", [(bench_norm_act._ln_impls, (9, 384)), (bench_norm_act._act_impls, (9, 384))])
def test_norm_act_cases_run(make, shape, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)   # compiling is not what is checked here
    impls = make(*shape, torch.float32, "cpu")
    assert "bertfast" in impls and "torch" in impls
    for name, (fwd, fwd_bwd) in impls.items():
        fwd()
        fwd_bwd()
    if make is bench_norm_act._ln_impls:
        rows = ln.forward_row_choices(ln.row_block(shape[1])[0])
        assert f"bertfast rows={rows[-1]}" in impls
        a = impls["bertfast"][0]()[0]
        b = impls[f"bertfast rows={rows[-1]}"][0]()[0]
        assert torch.equal(a, b)


def test_norm_sweep_runs():
    """The LayerNorm launch sweep's rows (CPU: the interpreter, wall clock): the launch rule's variant first, every
    variant timed, each compared with the rule's."""
    rows = bench_norm_act.sweep("cpu", "float32", shapes=[(9, 384)])
    block = ln.row_block(384)[0]
    assert [(r["rows"], r["num_warps"]) for r in rows][0] == (1, ln.forward_warps(block, 1))
    assert sorted((r["rows"], r["num_warps"]) for r in rows) == sorted(ln.sweep_variants(block))
    assert not [r for r in rows if "error" in r]
    assert all(r["ms"] > 0 and r["vs_policy"] > 0 for r in rows)
    # a failing rule variant leaves the others without a ratio rather than measured against another variant
    cases = bench_norm_act.sweep_cases(9, 384, torch.float32, "cpu")
    first = next(iter(cases))
    cases[first] = lambda: 1 / 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_norm_act, "sweep_cases", lambda *a: cases)
        failed = bench_norm_act.sweep("cpu", "float32", shapes=[(9, 384)])
    assert "ZeroDivisionError" in failed[0]["error"] and all(r["vs_policy"] is None for r in failed[1:])
    assert "rows=" in bench_norm_act._sweep_line(failed[1]) and "the rule" not in bench_norm_act._sweep_line(failed[1])


def test_norm_act_rows_carry_a_same_size_copy(monkeypatch):
    """bench_norm_act's GPU rows, run on the meta device with stand-ins for CUDA and the timer: each shape gets a
    copy of the bytes its op's forward moves, and each forward row its fraction of that copy (the run's big copy
    overstates what a 25-75 MB op can reach)."""
    from benchmarks import common
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in")
    monkeypatch.setattr(common, "compiled_baseline", lambda fn: fn)

    def one_ms(fn, quick):
        """Runs fn and says it took 1 ms: every GB/s is then bytes / 1 ms, so a forward moving its own bytes
        is exactly 1.0 of the copy of those bytes (wall-clock ratios made this test depend on the machine's load)."""
        fn()
        return dict(ms=1.0, p20=1.0, p80=1.0, host_ms=0.5, timing="stand-in")
    monkeypatch.setattr(bench_norm_act, "_timed", one_ms)
    monkeypatch.setattr(bench_norm_act, "_copy_ms", lambda copy, quick: (copy(), 1.0)[1])
    monkeypatch.setattr(bench_norm_act, "SHAPES", [(64, 96), (64, 128), (64, 256)])
    rows = bench_norm_act.run("meta", quick=True)
    copies = [r for r in rows if r["name"].startswith("copy (")]
    assert {(r["name"], r["shape"]) for r in copies} == {
        (f"copy ({op} fwd's bytes)", s) for op in ("add_layer_norm", "bias_gelu") for s in ("64x96", "64x256")}
    torch_fwd = [r for r in rows if r["impl"] == "torch" and r["name"].endswith(" fwd")]
    assert len(torch_fwd) == 4 and all(r["frac_same_bytes_copy"] == 1.0 for r in torch_fwd), torch_fwd
    assert not [r for r in rows if r["name"].endswith("fwd+bwd") and "frac_same_bytes_copy" in r]
    ops = [r for r in rows if not r["name"].startswith("copy") and "error" not in r]
    assert ops and all(r["timing"] == "stand-in" and r["host_ms"] == 0.5 for r in ops)


def test_norm_act_liger_rows_run(monkeypatch):
    """Liger's LayerNorm owns its weight and bias: its fwd+bwd row differentiates with respect to them (it was an
    error row on every run that carried the wheel: autograd.grad was asked for w and b, outside its graph). A
    stand-in module here (the wheel is carried to the GPU machines only); its output must equal torch's."""
    import sys
    import types
    fake = types.ModuleType("liger_kernel.transformers")

    class LigerLayerNorm(torch.nn.LayerNorm):
        def __init__(self, hidden, eps=1e-6, bias=True):
            super().__init__(hidden, eps=eps, bias=bias)
            torch.nn.init.normal_(self.weight)       # the benchmark must copy the shared weights in
    fake.LigerLayerNorm = LigerLayerNorm
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    impls = bench_norm_act._ln_impls(9, 384, torch.float32, "cpu")
    fwd, fwd_bwd = impls["liger (LN only; add in torch)"]
    torch.testing.assert_close(fwd(), impls["torch"][0]())
    got, want = fwd_bwd(), impls["torch"][1]()
    assert len(got) == 5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_cuda_kernel_time_says_how_a_row_was_timed(monkeypatch):
    """A callable that cannot be captured in a CUDA graph is timed as called, and its row says so and why (CUDA
    replaced by stand-ins: the timing itself runs on the GPU machines only)."""
    import triton.testing

    from benchmarks import common
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    timed = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (timed.append(fn), [2.0, 1.5, 2.5])[1])

    def no_capture(fn, warmup_calls=3):
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:     # torch.cuda.graph's capture_end raises over the error that invalidated the capture
            raise RuntimeError("operation failed due to a previous error during capture")
    monkeypatch.setattr(common, "capture_graph", no_capture)
    calls = []
    t = common.cuda_kernel_time(lambda: calls.append(1))
    assert t["timing"].startswith("eager (not captured: RuntimeError: operation not permitted when stream")
    assert t["ms"] == 2.0 and t["host_ms"] >= 0 and len(calls) == 11 and timed[0] is not None

    class Graph:
        def replay(self):
            pass
    monkeypatch.setattr(common, "capture_graph", lambda fn, warmup_calls=3: Graph())
    t = common.cuda_kernel_time(lambda: None)
    assert t["timing"] == "cuda graph" and timed[-1].__self__.__class__ is Graph


def test_linear_act_cases_run():
    """The rows that exist on CPU (linear_act itself is CUDA-only) run and compare against the unfused path, for
    every activation that benchmarks.decide reads."""
    rows = bench_linear_act.run("cpu")
    assert not [r for r in rows if "error" in r], rows
    assert {r["impl"] for r in rows} == {"unfused", "torch", "gemm F.linear"}
    assert {r["name"] for r in rows} == {"ffn up + gelu", "ffn up + gelu_tanh", "ffn up + relu"}
    assert all(r["speedup"] > 0 for r in rows)
    assert all(r["speedup"] == 1.0 for r in rows if r["impl"] == "unfused")


def test_linear_act_encoder_rows_run():
    """The encoder rows (a CUDA-only step of run()) on a small model on CPU: both settings timed, each against the
    epilogue-off row, and the setting restored after."""
    before = os.environ.get("BERTFAST_LINEAR_EPILOGUE")
    rows = bench_linear_act.encoder_rows("cpu", True, dtype=torch.float32, model="tiny",
                                         dims=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=128), batches=((2, 16), (1, 8)))
    assert os.environ.get("BERTFAST_LINEAR_EPILOGUE") == before
    assert not [r for r in rows if "error" in r], rows
    assert [(r["shape"], r["impl"]) for r in rows] == [("2x16 tiny", "epilogue off"), ("2x16 tiny", "epilogue on"),
                                                       ("1x8 tiny", "epilogue off"), ("1x8 tiny", "epilogue on")]
    assert all(r["ms"] > 0 and r["speedup"] > 0 and r["name"] == "encoder gelu_new" for r in rows)


def test_cuda_ops_cases_run(monkeypatch):
    """bench_cuda_ops (a CUDA-only step of the suite) on CPU tensors at a small shape, timed once: each op's four
    rows (checked, unchecked, torch replayed, torch as called) with no error; each of ours has its ratio to torch
    timed the same way (the checked op as called against torch as called, the unchecked replay against torch's
    replay), and none where torch's capture failed (a replay against a call would put host time in the ratio)."""
    from benchmarks import bench_cuda_ops as bench
    monkeypatch.setattr(bench, "SHAPES", [(37, 48)])
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda device: 1.0)
    calls = []

    def fake_timeit(fn, device, graph=False, **kw):     # ms 1, 2, 4, 8 for the four rows of each op
        fn()
        calls.append(graph)
        ms = float(2 ** ((len(calls) - 1) % 4))
        timing = {} if not graph else {"timing": "eager (not captured: a sync)" if failed and ms == 4 else
                                       "cuda graph", "host_ms": 0.1}
        return dict(ms=ms, p20=ms, p80=ms, **timing)
    monkeypatch.setattr(bench, "timeit", fake_timeit)
    for failed in (False, True):
        calls.clear()
        rows = bench.run("cpu", quick=True)
        assert not [r for r in rows if "error" in r], rows
        assert [(r["name"], r["impl"]) for r in rows] == [
            (op, impl) for op in ("embed", "unpad", "pad")
            for impl in ("bertfast_C", "bertfast_C unchecked", "torch", "torch as called")]
        assert calls == [False, True, True, False] * 3
        ratios = {r["impl"]: r.get("speedup") for r in rows[:4]}
        assert ratios == {"bertfast_C": 8.0, "bertfast_C unchecked": None if failed else 2.0, "torch": None,
                          "torch as called": None}, ratios


SMALL_CPU_SIZES = dict(T=64, H=48, I=96, B=4, S=32)


def _dropout_ln_reference(bench, T, H, fac):
    """The dropout LayerNorm cases' forward and gradients by torch's autograd in float64 with the dropout factors
    fac [T, H]: (y, [dx, dresidual, dw, db, dx_bias])."""
    x, r, dy, w, b, xb = (t.double().requires_grad_() for t in bench.ln_inputs(T, H, torch.Generator().manual_seed(0)))
    y = torch.nn.functional.layer_norm((x + xb) * fac.double() + r, (H,), w, b, 1e-12)
    gx, gr, gw, gb, gxb = torch.autograd.grad(y, (x, r, w, b, xb), dy)
    return y.detach().float(), [g.float() for g in (gx, gr, gw, gb, gxb)]


def test_cpu_ops_cases_run():
    """bench_cpu_ops (the CPU suite's kernel rows) at small sizes: every case runs; both sides of a case compute
    the same outputs and gradients (with dropout each side draws its own mask, so each side is checked against
    torch's autograd applying that side's mask: ours from its Philox seed, the composite's from torch's generator
    replayed); byte counts by formula; every row carries its GB/s and the fractions of the two copies, consistent
    with its bytes and time."""
    from benchmarks import bench_cpu_ops as bench
    T, H, I = SMALL_CPU_SIZES["T"], SMALL_CPU_SIZES["H"], SMALL_CPU_SIZES["I"]

    def torch_mask(seed):     # the factors F.dropout draws on a [T, H] fp32 tensor right after manual_seed(seed)
        torch.manual_seed(seed)
        return torch.nn.functional.dropout(torch.ones(T, H), bench.DROPOUT_P, training=True)
    # the backward-only composite draws its mask once, when _cases builds its graph (the first draw of torch's
    # generator there: the inputs come from the cases' own generator)
    built_mask = torch_mask(5)
    torch.manual_seed(5)
    cases = bench._cases(**SMALL_CPU_SIZES)
    assert len({c[0] for c in cases}) == len(cases)
    ours_fac = torch.ops.bertfast_C._dropout_factors(bench.DROPOUT_P, bench.SEED, 0, T * H).view(T, H)
    for name, shape, ours, theirs, nbytes in cases:
        a = ours()
        torch.manual_seed(7)
        b = theirs()
        if "dropout" in name:
            ref_ours = _dropout_ln_reference(bench, T, H, ours_fac)
            ref_torch = _dropout_ln_reference(bench, T, H, built_mask if "_backward" in name else torch_mask(7))
        a = [t for t in (a if isinstance(a, (tuple, list)) else [a]) if t is not None]
        b = list(b) if isinstance(b, (tuple, list)) else [b]
        if name.startswith("add_layer_norm") and ("backward" in name or "fwd+bwd" in name):
            # ours: dx, [dresidual], dweight, dbias, dx_bias; torch: the grads of x, weight, bias, residual, x_bias
            dx, *rest = a
            dres = rest.pop(0) if len(rest) == 4 else dx
            a, b = [dx, dres, *rest], [b[0], b[3], b[1], b[2], b[4]]
            pick = 1            # the gradients
        elif name.startswith("add_layer_norm"):
            a, pick = a[:1], 0  # y
        elif name.startswith("embed_backward"):
            b = list(b)
        elif name == "embed":
            a = a[:1]
        assert len(a) == len(b), (name, len(a), len(b))
        for i, (u, v) in enumerate(zip(a, b)):
            assert u.shape == v.shape, (name, u.shape, v.shape)
            if "dropout" in name:
                want_u, want_v = ([ref[0]] if pick == 0 else ref[1] for ref in (ref_ours, ref_torch))
                torch.testing.assert_close(u, want_u[i], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}, ours: {m}")
                torch.testing.assert_close(v, want_v[i], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}, torch: {m}")
            else:
                torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    byname = {c[0]: c[4] for c in cases}
    assert byname["add_layer_norm"] == 4 * (3 * T * H + 2 * T + 3 * H)                  # x, r -> y, stats; w, b, xb
    assert byname["add_layer_norm_backward"] == 4 * (4 * T * H + 2 * T + 5 * H)         # dy, x, r, stats -> dx
    assert byname["add_layer_norm_backward(gelu)"] == byname["add_layer_norm_backward"] + 4 * T * H   # dresidual
    assert byname["add_layer_norm(dropout 0.1)"] == byname["add_layer_norm"] + T * ((H + 7) // 8)     # keep bits
    assert byname["bias_act(gelu)"] == 4 * (2 * T * I + I)
    assert byname["add_layer_norm fwd+bwd"] == byname["add_layer_norm"] + byname["add_layer_norm_backward"]
    rows = bench.run(quick=True, sizes=SMALL_CPU_SIZES)
    copy = rows[0]
    assert copy["name"] == "copy" and copy["ms"] is None and copy["gbps"] > 0
    assert len(rows) == 1 + 2 * len(cases)
    for r in rows[1:]:
        assert r["ms"] > 0 and r["bytes"] == byname[r["name"]], r
        gbps = r["bytes"] / (r["ms"] * 1e-3) / 1e9         # r["ms"] is rounded to 3 decimals
        assert r["gbps"] > 0 and abs(r["gbps"] / gbps - 1) < 0.05 + 0.0005 / r["ms"], r
        assert abs(r["frac_copy_bw"] / (r["gbps"] / copy["gbps"]) - 1) < 0.01, r
        assert r["frac_same_bytes_copy"] > 0, r


def test_cpu_results_folders_name_the_model():
    """Each CPU model gets its own results folder (cutting from the first "(" made every Intel CPU one folder)."""
    from benchmarks.common import cpu_slug
    names = ["Intel(R) Xeon(R) Processor (2 threads)", "Intel(R) Xeon(R) Platinum 8480+ (2 threads)",
             "Intel(R) Xeon(R) CPU @ 2.20GHz (2 threads)", "Intel(R) Core(TM) i9-13900K (2 threads)",
             "AMD EPYC (2 threads)", "AMD EPYC 7B13 64-Core Processor (2 threads)"]
    slugs = [cpu_slug(n, 2) for n in names]
    assert slugs == ["cpu-intel-xeon-2t", "cpu-intel-xeon-platinum-8480-2t", "cpu-intel-xeon-2t",
                     "cpu-intel-core-i9-13900k-2t", "cpu-amd-epyc-2t", "cpu-amd-epyc-7b13-64-core-2t"]
    assert cpu_slug("AMD EPYC (2 threads)", 4) == "cpu-amd-epyc-4t"


def test_cpu_forward_rows_are_timed_interleaved():
    """bench_model's CPU forward rows: the implementations of a workload are timed in one alternating group (a, b,
    a, b: the VM's drift hits each alike), a failing one gets its error row and the others are still timed, in the
    order given."""
    from benchmarks import bench_model
    order = []

    def impl(name):
        return lambda: order.append(name)

    def boom():
        raise RuntimeError("no such backend")
    rows = bench_model.interleaved_rows({"a": impl("a"), "bad": boom, "b": impl("b")},
                                        lambda i, t, error=None: dict(impl=i, t=t, error=error), "cpu", rep_ms=1)
    assert [r["impl"] for r in rows] == ["a", "bad", "b"]
    assert rows[1]["t"] is None and "RuntimeError: no such backend" in rows[1]["error"]
    assert all(r["t"]["ms"] > 0 and r["error"] is None for r in (rows[0], rows[2]))
    timed = order[2:]                 # after each one's first call (a, b) and the estimate (a, b): alternating
    assert len(timed) >= 10 and timed == ["a", "b"] * (len(timed) // 2)


def test_a_capture_the_allocator_does_not_survive_turns_graphs_off(monkeypatch):
    """After a failed capture the caller's stream is restored and the graph's pool released; if empty_cache still
    fails (torch 2.11 leaves its allocator mid-capture), the rest of the process times rows as called and says why,
    instead of every later capture and empty_cache failing (CUDA replaced by stand-ins)."""
    from benchmarks import common
    monkeypatch.setattr(common, "_CAPTURE_OFF", [])
    done = []
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: done.append(("stream", s)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda d, p: done.append(("end", p)), raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda d, p: done.append(("release", p)), raising=False)

    def stuck():
        raise RuntimeError("captures_underway.empty() INTERNAL ASSERT FAILED")
    monkeypatch.setattr(torch.cuda, "empty_cache", stuck)
    try:
        raise RuntimeError("operation not permitted when stream is capturing")
    except RuntimeError:
        try:
            raise RuntimeError("operation failed due to a previous error during capture")
        except RuntimeError as exc:
            common._after_failed_capture((0, 7), "caller", exc)
    assert done == [("stream", "caller"), ("end", (0, 7)), ("release", (0, 7))]
    assert "operation not permitted when stream is capturing" in common._CAPTURE_OFF[0]
    assert "did not recover" in common._CAPTURE_OFF[0]
    with pytest.raises(RuntimeError, match="graph capture is off in this process"):
        common.capture_graph(lambda: None)


def test_suite_ceilings_are_the_higher_of_start_and_end(monkeypatch, tmp_path):
    """The suite measures its ceilings at the start and at the end and takes the higher of each: a ceiling
    measured on a busy machine (2026-11-26's AMD run: 0.088 TFLOP/s against 0.19 idle) put model rows at 127%
    MFU. A fraction still above 100% is marked, not hidden; CPU rates keep their significant digits."""
    from benchmarks import suite
    measured = iter([{"copy_gbs": 10.0, "matmul_float32": 0.09, "matmul_tflops": 0.09, "matmul_dtype": "fp32"},
                     {"copy_gbs": 8.0, "matmul_float32": 0.19, "matmul_tflops": 0.19, "matmul_dtype": "fp32"}])
    monkeypatch.setattr(suite, "measure_ceilings", lambda device: next(measured))
    rows = [{"kind": "model", "model": "m", "dtype": "float32", "workload": "w", "impl": impl, "device": "cpu",
             "ms": ms, "p20": ms, "p80": ms, "tflops": tf, "tokens_per_s": 1.0}
            for impl, ms, tf in (("bertfast", 1.0, 0.2), ("transformers-sdpa", 2.0, 0.1))]
    rows.append({"kind": "kernel", "bench": "b", "name": "unpad", "impl": "x", "ms": 1.0, "gbps": 11.0,
                 "frac_copy_bw": 1.1})
    monkeypatch.setattr(suite, "_run_benchmarks", lambda args, device, benches, rows_, save, progress: rows)
    monkeypatch.setattr(suite, "plot", lambda out, env, rows: [])
    assert suite.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    import json
    c = json.loads((tmp_path / "results.json").read_text())["ceilings"]
    assert (c["copy_gbs"], c["matmul_tflops"], c["matmul_float32"]) == (10.0, 0.19, 0.19)
    assert (c["start"]["matmul_tflops"], c["end"]["matmul_tflops"]) == (0.09, 0.19)
    md = (tmp_path / "results.md").read_text()
    assert "matmul fp32 0.19 (start 0.09, end 0.19) TFLOP/s" in md and "differ by up to 111%" in md
    bertfast_row = next(line for line in md.splitlines() if "| bertfast |" in line)
    assert "| 0.2 | 105% (!) |" in bertfast_row
    assert "| 0.1 | 53% |" in next(line for line in md.splitlines() if "| transformers-sdpa |" in line)
    assert "| 110% (!) |" in next(line for line in md.splitlines() if "| unpad" in line)   # CPU: its own copy
    assert md.count("(!) above the") == 2
    isa = torch.ops.bertfast_C.cpu_isa()      # which of the CPU kernels' builds ran: the results must say
    assert f"CPU kernels' ISA {isa}." in md and json.loads((tmp_path / "results.json").read_text())[
        "environment"]["bertfast_cpu_isa"] == isa

    # the time limit's SIGINT (or a CUDA error) during the second measurement keeps a finished run complete
    def interrupted(device, calls=[]):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return {"copy_gbs": 10.0, "matmul_float32": 0.09, "matmul_tflops": 0.09, "matmul_dtype": "fp32"}
    monkeypatch.setattr(suite, "measure_ceilings", interrupted)
    assert suite.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is True and "end" not in saved["ceilings"] and saved["ceilings"]["matmul_tflops"] == 0.09
    assert "measured at the start of this run only" in (tmp_path / "results.md").read_text()


def test_suite_fractions_per_dtype_and_of_the_highest_copy():
    """GPU runs: a model row's MFU is of its own dtype's matmul rate (fp32 runs at a fraction of bf16's with TF32
    off), a kernel row's fraction of copy bandwidth is of the higher of its benchmark's copy and the suite's (the
    benchmark's own kept as frac_bench_copy), and attention rows show both of their ratios."""
    import torch

    from benchmarks import suite
    c = suite.combine_ceilings(
        {"copy_gbs": 4000.0, "matmul_bfloat16": 680.0, "matmul_float16": 700.0, "matmul_float32": 50.0,
         "matmul_tflops": 680.0, "matmul_dtype": "bf16"},
        {"copy_gbs": 4200.0, "matmul_bfloat16": 690.0, "matmul_float16": 650.0, "matmul_float32": 55.0,
         "matmul_tflops": 690.0, "matmul_dtype": "bf16"})
    assert [suite.matmul_ceiling(c, d) for d in ("bfloat16", "float16", "float32")] == [690.0, 700.0, 55.0]
    rows = [{"kind": "kernel", "gbps": 2834.0, "frac_copy_bw": 0.689},       # its bench's copy: 4113 GB/s
            {"kind": "kernel", "gbps": 2834.0, "frac_copy_bw": 0.6},         # its bench's copy: 4723 GB/s
            {"kind": "kernel", "gbps": None, "frac_copy_bw": None}, {"kind": "model", "gbps": 1.0, "frac_copy_bw": 1}]
    suite.rebase_kernel_fractions(rows, c, torch.device("cuda"))
    suite.rebase_kernel_fractions(rows, c, torch.device("cuda"))             # idempotent
    assert [r.get("frac_copy_bw") for r in rows] == [0.675, 0.6, None, 1]
    assert [r.get("frac_bench_copy") for r in rows] == [0.689, 0.6, None, None]
    cpu_row = {"kind": "kernel", "gbps": 20.0, "frac_copy_bw": 1.12}
    suite.rebase_kernel_fractions([cpu_row], c, torch.device("cpu"))
    assert cpu_row == {"kind": "kernel", "gbps": 20.0, "frac_copy_bw": 1.12}
    text = suite.ceilings_sentence(c)
    assert "copy bandwidth 4200 (start 4000, end 4200) GB/s" in text and "fp32 55.0 (start 50.0, end 55.0)" in text
    assert "differ" not in text
    assert suite._speedup_cell({"ratio_vs_sdpa_flash": 0.9, "ratio_vs_sdpa_masked": 2.5}) == "0.90x flash, 2.50x masked"
    assert suite._speedup_cell({"speedup": 1.5, "ratio_vs_sdpa_flash": 0.9}) == "1.50x"
    assert suite._speedup_cell({"ratio_vs_sdpa_flash": None}) == ""


def test_attention_ratios_compare_rows_timed_alike():
    """bench_attention's ratios: over sdpa-flash and over the fastest masked SDPA backend, each only between rows
    timed the same way (a failed capture's "eager" row against a graph replay gives no ratio)."""
    from benchmarks import bench_attention
    graph, eager = "cuda graph", "eager (not captured: x)"
    group = [dict(impl=i, ms=ms, timing=t) for i, ms, t in (
        ("bertfast", 1.0, graph), ("sdpa-flash", 0.8, graph), ("sdpa-efficient", 1.5, graph),
        ("sdpa-efficient+mask", 3.0, graph), ("sdpa-math+mask", 2.0, eager), ("sdpa-math", 9.0, graph),
        ("broken", None, None))]
    bench_attention.add_ratios(group)
    by = {r["impl"]: r for r in group}
    # the fastest masked backend (math+mask, 2.0 ms as called: its kernels take at most that) was timed another
    # way: no masked ratio for graph-timed rows, rather than one against the slower efficient+mask (3.0x)
    assert by["bertfast"]["ratio_vs_sdpa_flash"] == 0.8 and by["bertfast"]["ratio_vs_sdpa_masked"] is None
    assert by["sdpa-math+mask"]["ratio_vs_sdpa_flash"] is None            # eager against a replay
    assert by["sdpa-math+mask"]["ratio_vs_sdpa_masked"] == 1.0            # against itself
    assert "ratio_vs_sdpa_flash" not in by["broken"]
    by["sdpa-math+mask"]["timing"] = graph                                # all graph-timed: the fastest decides
    bench_attention.add_ratios(group)
    assert by["bertfast"]["ratio_vs_sdpa_masked"] == 2.0 and by["sdpa-efficient+mask"]["ratio_vs_sdpa_masked"] == 2 / 3


def test_speedup_and_timing_kind():
    """benchmarks.common.speedup: base / row in `key` (above 1: row is faster), None where either has no time or
    the two were timed differently; timing_kind: only a graph replay is "cuda graph" (a row without `timing` - CPU,
    whole-model and checked rows - was timed as called)."""
    from benchmarks.common import speedup, timing_kind
    graph, eager = {"timing": "cuda graph"}, {"timing": "eager (not captured: RuntimeError: x)"}
    assert timing_kind(graph) == "cuda graph"
    assert timing_kind(eager) == timing_kind({}) == timing_kind({"timing": None}) == "as called"
    assert speedup(dict(ms=2.0, **graph), dict(ms=0.5, **graph)) == 4.0
    assert speedup(dict(ms=2.0), dict(ms=0.5, **eager)) == 4.0           # both as called
    assert speedup(dict(ms=2.0, **graph), dict(ms=0.5)) is None            # a replay against a call as made
    assert speedup(dict(ms=2.0, **eager), dict(ms=0.5, **graph)) is None
    for base, row in ((None, dict(ms=1.0)), ({}, dict(ms=1.0)), (dict(ms=None), dict(ms=1.0)),
                      (dict(ms=0.0), dict(ms=1.0)), (dict(ms=1.0), dict(error="x")), (dict(ms=1.0), dict(ms=None))):
        assert speedup(base, row) is None, (base, row)
    assert speedup(dict(ms=1.0, host_ms=3.0), dict(ms=2.0, host_ms=1.5), key="host_ms") == 2.0


def test_ceiling_formulas_and_interleaved_statistics(monkeypatch):
    """The ceilings' arithmetic (copy: bytes read + written; matmul: 2 n^3 flops) and timeit_interleaved's
    statistics (median, 20th and 80th percentiles of the alternating repetitions), on a stand-in clock."""
    import types

    from benchmarks import common
    monkeypatch.setattr(common, "timeit", lambda fn, device: {"ms": 2.0})
    assert common.copy_bandwidth_gbs("cpu") == pytest.approx(2 * (1 << 24) * 4 / 2e-3 / 1e9)
    assert common.matmul_tflops("cpu") == pytest.approx(2 * 1024 ** 3 / 2e-3 / 1e12)
    clock, order = [0.0], []
    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def fn(name, seconds):
        it = iter(seconds)

        def call():
            order.append(name)
            clock[0] += next(it)
        return call
    # the first call (1 s) sizes the repetitions: 400 ms / 1 s -> min_reps
    out = common.timeit_interleaved({"a": fn("a", [1.0, .001, .002, .003, .004, .010]),
                                     "b": fn("b", [0.5] + [0.002] * 5)}, "cpu", rep_ms=400, min_reps=5, warmup=False)
    assert order == ["a", "b"] + ["a", "b"] * 5
    assert out["a"] == pytest.approx({"ms": 3.0, "p20": 1.2, "p80": 8.8})       # statistics.quantiles(n=5)
    assert out["b"] == pytest.approx({"ms": 2.0, "p20": 2.0, "p80": 2.0})


def _md_model(dtype, tflops, impl="bertfast"):
    return {"kind": "model", "model": "m", "dtype": dtype, "workload": "w", "impl": impl, "ms": 1.0, "p20": 1.0,
            "p80": 1.0, "tflops": tflops, "tokens_per_s": 1.0}


def test_suite_markdown_marks_only_what_is_over_a_ceiling(tmp_path):
    """results.md's "(!)" and its notes appear only where a fraction is above 100% (at 100% exactly: neither); a
    model row's MFU is of its own dtype's matmul rate, or of the headline rate in results written before per-dtype
    ceilings; a speed-up that benchmarks.common.speedup refused says so rather than showing nothing."""
    from benchmarks import suite
    env = {"device": "GPU T", "date": "2026-12-01", "commit": "abc", "torch": "2", "device_type": "cuda"}
    ceilings = suite.combine_ceilings({"copy_gbs": 4000.0, "matmul_bfloat16": 700.0, "matmul_float32": 50.0,
                                       "matmul_tflops": 700.0, "matmul_dtype": "bf16"})
    kernel = {"kind": "kernel", "bench": "b", "name": "k", "impl": "x", "ms": 1.0, "gbps": 4000.0,
              "frac_copy_bw": 1.0, "speedup": None}
    path = tmp_path / "results.md"
    suite.write_markdown(path, env, ceilings, [_md_model("bfloat16", 700.0), _md_model("float32", 45.0), kernel])
    md = path.read_text()
    assert "(!)" not in md
    lines = md.splitlines()
    assert "| 700.0 | 100% |" in lines[lines.index("## Whole encoder") + 4]
    assert "| 45.0 | 90% |" in lines[lines.index("## Whole encoder") + 5]          # of fp32's 50, not bf16's 700
    assert "| 100% | n/a (baseline failed, or timed another way) |" in next(ln for ln in lines if "| k " in ln)
    # a kernel row over its ceiling: its mark and note, not the model rows'
    suite.write_markdown(path, env, ceilings, [_md_model("bfloat16", 700.0), dict(kernel, frac_copy_bw=1.01)])
    md = path.read_text()
    assert md.count("(!)") == 2 and "(!) above the ceiling it is a fraction of" in md
    assert "above the measured matmul ceiling" not in md
    # results written before per-dtype ceilings: the headline rate
    old = {"copy_gbs": 4000.0, "matmul_tflops": 700.0, "matmul_dtype": "bf16"}
    assert suite.matmul_ceiling(old, "float32") == 700.0
    suite.write_markdown(path, env, old, [_md_model("float32", 45.0)])
    assert "| 45.0 | 6% |" in path.read_text()


def test_suite_ceiling_spread_either_way():
    """The "differ by up to" warning: over 20% between the start's and the end's measurement of any ceiling,
    whichever of the two was higher."""
    from benchmarks import suite

    def sentence(start_copy, end_copy):
        return suite.ceilings_sentence(suite.combine_ceilings(
            {"copy_gbs": start_copy, "matmul_float32": 1.0, "matmul_tflops": 1.0, "matmul_dtype": "fp32"},
            {"copy_gbs": end_copy, "matmul_float32": 1.0, "matmul_tflops": 1.0, "matmul_dtype": "fp32"}))
    assert "differ" not in sentence(100.0, 118.0)
    assert "differ by up to 25%" in sentence(100.0, 125.0)
    assert "differ by up to 25%" in sentence(125.0, 100.0)      # the machine got busier during the run


def test_suite_interrupted_run_is_saved_incomplete(monkeypatch, tmp_path):
    """The GPU suite's time limit (SIGINT) during the benchmarks: the rows measured so far are kept, the run is saved
    complete: false (benchmarks.decide ignores it), its ceilings are not measured again (it is out of time), and
    the exit status is 130."""
    import json

    from benchmarks import suite
    calls = []

    def measure(device):
        calls.append(device)
        return {"copy_gbs": 10.0, "matmul_float32": 0.19, "matmul_tflops": 0.19, "matmul_dtype": "fp32"}
    done = {"kind": "kernel", "bench": "b", "name": "unpad", "impl": "x", "ms": 1.0, "gbps": 5.0,
            "frac_copy_bw": 0.5}

    def interrupted(args, device, benches, rows, save, progress):
        save(rows + [done])
        raise KeyboardInterrupt
    monkeypatch.setattr(suite, "measure_ceilings", measure)
    monkeypatch.setattr(suite, "_run_benchmarks", interrupted)
    monkeypatch.setattr(suite, "plot", lambda out, env, rows: [])
    assert suite.main(["--device", "cpu", "--out", str(tmp_path)]) == 130
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is False and saved["rows"] == [done] and "end" not in saved["ceilings"]
    assert len(calls) == 1
    assert "measured at the start of this run only" in (tmp_path / "results.md").read_text()


def test_suite_gpu_run_rebases_kernel_fractions(monkeypatch, tmp_path):
    """A GPU run (CUDA stood in for): main rebases the kernel rows' fractions on the higher of the start's and the
    end's copy measurement before saving, and the fp32 model row's MFU is of the fp32 rate."""
    import json

    from benchmarks import suite
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(suite, "environment", lambda device: {"device": "GPU T", "device_type": "cuda",
                                                              "date": "2026-12-01T00:00:00+00:00", "commit": "abc",
                                                              "torch": torch.__version__})
    measured = iter([{"copy_gbs": 4000.0, "matmul_bfloat16": 680.0, "matmul_float32": 50.0, "matmul_tflops": 680.0,
                      "matmul_dtype": "bf16"},
                     {"copy_gbs": 4200.0, "matmul_bfloat16": 690.0, "matmul_float32": 55.0, "matmul_tflops": 690.0,
                      "matmul_dtype": "bf16"}])
    monkeypatch.setattr(suite, "measure_ceilings", lambda device: next(measured))
    rows = [_md_model("float32", 44.0),
            {"kind": "kernel", "bench": "bench_norm_act", "name": "ln", "impl": "x", "ms": 1.0, "gbps": 2834.0,
             "frac_copy_bw": 0.689}]
    monkeypatch.setattr(suite, "_run_benchmarks", lambda args, device, benches, rows_, save, progress: rows)
    monkeypatch.setattr(suite, "plot", lambda out, env, rows: [])
    assert suite.main(["--device", "cuda", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is True
    assert (saved["rows"][1]["frac_copy_bw"], saved["rows"][1]["frac_bench_copy"]) == (0.675, 0.689)
    assert "| 44.0 | 80% |" in (tmp_path / "results.md").read_text()
