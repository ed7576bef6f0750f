"""The benchmark suite (`bertfast bench`, `python -m benchmarks`).

Measures the ceilings first (copy bandwidth; bf16 matmul on CUDA, fp32 matmul on CPU), then every kernel
benchmark that exists for the device, then the end-to-end encoder against its baselines, all in one run, and
writes results/<device-slug>/results.json, results.md and PNG plots.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
KERNEL_BENCHES = {  # module -> devices it runs on
    "bench_attention": ("cuda",),
    "bench_norm_act": ("cuda",),
    "bench_cpu_ops": ("cpu",),
    "bench_cuda_ops": ("cuda",),
    "bench_linear_act": ("cuda",),
}


def _git_commit() -> str:
    if os.environ.get("BERTFAST_COMMIT"):       # set by whoever copies a checkout without .git to a GPU machine
        return os.environ["BERTFAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device) -> dict:
    import torch

    from benchmarks.common import device_name
    env = {"device": device_name(device), "device_type": torch.device(device).type, "torch": torch.__version__,
           "python": platform.python_version(), "commit": _git_commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "threads": torch.get_num_threads()}
    for name in ("triton", "transformers", "flash_attn", "liger_kernel"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - not installed is information, not an error
            env[name] = None
    if torch.device(device).type == "cuda":
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
        cap = torch.cuda.get_device_capability(device)
        env["capability"] = f"sm_{cap[0]}{cap[1]}"
    return env


class Progress:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self, what: str):
        print(f"[{time.time() - self.t0:7.1f}s] {what}", flush=True)


def write_markdown(path: pathlib.Path, env: dict, ceilings: dict, rows: list[dict]) -> None:
    lines = [f"# bertfast benchmark results: {env['device']}", "",
             f"Measured {env['date']} at commit `{env['commit']}`: torch {env['torch']}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}"
             + (f", CUDA {env.get('cuda')}, driver {env.get('driver')}" if env.get("cuda") else "") + ".", "",
             "Ceilings measured at the start of this run: "
             f"copy bandwidth {ceilings['copy_gbs']:.0f} GB/s (bytes read + written), "
             f"matmul {ceilings['matmul_tflops']:.1f} TFLOP/s ({ceilings['matmul_dtype']}).", "",
             "Times are medians (p20-p80 in brackets) of CUDA-event timings (triton.testing.do_bench) on GPUs, of "
             "wall-clock timings on CPUs. On GPUs the kernel rows time the call replayed from a CUDA graph (its "
             "kernels' time, no host gaps; results.json gives each row's `timing` and `host_ms`, the host's time "
             "a call), the whole-encoder rows the call as made. Ratios compare implementations measured in this "
             "same run; "
             "`vs X` = time of X / time of this row (above 1 = faster than X). `peak MiB`: memory one forward "
             "allocates at its peak beyond what was allocated before it (weights excluded; not shown for graph "
             "replays, whose memory is the pool their capture reserved).", ""]
    model_rows = [r for r in rows if r.get("kind") == "model"]
    if model_rows:
        lines += ["## Whole encoder", "",
                  "| model | dtype | workload | implementation | ms | tokens/s | TFLOP/s | MFU | vs sdpa | vs eager | vs compile | peak MiB |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in model_rows:
            if "ms" not in r:
                lines.append(f"| {r['model']} | {r['dtype']} | {r['workload']} | {r['impl']} | error: "
                             f"{r['error'][:120]} |||||||| |")
                continue
            mfu = r["tflops"] / ceilings["matmul_tflops"]
            peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else ""

            def ratio(k):
                return f"{r[k]:.2f}x" if k in r else ""
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['workload']} | {r['impl']} | {r['ms']:.2f} "
                f"({r['p20']:.2f}-{r['p80']:.2f}) | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu:.0%} | "
                f"{ratio('vs_transformers-sdpa')} | {ratio('vs_transformers-eager')} | "
                f"{ratio('vs_transformers-sdpa-compile')} | {peak} |")
        lines.append("")
    kernel_rows = [r for r in rows if r.get("kind") == "kernel"]
    if kernel_rows:
        lines += ["## Kernels", "", "| benchmark | case | dtype | implementation | ms | throughput | fraction of ceiling | speed-up |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        for r in kernel_rows:
            if r.get("ms") is None and "error" not in r:       # a reference row (e.g. the copy ceiling)
                lines.append(f"| {r.get('bench')} | {r.get('name', '')} {r.get('shape', '')} | {r.get('dtype', '')} | "
                             f"{r.get('impl', '')} | | {r.get('gbps', '')} GB/s | | |")
                continue
            if "ms" not in r or r.get("ms") is None:
                lines.append(f"| {r.get('bench')} | {r.get('name', '')} {r.get('shape', '')} | {r.get('dtype', '')} | "
                             f"{r.get('impl', '')} | error: {str(r.get('error', ''))[:100]} | | | |")
                continue
            thr = (f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s" if "gbps" in r
                   else "")
            frac = r.get("frac_copy_bw", r.get("frac_peak"))
            sp = r.get("speedup", r.get("ratio"))
            lines.append(f"| {r.get('bench')} | {r.get('name', '')} {r.get('shape', '')} | {r.get('dtype', '')} | "
                         f"{r.get('impl', '')} | {r['ms']:.3f} | {thr} | {'' if frac is None else f'{frac:.0%}'} | "
                         f"{'' if sp is None else f'{sp:.2f}x'} |")
        lines.append("")
    path.write_text("\n".join(lines))


def plot(out: pathlib.Path, env: dict, rows: list[dict]) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    model_rows = [r for r in rows if r.get("kind") == "model" and r.get("impl") == "bertfast" and "ms" in r]
    graphed = {(r["model"], r["dtype"], r["workload"]): r for r in rows
               if r.get("kind") == "model" and r.get("impl") == "bertfast-cudagraph" and "ms" in r}
    if model_rows:
        labels = [f"{r['model']}\n{r['dtype']} {r['workload']}" for r in model_rows]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.5))
        xs = range(len(labels))
        series = [("bertfast vs transformers SDPA", [r.get("vs_transformers-sdpa", 0) for r in model_rows]),
                  ("bertfast vs transformers eager", [r.get("vs_transformers-eager", 0) for r in model_rows])]
        if graphed:
            series.append(("bertfast CUDA graph vs transformers SDPA",
                           [graphed.get((r["model"], r["dtype"], r["workload"]), {}).get("vs_transformers-sdpa", 0)
                            for r in model_rows]))
        width = 0.8 / len(series)
        for k, (name, values) in enumerate(series):
            ax.bar([x + (k - (len(series) - 1) / 2) * width for x in xs], values, width=width, label=name)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speed-up of bertfast (x)")
        ax.set_title(f"bertfast whole-encoder speed-up, {env['device']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "speedup.png", dpi=110)
        plt.close(fig)
        made.append("speedup.png")
    kernel_rows = [r for r in rows if r.get("kind") == "kernel" and r.get("ms")]
    if kernel_rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in kernel_rows:
            frac = r.get("frac_copy_bw", r.get("frac_peak"))
            if frac is None:
                continue
            ax.scatter(r["ms"], frac, s=12, label=r.get("impl"))
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("time (ms)")
        ax.set_ylabel("fraction of measured ceiling")
        ax.set_title(f"kernels against the measured ceilings, {env['device']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "kernels.png", dpi=110)
        plt.close(fig)
        made.append("kernels.png")
    return made


def _device_arg(value: str):
    """--device: bertfast's own check of a device argument (argparse names the argument and the value)."""
    from bertfast.cli import parse_device
    try:
        return parse_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bertfast bench", description=__doc__)
    parser.add_argument("--device", default=None, type=_device_arg, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="fewer cases (CPU: under 10 minutes on 2 cores)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-slug>)")
    parser.add_argument("--only", choices=("kernels", "model"), default=None)
    parser.add_argument("--dry-run", action="store_true", help="list what would run, measure nothing")
    args = parser.parse_args(argv)

    import torch

    from benchmarks import bench_model
    from benchmarks.common import copy_bandwidth_gbs, device_slug, matmul_tflops
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bertfast bench: --device cuda but no CUDA device is available")
        return 2
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    out = pathlib.Path(args.out) if args.out else HERE / "results" / device_slug(device)
    benches = [m for m, devs in KERNEL_BENCHES.items() if device.type in devs and (HERE / f"{m}.py").exists()]
    if args.dry_run:
        models, compile_for = bench_model.plan(device, args.quick)
        print(f"bertfast bench (dry run) on {device}: output {out}")
        print(f"  kernel benchmarks: {', '.join(benches) or 'none for this device'}")
        print(f"  models: {', '.join(f'{m} {str(d)[6:]}' for m, d in models)}")
        print(f"  workloads: {', '.join(bench_model.workloads(device, args.quick))}")
        compiled = sorted(f"{m} {str(d)[6:]} {w}" for m, d, w in compile_for)
        print(f"  torch.compile baseline for: {', '.join(compiled)}")
        return 0

    progress = Progress()
    progress(f"bertfast bench on {device}; results -> {out}")
    env = environment(device)
    ceilings = {"copy_gbs": copy_bandwidth_gbs(device), "matmul_tflops": matmul_tflops(device),
                "matmul_dtype": "bf16" if device.type == "cuda" else "fp32"}
    progress(f"ceilings: copy {ceilings['copy_gbs']:.0f} GB/s, matmul {ceilings['matmul_tflops']:.1f} TFLOP/s")
    rows: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)

    saved = [rows]

    def save(all_rows, final=False):
        """Written before and after every benchmark, so a run cut short by its time limit keeps what it
        measured (saved[0]: the rows last written)."""
        saved[0] = all_rows
        (out / "results.json").write_text(json.dumps({"environment": env, "ceilings": ceilings, "rows": all_rows,
                                                     "complete": final}, indent=1, default=str))
        write_markdown(out / "results.md", env, ceilings, all_rows)

    save(rows)
    try:
        rows = _run_benchmarks(args, device, benches, rows, save, progress)
        complete = True
    except KeyboardInterrupt:      # the GPU suite's time limit (SIGINT): keep and plot what was measured
        progress("interrupted: results.json / results.md hold the rows measured so far")
        rows, complete = saved[0], False
    save(rows, final=complete)
    plots = plot(out, env, rows)
    progress(f"wrote {out / 'results.json'}, results.md{', ' + ', '.join(plots) if plots else ''}")
    print((out / "results.md").read_text())
    return 0 if complete else 130


