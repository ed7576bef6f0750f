"""The ops layer: every hot op of the encoder as a ``bertfast::`` PyTorch custom op, with a fake (meta)
implementation for torch.compile / export, an autograd formula, and dispatch to one of three implementations:

  triton     the Triton kernels in bertfast.kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  cpp        the C++/CUDA extension bertfast._C (ops under torch.ops.bertfast_C)
  reference  plain torch, also float64-capable (the definition the other two are tested against)

``BERTFAST_BACKEND=auto|triton|cpp|reference`` chooses (read at each call; ``auto`` by default).

* auto: per op and device, the first implementation in the preference order below that is built and can
  serve the input. When a preferred one is skipped, the reason is logged once and recorded; ``bertfast info``
  shows the choice per op.
* triton / cpp: that implementation for every op that has one; if it is missing or cannot serve the input,
  an error says why (nothing falls back). Ops that have no implementation of that kind (e.g. no C++
  attention) run the reference, logged once and shown by ``bertfast info``.

Forward and backward of one call always use the same implementation (the forward's choice is passed on).
Each forward op returns what its backward needs (e.g. the attention's logsumexp, LayerNorm's mean and rstd);
the reference implementation's backward recomputes its forward under autograd instead, so those extra
outputs are NaN-filled placeholders there.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor

from bertfast.padding import check_cu_seqlens

log = logging.getLogger("bertfast")

BACKENDS = ("auto", "triton", "cpp", "reference")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 128)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Preference order of `auto`, per op and device type.
PREFERENCE = {
    "varlen_attention": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    "add_layer_norm": {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")},
    "bias_act": {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")},
    "embed": {"cuda": ("cpp", "reference"), "cpu": ("cpp", "reference")},
    "unpad": {"cuda": ("cpp", "reference"), "cpu": ("cpp", "reference")},
    "pad": {"cuda": ("cpp", "reference"), "cpu": ("cpp", "reference")},
}
# Which ops each implementation has (module / C++ op name).
TRITON_MODULES = {"varlen_attention": "attention", "add_layer_norm": "layer_norm", "bias_act": "gelu"}
CPP_OPS = {"add_layer_norm": "add_layer_norm", "bias_act": "bias_act", "embed": "embed", "unpad": "unpad",
           "pad": "pad"}


class BackendError(RuntimeError):
    """The implementation that BERTFAST_BACKEND forces cannot run this op on this input; says why."""


# --------------------------------------------------------------------------------------------------------------
# choosing an implementation

_notices: dict[str, str] = {}   # key -> message, each logged once; `bertfast info` lists them


def notice_once(key: str, message: str) -> None:
    if key not in _notices:
        _notices[key] = message
        log.warning("bertfast: %s", message)


_ENVIRON_TYPE = type(os.environ) if os.name == "posix" and hasattr(os.environ, "_data") else None


def setting(name: str, default: str) -> str:
    """os.environ.get(name, default), stripped and lower-cased, read at each call. An unset variable costs ~2 us
    through os.environ.get (Mapping.get raises and catches a KeyError) and the settings are read on every op call
    (NOTES change 31), so on POSIX the environment's own dict (which os.environ keeps in step with every
    assignment to it) is read instead."""
    env = os.environ
    if type(env) is _ENVIRON_TYPE:      # not when os.environ is rebound (unittest.mock.patch("os.environ", {...}))
        raw = env._data.get(name.encode())
        value = default if raw is None else os.fsdecode(raw)
    else:
        value = env.get(name, default)
    return value.strip().lower() or default


def backend_setting() -> str:
    value = setting("BERTFAST_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"BERTFAST_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


@functools.lru_cache(maxsize=None)
def triton_module(op: str):
    """The bertfast.kernels module of an op, or None when triton or the module cannot be imported."""
    try:
        return importlib.import_module(f"bertfast.kernels.{TRITON_MODULES[op]}")
    except ImportError as exc:
        log.debug("bertfast: triton kernels for %s unavailable: %s", op, exc)
        return None


@functools.lru_cache(maxsize=None)
def cpp_extension_error() -> Optional[str]:
    try:
        importlib.import_module("bertfast._C")
    except ImportError as exc:
        return f"bertfast._C could not be imported ({exc})"
    _register_cpp_fakes()
    return None


@functools.lru_cache(maxsize=None)
def _register_cpp_fakes() -> None:
    """Fake kernels of the bertfast_C ops the ops layer calls outside a bertfast:: op's body (torch.compile and
    FakeTensorMode run those directly)."""
    if hasattr(torch.ops.bertfast_C, "attention_dropout_keep"):
        @torch.library.register_fake("bertfast_C::attention_dropout_keep")
        def _(first_token, count, length, heads, dropout_p, seed, device=None):
            return torch.empty((count, heads, length, length), dtype=torch.bool,
                               device=torch.device("cpu") if device is None else device)

    # the kernels that the bertfast:: ops' bodies and their backward formulas call: those run them directly in
    # eager calls, and under tracers that are not torch.compile (make_fx, AOTAutograd's own tracing) with fake
    # tensors unless _run sees the tracer first
    def rows_f32(like, n):
        return like.new_empty((n,), dtype=torch.float32)

    fakes = {
        "add_layer_norm": lambda x, w, b, eps, r, xb, act, p=0.0, seed=0: (
            torch.empty_like(x), rows_f32(x, x.shape[0]), rows_f32(x, x.shape[0]),
            x.new_empty((x.shape[0], (x.shape[1] + 7) // 8) if p > 0 else (0,), dtype=torch.uint8)),
        "add_layer_norm_backward": lambda dy, x, w, m, s, r, xb, act, p=0.0, seed=0, keep=None: (
            torch.empty_like(x), None if r is None or not (act or p > 0) else torch.empty_like(x),
            torch.empty_like(w), torch.empty_like(w), None if xb is None else torch.empty_like(xb)),
        "bias_act": lambda x, b, act: torch.empty_like(x),
        "bias_act_": lambda x, b, act: None,
        "bias_act_backward": lambda dy, x, b, act: (torch.empty_like(x), None if b is None else torch.empty_like(b)),
        "embed": lambda ids, idx, pos, tt, we, pe, te, lw, lb, eps, check=True: (
            we.new_empty((idx.shape[0], we.shape[1])), rows_f32(we, idx.shape[0]), rows_f32(we, idx.shape[0])),
        "embed_backward": lambda g, ids, idx, pos, tt, we, pe, te, lw, m, s: (
            torch.empty_like(we), torch.empty_like(pe), None if te is None else torch.empty_like(te),
            torch.empty_like(lw), torch.empty_like(lw)),
        "unpad": lambda x, idx, check=True: x.new_empty((idx.shape[0],) + tuple(x.shape[1:])),
        "pad": lambda x, idx, n, check=True: x.new_empty((n,) + tuple(x.shape[1:])),
    }
    for name, fake in fakes.items():
        if hasattr(torch.ops.bertfast_C, name):
            torch.library.register_fake(f"bertfast_C::{name}")(fake)


def cpp_built_with_cuda() -> bool:
    return cpp_extension_error() is None and bool(torch.ops.bertfast_C.built_with_cuda())


@torch.compiler.assume_constant_result
def _available(impl: str, op: str, device: torch.device) -> Optional[str]:
    """None when `impl` of `op` exists and runs on `device`, else the reason it does not. A constant of the
    process for torch.compile (called, not traced: tracing went through its lru_cache and the extension import)."""
    return _available_cached(impl, op, device.type)


def _interpreted(module) -> bool:
    """Whether the module's Triton kernels run in the interpreter. Triton decides when a kernel is defined (by
    TRITON_INTERPRET at the module's import), so setting the variable later changes nothing: on a machine with a
    GPU such kernels stay compiled ones, which take CUDA tensors only."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    from triton.runtime import KernelInterface
    for value in vars(module).values():
        for _ in range(3):   # an autotuner / heuristics wrapper holds the kernel in .fn
            if isinstance(value, InterpretedFunction):
                return True
            value = value.fn if isinstance(value, KernelInterface) else None
    return False


@functools.lru_cache(maxsize=None)
def _available_cached(impl: str, op: str, device_type: str) -> Optional[str]:
    device = torch.device(device_type)
    if impl == "reference":
        return None
    if impl == "triton":
        if op not in TRITON_MODULES:
            return "no Triton kernel for this op"
        if device.type not in ("cuda", "cpu"):
            return f"no Triton kernel for device type {device.type}"
        module = triton_module(op)
        if module is None:
            return "triton or bertfast.kernels.{} cannot be imported".format(TRITON_MODULES[op])
        if device.type == "cpu" and not _interpreted(module):
            return ("Triton kernels run on CPU tensors only in the interpreter (TRITON_INTERPRET=1 set before "
                    "bertfast.kernels is imported)")
        return None
    if impl == "cpp":
        if op not in CPP_OPS:
            return "no C++ kernel for this op"
        err = cpp_extension_error()
        if err:
            return err
        name = f"bertfast_C::{CPP_OPS[op]}"
        if not hasattr(torch.ops.bertfast_C, CPP_OPS[op]):
            return f"{name} is not in this build of bertfast._C"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU" if device.type == "cpu" else "CUDA"):
            if device.type == "cuda" and not cpp_built_with_cuda():
                return "bertfast._C was built without CUDA"
            return f"{name} has no {device.type} kernel in this build"
        return None
    raise AssertionError(impl)


_ANY_DTYPE_OPS = ("unpad", "pad")    # they copy rows as bytes (csrc/padding.cpp, csrc/cuda/padding.cu)


