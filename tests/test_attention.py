"""Fused variable-length attention (kernels/attention.py) against float64 references.

Error rule (flash-attention's): the kernel's max error against a float64 reference must be within 2x (forward) /
3x (gradients) of the max error of plain PyTorch computing the same thing in the same dtype, plus a floor of one
ulp of the output's scale (the interpreter truncates fp32 -> bf16 casts instead of rounding them). fp32 with
tf32 dot inputs is held to the fp16 baseline (both have a 10-bit mantissa).

Without CUDA the kernels run in the Triton interpreter (tests/conftest.py), about 5 ms per tile iteration, so
most cases use 2 heads and sequences up to 129 tokens; one case has a 512-token sequence.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from bertfast.kernels import attention as attn
from bertfast.kernels.attention import (SUPPORTED_HEAD_DIMS, aot_specs, attention_backward, attention_forward,
                                        dropout_mask)
from bertfast.kernels.config import UnsupportedInput

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def _seed_for(*key) -> None:
    """Fresh inputs per parametrization, reproducible."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def _cu(lengths, device):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device), max(max(lengths), 1)


def _reference(qkv, cu, scale, keep=None, dropout_p=0.0):
    """Attention per sequence in qkv's dtype (float64 for the reference, the kernel's dtype for PyTorch's own
    error): qkv [T, 3, H, D], cu a list of offsets; keep [B, H, S, S] bool (the dropout keep-mask) or None."""
    outs = []
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        q, k, v = qkv[s:e].unbind(1)                                  # [L, H, D]
        scores = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0)) * scale   # [H, L, L]
        p = torch.softmax(scores, dim=-1)
        if keep is not None:
            n = e - s
            p = p * keep[b, :, :n, :n].to(p.dtype) / (1.0 - dropout_p)
        outs.append(torch.matmul(p, v.transpose(0, 1)).transpose(0, 1))     # [L, H, D]
    return torch.cat(outs) if outs else qkv.new_zeros((0,) + tuple(qkv.shape[2:]))


def _fwd_bwd(fn, qkv, dout):
    x = qkv.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(dout.to(out.dtype))
    return out.detach(), x.grad.detach()


def _floor(dtype, ref):
    """One ulp of the output's scale in the output dtype."""
    return torch.finfo(dtype).eps * max(ref.abs().max().item(), 1.0)


def _grad_floor(dtype, ref, head_dim):
    """One ulp of the gradient's scale, plus the fp32 rounding of dP - delta: both are head_dim-long dot products
    of O(1) values that cancel (exactly, for a one-token sequence, in PyTorch's softmax backward)."""
    return _floor(dtype, ref) + torch.finfo(torch.float32).eps * head_dim


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_within_bounds(what, dtype, head_dim, out, dqkv, ref_out, ref_grad, pt_out, pt_grad, check_grads=True):
    """The file's bounds: out within 2x PyTorch's own error in the same precision (pt_*) plus an ulp, each of dQ, dK,
    dV within 3x plus the gradient floor; check_grads=False only requires the gradients to be finite."""
    err = _max_err(out, ref_out)
    bound = 2 * _max_err(pt_out, ref_out) + _floor(dtype, ref_out)
    assert err <= bound, f"{what}out: max error {err:.3g} > bound {bound:.3g}"
    assert torch.isfinite(dqkv).all()
    for i, name in enumerate("qkv" if check_grads else ""):
        err = _max_err(dqkv[:, i], ref_grad[:, i])
        bound = 3 * _max_err(pt_grad[:, i], ref_grad[:, i]) + _grad_floor(dtype, ref_grad[:, i], head_dim)
        assert err <= bound, f"{what}d{name}: max error {err:.3g} > bound {bound:.3g}"


