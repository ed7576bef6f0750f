"""kernels/launch.py: the launch cache in front of Triton's JITFunction.run.

A hit must launch the compiled kernel Triton itself would have picked, with the arguments Triton would have passed.
Two ways of checking it without a GPU: the cache's facts against Triton's own specialisation of every boundary value
(here), and every launcher through Triton's compiled launch path with a stand-in driver (benchmarks.host_proxy's)
that records each launch, with BERTFAST_CHECK_LAUNCHES=1 asking Triton on every hit (a subprocess: this process
runs the kernels in the interpreter, where the cache is off).
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# every boundary of Triton 3.6's int specialisation (1; multiples of 16; i32 / i64 / u64), and neighbours
INTS = sorted(v + d for v in (0, 16, 2 ** 31, -2 ** 31, 2 ** 32, 2 ** 63, -2 ** 63, 2 ** 64 - 16)
              for d in (-17, -16, -15, -1, 0, 1, 15) if -2 ** 63 <= v + d < 2 ** 64)

def _triton_spec(value, specialize=True):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    return native_specialize_impl(CUDABackend, value, False, specialize, True)


@pytest.mark.parametrize("specialize", [True, False], ids=["specialised", "do_not_specialize"])
def test_int_facts_refine_tritons_specialisation(specialize):
    """Equal facts must mean an equal specialisation (the facts may split finer: that only costs a cache entry)."""
    from bertfast.kernels.launch import _int_facts
    by_facts = {}
    for v in INTS:
        by_facts.setdefault(_int_facts(v), set()).add(_triton_spec(v, specialize))
    split = {facts: specs for facts, specs in by_facts.items() if len(specs) > 1}
    assert not split, f"ints with equal facts that Triton specialises apart: {split}"
    assert len(by_facts) >= 6      # 1; i32 / i64 / u64, each with and without 16 | v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.uint8])
def test_tensor_facts_refine_tritons_specialisation(dtype):
    """A tensor's specialisation is its dtype and whether its address is a multiple of 16: the cache keys on the
    dtype and takes a hit only when every address is a multiple of 16. Floats, bools and None specialise by type
    alone, which the key's argument types cover."""
    buf = torch.zeros(64, dtype=dtype)
    seen = set()
    for offset in range(33):
        t = buf[offset:]
        spec = _triton_spec(t)
        assert spec == (f"*{_triton_spec(buf)[0][1:]}", "D" if t.data_ptr() % 16 == 0 else ""), spec
        seen.add(spec[1])
    assert seen == {"D", ""}
    assert {_triton_spec(v) for v in (0.0, 1.0, -2.5, 1e300, float("nan"))} == {("fp32", None)}
    assert {_triton_spec(v) for v in (True, False)} == {("u1", None)}
    assert _triton_spec(None) == ("constexpr", None)


