"""Triton launches without most of JITFunction.run's per-call host work.

Eager bertfast on the GPU machines is host-bound (bert-base 1x128 on the H200: 6.28 ms of host time a forward
against transformers SDPA's 4.12), and most of a Triton launch's host time is Triton 3.6's ``JITFunction.run``:
binding the arguments, specialising each of them (a tensor's dtype and 16-byte alignment; an int's width, whether
it is 1, whether it is a multiple of 16), hashing that into the kernel cache's key, and only then the compiled
kernel's own launcher. On the 2-core development machine that is ~10 us a launch, of which the launcher is ~0.4.

``Launcher(kernel)`` keeps, per device, the compiled kernels it has launched under a key made of the facts that
decide Triton's specialisation, computed with less work: the type of every argument, each tensor's dtype and
whether its address is a multiple of 16, each int's width class and whether it is 1 or a multiple of 16, the
constexpr values and launch options as given. Equal facts give equal specialisations (``test_launch`` checks this
against Triton's own specialisation for every boundary), so a hit launches the kernel JITFunction.run would have
found in its cache. A miss, a grid given as a function, a profiler's launch hook, Triton's debug or instrumentation
modes, a kernel with pre-run hooks and the interpreter all go through ``kernel[grid](...)`` itself, unchanged.

Not repeated on a hit: JITFunction.run's check that the module globals a kernel read at compile time have not
changed since (bertfast's kernels read module constants only).

The cache is written against Triton 3.6's internals (``JITFunction.params`` / ``device_caches``, the compiled
kernel's ``run`` and its arguments); with another Triton version every launch takes ``kernel[grid](...)``, and
``bertfast info`` says so. ``BERTFAST_LAUNCH_CACHE=0`` turns it off. ``BERTFAST_CHECK_LAUNCHES=1`` (the GPU suite's
test run sets it) makes every hit also ask Triton which compiled kernel it would run, and raise if it is not the one
launched. Both are read once, when the kernels are imported.
"""
from __future__ import annotations

import contextlib
import operator
import os

import torch

_I32, _I64, _U64 = 2 ** 31, 2 ** 63, 2 ** 64


def _int_facts(v: int):
    """What Triton 3.6 specialises an int argument on: 1 is a constant; otherwise its width (i32, i64, u64) and
    whether it is a multiple of 16. Ints outside [-2**63, 2**64) get facts of their own, so they always miss and
    Triton refuses them (a hit would hand them to the launcher, whose u64 conversion wraps them silently)."""
    if v == 1:
        return 1
    return (v & 15) == 0, -_I32 <= v < _I32, v < _I64, -_I64 <= v < _U64


_TRITON = None


def _triton():
    """(triton.knobs, triton.runtime.driver), imported on first use: importing bertfast.kernels never needs triton."""
    global _TRITON
    if _TRITON is None:
        from triton import knobs
        from triton.runtime import driver
        _TRITON = knobs, driver
    return _TRITON