def _check_case(device, dtype, head_dim, lengths, heads, fp32_precision="ieee", dropout_p=0.0, seed=0,
                softmax_scale=None, check_lse=True, qk_gain=1.0, edit_qkv=None, check_grads=True):
    """qk_gain multiplies q and k (the logits by its square); edit_qkv(qkv, cu) edits the random qkv in place;
    check_grads=False only requires the gradients to be finite."""
    cu_t, max_seqlen = _cu(lengths, device)
    cu = cu_t.tolist()
    total = cu[-1]
    qkv = torch.randn(total, 3, heads, head_dim, dtype=dtype)
    qkv[:, :2] *= qk_gain
    if edit_qkv is not None:
        edit_qkv(qkv, cu)
    dout = torch.randn(total, heads, head_dim, dtype=dtype)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    keep = None
    if dropout_p > 0:
        keep = dropout_mask(cu_t, max_seqlen, heads, dropout_p, seed, device).cpu()

    out, lse = attention_forward(qkv.to(device), cu_t, max_seqlen, softmax_scale=softmax_scale,
                                 dropout_p=dropout_p, seed=seed, fp32_precision=fp32_precision)
    dqkv = attention_backward(dout.to(device), qkv.to(device), out, lse, cu_t, max_seqlen,
                              softmax_scale=softmax_scale, dropout_p=dropout_p, seed=seed,
                              fp32_precision=fp32_precision)
    out, lse, dqkv = out.cpu(), lse.cpu(), dqkv.cpu()
    assert out.dtype == dtype and dqkv.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (total, heads, head_dim) and lse.shape == (heads, total) and dqkv.shape == qkv.shape

    ref_out, ref_grad = _fwd_bwd(lambda x: _reference(x, cu, scale, keep, dropout_p), qkv.double(), dout)
    base_dtype = torch.float16 if (dtype == torch.float32 and fp32_precision == "tf32") else dtype
    pt_out, pt_grad = _fwd_bwd(lambda x: _reference(x, cu, scale, keep, dropout_p), qkv.to(base_dtype), dout)

    _assert_within_bounds("", dtype, head_dim, out, dqkv, ref_out, ref_grad, pt_out, pt_grad, check_grads)

    if check_lse:
        ref_lse = []
        for b in range(len(cu) - 1):
            s, e = cu[b], cu[b + 1]
            if e > s:
                q, k = qkv[s:e, 0].double(), qkv[s:e, 1].double()
                ref_lse.append(torch.logsumexp(torch.einsum("qhd,khd->hqk", q, k) * scale, -1))
        ref_lse = torch.cat(ref_lse, dim=1)
        tol = 1e-5 if (dtype == torch.float32 and fp32_precision == "ieee") else 2e-2
        assert _max_err(lse, ref_lse) <= tol * max(1.0, ref_lse.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_forward_backward(device, dtype_name, head_dim):
    _seed_for("fb", dtype_name, head_dim)
    lengths = [1, 17, 64, 129] + [int(torch.randint(2, 100, ()))]
    lengths = [lengths[i] for i in torch.randperm(len(lengths)).tolist()]
    _check_case(device, DTYPES[dtype_name], head_dim, lengths, heads=2)


def test_long_batch_of_eight(device):
    """Batch 8 with one 512-token sequence (several full and partial tiles in every kernel)."""
    _seed_for("long")
    lengths = [512, 1, 17, 64, 129] + torch.randint(2, 300, (3,)).tolist()
    _check_case(device, torch.float16, 64, lengths, heads=1)


def test_bf16_wide_head_batch_of_eight(device):
    _seed_for("bf16-8")
    lengths = [1, 17, 64, 129, 200] + torch.randint(2, 256, (3,)).tolist()
    _check_case(device, torch.bfloat16, 96, lengths, heads=1)


@pytest.mark.parametrize("dtype_name", ["fp32-tf32", "fp16", "bf16"])
def test_large_logits(device, dtype_name):
    """q and k 3x a unit normal's (logits of std ~9, sharp softmaxes): the backward recomputes P from its own
    scores and the forward's lse, so they must agree. With tf32 dots the dK / dV kernel rounded the other operand
    of its (transposed) score dot than the forward: dV 2.4x over the bound (NOTES change 37)."""
    _seed_for("large-logits", dtype_name)
    dtype = DTYPES.get(dtype_name, torch.float32)
    lengths = [48, 1, 130, int(torch.randint(2, 100, ()))]
    _check_case(device, dtype, 64, lengths, heads=2, fp32_precision="tf32", qk_gain=3.0)


@pytest.mark.parametrize("head_dim,lengths", [(64, [17, 129, 3]), (80, [17, 129, 3]), (64, [128, 77, 200])])
def test_fp32_tf32(device, head_dim, lengths):
    """tf32 dots on fp32 inputs, bounded by fp16's error (the same 10-bit mantissa). In the interpreter the operands
    are truncated to tf32 as the tensor cores do (conftest): without the kernel's rounding of one operand, the
    second and third cases failed."""
    _seed_for("tf32", head_dim, len(lengths), lengths[0])
    _check_case(device, torch.float32, head_dim, lengths, heads=2, fp32_precision="tf32")


def _tf32_pair(x):
    """(x2, x3) from fp32 x: x3 a tf32 value (low 13 mantissa bits zero), x2 = x3 less 1/4 of a tf32 ulp in
    magnitude. Rounded to nearest, x2 is x3; truncated, it is x3 less a whole ulp. Sign-magnitude bits, so one
    integer add does both signs."""
    base = (x.view(torch.int32) + 0x1000) & ~0x1FFF     # x rounded to tf32 (half up): some tf32 value near x
    return (base + 0x1800).view(torch.float32), (base + 0x2000).view(torch.float32)


def test_fp32_tf32_rounded_operands(device):
    """The operands the kernels round to tf32 themselves (_tf32_rn: Q in every kernel, V in the dK / dV kernel)
    are rounded to nearest, not left to the hardware's truncation. Exact, flip-free and hardware-independent:
    inputs that differ by less than half a tf32 ulp in those operands only (and round to the same tf32 value)
    give bit-identical results. The fp16-scaled bounds of test_fp32_tf32 absorb one operand truncated instead of
    rounded (a mutation run: V in the dK / dV kernel). fp32 "ieee" dots are the control: the same inputs differ."""
    _seed_for("tf32-rounded")
    lengths = [17, 70, 3]
    cu_t, max_seqlen = _cu(lengths, device)
    total, heads, head_dim = sum(lengths), 2, 64
    qkv = torch.randn(total, 3, heads, head_dim)
    dout = torch.randn(total, heads, head_dim).to(device)

    def run(qkv, precision, out_lse=None):
        qkv = qkv.to(device)
        out, lse = out_lse or attention_forward(qkv, cu_t, max_seqlen, fp32_precision=precision)
        return out, lse, attention_backward(dout, qkv, out, lse, cu_t, max_seqlen, fp32_precision=precision)

    for precision in ("tf32", "ieee"):
        same = precision == "tf32"
        # Q: rounded where loaded by all three kernels, so the forward and the whole backward agree bit for bit
        q2, q3 = _tf32_pair(qkv[:, 0])
        a, b = qkv.clone(), qkv.clone()
        a[:, 0], b[:, 0] = q2, q3
        ra, rb = run(a, precision), run(b, precision)
        for name, x, y in zip(("out", "lse", "dqkv"), ra, rb):
            assert torch.equal(x, y) == same, f"{precision}: Q's rounding, {name}"
        # V: rounded by the dK / dV kernel (the forward and the dQ kernel leave it to the hardware): backwards
        # from the same out / lse give the same dK and dV
        v2, v3 = _tf32_pair(qkv[:, 2])
        a, b = qkv.clone(), qkv.clone()
        a[:, 2], b[:, 2] = v2, v3
        out_lse = run(a, precision)[:2]
        da, db = run(a, precision, out_lse)[2], run(b, precision, out_lse)[2]
        assert torch.equal(da[:, 1], db[:, 1]) == same, f"{precision}: V's rounding, dK"
        assert torch.equal(da[:, 2], db[:, 2]), "dV does not read V"


@pytest.mark.parametrize("case", ["peak", "low"])
def test_logits_far_from_exp_range(device, case):
    """Logits beyond exp's fp32 range (about +-88 nats) where the softmax is still well defined, being shift
    invariant; component 0 of q and k is set to +-c with c^2 * scale = 112 nats. "peak": key 0 of each sequence
    outscores every other key by that much, so a row's running max falls by ~160 (log2 units) from the first key
    tile to the next: the rescaling exp2(m_old - m_new) must shrink, never grow (it overflowed to inf when the
    running max was the tile's own). "low": every logit is below -100 nats, so lse < -100: a running max that starts
    at 0 instead of -inf underflows every p to 0, and a padded key of a partial tile (score 0) gets
    exp(0 - lse) = inf in the backward unless it is masked. The gradients of "peak" are only required to be
    finite: its P is one-hot, where dS = P (dP - delta) cancels to 0 and the fp32 error of delta (from the stored
    O) reaches dQ, dK times |K| or |Q| * scale (~4 here), beyond the gradient floor."""
    _seed_for("far-logits", case)
    head_dim = 64
    c = math.sqrt(112 * math.sqrt(head_dim))

    def edit(qkv, cu):
        if case == "peak":
            qkv[:, 0, :, 0] = c
            qkv[:, 1, :, 0] = 0.0
            qkv[cu[:-1], 1, :, 0] = c          # key 0 of every sequence (no sequence is empty here)
        else:
            qkv[:, 0, :, 0] = -c
            qkv[:, 1, :, 0] = c

    _check_case(device, torch.float32, head_dim, [40, 70, 1, 35], heads=2, edit_qkv=edit,
                check_grads=case != "peak")


@pytest.mark.parametrize("dtype_name,head_dim", [("fp16", 80), ("fp32", 64)])
def test_neighbouring_memory_is_neither_read_nor_written(device, dtype_name, head_dim):
    """Every tensor is a view into a larger NaN-filled buffer: NaN rows before the first and after the last token
    (as many as a tile can reach), NaN between heads, and for qkv, dqkv, out and dout a NaN tail past head_dim. The
    results equal those from compact tensors bit for bit, and every NaN outside the views is still there. A load
    whose mask lets it reach past the last sequence's end or past head_dim multiplies a NaN by 0 (still NaN); a
    store past a sequence, a head or head_dim overwrites the NaN; an offset built from head_dim instead of the
    head stride lands in the gap. (head_dim 80 takes the padded-block masks, 64 the others.)"""
    _seed_for("neighbours", dtype_name, head_dim)
    dtype = DTYPES[dtype_name]
    precision = "ieee"
    lengths = [3, 70, 1, 37]                      # partial tiles everywhere; the last sequence ends mid-tile
    cu_t, max_seqlen = _cu(lengths, device)
    total, heads, before, after, gap = sum(lengths), 2, 3, 130, 16
    nan = float("nan")

    def view(buf):
        return buf[before:before + total, ..., :head_dim]

    qkv_buf = torch.full((before + total + after, 3, heads, head_dim + gap), nan, dtype=dtype, device=device)
    dout_buf = torch.full((before + total + after, heads, head_dim + gap), nan, dtype=dtype, device=device)
    out_buf, dqkv_buf = torch.full_like(dout_buf, nan), torch.full_like(qkv_buf, nan)
    lse_buf = torch.full((heads, before + total + after), nan, device=device)
    qkv, dout, out, dqkv = view(qkv_buf), view(dout_buf), view(out_buf), view(dqkv_buf)
    lse = lse_buf[:, before:before + total]
    qkv.copy_(torch.randn(qkv.shape, device=device).to(dtype))
    dout.copy_(torch.randn(dout.shape, device=device).to(dtype))

    attention_forward(qkv, cu_t, max_seqlen, fp32_precision=precision, out=out, lse=lse)
    attention_backward(dout, qkv, out, lse, cu_t, max_seqlen, fp32_precision=precision, dqkv=dqkv)
    ref_out, ref_lse = attention_forward(qkv.contiguous(), cu_t, max_seqlen, fp32_precision=precision)
    ref_dqkv = attention_backward(dout.contiguous(), qkv.contiguous(), ref_out, ref_lse, cu_t, max_seqlen,
                                  fp32_precision=precision)
    assert torch.isfinite(ref_out).all() and torch.isfinite(ref_dqkv).all()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    torch.testing.assert_close(dqkv, ref_dqkv, rtol=0, atol=0)
    for name, buf, part in (("out", out_buf, view), ("lse", lse_buf, lambda t: t[:, before:before + total]),
                            ("dqkv", dqkv_buf, view)):
        outside = torch.ones_like(buf, dtype=torch.bool)
        part(outside).fill_(False)
        assert buf[outside].isnan().all(), f"{name}: written outside its view"


_GUARD_PAGE_CHILD = r'''
import ctypes, mmap, sys
import torch
from bertfast.kernels import attention as attn

def guarded(t):
    """A copy of t ending at the last byte before an inaccessible (PROT_NONE) page: a read past its end faults."""
    nbytes, page = t.numel() * t.element_size(), mmap.PAGESIZE
    pages = -(-nbytes // page)
    m = mmap.mmap(-1, (pages + 1) * page)
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    assert libc.mprotect(ctypes.addressof(ctypes.c_char.from_buffer(m)) + pages * page, page, 0) == 0
    g = torch.frombuffer(m, dtype=torch.uint8, count=pages * page)[pages * page - nbytes:]
    g = g.view(t.dtype).view(t.shape)
    g.copy_(t)
    return g

torch.manual_seed(int(sys.argv[1]))
heads, head_dim = 2, 64
cu = torch.tensor([0, 3, 73, 74, 111], dtype=torch.int32)   # lengths 3, 70, 1, 37: partial tiles
qkv = torch.randn(111, 3, heads, head_dim).half()
dout = torch.randn(111, heads, head_dim).half()
out, lse = attn.attention_forward(qkv, cu, 70)
dqkv = attn.attention_backward(dout, qkv, out, lse, cu, 70)
g_out, g_lse = attn.attention_forward(guarded(qkv), cu, 70)
g_dqkv = attn.attention_backward(guarded(dout), guarded(qkv), guarded(out), guarded(lse), cu, 70)
assert torch.equal(g_out, out) and torch.equal(g_lse, lse) and torch.equal(g_dqkv, dqkv)
print("ok", attn.__file__)
'''


def test_nothing_is_read_past_the_end_of_the_inputs(device):
    """qkv, dout, out and lse each end right before an inaccessible page (CPU memory: the interpreter loads through
    raw pointers), in a child process. A load whose mask lets it reach past the last sequence's end (the Q rows of
    the last, partial query tile; the keys of the last, partial key tile) faults; with neighbouring memory it would
    read rows whose results are then masked away, which no value test can see. (A mutation run: the forward's Q
    load and its partial tile's K load unmasked passed every other test.)"""
    if device.type == "cuda":
        pytest.skip("guard pages are for the interpreter's CPU tensors (on a GPU: compute-sanitizer)")
    import os
    import subprocess
    import sys
    _seed_for("guard-page")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", _GUARD_PAGE_CHILD, str(int(torch.randint(0, 2 ** 31, ())))],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit status {r.returncode} (-11: a read past the end): {r.stderr[-2000:]}"
    assert r.stdout.split()[-1] == attn.__file__, "the child imported another bertfast"


def test_fp32_tf32_rounding_ties_to_even(device):
    """_tf32_rn's ties: Q exactly halfway between two tf32 values gives the same results, bit for bit, as Q rounded
    to the even one of them (half the ties round down, half up). Rounding ties one way only (a dropped
    ties-to-even term) rounds the odd half to the other neighbour. fp32 "ieee" dots are the control."""
    _seed_for("tf32-ties")
    lengths = [17, 40]
    cu_t, max_seqlen = _cu(lengths, device)
    qkv = torch.randn(sum(lengths), 3, 2, 64)
    base = qkv[:, 0].view(torch.int32) & ~0x1FFF                       # a tf32 value (truncation)
    tie = (base | 0x1000).view(torch.float32)
    even = torch.where((base >> 13) & 1 == 1, base + 0x2000, base).view(torch.float32)
    assert ((base >> 13) & 1).float().mean().item() > 0.3 and not torch.equal(tie, even)
    for precision in ("tf32", "ieee"):
        a, b = qkv.clone(), qkv.clone()
        a[:, 0], b[:, 0] = tie, even
        ra = attention_forward(a.to(device), cu_t, max_seqlen, fp32_precision=precision)
        rb = attention_forward(b.to(device), cu_t, max_seqlen, fp32_precision=precision)
        for name, x, y in zip(("out", "lse"), ra, rb):
            assert torch.equal(x, y) == (precision == "tf32"), f"{precision}: {name}"


def _assert_rounding_unbiased(name, got, ref):
    """Of the nonzero errors of got against float64's ref, the share that shrinks |got| lies in [0.3, 0.7]: about half
    where an operand is rounded to nearest (unbiased), nearly all where it is truncated (~8 standard deviations
    apart at the ~400 values the tests give)."""
    err = (got.double() - ref) * ref.sign()       # < 0: the kernel's value is smaller in magnitude
    short = (err < 0).sum().item() / max((err != 0).sum().item(), 1)
    assert 0.3 <= short <= 0.7, f"{name}: {short:.2f} of the errors shrink the magnitude"


def test_fp32_tf32_probabilities_rounded_not_truncated(device):
    """P, the left operand of the forward's P @ V dot and of the dV dot P^T @ dO, is rounded to tf32 by the kernels
    (_tf32_rn), which is unbiased; left to the tensor cores' truncation (conftest) every product shrinks. With V = 1
    every output is 1, and with dO = 1 every dV is a column sum of P: rounded, the kernel's results fall below the
    float64 reference about as often as above it (its other errors are random in sign too); truncated, nearly all
    fall below. The accuracy bounds cannot see this (one truncated operand stays within them)."""
    _seed_for("tf32-p-bias")
    lengths, heads, head_dim = [100, 37, 70], 2, 64
    cu_t, max_seqlen = _cu(lengths, device)
    cu = cu_t.tolist()
    qkv = torch.randn(sum(lengths), 3, heads, head_dim)
    qkv[:, 2] = 1.0
    dout = torch.ones(sum(lengths), heads, head_dim)
    out, lse = attention_forward(qkv.to(device), cu_t, max_seqlen, fp32_precision="tf32")
    dqkv = attention_backward(dout.to(device), qkv.to(device), out, lse, cu_t, max_seqlen, fp32_precision="tf32")
    ref_out, ref_grad = _fwd_bwd(lambda x: _reference(x, cu, 1.0 / math.sqrt(head_dim)), qkv.double(), dout)
    for name, got, ref in (("out", out.cpu(), ref_out), ("dV", dqkv[:, 2].cpu(), ref_grad[:, 2])):
        _assert_rounding_unbiased(name, got[..., 0], ref[..., 0])      # all head_dim columns are equal; ref > 0


def test_fp32_tf32_score_gradients_rounded_not_truncated(device):
    """dS, the left operand of the dQ dot dS @ K and of the dK dot dS^T @ Q, is rounded to tf32 by the kernels
    (_tf32_rn), not left to the tensor cores' truncation (conftest), which shrinks every |dS|. dS sums to zero
    along a row, so its truncation biases nothing unless the other operand follows dS's signs; the inputs make it
    do so in one component of K and one of Q, which do not enter the scores (the other operand's component is 0):
    every key is in group A or B (V = v_A or v_B), so sign(dS[i, j]) = g_j * sign(dO_i . (v_A - v_B)); K[j, 0] =
    g_j and Q[i, 1] = sign(dO_i . (v_A - v_B)). Then dQ[i, 0] and dK[j, 1] are +-scale * sum |dS| over a row /
    column: rounded, the kernel's values fall short of the float64 reference's magnitude about as often as they
    exceed it; truncated, nearly always short. All inputs are tf32 values: the truncation of the other operands
    changes nothing. The accuracy bounds cannot see this (a mutation run: either dS truncated passed every other
    test)."""
    _seed_for("tf32-ds-bias")
    lengths, heads, head_dim = [100, 37, 70], 2, 64
    cu_t, max_seqlen = _cu(lengths, device)
    cu, total = cu_t.tolist(), sum(lengths)

    def tf32(x):
        return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)

    qkv = tf32(torch.randn(total, 3, heads, head_dim))
    dout = tf32(torch.randn(total, heads, head_dim))
    group = torch.where(torch.rand(total, heads) < 0.5, 1.0, -1.0)
    v_a, v_b = tf32(torch.randn(heads, head_dim)), tf32(torch.randn(heads, head_dim))
    qkv[:, 2] = torch.where(group[..., None] > 0, v_a, v_b)
    qkv[:, 0, :, 0], qkv[:, 1, :, 0] = 0.0, group
    qkv[:, 1, :, 1], qkv[:, 0, :, 1] = 0.0, torch.sign(torch.einsum("thd,hd->th", dout, v_a - v_b))
    out, lse = attention_forward(qkv.to(device), cu_t, max_seqlen, fp32_precision="tf32")
    dqkv = attention_backward(dout.to(device), qkv.to(device), out, lse, cu_t, max_seqlen, fp32_precision="tf32")
    _, ref_grad = _fwd_bwd(lambda x: _reference(x, cu, 1.0 / math.sqrt(head_dim)), qkv.double(), dout)
    for name, got, ref in (("dQ", dqkv[:, 0, :, 0].cpu(), ref_grad[:, 0, :, 0]),
                           ("dK", dqkv[:, 1, :, 1].cpu(), ref_grad[:, 1, :, 1])):
        assert (ref.abs() > 1e-3).float().mean().item() > 0.9
        _assert_rounding_unbiased(name, got, ref)


