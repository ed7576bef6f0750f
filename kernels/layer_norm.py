"""Fused ``y = LayerNorm(dropout(act(x + x_bias)) + residual)`` over the last dim, in Triton.

One kernel family serves the encoder's three uses: bias + residual + LayerNorm after the attention output and
the FFN output projections (x_bias, residual), the MLM head's transform (x_bias, activation="gelu", no
residual), and training (dropout with a seed). activation is None | "gelu" (exact erf) | "gelu_tanh" | "relu" |
"silu" (the MLM head transforms of relu / silu configs).

Numerics: every element is loaded, upcast to fp32 and kept in fp32 until the final store; mean and rstd are
fp32 for every input dtype and returned ([N] fp32) for the backward.

Dropout: keep = tl.rand(seed, flat_offset) >= dropout_p with flat_offset = row * H + col (int64) the element's
offset in the [N, H] tensor, scaled by 1 / (1 - dropout_p). The backward regenerates the identical mask from
(seed, offset); ``dropout_keep_mask`` returns it for tests and reference code. seed: 0 <= seed < 2**63.

Launch rules (block sizes from config.row_block, the library's one row-kernel policy):
  forward : grid (cdiv(N, ROWS),), program p normalises rows [p * ROWS, (p + 1) * ROWS) as one [ROWS, BLOCK_N]
            tile in registers (BLOCK_N = next_pow2(H)); ROWS = 1 by default, num_warps from row_block for
            ROWS * BLOCK_N elements (forward_row_choices / forward_warps).
  backward: grid (G,), num_warps = backward_warps(BLOCK_N) (more than the forward's: the backward holds more
            row-sized fp32 arrays; the table is checked by the compile report), hidden <= BACKWARD_MAX_HIDDEN = MAX_FUSED_BACKWARD_HIDDEN
            (wider rows spill even at 32 warps); program g takes rows [g * R, (g + 1) * R), R = cdiv(N, G); it writes dx (and
            dresidual) per row and accumulates dweight, dbias, dx_bias in fp32 registers, stored once as
            partial[g, :]; the [G, H] fp32 partials are summed over G by torch (deterministic: no atomics;
            G depends only on N and the device: about 32 resident warps per SM).
Inputs must be contiguous; a non-contiguous input raises UnsupportedInput naming it (no hidden copies).
Hidden sizes 1..config.MAX_FUSED_HIDDEN (forward) / 1..BACKWARD_MAX_HIDDEN (backward); larger raises
UnsupportedInput naming the hidden size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bertfast.kernels.config import (MAX_FUSED_BACKWARD_HIDDEN, MAX_FUSED_HIDDEN, MIN_ROW_BLOCK, KernelSpec,
                                     UnsupportedInput, cdiv, dropout_seed, row_block, torch_to_triton_dtype)
from bertfast.kernels.gelu import (ACT_GELU, ACT_GELU_TANH, ACT_NONE, ACT_RELU, ACT_SILU, _act_bwd, _act_fwd,
                                   device_guard)
from bertfast.kernels.launch import Launcher

LN_ACTIVATIONS = {None: ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU, "silu": ACT_SILU}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NUM_STAGES = 1


@triton.jit
def _dropout_keep(seed, offs, dropout_p):
    """The one dropout RNG of this module: Philox uniform on the element's flat int64 offset."""
    return tl.rand(seed, offs) >= dropout_p


