"""Timing and ceilings shared by every benchmark.

CUDA: triton.testing.do_bench (CUDA events, warm-up, median and 20/80 percentiles, the L2 cleared before each
call). Kernel rows (``timeit(..., graph=True)``) replay the callable captured in a CUDA graph: do_bench's events
bracket fn(), and the only head start the GPU gets is the L2-clearing memset (~60-80 us on an H100 / H200), so a
callable that issues more host work than that (a forward + backward: several launches at 15-50 us each on the GPU
machines' hosts) was timed by its Python, not its kernels (2026-11-27 review: torch.compile's LayerNorm fwd+bwd
took 0.50 ms at 16384 x 768 and at 16384 x 3072, four times the bytes). A graph replay is one launch, so the
events time the kernels; each such row also gets ``host_ms``, the host's time a call when calls are issued back to
back, and ``timing`` says which way it was timed. CPU: wall clock with the same statistics.
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


def timeit(fn, device, warmup_ms: float = 100, rep_ms: float = 400, min_reps: int = 5, graph: bool = False) -> dict:
    """{'ms': median, 'p20': ..., 'p80': ...} of fn() on device. On CUDA with graph=True: the GPU time of fn's
    kernels (cuda_kernel_time: also 'host_ms' and 'timing'); graph=False times fn() as called, host gaps included
    (whole-model rows: what an eager caller gets)."""
    device = torch.device(device)
    if device.type == "cuda":
        if graph:
            return cuda_kernel_time(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20": p20, "p80": p80}
    return timeit_interleaved({"fn": fn}, device, rep_ms=rep_ms, min_reps=min_reps)["fn"]


# Why graph capture is off for the rest of this process (empty: it is on). torch 2.11's torch.cuda.graph does not
# clean up after a failed capture (its __exit__ has no try / finally, and the graph releases its pool only once a
# capture ended): the allocator keeps the capture "underway", and every later empty_cache (which each capture and
# several benchmarks call) fails an internal assert. capture_graph screens calls for syncs first and undoes what it
# can after a failure; if the allocator still does not recover, the remaining rows are timed as called.
_CAPTURE_OFF: list[str] = []


def capture_graph(fn, warmup_calls: int = 3):
    """fn() captured in a torch.cuda.CUDAGraph, after warm-up calls on a side stream (first-call work: Triton and
    inductor compiles, cuBLAS workspaces, autograd's lazy state). The outputs live in the graph's memory pool and
    are rewritten by each replay. Raises (and captures nothing) when fn synchronizes with the host, found by one
    call under torch.cuda.set_sync_debug_mode("error"): a sync would invalidate the capture. Raises what a failed
    capture raises after restoring the stream and the allocator."""
    if _CAPTURE_OFF:
        raise RuntimeError(f"graph capture is off in this process: {_CAPTURE_OFF[0]}")
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()
    caller_stream = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(g, pool=pool):
            fn()
    except Exception as exc:
        _after_failed_capture(pool, caller_stream, exc)
        raise
    torch.cuda.synchronize()
    return g


def _after_failed_capture(pool, caller_stream, exc: Exception) -> None:
    """Undo what torch.cuda.graph leaves behind when its capture fails: the current stream (still the capture
    stream) and the allocator's routing into the graph's pool. If the allocator still refuses empty_cache, graph
    capture is turned off for the rest of the process (_CAPTURE_OFF)."""
    torch.cuda.set_stream(caller_stream)
    device = torch.cuda.current_device()
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        try:
            getattr(torch._C, name)(device, pool)
        except Exception:  # noqa: BLE001 - already undone by torch, or not this torch's API
            pass
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as still:  # noqa: BLE001
        _CAPTURE_OFF.append(f"a capture failed ({_root_cause(exc)}) and the allocator did not recover "
                            f"({_describe(still)})")


def _describe(exc: BaseException) -> str:
    """'Type: first line of the message' (at most 120 characters of it)."""
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _root_cause(exc: BaseException) -> str:
    """The first error of a failed capture: torch.cuda.graph's capture_end raises its own error over the one that
    invalidated the capture, which is then the context."""
    return _describe(exc.__context__ if exc.__context__ is not None else exc)


def host_ms_per_call(fn, calls: int = 10) -> float:
    """Host time of one fn() when calls are issued back to back with no sync between them: the launch cost a
    caller pays (if it exceeds the kernels' time, an eager caller waits on Python, not on the GPU). 10 calls of a
    few launches each stay well inside the GPU's launch queue, so the host is not throttled by the device."""
    import time
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed * 1e3 / calls


def cuda_kernel_time(fn, warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """{'ms', 'p20', 'p80', 'host_ms', 'timing'}: do_bench of one replay of fn captured in a CUDA graph (the L2
    cleared before each replay, as for any do_bench call), i.e. the time of fn's kernels with no host gap between
    them. A callable that cannot be captured (a host sync inside, say) is timed as called, with 'timing' saying so
    and why (also printed to stderr): a row is never silently timed the other way. A call that reads a result back
    only outside captures (bertfast_C's checked ops skip their read-back while capturing) must be timed with
    graph=False: replayed, it would do less than an eager call."""
    import sys
    from triton.testing import do_bench
    host_ms = host_ms_per_call(fn)
    try:
        g = capture_graph(fn)
    except Exception as exc:  # noqa: BLE001 - said in the row and on stderr
        torch.cuda.synchronize()
        timing = f"eager (not captured: {_root_cause(exc)})"
        print(f"cuda_kernel_time: {timing}", file=sys.stderr)
        run = fn
    else:
        timing, run = "cuda graph", g.replay
    med, p20, p80 = do_bench(run, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "p20": p20, "p80": p80, "host_ms": host_ms, "timing": timing}


def timing_kind(row: dict) -> str:
    """"cuda graph" for a row timed from a graph replay (its kernels' time), "as called" for every other row: CPU
    rows, whole-model rows, bench_cuda_ops' checked rows and a callable whose capture failed ("eager (not
    captured: ...)")."""
    return "cuda graph" if row.get("timing") == "cuda graph" else "as called"


def speedup(base: dict | None, row: dict, key: str = "ms") -> float | None:
    """base[key] / row[key] (above 1: row is faster), or None when either has no time or the two were timed
    differently: a graph replay (kernels only) against a call as made (host gaps and syncs included) would put the
    host's time into the ratio, e.g. sdpa-flash fwd+bwd at 32x128 took 0.166 ms as called against ~0.1 ms of
    kernels on the H200 (2026-11-27 review)."""
    if not base or not base.get(key) or not row.get(key) or timing_kind(base) != timing_kind(row):
        return None
    return base[key] / row[key]


def timeit_interleaved(fns: dict, device, rep_ms: float = 400, min_reps: int = 5, warmup: bool = True) -> dict:
    """{name: timeit-style dict} for several callables; on CPU their repetitions alternate (a, b, a, b, ...)
    so that the drift of a shared machine (other tenants, clocks) hits each of them alike. On CUDA each is
    timed on its own with do_bench (CUDA events are not disturbed that way). warmup=False: the caller has just
    called each fn once (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {name: timeit(fn, device, rep_ms=rep_ms) for name, fn in fns.items()}
    for fn in (fns.values() if warmup else ()):     # warm-up (allocator, first-call costs)
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
    """The results folder's name: the GPU's name, or the CPU's model and thread count."""
    device = torch.device(device)
    name = device_name(device)
    if device.type == "cuda":
        return _slug(name.lower().replace("nvidia", ""))
    return cpu_slug(name, torch.get_num_threads())


def _slug(text: str) -> str:
    import re
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def cpu_slug(name: str, threads: int) -> str:
    """"Intel(R) Xeon(R) Platinum 8480+ (2 threads)" -> "cpu-intel-xeon-platinum-8480-2t". Only device_name's
    thread-count suffix is cut, then the (R) / (TM) marks: cutting from the first "(" to the last ")" made every
    Intel CPU "cpu-intel-2t" (an AVX2 Xeon's run would have replaced an AVX-512 one's results)."""
    import re
    short = re.sub(r"\s*\(\d+ threads\)$", "", name).lower()
    short = re.sub(r"(\(r\)|\(tm\)|\bcpu\b|processor|@.*)", " ", short)
    return "cpu-" + _slug(short)[:40] + f"-{threads}t"


def bench_args(doc: str, argv=None):
    """The command line of the kernel benchmarks that take a device: --quick and --device (CUDA when present)."""
    import argparse
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and dtypes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)