def _check_edge_sequences(lengths, heads, head_dim, device):
    """Forward and backward (fp16) over every sequence; the first and the last checked against float64 on their own
    rows with the file's bounds (a sequence's out and dqkv depend on its own rows only)."""
    cu_t, max_seqlen = _cu(lengths, device)
    cu = cu_t.tolist()
    qkv = torch.randn(cu[-1], 3, heads, head_dim, device=device, dtype=torch.float16)
    dout = torch.randn(cu[-1], heads, head_dim, device=device, dtype=torch.float16)
    out, lse = attention_forward(qkv, cu_t, max_seqlen)
    dqkv = attention_backward(dout, qkv, out, lse, cu_t, max_seqlen)
    scale = 1.0 / math.sqrt(head_dim)
    for b in (0, len(lengths) - 1):
        rows = slice(cu[b], cu[b + 1])
        x, dy, one = qkv[rows].cpu(), dout[rows].cpu(), [0, lengths[b]]
        ref_out, ref_grad = _fwd_bwd(lambda t: _reference(t, one, scale), x.double(), dy)
        pt_out, pt_grad = _fwd_bwd(lambda t: _reference(t, one, scale), x, dy)
        _assert_within_bounds(f"sequence {b}: ", torch.float16, head_dim, out[rows].cpu(), dqkv[rows].cpu(),
                              ref_out, ref_grad, pt_out, pt_grad)