def _hooked(hook) -> bool:
    """Whether a launch hook is set: Triton 3.6's are HookChains, empty unless a profiler added to them (a user may
    also have set a plain callable, or None)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class Launcher:
    """``Launcher(kernel)(grid, *args, **constexprs_and_options)``: launches as ``kernel[grid](*args, ...)`` does.

    Arguments must be given as the launchers give them: the kernel's runtime arguments positionally (tensors,
    ints, floats), constexprs and launch options (num_warps, num_stages) by keyword."""

    def __init__(self, kernel):
        self.kernel = kernel
        # the interpreter's kernels (TRITON_INTERPRET=1) are not JITFunctions: they always take kernel[grid]
        self.fast = hasattr(kernel, "device_caches") and hasattr(kernel, "params")
        self._entries = {}      # key -> (compiled kernel, constexpr tail in signature order)
        self._layouts = {}      # argument types -> (tensor positions getter, int positions getter)

    def __call__(self, grid, *args, **kw):
        knobs, driver = _triton()
        runtime = knobs.runtime
        if not (self.fast and ENABLED) or type(grid) is not tuple or _hooked(runtime.launch_enter_hook) \
                or _hooked(runtime.launch_exit_hook) or runtime.debug or self.kernel.pre_run_hooks \
                or knobs.compilation.instrumentation_mode:
            return self.kernel[grid](*args, **kw)
        types = tuple(map(type, args))
        layout = self._layouts.get(types)
        if layout is None:
            layout = self._layouts[types] = self._layout(types)
        if not layout:      # an argument type the facts do not cover
            return self.kernel[grid](*args, **kw)
        ptr_bits, dtypes = 0, []
        for t in layout[0](args):
            ptr_bits |= t.data_ptr()
            dtypes.append(t.dtype)
        if ptr_bits & 15:
            # some tensor is not 16-byte aligned: which ones is Triton's to specialise on
            return self.kernel[grid](*args, **kw)
        device = driver.active.get_current_device()
        key = (device, layout, tuple(kw.items()), *dtypes, *[_int_facts(v) for v in layout[1](args)])
        entry = self._entries.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **kw)
            entry = self._entry(compiled, len(args), kw)
            if entry is not None:   # (a call that can never be fast is not kept: its key may hold a tensor)
                self._entries[key] = entry
            return compiled
        compiled, tail = entry
        if CHECK:
            self._check(compiled, device, args, kw)
        n = len(grid)
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                     driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *tail)      # launch_metadata and hooks: None, as no hook is set
        return compiled

    @staticmethod
    def _getter(positions):
        if not positions:
            return lambda args: ()
        if len(positions) == 1:
            i = positions[0]
            return lambda args: (args[i],)
        return operator.itemgetter(*positions)

    def _layout(self, types):
        """(tensors getter, ints getter) for arguments of these types; one tuple per types, so its identity in a
        key stands for the types. () for a type whose specialisation the facts do not cover (a numpy int, say)."""
        if not all(issubclass(t, (torch.Tensor, int, float)) or t is type(None) for t in types):
            return ()
        tensors = tuple(i for i, t in enumerate(types) if issubclass(t, torch.Tensor))
        ints = tuple(i for i, t in enumerate(types) if issubclass(t, int) and t is not bool)
        return self._getter(tensors), self._getter(ints)

    def _entry(self, compiled, n_args: int, kw: dict):
        """What a hit needs: the compiled kernel and the constexpr values after the positional arguments, in the
        kernel's signature order (its launcher takes every parameter). None where the call cannot be fast: no
        CompiledKernel came back, a constexpr given positionally, or a runtime argument given by keyword (the key
        holds keyword values as they are: a tensor there would be neither checked nor let go)."""
        from triton.compiler.compiler import CompiledKernel
        if not isinstance(compiled, CompiledKernel):
            return None
        params = self.kernel.params
        if any(p.is_constexpr for p in params[:n_args]) \
                or any(p.name in kw and not p.is_constexpr for p in params[n_args:]):
            return None
        tail = []
        for p in params[n_args:]:
            if p.name in kw:
                tail.append(kw[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:
                return None
        return compiled, tuple(tail)

    def _check(self, compiled, device, args, kw):
        from triton.runtime.jit import compute_cache_key
        knobs, _ = _triton()
        kernel_cache, key_cache, _, _, binder = self.kernel.device_caches[device]
        options = dict(kw, debug=kw.get("debug", self.kernel.debug) or knobs.runtime.debug,
                       instrumentation_mode=knobs.compilation.instrumentation_mode)
        _, specialization, options = binder(*args, **options)
        expected = kernel_cache.get(compute_cache_key(key_cache, specialization, options))
        if expected is not compiled:
            raise RuntimeError(f"bertfast launch cache: {self.kernel.__name__} launched a kernel compiled for another "
                               f"specialisation than Triton's ({specialization})")


CHECK = os.environ.get("BERTFAST_CHECK_LAUNCHES", "") == "1"
_SETTING = os.environ.get("BERTFAST_LAUNCH_CACHE", "1")
TRITON_VERSIONS = ("3.6.",)     # the Triton versions whose launch internals this module is written against


def status() -> tuple[bool, str]:
    """(whether Launchers take the cached path, a line saying so and why) for ``bertfast info``."""
    if _SETTING not in ("0", "1"):
        raise ValueError(f"BERTFAST_LAUNCH_CACHE must be 0 or 1, got {_SETTING!r}")
    try:
        import triton
    except ImportError:
        return False, "no Triton installed"
    from triton import knobs
    if knobs.runtime.interpret:
        return False, "through Triton's interpreter (TRITON_INTERPRET=1)"
    if not triton.__version__.startswith(TRITON_VERSIONS):
        return False, (f"through JITFunction.run: the launch cache is written against Triton "
                       f"{', '.join(v + 'x' for v in TRITON_VERSIONS)}, this is {triton.__version__}")
    if _SETTING == "0":
        return False, "through JITFunction.run (BERTFAST_LAUNCH_CACHE=0)"
    return True, ("cached per specialisation, misses through JITFunction.run (BERTFAST_LAUNCH_CACHE=0 turns it off)"
                  + ("; each hit checked against Triton's cache (BERTFAST_CHECK_LAUNCHES=1)" if CHECK else ""))


# whether Launchers take the cached path (`disabled()` switches it off for a same-process comparison)
ENABLED = status()[0]


@contextlib.contextmanager
def disabled():
    """Every launch through JITFunction.run for the block, as without the cache; the setting is put back after."""
    global ENABLED
    previous, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = previous