def _supports(impl: str, op: str, facts: dict, device_type: str) -> Optional[str]:
    """None when `impl` can serve an input with these facts on a device of this type, else the reason it cannot."""
    dtype = facts.get("dtype")
    if impl in ("triton", "cpp") and dtype is not None and dtype not in KERNEL_DTYPES \
            and op not in _ANY_DTYPE_OPS:
        return f"dtype {dtype} (kernels take float32, float16, bfloat16)"
    if impl == "triton" and op == "varlen_attention":
        if facts["head_dim"] not in ATTENTION_HEAD_DIMS:
            return f"head_dim {facts['head_dim']} (kernels take {', '.join(map(str, ATTENTION_HEAD_DIMS))})"
        from bertfast.kernels.attention import MAX_GRID_YZ
        if max(facts.get("sequences", 1), facts.get("heads", 1)) > MAX_GRID_YZ:
            return (f"{facts['sequences']} sequences of {facts['heads']} heads (the kernel's grid takes at most "
                    f"{MAX_GRID_YZ} of each per call)")
        if device_type == "cpu" and dtype == torch.bfloat16 and not _interpreter_bf16_dot_fixed():
            return ("bfloat16 in the Triton interpreter, whose tl.dot multiplies bfloat16's raw bits (triton issue "
                    "#11584; the test suite patches the interpreter)")
    if impl == "triton" and op == "add_layer_norm":
        from bertfast.kernels.config import MAX_FUSED_BACKWARD_HIDDEN, MAX_FUSED_HIDDEN
        if facts["hidden"] > MAX_FUSED_HIDDEN:
            return f"hidden size {facts['hidden']} > {MAX_FUSED_HIDDEN}"
        # a backward runs the forward's implementation (the same dropout mask), so training picks by its limit
        if facts.get("records_grad") and facts["hidden"] > MAX_FUSED_BACKWARD_HIDDEN:
            return f"hidden size {facts['hidden']} > {MAX_FUSED_BACKWARD_HIDDEN} with a gradient to compute"
    return None


def _interpreter_bf16_dot_fixed() -> bool:
    """Whether the Triton interpreter's bfloat16 tl.dot has been patched to upcast its operands (tests/conftest.py
    does; the interpreter of Triton 3.6 multiplies the raw bits, a wrong answer by orders of magnitude)."""
    from triton.runtime import interpreter
    return bool(getattr(interpreter.InterpreterBuilder, "_bertfast_bf16_patch", False))


def choose(op: str, device: torch.device, **facts) -> str:
    """The implementation of `op` that runs for an input on `device` described by `facts`."""
    setting = backend_setting()
    dev = "cuda" if device.type == "cuda" else "cpu"
    if setting == "auto":
        skipped = []
        for impl in PREFERENCE[op][dev]:
            reason = _available(impl, op, device) or _supports(impl, op, facts, dev)
            if reason is None:
                if skipped:
                    notice_once(f"{op}:{dev}:{impl}:{';'.join(skipped)}",
                                f"{op} on {dev} runs the {impl} implementation: " + "; ".join(skipped))
                return impl
            skipped.append(f"{impl} skipped: {reason}")
        raise AssertionError("the reference implementation always serves")
    if setting == "reference":
        return "reference"
    has_impl = op in (TRITON_MODULES if setting == "triton" else CPP_OPS)
    if not has_impl:
        notice_once(f"{op}:{setting}:none", f"BERTFAST_BACKEND={setting}: {op} has no {setting} "
                    f"implementation, so it runs the reference implementation")
        return "reference"
    reason = _available(setting, op, device) or _supports(setting, op, facts, dev)
    if reason is not None:
        raise BackendError(f"BERTFAST_BACKEND={setting}: the {setting} implementation of {op} cannot run "
                           f"here: {reason}. Unset BERTFAST_BACKEND (auto) to use another implementation.")
    return setting


def implementation_table(device: torch.device | str = "cpu") -> dict[str, str]:
    """op -> implementation that `auto` (or the forced backend) picks on `device` for a typical BERT input
    (fp16 on CUDA, fp32 on CPU, head dim 64, hidden 768), with the reasons for anything skipped."""
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    facts = {"varlen_attention": dict(dtype=dtype, head_dim=64), "add_layer_norm": dict(dtype=dtype, hidden=768),
             "bias_act": dict(dtype=dtype), "embed": dict(dtype=dtype), "unpad": {}, "pad": {}}
    table = {}
    dev = "cuda" if device.type == "cuda" else "cpu"
    for op in PREFERENCE:
        try:
            impl = choose(op, device, **facts[op])
        except BackendError as exc:
            table[op] = f"error: {exc}"
            continue
        setting = backend_setting()
        if setting != "auto":          # forced: nothing was skipped; say why a forced backend is not the one running
            table[op] = impl + (f"  (BERTFAST_BACKEND={setting}: {op} has no {setting} implementation)"
                                if impl != setting else "")
        else:
            skipped = [f"{i}: {_available(i, op, device) or _supports(i, op, facts[op], dev)}"
                       for i in PREFERENCE[op][dev][: PREFERENCE[op][dev].index(impl)]]
            table[op] = impl + (f"  ({'; '.join(skipped)})" if skipped else "")
        if op == "varlen_attention" and dev == "cpu" and impl == "reference":
            missing = _cpu_attention_keep_missing()
            table[op] += ("  (dropout mask: bertfast._C Philox, the GPU kernels' draw)" if missing is None
                          else f"  (dropout mask: {_torch_generator_mask(missing)})")
        if op == "embed" and dev == "cuda" and impl == "cpp":
            table[op] += "  (backward: torch autograd of the reference; bertfast._C has no CUDA embed backward)"
    return table


def _cpu_attention_keep_missing() -> Optional[str]:
    """None when bertfast._C draws the CPU attention's dropout mask, else why it cannot (read on every call: the
    extension's availability is not cached here)."""
    err = cpp_extension_error()
    if err is None and not hasattr(torch.ops.bertfast_C, "attention_dropout_keep"):
        err = "this build of bertfast._C lacks attention_dropout_keep"
    return err


def _torch_generator_mask(reason: str) -> str:
    return f"torch's generator, not the GPU kernels' draw: {reason}"


def notices() -> dict[str, str]:
    return dict(_notices)


def new_seed() -> int:
    """A dropout seed drawn from torch's default CPU generator, so torch.manual_seed makes runs repeat."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _keep_mask(shape, p: float, seed: int, device) -> Tensor:
    """The reference implementation's dropout keep-mask, regenerated identically from the seed in backward."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nan(shape, device) -> Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32, device=device)