def test_edge_sequences(device):
    """The check of test_more_than_2_31_elements_cuda at an ordinary size (so that its logic runs everywhere)."""
    _seed_for("edge-sequences")
    _check_edge_sequences([5, 130, 77], heads=2, head_dim=64, device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (qkv of 2^31 elements: ~12 GB)")
def test_more_than_2_31_elements_cuda():
    """A packed batch whose qkv has more than 2^31 elements (932140 tokens of bert-base's 12 x 64 heads, sequences of
    512 and a last one of 300: what a large embedding batch on an H100 holds). The kernels' token offsets are int64;
    an int32 one wraps and the last sequences read and write far from their own rows."""
    _seed_for("2^31")
    try:
        _check_edge_sequences([512] * 1820 + [300], heads=12, head_dim=64, device=torch.device("cuda"))
    finally:
        torch.cuda.empty_cache()


def test_custom_scale_and_empty_sequences(device):
    """Zero-length sequences in cu_seqlens are allowed and write nothing; softmax_scale is honoured."""
    _seed_for("scale")
    _check_case(device, torch.float16, 32, [0, 5, 0, 70, 0], heads=3, softmax_scale=0.37)


def test_single_token(device):
    _seed_for("one")
    _check_case(device, torch.float32, 128, [1], heads=1)


def test_strided_inputs(device):
    """qkv as a strided view (a wider projection output, padded heads) and a non-contiguous dout."""
    _seed_for("strided")
    heads, head_dim = 2, 64
    cu_t, max_seqlen = _cu([40, 9, 66], device)
    total = int(cu_t[-1])
    big = torch.randn(total, 3, heads, head_dim + 16, device=device, dtype=torch.float32)
    qkv = big[..., :head_dim]
    assert not qkv.is_contiguous()
    out, lse = attention_forward(qkv, cu_t, max_seqlen, fp32_precision="ieee")
    ref_out, _ = attention_forward(qkv.contiguous(), cu_t, max_seqlen, fp32_precision="ieee")
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    dout_big = torch.randn(total, heads, 2 * head_dim, device=device)
    dout = dout_big[..., ::2]
    assert dout.stride(-1) != 1
    dqkv = attention_backward(dout, qkv, out, lse, cu_t, max_seqlen, fp32_precision="ieee")
    ref = attention_backward(dout.contiguous(), qkv.contiguous(), out, lse, cu_t, max_seqlen, fp32_precision="ieee")
    torch.testing.assert_close(dqkv, ref, rtol=0, atol=0)
    # the same with a token stride that is not 3 * heads * head_dim: the packed projection of a larger model
    wide = torch.randn(total, 3 * heads * head_dim + 32, device=device)
    qkv2 = wide[:, :3 * heads * head_dim].view(total, 3, heads, head_dim)
    out2, _ = attention_forward(qkv2, cu_t, max_seqlen, fp32_precision="ieee")
    ref2, _ = attention_forward(qkv2.contiguous(), cu_t, max_seqlen, fp32_precision="ieee")
    torch.testing.assert_close(out2, ref2, rtol=0, atol=0)


def test_backward_lse_view_with_wider_head_stride(device):
    """lse as a view of a wider [heads, T + pad] buffer (the public API takes any lse with a unit token stride): the
    backward's delta is [heads, T] and was read with lse's head stride, so every head after the first got another
    head's delta (and the last read past it)."""
    _seed_for("lse-view")
    cu_t, max_seqlen = _cu([40, 9], device)
    total, heads = int(cu_t[-1]), 2
    qkv = torch.randn(total, 3, heads, 64, device=device)
    out, lse = attention_forward(qkv, cu_t, max_seqlen, fp32_precision="ieee")
    dout = torch.randn_like(out)
    buf = torch.full((heads, total + 7), float("nan"), device=device)
    buf[:, :total] = lse
    ref = attention_backward(dout, qkv, out, lse, cu_t, max_seqlen, fp32_precision="ieee")
    got = attention_backward(dout, qkv, out, buf[:, :total], cu_t, max_seqlen, fp32_precision="ieee")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_seeds_do_not_specialise_kernels():
    """A seed argument is never value-specialised (1, multiples of 16): training must not compile a kernel again
    because a step drew such a seed."""
    import triton

    from bertfast.kernels import gelu, layer_norm
    found = 0
    for mod in (attn, layer_norm, gelu):
        for name in dir(mod):
            fn = getattr(mod, name)
            if not (isinstance(fn, triton.runtime.jit.KernelInterface) and name.endswith("_kernel")):
                continue  # @triton.jit helpers are inlined into the kernels: only launched kernels specialise
            # a JITFunction keeps the list as an attribute; the interpreter's InterpretedFunction in its kwargs
            kept = getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize")
            kept = list(kept or ())
            seeds = [a for a in fn.arg_names if a.startswith("seed")]
            found += len(seeds)
            missing = [a for a in seeds if a not in kept and fn.arg_names.index(a) not in kept]
            assert not missing, f"{mod.__name__}.{name} specialises on {missing}"
    assert found >= 7


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_poisoned_outputs_are_fully_written(device, dtype_name):
    """Outputs pre-filled with NaN: every real row of out / lse / dqkv is written and finite."""
    _seed_for("poison", dtype_name)
    dtype = DTYPES[dtype_name]
    heads, head_dim = 2, 80
    cu_t, max_seqlen = _cu([3, 0, 65, 130, 1], device)
    total = int(cu_t[-1])
    qkv = torch.randn(total, 3, heads, head_dim, device=device, dtype=dtype)
    out = torch.full((total, heads, head_dim), float("nan"), device=device, dtype=dtype)
    lse = torch.full((heads, total), float("nan"), device=device)
    res_out, res_lse = attention_forward(qkv, cu_t, max_seqlen, out=out, lse=lse)
    assert res_out.data_ptr() == out.data_ptr() and res_lse.data_ptr() == lse.data_ptr()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    dqkv = torch.full_like(qkv, float("nan"))
    res = attention_backward(torch.randn_like(out), qkv, out, lse, cu_t, max_seqlen, dqkv=dqkv)
    assert res.data_ptr() == dqkv.data_ptr()
    assert torch.isfinite(dqkv).all()


# ---------------------------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_name,head_dim", [("fp32", 64), ("fp16", 96), ("bf16", 32)])
def test_dropout_forward_backward(device, dtype_name, head_dim):
    _seed_for("dropout", dtype_name, head_dim)
    _check_case(device, DTYPES[dtype_name], head_dim, [1, 17, 64, 129], heads=2, dropout_p=0.17,
                seed=1234 + head_dim, check_lse=True)


def test_dropout_mask_statistics_and_determinism(device):
    cu_t, max_seqlen = _cu([200, 7, 65], device)
    p = 0.3
    mask = dropout_mask(cu_t, max_seqlen, 2, p, seed=42, device=device)
    assert mask.dtype == torch.bool and mask.shape == (3, 2, 200, 200)
    real = torch.zeros_like(mask)
    for b, n in enumerate([200, 7, 65]):
        real[b, :, :n, :n] = True
    assert not mask[~real].any(), "positions past a sequence's end must be False"
    kept = mask[real].float().mean().item()
    assert abs((1 - kept) - p) < 0.01, f"dropped fraction {1 - kept:.4f}, expected {p}"
    # deterministic in the seed, different across seeds and heads
    assert torch.equal(mask, dropout_mask(cu_t, max_seqlen, 2, p, seed=42, device=device))
    other = dropout_mask(cu_t, max_seqlen, 2, p, seed=43, device=device)
    assert (other[real] != mask[real]).float().mean() > 0.3
    assert (mask[0, 0] != mask[0, 1]).float().mean() > 0.3
    # seeds beyond 32 bits use the high word
    hi = dropout_mask(cu_t, max_seqlen, 2, p, seed=42 + (1 << 40), device=device)
    assert (hi[real] != mask[real]).float().mean() > 0.3
    # a cu_seqlens that is not a tensor is named (it used to be an AttributeError on its .device)
    with pytest.raises(UnsupportedInput, match="cu_seqlens must be a 1-D int32 tensor"):
        dropout_mask([0, 200], 200, 2, p, seed=42)


def _philox_keep_reference(lengths, heads, dropout_p, seed):
    """The keep-mask as documented, computed independently in numpy: Philox4x32 (Triton's constants,
    attn.PHILOX_ROUNDS rounds) of counter (key index in the sequence, query token index in the packed T axis, head,
    0) and key (seed's low, high 32-bit word); its first output made a float in [0, 1) as Triton's
    uint_to_uniform_float does; kept where that is >= dropout_p (in fp32). Returns (keep, uniform), padded
    [B, heads, S, S] (positions past a sequence's end: not kept)."""
    import numpy as np
    s_max = max(max(lengths), 1)
    b_i, h_i, q_i, k_i = np.meshgrid(np.arange(len(lengths)), np.arange(heads), np.arange(s_max), np.arange(s_max),
                                     indexing="ij")
    starts = np.cumsum([0] + list(lengths))[:-1]
    c0, c1 = k_i.astype(np.uint32), (starts[b_i] + q_i).astype(np.uint32)
    c2, c3 = h_i.astype(np.uint32), np.zeros_like(c0)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32

    def mulhilo(a, m):
        prod = a.astype(np.uint64) * np.uint64(m)
        return (prod >> np.uint64(32)).astype(np.uint32), (prod & np.uint64(0xFFFFFFFF)).astype(np.uint32)

    for _ in range(attn.PHILOX_ROUNDS):
        hi_b, lo_b = mulhilo(c2, 0xCD9E8D57)
        hi_a, lo_a = mulhilo(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ np.uint32(k0), lo_b, hi_a ^ c3 ^ np.uint32(k1), lo_a
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    x = c0.view(np.int32)
    x = np.where(x < 0, np.invert(x), x)
    u = x.astype(np.float32) * np.float32(4.6566127342e-10)
    real = (q_i < np.asarray(lengths)[b_i]) & (k_i < np.asarray(lengths)[b_i])
    return (u >= np.float32(dropout_p)) & real, np.where(real, u, np.float32(-1.0))


def test_dropout_mask_is_the_documented_philox_draw(device):
    """dropout_mask (hence the kernels, which the dropout tests check against it) against an independent numpy
    Philox of the documented counter: a swap of the key / query counter words, a local instead of global query index
    or a lost head or seed word would keep the statistics and the forward / backward agreement, not this. Then the
    keep test's boundary: with dropout_p equal to one of the drawn uniforms, that element is kept (>=)."""
    lengths, heads = [5, 70, 0, 3], 2
    cu_t, max_seqlen = _cu(lengths, device)
    seed = (0x5EED << 32) | 0x9ABCDEF1                 # both key words, the low one with its top bit set
    keep, u = _philox_keep_reference(lengths, heads, 0.3, seed)
    mask = dropout_mask(cu_t, max_seqlen, heads, 0.3, seed, device).cpu().numpy()
    assert (mask == keep).all(), f"{(mask != keep).sum()} of {mask.size} differ"
    tie = float(u[(u > 0.1) & (u < 0.9)][0])
    keep, u = _philox_keep_reference(lengths, heads, tie, seed)
    assert (u == tie).sum() >= 1
    mask = dropout_mask(cu_t, max_seqlen, heads, tie, seed, device).cpu().numpy()
    assert (mask == keep).all() and mask[u == tie].all()


def test_dropout_changes_output_and_zero_p_is_exact(device):
    _seed_for("dropout-det")
    cu_t, max_seqlen = _cu([33, 70], device)
    qkv = torch.randn(int(cu_t[-1]), 3, 2, 32, device=device)
    plain, _ = attention_forward(qkv, cu_t, max_seqlen, fp32_precision="ieee")
    a, _ = attention_forward(qkv, cu_t, max_seqlen, dropout_p=0.5, seed=7, fp32_precision="ieee")
    b, _ = attention_forward(qkv, cu_t, max_seqlen, dropout_p=0.5, seed=7, fp32_precision="ieee")
    c, _ = attention_forward(qkv, cu_t, max_seqlen, dropout_p=0.5, seed=8, fp32_precision="ieee")
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, plain)


# ---------------------------------------------------------------------------------------------------------------
# bad input: every check raises UnsupportedInput naming the argument
# ---------------------------------------------------------------------------------------------------------------

def _good(device, dtype=torch.float16, head_dim=64):
    cu_t, max_seqlen = _cu([5, 9], device)
    return torch.randn(14, 3, 2, head_dim, device=device).to(dtype), cu_t, max_seqlen


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(UnsupportedInput, match=match):
        fn(*args, **kwargs)


def test_bad_head_dim(device):
    qkv, cu, ms = _good(device, head_dim=48)
    with pytest.raises(UnsupportedInput, match="head_dim") as info:
        attention_forward(qkv, cu, ms)
    assert "32, 64, 80, 96, 128" in str(info.value)
    assert issubclass(UnsupportedInput, ValueError)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_bad_dtype(device, dtype):
    qkv, cu, ms = _good(device)
    _raises("qkv dtype", attention_forward, qkv.to(dtype), cu, ms)


def test_bad_qkv_shape(device):
    qkv, cu, ms = _good(device)
    _raises("qkv must have shape", attention_forward, qkv.reshape(14, 6, 64), cu, ms)
    _raises("qkv must have shape", attention_forward, torch.zeros(14, 2, 2, 64, device=device,
                                                                  dtype=torch.float16), cu, ms)


def test_bad_qkv_last_dim_stride(device):
    big = torch.randn(14, 3, 2, 128, device=device, dtype=torch.float16)
    _, cu, ms = _good(device)
    _raises("qkv's last dim.*contiguous", attention_forward, big[..., ::2], cu, ms)


def test_bad_cu_seqlens_dtype_rank_device(device):
    qkv, cu, ms = _good(device)
    _raises("cu_seqlens must be int32", attention_forward, qkv, cu.long(), ms)
    _raises("cu_seqlens must be 1-D", attention_forward, qkv, cu[None], ms)
    strided = torch.stack([cu, cu], dim=1)[:, 0]
    assert torch.equal(strided, cu) and not strided.is_contiguous()
    _raises("cu_seqlens must be contiguous", attention_forward, qkv, strided, ms)
    _raises("cu_seqlens is on", attention_forward, qkv, torch.zeros(3, dtype=torch.int32, device="meta"), ms)


def test_bad_cu_seqlens_values(device):
    qkv, cu, ms = _good(device)
    dev = qkv.device
    _raises("cu_seqlens must start at 0", attention_forward, qkv,
            torch.tensor([1, 5, 14], dtype=torch.int32, device=dev), ms)
    _raises("cu_seqlens must be monotonic", attention_forward, qkv,
            torch.tensor([0, 10, 5, 14], dtype=torch.int32, device=dev), 14)
    _raises("cu_seqlens must end at T", attention_forward, qkv,
            torch.tensor([0, 5, 13], dtype=torch.int32, device=dev), ms)
    _raises("max_seqlen", attention_forward, qkv, cu, 8)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_bad_dropout_p(device, p):
    qkv, cu, ms = _good(device)
    _raises("dropout_p", attention_forward, qkv, cu, ms, dropout_p=p)
    _raises("dropout_p", attention_backward, qkv[:, 0], qkv, qkv[:, 0], torch.zeros(2, 14, device=qkv.device),
            cu, ms, dropout_p=p)


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 1.0, True])
def test_bad_dropout_seed(device, seed):
    """With dropout the seed is an int in [0, 2**63), as the LayerNorm kernels take it (a float was truncated and
    2**64 + 1 gave seed 1's mask); without dropout it is not read."""
    qkv, cu, ms = _good(device)
    out, lse = attention_forward(qkv, cu, ms)
    _raises("seed", attention_forward, qkv, cu, ms, dropout_p=0.1, seed=seed)
    _raises("seed", attention_backward, out, qkv, out, lse, cu, ms, dropout_p=0.1, seed=seed)
    _raises("seed", dropout_mask, cu, ms, 2, 0.1, seed)
    attention_forward(qkv, cu, ms, seed=seed)


