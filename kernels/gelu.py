"""Bias + activation over [N, I] in Triton: ``y = act(x + bias)`` forward, ``(dx, dbias)`` backward.

Activations: "gelu" (exact, erf), "gelu_tanh" (the tanh approximation of gelu_new / gelu_pytorch_tanh),
"relu", "silu". All math is fp32 inside, whatever the storage dtype (fp32 / fp16 / bf16).

Launch rule (one tile policy for both directions, see ``tile_config``): 2-D tiles of BLOCK_M x BLOCK_N =
16 x 256 elements, 4 warps, so every thread moves 32 elements in 16-byte vectors.
  forward : grid (cdiv(N, BLOCK_M), cdiv(I, BLOCK_N)), one tile per program.
  backward: grid (G, cdiv(I, BLOCK_N)); program (g, j) walks the row tiles g, g + G, ... of column block j,
            writes dx and keeps an fp32 [BLOCK_M, BLOCK_N] dbias accumulator in registers, stored once as
            partial[g, cols]; the [G, I] fp32 partials are then summed over G by torch (deterministic: no
            atomics, a fixed reduction order for a given G, and G depends only on N, I and the device).
Inputs must be contiguous; a non-contiguous input raises UnsupportedInput naming it (no hidden copies).

The activation helpers here (``_act_fwd`` / ``_act_bwd``) are shared with kernels/layer_norm.py.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from bertfast.kernels.config import KernelSpec, UnsupportedInput, cdiv, torch_to_triton_dtype
from bertfast.kernels.launch import Launcher

# activation codes shared with layer_norm.py (constexpr ACTIVATION)
ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_SILU = 0, 1, 2, 3, 4
ACTIVATIONS = {"gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU, "silu": ACT_SILU}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

BLOCK_M = 16
BLOCK_N = 256
NUM_WARPS = 4
NUM_STAGES = 1

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_TANH_C = 0.044715


@triton.jit
def _act_fwd(a, ACTIVATION: tl.constexpr):
    """act(a) for fp32 a. gelu_tanh uses 0.5 * (1 + tanh(u)) == sigmoid(2u): exact algebra, no cancellation."""
    if ACTIVATION == 1:
        out = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    elif ACTIVATION == 2:
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        out = a / (1.0 + tl.exp(-2.0 * u))
    elif ACTIVATION == 3:
        out = tl.where(a < 0.0, 0.0, a)   # NaN kept, as torch's relu (the GPU's max.f32 returns the non-NaN operand)
    elif ACTIVATION == 4:
        out = a / (1.0 + tl.exp(-a))
    else:
        out = a
    return out


@triton.jit
def _act_bwd(a, ACTIVATION: tl.constexpr):
    """d act / d a for fp32 a."""
    if ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
        pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327
        out = cdf + a * pdf
    elif ACTIVATION == 2:
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
        e = tl.exp(-2.0 * u)
        s = 1.0 / (1.0 + e)
        # 1 - s as e * s where s is near 1 (1 - s cancels, and the GPU's exp / division are a few ulp off), as
        # 1 - s elsewhere (e * s would be inf * 0 for large negative u)
        out = s + a * 2.0 * s * tl.where(u > 0.0, e * s, 1.0 - s) * du
    elif ACTIVATION == 3:
        out = tl.where(a <= 0.0, 0.0, 1.0)   # a NaN passes the gradient, as torch's threshold_backward
    elif ACTIVATION == 4:
        e = tl.exp(-a)
        s = 1.0 / (1.0 + e)
        out = s * (1.0 + a * tl.where(a > 0.0, e * s, 1.0 - s))  # 1 - s as for gelu_tanh
    else:
        out = a * 0.0 + 1.0
    return out


@triton.jit
def _bias_act_fwd_kernel(
    x_ptr,     # [N, I] input, contiguous
    bias_ptr,  # [I] (unused when not HAS_BIAS)
    y_ptr,     # [N, I] output, x's dtype
    n_rows, n_cols,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        a = a + b[None, :]
    y = _act_fwd(a, ACTIVATION)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(
    dy_ptr,        # [N, I] upstream gradient, x's dtype
    x_ptr,         # [N, I] forward input (pre-bias)
    bias_ptr,      # [I]
    dx_ptr,        # [N, I] gradient wrt x, x's dtype
    dbias_part_ptr,  # [G, I] fp32 partial sums of dx over this program's rows (unused when not HAS_BIAS)
    n_rows, n_cols, n_row_tiles, n_programs_m,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(pid_m, n_row_tiles, n_programs_m):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            a = a + b[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = dy * _act_bwd(a, ACTIVATION)
        dx = tl.where(mask, dx, 0.0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc += dx
    if HAS_BIAS:
        part = tl.sum(acc, axis=0)
        tl.store(dbias_part_ptr + pid_m.to(tl.int64) * n_cols + cols, part, mask=col_mask)


# ----------------------------------------------------------------------------------------------------------------
# launchers


# each kernel's launches skip JITFunction.run's per-call specialisation on a hit (kernels/launch.py)
_bias_act_fwd_launch = Launcher(_bias_act_fwd_kernel)
_bias_act_bwd_launch = Launcher(_bias_act_bwd_kernel)


def tile_config() -> dict:
    """The one tile policy of the bias + activation kernels (forward and backward)."""
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


_SM_COUNT: dict = {}


def _programs_per_column(device, n_row_tiles: int, n_col_blocks: int) -> int:
    """G for the backward: enough programs to fill the GPU (about 8 resident 4-warp programs per SM), no more
    than there are row tiles. On CPU (interpreter) a few programs: the interpreter runs them one after another."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        target = cdiv(_SM_COUNT[idx] * 8, n_col_blocks)
    else:
        target = 4
    return max(1, min(n_row_tiles, target))