def _grad_or_empty(grad: Optional[Tensor], inp: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom ops cannot return None: an absent input's gradient travels as an empty tensor."""
    if inp is None:
        return like.new_empty((0,))
    return grad if grad is not None else torch.zeros_like(inp)


def _empty_like_or_none(inp: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.empty_like(inp) if inp is not None else like.new_empty((0,))


@contextlib.contextmanager
def _autograd_inside_custom_op():
    """A custom op's implementation runs below the autograd dispatch key (it is excluded in the thread-local
    dispatch state), so torch ops inside it record no graph even under enable_grad. The reference backward
    re-runs its forward under autograd, so it lifts that exclusion for the recomputation only."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude.remove(torch._C.DispatchKey.AutogradFunctionality)), \
            torch.enable_grad():
        yield


def _recompute_grads(fn, inputs: list, grad_outputs: list):
    """Gradients of fn(*inputs) w.r.t. its floating-point tensor inputs, by re-running fn under autograd
    (the reference implementations' backward). Returns one entry per input (None for non-differentiable)."""
    with _autograd_inside_custom_op():
        leaves = [t.detach().requires_grad_(True) if isinstance(t, Tensor) and t.is_floating_point() else t
                  for t in inputs]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
        wrt = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    it = iter(grads)
    return [next(it) if isinstance(t, Tensor) and t.requires_grad else None for t in leaves]


def _unaliased(outs: list) -> list:
    """Custom ops may not return aliases of each other or of inputs, but gradients of inputs that are simply
    added (x and residual before a LayerNorm) are one tensor: clone repeats."""
    seen, unique = set(), []
    for t in outs:
        if isinstance(t, Tensor) and t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            seen.add(ptr)
        unique.append(t)
    return unique


def _as_rows(t: Tensor, hidden: int) -> Tensor:
    """t as contiguous [rows, hidden]; 2-D contiguous input (every call from the encoder) as it is: the no-op
    reshape / view pair cost ~2.5 us of host time a call."""
    if t.dim() == 2 and t.is_contiguous():
        return t
    return t.reshape(-1, hidden).contiguous()


_EAGER_AUTOGRAD: dict = {}   # custom op -> torch.autograd.Function running its implementation and backward formula
# custom op -> its implementation without the kernel launcher's own input checks, for _run's eager paths, whose
# public callers (add_layer_norm, bias_act) have checked the same (NOTES change 31); the registered op (torch.compile,
# direct torch.ops.bertfast calls) keeps the checks
_PRECHECKED: dict = {}


def _register_autograd(op, backward, setup_context) -> None:
    """Register `backward` / `setup_context` as the custom op's autograd formula (torch.compile, opcheck and
    higher-order gradients use that), and build the same formula as a torch.autograd.Function around the op's
    implementation for eager calls: the custom op's autograd wrapping and dispatcher trips cost ~100 us a call
    on the host, more than most of these kernels take on a GPU."""
    op.register_autograd(backward, setup_context=setup_context)
    impl = _PRECHECKED.get(op, op._init_fn)

    # forward(ctx, ...) rather than a separate setup_context staticmethod: with the latter, Function.apply binds
    # the arguments through inspect.signature on every call (~40 us)
    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = f"{op._name.split('::')[-1]}_eager"
    _EAGER_AUTOGRAD[op] = Eager


def records_grad(*args) -> bool:
    """Whether autograd records this call: gradients are enabled and a tensor among `args` requires one."""
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


_FUNCTORCH = torch._C._functorch


def _unwrap_unless_at(t: Tensor, levels) -> Optional[Tensor]:
    """t with its functorch wrappers removed, or None when one of them belongs to one of the transform levels."""
    while _FUNCTORCH.is_functorch_wrapped_tensor(t) or _FUNCTORCH.is_batchedtensor(t):
        if _FUNCTORCH.maybe_get_level(t) in levels:
            return None
        t = _FUNCTORCH.get_unwrapped(t)
    return t


def _wrapped_at(t: Tensor, levels) -> bool:
    return _unwrap_unless_at(t, levels) is None


def _carries_tangent(t: Tensor, jvp_levels) -> bool:
    base = _unwrap_unless_at(t, jvp_levels)
    return base is None or (_forward_ad._current_level >= 0 and _forward_ad.unpack_dual(base).tangent is not None)


def _refuse_transform_ad(op, args, transformed: bool) -> None:
    """The bertfast:: ops have reverse-mode formulas only: under forward-mode AD (torch.func.jvp / jacfwd,
    torch.autograd.forward_ad dual tensors) an input carrying a tangent would give an output without one, a silent
    zero. Refuse such a call instead (inputs without a tangent, e.g. a frozen encoder under a head's jvp, run).
    torch.func.grad / vjp / jacrev through an op fail inside torch's custom-op autograd (it cannot run under
    functorch, torch 2.11-2.13) with a message about autograd.Function: refused here by name (an op whose
    inputs are not differentiated by the transform runs)."""
    jvp_levels = grad_levels = ()
    if transformed:   # (the stack reads None while AOTAutograd traces)
        stack = _FUNCTORCH.get_interpreter_stack() or ()
        jvp_levels = {i.level() for i in stack if i.key() == _FUNCTORCH.TransformType.Jvp}
        grad_levels = {i.level() for i in stack if i.key() == _FUNCTORCH.TransformType.Grad}
    tensors = [a for a in args if isinstance(a, Tensor)]
    if any(_carries_tangent(a, jvp_levels) for a in tensors):
        raise NotImplementedError(
            f"{op._qualname} has no forward-mode AD (jvp) formula, so the tangent through it would be lost: use "
            f"reverse mode (loss.backward(), torch.autograd.grad), or transformers' model for jvp / jacfwd")
    if grad_levels and any(_wrapped_at(a, grad_levels) for a in tensors):
        raise NotImplementedError(
            f"{op._qualname} cannot be differentiated by torch.func.grad / vjp / jacrev (torch's custom-op autograd "
            f"does not run under functorch transforms): use loss.backward() or torch.autograd.grad, with "
            f"torch.func.functional_call for stateless parameters")


@torch.compiler.disable
def _refuse_transform_ad_compiled(op, args) -> None:
    _refuse_transform_ad(op, args, _FUNCTORCH.peek_interpreter_stack() is not None)


_FAKE_MODE, _PROXY_MODE = torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY


def _tracing() -> bool:
    """Whether a tracer other than dynamo is recording (make_fx, AOTAutograd's joint graph, FakeTensorMode): it
    must see the bertfast:: ops, which have fake kernels, not their bodies."""
    return torch._C._len_torch_dispatch_stack() > 0 and (      # (the count first: 0.1 us, what eager calls pay)
        torch._C._get_dispatch_mode(_FAKE_MODE) is not None or torch._C._get_dispatch_mode(_PROXY_MODE) is not None)


def _run(op, *args):
    """Call a bertfast:: op. Eager calls skip the custom-op dispatcher, whose host cost per call is larger than
    many of these kernels at BERT sizes: without gradients they run the implementation directly, with gradients
    they run it through the op's autograd formula as a torch.autograd.Function (_register_autograd). Calls that
    torch.compile or another tracer is recording, calls inside torch.func transforms, and ops without an autograd
    formula that a graph is being built through (a backward op under create_graph) go through the registered op."""
    if torch.compiler.is_compiling() or _tracing():
        if _forward_ad._current_level >= 0:    # (outside the graph: dynamo cannot trace the functorch queries)
            _refuse_transform_ad_compiled(op, args)
        return op(*args)
    # peek_interpreter_stack: inside torch.func transforms (vmap runs; torch.func.grad / vjp through an op are
    # refused by name: they fail in torch's custom-op autograd under functorch, torch 2.11-2.13)
    transformed = _FUNCTORCH.peek_interpreter_stack() is not None
    if transformed or _forward_ad._current_level >= 0:
        _refuse_transform_ad(op, args, transformed)
        if transformed:
            return op(*args)
    if records_grad(*args):
        eager = _EAGER_AUTOGRAD.get(op)
        return eager.apply(*args) if eager is not None else op(*args)
    return _PRECHECKED.get(op, op._init_fn)(*args)


# --------------------------------------------------------------------------------------------------------------
# varlen_attention

def _check_attention_args(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int):
    if not isinstance(qkv, Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be a tensor of shape [T, 3, heads, head_dim], got "
                         f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    if not qkv.is_floating_point():
        raise ValueError(f"qkv must be a floating-point tensor, got {qkv.dtype}")
    if qkv.shape[2] < 1 or qkv.shape[3] < 1:
        # (ATen's CPU flash attention, which the CPU path calls directly, dies of SIGFPE on 0 heads)
        raise ValueError(f"qkv must have at least one head and head_dim >= 1, got shape {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1:
        raise ValueError("qkv must be contiguous in its last dimension (head_dim)")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 1:
        got = (f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor)
               else type(cu_seqlens).__name__)
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of batch + 1 offsets (at least [0]), got {got}")
    if cu_seqlens.device != qkv.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but qkv is on {qkv.device}")
    if int(max_seqlen) < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")


def _cpu_flash(cdt: torch.dtype, dropout_p: float):
    """ATen's fused CPU attention forward and backward (what F.scaled_dot_product_attention runs on CPU), called
    directly because they return / take the log-sum-exp that lets the backward skip recomputing P: used for
    float32 compute without dropout. None where this torch lacks them (the formula backward serves then)."""
    if cdt != torch.float32 or dropout_p > 0.0:
        return None
    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or bwd is None:
        notice_once("cpu-flash", "this torch has no aten::_scaled_dot_product_flash_attention_for_cpu(_backward): "
                    "the CPU attention backward recomputes the probabilities")
        return None
    return fwd, bwd


def _cpu_bounds(cu_seqlens: Tensor, total: int) -> list[int]:
    """cu_seqlens as a list, checked (free on CPU: the values are on the host): the CPU attention reads them."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError("cu_seqlens must be monotonic non-decreasing")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at T = qkv.shape[0] = {total}, got {bounds[-1]}")
    return bounds


def _heads_first(qkv: Tensor, start: int, count: int, length: int, cdt: torch.dtype):
    """q, k, v of `count` consecutive sequences of `length` tokens from row `start`, each [count, heads, L, d]
    in cdt (views where no cast is needed): the layout the CPU attention computes in."""
    x = qkv[start:start + count * length].view(count, length, 3, qkv.shape[2], qkv.shape[3]).to(cdt)
    return x.permute(2, 0, 3, 1, 4).unbind(0)


def _cpu_attention_keep(start: int, count: int, length: int, heads: int, dropout_p: float, seed: int) -> Tensor:
    """The CPU attention's keep-mask [count, heads, L, L] of `count` sequences of `length` tokens from token row
    `start`: the mask the Triton attention kernels draw for this seed (Philox-4x32-7 of (key, query token, head)),
    drawn by bertfast._C (NOTES change 19), also under BERTFAST_BACKEND=reference (the CPU attention has no other
    implementation). Without the extension, torch's generator per sequence (seed + the sequence's first row),
    with a notice: then CPU and GPU runs of one seed drop different probabilities."""
    missing = _cpu_attention_keep_missing()
    if missing is None:
        return torch.ops.bertfast_C.attention_dropout_keep(start, count, length, heads, dropout_p, seed)
    notice_once("attention-dropout-mask", f"the CPU attention's dropout mask: {_torch_generator_mask(missing)}")
    return torch.stack([_keep_mask((heads, length, length), dropout_p, seed + start + b * length, "cpu")
                        for b in range(count)])


def _cpu_probs(q: Tensor, k: Tensor, scale: float, dropout_p: float, seed: int, start: int):
    """(P, keep-mask or None) of the sequences in q, k ([count, heads, L, d], from token row `start`), each
    [count, heads, L, L]: one expression for the CPU attention's forward and its backward's recomputation, so
    that the backward sees the forward's P and mask."""
    probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    if dropout_p == 0.0:
        return probs, None
    count, heads, length, _ = q.shape
    return probs, _cpu_attention_keep(start, count, length, heads, dropout_p, seed)


_ATTN_BLOCK_BYTES = 1 << 20


def _length_runs(bounds: list[int], heads: int, capped: bool):
    """(count, start, length) of the runs of consecutive sequences of one length (empty ones skipped): a whole run
    at once, or with `capped` as many of its sequences as keep a [count, heads, L, L] fp32 temporary within
    _ATTN_BLOCK_BYTES (cache-sized: larger blocks were slower with dropout's extra temporaries, NOTES change 20)."""
    b, batch = 0, len(bounds) - 1
    while b < batch:
        length = bounds[b + 1] - bounds[b]
        per_seq = max(heads * length * length * 4, 1)
        count = 1
        while (b + count < batch and bounds[b + count + 1] - bounds[b + count] == length
               and (not capped or (count + 1) * per_seq <= _ATTN_BLOCK_BYTES)):
            count += 1
        if length > 0:
            yield count, bounds[b], length
        b += count


def _attention_cpu(qkv: Tensor, cu_seqlens: Tensor, scale: float, dropout_p: float,
                   seed: int) -> tuple[Tensor, Tensor]:
    """CPU attention of each packed sequence over itself: (out [T, heads, d] in qkv's dtype, lse [heads, T] fp32,
    the log-sum-exp of each query's scaled scores where ATen's fused kernel gives it (float32 compute, no
    dropout), NaN elsewhere). No compute on padding (the host already has cu_seqlens); the fused CPU kernel takes
    4-D [batch, heads, L, d] only, so consecutive sequences of one length go through it (or the formulas) as one
    batch."""
    total, _, heads, head_dim = qkv.shape
    cdt = _compute_dtype(qkv.dtype)
    flash = _cpu_flash(cdt, dropout_p)
    lse = _nan((heads, total), qkv.device)
    bounds = _cpu_bounds(cu_seqlens, total)   # so every row of out belongs to one sequence
    out = qkv.new_empty((total, heads, head_dim))
    for count, start, length in _length_runs(bounds, heads, capped=not flash):
        end = start + count * length
        q, k, v = _heads_first(qkv, start, count, length, cdt)                       # each [count, heads, L, d]
        if dropout_p > 0.0:
            probs, keep = _cpu_probs(q, k, scale, dropout_p, seed, start)
            o = (probs * keep / (1.0 - dropout_p)) @ v
        elif flash:
            o, l = flash[0](q, k, v, 0.0, False, attn_mask=None, scale=scale)    # l: [count, heads, L]
            lse[:, start:end] = l.transpose(0, 1).reshape(heads, count * length)
        else:
            o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out[start:end] = o.transpose(1, 2).reshape(count * length, heads, head_dim)
    return out, lse


def _attention_reference(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float, dropout_p: float,
                         seed: int) -> Tensor:
    """Attention of each packed sequence over itself; computes in float32 (float64 for float64 input)."""
    if qkv.device.type == "cpu":
        return _attention_cpu(qkv, cu_seqlens, scale, dropout_p, seed)[0]
    return _attention_padded(qkv, cu_seqlens, max_seqlen, scale, dropout_p, seed)


def _attention_padded(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float, dropout_p: float,
                      seed: int) -> Tensor:
    """The reference attention on a GPU: every sequence padded to max_seqlen, no host read (it runs on any
    device; the tests run it on CPU against _attention_cpu)."""
    total, _, heads, head_dim = qkv.shape
    batch = cu_seqlens.numel() - 1
    cdt = _compute_dtype(qkv.dtype)
    if total == 0:
        return qkv.new_empty((0, heads, head_dim))
    # CUDA: pad to [B, heads, max_seqlen, d] on the device (no host read) and mask the padded keys with the
    # dtype's lowest finite value, not -inf: an empty sequence's rows then get finite (unused) probabilities
    # instead of NaN, whose backward (NaN * 0) spread NaN into the rows its clamped indices read
    seqlens = cu_seqlens[1:] - cu_seqlens[:-1]
    pos = torch.arange(max_seqlen, device=qkv.device)
    valid = pos[None, :] < seqlens[:, None]                                  # [B, S]
    src = (cu_seqlens[:-1, None].long() + pos[None, :]).clamp(max=total - 1)
    padded = qkv[src.flatten()].view(batch, max_seqlen, 3, heads, head_dim).to(cdt)
    q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)                       # each [B, heads, S, d]
    bias = torch.zeros(valid.shape, dtype=cdt, device=qkv.device).masked_fill(~valid, torch.finfo(cdt).min)
    scores = (q @ k.transpose(-1, -2)) * scale + bias[:, None, None, :]
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = probs * _keep_mask(probs.shape, dropout_p, seed, qkv.device) / (1.0 - dropout_p)
    o = (probs @ v).transpose(1, 2)                                           # [B, S, heads, d]
    # each packed row's (sequence, position), found on the device: boolean indexing (o[valid]) reads the mask's
    # count on the host, a sync per layer that also breaks graph capture
    tok = torch.arange(total, device=qkv.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens, tok, right=True) - 1
    return o[seq.long(), (tok - cu_seqlens[seq]).long()].to(qkv.dtype)


def _attention_backward_cpu(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor, scale: float,
                            dropout_p: float, seed: int) -> Tensor:
    """dqkv of _attention_cpu, blocks of sequences of one length at a time, each sequence's rows of dqkv written
    once (re-running the forward under autograd cost a full-size zero gradient per sequence, summed: NOTES change
    16). Without dropout in float32: ATen's fused CPU backward from the forward's out and lse. Otherwise the
    gradient's formulas, with P and the keep-mask recomputed as the forward computed them (the same expression,
    the same seeds). Computes in float32 (float64 for float64 input); the fused backward's row sums of dO * O use
    the forward's output as returned, rounded to qkv's dtype (as flash attention's backward does)."""
    total, _, heads, head_dim = qkv.shape
    cdt = _compute_dtype(qkv.dtype)
    bounds = _cpu_bounds(cu_seqlens, total)   # so every row of dqkv belongs to one sequence
    dqkv = qkv.new_empty(qkv.shape)

    flash = _cpu_flash(cdt, dropout_p)

    def block(count: int, start: int, length: int) -> None:
        """`count` sequences, all `length` tokens long, rows start .. start+count*length-1."""
        end = start + count * length
        q, k, v = _heads_first(qkv, start, count, length, cdt)                        # each [count, heads, L, d]
        do = dout[start:end].view(count, length, heads, head_dim).to(cdt).transpose(1, 2)
        rows = dqkv[start:end].view(count, length, 3, heads, head_dim)
        if flash:
            o = out[start:end].view(count, length, heads, head_dim).to(cdt).transpose(1, 2)
            l = lse[:, start:end].view(heads, count, length).transpose(0, 1).contiguous()
            dq, dk, dv = flash[1](do, q, k, v, o, l, 0.0, False, attn_mask=None, scale=scale)
            for i, g in enumerate((dq, dk, dv)):
                rows[:, :, i] = g.transpose(1, 2)
            return
        probs, keep = _cpu_probs(q, k, scale, dropout_p, seed, start)                 # [count, heads, L, L]
        dp = do @ v.transpose(-1, -2)
        if keep is not None:
            dv = (probs * keep / (1.0 - dropout_p)).transpose(-1, -2) @ do
            dp = dp * keep / (1.0 - dropout_p)
        else:
            dv = probs.transpose(-1, -2) @ do
        ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))
        rows[:, :, 0] = (ds @ k).mul_(scale).transpose(1, 2)
        rows[:, :, 1] = (ds.transpose(-1, -2) @ q).mul_(scale).transpose(1, 2)
        rows[:, :, 2] = dv.transpose(1, 2)

    # sequences of one length together: a whole run for the fused kernel, cache-sized blocks for the formulas
    for count, start, length in _length_runs(bounds, heads, capped=not flash):
        block(count, start, length)
    return dqkv


