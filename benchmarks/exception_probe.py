"""Throws bertfast._C's input errors several times in one process, on the CPU and (when present) CUDA.

On the H100 machine every TORCH_CHECK thrown from bertfast._C after the first one segfaulted (2026-11-24,
torch 2.11.0+cu130, gcc 13, glibc 2.39); the same build of the same torch on a GPU-less Debian machine (gcc 12)
throws them all cleanly. The GPU suite runs this under cuda-gdb so that a crash leaves a native backtrace in
its log. Prints one line per attempt; exit 0 when every error arrived as a RuntimeError naming the op.

    python -m benchmarks.exception_probe
"""
import faulthandler
import sys

import torch

import bertfast._C  # noqa: F401

faulthandler.enable()
ops = torch.ops.bertfast_C


def attempts(device):
    x = torch.randn(4, 8, device=device)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    yield "unpad index 4 of 4 rows", lambda: ops.unpad(x, torch.tensor([0, 4], device=device))
    yield "add_layer_norm 1-D x", lambda: ops.add_layer_norm(x[0], w, b, 1e-5, None, None, "")
    yield "add_layer_norm bad activation", lambda: ops.add_layer_norm(x, w, b, 1e-5, None, None, "tanh")
    yield "pad n_rows -1", lambda: ops.pad(x, torch.arange(4, device=device), -1)


def main():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.built_with_cuda() else [])
    bad = 0
    for device in devices:
        for round_ in range(2):
            for name, fn in attempts(device):
                print(f"{device} round {round_} {name}: ", end="", flush=True)
                try:
                    fn()
                    print("NO ERROR RAISED")
                    bad += 1
                except RuntimeError as e:
                    ok = "bertfast_C::" in str(e)
                    bad += not ok
                    print("ok" if ok else f"unexpected message: {str(e)[:200]}", flush=True)
    if "cuda" in devices:
        torch.cuda.synchronize()
    print(f"exception probe: {'OK' if not bad else f'{bad} FAILED'} on {', '.join(devices)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