def test_bad_dropout_mask_arguments(device):
    qkv, cu, ms = _good(device)
    _raises("heads", dropout_mask, cu, ms, 0, 0.1, 3)
    _raises("heads", dropout_mask, cu, ms, 2.0, 0.1, 3)
    _raises("max_seqlen", dropout_mask, cu, ms - 1, 2, 0.1, 3)   # shorter than the longest sequence


def test_bad_fp32_precision(device):
    qkv, cu, ms = _good(device, dtype=torch.float32)
    _raises("fp32_precision", attention_forward, qkv, cu, ms, fp32_precision="fp16")
    _raises("fp32_precision", attention_forward, qkv, cu, ms, fp32_precision=None)


@pytest.mark.parametrize("ms", [0, -3, 2.5])
def test_bad_max_seqlen(device, ms):
    qkv, cu, _ = _good(device)
    _raises("max_seqlen", attention_forward, qkv, cu, ms)


def test_bad_backward_arguments(device):
    qkv, cu, ms = _good(device)
    out, lse = attention_forward(qkv, cu, ms)
    _raises("dout", attention_backward, out[:5], qkv, out, lse, cu, ms)
    _raises("dout", attention_backward, out.float(), qkv, out, lse, cu, ms)
    _raises("out", attention_backward, out, qkv, out[:, :1], lse, cu, ms)
    _raises("lse", attention_backward, out, qkv, out, lse.t(), cu, ms)
    _raises("lse", attention_backward, out, qkv, out, lse.half(), cu, ms)
    _raises("dqkv", attention_backward, out, qkv, out, lse, cu, ms, dqkv=torch.empty_like(qkv[:3]))
    _raises("out", attention_forward, qkv, cu, ms, out=torch.empty(14, 2, 64, device=qkv.device))