def _run_benchmarks(args, device, benches, rows, save, progress) -> list[dict]:
    """The kernel benchmarks, then the model benchmark; every row saved as it comes."""
    from benchmarks import bench_model

    if args.only in (None, "kernels"):
        for name in benches:
            progress(f"kernel benchmark {name}")
            try:
                mod = importlib.import_module(f"benchmarks.{name}")
                run = getattr(mod, "suite_run", mod.run)   # suite_run: a module's own choice of cases for the suite
                params = inspect.signature(run).parameters
                kwargs = {"quick": args.quick, **({"device": device.type} if "device" in params else {})}

                def add(r, name=name):
                    rows.append({"kind": "kernel", "bench": name, **{k: _plain(v) for k, v in r.items()}})
                if "on_row" in params:     # rows saved as they are measured
                    run(**kwargs, on_row=lambda r: (add(r), save(rows)))
                else:
                    for r in run(**kwargs):
                        add(r)
            except Exception as exc:  # noqa: BLE001 - a failing benchmark is reported, the rest still run
                rows.append({"kind": "kernel", "bench": name, "error": f"{type(exc).__name__}: {exc}"})
                progress(f"  {name} failed: {type(exc).__name__}: {exc}")
            save(rows)
    if args.only in (None, "model"):
        kernel_rows = list(rows)

        def partial(model_rows):
            both = kernel_rows + list(model_rows)
            bench_model.add_ratios(both)
            save(both)
        rows = kernel_rows + bench_model.run(device, args.quick, progress, on_model_done=partial)
        bench_model.add_ratios(rows)
    return rows


def _plain(v):
    import torch
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (tuple, list)):
        return "x".join(map(str, v))
    return v


if __name__ == "__main__":
    sys.exit(main())
