"""Fused variable-length attention (FlashAttention-2 style) over packed sequences, forward and backward.

Layout (T = number of real tokens, B sequences, cu_seqlens int32 [B+1]):
    qkv  [T, 3, heads, head_dim]  the packed QKV projection output; q, k, v are read from it by strides
    out  [T, heads, head_dim]     same dtype as qkv
    lse  [heads, T] float32       natural-log logsumexp of the scaled scores of each query row
    dqkv [T, 3, heads, head_dim]  same dtype as qkv

Each program owns one tile of BLOCK_M queries of one (sequence, head) and streams that sequence's keys/values in
BLOCK_N tiles with an online softmax kept in fp32 (base 2: the scale is pre-multiplied by log2(e)). Nothing is
padded or transposed in memory; tiles past the end of a sequence are masked and programs whose tile starts past
the end of their sequence return at once. The attention is bidirectional (BERT): no causal mask.

Dropout (on the probabilities, as in BERT): the keep decision for (head, query token, key token) is a pure
function of the seed and those three indices (Philox 4x32 with counter (key token, query token, head, 0)), so the
backward kernels and ``dropout_mask`` regenerate exactly the mask the forward used, with nothing stored.

Backward: a preprocess kernel computes delta = rowsum(dO * O); one kernel accumulates dK, dV for a tile of keys
over all query tiles of the sequence, another accumulates dQ for a tile of queries over all key tiles. Neither
needs atomics, every accumulation is fp32, and each writes its slots of dqkv directly.

The launch rule (block sizes / warps / stages per head dim, dtype, fp32 precision, dropout and GPU generation) is
the tables _FWD_RULE / _DKDV_RULE / _DQ_RULE below; ``aot_specs()`` enumerates every configuration they can return
so the ahead-of-time compile report covers exactly what can run.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .config import KernelSpec, UnsupportedInput, cdiv, dropout_seed, launch_arch, next_pow2, torch_to_triton_dtype
from .launch import Launcher

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP32_PRECISIONS = ("tf32", "ieee")
# Philox rounds for the dropout mask: 4x32-7 passes BigCrush (Salmon et al. 2011); 10 is the conservative default
# of curand, 7 saves ~30% of the RNG cost inside the attention loop.
PHILOX_ROUNDS = 7
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Grid axes 1 and 2 (heads, sequences) are limited to 65535 by CUDA.
MAX_GRID_YZ = 65535


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _tf32_rn(x, PRECISION: tl.constexpr):
    """x rounded to tf32 (nearest, ties to even) for a "tf32" dot on fp32 operands; anything else unchanged.
    The tensor cores truncate fp32 operands to tf32 (twice the error of rounding to nearest): one operand of
    each dot goes through this (once where loaded when it is held across the key / query loop). For the score
    dots that operand is Q in all three kernels (K is left to the hardware), so the backward kernels recompute
    the forward's scores from the same operands and P matches the forward's lse. (The dK / dV kernel, whose
    score tile is transposed, rounded its left operand K: its P missed the lse, dV 2.4x over the tests' bound at
    logits of std 9, NOTES change 37. Rounding K too in every kernel spilled on sm_90. tests/conftest.py imitates
    the truncation in the interpreter.)"""
    if PRECISION == "tf32":
        if x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
            x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _dropout_keep(seed_lo, seed_hi, head, q_tok, start_n, dropout_p, BLOCK_N: tl.constexpr,
                  N_ROUNDS: tl.constexpr):
    """Keep-mask [BLOCK_M, BLOCK_N] (True = kept) of the query tokens q_tok ([BLOCK_M] int32 indices into the
    packed T axis) against the keys start_n .. start_n + BLOCK_N - 1 (indices local to the sequence) of one head.

    Key k of query token q is kept when the first output of Philox4x32(counter = (k, q, head, 0), key = seed),
    as a uniform float in [0, 1), is >= dropout_p. q is a global token index, so the counter is unique per
    (head, query token, key token) across sequences, and no counter word can overflow.
    (Using all four Philox outputs for four keys was tried: the join/reshape it needs costs more registers than
    it saves.)"""
    c0 = (start_n + tl.arange(0, BLOCK_N)).to(tl.uint32)[None, :]
    c1 = q_tok.to(tl.uint32, bitcast=True)[:, None]
    zero = c0 * 0 + c1 * 0                                           # [BLOCK_M, BLOCK_N]
    r, _, _, _ = tl.philox_impl(zero + c0, zero + c1, zero + head.to(tl.uint32, bitcast=True), zero,
                                seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True),
                                N_ROUNDS)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_t, lo, hi, seqlen, q_tok, head,
               qk_scale, dropout_p, seed_lo, seed_hi,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
               DROPOUT: tl.constexpr, PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr):
    """Key/value tiles [lo, hi) of one sequence against the query tile q [BLOCK_M, BLOCK_D]; MASK_N masks keys past
    seqlen (only the last, partial tile needs it)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        if DROPOUT:
            # the RNG first, while the fewest tiles are live (its 4-word state per element is the register peak)
            keep = _dropout_keep(seed_lo, seed_hi, head, q_tok, start_n, dropout_p, BLOCK_N, N_ROUNDS)
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * stride_t + offs_d[:, None]   # [BLOCK_D, BLOCK_N]
        v_ptrs = v_base + cols[:, None] * stride_t + offs_d[None, :]    # [BLOCK_N, BLOCK_D]
        if MASK_N:
            if BLOCK_D == HEAD_DIM:
                kt = tl.load(kt_ptrs, mask=cols[None, :] < seqlen, other=0.0)
                v = tl.load(v_ptrs, mask=cols[:, None] < seqlen, other=0.0)
            else:
                kt = tl.load(kt_ptrs, mask=(cols[None, :] < seqlen) & (offs_d[:, None] < HEAD_DIM), other=0.0)
                v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale                # [BLOCK_M, BLOCK_N] fp32, log2 units
        if MASK_N:
            s = tl.where(cols[None, :] < seqlen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(keep, p, 0.0)
        acc = tl.dot(_tf32_rn(p.to(v.dtype), PRECISION), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _attn_fwd_kernel(
    qkv_ptr,         # [T, 3, heads, HEAD_DIM], last dim contiguous
    out_ptr,         # [T, heads, HEAD_DIM], last dim contiguous
    lse_ptr,         # [heads, T] fp32
    cu_seqlens_ptr,  # [B + 1] int32
    stride_qkv_t, stride_qkv_3, stride_qkv_h,
    stride_out_t, stride_out_h,
    stride_lse_h,
    qk_scale,        # softmax_scale * log2(e)
    dropout_p, seed_lo, seed_hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    # grid: (cdiv(max_seqlen, BLOCK_M), heads, B)
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seqlen

    q_base = qkv_ptr + seq_start.to(tl.int64) * stride_qkv_t + head * stride_qkv_h
    k_base = q_base + stride_qkv_3
    v_base = q_base + 2 * stride_qkv_3
    q_ptrs = q_base + offs_m[:, None] * stride_qkv_t + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_ptrs, mask=m_mask[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=m_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    q = _tf32_rn(q, PRECISION)  # once: the inner loop's dots take it as it is

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    q_tok = seq_start + offs_m
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_qkv_t, 0, n_full, seqlen, q_tok, head,
                               qk_scale, dropout_p, seed_lo, seed_hi,
                               HEAD_DIM, BLOCK_D, BLOCK_N, False, DROPOUT, PRECISION, N_ROUNDS)
    if n_full < seqlen:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_qkv_t, n_full, seqlen, seqlen, q_tok,
                                   head, qk_scale, dropout_p, seed_lo, seed_hi,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, True, DROPOUT, PRECISION, N_ROUNDS)

    inv_l = 1.0 / l_i
    if DROPOUT:
        inv_l = inv_l * (1.0 / (1.0 - dropout_p))
    out = acc * inv_l[:, None]
    out_ptrs = (out_ptr + seq_start.to(tl.int64) * stride_out_t + head * stride_out_h
                + offs_m[:, None] * stride_out_t + offs_d[None, :])
    if BLOCK_D == HEAD_DIM:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + head.to(tl.int64) * stride_lse_h + seq_start + offs_m, lse, mask=m_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(
    out_ptr,    # [T, heads, HEAD_DIM]
    dout_ptr,   # [T, heads, HEAD_DIM]
    delta_ptr,  # [heads, T] fp32
    n_tokens,
    stride_out_t, stride_out_h, stride_dout_t, stride_dout_h, stride_delta_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # grid: (cdiv(T, BLOCK_T), heads); delta = rowsum(dO * O) in fp32
    start = tl.program_id(0) * BLOCK_T
    head = tl.program_id(1)
    rows = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = ((start + rows)[:, None] < n_tokens) & (offs_d[None, :] < HEAD_DIM)
    o_base = out_ptr + start.to(tl.int64) * stride_out_t + head * stride_out_h
    do_base = dout_ptr + start.to(tl.int64) * stride_dout_t + head * stride_dout_h
    o = tl.load(o_base + rows[:, None] * stride_out_t + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dout_t + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + head.to(tl.int64) * stride_delta_h + start + rows, delta, mask=start + rows < n_tokens)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_t, stride_do_t, lo, hi, seqlen,
                    start_n, q_tok0, head, qk_scale, dropout_p, seed_lo, seed_hi,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK_M: tl.constexpr,
                    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr):
    """Query tiles [lo, hi) of one sequence against the key tile (k, v) [BLOCK_N, BLOCK_D]; works on the
    transposed score tile sT [BLOCK_N, BLOCK_M] so that dV += pT @ dO and dK += dsT @ Q need no transposes of
    the accumulators."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        if DROPOUT:
            keep = tl.trans(_dropout_keep(seed_lo, seed_hi, head, q_tok0 + rows, start_n, dropout_p, BLOCK_N,
                                          N_ROUNDS))
        qt_ptrs = q_base + rows[None, :] * stride_t + offs_d[:, None]       # [BLOCK_D, BLOCK_M]
        do_ptrs = do_base + rows[:, None] * stride_do_t + offs_d[None, :]   # [BLOCK_M, BLOCK_D]
        if MASK_M:
            row_ok = rows < seqlen
            if BLOCK_D == HEAD_DIM:
                qt = tl.load(qt_ptrs, mask=row_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                qt = tl.load(qt_ptrs, mask=row_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
                do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                qt = tl.load(qt_ptrs)
                do = tl.load(do_ptrs)
            else:
                qt = tl.load(qt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        qt = _tf32_rn(qt, PRECISION)   # Q rounded, K left to the hardware: the forward's scores (see _tf32_rn)
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale                    # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(st - (lse * 1.4426950408889634)[None, :])
        if MASK_M:
            pt = tl.where(row_ok[None, :], pt, 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)                     # [BLOCK_N, BLOCK_M]
        if DROPOUT:
            drop_scale = 1.0 / (1.0 - dropout_p)
            pdt = tl.where(keep, pt * drop_scale, 0.0)
            dpt = tl.where(keep, dpt * drop_scale, 0.0)
        else:
            pdt = pt
        dv = tl.dot(_tf32_rn(pdt.to(do.dtype), PRECISION), do, dv, input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(_tf32_rn(dst.to(qt.dtype), PRECISION), tl.trans(qt), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _attn_bwd_dkdv_kernel(
    qkv_ptr,         # [T, 3, heads, HEAD_DIM]
    dout_ptr,        # [T, heads, HEAD_DIM]
    lse_ptr,         # [heads, T] fp32
    delta_ptr,       # [heads, T] fp32
    dqkv_ptr,        # [T, 3, heads, HEAD_DIM]; writes slots 1 (dK) and 2 (dV)
    cu_seqlens_ptr,  # [B + 1] int32
    stride_qkv_t, stride_qkv_3, stride_qkv_h,
    stride_dout_t, stride_dout_h,
    stride_lse_h,
    stride_dqkv_t, stride_dqkv_3, stride_dqkv_h,
    softmax_scale, qk_scale,
    dropout_p, seed_lo, seed_hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    # grid: (cdiv(max_seqlen, BLOCK_N), heads, B)
    pid_n = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < seqlen
    if BLOCK_D == HEAD_DIM:
        kv_mask = n_mask[:, None]
    else:
        kv_mask = n_mask[:, None] & (offs_d[None, :] < HEAD_DIM)

    q_base = qkv_ptr + seq_start.to(tl.int64) * stride_qkv_t + head * stride_qkv_h
    kv_offs = offs_n[:, None] * stride_qkv_t + offs_d[None, :]
    k = tl.load(q_base + stride_qkv_3 + kv_offs, mask=kv_mask, other=0.0)   # not rounded: see _tf32_rn
    v = _tf32_rn(tl.load(q_base + 2 * stride_qkv_3 + kv_offs, mask=kv_mask, other=0.0), PRECISION)
    do_base = dout_ptr + seq_start.to(tl.int64) * stride_dout_t + head * stride_dout_h
    lse_base = lse_ptr + head.to(tl.int64) * stride_lse_h + seq_start
    delta_base = delta_ptr + head.to(tl.int64) * stride_lse_h + seq_start

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = (seqlen // BLOCK_M) * BLOCK_M
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qkv_t, stride_dout_t,
                             0, m_full, seqlen, start_n, seq_start, head, qk_scale, dropout_p, seed_lo, seed_hi,
                             HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, DROPOUT, PRECISION, N_ROUNDS)
    if m_full < seqlen:
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qkv_t, stride_dout_t,
                                 m_full, seqlen, seqlen, start_n, seq_start, head, qk_scale, dropout_p, seed_lo,
                                 seed_hi, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, DROPOUT, PRECISION, N_ROUNDS)
    dk = dk * softmax_scale
    d_base = dqkv_ptr + seq_start.to(tl.int64) * stride_dqkv_t + head * stride_dqkv_h
    d_offs = offs_n[:, None] * stride_dqkv_t + offs_d[None, :]
    tl.store(d_base + stride_dqkv_3 + d_offs, dk.to(dqkv_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(d_base + 2 * stride_dqkv_3 + d_offs, dv.to(dqkv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_t, lo, hi, seqlen, q_tok, head,
                  qk_scale, dropout_p, seed_lo, seed_hi,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
                  DROPOUT: tl.constexpr, PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr):
    """Key/value tiles [lo, hi) of one sequence against the query tile q, dO [BLOCK_M, BLOCK_D]."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        if DROPOUT:
            keep = _dropout_keep(seed_lo, seed_hi, head, q_tok, start_n, dropout_p, BLOCK_N, N_ROUNDS)
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * stride_t + offs_d[:, None]    # [BLOCK_D, BLOCK_N]
        vt_ptrs = v_base + cols[None, :] * stride_t + offs_d[:, None]    # [BLOCK_D, BLOCK_N]
        if MASK_N:
            if BLOCK_D == HEAD_DIM:
                kt = tl.load(kt_ptrs, mask=cols[None, :] < seqlen, other=0.0)
                vt = tl.load(vt_ptrs, mask=cols[None, :] < seqlen, other=0.0)
            else:
                kt = tl.load(kt_ptrs, mask=(cols[None, :] < seqlen) & (offs_d[:, None] < HEAD_DIM), other=0.0)
                vt = tl.load(vt_ptrs, mask=(cols[None, :] < seqlen) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                kt = tl.load(kt_ptrs)
                vt = tl.load(vt_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                vt = tl.load(vt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale                    # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(s - lse[:, None])
        if MASK_N:
            p = tl.where(cols[None, :] < seqlen, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)                               # [BLOCK_M, BLOCK_N]
        if DROPOUT:
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_tf32_rn(ds.to(kt.dtype), PRECISION), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _attn_bwd_dq_kernel(
    qkv_ptr,         # [T, 3, heads, HEAD_DIM]
    dout_ptr,        # [T, heads, HEAD_DIM]
    lse_ptr,         # [heads, T] fp32
    delta_ptr,       # [heads, T] fp32
    dqkv_ptr,        # [T, 3, heads, HEAD_DIM]; writes slot 0 (dQ)
    cu_seqlens_ptr,  # [B + 1] int32
    stride_qkv_t, stride_qkv_3, stride_qkv_h,
    stride_dout_t, stride_dout_h,
    stride_lse_h,
    stride_dqkv_t, stride_dqkv_h,
    softmax_scale, qk_scale,
    dropout_p, seed_lo, seed_hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    # grid: (cdiv(max_seqlen, BLOCK_M), heads, B)
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seqlen
    if BLOCK_D == HEAD_DIM:
        row_mask = m_mask[:, None]
    else:
        row_mask = m_mask[:, None] & (offs_d[None, :] < HEAD_DIM)

    q_base = qkv_ptr + seq_start.to(tl.int64) * stride_qkv_t + head * stride_qkv_h
    q = _tf32_rn(tl.load(q_base + offs_m[:, None] * stride_qkv_t + offs_d[None, :], mask=row_mask, other=0.0),
                 PRECISION)
    do_base = dout_ptr + seq_start.to(tl.int64) * stride_dout_t + head * stride_dout_h
    do = _tf32_rn(tl.load(do_base + offs_m[:, None] * stride_dout_t + offs_d[None, :], mask=row_mask, other=0.0),
                  PRECISION)
    lse_offs = head.to(tl.int64) * stride_lse_h + seq_start + offs_m
    lse = tl.load(lse_ptr + lse_offs, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + lse_offs, mask=m_mask, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q_tok = seq_start + offs_m
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    k_base = q_base + stride_qkv_3
    v_base = q_base + 2 * stride_qkv_3
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_qkv_t, 0, n_full, seqlen, q_tok, head,
                       qk_scale, dropout_p, seed_lo, seed_hi,
                       HEAD_DIM, BLOCK_D, BLOCK_N, False, DROPOUT, PRECISION, N_ROUNDS)
    if n_full < seqlen:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_qkv_t, n_full, seqlen, seqlen, q_tok,
                           head, qk_scale, dropout_p, seed_lo, seed_hi,
                           HEAD_DIM, BLOCK_D, BLOCK_N, True, DROPOUT, PRECISION, N_ROUNDS)
    dq = dq * softmax_scale
    dq_ptrs = (dqkv_ptr + seq_start.to(tl.int64) * stride_dqkv_t + head * stride_dqkv_h
               + offs_m[:, None] * stride_dqkv_t + offs_d[None, :])
    tl.store(dq_ptrs, dq.to(dqkv_ptr.dtype.element_ty), mask=row_mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _dropout_mask_kernel(
    mask_ptr,        # [B, heads, max_seqlen, max_seqlen] uint8 (1 = kept), contiguous
    cu_seqlens_ptr,  # [B + 1] int32
    max_seqlen,
    dropout_p, seed_lo, seed_hi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    # grid: (cdiv(max_seqlen, BLOCK_M), heads, B); positions past a sequence's end are written 0
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    heads = tl.num_programs(1)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = mask_ptr + ((seq * heads + head).to(tl.int64) * max_seqlen) * max_seqlen
    for start_n in range(0, max_seqlen, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed_lo, seed_hi, head, seq_start + offs_m, start_n, dropout_p, BLOCK_N, N_ROUNDS)
        real = (offs_m[:, None] < seqlen) & (offs_n[None, :] < seqlen)
        inside = (offs_m[:, None] < max_seqlen) & (offs_n[None, :] < max_seqlen)
        tl.store(base + offs_m[:, None] * max_seqlen + offs_n[None, :], (keep & real).to(tl.uint8), mask=inside)


# ----------------------------------------------------------------------------------------------------------------
# Launch rule
# ----------------------------------------------------------------------------------------------------------------

# each kernel's launches skip JITFunction.run's per-call specialisation on a hit (kernels/launch.py)
_attn_fwd_launch = Launcher(_attn_fwd_kernel)
_attn_bwd_preprocess_launch = Launcher(_attn_bwd_preprocess_kernel)
_attn_bwd_dkdv_launch = Launcher(_attn_bwd_dkdv_kernel)
_attn_bwd_dq_launch = Launcher(_attn_bwd_dq_kernel)
_dropout_mask_launch = Launcher(_dropout_mask_kernel)


def _block_d(head_dim: int) -> int:
    return next_pow2(head_dim)


# The launch rule. Keys: (input kind: "16" = fp16/bf16, "tf32" / "ieee" = fp32 with that dot precision;
# head-dim block 64 (head dims 32, 64) or 128 (80, 96, 128); GPU generation: 80 = sm_8x, 90 = sm_90 and newer;
# dropout on). Every entry was compiled ahead of time for its architecture with Triton 3.6 (see aot_specs() and
# the compile report): no register spills, shared memory within the limit, in the variant launches compile
# (pointers and qkv / out strides divisible by 16: report.divisible_args). Eleven entries were cut on 2026-11-26
# when the report first compiled the launch variant (which spilled 8 B to 1.5 KB a thread there); the new ones
# were also checked by hand in the unspecialised variant. From the compiler's registers alone, not timed on a GPU
# (NOTES change 26). Dropout's Philox state (4 words per
# score element) raises the register peak, hence its own entries; fp32 "ieee" dots run on FMA units with
# operands held in registers, hence its small tiles.
# Each value: (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward and dQ: BLOCK_M query rows held, BLOCK_N keys
# streamed; dK/dV: BLOCK_N keys held, BLOCK_M query rows streamed.
_FWD_RULE = {
    ("16", 64, 80, False): (128, 64, 4, 1),
    ("16", 64, 90, False): (128, 64, 4, 3),
    ("16", 64, 80, True): (128, 64, 8, 2),
    ("16", 64, 90, True): (128, 64, 8, 2),
    ("16", 128, 80, False): (128, 32, 8, 2),
    ("16", 128, 90, False): (128, 64, 8, 2),
    ("16", 128, 80, True): (128, 32, 8, 2),
    ("16", 128, 90, True): (128, 32, 8, 2),
    ("tf32", 64, 80, False): (64, 32, 4, 2),
    ("tf32", 64, 90, False): (64, 32, 4, 2),
    ("tf32", 64, 80, True): (64, 32, 4, 2),
    ("tf32", 64, 90, True): (64, 32, 4, 2),
    ("tf32", 128, 80, False): (64, 16, 8, 1),
    ("tf32", 128, 90, False): (64, 64, 8, 2),
    ("tf32", 128, 80, True): (64, 32, 8, 2),
    ("tf32", 128, 90, True): (64, 64, 8, 2),
    ("ieee", 64, 80, False): (32, 32, 4, 2),
    ("ieee", 64, 90, False): (32, 32, 8, 2),
    ("ieee", 64, 80, True): (32, 32, 8, 2),
    ("ieee", 64, 90, True): (32, 16, 4, 2),
    ("ieee", 128, 80, False): (16, 32, 4, 2),
    ("ieee", 128, 90, False): (16, 32, 8, 2),
    ("ieee", 128, 80, True): (16, 32, 4, 2),
    ("ieee", 128, 90, True): (16, 32, 8, 2),
}
_DKDV_RULE = {
    ("16", 64, 80, False): (32, 128, 8, 2),
    ("16", 64, 90, False): (32, 128, 8, 2),
    ("16", 64, 80, True): (32, 128, 8, 2),
    ("16", 64, 90, True): (32, 128, 8, 2),
    ("16", 128, 80, False): (16, 64, 8, 2),
    ("16", 128, 90, False): (16, 64, 8, 2),
    ("16", 128, 80, True): (16, 64, 8, 2),
    ("16", 128, 90, True): (16, 64, 8, 2),
    ("tf32", 64, 80, False): (16, 64, 4, 2),
    ("tf32", 64, 90, False): (16, 64, 4, 2),
    ("tf32", 64, 80, True): (16, 64, 4, 2),
    ("tf32", 64, 90, True): (16, 64, 4, 2),
    ("tf32", 128, 80, False): (32, 64, 8, 2),
    ("tf32", 128, 90, False): (16, 32, 8, 2),
    ("tf32", 128, 80, True): (32, 32, 8, 2),   # (32, 64, 8, 2) spilled 8 B once Q was rounded (change 37)
    ("tf32", 128, 90, True): (16, 32, 8, 2),
    ("ieee", 64, 80, False): (16, 32, 4, 2),
    ("ieee", 64, 90, False): (16, 32, 4, 1),
    ("ieee", 64, 80, True): (16, 32, 4, 2),
    ("ieee", 64, 90, True): (16, 32, 4, 2),
    ("ieee", 128, 80, False): (16, 32, 4, 2),
    ("ieee", 128, 90, False): (16, 32, 8, 2),
    ("ieee", 128, 80, True): (16, 32, 8, 2),
    ("ieee", 128, 90, True): (16, 32, 8, 2),
}
_DQ_RULE = {
    ("16", 64, 80, False): (128, 32, 8, 2),
    ("16", 64, 90, False): (128, 32, 8, 2),
    ("16", 64, 80, True): (128, 16, 8, 2),
    ("16", 64, 90, True): (128, 16, 8, 2),
    ("16", 128, 80, False): (64, 32, 8, 2),
    ("16", 128, 90, False): (128, 32, 8, 2),
    ("16", 128, 80, True): (16, 32, 4, 2),
    ("16", 128, 90, True): (128, 16, 8, 2),
    ("tf32", 64, 80, False): (64, 16, 4, 2),
    ("tf32", 64, 90, False): (64, 16, 4, 2),
    ("tf32", 64, 80, True): (64, 16, 4, 2),
    ("tf32", 64, 90, True): (64, 16, 4, 2),
    ("tf32", 128, 80, False): (64, 32, 8, 2),
    ("tf32", 128, 90, False): (64, 32, 8, 2),
    ("tf32", 128, 80, True): (64, 32, 8, 2),
    ("tf32", 128, 90, True): (32, 32, 4, 2),
    ("ieee", 64, 80, False): (64, 32, 8, 2),
    ("ieee", 64, 90, False): (64, 32, 8, 2),
    ("ieee", 64, 80, True): (64, 32, 8, 2),
    ("ieee", 64, 90, True): (64, 16, 8, 2),
    ("ieee", 128, 80, False): (64, 16, 8, 2),
    ("ieee", 128, 90, False): (64, 32, 8, 2),
    ("ieee", 128, 80, True): (64, 32, 8, 2),
    ("ieee", 128, 90, True): (64, 32, 8, 2),
}


def _rule_key(head_dim: int, dtype: torch.dtype, arch: int, dropout: bool, fp32_precision: str = "tf32"):
    kind = fp32_precision if dtype == torch.float32 else "16"
    return kind, 64 if _block_d(head_dim) <= 64 else 128, 90 if arch >= 90 else 80, bool(dropout)


def _cfg(rule, key) -> dict:
    bm, bn, w, st = rule[key]
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)


def _fwd_config(head_dim, dtype, arch, dropout, fp32_precision="tf32") -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of the forward kernel (see _FWD_RULE)."""
    return _cfg(_FWD_RULE, _rule_key(head_dim, dtype, arch, dropout, fp32_precision))


def _dkdv_config(head_dim, dtype, arch, dropout, fp32_precision="tf32") -> dict:
    return _cfg(_DKDV_RULE, _rule_key(head_dim, dtype, arch, dropout, fp32_precision))


def _dq_config(head_dim, dtype, arch, dropout, fp32_precision="tf32") -> dict:
    return _cfg(_DQ_RULE, _rule_key(head_dim, dtype, arch, dropout, fp32_precision))




def _pre_block_t(dtype: torch.dtype) -> int:
    """Rows per program of the backward preprocess (delta) kernel, 4 warps: the AOT compile found spills at 64 rows
    for fp32 on sm_90 and (oddly, at 80 registers) at 32 rows for fp16 with head dim 80 on sm_80."""
    return 32 if dtype == torch.float32 else 64


_MASK_BLOCK = 64


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------

def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_common(qkv, cu_seqlens, max_seqlen, dropout_p, fp32_precision):
    if not isinstance(qkv, torch.Tensor):
        raise UnsupportedInput(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise UnsupportedInput(f"qkv must have shape [T, 3, heads, head_dim], got {tuple(qkv.shape)}")
    if qkv.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedInput(f"qkv dtype must be float16, bfloat16 or float32, got {qkv.dtype}")
    if qkv.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise UnsupportedInput(f"qkv head_dim (last dim) {qkv.shape[3]} is not supported; supported head dims: "
                               f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
    if qkv.stride(3) != 1:
        raise UnsupportedInput(f"qkv's last dim (head_dim) must be contiguous (stride 1), got strides {qkv.stride()}")
    if qkv.shape[2] < 1:
        raise UnsupportedInput(f"qkv must have at least one head, got shape {tuple(qkv.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise UnsupportedInput(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise UnsupportedInput(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise UnsupportedInput(f"cu_seqlens must be 1-D with B + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if not cu_seqlens.is_contiguous():
        raise UnsupportedInput(f"cu_seqlens must be contiguous, got stride {cu_seqlens.stride()}")
    if cu_seqlens.device != qkv.device:
        raise UnsupportedInput(f"cu_seqlens is on {cu_seqlens.device} but qkv is on {qkv.device}")
    if cu_seqlens.shape[0] - 1 > MAX_GRID_YZ:
        raise UnsupportedInput(f"cu_seqlens holds {cu_seqlens.shape[0] - 1} sequences; at most {MAX_GRID_YZ} "
                               f"are supported per call")
    if qkv.shape[2] > MAX_GRID_YZ:
        raise UnsupportedInput(f"qkv has {qkv.shape[2]} heads; at most {MAX_GRID_YZ} are supported")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise UnsupportedInput(f"max_seqlen must be a python int >= 1, got {max_seqlen!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise UnsupportedInput(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if fp32_precision not in FP32_PRECISIONS:
        raise UnsupportedInput(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")


def _check_cu_seqlens_values(cu_seqlens, n_tokens: int, max_seqlen: int):
    """Data-dependent checks (one host sync); skipped while compiling or capturing a CUDA graph."""
    from bertfast.padding import check_cu_seqlens
    check_cu_seqlens(cu_seqlens, n_tokens, max_seqlen, error=UnsupportedInput)


def _check_buffer(name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise UnsupportedInput(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise UnsupportedInput(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise UnsupportedInput(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise UnsupportedInput(f"{name} is on {t.device} but qkv is on {device}")
    if t.stride(-1) != 1:
        raise UnsupportedInput(f"{name}'s last dim must be contiguous (stride 1), got strides {t.stride()}")


def _seed_halves(seed: int, dropout_p: float) -> tuple[int, int]:
    """The seed (checked by dropout_seed) as two signed int32: the Philox key words."""
    seed = dropout_seed(seed, dropout_p)
    lo, hi = seed & 0xFFFFFFFF, seed >> 32
    return (lo - (1 << 32) if lo >= 1 << 31 else lo), (hi - (1 << 32) if hi >= 1 << 31 else hi)


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------

def attention_forward(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      softmax_scale: float | None = None, dropout_p: float = 0.0, seed: int = 0,
                      fp32_precision: str = "tf32", validate: bool = True,
                      out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length bidirectional attention over packed sequences.

    qkv: (T, 3, heads, head_dim), float16 / bfloat16 / float32, last dim contiguous (any other strides);
      head_dim in 32, 64, 80, 96, 128.
    cu_seqlens: (B + 1,), dtype torch.int32, on qkv's device; sequence b is tokens cu_seqlens[b]:cu_seqlens[b+1].
    max_seqlen: python int >= the longest sequence (sizes the grid; never read from the device).
    softmax_scale: defaults to 1 / sqrt(head_dim).
    dropout_p, seed: dropout on the attention probabilities (kept ones scaled by 1 / (1 - p)); the mask is a pure
      function of (seed, head, query token, key token), see ``dropout_mask``.
    fp32_precision: "tf32" or "ieee", the tl.dot input precision for float32 inputs (ignored for 16-bit inputs).
    validate: also check cu_seqlens' values (one host sync; skipped while compiling / capturing).
    out, lse: optional output buffers of shape (T, heads, head_dim) in qkv.dtype and (heads, T) float32.

    Returns (out (T, heads, head_dim) in qkv.dtype, lse (heads, T) float32, natural-log logsumexp of the scaled
    scores of each query row).
    """
    _check_common(qkv, cu_seqlens, max_seqlen, dropout_p, fp32_precision)
    n_tokens, _, heads, head_dim = qkv.shape
    if validate:
        _check_cu_seqlens_values(cu_seqlens, n_tokens, max_seqlen)
    if out is None:
        out = torch.empty((n_tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    else:
        _check_buffer("out", out, (n_tokens, heads, head_dim), qkv.dtype, qkv.device)
    if lse is None:
        lse = torch.empty((heads, n_tokens), dtype=torch.float32, device=qkv.device)
    else:
        _check_buffer("lse", lse, (heads, n_tokens), torch.float32, qkv.device)
    if n_tokens == 0:
        return out, lse
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    cfg = _fwd_config(head_dim, qkv.dtype, launch_arch(qkv.device), dropout_p > 0.0, fp32_precision)
    batch = cu_seqlens.shape[0] - 1
    seed_lo, seed_hi = _seed_halves(seed, dropout_p)
    grid = (cdiv(max_seqlen, cfg["BLOCK_M"]), heads, batch)
    with _device_ctx(qkv.device):
        _attn_fwd_launch(grid,
            qkv, out, lse, cu_seqlens,
            qkv.stride(0), qkv.stride(1), qkv.stride(2),
            out.stride(0), out.stride(1),
            lse.stride(0),
            float(softmax_scale) * LOG2E,
            float(dropout_p), seed_lo, seed_hi,
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            DROPOUT=dropout_p > 0.0, PRECISION=fp32_precision if qkv.dtype == torch.float32 else "tf32",
            N_ROUNDS=PHILOX_ROUNDS,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out, lse


def attention_backward(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float | None = None,
                       dropout_p: float = 0.0, seed: int = 0, fp32_precision: str = "tf32",
                       dqkv: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of ``attention_forward`` with respect to qkv.

    dout, out: (T, heads, head_dim) in qkv.dtype (dout's last dim is made contiguous if it is not);
    lse: (heads, T) float32 from the forward; the other arguments must be the forward's.
    dqkv: optional output buffer (T, 3, heads, head_dim) in qkv.dtype, last dim contiguous.
    Returns dqkv (T, 3, heads, head_dim) in qkv.dtype. No host sync.
    """
    _check_common(qkv, cu_seqlens, max_seqlen, dropout_p, fp32_precision)
    n_tokens, _, heads, head_dim = qkv.shape
    if isinstance(dout, torch.Tensor) and dout.dim() == 3 and dout.stride(-1) != 1:
        dout = dout.contiguous()
    _check_buffer("dout", dout, (n_tokens, heads, head_dim), qkv.dtype, qkv.device)
    _check_buffer("out", out, (n_tokens, heads, head_dim), qkv.dtype, qkv.device)
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (heads, n_tokens) or lse.dtype != torch.float32 \
            or lse.device != qkv.device:
        raise UnsupportedInput(f"lse must be a float32 tensor of shape {(heads, n_tokens)} on {qkv.device}, got "
                               f"{getattr(lse, 'dtype', type(lse))} {tuple(getattr(lse, 'shape', ()))}")
    if lse.stride(1) != 1 or (heads > 1 and lse.stride(0) != n_tokens):
        # the kernels read delta (allocated [heads, T] below) with lse's head stride
        lse = lse.contiguous()
    if dqkv is None:
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        if dqkv.stride(-1) != 1:
            dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    else:
        _check_buffer("dqkv", dqkv, tuple(qkv.shape), qkv.dtype, qkv.device)
    if n_tokens == 0:
        return dqkv
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    block_d = _block_d(head_dim)
    arch = launch_arch(qkv.device)
    kv_cfg = _dkdv_config(head_dim, qkv.dtype, arch, dropout_p > 0.0, fp32_precision)
    q_cfg = _dq_config(head_dim, qkv.dtype, arch, dropout_p > 0.0, fp32_precision)
    batch = cu_seqlens.shape[0] - 1
    seed_lo, seed_hi = _seed_halves(seed, dropout_p)
    precision = fp32_precision if qkv.dtype == torch.float32 else "tf32"
    delta = torch.empty((heads, n_tokens), dtype=torch.float32, device=qkv.device)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DROPOUT=dropout_p > 0.0, PRECISION=precision,
                  N_ROUNDS=PHILOX_ROUNDS)
    with _device_ctx(qkv.device):
        _attn_bwd_preprocess_launch((cdiv(n_tokens, _pre_block_t(qkv.dtype)), heads),
            out, dout, delta, n_tokens,
            out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=_pre_block_t(qkv.dtype), num_warps=4, num_stages=1,
        )
        _attn_bwd_dkdv_launch((cdiv(max_seqlen, kv_cfg["BLOCK_N"]), heads, batch),
            qkv, dout, lse, delta, dqkv, cu_seqlens,
            qkv.stride(0), qkv.stride(1), qkv.stride(2),
            dout.stride(0), dout.stride(1),
            lse.stride(0),
            dqkv.stride(0), dqkv.stride(1), dqkv.stride(2),
            float(softmax_scale), float(softmax_scale) * LOG2E,
            float(dropout_p), seed_lo, seed_hi,
            **common, **kv_cfg,
        )
        _attn_bwd_dq_launch((cdiv(max_seqlen, q_cfg["BLOCK_M"]), heads, batch),
            qkv, dout, lse, delta, dqkv, cu_seqlens,
            qkv.stride(0), qkv.stride(1), qkv.stride(2),
            dout.stride(0), dout.stride(1),
            lse.stride(0),
            dqkv.stride(0), dqkv.stride(2),
            float(softmax_scale), float(softmax_scale) * LOG2E,
            float(dropout_p), seed_lo, seed_hi,
            **common, **q_cfg,
        )
    return dqkv


def dropout_mask(cu_seqlens: torch.Tensor, max_seqlen: int, heads: int, dropout_p: float, seed: int,
                 device=None) -> torch.Tensor:
    """The keep-mask the attention kernels use for (cu_seqlens, heads, dropout_p, seed), as a padded bool tensor
    (B, heads, max_seqlen, max_seqlen): [b, h, i, j] is True where the probability of query i attending to key j
    (both local to sequence b) is kept. Positions past a sequence's end are False. For tests and debugging."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise UnsupportedInput("cu_seqlens must be a 1-D int32 tensor")
    device = torch.device(device) if device is not None else cu_seqlens.device
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise UnsupportedInput(f"max_seqlen must be a python int >= 1, got {max_seqlen!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise UnsupportedInput(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= MAX_GRID_YZ:
        raise UnsupportedInput(f"heads must be a python int in [1, {MAX_GRID_YZ}], got {heads!r}")
    cu_seqlens = cu_seqlens.to(device)
    batch = cu_seqlens.shape[0] - 1
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if batch > 0 else 0   # a host read: a debugging tool
    if longest > max_seqlen:
        raise UnsupportedInput(f"max_seqlen is {max_seqlen} but cu_seqlens holds a sequence of {longest} tokens")
    mask = torch.empty((batch, heads, max_seqlen, max_seqlen), dtype=torch.uint8, device=device)
    seed_lo, seed_hi = _seed_halves(seed, dropout_p)
    with _device_ctx(device):
        _dropout_mask_launch((cdiv(max_seqlen, _MASK_BLOCK), heads, batch),
            mask, cu_seqlens, max_seqlen, float(dropout_p), seed_lo, seed_hi,
            BLOCK_M=_MASK_BLOCK, BLOCK_N=_MASK_BLOCK, N_ROUNDS=PHILOX_ROUNDS, num_warps=4, num_stages=1,
        )
    return mask.view(torch.bool)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ----------------------------------------------------------------------------------------------------------------

_AOT_DTYPES = ((torch.float16, ("tf32",)), (torch.bfloat16, ("tf32",)), (torch.float32, FP32_PRECISIONS))


def aot_specs() -> list[KernelSpec]:
    """Every (kernel, config) the launchers above can pick, for every dtype, fp32 precision, head dim, dropout on
    / off and GPU generation (one spec for both sm_80 and sm_90 where the rule agrees, else one per arch)."""
    specs: list[KernelSpec] = []
    seen = set()

    def add(kernel, fn, signature, constexprs, num_warps, num_stages, config, tensor_cores, archs):
        key = (kernel, config, archs)
        if key in seen:
            return
        seen.add(key)
        sig = dict(signature)
        for name in constexprs:
            sig[name] = "constexpr"
        specs.append(KernelSpec(kernel=kernel, fn=fn, signature=sig, constexprs=dict(constexprs),
                                num_warps=num_warps, num_stages=num_stages, config=config,
                                tensor_cores=tensor_cores, archs=archs))

    for dtype, precisions in _AOT_DTYPES:
        ty = torch_to_triton_dtype(dtype)
        for head_dim in SUPPORTED_HEAD_DIMS:
            block_d = _block_d(head_dim)
            add("_attn_bwd_preprocess_kernel", _attn_bwd_preprocess_kernel,
                {"out_ptr": f"*{ty}", "dout_ptr": f"*{ty}", "delta_ptr": "*fp32", "n_tokens": "i32",
                 "stride_out_t": "i32", "stride_out_h": "i32", "stride_dout_t": "i32", "stride_dout_h": "i32",
                 "stride_delta_h": "i32"},
                dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=_pre_block_t(dtype)), 4, 1,
                f"{ty} d{head_dim} BLOCK_T={_pre_block_t(dtype)} w4 s1", False, (80, 90))
            for precision in precisions:
                # fp16 / bf16 dots run on tensor cores; fp32 ones do with tf32 inputs, not with "ieee" (FMA)
                tc = dtype != torch.float32 or precision == "tf32"
                fwd_sig = {"qkv_ptr": f"*{ty}", "out_ptr": f"*{ty}", "lse_ptr": "*fp32", "cu_seqlens_ptr": "*i32",
                           "stride_qkv_t": "i32", "stride_qkv_3": "i32", "stride_qkv_h": "i32",
                           "stride_out_t": "i32", "stride_out_h": "i32", "stride_lse_h": "i32",
                           "qk_scale": "fp32", "dropout_p": "fp32", "seed_lo": "i32", "seed_hi": "i32"}
                bwd_sig = {"qkv_ptr": f"*{ty}", "dout_ptr": f"*{ty}", "lse_ptr": "*fp32",
                           "delta_ptr": "*fp32", "dqkv_ptr": f"*{ty}", "cu_seqlens_ptr": "*i32",
                           "stride_qkv_t": "i32", "stride_qkv_3": "i32", "stride_qkv_h": "i32",
                           "stride_dout_t": "i32", "stride_dout_h": "i32", "stride_lse_h": "i32",
                           "stride_dqkv_t": "i32", "stride_dqkv_3": "i32", "stride_dqkv_h": "i32",
                           "softmax_scale": "fp32", "qk_scale": "fp32", "dropout_p": "fp32",
                           "seed_lo": "i32", "seed_hi": "i32"}
                dq_sig = {k: v for k, v in bwd_sig.items() if k != "stride_dqkv_3"}
                for dropout in (False, True):
                    tag = f"{ty}{'/' + precision if dtype == torch.float32 else ''} d{head_dim}" \
                          f"{' dropout' if dropout else ''}"
                    for kernel, fn, sig, rule in (("_attn_fwd_kernel", _attn_fwd_kernel, fwd_sig, _fwd_config),
                                                  ("_attn_bwd_dkdv_kernel", _attn_bwd_dkdv_kernel, bwd_sig,
                                                   _dkdv_config),
                                                  ("_attn_bwd_dq_kernel", _attn_bwd_dq_kernel, dq_sig, _dq_config)):
                        c80 = rule(head_dim, dtype, 80, dropout, precision)
                        c90 = rule(head_dim, dtype, 90, dropout, precision)
                        groups = [((80, 90), c80)] if c80 == c90 else [((80,), c80), ((90,), c90)]
                        for archs, cfg in groups:
                            add(kernel, fn, sig,
                                dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg["BLOCK_M"],
                                     BLOCK_N=cfg["BLOCK_N"], DROPOUT=dropout, PRECISION=precision,
                                     N_ROUNDS=PHILOX_ROUNDS),
                                cfg["num_warps"], cfg["num_stages"],
                                f"{tag} BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} "
                                f"w{cfg['num_warps']} s{cfg['num_stages']}", tc, archs)
    add("_dropout_mask_kernel", _dropout_mask_kernel,
        {"mask_ptr": "*u8", "cu_seqlens_ptr": "*i32", "max_seqlen": "i32", "dropout_p": "fp32", "seed_lo": "i32",
         "seed_hi": "i32"},
        dict(BLOCK_M=_MASK_BLOCK, BLOCK_N=_MASK_BLOCK, N_ROUNDS=PHILOX_ROUNDS), 4, 1,
        f"BLOCK_M={_MASK_BLOCK} BLOCK_N={_MASK_BLOCK} w4 s1", False, (80, 90))
    return specs
