"""The C++ kernels of bertfast._C (torch.ops.bertfast_C.*) against float64 references.

Tolerance (flash-attention's rule): the kernel's max abs error against the float64 reference may be at most
2x the error of torch's own composite run in the same dtype (3x for gradients), plus one ulp of the largest
reference value as a floor. Shapes are odd on purpose (N = 1, 7, 1000; H = 384, 1023, 768).

The fake (meta) implementations of the bertfast_C ops, which opcheck checks, are the ops layer's (bertfast/ops.py,
registered when it loads the extension).

CUDA tests (at the end) compare the CUDA kernels with the CPU ones; they run only where CUDA is available.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import bertfast._C  # noqa: F401  (registers torch.ops.bertfast_C)
import bertfast.ops
from helpers import KERNEL_DEVICE

assert bertfast.ops.cpp_extension_error() is None   # loads the extension as the ops layer does: with its fakes

ops = torch.ops.bertfast_C
HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NS = [1, 7, 1000]
HS = [384, 1023, 768]
ACTS = ["gelu", "gelu_tanh", "relu", "silu"]


# ---------------------------------------------------------------------------------------------------------------
# helpers

def _ulp(dtype, ref):
    return torch.finfo(dtype).eps * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)


def unpack_keep_bits(bits, h):
    """add_layer_norm's keep bits, uint8 [N, ceil(H / 8)] (bit c % 8 of byte c // 8) -> bool [N, H]; the bits
    past H must be 0."""
    unpacked = ((bits.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).bool().flatten(1)
    assert not unpacked[:, h:].any(), "keep bits past H are set"
    return unpacked[:, :h]


def assert_within(ours, ref, torch_lowp, dtype, factor=2.0, what=""):
    """max|ours - ref| <= factor * max|torch_lowp - ref| + one ulp of max|ref| (ref is float64)."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    if ref.numel() == 0:
        return
    err = (ours.double() - ref).abs().max().item()
    torch_err = (torch_lowp.double() - ref).abs().max().item()
    bound = factor * torch_err + _ulp(dtype, ref)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (torch {dtype} error {torch_err:.3g})"


def _act(z, act):
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if act == "relu":
        return F.relu(z)
    if act == "silu":
        return F.silu(z)
    return z


def _leaf(t, dtype=None):
    return (t.to(dtype) if dtype is not None else t.clone()).detach().requires_grad_()


# ---------------------------------------------------------------------------------------------------------------
# add_layer_norm

def _aln_composite(x, w, b, r, xb, act, eps):
    z = x if xb is None else x + xb
    z = _act(z, act)
    if r is not None:
        z = z + r
    return F.layer_norm(z, (x.shape[-1],), w, b, eps)


def _aln_inputs(n, h, dtype, with_r=True, with_xb=True):
    x = torch.randn(n, h).to(dtype)
    w = (1.0 + 0.5 * torch.randn(h)).to(dtype)
    b = (0.1 * torch.randn(h)).to(dtype)
    r = torch.randn(n, h).to(dtype) if with_r else None
    xb = (0.5 * torch.randn(h)).to(dtype) if with_xb else None
    return x, w, b, r, xb


def _check_add_layer_norm(n, h, dtype, act, with_r, with_xb, eps=1e-12):
    x, w, b, r, xb = _aln_inputs(n, h, dtype, with_r, with_xb)
    y, mean, rstd, keep = ops.add_layer_norm(x, w, b, eps, r, xb, act)
    assert y.dtype == dtype and mean.dtype == torch.float32 and rstd.dtype == torch.float32
    assert keep.shape == (0,) and keep.dtype == torch.uint8  # no dropout, no keep bits
    # float64 reference and torch's same-dtype composite, with autograd for the backward
    leaves64 = [None if t is None else _leaf(t, torch.float64) for t in (x, w, b, r, xb)]
    leaveslp = [None if t is None else _leaf(t) for t in (x, w, b, r, xb)]
    ref = _aln_composite(*[leaves64[i] for i in (0, 1, 2, 3, 4)], act, eps)
    low = _aln_composite(*[leaveslp[i] for i in (0, 1, 2, 3, 4)], act, eps)
    assert_within(y, ref, low, dtype, what="y")
    z = leaves64[0] if xb is None else leaves64[0] + leaves64[4]
    z = _act(z, act) + (0 if r is None else leaves64[3])
    var, mu = torch.var_mean(z.detach(), dim=-1, unbiased=False)
    torch.testing.assert_close(mean.double(), mu, rtol=1e-5, atol=1e-5 * max(1.0, mu.abs().max().item()))
    torch.testing.assert_close(rstd.double(), (var + eps).rsqrt(), rtol=1e-4, atol=0)

    dy = torch.randn(n, h).to(dtype)
    ref.backward(dy.double())
    low.backward(dy)
    dx, dres, dw, db, dxb = ops.add_layer_norm_backward(dy, x, w, mean, rstd, r, xb, act)
    # dresidual only where it differs from dx (an activation); else dx is the residual's gradient too
    assert (dres is None) == (r is None or act == "") and (dxb is None) == (xb is None)
    dres = dx if r is not None and act == "" else dres
    assert_within(dx, leaves64[0].grad, leaveslp[0].grad, dtype, 3.0, "dx")
    assert_within(dw, leaves64[1].grad, leaveslp[1].grad, dtype, 3.0, "dweight")
    assert_within(db, leaves64[2].grad, leaveslp[2].grad, dtype, 3.0, "dbias")
    if r is not None:
        assert_within(dres, leaves64[3].grad, leaveslp[3].grad, dtype, 3.0, "dresidual")
    if xb is not None:
        assert_within(dxb, leaves64[4].grad, leaveslp[4].grad, dtype, 3.0, "dx_bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h", HS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("act", ["", "gelu", "gelu_tanh"])
def test_add_layer_norm(n, h, dtype, act):
    _check_add_layer_norm(n, h, dtype, act, with_r=True, with_xb=True)


@pytest.mark.gpu     # its reference mask comes from the Triton kernels (on the GPU when there is one)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,with_r,p", [("", True, 0.1), ("gelu", True, 0.5), ("gelu_tanh", False, 0.1),
                                          ("", True, 1.0)])
