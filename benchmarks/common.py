"""Timing and ceilings shared by every benchmark.

CUDA: triton.testing.do_bench (CUDA events, warm-up, median and 20/80 percentiles), inputs rotated so the L2
does not hold them where the caller passes several input sets. CPU: wall clock with the same statistics.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def child_rows(module: str, args: list[str], env: dict | None = None) -> list[dict]:
    """The rows `python -m <module> <args> --json PATH` writes, run in a child process from the repository root
    with `env` added to this process's environment: for settings that must be in place from a process's start
    or that last for the rest of it (the allocator's). Raises RuntimeError with the child's stderr on failure."""
    child_env = dict(os.environ, **(env or {}))
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "rows.json"
        res = subprocess.run([sys.executable, "-m", module, *args, "--json", str(path)], cwd=ROOT, env=child_env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{module} {' '.join(args)} failed: {res.stderr[-2000:]}")
        return json.loads(path.read_text())


def timeit(fn, device, warmup_ms: float = 100, rep_ms: float = 400, min_reps: int = 5) -> dict:
    """{'ms': median, 'p20': ..., 'p80': ...} of fn() on device."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20": p20, "p80": p80}
    return timeit_interleaved({"fn": fn}, device, rep_ms=rep_ms, min_reps=min_reps)["fn"]


def timeit_interleaved(fns: dict, device, rep_ms: float = 400, min_reps: int = 5) -> dict:
    """{name: timeit-style dict} for several callables; on CPU their repetitions alternate (a, b, a, b, ...)
    so that the drift of a shared machine (other tenants, clocks) hits each of them alike. On CUDA each is
    timed on its own with do_bench (CUDA events are not disturbed that way)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {name: timeit(fn, device, rep_ms=rep_ms) for name, fn in fns.items()}
    for fn in fns.values():     # warm-up (allocator, first-call costs)
        fn()
    one = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        one[name] = time.perf_counter() - t0
    reps = max(min_reps, 2, int(rep_ms / 1e3 / max(max(one.values()), 1e-6)))   # quantiles need two
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5)
        out[name] = {"ms": statistics.median(ts), "p20": q[0], "p80": q[3]}
    return out


def compiled_baseline(model):
    """torch.compile(model) compiled for the shapes it is called with: dynamo's caches are reset first, since
    the compiled code objects are shared across models (one transformers forward) and, with automatic dynamic
    shapes, every compile after the first shape was a dynamic-shape one (2026-11-24: LayerNorm under
    torch.compile at 82% of copy bandwidth for 768 columns, 46% for 3072)."""
    torch._dynamo.reset()
    return torch.compile(model, dynamic=False)


def copy_bandwidth_gbs(device) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), the memory ceiling."""
    device = torch.device(device)
    n = (1 << 28) if device.type == "cuda" else (1 << 24)      # 1 GiB / 64 MiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (t["ms"] * 1e-3) / 1e9


def matmul_tflops(device, dtype=None) -> float:
    """Measured dense matmul rate on random data (bf16 on CUDA, fp32 on CPU), the arithmetic ceiling."""
    device = torch.device(device)
    if device.type == "cuda":
        n, dtype = 8192, dtype or torch.bfloat16
    else:
        n, dtype = 1024, dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timeit(lambda: a @ b, device)
    return 2 * n ** 3 / (t["ms"] * 1e-3) / 1e12


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def device_slug(device) -> str:
    import re
    device = torch.device(device)
    name = device_name(device)
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    short = re.sub(r"\(.*\)", "", name).lower()
    short = re.sub(r"(\(r\)|\(tm\)|cpu|processor|@.*)", " ", short)
    return "cpu-" + re.sub(r"[^a-z0-9]+", "-", short).strip("-")[:40] + f"-{torch.get_num_threads()}t"


def bench_args(doc: str, argv=None):
    """The command line of the kernel benchmarks that take a device: --quick and --device (CUDA when present)."""
    import argparse
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and dtypes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)
