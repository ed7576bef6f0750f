"""bertfast.kernels.layer_norm against float64 references.

Tolerance: the kernel's error against the float64 reference may be at most twice PyTorch's own error when it
computes the same composite in the same dtype, plus one ulp of the output dtype at the output's magnitude (two
for bf16: the Triton interpreter truncates fp32 -> bf16 casts instead of rounding).
On CPU the kernels run in the Triton interpreter (tests/conftest.py), so sizes are small except for one row-count
sweep.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from bertfast.kernels import config
from bertfast.kernels import layer_norm as ln

from helpers import assert_guards_intact, guard_allocations

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def _act(a, activation):
    if activation == "gelu":
        return F.gelu(a)
    if activation == "gelu_tanh":
        return F.gelu(a, approximate="tanh")
    if activation == "relu":
        return F.relu(a)
    if activation == "silu":
        return F.silu(a)
    return a


def _composite(dtype, x, weight, bias, residual, x_bias, activation, keep, p, dy, eps=EPS):
    """PyTorch's LayerNorm(dropout(act(x + x_bias)) + residual) in ``dtype``: (y, grads in argument order)."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None
              for t in (x, weight, bias, residual, x_bias)]
    x_, w_, b_, r_, xb_ = leaves
    a = x_ + xb_ if xb_ is not None else x_
    g = _act(a, activation)
    if keep is not None:
        g = g * (keep.to(dtype) * (1.0 / (1.0 - p))).to(dtype)
    z = g + r_ if r_ is not None else g
    y = F.layer_norm(z, (x.shape[1],), w_, b_, eps)
    y.backward(dy.to(dtype))
    grads = {"x": x_.grad, "weight": w_.grad, "bias": b_.grad,
             "residual": r_.grad if r_ is not None else None, "x_bias": xb_.grad if xb_ is not None else None}
    return y.detach(), grads


def _ulp(dtype, magnitude):
    magnitude = max(float(magnitude), torch.finfo(dtype).tiny)
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def _assert_close(name, ours, lowp, ref, dtype):
    assert ours.dtype == dtype, f"{name}: dtype {ours.dtype}, expected {dtype}"
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ours_err = (ours.double() - ref).abs().max().item()
    torch_err = (lowp.double() - ref).abs().max().item()
    floor = _ulp(dtype, ref.abs().max().item()) * (2 if dtype == torch.bfloat16 else 1)
    bound = 2 * torch_err + floor
    assert ours_err <= bound, f"{name} ({dtype}): max error {ours_err:.3g} > bound {bound:.3g} (torch {torch_err:.3g})"


def _inputs(n, h, dtype, device, residual=True, x_bias=True, offset=0.0):
    x = (offset + torch.randn(n, h, device=device)).to(dtype)
    weight = (1.0 + 0.1 * torch.randn(h, device=device)).to(dtype)
    bias = (0.1 * torch.randn(h, device=device)).to(dtype)
    res = torch.randn(n, h, device=device).to(dtype) if residual else None
    xb = (0.1 * torch.randn(h, device=device)).to(dtype) if x_bias else None
    dy = torch.randn(n, h, device=device).to(dtype)
    return x, weight, bias, res, xb, dy


def _check(n, h, dtype, device, residual=True, x_bias=True, activation=None, p=0.0, seed=0, backward=True,
           rows=None, num_warps=None, eps=EPS, offset=0.0):
    x, weight, bias, res, xb, dy = _inputs(n, h, dtype, device, residual, x_bias, offset)
    y, mean, rstd = ln.add_layer_norm_forward(x, weight, bias, eps, residual=res, x_bias=xb, activation=activation,
                                              dropout_p=p, seed=seed, rows=rows, num_warps=num_warps)
    keep = ln.dropout_keep_mask((n, h), p, seed, device) if p > 0 else None
    ref_y, ref_g = _composite(torch.float64, x, weight, bias, res, xb, activation, keep, p, dy, eps)
    low_y, low_g = _composite(dtype, x, weight, bias, res, xb, activation, keep, p, dy, eps)
    _assert_close("y", y, low_y, ref_y, dtype)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32 and mean.shape == (n,)
    if not backward:
        return
    dx, dres, dw, db, dxb = ln.add_layer_norm_backward(dy, x, weight, bias, mean, rstd, residual=res, x_bias=xb,
                                                       activation=activation, dropout_p=p, seed=seed)
    _assert_close("dx", dx, low_g["x"], ref_g["x"], dtype)
    _assert_close("dweight", dw, low_g["weight"], ref_g["weight"], dtype)
    _assert_close("dbias", db, low_g["bias"], ref_g["bias"], dtype)
    if res is not None:
        _assert_close("dresidual", dres, low_g["residual"], ref_g["residual"], dtype)
    else:
        assert dres is None
    if xb is not None:
        _assert_close("dx_bias", dxb, low_g["x_bias"], ref_g["x_bias"], dtype)
    else:
        assert dxb is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [128, 312, 384, 768, 1023, 1024, 4096])
