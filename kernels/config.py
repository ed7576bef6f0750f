"""The one launch policy of bertfast's Triton kernels, and the description of a kernel configuration used by the
ahead-of-time compile report.

Every launcher picks its block sizes / warps / stages here, and every kernel module's ``aot_specs()`` enumerates
the configurations these functions can return, so the compile report covers exactly what can run.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Callable

import triton

# Largest row handled by the one-pass row kernels (LayerNorm, GELU + LayerNorm): the row must fit in registers.
MAX_FUSED_HIDDEN = 8192
# Largest row of the LayerNorm backward (it keeps three gradient accumulators live besides the row: wider rows
# spill even at 32 warps); the ops layer does not pick the Triton LayerNorm for wider rows that record a gradient.
MAX_FUSED_BACKWARD_HIDDEN = 4096
# Smallest row block: narrower rows are masked inside a block of this size, so the compile report's blocks
# (MIN_ROW_BLOCK .. MAX_FUSED_HIDDEN) are every block a launcher can pick.
MIN_ROW_BLOCK = 16


class UnsupportedInput(ValueError):
    """A kernel cannot serve this input; the message names the argument and what was expected."""


def dropout_seed(seed, dropout_p: float) -> int:
    """The dropout seed every launcher passes to its kernel: with dropout, an integer in [0, 2**63) (a Python or
    numpy int, or an integer tensor with one element); a float is refused rather than truncated, and a value outside
    the range rather than wrapped onto another seed's mask. Without dropout the seed is not used and 0 is passed."""
    if not dropout_p > 0.0:
        return 0
    try:
        value = operator.index(seed) if not isinstance(seed, bool) else None
    except TypeError:
        value = None
    if value is None or not 0 <= value < 2 ** 63:
        raise UnsupportedInput(f"seed must be an int in [0, 2**63) when dropout_p > 0, got {seed!r}")
    return value


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One compile of one kernel: what the AOT report compiles for each target architecture.

    signature: {arg name: triton type string}, e.g. {"x_ptr": "*fp16", "n_rows": "i32"}; constexpr arguments
      are given in ``constexprs`` (and appear in signature as "constexpr").
    tensor_cores: whether the SASS must contain tensor-core instructions (HMMA on sm_80, HGMMA/HMMA on sm_90).
    """
    kernel: str
    fn: Callable
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    config: str
    tensor_cores: bool = False
    archs: tuple = (80, 90)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code. triton.cdiv and triton.next_power_of_2 are ConstexprFunctions in Triton 3.6,
    which cost ~1.5 us a call from host code (about a hundred calls per eager BERT forward)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host code (see cdiv)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@functools.lru_cache(maxsize=512)
def row_block(n_cols: int, what: str = "hidden size") -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a kernel that keeps a whole row of n_cols in registers.

    Raises UnsupportedInput naming ``what`` when the row is larger than MAX_FUSED_HIDDEN."""
    if n_cols < 1:
        raise UnsupportedInput(f"{what} must be >= 1, got {n_cols}")
    if n_cols > MAX_FUSED_HIDDEN:
        raise UnsupportedInput(f"{what} {n_cols} is larger than the fused kernels support ({MAX_FUSED_HIDDEN})")
    block = max(MIN_ROW_BLOCK, next_pow2(n_cols))
    num_warps = 1 if block <= 256 else 2 if block <= 512 else 4 if block <= 2048 else 8
    return block, num_warps


def torch_to_triton_dtype(dtype) -> str:
    import torch
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
            torch.int64: "i64", torch.uint8: "u8"}[dtype]


def launch_arch(device) -> int:
    """Compute capability as an int (80, 86, 89, 90, ...) of the device the tensor lives on; 80 under the
    interpreter (CPU tensors), so CPU runs take the sm_80 configs. Cached per device: it is asked on every
    attention launch."""
    if device.type != "cuda":
        return 80
    import torch
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    import torch
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor
