"""The GPU benchmarks' cases run here too (CPU tensors, Triton interpreter, small shapes), so that a GPU run - rare
and short - does not lose a benchmark to a Python error in its setup (the first H100 run lost bench_attention to
one). Nothing here measures anything."""
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


def test_linear_act_cases_run():
    """The rows that exist on CPU (linear_act itself is CUDA-only) run and compare against the encoder's path."""
    rows = bench_linear_act.run("cpu")
    assert not [r for r in rows if "error" in r], rows
    assert {r["impl"] for r in rows} == {"encoder", "torch", "gemm F.linear"}
    assert all(r["speedup"] > 0 for r in rows)
