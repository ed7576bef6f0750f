"""bertfast.kernels.gelu (bias + activation) against float64 references.

Tolerance as in test_layer_norm.py: at most twice PyTorch's own error in the same dtype against float64, plus
one ulp of the output dtype at the output's magnitude (two for bf16: the interpreter truncates fp32 -> bf16).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from bertfast.kernels import config
from bertfast.kernels import gelu

from helpers import assert_guards_intact, guard_allocations

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = ["gelu", "gelu_tanh", "relu", "silu"]


def _act(a, activation):
    return {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu,
            "silu": F.silu}[activation](a)


def _composite(dtype, x, bias, activation, dy):
    x_ = x.detach().to(dtype).requires_grad_()
    b_ = bias.detach().to(dtype).requires_grad_() if bias is not None else None
    y = _act(x_ + b_ if b_ is not None else x_, activation)
    y.backward(dy.to(dtype))
    return y.detach(), x_.grad, (b_.grad if b_ is not None else None)


def _ulp(dtype, magnitude):
    magnitude = max(float(magnitude), torch.finfo(dtype).tiny)
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def _assert_close(name, ours, lowp, ref, dtype):
    assert ours.dtype == dtype and ours.shape == ref.shape, f"{name}: {ours.dtype} {tuple(ours.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ours_err = (ours.double() - ref).abs().max().item()
    torch_err = (lowp.double() - ref).abs().max().item()
    bound = 2 * torch_err + _ulp(dtype, ref.abs().max().item()) * (2 if dtype == torch.bfloat16 else 1)
    assert ours_err <= bound, f"{name} ({dtype}): max error {ours_err:.3g} > bound {bound:.3g} (torch {torch_err:.3g})"


def _check(n, i, dtype, activation, device, with_bias=True):
    x = (2 * torch.randn(n, i, device=device)).to(dtype)
    bias = (0.5 * torch.randn(i, device=device)).to(dtype) if with_bias else None
    dy = torch.randn(n, i, device=device).to(dtype)
    y = gelu.bias_act_forward(x, bias, activation)
    dx, dbias = gelu.bias_act_backward(dy, x, bias, activation)
    ref_y, ref_dx, ref_db = _composite(torch.float64, x, bias, activation, dy)
    low_y, low_dx, low_db = _composite(dtype, x, bias, activation, dy)
    _assert_close("y", y, low_y, ref_y, dtype)
    _assert_close("dx", dx, low_dx, ref_dx, dtype)
    if with_bias:
        _assert_close("dbias", dbias, low_db, ref_db, dtype)
    else:
        assert dbias is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(activation, dtype, device):
    # 300 columns: one full and one partial column block; 37 rows: three row tiles, the last partial
    _check(37, 300, dtype, activation, device)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fp32_curve_dense(activation, device):
    """fp32 over a dense grid of the activations' curved region, [-3.99, 3.99]: the same bound as everywhere (twice
    torch's fp32 error plus one ulp), but at the output's magnitude here (below 4) rather than at the ~8 of
    test_activations' 2 * randn inputs, where one ulp is twice as large. A 6e-6 relative error in gelu_tanh's
    sqrt(2 / pi) passed every other test of this file (mutation testing, 2026-11-27)."""
    x = torch.linspace(-3.99, 3.99, 32 * 256, device=device).reshape(32, 256)
    y = gelu.bias_act_forward(x, None, activation)
    _assert_close("y", y, _act(x, activation), _act(x.double(), activation), torch.float32)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fp32_derivative_dense(activation, device):
    """The derivatives over the same dense grid as test_fp32_curve_dense (dy = 1): the bound at the derivative's
    magnitude (~1) rather than at the ~4x larger dx of random dy. gelu_tanh's derivative taking 1 - s by subtraction
    on the positive side too (it cancels there) passed every other test of this file and of test_layer_norm.py
    (mutation testing, 2026-11-27)."""
    x = torch.linspace(-3.99, 3.99, 32 * 256, device=device).reshape(32, 256)
    dx, _ = gelu.bias_act_backward(torch.ones_like(x), x, None, activation)
    _, low, _ = _composite(torch.float32, x, None, activation, torch.ones_like(x))
    _, ref, _ = _composite(torch.float64, x, None, activation, torch.ones_like(x))
    _assert_close("dx", dx, low, ref, torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_far_tails(activation, device):
    """Inputs far out in both tails (fp32: exp(-a) and exp(-2u) overflow to inf below about -88 and -44): values
    and derivatives finite and torch's (0 or the identity's), e.g. silu's derivative written with e * s on the
    negative side gives inf * 0 = NaN there."""
    x = torch.tensor([-3e4, -1000.0, -100.0, -60.0, -30.0, 30.0, 60.0, 100.0, 1000.0, 3e4], device=device).repeat(2, 1)
    y = gelu.bias_act_forward(x, None, activation)
    dx, _ = gelu.bias_act_backward(torch.ones_like(x), x, None, activation)
    low_y, low_dx, _ = _composite(torch.float32, x, None, activation, torch.ones_like(x))
    ref_y, ref_dx, _ = _composite(torch.float64, x, None, activation, torch.ones_like(x))
    _assert_close("y", y, low_y, ref_y, torch.float32)
    _assert_close("dx", dx, low_dx, ref_dx, torch.float32)


@pytest.mark.parametrize("width", [128, 1023, 1536, 3072])
def test_widths(width, device):
    _check(5, width, torch.float16, "gelu", device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_row_counts(n, dtype, device):
    _check(n, 512, dtype, "gelu", device)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_no_bias(activation, device):
    _check(9, 384, torch.float32, activation, device, with_bias=False)


def test_out_is_fully_written(device):
    x = torch.randn(19, 1000, device=device, dtype=torch.float16)
    bias = torch.randn(1000, device=device, dtype=torch.float16)
    out = torch.full_like(x, float("nan"))
    y = gelu.bias_act_forward(x, bias, "gelu", out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), F.gelu(x.double() + bias.double()), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_nan_propagates_like_torch(activation, device):
    """NaN in, NaN out where torch's activation gives NaN (relu was tl.maximum(a, 0), whose max.f32 on a GPU
    returns the non-NaN operand: an overflowed fp16 GEMM would have been hidden); the derivative too (relu's is 1
    at NaN, torch's threshold_backward passing the gradient)."""
    nan = float("nan")
    x = torch.tensor([[nan, 1.0, -1.0, 0.0] * 5], device=device)
    fn = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu, "silu": F.silu}
    want = fn[activation](x)
    assert torch.equal(gelu.bias_act_forward(x, None, activation).isnan(), want.isnan())
    xd = x.clone().requires_grad_()
    (dref,) = torch.autograd.grad(fn[activation](xd).sum(), xd)
    dx, _ = gelu.bias_act_backward(torch.ones_like(x), x, None, activation)
    assert torch.equal(dx.isnan(), dref.isnan()), (dx, dref)
    if activation == "relu":
        assert dx[0, 0].item() == 1.0 == dref[0, 0].item()
        # and 0 at 0 (threshold_backward's a <= 0), exactly torch's everywhere
        assert torch.equal(dx, dref), (dx, dref)