def test_validate_false_does_no_host_sync(device, monkeypatch):
    """validate=False (and attention_backward) read nothing from the device on the host."""
    qkv, cu, ms = _good(device)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync")

    # the checks' one sync goes through Tensor.tolist; with validate=True this must trip
    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    with pytest.raises(AssertionError, match="host sync"):
        attention_forward(qkv, cu, ms)
    out, lse = attention_forward(qkv, cu, ms, validate=False)
    attention_backward(out, qkv, out, lse, cu, ms)


def test_value_checks_skipped_while_compiling(device, monkeypatch):
    """Under torch.compile the data-dependent cu_seqlens checks are skipped (they would sync); cheap checks stay."""
    qkv, _, ms = _good(device)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    short = torch.tensor([0, 5, 13], dtype=torch.int32, device=qkv.device)   # ends before T: not checked now
    out, _ = attention_forward(qkv, short, ms)
    assert out.shape == (14, 2, 64)
    _raises("dropout_p", attention_forward, qkv, short, ms, dropout_p=2.0)


# ---------------------------------------------------------------------------------------------------------------
# launch policy / AOT specs
# ---------------------------------------------------------------------------------------------------------------

def test_aot_specs_cover_launch_rule():
    specs = aot_specs()
    assert specs
    by_kernel = {}
    for s in specs:
        names = set(s.fn.arg_names)
        assert set(s.signature) == names, (s.kernel, names ^ set(s.signature))
        assert all(s.signature[k] == "constexpr" for k in s.constexprs)
        assert s.archs and set(s.archs) <= {80, 90}
        by_kernel.setdefault(s.kernel, []).append(s)
    assert set(by_kernel) == {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                              "_attn_bwd_dq_kernel", "_dropout_mask_kernel"}
    configs = {(s.kernel, s.config, a) for s in specs for a in s.archs}
    assert len(configs) == sum(len(s.archs) for s in specs), "duplicate (kernel, config, arch)"
    # every configuration the launchers can pick is listed, with its tile sizes, warps and stages
    for dtype in DTYPES.values():
        ty = "*" + attn.torch_to_triton_dtype(dtype)
        for head_dim in SUPPORTED_HEAD_DIMS:
            for arch in (80, 90):
                for dropout in (False, True):
                    for prec in (("tf32", "ieee") if dtype == torch.float32 else ("tf32",)):
                        for kernel, rule in (("_attn_fwd_kernel", attn._fwd_config),
                                             ("_attn_bwd_dkdv_kernel", attn._dkdv_config),
                                             ("_attn_bwd_dq_kernel", attn._dq_config)):
                            cfg = rule(head_dim, dtype, arch, dropout, prec)
                            match = [s for s in by_kernel[kernel]
                                     if arch in s.archs and s.signature["qkv_ptr"] == ty
                                     and s.constexprs["HEAD_DIM"] == head_dim and s.constexprs["DROPOUT"] == dropout
                                     and s.constexprs["PRECISION"] == prec
                                     and s.constexprs["BLOCK_M"] == cfg["BLOCK_M"]
                                     and s.constexprs["BLOCK_N"] == cfg["BLOCK_N"]
                                     and s.num_warps == cfg["num_warps"] and s.num_stages == cfg["num_stages"]]
                            assert len(match) == 1, (kernel, dtype, head_dim, arch, dropout, prec)
                            assert match[0].tensor_cores == (dtype != torch.float32 or prec == "tf32")