_RECORDED = r"""
import os, torch
from benchmarks import host_proxy
from benchmarks.launch_smoke import triton_launches

launched, streams, handles = [], [], []
with host_proxy.stand_in_gpu(), triton_launches() as triton_path:
    from triton.runtime import driver
    driver.active.launcher_cls = lambda src, metadata: (lambda *a: launched.append((src.name, a)))
    # a new stream value at every query and a function handle per compiled kernel, so that a launch handed another
    # stream or kernel than the one Triton's path would hand it shows
    def stream(device):
        streams.append(1000 + len(streams))
        return streams[-1]
    driver.active.get_current_stream = stream
    def load_binary(name, kernel, shared, device):
        handles.append(name)
        return 1, 100 + len(handles), 64, 0, 1024
    driver.active.utils.load_binary = load_binary
    from bertfast.kernels import attention as A, gelu as G, launch, layer_norm as L
    assert launch.ENABLED and launch.CHECK
    h = torch.float16

    def aligned(n, k, offset=0):
        buf = torch.randn(n * k + offset, dtype=h)
        return buf[offset:].view(n, k)

    w, b = torch.ones(384, dtype=h), torch.zeros(384, dtype=h)
    qkv = torch.randn(16, 3, 2, 32, dtype=h)
    cu = torch.tensor([0, 9, 16], dtype=torch.int32)
    out, lse = torch.randn(16, 2, 32, dtype=h), torch.randn(2, 16)
    cases = {
        "ln fwd 16 rows": lambda: L.add_layer_norm_forward(aligned(16, 384), w, b, 1e-12, residual=aligned(16, 384)),
        "ln fwd 17 rows": lambda: L.add_layer_norm_forward(aligned(17, 384), w, b, 1e-12, residual=aligned(17, 384)),
        "ln fwd 1 row, gelu, x_bias": lambda: L.add_layer_norm_forward(aligned(1, 384), w, b, 1e-5, x_bias=b,
                                                                       activation="gelu"),
        "ln fwd dropout, i32 seed": lambda: L.add_layer_norm_forward(aligned(16, 384), w, b, 1e-12, dropout_p=0.1,
                                                                     seed=5, residual=aligned(16, 384)),
        "ln fwd dropout, i64 seed": lambda: L.add_layer_norm_forward(aligned(16, 384), w, b, 1e-12, dropout_p=0.1,
                                                                     seed=2 ** 40 + 3, residual=aligned(16, 384)),
        "ln fwd misaligned x": lambda: L.add_layer_norm_forward(aligned(16, 384, offset=1), w, b, 1e-12),
        "ln bwd": lambda: L.add_layer_norm_backward(aligned(16, 384), aligned(16, 384), w, b, torch.zeros(16),
                                                    torch.ones(16), residual=aligned(16, 384)),
        "bias_act fwd": lambda: G.bias_act_forward(aligned(16, 1536), torch.zeros(1536, dtype=h), "gelu"),
        "bias_act fwd 1 row tanh": lambda: G.bias_act_forward(aligned(1, 1536), torch.zeros(1536, dtype=h),
                                                              "gelu_tanh"),
        "bias_act bwd": lambda: G.bias_act_backward(aligned(16, 1536), aligned(16, 1536), torch.zeros(1536, dtype=h)),
        "attention fwd": lambda: A.attention_forward(qkv, cu, 9),
        "attention fwd dropout": lambda: A.attention_forward(qkv, cu, 9, dropout_p=0.2, seed=2 ** 33),
        "attention bwd": lambda: A.attention_backward(torch.randn_like(out), qkv, out, lse, cu, 9),
        "dropout keep mask": lambda: L.dropout_keep_mask((16, 384), 0.1, 7, "cpu"),
        # the other dtypes, after fp16's entries exist: a key without the dtypes would hit fp16's kernels
        "ln fwd 16 rows fp32": lambda: L.add_layer_norm_forward(aligned(16, 384).float(), w.float(), b.float(), 1e-12,
                                                                residual=aligned(16, 384).float()),
        "ln fwd 16 rows bf16": lambda: L.add_layer_norm_forward(aligned(16, 384).bfloat16(), w.bfloat16(),
                                                                b.bfloat16(), 1e-12,
                                                                residual=aligned(16, 384).bfloat16()),
        "bias_act fwd fp32": lambda: G.bias_act_forward(aligned(16, 1536).float(), torch.zeros(1536), "gelu"),
        "attention fwd bf16": lambda: A.attention_forward(qkv.bfloat16(), cu, 9),
    }
    added = {}
    def entries():
        return {(ln, k): v for ln in (L._add_ln_fwd_launch, L._add_ln_bwd_launch, L._dropout_keep_launch,
                                      G._bias_act_fwd_launch, G._bias_act_bwd_launch, A._attn_fwd_launch,
                                      A._attn_bwd_preprocess_launch, A._attn_bwd_dkdv_launch, A._attn_bwd_dq_launch)
                for k, v in ln._entries.items()}
    def shape(a):
        return (a.dtype, tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a
    for name, fn in cases.items():
        rows = []
        for _ in range(2):
            before, before_l, before_t = entries(), len(launched), len(triton_path)
            fn()
            rows.append((launched[before_l:], len(triton_path) - before_t))
            added.setdefault(name, [k for k in entries() if k not in before])
            # each launch on the stream the driver reported at that launch (the last one asked for)
            assert all(a[3] == streams[-1 - (len(rows[-1][0]) - 1 - i)] for i, (_, a) in enumerate(rows[-1][0])), name
        first, second = rows
        # grid, function, packed metadata, then every kernel argument (launch_metadata and hooks: None on a hit,
        # where their chains are empty)
        same = [[(k, a[:3], a[4:6], [shape(x) for x in a[9:]]) for k, a in launches] for launches, _ in rows]
        hooks_none = all(a[6] is None and a[7] is None and a[8] is None for _, a in second[0])
        print(name, "|", len(first[0]), first[1], len(second[0]), second[1], "|", same[0] == same[1], "|",
              hooks_none if second[1] == 0 else "-")

    # a cache entry holding another specialisation's kernel (17 rows: not a multiple of 16) is caught on its next hit
    (ln, k16), = added["ln fwd 16 rows"]
    (_, k17), = added["ln fwd 17 rows"]
    assert ln._entries[k16][0] is not ln._entries[k17][0]
    ln._entries[k16] = ln._entries[k17]
    try:
        cases["ln fwd 16 rows"]()
        print("poisoned | not caught")
    except RuntimeError as exc:
        print("poisoned |", "caught" if "another specialisation" in str(exc) else exc)
"""