def test_no_writes_outside_outputs(device, monkeypatch):
    """No kernel writes outside the tensors it is given (helpers.guard_allocations): out, dx and the dbias partial
    sums lie between guard bands; 37 x 300 leaves a partial row tile and a partial column block."""
    x = torch.randn(37, 300, device=device, dtype=torch.float16)
    bias = torch.randn(300, device=device, dtype=torch.float16)
    dy = torch.randn_like(x)
    bases = guard_allocations(monkeypatch)
    y = gelu.bias_act_forward(x, bias, "gelu", out=torch.empty_like(x))
    dx, dbias = gelu.bias_act_backward(dy, x, bias, "gelu")
    monkeypatch.undo()
    assert_guards_intact(bases)
    assert torch.equal(y, gelu.bias_act_forward(x, bias, "gelu"))
    for a, b in zip((dx, dbias), gelu.bias_act_backward(dy, x, bias, "gelu")):
        assert torch.equal(a, b)


def _check_edge_rows(n, i, device, edge=3):
    """bias + GELU forward and backward (fp16) over all n rows, the first and the last `edge` rows checked against
    the composite on those rows (dbias sums over every row and is left to the other tests)."""
    x, dy = (torch.randn(n, i, device=device, dtype=torch.float16) for _ in range(2))
    bias = (0.5 * torch.randn(i, device=device)).half()
    edges = (slice(0, edge), slice(n - edge, n))
    y = gelu.bias_act_forward(x, bias, "gelu")
    y = [y[rows].clone() for rows in edges]        # y's memory freed before dx is allocated
    dx, _ = gelu.bias_act_backward(dy, x, bias, "gelu")
    for rows, y_rows in zip(edges, y):
        (ref_y, ref_dx, _), (low_y, low_dx, _) = (_composite(dt, x[rows], bias, "gelu", dy[rows])
                                                  for dt in (torch.float64, torch.float16))
        _assert_close("y", y_rows, low_y, ref_y, torch.float16)
        _assert_close("dx", dx[rows], low_dx, ref_dx, torch.float16)