def _fp32_precision(dtype) -> str:
    """The dot precision of fp32 attention (fp16 / bf16 ignore it: "tf32"): torch's rule for fp32 CUDA matmuls,
    torch.backends.cuda.matmul.fp32_precision, else the generic torch.backends.fp32_precision, else the legacy
    allow_tf32 (reading that raises once the new setting is used). Asked on every attention call, so only for fp32."""
    if dtype != torch.float32:
        return "tf32"
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", "none")
    if setting == "none":  # torch versions whose matmul setting does not read the generic one
        setting = getattr(torch.backends, "fp32_precision", "none")
    if setting != "none":
        return "tf32" if setting == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 else "ieee"


@torch.library.custom_op("bertfast::varlen_attention", mutates_args=())
def _varlen_attention_op(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, softmax_scale: float,
                         dropout_p: float, seed: int, impl: str) -> tuple[Tensor, Tensor]:
    if impl == "triton" and qkv.shape[0] == 0:   # no token (e.g. an all-padding batch): max_seqlen may be 0
        return qkv.new_empty((0, qkv.shape[2], qkv.shape[3])), qkv.new_empty((qkv.shape[2], 0), dtype=torch.float32)
    if impl == "triton":
        out, lse = triton_module("varlen_attention").attention_forward(
            qkv, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed, _fp32_precision(qkv.dtype),
            validate=False)
        return out, lse
    if qkv.device.type == "cpu":
        return _attention_cpu(qkv, cu_seqlens, softmax_scale, dropout_p, seed)
    out = _attention_reference(qkv, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed)
    return out, _nan((qkv.shape[2], qkv.shape[0]), qkv.device)


@_varlen_attention_op.register_fake
def _(qkv, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed, impl):
    return (qkv.new_empty((qkv.shape[0], qkv.shape[2], qkv.shape[3])),
            qkv.new_empty((qkv.shape[2], qkv.shape[0]), dtype=torch.float32))


@torch.library.custom_op("bertfast::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                                  max_seqlen: int, softmax_scale: float, dropout_p: float, seed: int,
                                  impl: str) -> Tensor:
    if impl == "triton" and qkv.shape[0] == 0:
        return torch.zeros_like(qkv)
    if impl == "triton":
        return triton_module("varlen_attention").attention_backward(
            dout, qkv, out, lse, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed,
            _fp32_precision(qkv.dtype))
    if qkv.device.type == "cpu":
        return _attention_backward_cpu(dout, qkv, out, lse, cu_seqlens, softmax_scale, dropout_p, seed)
    (dqkv,) = _recompute_grads(
        lambda t: _attention_reference(t, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed), [qkv], [dout])
    return dqkv if dqkv is not None else torch.zeros_like(qkv)


@_varlen_attention_backward_op.register_fake
def _(dout, qkv, out, lse, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed, impl):
    return torch.empty_like(qkv)


