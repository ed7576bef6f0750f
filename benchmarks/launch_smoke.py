"""The launch cache (kernels/launch.py) on this machine's GPU, before the GPU suite's tests.

A cache hit calls the compiled kernel's launcher directly instead of Triton's JITFunction.run. Without a GPU that
is checked through a stand-in driver (tests/test_launch.py); what only a GPU shows is the real launcher taking those
arguments (the GPU tests then check every hit against Triton's cache, BERTFAST_CHECK_LAUNCHES=1). This runs four
kernels (LayerNorm forward and backward, bias + GELU, attention forward) three times on the device: through
Triton's own path (the cache off), then with the cache on (a miss, then a hit), and wants the same bits each time
(the kernels have no atomics: each is deterministic for its inputs). Exit 1 if a hit differs or raises: the GPU
suite then runs its other steps with BERTFAST_LAUNCH_CACHE=0, so that one wrong cache does not fail every Triton
test, and records the step as failed.
A launch that should have hit but went through Triton's path is printed, not failed.

    python -m benchmarks.launch_smoke --device cuda     (the GPU suite runs this)
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from bertfast.kernels import launch


def _cases(device: torch.device) -> dict:
    """name -> a call of Triton launchers returning tensors: few kernels (each compile is time the GPU suite's later
    steps lose), at BERT-base fp16 shapes on a GPU with a token count divisible by 16 (the specialisation the
    encoder's and the benchmarks' launches share); small shapes elsewhere (the interpreter)."""
    from bertfast.kernels import attention, gelu, layer_norm
    small = device.type != "cuda"
    hidden, heads, head_dim, tokens = (64, 2, 32, 32) if small else (768, 12, 64, 64)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float16):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    x, res, w, b = rand(tokens, hidden), rand(tokens, hidden), rand(hidden), rand(hidden)
    u, ub = rand(tokens, 4 * hidden), rand(4 * hidden)
    qkv = rand(tokens, 3, heads, head_dim)
    cu = torch.tensor([0, tokens // 2, tokens], dtype=torch.int32, device=device)

    def ln_forward_backward():
        y, mean, rstd = layer_norm.add_layer_norm_forward(x, w, b, 1e-12, residual=res, x_bias=b)
        return y, layer_norm.add_layer_norm_backward(res, x, w, b, mean, rstd, residual=res, x_bias=b)
    return {
        "add_layer_norm forward + backward (x_bias, residual)": ln_forward_backward,
        "bias_act forward (gelu)": lambda: gelu.bias_act_forward(u, ub, "gelu"),
        "attention forward": lambda: attention.attention_forward(qkv, cu, tokens // 2),
    }


def _tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


@contextlib.contextmanager
def triton_launches():
    """Yields a list that gets the kernel name of every launch going through Triton's own JITFunction.run (a miss
    of the launch cache, or the cache off) while the block runs."""
    from triton.runtime import jit
    names, original = [], jit.JITFunction.run

    def counted(self, *args, **kwargs):
        names.append(self.__name__)
        return original(self, *args, **kwargs)
    jit.JITFunction.run = counted
    try:
        yield names
    finally:
        jit.JITFunction.run = original


def run(device="cuda") -> int:
    """0 when every launch through the cache gives the bits Triton's own path gives; 1 otherwise."""
    device = torch.device(device)
    if not launch.ENABLED:
        print(f"launch_smoke: the launch cache is off here ({launch.status()[1]}): nothing to check")
        return 0
    problems = []
    with triton_launches() as triton_path:
        for name, fn in _cases(device).items():
            try:
                with launch.disabled():
                    want = _tensors(fn())
                fn()                                    # misses: through Triton's path, into the cache
                before = len(triton_path)
                got = _tensors(fn())                    # hits
                through_triton = triton_path[before:]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                same = len(got) == len(want) and all(
                    g.shape == w.shape and g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want))
                if not same:
                    problems.append(f"{name}: a cached launch gave other bits than Triton's own launch")
                print(f"  {name:<52} {'same bits' if same else 'DIFFERENT'}"
                      + (f"  (through Triton's path, no hit: {sorted(set(through_triton))})" if through_triton
                         else ""), flush=True)
            except Exception as exc:  # noqa: BLE001 - reported, and the suite turns the cache off
                problems.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
                print(f"  {name:<52} {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    print("launch_smoke: " + ("every cached launch gave Triton's bits" if not problems else
                              f"{len(problems)} problem(s): " + "; ".join(problems)))
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    return run(p.parse_args(argv).device)


if __name__ == "__main__":
    sys.exit(main())