def test_edge_rows(device):
    """The check of test_more_than_2_31_elements_cuda at an ordinary size (so that its logic runs everywhere)."""
    _check_edge_rows(37, 3072, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (2^31 elements: ~13 GB in fp16)")
def test_more_than_2_31_elements_cuda():
    """N * I past 2^31 elements (3072 wide, the FFN's width in bert-base): the kernels' element offsets are int64;
    an int32 offset wraps. Not checkable in the interpreter (a 4 GiB tensor a side)."""
    try:
        _check_edge_rows((1 << 31) // 3072 + 3, 3072, torch.device("cuda"))
    finally:
        torch.cuda.empty_cache()


def test_backward_deterministic(device):
    x = torch.randn(200, 640, device=device, dtype=torch.bfloat16)
    bias = torch.randn(640, device=device, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    a = gelu.bias_act_backward(dy, x, bias, "gelu_tanh")
    b = gelu.bias_act_backward(dy, x, bias, "gelu_tanh")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty(device):
    x = torch.empty(0, 64, device=device)
    bias = torch.zeros(64, device=device)
    assert gelu.bias_act_forward(x, bias).shape == (0, 64)
    dx, db = gelu.bias_act_backward(x, x, bias)
    assert dx.shape == (0, 64) and torch.equal(db, torch.zeros_like(bias))


@pytest.mark.parametrize("make,words", [
    (lambda x, b: dict(x=x, bias=b.half()), ["bias", "dtype"]),
    (lambda x, b: dict(x=x.double(), bias=b.double()), ["x", "dtype"]),
    (lambda x, b: dict(x=x, bias=b[:-1].contiguous()), ["bias", "shape"]),
    (lambda x, b: dict(x=x, bias=b, activation="tanh"), ["activation"]),
    (lambda x, b: dict(x=x.t(), bias=b[:8].contiguous()), ["x", "contiguous"]),
    (lambda x, b: dict(x=x[0], bias=b), ["x", "2-D"]),
    (lambda x, b: dict(x=x, bias=b, out=torch.empty_like(x).half()), ["out", "dtype"]),
])
def test_bad_input(make, words, device):
    x = torch.randn(8, 128, device=device)
    b = torch.randn(128, device=device)
    with pytest.raises(config.UnsupportedInput) as err:
        gelu.bias_act_forward(**make(x, b))
    for word in words:
        assert word in str(err.value), f"{word!r} not in {str(err.value)!r}"


def test_backward_bad_input(device):
    x = torch.randn(8, 128, device=device)
    b = torch.randn(128, device=device)
    with pytest.raises(config.UnsupportedInput, match="dy"):
        gelu.bias_act_backward(x.half(), x, b)
    with pytest.raises(config.UnsupportedInput, match="dy"):
        gelu.bias_act_backward(x[:4].contiguous(), x, b)