def test_cached_launches_are_the_launches_triton_makes():
    """Every launcher twice through Triton's compiled launch path (stand-in driver, kernels compiled for sm_90):
    the first call of each case is a miss through JITFunction.run, the second a hit that must not touch it, and
    both must hand the launcher the same grid, stream, kernel and arguments; BERTFAST_CHECK_LAUNCHES=1 asks Triton
    on every hit which compiled kernel it would have run. A misaligned tensor never hits. Covers 1 / 16 / 17 rows,
    i32 and i64 dropout seeds (which Triton compiles apart), x_bias, activations, the attention's four kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(BERTFAST_CHECK_LAUNCHES="1", BERTFAST_LAUNCH_CACHE="1")
    res = subprocess.run([sys.executable, "-c", _RECORDED], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in res.stdout.splitlines() if " | " in line}
    launches = {"attention bwd": 3}
    for name, (counts, same, hooks) in ((n, r) for n, r in rows.items() if n != "poisoned"):
        n_first, jit_first, n_second, jit_second = map(int, counts.split())
        expected = launches.get(name, 1)
        assert n_first == n_second == expected, (name, counts)
        assert jit_first == expected, (name, counts)            # a miss: Triton's own path
        if name == "ln fwd misaligned x":
            assert jit_second == expected, (name, counts)       # never cached
        else:
            assert jit_second == 0 and hooks == "True", (name, counts, hooks)
        assert same == "True", name
    assert len(rows) == 19, res.stdout
    assert rows["poisoned"] == ["caught"], res.stdout


def test_argument_types_without_facts_take_tritons_path():
    """A numpy int (or any type whose specialisation the facts do not cover) is never served from the cache."""
    import numpy as np

    from bertfast.kernels.launch import Launcher
    lay = Launcher(object())._layout
    assert lay((torch.Tensor, int, float, bool, type(None), torch.nn.Parameter)) != ()
    assert lay((torch.Tensor, np.int64)) == () and lay((np.float32,)) == ()


def test_info_says_how_triton_launches():
    """`bertfast info` names the launch path: the interpreter here (the test process' TRITON_INTERPRET=1), the
    cache without it, JITFunction.run with BERTFAST_LAUNCH_CACHE=0, and an error naming a bad value."""
    def info(**env):
        full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BERTFAST_LAUNCH_CACHE")}
        full.update(env)
        return subprocess.run([sys.executable, "-m", "bertfast", "info"], cwd=ROOT, env=full, capture_output=True,
                              text=True, timeout=300)

    def line(res):
        assert res.returncode == 0, res.stderr
        return next(l for l in res.stdout.splitlines() if l.startswith("  Triton launch"))
    assert "Triton's interpreter" in line(info(TRITON_INTERPRET="1"))
    assert "cached per specialisation" in line(info())
    assert "through JITFunction.run (BERTFAST_LAUNCH_CACHE=0)" in line(info(BERTFAST_LAUNCH_CACHE="0"))
    bad = info(BERTFAST_LAUNCH_CACHE="yes")
    assert bad.returncode != 0 and "BERTFAST_LAUNCH_CACHE must be 0 or 1, got 'yes'" in bad.stderr, bad.stderr


_TRIGGERS = r"""
import gc, sys, weakref
import torch, triton, triton.language as tl
from benchmarks import host_proxy
from benchmarks.launch_smoke import triton_launches

@triton.jit
def fill(out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, 1.0, mask=offs < n)

def through_triton(launch, setup=lambda: None, teardown=lambda: None):
    launch()                       # the cache's entry exists from here on (where the call can be cached)
    setup()
    try:
        n = len(calls)
        launch()
        return len(calls) - n
    finally:
        teardown()

with host_proxy.stand_in_gpu(), triton_launches() as calls:     # calls: the launches through JITFunction.run
    from triton import knobs
    from bertfast.kernels.launch import Launcher
    L, out = Launcher(fill), torch.zeros(64)
    plain = lambda: L((1,), out, 64, BLOCK=64)
    hook = lambda *a, **kw: None
    print("hit |", through_triton(plain))
    print("enter hook |", through_triton(plain, lambda: knobs.runtime.launch_enter_hook.add(hook),
                                         lambda: knobs.runtime.launch_enter_hook.remove(hook)))
    print("exit hook |", through_triton(plain, lambda: knobs.runtime.launch_exit_hook.add(hook),
                                        lambda: knobs.runtime.launch_exit_hook.remove(hook)))
    print("pre-run hook |", through_triton(plain, lambda: fill.pre_run_hooks.append(hook),
                                           lambda: fill.pre_run_hooks.clear()))
    print("debug |", through_triton(plain, lambda: setattr(knobs.runtime, "debug", True),
                                    lambda: setattr(knobs.runtime, "debug", False)))
    print("grid function |", through_triton(lambda: L(lambda meta: (1,), out, 64, BLOCK=64)))
    print("misaligned |", through_triton(lambda: L((1,), out[1:], 63, BLOCK=64)))
    # a runtime argument by keyword: never cached, and the tensor not kept
    t = torch.zeros(64)
    ref = weakref.ref(t)
    print("tensor by keyword |", through_triton(lambda: L((1,), out_ptr=t, n=64, BLOCK=64)))
    del t
    gc.collect()
    print("tensor let go |", ref() is None, len(L._entries))
    # a u64 int cached first, then one past 2**64: Triton refuses it, the cache must not wrap it
    u64 = Launcher(fill)
    u64((1,), out, 2 ** 64 - 16, BLOCK=64)
    u64((1,), out, 2 ** 64 - 16, BLOCK=64)
    try:
        u64((1,), out, 2 ** 64 + 16, BLOCK=64)
        print("2**64 + 16 | launched")
    except OverflowError:
        print("2**64 + 16 | refused")
"""


def test_what_the_cache_leaves_to_triton(tmp_path):
    """A hit skips JITFunction.run; a launch hook (profilers), a pre-run hook, Triton's debug mode, a grid given as a
    function and a misaligned tensor each send the launch back through it; a runtime argument given by keyword is
    never cached (nor kept alive by the cache), and an int past 2**64 is refused as Triton refuses it rather than
    handed to the launcher after a u64 was cached. (Triton's @jit needs the kernel in a file.)"""
    script = tmp_path / "triggers.py"
    script.write_text(_TRIGGERS)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BERTFAST_CHECK_LAUNCHES")}
    env.update(BERTFAST_LAUNCH_CACHE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = dict(line.split(" | ") for line in res.stdout.splitlines() if " | " in line)
    assert rows == {"hit": "0", "enter hook": "1", "exit hook": "1", "pre-run hook": "1", "debug": "1",
                    "grid function": "1", "misaligned": "1", "tensor by keyword": "1", "tensor let go": "True 1",
                    "2**64 + 16": "refused"}, res.stdout


def test_launch_smoke_compares_the_cached_launches_with_tritons(monkeypatch, capsys):
    """benchmarks.launch_smoke (the GPU suite's check before its tests, which turns the cache off where it fails):
    every case runs here in the interpreter, where both paths are Triton's, so all agree; a case whose bits depend on
    the cache, or that raises with the cache on, makes it fail; with the cache off it has nothing to check."""
    from benchmarks import launch_smoke
    from bertfast.kernels import launch
    monkeypatch.setattr(launch, "ENABLED", False)
    assert launch_smoke.run("cpu") == 0 and "nothing to check" in capsys.readouterr().out
    monkeypatch.setattr(launch, "ENABLED", True)
    assert launch_smoke.run("cpu") == 0
    out = capsys.readouterr().out
    assert out.count("same bits") == 3 and "every cached launch gave Triton's bits" in out, out
    assert launch.ENABLED is True

    def cases(device):
        def differs():
            return torch.ones(3) * (2.0 if launch.ENABLED else 1.0)

        def raises():
            if launch.ENABLED:
                raise TypeError("the launcher refused an argument")
            return torch.ones(3)
        return {"differs": differs, "raises": raises, "agrees": lambda: (torch.zeros(2), None)}
    monkeypatch.setattr(launch_smoke, "_cases", cases)
    assert launch_smoke.run("cpu") == 1
    out = capsys.readouterr().out
    assert "2 problem(s)" in out and "differs: a cached launch gave other bits" in out, out
    assert "raises: TypeError: the launcher refused an argument" in out and launch.ENABLED is True