def device_guard(t):
    """Launch on the tensor's device, not the current one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _activation_code(activation) -> int:
    if activation not in ACTIVATIONS:
        raise UnsupportedInput(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def _check_2d(name: str, t, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise UnsupportedInput(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise UnsupportedInput(f"{name} must be 2-D [N, I] (flatten leading dims first), got shape {tuple(t.shape)}")
    if dtype is None and t.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedInput(f"{name} has unsupported dtype {t.dtype}; expected float32, float16 or bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise UnsupportedInput(f"{name} dtype {t.dtype} does not match x dtype {dtype}")
    if device is not None and t.device != device:
        raise UnsupportedInput(f"{name} is on {t.device} but x is on {device}")
    if not t.is_contiguous():
        raise UnsupportedInput(f"{name} must be contiguous (call .contiguous() first)")


def _check_bias(bias, x):
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise UnsupportedInput(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dim() != 1 or bias.shape[0] != x.shape[1]:
        raise UnsupportedInput(f"bias must have shape [{x.shape[1]}] (x's last dim), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise UnsupportedInput(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
    if bias.device != x.device:
        raise UnsupportedInput(f"bias is on {bias.device} but x is on {x.device}")
    if not bias.is_contiguous():
        raise UnsupportedInput("bias must be contiguous (call .contiguous() first)")


def bias_act_forward(x, bias=None, activation: str = "gelu", out=None, validate: bool = True):
    """y = act(x + bias).

    x: [N, I] fp32/fp16/bf16, contiguous; bias: [I] in x's dtype or None; out: optional [N, I] tensor in x's
    dtype to write into. validate=False skips the checks of x, bias and activation: for bertfast.ops, which has
    checked the same before (NOTES change 31). Returns y [N, I] in x's dtype (``out`` when given)."""
    if validate:
        act = _activation_code(activation)
        _check_2d("x", x)
        _check_bias(bias, x)
    else:
        act = ACTIVATIONS[activation]
    n_rows, n_cols = x.shape
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_2d("out", out, x.dtype, x.device)
        if out.shape != x.shape:
            raise UnsupportedInput(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    if x.numel() == 0:
        return out
    grid = (cdiv(n_rows, BLOCK_M), cdiv(n_cols, BLOCK_N))
    with device_guard(x):
        _bias_act_fwd_launch(grid,
            x, bias if bias is not None else x, out, n_rows, n_cols,
            HAS_BIAS=bias is not None, ACTIVATION=act, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


def bias_act_backward(dy, x, bias=None, activation: str = "gelu"):
    """Gradients of y = act(x + bias).

    dy, x: [N, I] in one dtype, contiguous; bias: [I] or None. Returns (dx [N, I] in x's dtype,
    dbias [I] in bias's dtype or None when bias is None). dbias is summed in fp32, deterministically."""
    act = _activation_code(activation)
    _check_2d("x", x)
    _check_2d("dy", dy, x.dtype, x.device)
    if dy.shape != x.shape:
        raise UnsupportedInput(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    _check_bias(bias, x)
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x)
    if x.numel() == 0:
        dbias = None if bias is None else torch.zeros_like(bias)
        return dx, dbias
    n_row_tiles = cdiv(n_rows, BLOCK_M)
    n_col_blocks = cdiv(n_cols, BLOCK_N)
    g = _programs_per_column(x.device, n_row_tiles, n_col_blocks)
    part = torch.empty((g, n_cols), dtype=torch.float32, device=x.device) if bias is not None else dx
    with device_guard(x):
        _bias_act_bwd_launch((g, n_col_blocks),
            dy, x, bias if bias is not None else x, dx, part, n_rows, n_cols, n_row_tiles, g,
            HAS_BIAS=bias is not None, ACTIVATION=act, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    dbias = part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dbias


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time compile configurations


def aot_specs() -> list[KernelSpec]:
    """Every configuration the launchers above can pick: the one tile config, for each dtype and activation,
    forward and backward, with the bias present (the no-bias variants are the same code minus the bias load)."""
    specs = []
    for dtype in SUPPORTED_DTYPES:
        t = torch_to_triton_dtype(dtype)
        for name, code in ACTIVATIONS.items():
            const = dict(HAS_BIAS=True, ACTIVATION=code, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
            cfg = f"{t} {name} BLOCK_M={BLOCK_M} BLOCK_N={BLOCK_N} warps={NUM_WARPS}"
            sig = {"x_ptr": f"*{t}", "bias_ptr": f"*{t}", "y_ptr": f"*{t}", "n_rows": "i32", "n_cols": "i32"}
            sig.update({k: "constexpr" for k in const})
            specs.append(KernelSpec("bias_act_fwd", _bias_act_fwd_kernel, sig, const, NUM_WARPS, NUM_STAGES, cfg))
            sig = {"dy_ptr": f"*{t}", "x_ptr": f"*{t}", "bias_ptr": f"*{t}", "dx_ptr": f"*{t}",
                   "dbias_part_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "n_row_tiles": "i32",
                   "n_programs_m": "i32"}
            sig.update({k: "constexpr" for k in const})
            specs.append(KernelSpec("bias_act_bwd", _bias_act_bwd_kernel, sig, const, NUM_WARPS, NUM_STAGES, cfg))
    return specs