def test_hidden_sizes(hidden, dtype, device):
    """bias + residual + LayerNorm (the encoder's path), forward and every gradient, at every hidden size."""
    _check(3, hidden, dtype, device)


@pytest.mark.parametrize("hidden", [1, 17, 129, 513])
def test_hidden_just_past_a_power_of_two(hidden, device):
    """Hidden sizes one past a power of two (and 1): the row block must be the next power of two up, not the one
    below (test_hidden_sizes' 1023 and powers of two cannot tell next_pow2(H) from next_pow2(H - 1))."""
    _check(3, hidden, torch.float32, device, activation="gelu", p=0.1, seed=11)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,p,residual,x_bias", [
    (None, 0.0, False, False),      # plain LayerNorm
    (None, 0.0, True, False),
    ("gelu", 0.0, False, True),     # the MLM head transform
    ("gelu_tanh", 0.0, True, True),
    ("relu", 0.0, False, True),     # the MLM head transform of relu / silu configs
    ("silu", 0.1, True, True),
    (None, 0.1, True, True),        # training: bias + dropout + residual
    ("gelu", 0.25, True, True),     # everything at once
])
def test_features(activation, p, residual, x_bias, dtype, device):
    _check(5, 384, dtype, device, residual=residual, x_bias=x_bias, activation=activation, p=p, seed=1234)


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_eps(eps, device):
    """eps reaches the kernel (every other test uses 1e-5): 0, and 0.5, large against the rows' variance (~2),
    forward and backward (the backward reads the forward's rstd)."""
    _check(5, 384, torch.float32, device, activation="gelu", p=0.1, seed=3, eps=eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_with_large_mean(dtype, device):
    """Rows whose mean is large against their spread (x ~ 200 + randn): a variance taken as E[z^2] - E[z]^2 loses
    most of its digits to cancellation in fp32, the two-pass variance does not (the other tests' rows have mean
    ~0, where both agree)."""
    _check(4, 384, dtype, device, offset=200.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_row_counts(n, dtype, device):
    _check(n, 256, dtype, device)


def test_row_count_large_hidden(device):
    _check(1000, 768, torch.float16, device, x_bias=False)


def _multi_rows(h):
    choices = ln.forward_row_choices(config.row_block(h)[0])
    assert len(choices) == 2 and choices[0] == 1, choices
    return choices[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,h", [(1, 128), (7, 312), (13, 768), (5, 1023)])
def test_forward_several_rows_per_program(n, h, dtype, device):
    """The multi-row forward tile (the candidate policy for narrow rows): row counts that are not a multiple of
    the tile's rows, with every feature on (dropout keeps the same elements: offsets are row * H + col)."""
    rows = _multi_rows(h)
    assert n % rows or n < rows
    _check(n, h, dtype, device, activation="gelu", p=0.1, seed=77, backward=False, rows=rows)
    _check(n, h, dtype, device, backward=False, rows=rows)


@pytest.mark.parametrize("h,rows,warps", [(h, r, w) for h in (312, 768)
                                           for r, w in ln.sweep_variants(config.row_block(h)[0])])
def test_forward_sweep_variants(h, rows, warps, device):
    """Every launch variant a sweep times (benchmarks.bench_norm_act --sweep) computes the forward, so a rule
    changed to any of them keeps the results (13 rows: not a multiple of any multi-row tile). The interpreter
    ignores num_warps: on CPU this checks the row tiles, on a GPU each compiled variant."""
    _check(13, h, torch.bfloat16, device, backward=False, rows=rows, num_warps=warps)


def test_forward_sweep_variant_refused():
    x = torch.randn(3, 768)
    w, b = torch.ones(768), torch.zeros(768)
    assert len(ln.sweep_variants(config.row_block(768)[0])) > 10
    for rows, warps in ((1, 3), (True, 4), (1.0, 4), (1, True), (32, 32)):
        with pytest.raises(config.UnsupportedInput, match=r"\(rows, num_warps\) must be one of .* got"):
            ln.add_layer_norm_forward(x, w, b, EPS, rows=rows, num_warps=warps)


def test_forward_several_rows_fully_written(device):
    """Poisoned out and the statistics of a last, partial tile are all written by the multi-row forward."""
    n, h = 11, 384
    x, weight, bias, res, xb, _ = _inputs(n, h, torch.float32, device)
    out = torch.full_like(x, float("nan"))
    y, mean, rstd = ln.add_layer_norm_forward(x, weight, bias, EPS, residual=res, x_bias=xb, out=out,
                                              rows=_multi_rows(h))
    z = x.double() + xb.double() + res.double()
    ref = F.layer_norm(z, (h,), weight.double(), bias.double(), EPS)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() < 1e-4
    # the statistics the backward reads, by the usual rule: twice torch's fp32 error plus one ulp (a 1e-3 absolute
    # bound on rstd ~0.6 let a multi-row forward store rstd 5e-4 off, mutation testing 2026-11-27)
    var_t, mean_t = torch.var_mean(x + xb + res, dim=1, unbiased=False)
    for name, ours, low, exact in (("mean", mean, mean_t, z.mean(1)),
                                   ("rstd", rstd, torch.rsqrt(var_t + EPS), 1 / (z.var(1, unbiased=False) + EPS).sqrt())):
        err, torch_err = (ours.double() - exact).abs().max(), (low.double() - exact).abs().max()
        ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(exact.abs().max()))
        assert err <= 2 * torch_err + ulp, (name, err.item(), torch_err.item())


def test_forward_rows_must_be_a_choice(device):
    x, weight, bias, res, xb, _ = _inputs(4, 768, torch.float32, device)
    with pytest.raises(config.UnsupportedInput, match="rows must be one of"):
        ln.add_layer_norm_forward(x, weight, bias, EPS, rows=3)


def test_out_is_fully_written(device):
    """A NaN-poisoned ``out`` is filled completely (non-power-of-two hidden, so masked lanes exist)."""
    x, weight, bias, res, xb, _ = _inputs(9, 1023, torch.float16, device)
    out = torch.full_like(x, float("nan"))
    y, mean, rstd = ln.add_layer_norm_forward(x, weight, bias, EPS, residual=res, x_bias=xb, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    assert torch.isfinite(mean).all() and torch.isfinite(rstd).all()
    ref = F.layer_norm(x.double() + xb.double() + res.double(), (1023,), weight.double(), bias.double(), EPS)
    assert (out.double() - ref).abs().max() < 1e-2


def test_backward_outputs_fully_written(device):
    """Every element of every gradient is finite (the gradients are fresh allocations, uninitialised memory
    would show up as garbage only by chance, so check values against the reference too)."""
    _check(2, 1023, torch.float32, device, activation="gelu", p=0.2, seed=7)


@pytest.mark.parametrize("rows", ["policy", "multi"])
def test_no_writes_outside_outputs(rows, device, monkeypatch):
    """No kernel writes outside the tensors it is given: every buffer the launchers allocate (y, mean, rstd, dx,
    dresidual, the partial sums, the dropout mask) and the caller's ``out`` lie between guard bands
    (helpers.guard_allocations). 11 rows (not a multiple of the multi-row tile), hidden 312 (masked lanes in
    every row), every feature on. Bounds are not checked by the interpreter: a store past the end went unseen or
    corrupted the heap (a crash in some later test, or none), mutation testing 2026-11-27."""
    n, h, p, seed = 11, 312, 0.1, 5
    x, weight, bias, res, xb, dy = _inputs(n, h, torch.float16, device)
    kw = dict(residual=res, x_bias=xb, activation="gelu", dropout_p=p, seed=seed)
    bases = guard_allocations(monkeypatch)
    y, mean, rstd = ln.add_layer_norm_forward(x, weight, bias, EPS, out=torch.empty_like(x),
                                              rows=1 if rows == "policy" else _multi_rows(h), **kw)
    grads = ln.add_layer_norm_backward(dy, x, weight, bias, mean, rstd, **kw)
    keep = ln.dropout_keep_mask((n, h), p, seed, device)
    monkeypatch.undo()
    assert_guards_intact(bases)
    # the same values as without the guards
    want = ln.add_layer_norm_forward(x, weight, bias, EPS, **kw)
    for a, b in zip((y, mean, rstd), want):
        assert torch.equal(a, b)
    for a, b in zip(grads, ln.add_layer_norm_backward(dy, x, weight, bias, mean, rstd, **kw)):
        assert torch.equal(a, b)
    assert torch.equal(keep, ln.dropout_keep_mask((n, h), p, seed, device))


def _check_edge_rows(n, h, device, edge=3):
    """add_layer_norm forward and backward (residual, x bias, GELU; fp16) over all n rows, the first and the last
    `edge` rows checked against the composite on those rows: y, dx and dresidual (dweight, dbias and dx_bias sum
    over every row and are left to the other tests)."""
    x, res, dy = (torch.randn(n, h, device=device, dtype=torch.float16) for _ in range(3))
    weight = (1.0 + 0.1 * torch.randn(h, device=device)).half()
    bias, xb = ((0.1 * torch.randn(h, device=device)).half() for _ in range(2))
    kw = dict(residual=res, x_bias=xb, activation="gelu")
    edges = (slice(0, edge), slice(n - edge, n))
    y, mean, rstd = ln.add_layer_norm_forward(x, weight, bias, EPS, **kw)
    y = [y[rows].clone() for rows in edges]        # y's memory freed before the backward's outputs are allocated
    dx, dres, _, _, _ = ln.add_layer_norm_backward(dy, x, weight, bias, mean, rstd, **kw)
    for rows, y_rows in zip(edges, y):
        args = (x[rows], weight, bias, res[rows], xb, "gelu", None, 0.0, dy[rows])
        (ref_y, ref_g), (low_y, low_g) = _composite(torch.float64, *args), _composite(torch.float16, *args)
        _assert_close("y", y_rows, low_y, ref_y, torch.float16)
        _assert_close("dx", dx[rows], low_g["x"], ref_g["x"], torch.float16)
        _assert_close("dresidual", dres[rows], low_g["residual"], ref_g["residual"], torch.float16)


def test_edge_rows(device):
    """The check of test_more_than_2_31_elements_cuda at an ordinary size (so that its logic runs everywhere)."""
    _check_edge_rows(37, 1024, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (2^31 elements: ~22 GB in fp16)")
def test_more_than_2_31_elements_cuda():
    """N * H past 2^31 elements (2^21 + 3 rows of 1024): the kernels' element offsets are int64; an int32 offset
    wraps, and the last rows read and write far from their own memory. The mutation run of 2026-11-27 could not
    check this in the interpreter (a 4 GiB tensor a side)."""
    try:
        _check_edge_rows((1 << 31) // 1024 + 3, 1024, torch.device("cuda"))
    finally:
        torch.cuda.empty_cache()


def test_dropout_mask(device):
    keep = ln.dropout_keep_mask((64, 768), 0.1, 42, device)
    assert keep.dtype == torch.bool and keep.shape == (64, 768)
    frac = keep.float().mean().item()
    assert abs(frac - 0.9) < 0.01, frac
    assert torch.equal(keep, ln.dropout_keep_mask((64, 768), 0.1, 42, device)), "mask must be reproducible"
    other = ln.dropout_keep_mask((64, 768), 0.1, 43, device)
    assert not torch.equal(keep, other), "a different seed must give a different mask"
    # the mask depends on the flat offset only: a [N*H] mask is the same stream
    flat = ln.dropout_keep_mask((64 * 768,), 0.1, 42, device)
    assert torch.equal(flat.view(64, 768), keep)
    assert ln.dropout_keep_mask((4, 128), 0.0, 1, device).all()
    assert not ln.dropout_keep_mask((4, 128), 1.0, 1, device).any()


def test_dropout_forward_uses_mask(device):
    """Dropped elements contribute exactly zero before the residual: with x = 1, no bias, the pre-LN value is
    the mask scaled by 1 / (1 - p)."""
    n, h, p = 4, 256, 0.5
    x = torch.ones(n, h, device=device)
    w, b = torch.ones(h, device=device), torch.zeros(h, device=device)
    y, mean, _ = ln.add_layer_norm_forward(x, w, b, EPS, dropout_p=p, seed=99)
    keep = ln.dropout_keep_mask((n, h), p, 99, device)
    z = keep.double() / (1 - p)
    torch.testing.assert_close(mean.double(), z.mean(1), rtol=1e-6, atol=1e-6)
    ref = F.layer_norm(z, (h,), eps=EPS)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_backward_deterministic(device):
    x, weight, bias, res, xb, dy = _inputs(67, 384, torch.float16, device)
    _, mean, rstd = ln.add_layer_norm_forward(x, weight, bias, EPS, residual=res, x_bias=xb)
    a = ln.add_layer_norm_backward(dy, x, weight, bias, mean, rstd, residual=res, x_bias=xb)
    b = ln.add_layer_norm_backward(dy, x, weight, bias, mean, rstd, residual=res, x_bias=xb)
    for ga, gb in zip(a, b):
        assert torch.equal(ga, gb)


@pytest.mark.parametrize("n,h", [(1, 384), (67, 1023)])
def test_backward_residual_grad_into_dx(device, n, h):
    """residual_grad_is_dx=True (no activation, no dropout): no dresidual tensor, and dx is bit for bit the dx
    and the dresidual of the ordinary call (the kernel stores the same values twice into dx)."""
    x, weight, bias, res, xb, dy = _inputs(n, h, torch.float16, device)
    _, mean, rstd = ln.add_layer_norm_forward(x, weight, bias, EPS, residual=res, x_bias=xb)
    dx, dres, dw, db, dxb = ln.add_layer_norm_backward(dy, x, weight, bias, mean, rstd, residual=res, x_bias=xb)
    got = ln.add_layer_norm_backward(dy, x, weight, bias, mean, rstd, residual=res, x_bias=xb,
                                     residual_grad_is_dx=True)
    assert got[1] is None
    assert torch.equal(got[0], dx) and torch.equal(got[0], dres)
    for a, b in zip(got[2:], (dw, db, dxb)):
        assert torch.equal(a, b)
    with pytest.raises(config.UnsupportedInput, match="residual_grad_is_dx needs no activation"):
        ln.add_layer_norm_backward(dy, x, weight, bias, mean, rstd, residual=res, x_bias=xb, activation="gelu",
                                   residual_grad_is_dx=True)
    with pytest.raises(config.UnsupportedInput, match="residual_grad_is_dx needs no activation and no dropout"):
        ln.add_layer_norm_backward(dy, x, weight, bias, mean, rstd, residual=res, x_bias=xb, dropout_p=0.1, seed=1,
                                   residual_grad_is_dx=True)


def test_empty_rows(device):
    x = torch.empty(0, 128, device=device)
    w, b = torch.ones(128, device=device), torch.zeros(128, device=device)
    y, mean, rstd = ln.add_layer_norm_forward(x, w, b, EPS)
    assert y.shape == (0, 128) and mean.shape == (0,)
    dx, dres, dw, db, dxb = ln.add_layer_norm_backward(x, x, w, b, mean, rstd)
    assert dx.shape == (0, 128) and torch.equal(dw, torch.zeros_like(w)) and dres is None and dxb is None


# ---------------------------------------------------------------------------------------------------------------
# bad input: the error names the argument


def _good(device, h=128, dtype=torch.float32):
    x = torch.randn(4, h, device=device, dtype=dtype)
    return dict(x=x, weight=torch.ones(h, device=device, dtype=dtype), bias=torch.zeros(h, device=device, dtype=dtype),
                eps=EPS, residual=torch.randn(4, h, device=device, dtype=dtype),
                x_bias=torch.zeros(h, device=device, dtype=dtype))


@pytest.mark.parametrize("change,words", [
    (dict(residual="fp16"), ["residual", "dtype"]),
    (dict(weight="fp16"), ["weight", "dtype"]),
    (dict(bias="bf16"), ["bias", "dtype"]),
    (dict(x_bias="fp16"), ["x_bias", "dtype"]),
    (dict(x="fp64"), ["x", "dtype"]),
    (dict(weight="short"), ["weight", "shape"]),
    (dict(x_bias="short"), ["x_bias", "shape"]),
    (dict(residual="short"), ["residual", "shape"]),
    (dict(x="noncontig"), ["x", "contiguous"]),
    (dict(residual="noncontig"), ["residual", "contiguous"]),
    (dict(activation="swish"), ["activation"]),
    (dict(dropout_p=1.5), ["dropout_p"]),
    (dict(eps=-1e-5), ["eps"]),
    (dict(eps=float("nan")), ["eps"]),
])
def test_bad_input(change, words, device):
    kw = _good(device)
    for name, what in change.items():
        t = kw.get(name)
        if what == "fp16":
            kw[name] = t.half()
        elif what == "bf16":
            kw[name] = t.bfloat16()
        elif what == "fp64":
            kw[name] = t.double()
        elif what == "short":
            kw[name] = t[..., :-1].contiguous()
        elif what == "noncontig":
            kw[name] = torch.randn(t.shape[1], t.shape[0], device=device).t()
        else:
            kw[name] = what
    with pytest.raises(config.UnsupportedInput) as err:
        ln.add_layer_norm_forward(**kw)
    msg = str(err.value)
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 1.0, 3.7, True, None, "3"])
def test_bad_dropout_seed(device, seed):
    """With dropout the seed is an int in [0, 2**63), as the attention kernels take it (kernels.config.dropout_seed):
    a float was truncated (3.7 drew seed 3's mask) and is now refused; without dropout it is not read."""
    kw = _good(device)
    y, mean, rstd = ln.add_layer_norm_forward(**kw)
    for call in (lambda: ln.add_layer_norm_forward(**kw, dropout_p=0.1, seed=seed),
                 lambda: ln.add_layer_norm_backward(y, kw["x"], kw["weight"], kw["bias"], mean, rstd,
                                                    kw["residual"], dropout_p=0.1, seed=seed),
                 lambda: ln.dropout_keep_mask((4, 128), 0.1, seed, device)):
        with pytest.raises(config.UnsupportedInput, match=r"seed must be an int in \[0, 2\*\*63\)"):
            call()
    ln.add_layer_norm_forward(**kw, seed=seed)                       # not read without dropout


def test_dropout_seed_integer_forms(device):
    """Integers that are not Python ints (numpy, a one-element integer tensor) give the same mask as the int."""
    np = pytest.importorskip("numpy")
    want = ln.dropout_keep_mask((3, 40), 0.3, 2 ** 40 + 5, device)
    for seed in (np.int64(2 ** 40 + 5), torch.tensor(2 ** 40 + 5)):
        assert torch.equal(ln.dropout_keep_mask((3, 40), 0.3, seed, device), want)


def test_hidden_too_large(device):
    h = config.MAX_FUSED_HIDDEN + 1
    kw = _good(device, h)
    with pytest.raises(config.UnsupportedInput, match=rf"hidden size \(x.shape\[-1\]\) {h} is larger"):
        ln.add_layer_norm_forward(**kw)


def test_backward_hidden_too_large(device):
    h = ln.BACKWARD_MAX_HIDDEN + 1
    kw = _good(device, h)
    x = kw["x"]
    mean = torch.zeros(4, device=device)
    with pytest.raises(config.UnsupportedInput, match="hidden size"):
        ln.add_layer_norm_backward(x, x, kw["weight"], kw["bias"], mean, mean)


def test_backward_bad_stats(device):
    kw = _good(device)
    x = kw["x"]
    with pytest.raises(config.UnsupportedInput, match="rstd"):
        ln.add_layer_norm_backward(x, x, kw["weight"], kw["bias"], torch.zeros(4, device=device),
                                   torch.zeros(4, device=device, dtype=torch.float16))
    with pytest.raises(config.UnsupportedInput, match="dy"):
        ln.add_layer_norm_backward(x.half(), x, kw["weight"], kw["bias"], torch.zeros(4, device=device),
                                   torch.zeros(4, device=device))


def test_compile_report_covers_every_launch_config():
    """Every (BLOCK_N, num_warps, ROWS) the forward launcher can pick, and every backward (BLOCK_N, num_warps), for
    any hidden size it accepts, is among the compile report's specs (which must compile without spills)."""
    fwd = {(s.constexprs["BLOCK_N"], s.num_warps, s.constexprs["ROWS"]) for s in ln.aot_specs()
           if s.kernel == "add_layer_norm_fwd"}
    bwd = {(s.constexprs["BLOCK_N"], s.num_warps) for s in ln.aot_specs() if s.kernel == "add_layer_norm_bwd"}
    for h in list(range(1, 300)) + [312, 384, 768, 1023, 1024, 3072, 4095, 4096, 6000, config.MAX_FUSED_HIDDEN]:
        block, warps = config.row_block(h)
        for rows in ln.forward_row_choices(block):
            assert (block, ln.forward_warps(block, rows), rows) in fwd, (h, block, rows)
        if h <= ln.BACKWARD_MAX_HIDDEN:
            assert (block, ln.backward_warps(block, warps)) in bwd, h