def _attention_setup(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed, impl = inputs
    ctx.save_for_backward(qkv, output[0], output[1], cu_seqlens)
    ctx.args = (max_seqlen, softmax_scale, dropout_p, seed, impl)


def _attention_backward(ctx, dout, dlse):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    dqkv = _run(_varlen_attention_backward_op, dout.contiguous(), qkv, out, lse, cu_seqlens, *ctx.args)
    return dqkv, None, None, None, None, None, None


_register_autograd(_varlen_attention_op, _attention_backward, _attention_setup)


def varlen_attention(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, softmax_scale: float | None = None,
                     dropout_p: float = 0.0, validate: bool = True) -> Tensor:
    """Non-causal attention of each packed sequence over itself.

    qkv:        (T, 3, heads, head_dim) - queries, keys, values of the T packed tokens (the QKV GEMM's output
                viewed as [T, 3, heads, head_dim]); last dim contiguous
    cu_seqlens: (batch + 1,) int32 - sequence b is rows cu_seqlens[b] : cu_seqlens[b+1]
    max_seqlen: python int, the longest sequence (no host read is made for it)
    softmax_scale: default 1 / sqrt(head_dim);  dropout_p: dropout on the probabilities (training)
    validate:   check cu_seqlens' values (start 0, non-decreasing, end at T, longest <= max_seqlen) before a
                kernel trusts them: one host read on a GPU. bertfast's encoder, which builds cu_seqlens itself,
                passes False.
    returns     (T, heads, head_dim) in qkv's dtype
    """
    _check_attention_args(qkv, cu_seqlens, max_seqlen)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(qkv.shape[-1])
    impl = choose("varlen_attention", qkv.device, dtype=qkv.dtype, head_dim=qkv.shape[-1],
                  sequences=cu_seqlens.shape[0] - 1, heads=qkv.shape[2])
    cu_seqlens = cu_seqlens.contiguous()       # the kernels read it by address
    if cu_seqlens.numel() == 1:                # no sequence: nothing to attend
        if qkv.shape[0]:
            raise ValueError(f"cu_seqlens [0] describes no sequence but qkv holds {qkv.shape[0]} tokens")
        return qkv[:, 0].clone()                   # [0, heads, head_dim], linked to qkv for autograd
    if validate:
        check_cu_seqlens(cu_seqlens, qkv.shape[0], int(max_seqlen))
    seed = new_seed() if dropout_p > 0.0 else 0
    return _run(_varlen_attention_op, qkv, cu_seqlens, int(max_seqlen), scale, float(dropout_p), seed, impl)[0]


# --------------------------------------------------------------------------------------------------------------
# bias + activation

def _activation(z: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "relu":
        return F.relu(z)
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def _bias_act_reference(x: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    cdt = _compute_dtype(x.dtype)
    z = x.to(cdt) if bias is None else x.to(cdt) + bias.to(cdt)
    return _activation(z, activation).to(x.dtype)


def _bias_act_impl(x: Tensor, bias: Optional[Tensor], activation: str, impl: str, validate: bool = True) -> Tensor:
    if impl == "triton":
        return triton_module("bias_act").bias_act_forward(x, bias, activation, validate=validate)
    if impl == "cpp":
        return torch.ops.bertfast_C.bias_act(x, bias, activation)
    return _bias_act_reference(x, bias, activation)


@torch.library.custom_op("bertfast::bias_act", mutates_args=())
def _bias_act_op(x: Tensor, bias: Optional[Tensor], activation: str, impl: str) -> Tensor:
    return _bias_act_impl(x, bias, activation, impl)


# eager calls from bias_act, which has checked the inputs: the launcher's own checks would repeat them
_PRECHECKED[_bias_act_op] = functools.partial(_bias_act_impl, validate=False)


@_bias_act_op.register_fake
def _(x, bias, activation, impl):
    return torch.empty_like(x)


@torch.library.custom_op("bertfast::bias_act_backward", mutates_args=())
def _bias_act_backward_op(dy: Tensor, x: Tensor, bias: Optional[Tensor], activation: str,
                          impl: str) -> list[Tensor]:
    """-> [dx, dbias] (dbias empty when bias is None)"""
    if impl == "triton":
        dx, dbias = triton_module("bias_act").bias_act_backward(dy, x, bias, activation)
    elif impl == "cpp":
        dx, dbias = torch.ops.bertfast_C.bias_act_backward(dy, x, bias, activation)
    else:
        dx, dbias = _recompute_grads(lambda a, b: _bias_act_reference(a, b, activation), [x, bias], [dy])
    return _unaliased([dx, _grad_or_empty(dbias, bias, x)])


@_bias_act_backward_op.register_fake
def _(dy, x, bias, activation, impl):
    return [torch.empty_like(x), _empty_like_or_none(bias, x)]


def _bias_act_setup(ctx, inputs, output):
    x, bias, activation, impl = inputs
    ctx.save_for_backward(x, bias)
    ctx.args = (activation, impl)


def _bias_act_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = _run(_bias_act_backward_op, dy.contiguous(), x, bias, *ctx.args)
    return dx, (dbias if bias is not None else None), None, None


_register_autograd(_bias_act_op, _bias_act_backward, _bias_act_setup)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The lower-precision dtype of torch.autocast when it is on for this device type, else None."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _check_same(name: str, t: Optional[Tensor], x: Tensor, what: str, shape=None):
    if t is None:
        return
    if t.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {what} has dtype {x.dtype}; they must match")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {what} is on {x.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_bias_act(x: Tensor, bias: Optional[Tensor], activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of shape [..., I] (at least 1-D), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    _check_same("bias", bias, x, "x", shape=(x.shape[-1],))


def _autocast_bias(x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """Under torch.autocast a GEMM's output (x, lower precision) meets the model's fp32 bias: the bias is cast to
    x's dtype, as autocast casts a Linear's bias, so the result has the dtype transformers' Linear + activation
    gives. Outside autocast a dtype mismatch stays an error."""
    if (bias is not None and isinstance(x, Tensor) and bias.dtype != x.dtype and x.is_floating_point()
            and bias.is_floating_point() and autocast_dtype(x.device) is not None):
        return bias.to(x.dtype)
    return bias


def bias_act(x: Tensor, bias: Optional[Tensor], activation: str = "gelu") -> Tensor:
    """activation(x + bias) over [..., I]; activation "gelu" (exact erf), "gelu_tanh", "relu" or "silu".
    Under torch.autocast the bias is cast to x's dtype (as a Linear's bias is)."""
    bias = _autocast_bias(x, bias)
    _check_bias_act(x, bias, activation)
    shape = x.shape
    impl = choose("bias_act", x.device, dtype=x.dtype)
    y = _run(_bias_act_op, _as_rows(x, shape[-1]), bias.contiguous() if bias is not None else None, activation,
             impl)
    return y if x.dim() == 2 else y.view(shape)


@torch.library.custom_op("bertfast::bias_act_", mutates_args=("x",))
def _bias_act_inplace_op(x: Tensor, bias: Optional[Tensor], activation: str, impl: str) -> None:
    if impl == "cpp":
        torch.ops.bertfast_C.bias_act_(x, bias, activation)
    else:  # the Triton kernel and the reference write a new tensor: same result, no memory saved
        x.copy_(_bias_act_op._init_fn(x, bias, activation, impl))


@_bias_act_inplace_op.register_fake
def _(x, bias, activation, impl):
    return None


def bias_act_(x: Tensor, bias: Optional[Tensor], activation: str = "gelu") -> Tensor:
    """bias_act written over x (contiguous), for inference: returns x. With the C++ implementation (the CPU
    default) no output is allocated; a large new one costs more in fresh pages than the arithmetic (NOTES change
    23). x must not need a gradient: nothing is recorded for autograd."""
    bias = _autocast_bias(x, bias)
    _check_bias_act(x, bias, activation)
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous to be written in place, got strides {x.stride()} for shape "
                         f"{tuple(x.shape)}")
    if records_grad(x, bias):
        raise ValueError("bias_act_ records no gradient, but x or bias requires grad: use bias_act, or call it "
                         "under torch.no_grad() / torch.inference_mode()")
    if x.numel() == 0:
        return x
    impl = choose("bias_act", x.device, dtype=x.dtype)
    _run(_bias_act_inplace_op, x if x.dim() == 2 else x.view(-1, x.shape[-1]),
         bias.contiguous() if bias is not None else None, activation, impl)
    # _run's eager path skips the dispatcher's in-place bookkeeping: mark x modified, so that autograd refuses a
    # graph that saved x before this call instead of computing wrong gradients (as for torch's relu_)
    torch.autograd.graph.increment_version(x)
    return x


def bias_gelu(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """GELU(x + bias); approximate "none" = exact erf (BERT's gelu), "tanh" = gelu_new / gelu_pytorch_tanh."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return bias_act(x, bias, "gelu" if approximate == "none" else "gelu_tanh")


# --------------------------------------------------------------------------------------------------------------
# linear_act: activation(x @ weight^T + bias), the FFN up-projection, with cuBLASLt's fused epilogue where it pays

# activations cuBLASLt's epilogue computes, and the bertfast_C::linear_act epilogue that does
LINEAR_EPILOGUES = {"gelu_tanh": "bias_gelu_tanh", "relu": "bias_relu"}
LINEAR_EPILOGUE_SETTINGS = ("auto", "on", "off", "approximate")
# `auto` fuses where the GPU's benchmark measured the fused epilogue at least this much faster (below: noise)
LINEAR_EPILOGUE_MIN_SPEEDUP = 1.02


def linear_epilogue_setting() -> str:
    """BERTFAST_LINEAR_EPILOGUE (read at each call): auto (default) fuses the FFN up-projection's bias and activation
    into its GEMM where the benchmark measured that faster on a GPU of this name (bertfast/measured.py); on fuses
    wherever it can run; approximate is on, and exact-erf GELU FFNs take the tanh GELU epilogue too (an
    approximation: |gelu - gelu_tanh| <= 4.8e-4); off never fuses."""
    value = setting("BERTFAST_LINEAR_EPILOGUE", "auto")
    if value not in LINEAR_EPILOGUE_SETTINGS:
        raise ValueError(f"BERTFAST_LINEAR_EPILOGUE={value!r} is not one of {', '.join(LINEAR_EPILOGUE_SETTINGS)}")
    return value


@functools.lru_cache(maxsize=None)
def device_name(device_type: str, index: Optional[int]) -> str:
    """The name the benchmark results record for a device (torch.cuda.get_device_name on CUDA)."""
    return torch.cuda.get_device_name(index) if device_type == "cuda" else device_type


_PLAIN = (Tensor, torch.nn.Parameter)


def _linear_epilogue(device: torch.device, dtype: torch.dtype, activation: str, has_bias: bool, records: bool,
                     plain: bool = True) -> tuple[Optional[str], str]:
    """(the bertfast_C::linear_act epilogue that serves this FFN up-projection, or None for F.linear + bias_act;
    why): the reasons are what `bertfast info` prints. Runs once a layer on the eager path, so the cheap refusals
    come first (exact GELU under `auto`: ~1 us; a layer that could fuse but has no kernel on this device: ~2 us).
    plain: x, weight and bias are plain tensors (not a quantised or distributed weight's subclass, which F.linear
    dispatches to its own implementation)."""
    if records:
        return None, "a gradient is recorded (the fused epilogue keeps nothing for a backward)"
    setting = linear_epilogue_setting()
    if setting == "off":
        return None, "BERTFAST_LINEAR_EPILOGUE=off"
    epilogue = LINEAR_EPILOGUES.get(activation)
    if epilogue is None and activation == "gelu" and setting == "approximate":
        epilogue = LINEAR_EPILOGUES["gelu_tanh"]
    if epilogue is None:
        return None, ("cuBLASLt's GELU epilogue is the tanh form; BERTFAST_LINEAR_EPILOGUE=approximate opts in "
                      "to it for exact-erf GELU" if activation == "gelu"
                      else f"cuBLASLt has no {activation} epilogue")
    if not has_bias:
        return None, "the linear has no bias"
    if not plain:
        return None, "a tensor subclass among x, weight, bias (F.linear dispatches it to the subclass)"
    reason = _linear_kernel_missing(device.type)
    if reason is None:
        backend = backend_setting()
        if backend in ("triton", "reference"):
            reason = f"BERTFAST_BACKEND={backend}"
        elif dtype not in KERNEL_DTYPES:
            reason = f"dtype {dtype} (the epilogue takes float32, float16, bfloat16)"
    if reason is not None:
        if setting != "auto":
            notice_once(f"linear-epilogue:{setting}:{device.type}:{reason}",
                        f"BERTFAST_LINEAR_EPILOGUE={setting}: the fused epilogue does not run on {device.type}: "
                        f"{reason}")
        return None, reason
    if torch.compiler.is_compiling():
        return None, "under torch.compile (inductor fuses its own epilogue)"
    if _FUNCTORCH.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0:
        return None, "under a torch.func transform or forward-mode AD (the epilogue has no rule for them)"
    if autocast_dtype(device) is not None:
        return None, ("under torch.autocast (F.linear reuses autocast's cast of each weight; the epilogue would "
                      "cast the weights at every call)")
    return _linear_epilogue_measured(setting, device.type, device.index, dtype, epilogue, activation)


@functools.lru_cache(maxsize=None)
def _linear_kernel_missing(device_type: str) -> Optional[str]:
    """None when bertfast_C::linear_act has a kernel for the device type, else why not."""
    reason = cpp_extension_error()
    if reason is None and not hasattr(torch.ops.bertfast_C, "linear_act"):
        reason = "bertfast_C::linear_act is not in this build of bertfast._C"
    if reason is None:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key("bertfast_C::linear_act", key):
            reason = ("bertfast._C was built without CUDA" if device_type == "cuda" and not cpp_built_with_cuda()
                      else f"bertfast_C::linear_act has no {device_type} kernel")
    return reason


@functools.lru_cache(maxsize=None)
def _linear_epilogue_measured(setting: str, device_type: str, index: Optional[int], dtype: torch.dtype,
                              epilogue: str, activation: str) -> tuple[Optional[str], str]:
    if setting != "auto":
        return epilogue, f"BERTFAST_LINEAR_EPILOGUE={setting}"
    from bertfast import measured
    name = device_name(device_type, index)
    key = f"{activation}/{str(dtype).replace('torch.', '')}"
    found = measured.LINEAR_EPILOGUE.get(name, {}).get(key)
    if found is None:
        return None, (f"not measured for {key} on {name} (python -m benchmarks.bench_linear_act, then python -m "
                      f"benchmarks.decide; BERTFAST_LINEAR_EPILOGUE=on fuses regardless)")
    speedup, source = found
    verdict = f"measured {speedup:.2f}x the unfused path for {key} on {name} ({source})"
    return (epilogue, verdict) if speedup >= LINEAR_EPILOGUE_MIN_SPEEDUP else (None, verdict)


def _linear_epilogue_cache_clear() -> None:
    """Forget the cached parts of the decision (tests that register a kernel or change the measured table)."""
    _linear_kernel_missing.cache_clear()
    _linear_epilogue_measured.cache_clear()


def linear_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str = "gelu") -> Tensor:
    """activation(x @ weight^T + bias) for x [..., K], an nn.Linear's weight [O, K] and bias [O]: the FFN
    up-projection. Where BERTFAST_LINEAR_EPILOGUE decides so (see linear_epilogue_setting; `bertfast info` shows
    it), the bias and activation run in the GEMM's epilogue (bertfast_C::linear_act, cuBLASLt): at inference, on
    plain tensors, outside torch.autocast / torch.compile / torch.func. Otherwise torch's GEMM, then bias_act, in
    place over the GEMM's output for CPU inference outside torch.compile / torch.func (NOTES change 23)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or weight.dim() != 2 or x.dim() < 1 \
            or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_act takes x [..., K] and weight [O, K], got x "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__} and weight "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    # a weight / bias of another dtype or device is named (under autocast F.linear casts them itself); the
    # attribute compares first, as this runs once per layer on the eager GPU path's host time
    odd = weight.dtype != x.dtype or weight.device != x.device or (bias is not None and (
        bias.dtype != x.dtype or bias.device != x.device or bias.shape != (weight.shape[0],)))
    if odd and autocast_dtype(x.device) is None:
        _check_same("weight", weight, x, "x")
        _check_same("bias", bias, x, "x", shape=(weight.shape[0],))
    plain = type(x) is Tensor and type(weight) in _PLAIN and type(bias) in _PLAIN
    records = records_grad(x, weight, bias)
    epilogue, _ = _linear_epilogue(x.device, x.dtype, activation, bias is not None, records, plain)
    if epilogue is not None:    # (never under autocast: see _linear_epilogue)
        y = torch.ops.bertfast_C.linear_act(_as_rows(x, x.shape[-1]), weight.contiguous(), bias.contiguous(),
                                            epilogue)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, weight)    # (y records a gradient exactly when x or weight does)
    if y.device.type == "cpu" and not records and not torch.compiler.is_compiling() \
            and _FUNCTORCH.peek_interpreter_stack() is None:     # (an in-place op has no vmap rule)
        return bias_act_(y, bias, activation)
    return bias_act(y, bias, activation)


def linear_epilogue_table(device: torch.device | str, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """activation -> what an inference FFN up-projection with it runs on `device` in `dtype`, and why."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    table = {}
    for activation in ACTIVATIONS:
        epilogue, why = _linear_epilogue(device, dtype, activation, True, False)
        table[activation] = (f"fused {epilogue}" if epilogue else "F.linear + bias_act") + f"  ({why})"
    return table


# --------------------------------------------------------------------------------------------------------------
# add_layer_norm: LayerNorm(dropout(act(x + x_bias)) + residual)

def _layer_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Optional[Tensor],
                          x_bias: Optional[Tensor], activation: str, dropout_p: float, seed: int):
    cdt = _compute_dtype(x.dtype)
    z = x.to(cdt)
    if x_bias is not None:
        z = z + x_bias.to(cdt)
    if activation:
        z = _activation(z, activation)
    if dropout_p > 0.0:
        z = z * _keep_mask(z.shape, dropout_p, seed, z.device) / (1.0 - dropout_p)
    if residual is not None:
        z = z + residual.to(cdt)
    y, mean, rstd = torch.native_layer_norm(z, (z.shape[-1],), weight.to(cdt), bias.to(cdt), eps)
    return y.to(x.dtype), mean.view(-1).float(), rstd.view(-1).float()


def _add_layer_norm_impl(x, weight, bias, eps, residual, x_bias, activation, dropout_p, seed, impl,
                         validate: bool = True):
    if impl == "cpp":
        return tuple(torch.ops.bertfast_C.add_layer_norm(x, weight, bias, eps, residual, x_bias, activation,
                                                         dropout_p, seed))
    if impl == "triton":
        out = triton_module("add_layer_norm").add_layer_norm_forward(
            x, weight, bias, eps, residual, x_bias, activation or None, dropout_p, seed, validate=validate)
    else:
        out = _layer_norm_reference(x, weight, bias, eps, residual, x_bias, activation, dropout_p, seed)
    return (*out, x.new_empty((0,), dtype=torch.uint8))


@torch.library.custom_op("bertfast::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Optional[Tensor],
                       x_bias: Optional[Tensor], activation: str, dropout_p: float, seed: int,
                       impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (y, mean, rstd, keep): keep is the C++ CPU kernel's dropout keep-mask in bits (uint8 [N, ceil(H / 8)]),
    which its backward reads instead of drawing the mask again; uint8 [0] elsewhere (the GPU redraws it)."""
    return _add_layer_norm_impl(x, weight, bias, eps, residual, x_bias, activation, dropout_p, seed, impl)


# eager calls from add_layer_norm, which has checked the inputs (and passes 2-D contiguous rows): the launcher's
# own checks would repeat them
_PRECHECKED[_add_layer_norm_op] = functools.partial(_add_layer_norm_impl, validate=False)


def _keep_bits_shape(x: Tensor, dropout_p: float, impl: str) -> tuple[int, ...]:
    return (x.shape[0], (x.shape[1] + 7) // 8) if impl == "cpp" and dropout_p > 0.0 else (0,)


@_add_layer_norm_op.register_fake
def _(x, weight, bias, eps, residual, x_bias, activation, dropout_p, seed, impl):
    n = x.shape[0]
    return (torch.empty_like(x), x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32),
            x.new_empty(_keep_bits_shape(x, dropout_p, impl), dtype=torch.uint8))


@torch.library.custom_op("bertfast::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(
        dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor, eps: float,
        residual: Optional[Tensor], x_bias: Optional[Tensor], activation: str, dropout_p: float, seed: int,
        impl: str, keep: Optional[Tensor] = None) -> list[Tensor]:
    """-> [dx, dresidual, dweight, dbias, dx_bias] (empty tensors for absent residual / x_bias). keep: the
    forward's keep bits (read by the C++ kernel instead of redrawing the mask; the other impls redraw it)."""
    # the Triton and C++ backwards return the gradient of the pre-LN sum as dresidual, and None where that
    # equals dx (no activation, no dropout): then this op returns an empty dresidual and the autograd formula
    # uses dx for both
    shared = _residual_grad_is_dx(activation, dropout_p, impl)
    if impl == "triton":
        dx, dres, dw, db, dxb = triton_module("add_layer_norm").add_layer_norm_backward(
            dy, x, weight, bias, mean, rstd, residual, x_bias, activation or None, dropout_p, seed,
            residual_grad_is_dx=shared)
    elif impl == "cpp":
        dx, dres, dw, db, dxb = torch.ops.bertfast_C.add_layer_norm_backward(
            dy, x, weight, mean, rstd, residual, x_bias, activation, dropout_p, seed, keep)
    else:
        dx, dw, db, dres, dxb = _recompute_grads(
            lambda a, w, b, r, xb: _layer_norm_reference(a, w, b, eps, r, xb, activation, dropout_p, seed)[0],
            [x, weight, bias, residual, x_bias], [dy])
    dres = x.new_empty((0,)) if shared else _grad_or_empty(dres, residual, x)
    return _unaliased([dx, dres, dw, db, _grad_or_empty(dxb, x_bias, x)])


def _residual_grad_is_dx(activation: str, dropout_p: float, impl: str) -> bool:
    """Whether add_layer_norm_backward leaves dresidual empty because it equals dx (the Triton and C++
    backwards with no activation and no dropout: one [N, H] tensor less)."""
    return impl in ("triton", "cpp") and not activation and dropout_p == 0.0


@_add_layer_norm_backward_op.register_fake
def _(dy, x, weight, bias, mean, rstd, eps, residual, x_bias, activation, dropout_p, seed, impl, keep=None):
    if _residual_grad_is_dx(activation, dropout_p, impl):
        residual = None
    return [torch.empty_like(x), _empty_like_or_none(residual, x), torch.empty_like(weight),
            torch.empty_like(bias), _empty_like_or_none(x_bias, x)]


def _add_layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps, residual, x_bias, activation, dropout_p, seed, impl = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2], residual, x_bias, output[3])
    ctx.args = (eps, activation, dropout_p, seed, impl)


def _add_layer_norm_backward(ctx, dy, dmean, drstd, dkeep):
    x, weight, bias, mean, rstd, residual, x_bias, keep = ctx.saved_tensors
    eps, activation, dropout_p, seed, impl = ctx.args
    dx, dres, dw, db, dxb = _run(_add_layer_norm_backward_op, dy.contiguous(), x, weight, bias, mean, rstd, eps,
                                 residual, x_bias, activation, dropout_p, seed, impl, keep)
    if residual is not None and _residual_grad_is_dx(activation, dropout_p, impl):
        dres = dx
    return (dx, dw, db, None, dres if residual is not None else None, dxb if x_bias is not None else None,
            None, None, None, None)


_register_autograd(_add_layer_norm_op, _add_layer_norm_backward, _add_layer_norm_setup)


def add_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Optional[Tensor] = None,
                   x_bias: Optional[Tensor] = None, activation: Optional[str] = None,
                   dropout_p: float = 0.0) -> Tensor:
    """LayerNorm(dropout(act(x + x_bias)) + residual) over the last dim, statistics in fp32.

    x, residual: (..., H) same dtype;  weight, bias, x_bias: (H,) same dtype as x
    activation: None | "gelu" | "gelu_tanh" | "relu" | "silu";  dropout_p: before the residual (training)
    Under torch.autocast, inputs of different dtypes (a GEMM's lower-precision output, the model's fp32 weights and
    residual) are computed in the widest of them; the output has the dtype torch's layer_norm gives under autocast
    (fp32 on CUDA; on the CPU the dtype of x + residual).
    """
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    out_dtype = None
    dt = x.dtype
    if (weight.dtype != dt or bias.dtype != dt or (residual is not None and residual.dtype != dt)
            or (x_bias is not None and x_bias.dtype != dt)) and autocast_dtype(x.device) is not None \
            and all(t.is_floating_point() for t in (residual, weight, bias, x_bias) if isinstance(t, Tensor)):
        given = [t for t in (residual, weight, bias, x_bias) if isinstance(t, Tensor)]
        # computed in the widest dtype; the result has the dtype torch gives under autocast: fp32 on CUDA (its
        # layer_norm autocasts to fp32), on the CPU the dtype of x + residual (layer_norm keeps its input's dtype)
        cdt = functools.reduce(torch.promote_types, [t.dtype for t in given], x.dtype)
        out_dtype = torch.float32 if x.device.type == "cuda" else \
            (torch.promote_types(x.dtype, residual.dtype) if isinstance(residual, Tensor) else x.dtype)
        x, residual, weight, bias, x_bias = (t.to(cdt) if isinstance(t, Tensor) else t
                                             for t in (x, residual, weight, bias, x_bias))
    hidden = x.shape[-1] if x.dim() else 0
    if hidden < 1:      # every implementation refuses it alike (the reference would return an empty y)
        raise ValueError(f"x must have a non-empty last dimension (the normalised size), got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        _check_same(name, t, x, "x", shape=(hidden,))
    _check_same("residual", residual, x, "x", shape=x.shape)
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not eps >= 0.0:        # also NaN
        raise ValueError(f"eps must be >= 0, got {eps}")
    weight, bias = weight.contiguous(), bias.contiguous()      # (H,) vectors: no-ops unless a strided view
    x_bias = x_bias.contiguous() if x_bias is not None else None
    shape = x.shape
    x2 = _as_rows(x, hidden)
    r2 = _as_rows(residual, hidden) if residual is not None else None
    impl = choose("add_layer_norm", x.device, dtype=x.dtype, hidden=hidden,
                  records_grad=records_grad(x, weight, bias, residual, x_bias))
    seed = new_seed() if dropout_p > 0.0 else 0
    y = _run(_add_layer_norm_op, x2, weight, bias, float(eps), r2, x_bias, activation or "", float(dropout_p),
             seed, impl)[0]
    if out_dtype is not None and out_dtype != y.dtype:
        y = y.to(out_dtype)
    return y if x.dim() == 2 else y.view(shape)


# --------------------------------------------------------------------------------------------------------------
# embed: gather word + position + token-type rows of the real tokens, sum, LayerNorm

def _embed_reference(input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb, ln_weight,
                     ln_bias, eps):
    ids = input_ids.index_select(0, indices)
    e = F.embedding(ids, word_emb)
    if type_emb is not None:
        tt = token_type_ids.index_select(0, indices) if token_type_ids is not None else torch.zeros_like(ids)
        e = e + F.embedding(tt, type_emb)
    e = e + F.embedding(position_ids.index_select(0, indices), pos_emb)
    cdt = _compute_dtype(e.dtype)
    y, mean, rstd = torch.native_layer_norm(e.to(cdt), (e.shape[-1],), ln_weight.to(cdt), ln_bias.to(cdt), eps)
    return y.to(word_emb.dtype), mean.view(-1).float(), rstd.view(-1).float()


@torch.library.custom_op("bertfast::embed", mutates_args=())
def _embed_op(input_ids: Tensor, indices: Tensor, position_ids: Tensor, token_type_ids: Optional[Tensor],
              word_emb: Tensor, pos_emb: Tensor, type_emb: Optional[Tensor], ln_weight: Tensor, ln_bias: Tensor,
              eps: float, padding_idx: int, pos_padding_idx: int, impl: str,
              trusted: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """trusted: the caller has checked every id (embed(validate=False)); the CUDA kernel then skips its error
    flag's read-back, a stream sync (csrc/cuda/cuda_common.cuh)."""
    if impl == "cpp":
        # token_type_ids=None with a type table reads type 0 for every token inside the C++ op (as transformers)
        return tuple(torch.ops.bertfast_C.embed(input_ids, indices, position_ids, token_type_ids, word_emb,
                                                pos_emb, type_emb, ln_weight, ln_bias, eps, not trusted))
    return _embed_reference(input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb,
                            ln_weight, ln_bias, eps)


@_embed_op.register_fake
def _(input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb, ln_weight, ln_bias, eps,
      padding_idx, pos_padding_idx, impl, trusted=False):
    t = indices.shape[0]
    return (word_emb.new_empty((t, word_emb.shape[1])), word_emb.new_empty((t,), dtype=torch.float32),
            word_emb.new_empty((t,), dtype=torch.float32))


@torch.library.custom_op("bertfast::embed_backward", mutates_args=())
def _embed_backward_op(dy: Tensor, input_ids: Tensor, indices: Tensor, position_ids: Tensor,
                       token_type_ids: Optional[Tensor], word_emb: Tensor, pos_emb: Tensor,
                       type_emb: Optional[Tensor], ln_weight: Tensor, ln_bias: Tensor, mean: Tensor, rstd: Tensor,
                       eps: float, padding_idx: int, pos_padding_idx: int, impl: str) -> list[Tensor]:
    """-> [d_word_emb, d_pos_emb, d_type_emb (empty when type_emb is None), d_ln_weight, d_ln_bias], dense.
    Like nn.Embedding(padding_idx=...), the padding rows of the word and position embeddings (padding_idx,
    pos_padding_idx; -1: none) get no gradient.
    mean / rstd: the forward's LayerNorm statistics (read by the C++ CPU backward only)."""
    if impl == "cpp" and dy.device.type == "cpu":
        # one pass over the T tokens: recompute the sum from the tables, LayerNorm backward, scatter each
        # token's gradient into its table rows in token order (deterministic; csrc/embed.cpp)
        grads = list(torch.ops.bertfast_C.embed_backward(dy, input_ids, indices, position_ids, token_type_ids,
                                                         word_emb, pos_emb, type_emb, ln_weight, mean, rstd))
    else:
        # CUDA has no C++ backward: torch's autograd of the reference (one pass over the T rows plus the dense
        # gradient tables)
        grads = _recompute_grads(
            lambda w, p, t, lw, lb: _embed_reference(input_ids, indices, position_ids, token_type_ids, w, p, t,
                                                     lw, lb, eps)[0],
            [word_emb, pos_emb, type_emb, ln_weight, ln_bias], [dy])
    for table, row in ((0, padding_idx), (1, pos_padding_idx)):
        if row >= 0 and grads[table] is not None:
            grads[table][row] = 0
    return _unaliased([_grad_or_empty(g, t, word_emb)
                       for g, t in zip(grads, [word_emb, pos_emb, type_emb, ln_weight, ln_bias])])


@_embed_backward_op.register_fake
def _(dy, input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb, ln_weight, ln_bias, mean,
      rstd, eps, padding_idx, pos_padding_idx, impl):
    return [torch.empty_like(word_emb), torch.empty_like(pos_emb), _empty_like_or_none(type_emb, word_emb),
            torch.empty_like(ln_weight), torch.empty_like(ln_bias)]


def _embed_setup(ctx, inputs, output):
    (input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb, ln_weight, ln_bias, eps,
     padding_idx, pos_padding_idx, impl) = inputs[:13]     # (and trusted, which the backward does not need)
    ctx.save_for_backward(input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb,
                          ln_weight, ln_bias, output[1], output[2])
    ctx.args = (eps, padding_idx, pos_padding_idx, impl)


def _embed_backward(ctx, dy, dmean, drstd):
    saved = ctx.saved_tensors
    dw, dp, dt, dlw, dlb = _run(_embed_backward_op, dy.contiguous(), *saved, *ctx.args)
    return (None, None, None, None, dw, dp, (dt if saved[6] is not None else None), dlw, dlb, None, None, None, None,
            None)


_register_autograd(_embed_op, _embed_backward, _embed_setup)


def _check_embed_args(input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb, ln_weight,
                      ln_bias, eps) -> None:
    """The C++ op's argument checks (csrc/embed.h), as named ValueErrors for every implementation: the reference
    would otherwise cast mixed dtypes, ignore token_type_ids without a type table, or take a negative eps."""
    if not isinstance(word_emb, Tensor) or word_emb.dim() != 2 or not word_emb.is_floating_point() \
            or word_emb.shape[1] < 1:
        raise ValueError(f"word_emb must be a floating-point tensor [vocab, E] with E >= 1, got "
                         f"{_describe(word_emb)}")
    e, dev = word_emb.shape[1], word_emb.device
    ids = [("input_ids", input_ids, "[N] (the flattened [B, S] ids)"), ("indices", indices, "[T]"),
           ("position_ids", position_ids, "[N] (the flattened [B, S] positions)")]
    if token_type_ids is not None:
        if type_emb is None:
            raise ValueError("token_type_ids given but type_emb is None (a model without token type embeddings "
                             "takes no token_type_ids)")
        ids.append(("token_type_ids", token_type_ids, "[N] (the flattened [B, S] types)"))
    for name, t, layout in ids:
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int64 tensor {layout}, got {_describe(t)}")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but word_emb is on {dev}")
        if name != "indices" and t.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{name} must have input_ids' length {input_ids.shape[0]}, got {t.shape[0]}")
    for name, t, rows in (("pos_emb", pos_emb, "max_positions"), ("type_emb", type_emb, "type_vocab")):
        if t is not None and (not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != e or t.shape[0] < 1):
            raise ValueError(f"{name} must have shape [{rows} >= 1, {e}] (word_emb's embedding size), got "
                             f"{_describe(t)}")
        _check_same(name, t, word_emb, "word_emb")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor [{e}], got {type(t).__name__}")
        _check_same(name, t, word_emb, "word_emb", shape=(e,))
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _describe(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def embed(input_ids: Tensor, indices: Tensor, position_ids: Tensor, token_type_ids: Optional[Tensor],
          word_emb: Tensor, pos_emb: Tensor, type_emb: Optional[Tensor], ln_weight: Tensor, ln_bias: Tensor,
          eps: float, padding_idx: Optional[int] = None, pos_padding_idx: Optional[int] = None,
          validate: bool = True) -> Tensor:
    """LayerNorm(word_emb[ids] + type_emb[token_types] + pos_emb[positions]) for the real tokens.

    input_ids, position_ids, token_type_ids: (N,) int64, flattened padded batch (N = B * S)
    indices: (T,) int64 - the real tokens (from bertfast.padding.unpad_mask)
    word_emb (V, E), pos_emb (P, E), type_emb (types, E) or None; ln_weight / ln_bias (E,)
    padding_idx: the word-embedding row that gets no gradient (nn.Embedding's padding_idx), or None
    pos_padding_idx: the position-embedding row that gets no gradient (RoBERTa's), or None
    returns (T, E) in word_emb's dtype. The C++ / CUDA implementations check every id they read (a named error);
    the reference relies on torch's indexing.
    validate=False: the caller has checked every id and index (bertfast's encoder does, once per batch, in one host
    read): the CUDA kernel then skips reading its error flag back, a stream sync per call, and writes NaN rows
    for a bad id instead of raising. The CPU kernel checks regardless.
    """
    _check_embed_args(input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb, ln_weight,
                      ln_bias, eps)
    impl = choose("embed", word_emb.device, dtype=word_emb.dtype)
    # the kernels read the id / index vectors and the LayerNorm vectors by address: a strided view of them (e.g.
    # the expanded position ids of a batch of length-1 rows) is made contiguous here, a no-op otherwise
    input_ids, indices, position_ids = input_ids.contiguous(), indices.contiguous(), position_ids.contiguous()
    token_type_ids = token_type_ids.contiguous() if token_type_ids is not None else None
    # (the tables too: the C++ op reads them by address; a no-op for a model's parameters)
    type_emb = type_emb.contiguous() if type_emb is not None else None
    return _run(_embed_op, input_ids, indices, position_ids, token_type_ids, word_emb.contiguous(),
                pos_emb.contiguous(), type_emb, ln_weight.contiguous(), ln_bias.contiguous(), float(eps),
                _row_or_none(padding_idx, word_emb, "padding_idx"),
                _row_or_none(pos_padding_idx, pos_emb, "pos_padding_idx"), impl, not validate)[0]


def _row_or_none(row: Optional[int], table: Tensor, name: str) -> int:
    """A table row for the custom ops (-1: none), checked against the table's rows."""
    if row is None:
        return -1
    if not 0 <= int(row) < table.shape[0]:
        raise ValueError(f"{name}={row} is not a row of its table ({table.shape[0]} rows)")
    return int(row)


# --------------------------------------------------------------------------------------------------------------
# unpad / pad

def _check_index_values(op: str, indices: Tensor, n_rows: int, what: str, distinct: bool) -> None:
    """The reference's version of the C++ kernels' index checks (one host read; skipped while capturing a CUDA
    graph, where nothing may be read): indices in [0, n_rows), and all distinct where rows are written."""
    if not indices.numel() or (indices.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return
    stats = [indices.min(), indices.max()]
    if distinct:
        stats.append(torch.bincount(indices.clamp(0, max(n_rows - 1, 0)), minlength=1).max())
    values = torch.stack(stats).tolist()
    if values[0] < 0 or values[1] >= n_rows:
        raise ValueError(f"{op}: indices holds values in [{values[0]}, {values[1]}], outside [0, {n_rows}) ({what})")
    if distinct and values[2] > 1:
        raise ValueError(f"{op}: indices holds a row more than once (each padded row is written by one token)")


@torch.library.custom_op("bertfast::unpad", mutates_args=())
def _unpad_op(x: Tensor, indices: Tensor, impl: str, trusted: bool = True) -> Tensor:
    """trusted: the caller vouches that the indices are in range and hold no row twice (unpad(validate=False)):
    the backward scatters with pad (each row written once), and the CUDA kernel skips its error flag's read-back,
    a stream sync (csrc/cuda/cuda_common.cuh). Otherwise the kernel checks and the backward accumulates
    (index_add_)."""
    if impl == "cpp":
        return torch.ops.bertfast_C.unpad(x, indices, not trusted)
    return x.index_select(0, indices)


@_unpad_op.register_fake
def _(x, indices, impl, trusted=True):
    return x.new_empty((indices.shape[0],) + tuple(x.shape[1:]))


@torch.library.custom_op("bertfast::pad", mutates_args=())
def _pad_op(x: Tensor, indices: Tensor, n_rows: int, impl: str, trusted: bool = False) -> Tensor:
    """trusted: as for _unpad_op (in range and distinct; the CUDA kernel skips its read-back)."""
    if impl == "cpp":
        return torch.ops.bertfast_C.pad(x, indices, n_rows, not trusted)
    return x.new_zeros((n_rows,) + tuple(x.shape[1:])).index_copy_(0, indices, x)


@_pad_op.register_fake
def _(x, indices, n_rows, impl, trusted=False):
    return x.new_empty((n_rows,) + tuple(x.shape[1:]))


def _unpad_setup(ctx, inputs, output):
    x, indices, impl = inputs[:3]      # (inputs holds the arguments the op was called with: trusted may be absent)
    trusted = inputs[3] if len(inputs) > 3 else True
    ctx.save_for_backward(indices)
    ctx.args = (x.shape[0], impl, trusted)


def _unpad_backward(ctx, dy):
    (indices,) = ctx.saved_tensors
    n_rows, impl, trusted = ctx.args
    if trusted:
        return _run(_pad_op, dy.contiguous(), indices, n_rows, impl, True), None, None, None
    return dy.new_zeros((n_rows,) + tuple(dy.shape[1:])).index_add_(0, indices, dy), None, None, None


def _pad_setup(ctx, inputs, output):
    indices, impl = inputs[1], inputs[3]
    ctx.save_for_backward(indices)
    ctx.args = (impl,)


def _pad_backward(ctx, dy):
    (indices,) = ctx.saved_tensors
    # the forward wrote each of these rows once: they are in range and distinct (checked, or vouched for)
    return _run(_unpad_op, dy.contiguous(), indices, ctx.args[0], True), None, None, None, None


_register_autograd(_unpad_op, _unpad_backward, _unpad_setup)
_register_autograd(_pad_op, _pad_backward, _pad_setup)


def _check_rows(name: str, t: Tensor, layout: str) -> None:
    if not isinstance(t, Tensor) or t.dim() < 1:
        raise ValueError(f"{name} must be a tensor of shape {layout} (at least 1-D), got "
                         f"{'a 0-d tensor' if isinstance(t, Tensor) else type(t).__name__}")


def unpad(x: Tensor, indices: Tensor, validate: bool = True) -> Tensor:
    """x (N, ...) -> x[indices] (T, ...); e.g. hidden states [B*S, H] of a padded batch to its real tokens.
    indices may repeat a row: with validate on, x's gradient accumulates (index_add_; on a GPU in nondeterministic
    order, as index_select's), with no host read, so torch.compile and CUDA graphs see through it.
    validate: check the indices, a named error for a bad one (one host read on a GPU, every implementation).
    bertfast's encoder, which builds them, passes False: the caller then vouches that they are in range and hold
    no row twice; the gradient is one scatter (pad), each row written once, and the CUDA kernel does not read its
    error flag back (no stream sync; a bad index would give a zero row, never a read out of bounds). The CPU
    kernel checks regardless."""
    _check_rows("x", x, "[N, ...]")
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise ValueError(f"indices must be a 1-D int64 tensor, got {indices.dtype} of shape {tuple(indices.shape)}")
    impl = choose("unpad", x.device, dtype=x.dtype)
    if validate and impl == "reference":
        _check_index_values("unpad", indices, x.shape[0], "rows of x", distinct=False)
    return _run(_unpad_op, x.contiguous(), indices.contiguous(), impl, not validate)


def pad(x: Tensor, indices: Tensor, batch: int, seqlen: int, validate: bool = True) -> Tensor:
    """x (T, ...) packed real tokens -> (batch, seqlen, ...) with zeros at the padded positions.
    validate: as for unpad (indices in range and distinct)."""
    _check_rows("x", x, "[T, ...]")
    if batch < 0 or seqlen < 0:    # (no int(): under torch.compile they may be symbolic sizes)
        raise ValueError(f"batch and seqlen must be >= 0, got {batch} and {seqlen}")
    if indices.dtype != torch.int64 or indices.dim() != 1 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices must be a 1-D int64 tensor with one entry per row of x ({x.shape[0]}), got "
                         f"{indices.dtype} of shape {tuple(indices.shape)}")
    impl = choose("pad", x.device, dtype=x.dtype)
    if validate and impl == "reference":
        _check_index_values("pad", indices, batch * seqlen, "rows of the padded output, batch * seqlen",
                            distinct=True)
    out = _run(_pad_op, x.contiguous(), indices.contiguous(), batch * seqlen, impl, not validate)
    return out.view((batch, seqlen) + tuple(x.shape[1:]))