@pytest.mark.parametrize("n,h", [(1, 384), (37, 1023), (300, 768)])
def test_add_layer_norm_dropout(n, h, dtype, act, with_r, p):
    """Dropout inside the C++ add_layer_norm: it keeps exactly the elements the Triton kernels keep for the same
    seed (kernels.layer_norm.dropout_keep_mask, here in the interpreter), and returns that mask in bits; forward
    and every gradient within the usual bounds of a float64 reference that applies that mask, dresidual given
    (it differs from dx now); the backward from the saved bits equals, bit for bit, the one that redraws them."""
    from bertfast.kernels.layer_norm import dropout_keep_mask
    seed = int(torch.randint(0, 2 ** 62, ()).item())
    x, w, b, r, xb = _aln_inputs(n, h, dtype, with_r, True)
    keep = dropout_keep_mask((n, h), p, seed, KERNEL_DEVICE).cpu()
    y, mean, rstd, keep_bits = ops.add_layer_norm(x, w, b, 1e-12, r, xb, act, p, seed)
    assert torch.equal(unpack_keep_bits(keep_bits, h), keep)
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0

    def composite(x, w, b, r, xb):
        z = torch.where(keep, _act(x + xb, act) * scale, 0.0)
        return F.layer_norm(z if r is None else z + r, (h,), w, b, 1e-12)

    leaves64 = [None if t is None else _leaf(t, torch.float64) for t in (x, w, b, r, xb)]
    leaveslp = [None if t is None else _leaf(t) for t in (x, w, b, r, xb)]
    ref, low = composite(*leaves64), composite(*leaveslp)
    assert_within(y, ref, low, dtype, what="y")
    dy = torch.randn(n, h).to(dtype)
    ref.backward(dy.double())
    low.backward(dy)
    dx, dres, dw, db, dxb = ops.add_layer_norm_backward(dy, x, w, mean, rstd, r, xb, act, p, seed, keep_bits)
    redrawn = ops.add_layer_norm_backward(dy, x, w, mean, rstd, r, xb, act, p, seed)
    for got, want in zip((dx, dres, dw, db, dxb), redrawn):
        assert (got is None and want is None) or torch.equal(got, want)
    # the bits given are the mask applied, not the seed's: another seed's bits give that seed's gradients
    if 0.0 < p < 1.0:
        other_bits = ops.add_layer_norm(x, w, b, 1e-12, r, xb, act, p, seed + 1)[3]
        from_other = ops.add_layer_norm_backward(dy, x, w, mean, rstd, r, xb, act, p, seed, other_bits)
        assert torch.equal(from_other[0], ops.add_layer_norm_backward(dy, x, w, mean, rstd, r, xb, act, p,
                                                                      seed + 1)[0])
    assert (dres is None) == (r is None)
    for name, got, i in [("dx", dx, 0), ("dweight", dw, 1), ("dbias", db, 2), ("dresidual", dres, 3),
                         ("dx_bias", dxb, 4)]:
        if leaves64[i] is not None:
            assert_within(got, leaves64[i].grad, leaveslp[i].grad, dtype, 3.0, name)
    # a different seed draws a different mask; the same seed the same output
    if 0.0 < p < 1.0 and n * h > 1000:
        assert not torch.equal(ops.add_layer_norm(x, w, b, 1e-12, r, xb, act, p, seed + 1)[0], y)
    assert torch.equal(ops.add_layer_norm(x, w, b, 1e-12, r, xb, act, p, seed)[0], y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_r,with_xb", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("act", ["", "gelu", "relu", "silu"])
def test_add_layer_norm_optional_inputs(dtype, with_r, with_xb, act):
    _check_add_layer_norm(37, 768, dtype, act, with_r, with_xb, eps=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# bias_act

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h", HS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("act", ACTS)
def test_bias_act(n, h, dtype, act):
    x = (2.0 * torch.randn(n, h)).to(dtype)
    b = torch.randn(h).to(dtype)
    y = ops.bias_act(x, b, act)
    assert y.dtype == dtype
    x64, b64, xl, bl = _leaf(x, torch.float64), _leaf(b, torch.float64), _leaf(x), _leaf(b)
    ref, low = _act(x64 + b64, act), _act(xl + bl, act)
    assert_within(y, ref, low, dtype, what="y")
    dy = torch.randn(n, h).to(dtype)
    ref.backward(dy.double())
    low.backward(dy)
    dx, db = ops.bias_act_backward(dy, x, b, act)
    assert_within(dx, x64.grad, xl.grad, dtype, 3.0, "dx")
    assert_within(db, b64.grad, bl.grad, dtype, 3.0, "dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS + [""])
def test_bias_act_no_bias_3d(dtype, act):
    x = (3.0 * torch.randn(3, 5, 130)).to(dtype)
    y = ops.bias_act(x, None, act)
    x64, xl = _leaf(x, torch.float64), _leaf(x)
    ref, low = _act(x64, act), _act(xl, act)
    assert_within(y, ref, low, dtype, what="y")
    dy = torch.randn_like(x)
    ref.backward(dy.double())
    low.backward(dy)
    dx, db = ops.bias_act_backward(dy, x, None, act)
    assert db is None
    assert_within(dx, x64.grad, xl.grad, dtype, 3.0, "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS + [""])
@pytest.mark.parametrize("shape", [(1, 1), (7, 1023), (3, 5, 130), (300, 384)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_act_in_place(shape, act, dtype, with_bias):
    """bias_act_ writes exactly bias_act's output over x, in the same storage."""
    x = (3.0 * torch.randn(*shape)).to(dtype)
    b = torch.randn(shape[-1]).to(dtype) if with_bias else None
    want = ops.bias_act(x, b, act)
    got = x.clone()
    ptr = got.data_ptr()
    assert ops.bias_act_(got, b, act) is None
    assert got.data_ptr() == ptr
    assert torch.equal(got, want)


def test_bias_act_in_place_bad_input():
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="bias_act_.*contiguous"):
        ops.bias_act_(x.t(), None, "gelu")
    with pytest.raises(RuntimeError, match="bias_act_.*bias"):
        ops.bias_act_(x, torch.randn(5), "gelu")
    with pytest.raises(RuntimeError, match="bias_act_.*activation"):
        ops.bias_act_(x, None, "tanh")
    with pytest.raises(RuntimeError, match="bias_act_: x must be float32, float16 or bfloat16"):
        ops.bias_act_(x.double(), None, "gelu")
    with pytest.raises(RuntimeError, match="bias_act_: bias must not share memory with x"):
        ops.bias_act_(x, x[0], "relu")


def test_bias_act_empty_shapes():
    """Empty inputs of every op of bias_act: no rows (dbias is then all zeros) or an empty last dimension (H = 0,
    where the row count is not numel / H)."""
    for shape in [(0, 5), (4, 0), (2, 0, 3), (3, 0)]:
        x = torch.randn(*shape)
        b = torch.randn(shape[-1])
        for act in ACTS + [""]:
            y = ops.bias_act(x, b, act)
            assert y.shape == x.shape and y.dtype == x.dtype, (shape, act)
            assert ops.bias_act_(x.clone(), b, act) is None
            dx, db = ops.bias_act_backward(x, x, b, act)
            assert dx.shape == x.shape and torch.equal(db, torch.zeros(shape[-1])), (shape, act)
            assert ops.bias_act_backward(x, x, None, act)[1] is None


def test_bias_act_under_inference_mode_and_create_graph():
    """The fp32 exact-GELU path calls ATen inside at::parallel_for workers: it must work under inference_mode
    and with a dy that requires grad."""
    x, b = torch.randn(300, 1023), torch.randn(1023)
    ref = ops.bias_act(x, b, "gelu")
    with torch.inference_mode():
        assert torch.equal(ops.bias_act(x, b, "gelu"), ref)
        dx, db = ops.bias_act_backward(torch.ones_like(x), x, b, "gelu")
    dx2, db2 = ops.bias_act_backward(torch.ones_like(x).requires_grad_(), x, b, "gelu")
    assert torch.equal(dx, dx2) and torch.equal(db, db2)


def test_activation_math_wide_range():
    """The vectorised erf/exp hold over the whole fp32 range, including far tails and +-inf."""
    x = torch.linspace(-12, 12, 200001)
    for act in ACTS:
        y = ops.bias_act(x.view(1, -1), None, act).view(-1)
        assert_within(y, _act(x.double(), act), _act(x, act), torch.float32, what=act)
    # beyond: the activations and their derivatives at large magnitudes (exp's argument far below -87), each
    # against float64 within an absolute 1e-30 plus 2 ulp of the value (the bound above, set by the largest |x|,
    # would not see an error of 1 here)
    big = torch.tensor([-3e38, -1e38, -1e30, -1e13, -100.0, -88.0, -87.5, 87.5, 88.0, 100.0, 1e13, 1e30, 1e38])
    for act in ACTS:
        y = ops.bias_act(big.view(1, -1), None, act).view(-1).double()
        xd = big.double().requires_grad_()
        ref = _act(xd, act)
        (dref,) = torch.autograd.grad(ref.sum(), xd)
        dx, _ = ops.bias_act_backward(torch.ones_like(big).view(1, -1), big.view(1, -1), None, act)
        for got, want, what in ((y, ref.detach(), "value"), (dx.view(-1).double(), dref, "derivative")):
            tol = 1e-30 + 2 * 2.0 ** -23 * want.abs()
            assert ((got - want).abs() <= tol).all(), (act, what, big[(got - want).abs() > tol], got, want)
    assert torch.equal(ops.bias_act(torch.tensor([[float("inf"), float("-inf")]]), None, "relu"),
                       torch.tensor([[float("inf"), 0.0]]))


def test_nan_propagates_like_torch():
    """A NaN input gives NaN where torch's composite gives NaN (an overflowed fp16 GEMM must not be hidden): relu
    returned 0 for it (x > 0 ? x : 0), and the gelu_tanh derivative 0. relu's derivative at NaN is 1, torch's
    threshold_backward passing the gradient through."""
    nan = float("nan")
    for dtype in DTYPES:
        x = torch.tensor([[nan, 1.0, -1.0, 0.0] * 5], dtype=dtype)   # 20 columns: vector body and scalar tail
        b = torch.zeros(20, dtype=dtype)
        for act in ACTS:
            want = _act(x.float(), act)
            got = ops.bias_act(x, b, act)
            assert torch.equal(got.float().isnan(), want.isnan()), (act, dtype, got)
            inplace = x.clone()
            ops.bias_act_(inplace, b, act)
            assert torch.equal(inplace.float().isnan(), want.isnan()), (act, dtype, inplace)
            xd = x.float().clone().requires_grad_()
            (dref,) = torch.autograd.grad(_act(xd, act).sum(), xd)
            dx, _ = ops.bias_act_backward(torch.ones_like(x), x, b, act)
            assert torch.equal(dx.float().isnan(), dref.isnan()), (act, dtype, dx, dref)
            if act == "relu":
                assert dx[0, 0].item() == 1.0 == dref[0, 0].item()
        # a NaN before the LayerNorm makes its row NaN, through every activation
        xr = torch.randn(3, 20).to(dtype)
        xr[1, 7] = nan
        for act in ACTS + [""]:
            y = ops.add_layer_norm(xr, torch.ones(20, dtype=dtype), b, 1e-5, None, None, act)[0]
            assert y[1].isnan().all() and not y[[0, 2]].isnan().any(), (act, dtype)


@pytest.mark.parametrize("h", [384, 1023, 4097])
@pytest.mark.parametrize("offset,spread", [(3e4, 1.0), (1e3, 0.01)])
def test_add_layer_norm_rows_far_from_zero(h, offset, spread):
    """Rows with a mean far from zero (an fp32 sum rounds at the row's magnitude): the mean, and so y, within 2x
    torch's own fp32 error. The single-pass mean was 4-10x off (0.014-0.037 against torch's 0.0035 at 3e4 +- 1)."""
    torch.manual_seed(h)
    x = (spread * torch.randn(16, h) + offset).float()
    w, b = torch.ones(h), torch.zeros(h)
    y, mean, _, _ = ops.add_layer_norm(x, w, b, 1e-5, None, None, "")
    ref = F.layer_norm(x.double(), (h,), w.double(), b.double(), 1e-5)
    assert_within(y, ref, F.layer_norm(x, (h,), w, b, 1e-5), torch.float32, what="y")
    assert_within(mean, x.double().mean(-1), x.mean(-1), torch.float32, what="mean")
    # the same helper normalises the embeddings
    t = 16
    ids, idx, pos = torch.arange(t), torch.arange(t), torch.zeros(t, dtype=torch.long)
    out, _, _ = ops.embed(ids, idx, pos, None, x, torch.zeros(1, h), None, w, b, 1e-5)
    assert_within(out, ref, F.layer_norm(x, (h,), w, b, 1e-5), torch.float32, what="embed")


def test_one_column_layer_norm_gradients_are_zero():
    """A one-element row normalises to its bias, whatever x: every gradient but dbias is exactly 0, as in torch.
    With the product dy * w contracted into an FMA (AVX2), dy w - mean(dy w) was dy w's rounding error times rstd
    (1e6 at eps 1e-12): dx ~ 2e-2."""
    torch.manual_seed(0)
    for eps in (1e-12, 1e-5):
        x, dy = torch.randn(64, 1), torch.randn(64, 1)
        w, b = torch.randn(1), torch.randn(1)
        y, mean, rstd, _ = ops.add_layer_norm(x, w, b, eps, None, None, "")
        assert torch.equal(y, b.expand(64, 1))
        dx, _, dw, db, _ = ops.add_layer_norm_backward(dy, x, w, mean, rstd, None, None, "")
        assert not dx.any() and not dw.any() and torch.allclose(db, dy.sum(0))
        ids = torch.randint(0, 64, (64,))
        out, m, r = ops.embed(ids, torch.arange(64), torch.zeros(64, dtype=torch.long), None, x, torch.zeros(1, 1),
                              None, w, b, eps)
        dwe = ops.embed_backward(dy, ids, torch.arange(64), torch.zeros(64, dtype=torch.long), None, x,
                                 torch.zeros(1, 1), None, w, m, r)[0]
        assert not dwe.any(), eps


def _gelu_tail_relative_error(y, x):
    """max over x of |y - GELU(x)| / (|GELU(x)| * bound(x)), GELU in float64: < 1 where y is within the error
    that the fp32 formula of gelu_parts allows. Rounding a = |x| / sqrt2 and a * a leaves a relative error of up to
    5u in a^2 = x^2 / 2 (u = 2^-24), i.e. 5u x^2 / 2 in erfc(a) = G(a) e^(-a^2); G's polynomial, the exp and the
    products add ~11u: bound(x) = (5 x^2 / 2 + 16) u. torch's fp32 GELU (1 + erf in fp32) has no such bound: its
    relative error reaches 1 (it returns 0) before x = -6."""
    ref = F.gelu(x.double())
    bound = (2.5 * x.double() ** 2 + 16.0) * 2.0 ** -24
    return ((y.double() - ref).abs() / (ref.abs() * bound)).max().item()


def test_gelu_relative_accuracy_in_the_tails():
    """Exact GELU keeps its relative accuracy down the negative tail (Phi(x) from erfc, not 1 + erf) on
    |x| <= 5.6, where G's fit holds: beyond, G is held at G(4) (NOTES change 11)."""
    x = (torch.rand(1_000_000) * 11.2 - 5.6)
    x = x[x != 0]
    y = ops.bias_act(x.view(1, -1), None, "gelu").view(-1)
    assert _gelu_tail_relative_error(y, x) < 1.0
    assert _gelu_tail_relative_error(F.gelu(x), x) > 1e3  # torch's fp32 GELU: why this is worth a test


def test_exp_relative_accuracy_in_the_silu_tail():
    """exp_nonpos_f's relative accuracy (documented <= 3 ulp), seen through SiLU far down its negative tail: for
    x < -17, 1 + e^x rounds to 1, so silu(x) = x e^x carries exp's relative error plus one rounding. The
    activation tests above bound the absolute error by max|ref|, which an exp several ulps worse passes."""
    x = -(17.0 + 69.0 * torch.rand(1_000_000))
    y = ops.bias_act(x.view(1, -1), None, "silu").view(-1).double()
    ref = F.silu(x.double())
    rel = (y - ref) / ref.abs() / 2.0 ** -24
    worst = rel.abs().max().item()
    assert worst < 5.0, f"silu's relative error in the tail: {worst:.2f} u (u = 2^-24)"
    # and no systematic bias beyond 1 u (the kernel's mean is -0.85 u): a polynomial coefficient rounded to a
    # "nicer" value (the constant term 1.0000000714 -> 1) keeps the worst case under 5 u but moves the mean to +1.2 u
    bias = rel.mean().item()
    assert abs(bias) < 1.0, f"silu's mean relative error in the tail: {bias:.2f} u"


def test_gelu_far_negative_tail_within_its_documented_bound():
    """Beyond |x| / sqrt2 = 4 (x < -5.66) gelu_parts holds G at G(4): GELU there is too large in magnitude by at
    most 2.2x, never smaller and never of the other sign, down to x = -12.7 where e^(-x^2 / 2) nears the e^-81
    cut-off (the tests above bound only its absolute error there, ~1e-9, and the relative one on |x| <= 5.6). Its
    derivative, dominated by x phi(x), stays within 1%. Reference: x erfc(-x / sqrt2) / 2 in float64 (torch's
    float64 GELU, 1 + erf, cancels to 0 before x = -8.4)."""
    x = -(5.66 + 7.04 * torch.rand(20000))
    xd = x.double()
    ref = xd * 0.5 * torch.special.erfc(-xd / 2 ** 0.5)
    dref = 0.5 * torch.special.erfc(-xd / 2 ** 0.5) + xd * torch.exp(-xd * xd / 2) / (2 * torch.pi) ** 0.5
    ratio = ops.bias_act(x.view(1, -1), None, "gelu").view(-1).double() / ref
    assert ratio.min().item() >= 1 - 1e-5 and ratio.max().item() <= 2.25, (ratio.min().item(), ratio.max().item())
    dx = ops.bias_act_backward(torch.ones(1, x.numel()), x.view(1, -1), None, "gelu")[0].view(-1).double()
    dratio = dx / dref
    assert dratio.min().item() >= 0.99 and dratio.max().item() <= 1 + 1e-5, (dratio.min().item(), dratio.max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_outputs_round_to_nearest(dtype):
    """The kernels compute in fp32 and round once to the output dtype, to nearest: nearly every bf16 / fp16 output
    element equals the float64 reference rounded to that dtype (the fp32 value differs from the float64 one by a few
    fp32 ulps, so it lands on the other side of a rounding midpoint for a handful of elements in 10^4). A
    truncating conversion moves about half of them one ulp, which the max-error bounds above (one ulp of max|ref|
    at least) do not see. |x| <= 4.5 keeps GELU out of its far tail, where its relative error is larger by design
    (gelu_parts)."""
    def exact_fraction(got, ref64):
        assert got.dtype == dtype
        return (got == ref64.to(dtype)).float().mean().item()

    x = (2.0 * torch.randn(37, 1023)).clamp(-4.5, 4.5).to(dtype)
    b = torch.rand(1023).to(dtype) - 0.5
    dy = torch.randn(37, 1023).to(dtype)
    fractions = {}
    for act in ACTS + [""]:
        xd = x.double().requires_grad_()
        ref = _act(xd + b.double(), act)
        (dref,) = torch.autograd.grad(ref, xd, dy.double())
        fractions["bias_act " + act] = exact_fraction(ops.bias_act(x, b, act), ref.detach())
        in_place = x.clone()
        ops.bias_act_(in_place, b, act)
        fractions["bias_act_ " + act] = exact_fraction(in_place, ref.detach())
        fractions["bias_act_backward " + act] = exact_fraction(ops.bias_act_backward(dy, x, b, act)[0], dref)
    x, w, b, r, xb = _aln_inputs(37, 1023, dtype)
    for act in ["", "gelu"]:
        ref = _aln_composite(*[t.double() for t in (x, w, b, r, xb)], act, 1e-5)
        fractions["add_layer_norm " + act] = exact_fraction(ops.add_layer_norm(x, w, b, 1e-5, r, xb, act)[0], ref)
    args = _embed_inputs(300, 1023, dtype)
    ref = _embed_composite(*args[:4], *[t.double() for t in args[4:]], 1e-5)
    fractions["embed"] = exact_fraction(ops.embed(*args, 1e-5)[0], ref)
    assert min(fractions.values()) > 0.995, {k: v for k, v in fractions.items() if v <= 0.995}


# ---------------------------------------------------------------------------------------------------------------
# embed

def _embed_inputs(t, e, dtype, with_type=True, with_tt=True, vocab=1000, n_pos=512, n_types=2):
    n = t + 5  # padded positions; 5 of them are padding
    indices = torch.sort(torch.randperm(n)[:t]).values
    input_ids = torch.randint(0, vocab, (n,))
    position_ids = torch.randint(0, n_pos, (n,))
    token_type_ids = torch.randint(0, n_types, (n,)) if with_tt else None
    word = torch.randn(vocab, e).to(dtype)
    pos = torch.randn(n_pos, e).to(dtype)
    typ = torch.randn(n_types, e).to(dtype) if with_type else None
    lw = (1.0 + 0.5 * torch.randn(e)).to(dtype)
    lb = (0.1 * torch.randn(e)).to(dtype)
    return input_ids, indices, position_ids, token_type_ids, word, pos, typ, lw, lb


def _embed_composite(input_ids, indices, position_ids, token_type_ids, word, pos, typ, lw, lb, eps):
    h = F.embedding(input_ids[indices], word)
    if typ is not None:
        tt = token_type_ids[indices] if token_type_ids is not None else torch.zeros_like(indices)
        h = h + F.embedding(tt, typ)
    h = h + F.embedding(position_ids[indices], pos)
    return F.layer_norm(h, (word.shape[1],), lw, lb, eps)


def _check_embed(t, e, dtype, with_type=True, with_tt=True, eps=1e-12):
    args = _embed_inputs(t, e, dtype, with_type, with_tt)
    ids, idx, pos_ids, tt = args[:4]
    tables = args[4:]
    out, mean, rstd = ops.embed(*args, eps)
    assert out.dtype == dtype and out.shape == (t, e)
    t64 = [None if v is None else _leaf(v, torch.float64) for v in tables]
    tlp = [None if v is None else _leaf(v) for v in tables]
    ref = _embed_composite(ids, idx, pos_ids, tt, *t64, eps)
    low = _embed_composite(ids, idx, pos_ids, tt, *tlp, eps)
    assert_within(out, ref, low, dtype, what="out")
    g = torch.randn(t, e).to(dtype)
    ref.backward(g.double())
    low.backward(g)
    word, pos, typ, lw, lb = tables
    grads = ops.embed_backward(g, ids, idx, pos_ids, tt, word, pos, typ, lw, mean, rstd)
    names = ["d_word_emb", "d_pos_emb", "d_type_emb", "d_ln_weight", "d_ln_bias"]
    for got, a, b, name in zip(grads, t64, tlp, names):
        if a is None:
            assert got is None, name
            continue
        assert got.dtype == dtype and got.shape == a.shape, name
        assert_within(got, a.grad, b.grad, dtype, 3.0, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("e", HS)
@pytest.mark.parametrize("t", NS)
def test_embed(t, e, dtype):
    _check_embed(t, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_type,with_tt", [(False, False), (True, False)])
def test_embed_without_token_types(dtype, with_type, with_tt):
    """DistilBERT (no type table) and BERT called without token_type_ids (type 0 everywhere); E=128 as ALBERT."""
    _check_embed(50, 128, dtype, with_type, with_tt, eps=1e-5)


def test_embed_roberta_positions():
    """RoBERTa's positions are padding_idx + 1 + cumsum(mask) computed by the caller; the op takes them as is."""
    b, s, e, pad_idx = 3, 9, 64, 1
    mask = torch.zeros(b, s, dtype=torch.long)
    for i, length in enumerate([9, 4, 6]):
        mask[i, :length] = 1
    pos = (torch.cumsum(mask, 1) * mask + pad_idx).view(-1)
    ids = torch.randint(3, 100, (b * s,))
    idx = mask.view(-1).nonzero().view(-1)
    word, posemb, typ = torch.randn(100, e), torch.randn(s + 2, e), torch.randn(1, e)
    lw, lb = torch.randn(e), torch.randn(e)
    out, _, _ = ops.embed(ids, idx, pos, None, word, posemb, typ, lw, lb, 1e-5)
    ref = _embed_composite(ids, idx, pos, None, word.double(), posemb.double(), typ.double(), lw.double(),
                           lb.double(), 1e-5)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_tt", [True, False])
def test_embed_autograd_runs_the_cpp_backward(monkeypatch, dtype, with_tt):
    """On CPU with BERTFAST_BACKEND=cpp, the gradients of bertfast.ops.embed are bertfast_C::embed_backward's
    (whose numerics _check_embed bounds against float64), bit for bit, with the padding row of the word table
    zeroed (and the position table's, as RoBERTa's) and token_type_ids=None read as type 0 (as transformers
    does)."""
    from bertfast import ops as public
    monkeypatch.setenv("BERTFAST_BACKEND", "cpp")
    b, s, e, vocab, n_pos, pad = 3, 11, 40, 17, 13, 1
    mask = torch.rand(b, s) < 0.7
    mask[:, 0] = True
    idx = mask.view(-1).nonzero().view(-1)
    ids = torch.randint(0, vocab, (b * s,))
    ids[idx[::3]] = pad                      # some real tokens are the padding id; repeated ids everywhere
    pos = torch.arange(s).repeat(b) + 2
    tt = torch.randint(0, 2, (b * s,)) if with_tt else None
    tables = [t.to(dtype) for t in (torch.randn(vocab, e), torch.randn(n_pos, e), torch.randn(2, e),
                                     1 + 0.1 * torch.randn(e), 0.1 * torch.randn(e))]
    dy = torch.randn(idx.numel(), e).to(dtype)
    leaves = [_leaf(t) for t in tables]
    pos_pad = 4                              # a position row that gets no gradient (RoBERTa's padding_idx)
    out = public.embed(ids, idx, pos, tt, *leaves, 1e-12, padding_idx=pad, pos_padding_idx=pos_pad)
    out.backward(dy)

    _, mean, rstd = ops.embed(ids, idx, pos, tt if with_tt else torch.zeros_like(ids), *tables, 1e-12)
    want = list(ops.embed_backward(dy, ids, idx, pos, tt if with_tt else torch.zeros_like(ids), *tables[:4],
                                   mean, rstd))
    assert torch.count_nonzero(want[0][pad]) > 0     # the padding id does occur among the real tokens
    want[0][pad] = 0
    assert torch.count_nonzero(want[1][pos_pad]) > 0
    want[1][pos_pad] = 0
    for name, leaf, w in zip(["word", "pos", "type", "ln_weight", "ln_bias"], leaves, want):
        assert leaf.grad.dtype == dtype and torch.equal(leaf.grad, w), name


def test_embed_index_at_the_limit_is_refused():
    """indices may hold N - 1 but not N (one past input_ids' end, which the gathers would read out of bounds),
    in embed and embed_backward; test_bad_input's index is random and mostly well past N, so only this one
    pins the limit itself."""
    args = list(_embed_inputs(7, 40, torch.float32))
    n = args[0].shape[0]
    out, mean, rstd = ops.embed(*args, 1e-5)
    g = torch.randn_like(out)
    back = lambda a: ops.embed_backward(g, *a[:8], mean, rstd)  # noqa: E731
    args[1] = args[1].clone()
    args[1][-1] = n - 1  # the last real position may be the last padded one
    ops.embed(*args, 1e-5)
    back(args)
    args[1][-1] = n
    for call in (lambda: ops.embed(*args, 1e-5), lambda: back(args)):
        with pytest.raises(RuntimeError, match=rf"indices holds {n} at position 6, outside the valid range "
                                                 rf"\[0, {n}\)"):
            call()


def test_embed_backward_repeated_ids_and_determinism():
    """Many tokens share few ids (the scatter sums them); the gradients are the same bits for 1 and 2 threads."""
    t, e = 600, 96
    args = list(_embed_inputs(t, e, torch.float32, vocab=7, n_pos=5))
    out, mean, rstd = ops.embed(*args, 1e-12)
    g = torch.randn(t, e)
    grad_args = (g, *args[:8], mean, rstd)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.embed_backward(*grad_args)
        torch.set_num_threads(2)
        two = ops.embed_backward(*grad_args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("e", [40, 300])
def test_embed_backward_sums_each_row_in_token_order(e):
    """The table gradients are fp32 sums of the tokens' dh rows in token order (what makes them deterministic),
    in the 16-column blocks and in the columns past them alike: with every position distinct, d_pos_emb hands back
    each token's dh row exactly, and d_word_emb / d_type_emb must equal those rows added one by one in fp32 in
    token order, bit for bit (E = 40: a tail past the 16-column blocks; 300: past a 256-column chunk)."""
    t = 200
    args = list(_embed_inputs(t, e, torch.float32, vocab=3, n_pos=t + 5))
    args[2] = torch.randperm(t + 5)  # position_ids: one pos_emb row per token
    _, mean, rstd = ops.embed(*args, 1e-12)
    d_word, d_pos, d_type, _, _ = ops.embed_backward(torch.randn(t, e), *args[:8], mean, rstd)
    ids, idx, pos, tt = args[:4]
    dh = d_pos[pos[idx]]
    assert dh.abs().sum(1).gt(0).all()
    for got, table_ids in ((d_word, ids[idx]), (d_type, tt[idx])):
        want = torch.zeros_like(got)
        for k in range(t):
            want[table_ids[k]] += dh[k]
        assert torch.equal(got, want)


_UNWRITTEN_SCRIPT = textwrap.dedent("""
    import torch
    import bertfast._C
    ops = torch.ops.bertfast_C
    # glibc fills every block it hands out with 0xAA (MALLOC_PERTURB_=0x55): any element a kernel does not write
    # reads back as -3.0e-13 (fp32, bf16) or -0.052 (fp16), never 0.
    for n in (64, 1 << 16, 64 << 20):
        block = torch.empty(n, dtype=torch.uint8)
        assert bool((block == 0xAA).all()), ("MALLOC_PERTURB_ is not in effect", n, block.unique().tolist()[:16],
                                             int((block != 0xAA).sum()))
    torch.manual_seed(0)
    checked = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for e, rows in ((1, 300), (3, 50), (40, 29), (1023, 29), (768, 30522)):
            for t in (12, 0):
                n = t + 5
                idx = torch.sort(torch.randperm(n)[:t]).values
                ids, pos, types = (torch.randint(0, rows, (n,)) for _ in range(3))
                tables = [torch.randn(rows, e).to(dtype) for _ in range(3)]
                lw, lb = torch.randn(e).to(dtype), torch.randn(e).to(dtype)
                out, mean, rstd = ops.embed(ids, idx, pos, types, *tables, lw, lb, 1e-12)
                grads = ops.embed_backward(torch.randn(t, e).to(dtype), ids, idx, pos, types, *tables, lw, mean,
                                           rstd)
                for grad, table_ids, name in zip(grads[:3], (ids, pos, types), ("word", "pos", "type")):
                    used = torch.zeros(rows, dtype=torch.bool)
                    used[table_ids[idx]] = True
                    assert bool((grad[~used] == 0).all()), (name, dtype, e, t, "unused rows not zero")
                    assert bool(torch.isfinite(grad[used]).all()), (name, dtype, e, t)
                    checked += 1
    for dtype in (torch.float16, torch.float32, torch.int64, torch.bool):
        for h in (1, 3, 40, 1023):
            n = 97
            x = torch.randn(40, h).to(dtype)
            idx = torch.randperm(n)[:40]
            ref = torch.zeros(n, h, dtype=dtype)
            ref[idx] = x
            assert torch.equal(ops.pad(x, idx, n), ref), (dtype, h)
            checked += 1
    for h in (1, 3, 40, 1023):  # add_layer_norm's keep bits: every byte, the bits past H zero
        for n in (1, 5):
            bits = ops.add_layer_norm(torch.randn(n, h), torch.ones(h), torch.zeros(h), 1e-5, None, None, "",
                                      0.5, 99)[3]
            kept = torch.stack([ops._dropout_factors(0.5, 99, row * h, h) != 0 for row in range(n)])
            kept = torch.nn.functional.pad(kept, (0, -h % 8)).view(n, -1, 8).long()
            assert torch.equal(bits, (kept << torch.arange(8)).sum(-1).to(torch.uint8)), (h, n)
            checked += 1
    print("CHECKED", checked)
""")


def test_uninitialised_outputs_are_fully_written():
    """embed_backward's table gradients, pad's output and add_layer_norm's keep bits are allocated uninitialised
    and written once, each row either a result or zeros (NOTES changes 14-15, 18): in a process whose allocator
    fills every block it hands out with 0xAA bytes (glibc's MALLOC_PERTURB_), every row no token uses / every
    padding row must come back exactly zero - for the word, position and type tables, with no tokens at all, for
    rows off 16-byte boundaries (odd E, half precision) and for a BERT-size word table (94 MB, where the zeros are
    streamed) - and every byte of the keep bits must be the draw's, the bits past H zero."""
    env = dict(os.environ, MALLOC_PERTURB_=str(0x55))
    res = subprocess.run([sys.executable, "-c", _UNWRITTEN_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.split("CHECKED")[1]) == 3 * 5 * 2 * 3 + 4 * 4 + 4 * 2


def test_zero_eps_and_zero_seed_are_valid():
    """The edges of the documented ranges are valid inputs: eps = 0 (eps >= 0) for add_layer_norm and embed, and
    seed = 0 with dropout on (seed in [0, 2^63)), which draws seed 0's mask (the _dropout_factors draw) for the
    forward's keep bits and the backward's redraw alike."""
    n, h = 7, 1023
    x, w, b, r, xb = _aln_inputs(n, h, torch.float32)
    y, mean, rstd, _ = ops.add_layer_norm(x, w, b, 0.0, r, xb, "gelu")
    ref = _aln_composite(x.double(), w.double(), b.double(), r.double(), xb.double(), "gelu", 0.0)
    assert_within(y, ref, _aln_composite(x, w, b, r, xb, "gelu", 0.0), torch.float32, what="y, eps=0")
    args = _embed_inputs(9, 64, torch.float32, vocab=20, n_pos=30)
    out = ops.embed(*args, 0.0)[0]
    ref = _embed_composite(*args[:4], *[t.double() for t in args[4:]], 0.0)
    assert_within(out, ref, _embed_composite(*args, 0.0), torch.float32, what="embed, eps=0")

    p = 0.3
    _, m0, s0, bits = ops.add_layer_norm(x, w, b, 1e-5, r, xb, "", p, 0)
    kept = torch.stack([ops._dropout_factors(p, 0, row * h, h) != 0 for row in range(n)])
    assert torch.equal(unpack_keep_bits(bits, h), kept)
    dy = torch.randn_like(x)
    from_bits = ops.add_layer_norm_backward(dy, x, w, m0, s0, r, xb, "", p, 0, bits)
    redrawn = ops.add_layer_norm_backward(dy, x, w, m0, s0, r, xb, "", p, 0)
    for a, c in zip(from_bits, redrawn):
        assert torch.equal(a, c)


def test_backward_determinism_across_threads():
    x, w, b, r, xb = _aln_inputs(1000, 768, torch.float32)
    y, m, s, _ = ops.add_layer_norm(x, w, b, 1e-12, r, xb, "gelu")
    dy = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.add_layer_norm_backward(dy, x, w, m, s, r, xb, "gelu") + ops.bias_act_backward(dy, x, xb, "gelu")
        torch.set_num_threads(2)
        two = ops.add_layer_norm_backward(dy, x, w, m, s, r, xb, "gelu") + ops.bias_act_backward(dy, x, xb, "gelu")
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, two):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------------
# unpad / pad

@pytest.mark.parametrize("dtype", DTYPES + [torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("h", HS)
@pytest.mark.parametrize("t", NS)
def test_unpad_pad(t, h, dtype):
    n = t + 11
    x = torch.randn(n, h).to(dtype)
    idx = torch.randperm(n)[:t]  # any order
    u = ops.unpad(x, idx)
    assert torch.equal(u, x[idx])
    p = ops.pad(u, idx, n)
    ref = torch.zeros_like(x)
    ref[idx] = x[idx]
    assert torch.equal(p, ref)


def test_unpad_pad_3d_and_empty():
    x = torch.randn(10, 4, 3)
    idx = torch.tensor([9, 0, 4])
    assert torch.equal(ops.unpad(x, idx), x[idx])
    assert torch.equal(ops.pad(x[idx], idx, 12)[idx], x[idx])
    assert ops.unpad(x, torch.empty(0, dtype=torch.long)).shape == (0, 4, 3)
    assert torch.equal(ops.pad(torch.empty(0, 5), torch.empty(0, dtype=torch.long), 3), torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------------------------
# every ISA path (AVX-512, AVX2, baseline) gives the same results within the same bounds

_ISA_SCRIPT = textwrap.dedent("""
    import sys
    import torch, torch.nn.functional as F
    import bertfast._C
    ops = torch.ops.bertfast_C
    torch.manual_seed(0)
    acts = {"gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu, "silu": F.silu}
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, r = torch.randn(37, 1023).to(dtype), torch.randn(37, 1023).to(dtype)
        w, b = torch.randn(1023).to(dtype), torch.randn(1023).to(dtype)
        for name, f in acts.items():
            y = ops.bias_act(x, b, name).double()
            ref = f(x.double() + b.double())
            worst = max(worst, ((y - ref).abs().max() / (ref.abs().max() * torch.finfo(dtype).eps)).item())
            y = ops.add_layer_norm(x, w, b, 1e-5, r, b, name)[0]
            ref = F.layer_norm(f(x.double() + b.double()) + r.double(), (1023,), w.double(), b.double(), 1e-5)
            worst = max(worst, ((y.double() - ref).abs().max() / (ref.abs().max() * torch.finfo(dtype).eps)).item())
    print("WORST_ULPS", worst)
    x = torch.rand(200000) * 11.2 - 5.6
    x = x[x != 0]
    torch.save({"x": x, "y": ops.bias_act(x.view(1, -1), None, "gelu").view(-1)}, sys.argv[1])
""")


def _run_under_isa(isa: str, script: str, *args: str) -> str:
    """Runs `script` in a fresh interpreter with BERTFAST_CPU_ISA=isa ("best": unset, whatever this CPU has) and
    returns its stdout; the run must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "BERTFAST_CPU_ISA"}
    if isa != "best":
        env["BERTFAST_CPU_ISA"] = isa
    res = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_lower_isa_paths(isa, tmp_path):
    """BERTFAST_CPU_ISA lowers the ISA the kernels use (never above what the CPU has)."""
    tail = tmp_path / "gelu_tail.pt"
    worst = float(_run_under_isa(isa, _ISA_SCRIPT, str(tail)).split("WORST_ULPS")[1])
    assert worst < 16, f"{isa}: worst error {worst} ulps of max|ref|"
    got = torch.load(tail)
    assert _gelu_tail_relative_error(got["y"], got["x"]) < 1.0, isa


def test_cpu_isa_override_is_checked():
    """BERTFAST_CPU_ISA is case-insensitive, and a value it does not know is an error naming it (it once meant
    "avx512", so a misspelt override silently tested the default path)."""
    code = "import torch, bertfast._C; print(torch.ops.bertfast_C.cpu_isa())"
    upper = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, BERTFAST_CPU_ISA="BASE"),
                           capture_output=True, text=True, timeout=120)
    assert upper.returncode == 0 and upper.stdout.strip() == "base", upper.stderr[-2000:]
    bad_code = ("import torch, bertfast._C\ntry:\n    torch.ops.bertfast_C.bias_act(torch.randn(64, 8), None, 'gelu')\n"
                "except RuntimeError as e:\n    print('kernel:', e)\n" + code)  # a kernel, then cpu_isa again
    bad = subprocess.run([sys.executable, "-c", bad_code], env=dict(os.environ, BERTFAST_CPU_ISA="scalar"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert 'kernel: bertfast_C: BERTFAST_CPU_ISA must be base, avx2 or avx512' in bad.stdout, bad.stdout
    info = subprocess.run([sys.executable, "-m", "bertfast", "info"], env=dict(os.environ, BERTFAST_CPU_ISA="scalar"),
                          capture_output=True, text=True, timeout=300)
    # info says so and fails (exit 2, as for a misspelt BERTFAST_BACKEND), not a table claiming the C++ kernels run
    assert info.returncode == 2 and "CPU kernels   unusable: bertfast_C: BERTFAST_CPU_ISA must be" in info.stdout, \
        info.stdout + info.stderr[-2000:]
    assert "error: BERTFAST_CPU_ISA: the C++ CPU kernels refuse its value" in info.stderr
    assert "implementation per op" not in info.stdout
    assert 'BERTFAST_CPU_ISA must be base, avx2 or avx512 (it can only lower the ISA), got "scalar"' in bad.stderr


def _philox_uniform_reference(seed: int, offsets, c2: int = 0, rounds: int = 10):
    """Philox-4x32-R uniform of counter (offset low word, offset high word, c2, 0) as Triton's tl.philox returns
    it (tl.rand(seed, offset) with c2 = 0, R = 10; the attention's mask with R = 7), in numpy (independent of the
    C++ code)."""
    import numpy as np
    mask = np.uint64(0xFFFFFFFF)
    offsets = np.asarray(offsets, dtype=np.uint64)
    c0, c1 = offsets & mask, offsets >> np.uint64(32)
    c2, c3 = np.full_like(offsets, c2), np.zeros_like(offsets)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(rounds):
        p0, p1 = np.uint64(0xCD9E8D57) * c2, np.uint64(0xD2511F53) * c0   # < 2**64: exact
        c0, c2 = (p0 >> np.uint64(32)) ^ c1 ^ k0, (p1 >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = p0 & mask, p1 & mask
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    v = c0.astype(np.uint32).view(np.int32)
    v = np.where(v < 0, ~v, v)
    return v.astype(np.float32) * np.float32(4.6566127342e-10)


def _attention_uniform_reference(seed: int, first: int, count: int, length: int, heads: int):
    """The uniforms of the attention's dropout mask, [count, heads, length, length]: key j of query token q (count
    sequences of `length` tokens from token `first`) in head h draws Philox-7 of (j, q, h, 0)."""
    import numpy as np
    return np.stack([np.stack([np.stack([
        _philox_uniform_reference(seed, [((first + b * length + i) << 32) + j for j in range(length)], c2=h, rounds=7)
        for i in range(length)]) for h in range(heads)]) for b in range(count)])


_ISA_DROPOUT_SCRIPT = textwrap.dedent("""
    import sys
    import torch, bertfast._C
    ops = torch.ops.bertfast_C
    cases, attention_cases = eval(sys.argv[1]), eval(sys.argv[2])
    seed, p, path = int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    print(ops.cpu_isa())
    factors = [ops._dropout_factors(p, seed, b, n) for b, n in cases]
    torch.manual_seed(0)
    layer_norms = []
    for n, h in ((3, 37), (2, 1023), (4, 16), (1, 5), (2, 40)):
        x, r, dy, w, b = torch.randn(n, h), torch.randn(n, h), torch.randn(n, h), torch.randn(h), torch.randn(h)
        y, mean, rstd, bits = ops.add_layer_norm(x, w, b, 1e-5, r, None, "", p, seed)
        from_bits = ops.add_layer_norm_backward(dy, x, w, mean, rstd, r, None, "", p, seed, bits)
        redrawn = ops.add_layer_norm_backward(dy, x, w, mean, rstd, r, None, "", p, seed)
        layer_norms.append((h, bits, [from_bits[i] for i in (0, 1, 2, 3)], [redrawn[i] for i in (0, 1, 2, 3)]))
    attention = [ops.attention_dropout_keep(first, count, length, 3, p, seed)
                 for first, count, length in attention_cases]
    torch.save([factors, layer_norms, attention], path)
""")


@pytest.mark.parametrize("isa", ["best", "avx2", "base"])
def test_dropout_factors_every_isa(isa, tmp_path):
    """The vectorised Philox of each ISA (16 / 8 lanes, scalar) draws what Triton's tl.rand draws, at offsets that
    are not multiples of the vector width, across a 2**32 boundary of the counter's low word, for a 64-bit seed;
    add_layer_norm's keep bits pack that draw (rows not a multiple of 8 or 16 wide), and its backward from the
    bits equals the one that draws the mask again."""
    cases = [(0, 37), (2**32 - 7, 29), (2**32 - 20, 45), (2**40 + 3, 21), (123_456_789, 1)]
    attention_cases = [(0, 2, 5), (7, 1, 37), (2**31 - 40, 2, 20)]   # (first token, sequences, length)
    seed, p = (5 << 32) + 77, 0.3
    args = [repr(cases), repr(attention_cases), str(seed), str(p), str(tmp_path / "f.pt")]
    ran = _run_under_isa(isa, _ISA_DROPOUT_SCRIPT, *args).split()[-1]
    order = ["base", "avx2", "avx512"]
    # a forced ISA runs unless the CPU lacks it (the override only lowers); "best" is whatever this CPU has
    assert isa == "best" or order.index(ran) <= order.index(isa), (isa, ran)
    factors, layer_norms, attention = torch.load(tmp_path / "f.pt", weights_only=True)
    for (base, n), got in zip(cases, factors):
        u = torch.from_numpy(_philox_uniform_reference(seed, [base + i for i in range(n)]))
        want = torch.where(u >= p, torch.tensor(1 / (1 - p), dtype=torch.float32), torch.tensor(0.0))
        assert torch.equal(got, want), (isa, ran, base, n)
    for h, bits, from_bits, redrawn in layer_norms:
        n = bits.shape[0]
        u = torch.from_numpy(_philox_uniform_reference(seed, range(n * h))).view(n, h)
        assert bits.shape == (n, (h + 7) // 8) and torch.equal(unpack_keep_bits(bits, h), u >= p), (isa, ran, h)
        for a, b in zip(from_bits, redrawn):
            assert torch.equal(a, b), (isa, ran, h)
    for (first, count, length), keep in zip(attention_cases, attention):
        want = torch.from_numpy(_attention_uniform_reference(seed, first, count, length, 3) >= p)
        assert torch.equal(keep, want), (isa, ran, first, count, length)


_ISA_DROPOUT_TIE_SCRIPT = textwrap.dedent("""
    import sys
    import torch, bertfast._C
    ops = torch.ops.bertfast_C
    seed, p_ln, p_att, path = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    print(ops.cpu_isa())
    factors = ops._dropout_factors(p_ln, seed, 0, 64)
    x = torch.randn(2, 32)
    bits = ops.add_layer_norm(x, torch.ones(32), torch.zeros(32), 1e-5, None, None, "", p_ln, seed)[3]
    keep = ops.attention_dropout_keep(0, 1, 40, 2, p_att, seed)
    torch.save([factors, bits, keep], path)
""")


@pytest.mark.parametrize("isa", ["best", "avx2", "base"])
def test_dropout_keeps_a_uniform_equal_to_p(isa, tmp_path):
    """An element whose uniform equals dropout_p exactly is kept (uniform >= p, as Triton's dropout keeps it), in
    every ISA's Philox path: p is set to one of the draws themselves (a float32 value, so the fp32 p the kernels
    compare with is that draw exactly). A random p almost never ties with a draw (~3e-8 per element), so the tests
    above would not see a `>` in place of `>=`."""
    import numpy as np
    seed = (3 << 32) + 1234
    u_ln = _philox_uniform_reference(seed, range(64))
    k = int(np.argmin(np.abs(u_ln - 0.5)))   # a draw near 0.5 as p: about half the elements are kept
    p_ln = float(u_ln[k])
    u_att = _attention_uniform_reference(seed, 0, 1, 40, 2)[0]   # [head, query, key]
    p_att = float(u_att.flat[int(np.argmin(np.abs(u_att - 0.5)))])
    ran = _run_under_isa(isa, _ISA_DROPOUT_TIE_SCRIPT, str(seed), repr(p_ln), repr(p_att),
                         str(tmp_path / "t.pt")).split()[-1]
    factors, bits, keep = torch.load(tmp_path / "t.pt", weights_only=True)
    u_ln, u_att = torch.from_numpy(u_ln), torch.from_numpy(u_att)
    assert (u_ln == p_ln).sum() >= 1 and (u_att == p_att).sum() >= 1   # the ties the test is about
    want = torch.where(u_ln >= p_ln, torch.tensor(1 / (1 - p_ln), dtype=torch.float32), torch.tensor(0.0))
    assert torch.equal(factors, want), (isa, ran, (factors != want).nonzero())
    assert torch.equal(unpack_keep_bits(bits, 32), (u_ln >= p_ln).view(2, 32)), (isa, ran)
    assert torch.equal(keep[0], u_att >= p_att), (isa, ran, (keep[0] != (u_att >= p_att)).nonzero())


@pytest.mark.gpu     # its reference mask comes from the Triton kernels (on the GPU when there is one)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_attention_dropout_keep_matches_the_triton_kernels(p):
    """bertfast_C.attention_dropout_keep draws the keep-mask the Triton attention kernels draw for the same seed
    (kernels.attention.dropout_mask, here in the interpreter), for sequences of odd lengths from any token row,
    several consecutive equal-length sequences in one call; dropout_p 0 keeps all, 1 none."""
    from bertfast.kernels.attention import dropout_mask
    seed = int(torch.randint(0, 2 ** 62, ()).item())
    lengths = [5, 17, 17, 17, 1, 33, 130]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    heads = 3
    want = dropout_mask(cu, max(lengths), heads, p, seed, KERNEL_DEVICE).cpu()
    kept = want[6, :, :130, :130].float().mean().item()      # 50700 draws of the longest sequence
    assert abs(kept - (1 - p)) < 0.01, f"the reference keeps {kept}, not ~{1 - p}"
    for b, length in enumerate(lengths):
        got = ops.attention_dropout_keep(int(cu[b]), 1, length, heads, p, seed)
        assert got.dtype == torch.bool and got.shape == (1, heads, length, length)
        assert torch.equal(got[0], want[b, :, :length, :length]), (b, length)
    batched = ops.attention_dropout_keep(int(cu[1]), 3, 17, heads, p, seed)        # sequences 1, 2, 3 together
    assert torch.equal(batched, want[1:4, :, :17, :17])
    assert not torch.equal(batched, ops.attention_dropout_keep(int(cu[1]), 3, 17, heads, p, seed + 1))
    assert bool(ops.attention_dropout_keep(0, 2, 9, 2, 0.0, seed).all())
    assert not bool(ops.attention_dropout_keep(0, 2, 9, 2, 1.0, seed).any())
    assert ops.attention_dropout_keep(5, 0, 9, 2, p, seed).shape == (0, 2, 9, 9)
    # FakeTensorMode (torch.compile) calls an op without tensor inputs as a factory, with device=meta
    meta = ops.attention_dropout_keep(0, 2, 9, 3, p, seed, device=torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (2, 3, 9, 9) and meta.dtype == torch.bool
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = ops.attention_dropout_keep(0, 2, 9, 3, p, seed)
    assert fake.shape == (2, 3, 9, 9) and fake.device.type == "cpu"


# ---------------------------------------------------------------------------------------------------------------
# opcheck on every CPU op

def _opcheck_cases():
    x, w, b, r, xb = _aln_inputs(7, 48, torch.float32)
    y, m, s, _ = ops.add_layer_norm(x, w, b, 1e-5, r, xb, "gelu")
    dy = torch.randn_like(x)
    eargs = _embed_inputs(9, 16, torch.float32, vocab=20, n_pos=30)
    out, em, es = ops.embed(*eargs, 1e-5)
    eg = torch.randn_like(out)
    idx = torch.tensor([3, 0, 5])
    x45, w45, b45, r45, _ = _aln_inputs(3, 45, torch.float32)
    _, m45, s45, _ = ops.add_layer_norm(x45, w45, b45, 1e-5, r45, None, "relu", 0.3, 5)
    return [
        ("add_layer_norm", (x, w, b, 1e-5, r, xb, "gelu")),
        ("add_layer_norm", (x, w, b, 1e-5, None, None, "")),
        ("add_layer_norm_backward", (dy, x, w, m, s, r, xb, "gelu")),
        ("add_layer_norm_backward", (dy, x, w, m, s, None, None, "")),
        ("add_layer_norm", (x, w, b, 1e-5, r, xb, "gelu", 0.2, 77)),
        ("add_layer_norm_backward", (dy, x, w, m, s, r, xb, "", 0.2, 77)),
        ("add_layer_norm_backward", (dy, x, w, m, s, r, xb, "gelu", 0.2, 77,
                                     ops.add_layer_norm(x, w, b, 1e-5, r, xb, "gelu", 0.2, 77)[3])),
        ("bias_act", (x, xb, "gelu_tanh")),
        ("bias_act", (x, None, "relu")),
        ("bias_act_", (x.clone(), xb, "gelu")),
        ("bias_act_backward", (dy, x, xb, "silu")),
        ("bias_act_backward", (dy, x, None, "gelu")),
        ("embed", (*eargs, 1e-5)),
        ("embed", (*eargs, 1e-5, False)),
        ("embed", (*eargs[:3], None, eargs[4], eargs[5], None, *eargs[7:], 1e-5)),
        ("embed_backward", (eg, *eargs[:8], em, es)),
        ("unpad", (x, idx)),
        ("unpad", (x, idx, False)),
        ("pad", (x[:3].clone(), idx, 9)),
        ("pad", (x[:3].clone(), idx, 9, False)),
        ("attention_dropout_keep", (3, 2, 5, 2, 0.25, 99)),
        # a width that is not a multiple of 8: the keep bits are ceil(H / 8) bytes a row
        ("add_layer_norm", (x45, w45, b45, 1e-5, r45, None, "", 0.3, 5)),
        ("add_layer_norm_backward", (torch.randn_like(x45), x45, w45, m45, s45, r45, None, "relu", 0.3, 5,
                                     ops.add_layer_norm(x45, w45, b45, 1e-5, r45, None, "relu", 0.3, 5)[3])),
        # a model without token-type embeddings (DistilBERT): no type table, no type gradient
        ("embed_backward", (eg, *eargs[:3], None, eargs[4], eargs[5], None, eargs[7], em, es)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(ops, name).default, args)


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: every check names the argument

def _bad_cases():
    x, w, b, r, xb = _aln_inputs(4, 8, torch.float32)
    y, m, s, _ = ops.add_layer_norm(x, w, b, 1e-5, r, xb, "")
    keep = ops.add_layer_norm(x, w, b, 1e-5, r, xb, "", 0.1, 5)[3]
    dy = torch.randn_like(x)
    e = _embed_inputs(6, 8, torch.float32, vocab=10, n_pos=12)
    ids, idx, pos, tt, we, pe, te, lw, lb = e
    out, em, es = ops.embed(*e, 1e-5)
    g = torch.randn_like(out)
    bad_ids = ids.clone()
    bad_ids[idx[2]] = 10
    neg_pos = pos.clone()
    neg_pos[idx[0]] = -1
    bad_tt = tt.clone()
    bad_tt[idx[1]] = 2
    A, AB, BA, BAB, E, EB = (ops.add_layer_norm, ops.add_layer_norm_backward, ops.bias_act, ops.bias_act_backward,
                             ops.embed, ops.embed_backward)
    return [
        # add_layer_norm
        (lambda: A(x.long(), w, b, 1e-5, r, xb, ""), "x must be float32, float16 or bfloat16"),
        (lambda: A(x[0], w, b, 1e-5, r, xb, ""), r"x must be 2-D \[N, H\]"),
        (lambda: A(x.t(), w[:4], b[:4], 1e-5, None, None, ""), "x must be contiguous"),
        (lambda: A(x, w[:5], b, 1e-5, r, xb, ""), r"weight must have shape \[8\]"),
        (lambda: A(x, w.double(), b, 1e-5, r, xb, ""), "weight must be Float, got Double"),
        (lambda: A(x, w, b[:3], 1e-5, r, xb, ""), r"bias must have shape \[8\]"),
        (lambda: A(x, w, b.half(), 1e-5, r, xb, ""), "bias must be Float, got Half"),
        (lambda: A(x, w, b, 1e-5, r[:2], xb, ""), "residual must have x's shape"),
        (lambda: A(x, w, b, 1e-5, torch.randn(4, 4), xb, ""), r"residual must have x's shape \[4, 8\], got \[4, 4\]"),
        (lambda: A(torch.randn(4, 0), torch.ones(0), torch.zeros(0), 1e-5, None, None, ""),
         "x must have a non-empty last dimension"),
        (lambda: A(x, w, b, 1e-5, r.half(), xb, ""), "residual must be Float"),
        (lambda: A(x, w, b, 1e-5, torch.randn(8, 4).t(), xb, ""), "residual must be contiguous"),
        (lambda: A(x, w, b, 1e-5, r, xb[:2], ""), r"x_bias must have shape \[8\]"),
        (lambda: A(x, w, b, 1e-5, r, xb, "tanh"), "activation must be one of"),
        (lambda: A(x, w, b, 1e-5, r, xb, "", 1.5, 0), r"dropout_p must be in \[0, 1\], got 1.5"),
        (lambda: A(x, w, b, 1e-5, r, xb, "", 0.1, -3), r"seed must be in \[0, 2\^63\) when dropout_p > 0"),
        (lambda: AB(dy, x, w, m, s, r, xb, "", -0.1, 0), r"dropout_p must be in \[0, 1\], got -0.1"),
        (lambda: A(x, w, b, -1.0, r, xb, ""), "eps must be >= 0"),
        # strided per-feature vectors (the kernels read them as contiguous rows)
        (lambda: A(x, torch.randn(8, 2)[:, 0], b, 1e-5, r, xb, ""), "weight must be contiguous"),
        (lambda: A(x, w, torch.randn(8, 2)[:, 1], 1e-5, r, xb, ""), "bias must be contiguous"),
        (lambda: A(x, w, b, 1e-5, r, torch.randn(8, 2)[:, 0], ""), "x_bias must be contiguous"),
        # add_layer_norm_backward
        (lambda: AB(dy[:2], x, w, m, s, r, xb, ""), "dy must have x's shape"),
        (lambda: AB(dy.half(), x, w, m, s, r, xb, ""), "dy must be Float"),
        (lambda: AB(dy, x, w, m.double(), s, r, xb, ""), "mean must be Float"),
        (lambda: AB(dy, x, w, m, s[:2], r, xb, ""), r"rstd must have shape \[4\]"),
        (lambda: AB(dy, x, w, m, s, r, xb, "swish"), "activation must be one of"),
        (lambda: AB(dy, x, w, m, s, r, xb, "", 0.1, 5, keep.long()), "keep must be Byte, got Long"),
        (lambda: AB(dy, x, w, m, s, r, xb, "", 0.1, 5, keep[:3]),
         r"keep must be the forward's keep bits, shape \[4, 1\]"),
        (lambda: AB(dy, x, w, m, s, r, xb, "", 0.1, 5, torch.cat([keep, keep], 1)),
         r"keep must be the forward's keep bits, shape \[4, 1\]"),
        (lambda: AB(dy, x, w, m, s, torch.randn(4, 4), xb, ""), r"residual must have x's shape \[4, 8\], got \[4, 4\]"),
        (lambda: AB(dy, x, w, m, s, r, xb, "", 0.0, 0, keep), "keep .* must be None or empty when dropout_p is 0"),
        (lambda: AB(torch.randn(8, 4).t(), x, w, m, s, r, xb, ""), "dy must be contiguous"),
        (lambda: AB(dy, x, w, torch.stack([m, m], 1)[:, 0], s, r, xb, ""), "mean must be contiguous"),
        (lambda: AB(dy, x, w, m, torch.stack([s, s], 1)[:, 1], r, xb, ""), "rstd must be contiguous"),
        (lambda: AB(dy, x, w, m, s, r, xb, "", 0.1, 5, torch.cat([keep, keep], 0)[::2]), "keep must be contiguous"),
        # attention_dropout_keep
        (lambda: ops.attention_dropout_keep(0, -1, 4, 2, 0.1, 5), "first_token, count and length must be >= 0"),
        (lambda: ops.attention_dropout_keep(0, 1, 4, 0, 0.1, 5), "heads must be >= 1, got 0"),
        (lambda: ops.attention_dropout_keep(0, 1, 4, 2, 1.5, 5), r"dropout_p must be in \[0, 1\], got 1.5"),
        (lambda: ops.attention_dropout_keep(0, 1, 4, 2, 0.1, 5, device=torch.device("cuda")),
         "device must be the CPU"),
        (lambda: ops.attention_dropout_keep(0, 1, 4, 2, 0.1, -5), r"seed must be in \[0, 2\^63\)"),
        (lambda: ops.attention_dropout_keep(2**31 - 3, 1, 4, 2, 0.1, 5), r"must be <= 2\^31"),
        # bias_act
        (lambda: BA(torch.tensor(1.0), None, "gelu"), "at least one dimension"),
        (lambda: BA(x.int(), None, "gelu"), "x must be float32"),
        (lambda: BA(x.t(), None, "gelu"), "x must be contiguous"),
        (lambda: BA(x, xb[:3], "gelu"), r"bias must have shape \[8\]"),
        (lambda: BA(x, xb.double(), "gelu"), "bias must be Float"),
        (lambda: BA(x, xb, "gelu_erf"), "activation must be one of"),
        (lambda: BAB(dy[:1], x, xb, "gelu"), "dy must have x's shape"),
        (lambda: BAB(dy.bfloat16(), x, xb, "gelu"), "dy must be Float"),
        # embed
        (lambda: E(bad_ids, idx, pos, tt, we, pe, te, lw, lb, 1e-5),
         r"input_ids .* holds 10 at position 2, outside the valid range \[0, 10\)"),
        (lambda: E(ids, idx, neg_pos, tt, we, pe, te, lw, lb, 1e-5),
         r"position_ids .* holds -1 at position 0, outside the valid range \[0, 12\)"),
        (lambda: E(ids, idx, pos, bad_tt, we, pe, te, lw, lb, 1e-5),
         r"token_type_ids .* holds 2 at position 1, outside the valid range \[0, 2\)"),
        (lambda: E(ids, idx + 6, pos, tt, we, pe, te, lw, lb, 1e-5), r"indices holds .* valid range \[0, 11\)"),
        (lambda: E(ids.int(), idx, pos, tt, we, pe, te, lw, lb, 1e-5), "input_ids must be Long, got Int"),
        (lambda: E(ids, idx.int(), pos, tt, we, pe, te, lw, lb, 1e-5), "indices must be Long"),
        (lambda: E(ids.view(1, -1), idx, pos, tt, we, pe, te, lw, lb, 1e-5), "input_ids must be 1-D"),
        (lambda: E(ids, idx, pos[:-1], tt, we, pe, te, lw, lb, 1e-5), "position_ids must have input_ids' length"),
        (lambda: E(ids, idx, pos, tt[:-1], we, pe, te, lw, lb, 1e-5),
         "token_type_ids must have input_ids' length"),
        (lambda: E(ids, idx, pos, tt, we, pe, None, lw, lb, 1e-5), "token_type_ids given but type_emb is None"),
        (lambda: E(ids, idx, pos, tt, we.long(), pe, te, lw, lb, 1e-5), "word_emb must be float32"),
        (lambda: E(ids, idx, pos, tt, we, pe.half(), te, lw, lb, 1e-5), "pos_emb must be Float, got Half"),
        (lambda: E(ids, idx, pos, tt, we, pe[:, :4], te, lw, lb, 1e-5), "pos_emb must have word_emb's embedding"),
        (lambda: E(ids, idx, pos, tt, we, pe, te[:, :3], lw, lb, 1e-5), "type_emb must have word_emb's embedding"),
        (lambda: E(ids, idx, pos, tt, we.t(), pe, te, lw, lb, 1e-5), "word_emb must be contiguous"),
        (lambda: E(ids, idx, pos, tt, we, pe, te, lw[:2], lb, 1e-5), r"ln_weight must have shape \[8\]"),
        (lambda: E(ids, idx, pos, tt, we, pe, te, lw, lb.double(), 1e-5), "ln_bias must be Float"),
        (lambda: E(ids, idx, pos, tt, we, pe, te, lw, lb, -1.0), "eps must be >= 0"),
        (lambda: E(ids, idx, pos, tt, we, pe, te, torch.randn(8, 2)[:, 0], lb, 1e-5), "ln_weight must be contiguous"),
        (lambda: E(ids, idx, pos, None, we, pe, te[:0], lw, lb, 1e-5), "type_emb must have at least one row"),
        (lambda: E(ids, idx, pos, tt, we[:, :0], pe[:, :0], te[:, :0], lw[:0], lb[:0], 1e-5),
         "word_emb must have a non-empty embedding dimension"),
        # embed_backward
        (lambda: EB(g[:2], ids, idx, pos, tt, we, pe, te, lw, em, es), r"grad_out must have shape \[6, 8\]"),
        (lambda: EB(g.half(), ids, idx, pos, tt, we, pe, te, lw, em, es), "grad_out must be Float"),
        (lambda: EB(g, ids, idx, pos, tt, we, pe, te, lw, em[:1], es), r"mean must have shape \[6\]"),
        (lambda: EB(g, ids, idx, pos, tt, we, pe, te, lw, em, es.half()), "rstd must be Float"),
        (lambda: EB(g, bad_ids, idx, pos, tt, we, pe, te, lw, em, es), r"input_ids .* holds 10"),
        (lambda: EB(torch.randn(8, 6).t(), ids, idx, pos, tt, we, pe, te, lw, em, es), "grad_out must be contiguous"),
        (lambda: EB(g, ids, idx, pos, tt, we, pe, te, lw, torch.stack([em, em], 1)[:, 0], es),
         "mean must be contiguous"),
        # unpad / pad
        (lambda: ops.unpad(x, torch.tensor([0, 4])), r"indices holds 4 at position 1, outside the valid range \[0, 4\)"),
        (lambda: ops.unpad(x, torch.tensor([-1])), r"indices holds -1 at position 0"),
        (lambda: ops.unpad(x, torch.tensor([0, 1]).int()), "indices must be Long"),
        (lambda: ops.unpad(x, torch.tensor([[0, 1]])), "indices must be 1-D"),
        (lambda: ops.unpad(x.t(), torch.tensor([0])), "x must be contiguous"),
        (lambda: ops.unpad(torch.tensor(1.0), torch.tensor([0])), "at least one dimension"),
        (lambda: ops.pad(x, torch.tensor([0, 1, 2, 9]), 9), r"indices holds 9 at position 3, outside the valid range \[0, 9\)"),
        (lambda: ops.pad(x, torch.tensor([0, 1, 1, 2]), 9), "indices holds row 1 twice"),
        (lambda: ops.pad(x, torch.tensor([0, 1]), 9), "indices must have one entry per row of x"),
        (lambda: ops.pad(x, torch.tensor([0, 1, 2, 3]), -1), "n_rows must be >= 0"),
        (lambda: ops.pad(x, torch.tensor([0, 1, 2, 3]).int(), 9), "indices must be Long"),
        (lambda: ops.pad(x, torch.tensor([[0, 1, 2, 3]]), 9), "indices must be 1-D"),
        (lambda: ops.pad(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])[::2], 9), "indices must be contiguous"),
        (lambda: ops.pad(x, torch.tensor([0, 1, 2, 3]), 2 ** 62), r"n_rows \(4611686018427387904\) is too large"),
        (lambda: ops.pad(x.t(), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), 9), "x must be contiguous"),
        # check=False only spares the CUDA kernels their read-back: the CPU kernels check regardless
        (lambda: ops.unpad(x, torch.tensor([0, 4]), False), r"indices holds 4 at position 1"),
        (lambda: ops.pad(x, torch.tensor([0, 1, 1, 2]), 9, False), "indices holds row 1 twice"),
        (lambda: E(bad_ids, idx, pos, tt, we, pe, te, lw, lb, 1e-5, False), r"input_ids .* holds 10 at position 2"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    fn, pattern = _bad_cases()[case]
    with pytest.raises(RuntimeError, match=pattern) as info:
        fn()
    assert "bertfast_C::" in str(info.value)


def test_linear_act_is_cuda_only():
    """linear_act has no CPU kernel: torch's linear is the CPU implementation."""
    assert hasattr(ops, "linear_act")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("bertfast_C::linear_act", "CPU")


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels against the CPU ones (run only where CUDA is available)

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def cuda_build():
    assert ops.built_with_cuda(), "a CUDA device is present but bertfast._C was built without CUDA"


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("e", [384, 1023, 768, 128])
@pytest.mark.parametrize("t", NS)
@pytest.mark.parametrize("with_type,with_tt", [(True, True), (True, False), (False, False)])
def test_cuda_embed(cuda_build, t, e, dtype, with_type, with_tt):
    args = _embed_inputs(t, e, dtype, with_type, with_tt)
    cpu = ops.embed(*args, 1e-12)
    gpu = ops.embed(*[None if a is None else a.cuda() for a in args], 1e-12)
    # both round one fp32 LayerNorm per row: within one ulp of the output dtype (fp32: a few ulps of sum order)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(gpu[0].cpu().float(), cpu[0].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=1e-4, atol=1e-5)


@cuda_only
def test_cuda_embed_bad_ids(cuda_build):
    ids, idx, pos, tt, we, pe, te, lw, lb = [None if a is None else a.cuda()
                                             for a in _embed_inputs(6, 8, torch.float32, vocab=10, n_pos=12)]
    bad = ids.clone()
    bad[idx[3]] = 10
    with pytest.raises(RuntimeError, match=r"bertfast_C::embed: input_ids .*outside the valid range \[0, 10\)"):
        ops.embed(bad, idx, pos, tt, we, pe, te, lw, lb, 1e-5)
    with pytest.raises(RuntimeError, match=r"bertfast_C::embed: indices .*outside the valid range \[0, 11\)"):
        ops.embed(ids, idx + 6, pos, tt, we, pe, te, lw, lb, 1e-5)
    with pytest.raises(RuntimeError, match=r"bertfast_C::embed: pos_emb must be on cuda"):
        ops.embed(ids, idx, pos, tt, we, pe.cpu(), te, lw, lb, 1e-5)
    torch.cuda.synchronize()  # the context is still healthy


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES + [torch.int64], ids=str)
@pytest.mark.parametrize("h", [1, 3, 384, 1023, 768])
@pytest.mark.parametrize("t", NS)
def test_cuda_unpad_pad(cuda_build, t, h, dtype):
    n = t + 11
    x = torch.randn(n, h).to(dtype)
    idx = torch.randperm(n)[:t]
    u = ops.unpad(x.cuda(), idx.cuda())
    assert torch.equal(u.cpu(), ops.unpad(x, idx))
    p = ops.pad(u, idx.cuda(), n)
    assert torch.equal(p.cpu(), ops.pad(x[idx], idx, n))


@cuda_only
def test_cuda_unpad_pad_bad_indices(cuda_build):
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"bertfast_C::unpad: indices .*outside the valid range \[0, 4\)"):
        ops.unpad(x, torch.tensor([0, 4], device="cuda"))
    with pytest.raises(RuntimeError, match=r"bertfast_C::pad: indices .*outside the valid range \[0, 3\)"):
        ops.pad(x, torch.tensor([0, 1, 2, 3], device="cuda"), 3)
    with pytest.raises(RuntimeError, match="bertfast_C::unpad: indices must be on cuda"):
        ops.unpad(x, torch.tensor([0]))
    torch.cuda.synchronize()


@cuda_only
def test_cuda_unchecked_index_ops_do_not_sync(cuda_build):
    """check=False (the encoder's calls): the same results as the checked ops with no stream sync, which
    torch.cuda.set_sync_debug_mode sees in the checked ones (so this test can fail); a bad value is still never
    read: its row is zeros (unpad) or NaN (embed), and the context stays healthy."""
    ids, idx, pos, tt, we, pe, te, lw, lb = [None if a is None else a.cuda()
                                             for a in _embed_inputs(37, 48, torch.float16)]
    x = torch.randn(ids.shape[0], 48, device="cuda", dtype=torch.float16)
    checked = [ops.embed(ids, idx, pos, tt, we, pe, te, lw, lb, 1e-5), ops.unpad(x, idx),
               ops.pad(x[:idx.shape[0]].contiguous(), idx, ids.shape[0])]
    torch.cuda.synchronize()
    unchecked_calls = [lambda: ops.embed(ids, idx, pos, tt, we, pe, te, lw, lb, 1e-5, False),
                       lambda: ops.unpad(x, idx, False),
                       lambda: ops.pad(x[:idx.shape[0]].contiguous(), idx, ids.shape[0], False)]
    try:
        torch.cuda.set_sync_debug_mode("error")
        with pytest.raises(RuntimeError, match="synchroniz"):
            ops.unpad(x, idx)
        unchecked = [call() for call in unchecked_calls]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(checked, unchecked):
        for u, v in zip(a if isinstance(a, tuple) else [a], b if isinstance(b, tuple) else [b]):
            assert torch.equal(u, v)
    bad = ids.clone()
    bad[idx[3]] = we.shape[0]
    out = ops.embed(bad, idx, pos, tt, we, pe, te, lw, lb, 1e-5, False)[0]
    assert out[3].isnan().all() and not out[torch.arange(out.shape[0], device="cuda") != 3].isnan().any()
    u = ops.unpad(x, torch.tensor([0, x.shape[0], 2], device="cuda"), False)
    assert torch.equal(u[1], torch.zeros_like(u[1])) and torch.equal(u[0], x[0]) and torch.equal(u[2], x[2])
    torch.cuda.synchronize()  # the context is still healthy


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_unpad_pad_empty_shapes_bad_indices(dev):
    """Degenerate shapes (x without rows, rows of zero width, a padded output of zero rows) on either device:
    nothing to copy, and the indices are still checked. The CUDA ops once returned before checking them, and
    unpad of an x without rows returned uninitialised memory."""
    if dev == "cuda":
        assert ops.built_with_cuda()
    idx = lambda *v: torch.tensor(v, dtype=torch.int64, device=dev)  # noqa: E731
    bad = [
        (lambda: ops.unpad(torch.empty(0, 8, device=dev), idx(0)), r"unpad: indices holds 0 at position 0, "
                                                                    r"outside the valid range \[0, 0\)"),
        (lambda: ops.unpad(torch.empty(3, 0, device=dev), idx(1, 7)), r"holds 7 at position 1, outside .*\[0, 3\)"),
        (lambda: ops.pad(torch.empty(2, 0, device=dev), idx(1, 1), 3), r"pad: indices holds row 1 twice"),
        (lambda: ops.pad(torch.randn(2, 8, device=dev), idx(0, 1), 0), r"holds 0 at position 0, .*\[0, 0\)"),
        (lambda: ops.pad(torch.randn(3, 8, device=dev), idx(2, 0, 2), 4), r"pad: indices holds row 2 twice "
                                                                           r"\(at positions 0 and 2\)"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call()
    assert ops.unpad(torch.empty(3, 0, device=dev), idx(2, 0)).shape == (2, 0)
    assert ops.pad(torch.empty(2, 0, device=dev), idx(2, 0), 3).shape == (3, 0)
    assert ops.unpad(torch.randn(3, 8, device=dev), idx()).shape == (0, 8)
    assert ops.pad(torch.randn(0, 8, device=dev), idx(), 0).shape == (0, 8)
    # the allocator hands back a used block: every row of the output must be written (all padding here)
    torch.full((5, 8), float("nan"), device=dev)
    out = ops.pad(torch.randn(0, 8, device=dev), idx(), 5)
    assert torch.equal(out, torch.zeros(5, 8, device=dev))


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", ["none", "bias", "bias_relu", "bias_gelu_tanh"])
@pytest.mark.parametrize("n,k,o", [(1, 384, 1536), (7, 768, 3072), (1000, 3072, 768), (33, 40, 24),
                                   (1, 1, 1), (1, 8, 1), (2, 1, 3), (5, 3, 1), (4, 0, 5)])
def test_cuda_linear_act(cuda_build, n, k, o, dtype, epilogue):
    """Against float64, bounded by torch's own error in the dtype; the small shapes are ones cuBLASLt's heuristic
    may decline (torch avoids it for dimensions of 1), and for odd n the bias is a view one element into its storage."""
    x = torch.randn(n, k, device="cuda").to(dtype)
    w = (torch.randn(o, k, device="cuda") / max(k, 1) ** 0.5).to(dtype)
    b = torch.randn(o + (n % 2), device="cuda").to(dtype)[n % 2:]  # odd n: a bias view one element in
    y = ops.linear_act(x, w, None if epilogue == "none" else b, epilogue)
    z = x.double() @ w.double().t() + (0 if epilogue == "none" else b.double())
    ref = {"none": z, "bias": z, "bias_relu": F.relu(z), "bias_gelu_tanh": F.gelu(z, approximate="tanh")}[epilogue]
    zl = F.linear(x, w, None if epilogue == "none" else b)
    low = {"none": zl, "bias": zl, "bias_relu": F.relu(zl), "bias_gelu_tanh": F.gelu(zl, approximate="tanh")}[epilogue]
    assert y.dtype == dtype and y.shape == (n, o)
    assert_within(y, ref, low, dtype, 2.0, "y")


@cuda_only
def test_cuda_linear_act_bad_inputs(cuda_build):
    x = torch.randn(4, 8, device="cuda")
    w = torch.randn(6, 8, device="cuda")
    b = torch.randn(6, device="cuda")
    with pytest.raises(RuntimeError, match="bertfast_C::linear_act: epilogue must be one of"):
        ops.linear_act(x, w, b, "bias_gelu")
    with pytest.raises(RuntimeError, match=r"bertfast_C::linear_act: weight must have shape \[O, 8\]"):
        ops.linear_act(x, w[:, :5].contiguous(), b, "bias")
    with pytest.raises(RuntimeError, match="bertfast_C::linear_act: bias must be given"):
        ops.linear_act(x, w, None, "bias_relu")
    with pytest.raises(RuntimeError, match="bertfast_C::linear_act: weight must be Float, got Half"):
        ops.linear_act(x, w.half(), b, "bias")