@triton.jit(do_not_specialize=["seed"])  # no value specialisation of the seed (i32 / i64 still compile apart)
def _add_ln_fwd_kernel(
    x_ptr,         # [N, H] input
    x_bias_ptr,    # [H] bias added to x before the activation (unused when not HAS_X_BIAS)
    res_ptr,       # [N, H] residual added after activation + dropout (unused when not HAS_RESIDUAL)
    w_ptr,         # [H] LayerNorm weight
    b_ptr,         # [H] LayerNorm bias
    y_ptr,         # [N, H] output, x's dtype
    mean_ptr,      # [N] fp32
    rstd_ptr,      # [N] fp32
    n_rows, n_cols, eps, dropout_p, dropout_scale, seed,
    HAS_X_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program p normalises rows [p * ROWS, (p + 1) * ROWS) as one [ROWS, BLOCK_N] tile
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]   # int64: N * H may pass 2**31
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        z += tl.load(x_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = _act_fwd(z, ACTIVATION)
    if HAS_DROPOUT:
        z = tl.where(_dropout_keep(seed, offs, dropout_p), z * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.where(mask, z, 0.0)
    mean = tl.sum(z, axis=1) / n_cols
    diff = tl.where(mask, z - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / n_cols
    # IEEE-rounded sqrt and division (a plain 1 / sqrt compiles to sqrt.approx and div.full); once per row
    rstd = tl.div_rn(tl.full(var.shape, 1.0, tl.float32), tl.sqrt_rn(var + eps))
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit(do_not_specialize=["seed"])
def _add_ln_bwd_kernel(
    dy_ptr,        # [N, H] upstream gradient
    x_ptr,         # [N, H] forward input
    x_bias_ptr,    # [H]
    res_ptr,       # [N, H]
    w_ptr,         # [H]
    mean_ptr,      # [N] fp32
    rstd_ptr,      # [N] fp32
    dx_ptr,        # [N, H] gradient wrt x
    dres_ptr,      # [N, H] gradient wrt residual (unused when not HAS_RESIDUAL)
    dw_part_ptr,   # [G, H] fp32 partial sums of dy * xhat
    db_part_ptr,   # [G, H] fp32 partial sums of dy
    dxb_part_ptr,  # [G, H] fp32 partial sums of dx (unused when not HAS_X_BIAS)
    n_rows, n_cols, rows_per_program, dropout_p, dropout_scale, seed,
    HAS_X_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dxb_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for i in range(0, row_end - row_start):
        row = row_start + i
        row_off = row.to(tl.int64) * n_cols  # int64 scalar row base, 32-bit column offsets
        # recompute the pre-LayerNorm value z = dropout(act(x + x_bias)) + residual
        a = tl.load(x_ptr + row_off + cols, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_X_BIAS:
            a += tl.load(x_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        z = _act_fwd(a, ACTIVATION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, row_off + cols, dropout_p)
            z = tl.where(keep, z * dropout_scale, 0.0)
        if HAS_RESIDUAL:
            z += tl.load(res_ptr + row_off + cols, mask=col_mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(col_mask, (z - mean) * rstd, 0.0)
        dy = tl.load(dy_ptr + row_off + cols, mask=col_mask, other=0.0).to(tl.float32)
        wdy = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) * dy
        c1 = tl.sum(xhat * wdy, axis=0) / n_cols
        c2 = tl.sum(wdy, axis=0) / n_cols
        dz = (wdy - (xhat * c1 + c2)) * rstd
        dw_acc += dy * xhat
        db_acc += dy
        if HAS_RESIDUAL:
            tl.store(dres_ptr + row_off + cols, dz.to(dres_ptr.dtype.element_ty), mask=col_mask)
        da = dz
        if HAS_DROPOUT:
            da = tl.where(keep, da * dropout_scale, 0.0)
        if ACTIVATION != 0:
            # reload x + x_bias (an L1 hit) rather than keep it live across the two row reductions: holding it
            # made the 8192-wide configuration spill
            a = tl.load(x_ptr + row_off + cols, mask=col_mask, other=0.0).to(tl.float32)
            if HAS_X_BIAS:
                a += tl.load(x_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            da = da * _act_bwd(a, ACTIVATION)
        tl.store(dx_ptr + row_off + cols, da.to(dx_ptr.dtype.element_ty), mask=col_mask)
        if HAS_X_BIAS:
            dxb_acc += tl.where(col_mask, da, 0.0)
    part_off = pid.to(tl.int64) * n_cols
    tl.store(dw_part_ptr + part_off + cols, dw_acc, mask=col_mask)
    tl.store(db_part_ptr + part_off + cols, db_acc, mask=col_mask)
    if HAS_X_BIAS:
        tl.store(dxb_part_ptr + part_off + cols, dxb_acc, mask=col_mask)


@triton.jit(do_not_specialize=["seed"])
def _dropout_keep_kernel(
    keep_ptr,      # [numel] uint8 output: 1 where kept
    numel, dropout_p, seed,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    keep = _dropout_keep(seed, offs, dropout_p)
    tl.store(keep_ptr + offs, keep.to(tl.uint8), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# input checks


def _check_rows(name: str, t, x=None):
    if not isinstance(t, torch.Tensor):
        raise UnsupportedInput(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x is None:
        if t.dim() != 2:
            raise UnsupportedInput(f"{name} must be 2-D [N, H] (flatten leading dims first), got shape "
                                   f"{tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedInput(f"{name} has unsupported dtype {t.dtype}; expected float32, float16 or bfloat16")
    else:
        if t.shape != x.shape:
            raise UnsupportedInput(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise UnsupportedInput(f"{name} dtype {t.dtype} does not match x dtype {x.dtype}")
        if t.device != x.device:
            raise UnsupportedInput(f"{name} is on {t.device} but x is on {x.device}")
    if not t.is_contiguous():
        raise UnsupportedInput(f"{name} must be contiguous (call .contiguous() first)")


def _check_vec(name: str, t, x, dtype=None):
    n = x.shape[1]
    if not isinstance(t, torch.Tensor):
        raise UnsupportedInput(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise UnsupportedInput(f"{name} must have shape [{n}] (the hidden size of x), got {tuple(t.shape)}")
    want = x.dtype if dtype is None else dtype
    if t.dtype != want:
        raise UnsupportedInput(f"{name} dtype {t.dtype} does not match {'x' if dtype is None else 'the'} "
                               f"dtype {want}")
    if t.device != x.device:
        raise UnsupportedInput(f"{name} is on {t.device} but x is on {x.device}")
    if not t.is_contiguous():
        raise UnsupportedInput(f"{name} must be contiguous (call .contiguous() first)")


def _check_common(x, weight, bias, residual, x_bias, activation, dropout_p, seed):
    _check_rows("x", x)
    row_block(x.shape[1], "hidden size (x.shape[-1])")
    if activation not in LN_ACTIVATIONS:
        raise UnsupportedInput(f"activation must be None, 'gelu', 'gelu_tanh', 'relu' or 'silu', got {activation!r}")
    _check_vec("weight", weight, x)
    _check_vec("bias", bias, x)
    if residual is not None:
        _check_rows("residual", residual, x)
    if x_bias is not None:
        _check_vec("x_bias", x_bias, x)
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise UnsupportedInput(f"dropout_p must be in [0, 1], got {dropout_p}")
    dropout_seed(seed, float(dropout_p))


def _dropout_scale(p: float) -> float:
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


BACKWARD_MAX_HIDDEN = MAX_FUSED_BACKWARD_HIDDEN


# num_warps of the backward per BLOCK_N, chosen with the compile report (sm_80 and sm_90, every dtype, all features
# on): the backward keeps three gradient accumulators live across its row loop plus the row being processed and the
# Philox state, so it needs more warps than row_block's forward policy (whose 8-16 elements per thread spilled at
# 2048 and 4096). 16 warps at 2048 spilled on sm_90 (ptxas held them to 64 registers); 8 fit in 128.
# At 8192 even 32 warps (64 registers a thread) spill, hence BACKWARD_MAX_HIDDEN. 512 went from 4 to 8 warps when
# the report began compiling the launch variant (16-byte-aligned pointers): with 4, fp16 on sm_80 spilled 8 bytes
# for hidden sizes 257-512 that are not multiples of 16 (e.g. 312; 384 did not spill).
_BACKWARD_WARPS = {128: 1, 256: 2, 512: 8, 1024: 8, 2048: 8, 4096: 32}


def backward_warps(block_n: int, num_warps: int) -> int:
    """num_warps of the backward for a row block (row_block's num_warps for blocks below 128)."""
    return _BACKWARD_WARPS.get(block_n, num_warps)


_SM_COUNT: dict = {}


def _backward_programs(device, n_rows: int, num_warps: int) -> int:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        target = _SM_COUNT[idx] * max(1, 32 // num_warps)
    else:
        target = 4  # the interpreter runs programs one after another
    return max(1, min(n_rows, target))


# ----------------------------------------------------------------------------------------------------------------
# launchers


# each kernel's launches skip JITFunction.run's per-call specialisation on a hit (kernels/launch.py)
_add_ln_fwd_launch = Launcher(_add_ln_fwd_kernel)
_add_ln_bwd_launch = Launcher(_add_ln_bwd_kernel)
_dropout_keep_launch = Launcher(_dropout_keep_kernel)


def forward_row_choices(block_n: int) -> tuple[int, ...]:
    """Rows per forward program the launcher accepts for a row block: the policy's first (one row: what the H100
    measured on 2026-11-24, 96% of copy bandwidth at H = 3072 but 57% at 768), then the multi-row candidate for
    narrow rows (a [ROWS, BLOCK_N] tile of ~4096 elements, NOTES change 10), which bench_norm_act times beside it
    until a GPU run decides the default. The compile report compiles each."""
    candidate = max(1, min(16, 4096 // block_n))
    return (1,) if candidate == 1 else (1, candidate)


def forward_warps(block_n: int, rows: int) -> int:
    """num_warps of a [rows, block_n] forward tile: row_block's rule for a row of rows * block_n elements."""
    return row_block(rows * block_n)[1]


SWEEP_WARPS = (1, 2, 4, 8, 16, 32)


def sweep_variants(block_n: int) -> list[tuple[int, int]]:
    """(rows, num_warps) forward launches a launch-rule sweep times for a row block (benchmarks.bench_norm_act
    --sweep): rows a power of two up to 16, 4 to 64 tile elements a thread (fewer leave threads idle, more spill
    in the compile report's experience). The policy's own launches are among them."""
    out = []
    for rows in (1, 2, 4, 8, 16):
        for warps in SWEEP_WARPS:
            per_thread = rows * block_n // (warps * 32)
            if 4 <= per_thread <= 64 or (rows in forward_row_choices(block_n) and warps == forward_warps(block_n, rows)):
                out.append((rows, warps))
    return out


def add_layer_norm_forward(x, weight, bias, eps: float, residual=None, x_bias=None, activation: str | None = None,
                           dropout_p: float = 0.0, seed: int = 0, out=None, rows: int | None = None,
                           num_warps: int | None = None, validate: bool = True):
    """y = LayerNorm(dropout(act(x + x_bias)) + residual) * weight + bias over the last dim.

    x, residual: [N, H] contiguous, fp32/fp16/bf16 (any leading dims flattened by the caller);
    weight, bias, x_bias: [H] in x's dtype; activation: None | "gelu" | "gelu_tanh" | "relu" | "silu";
    dropout_p in [0, 1], seed in [0, 2**63) (used only when dropout_p > 0);
    out: optional [N, H] tensor in x's dtype to write y into;
    rows: rows per program, one of forward_row_choices(BLOCK_N) (default: the first, the launch policy).
    num_warps: a launch-rule sweep's variant: with it, (rows, num_warps) must be one of sweep_variants(BLOCK_N);
    default forward_warps(BLOCK_N, rows). The ops layer never passes it, and the compile report compiles the
    policy's launches only.
    validate=False skips the input checks (types, shapes, dtypes, devices, contiguity, activation, dropout_p,
    seed): for bertfast.ops, which has checked the same before (9 us a call on a slow host, NOTES change 31).
    Returns (y [N, H] in x's dtype, mean [N] fp32, rstd [N] fp32)."""
    if validate:
        _check_common(x, weight, bias, residual, x_bias, activation, dropout_p, seed)
        if not float(eps) >= 0.0:   # (NaN too) every row would be NaN
            raise UnsupportedInput(f"eps must be >= 0, got {eps}")
    n_rows, n_cols = x.shape
    block_n, _ = row_block(n_cols, "hidden size (x.shape[-1])")
    choices = forward_row_choices(block_n)
    if num_warps is not None:
        rows = choices[0] if rows is None else rows
        variants = sweep_variants(block_n)
        # the isinstance checks: True and 1.0 compare equal to 1 in the membership test
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (rows, num_warps)) \
                or (rows, num_warps) not in variants:
            raise UnsupportedInput(f"(rows, num_warps) must be one of {variants} for hidden size {n_cols}, got "
                                   f"({rows!r}, {num_warps!r})")
    elif rows is None:
        rows = choices[0]
    elif isinstance(rows, bool) or not isinstance(rows, int) or rows not in choices:
        raise UnsupportedInput(f"rows must be one of {choices} for hidden size {n_cols}, got {rows!r}")
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_rows("out", out, x)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return out, mean, rstd
    dropout_p = float(dropout_p)
    with device_guard(x):
        _add_ln_fwd_launch((cdiv(n_rows, rows),),
            x, x_bias if x_bias is not None else x, residual if residual is not None else x, weight, bias,
            out, mean, rstd, n_rows, n_cols, float(eps), dropout_p, _dropout_scale(dropout_p), int(seed) if dropout_p > 0.0 else 0,
            HAS_X_BIAS=x_bias is not None, HAS_RESIDUAL=residual is not None,
            ACTIVATION=LN_ACTIVATIONS[activation], HAS_DROPOUT=dropout_p > 0.0, ROWS=rows, BLOCK_N=block_n,
            num_warps=num_warps or forward_warps(block_n, rows), num_stages=NUM_STAGES)
    return out, mean, rstd


def add_layer_norm_backward(dy, x, weight, bias, mean, rstd, residual=None, x_bias=None, activation=None,
                            dropout_p: float = 0.0, seed: int = 0, residual_grad_is_dx: bool = False):
    """Gradients of add_layer_norm_forward; recomputes the pre-LN value from x / x_bias / residual (and the
    dropout mask from seed).

    dy: [N, H] in x's dtype; mean, rstd: [N] fp32 from the forward; the other arguments as in the forward.
    Returns (dx [N, H], dresidual [N, H] or None, dweight [H], dbias [H], dx_bias [H] or None), each in its
    input's dtype; the [H] gradients are summed in fp32, deterministically.
    residual_grad_is_dx: with a residual but no activation and no dropout, dresidual equals dx; True returns
    None for it instead of a second [N, H] tensor (the kernel writes both into dx, same values), and the caller
    uses dx for the residual's gradient."""
    _check_common(x, weight, bias, residual, x_bias, activation, dropout_p, seed)
    if residual_grad_is_dx and (activation is not None or dropout_p > 0.0):
        raise UnsupportedInput("residual_grad_is_dx needs no activation and no dropout (dresidual differs from "
                               f"dx otherwise), got activation={activation!r}, dropout_p={dropout_p}")
    _check_rows("dy", dy, x)
    n_rows, n_cols = x.shape
    for name, t in (("mean", mean), ("rstd", rstd)):
        if not isinstance(t, torch.Tensor) or t.shape != (n_rows,) or t.dtype != torch.float32:
            raise UnsupportedInput(f"{name} must be a float32 tensor of shape [{n_rows}] (from the forward), got "
                                   f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != x.device or not t.is_contiguous():
            raise UnsupportedInput(f"{name} must be contiguous and on x's device {x.device}")
    if n_cols > BACKWARD_MAX_HIDDEN:
        raise UnsupportedInput(f"hidden size (x.shape[-1]) {n_cols} is larger than the fused backward supports "
                               f"({BACKWARD_MAX_HIDDEN}: a wider row spills registers)")
    block_n, num_warps = row_block(n_cols, "hidden size (x.shape[-1])")
    num_warps = backward_warps(block_n, num_warps)
    dx = torch.empty_like(x)
    dres = torch.empty_like(residual) if residual is not None and not residual_grad_is_dx else None
    if n_rows == 0:
        zeros = torch.zeros_like(weight)
        return dx, dres, zeros, torch.zeros_like(bias), (torch.zeros_like(x_bias) if x_bias is not None else None)
    g = _backward_programs(x.device, n_rows, num_warps)
    rows_per_program = cdiv(n_rows, g)
    g = cdiv(n_rows, rows_per_program)  # no empty programs
    n_parts = 3 if x_bias is not None else 2
    parts = torch.empty((n_parts, g, n_cols), dtype=torch.float32, device=x.device)
    dropout_p = float(dropout_p)
    with device_guard(x):
        _add_ln_bwd_launch((g,),
            dy, x, x_bias if x_bias is not None else x, residual if residual is not None else x, weight, mean,
            rstd, dx, dres if dres is not None else dx, parts[0], parts[1], parts[n_parts - 1],
            n_rows, n_cols, rows_per_program, dropout_p, _dropout_scale(dropout_p), int(seed) if dropout_p > 0.0 else 0,
            HAS_X_BIAS=x_bias is not None, HAS_RESIDUAL=residual is not None,
            ACTIVATION=LN_ACTIVATIONS[activation], HAS_DROPOUT=dropout_p > 0.0, BLOCK_N=block_n,
            num_warps=num_warps, num_stages=NUM_STAGES)
    sums = parts.sum(1)
    dweight = sums[0].to(weight.dtype)
    dbias = sums[1].to(bias.dtype)
    dx_bias = sums[2].to(x_bias.dtype) if x_bias is not None else None
    return dx, dres, dweight, dbias, dx_bias


DROPOUT_BLOCK = 1024


def dropout_keep_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    """The keep mask (bool, ``shape``) that the kernels above draw for a [N, H] tensor of this shape with this
    dropout probability and seed: element i (flat, row-major) is kept when Philox-uniform(seed, i) >= p."""
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= int(s)
    device = torch.device(device)
    keep = torch.empty(numel, dtype=torch.uint8, device=device)
    if numel:
        with device_guard(keep):
            _dropout_keep_launch((cdiv(numel, DROPOUT_BLOCK),),
                keep, numel, float(p), dropout_seed(seed, float(p)), BLOCK=DROPOUT_BLOCK, num_warps=4, num_stages=1)
    return keep.view(shape).bool()


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time compile configurations


def _hidden_blocks():
    """Every (BLOCK_N, num_warps) config.row_block can return for hidden sizes 1..MAX_FUSED_HIDDEN (its smallest
    block is config.MIN_ROW_BLOCK)."""
    out, h = [], MIN_ROW_BLOCK
    while h <= MAX_FUSED_HIDDEN:
        out.append(row_block(h))
        h *= 2
    return out


def aot_specs() -> list[KernelSpec]:
    """One spec per (dtype, row block) for forward and backward, with every feature on (x_bias, residual,
    exact GELU, dropout): the feature-off variants are the same code with parts removed. Plus the dropout-mask
    kernel used by tests / reference code."""
    specs = []
    for dtype in SUPPORTED_DTYPES:
        t = torch_to_triton_dtype(dtype)
        for block_n, num_warps in _hidden_blocks():
            for rows in forward_row_choices(block_n):
                const = dict(HAS_X_BIAS=True, HAS_RESIDUAL=True, ACTIVATION=ACT_GELU, HAS_DROPOUT=True, ROWS=rows,
                             BLOCK_N=block_n)
                warps = forward_warps(block_n, rows)
                cfg = f"{t} ROWS={rows} BLOCK_N={block_n} warps={warps} x_bias+gelu+dropout+residual"
                sig = {"x_ptr": f"*{t}", "x_bias_ptr": f"*{t}", "res_ptr": f"*{t}", "w_ptr": f"*{t}",
                       "b_ptr": f"*{t}", "y_ptr": f"*{t}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "n_rows": "i32",
                       "n_cols": "i32", "eps": "fp32", "dropout_p": "fp32", "dropout_scale": "fp32", "seed": "i64"}
                sig.update({k: "constexpr" for k in const})
                specs.append(KernelSpec("add_layer_norm_fwd", _add_ln_fwd_kernel, sig, const, warps, NUM_STAGES,
                                        cfg))
            const = dict(HAS_X_BIAS=True, HAS_RESIDUAL=True, ACTIVATION=ACT_GELU, HAS_DROPOUT=True, BLOCK_N=block_n)
            sig = {"dy_ptr": f"*{t}", "x_ptr": f"*{t}", "x_bias_ptr": f"*{t}", "res_ptr": f"*{t}", "w_ptr": f"*{t}",
                   "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dx_ptr": f"*{t}", "dres_ptr": f"*{t}",
                   "dw_part_ptr": "*fp32", "db_part_ptr": "*fp32", "dxb_part_ptr": "*fp32", "n_rows": "i32",
                   "n_cols": "i32", "rows_per_program": "i32", "dropout_p": "fp32", "dropout_scale": "fp32",
                   "seed": "i64"}
            sig.update({k: "constexpr" for k in const})
            if block_n > BACKWARD_MAX_HIDDEN:
                continue
            bwd_warps = backward_warps(block_n, num_warps)
            cfg = f"{t} BLOCK_N={block_n} warps={bwd_warps} x_bias+gelu+dropout+residual"
            specs.append(KernelSpec("add_layer_norm_bwd", _add_ln_bwd_kernel, sig, const, bwd_warps, NUM_STAGES,
                                    cfg))
    const = dict(BLOCK=DROPOUT_BLOCK)
    sig = {"keep_ptr": "*u8", "numel": "i32", "dropout_p": "fp32", "seed": "i64", "BLOCK": "constexpr"}
    specs.append(KernelSpec("dropout_keep_mask", _dropout_keep_kernel, sig, const, 4, 1, f"BLOCK={DROPOUT_BLOCK}"))
    return specs
