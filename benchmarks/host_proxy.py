"""The host side of a CUDA eager forward, timed on a machine without a GPU.

Eager bertfast on the H100 was host-bound (bert-base 1x128: 8.8 ms eager against 0.53 ms as a CUDA graph), so
the Python work around each kernel launch is what to shrink, and most of it does not need a GPU to be timed:
here every Triton kernel goes through Triton's real launch path (``JITFunction.run``: argument binding,
specialisation, cache lookup; or, on a hit of kernels/launch.py's cache, the compiled kernel's own launcher; and
our launchers' checks and allocations before it) with a stand-in driver whose launch does nothing, while GEMMs
and the C++ ops run on the CPU. A 12-layer model 64 wide (head dim 32, so the Triton attention serves it) on 16
tokens in fp32 keeps the CPU arithmetic small (its GEMMs: ~5% of the time), so what is timed is host work. The
per-op rows (benchmarks.host_profile's cases) use fp16 inputs.

Not included (so the proxy underestimates a GPU machine's host time): Triton's C launcher and the CUDA driver
call behind each launch, the CUDA caching allocator, and stream / device queries. The kernels are compiled for
sm_90, but the launchers pick their sm_80 configurations for CPU tensors (same host work). Triton internals used:
``triton.runtime.driver.set_active``, a driver's ``launcher_cls`` / ``utils.load_binary`` (Triton 3.x).

    python -m benchmarks.host_proxy             per-forward and per-launcher host time
    python -m benchmarks.host_proxy --profile   plus a cProfile of the forwards
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import pstats
import types

import torch

from benchmarks import bench_model, host_profile
from bertfast.kernels import launch


class StandInDriver:
    """Enough of a Triton GPU driver for JITFunction.run to compile (for sm_90) and 'launch' (a no-op)."""

    def __init__(self, arch: int = 90):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)
        props = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}
        self.utils = types.SimpleNamespace(get_device_properties=lambda device: props,
                                           load_binary=lambda name, kernel, shared, device: (1, 1, 64, 0, 1024))
        self.launcher_cls = lambda src, metadata: (lambda *args: None)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def stand_in_gpu():
    """Triton launches through StandInDriver; bertfast picks the Triton kernels on CPU tensors as it would on
    CUDA (the C++ ops where CUDA would use them)."""
    from triton import knobs
    from triton.runtime import driver

    from bertfast import ops
    if knobs.runtime.interpret:
        raise RuntimeError("host_proxy times Triton's compiled launch path, which TRITON_INTERPRET=1 replaces with "
                           "the interpreter: unset TRITON_INTERPRET")
    previous = driver._active
    driver.set_active(StandInDriver())
    # ops.choose itself runs (its settings reads and checks are host time too), with CUDA's preference order and the
    # Triton kernels available for CPU tensors
    available, preference = ops._available, ops.PREFERENCE

    def _available(impl, op, device):
        return None if impl == "triton" and op in ops.TRITON_MODULES else available(impl, op, device)

    ops._available = _available
    ops.PREFERENCE = {op: {"cuda": order["cuda"], "cpu": order["cuda"]} for op, order in preference.items()}
    try:
        yield
    finally:
        ops._available, ops.PREFERENCE = available, preference
        driver._active = previous


def per_call_us(fn, calls: int = 2000, repeats: int = 7) -> float:
    """Host microseconds per call: the fastest of `repeats` runs of `calls` calls (the least disturbed by the
    shared machine; host overhead has no benefit of luck to hide)."""
    return host_profile.host_ms(fn, torch.device("cpu"), calls, repeats)["host_min_ms"] * 1e3


def _model(layers=12, hidden=64, heads=2):
    dims = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden)
    cfg, _, _, ours = bench_model.build_models(dims, torch.float32, "cpu", eager=False)
    return cfg, ours


def run(profile: bool = False, tokens: int = 16) -> dict:
    torch.set_num_threads(1)
    cfg, model = _model()
    ids = torch.randint(1, cfg.vocab_size, (1, tokens))
    mask = torch.ones_like(ids)
    results = {}
    with stand_in_gpu(), torch.inference_mode():
        # per op: bertfast.ops (public), the custom op's implementation, the Triton launcher, torch's composite
        for op, variants in host_profile._op_cases(cfg, torch.float16, torch.device("cpu"), tokens).items():
            for variant, fn in variants.items():
                results[f"{op:<17} {variant}"] = per_call_us(fn)
        fwd = {"forward, attention_mask given": lambda: model(ids, attention_mask=mask),
               "forward, no attention_mask": lambda: model(ids)}
        for name, fn in fwd.items():
            results[name] = per_call_us(fn, calls=50, repeats=15)
        with launch.disabled():
            results["forward, mask given, launch cache off"] = per_call_us(fwd["forward, attention_mask given"],
                                                                          calls=50, repeats=15)
    # a fine-tuning step's forward + backward (dropout on, as in training; no optimizer step), outside
    # inference_mode; the stand-in kernels leave their outputs unwritten, so flush denormals for steady CPU GEMMs
    torch.set_flush_denormal(True)
    train_model = copy.deepcopy(model).train()
    with stand_in_gpu():
        def train_step():
            train_model(ids, attention_mask=mask).last_hidden_state.sum().backward()
        results["training step (fwd + bwd), mask given"] = per_call_us(train_step, calls=20, repeats=15)
        with launch.disabled():
            results["training step, launch cache off"] = per_call_us(train_step, calls=20, repeats=15)
    print(f"host time per call (us), Triton launches through a stand-in driver; {cfg.num_hidden_layers}-layer "
          f"{cfg.hidden_size}-wide model (fp32) on {tokens} tokens, 1 thread; per-op rows fp16")
    for name, us in results.items():
        print(f"  {name:<44} {us:9.1f}")
    if profile:
        with stand_in_gpu(), torch.inference_mode():
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                fwd["forward, attention_mask given"]()
            prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", action="store_true", help="also print a cProfile of 100 forwards")
    a = p.parse_args(argv)
    run(a.profile)


if __name__ == "__main__":
    main()
