"""The benchmark suite (`bertfast bench`, `python -m benchmarks`).

Measures the ceilings first (copy bandwidth; bf16 matmul on CUDA, fp32 matmul on CPU), then every kernel
benchmark that exists for the device, then the end-to-end encoder against its baselines, all in one run, then
the ceilings again (MFU is of the higher of the two matmul measurements in the row's dtype; a GPU kernel row's
fraction of copy bandwidth is of the highest copy measured: the suite's two and its benchmark's own), and writes
results/<device-slug>/results.json, results.md and PNG plots.
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
    # the CPU's vector ISA: the C++ CPU kernels are compiled for AVX-512, AVX2 and the baseline and pick one at run
    # time (two VMs both named "AMD EPYC" write the same results folder: one AVX2, one AVX-512)
    env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        import bertfast._C  # noqa: F401
        env["bertfast_cpu_isa"] = torch.ops.bertfast_C.cpu_isa()
    except Exception as exc:  # noqa: BLE001 - said, not raised: the GPU benchmarks do not need the CPU kernels
        from benchmarks.common import _describe
        env["bertfast_cpu_isa"] = f"unavailable ({_describe(exc)})"
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
             + (f", CUDA {env.get('cuda')}, driver {env.get('driver')}" if env.get("cuda") else "")
             + (f"; CPU kernels' ISA {env['bertfast_cpu_isa']}" if env.get("device_type") == "cpu"
                and env.get("bertfast_cpu_isa") else "") + ".", "",
             ceilings_sentence(ceilings), "",
             "Times are medians (p20-p80 in brackets) of CUDA-event timings (triton.testing.do_bench) on GPUs, of "
             "wall-clock timings on CPUs. On GPUs the kernel rows time the call replayed from a CUDA graph (its "
             "kernels' time, no host gaps; results.json gives each row's `timing` and `host_ms`, the host's time "
             "a call), the whole-encoder rows the call as made. Ratios compare implementations measured in this "
             "same run; "
             "`vs X` = time of X / time of this row (above 1 = faster than X). `peak MiB`: memory one forward "
             "allocates at its peak beyond what was allocated before it (weights excluded; not shown for graph "
             "replays, whose memory is the pool their capture reserved).", ""]
    model_rows = [r for r in rows if r.get("kind") == "model"]
    over_ceiling = False
    if model_rows:
        lines += ["## Whole encoder", "",
                  "| model | dtype | workload | implementation | ms | tokens/s | TFLOP/s | MFU | vs sdpa | vs eager | vs compile | peak MiB |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in model_rows:
            if "ms" not in r:
                lines.append(f"| {r['model']} | {r['dtype']} | {r['workload']} | {r['impl']} | error: "
                             f"{r['error'][:120]} |||||||| |")
                continue
            mfu = r["tflops"] / matmul_ceiling(ceilings, r["dtype"])
            over_ceiling |= mfu > 1
            peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else ""

            def ratio(k):
                return f"{r[k]:.2f}x" if k in r else ""
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['workload']} | {r['impl']} | {r['ms']:.2f} "
                f"({r['p20']:.2f}-{r['p80']:.2f}) | {r['tokens_per_s']:,.0f} | {_rate(r['tflops'])} | "
                f"{mfu:.0%}{' (!)' if mfu > 1 else ''} | "
                f"{ratio('vs_transformers-sdpa')} | {ratio('vs_transformers-eager')} | "
                f"{ratio('vs_transformers-sdpa-compile')} | {peak} |")
        if over_ceiling:
            lines += ["", "(!) above the measured matmul ceiling: the ceiling was measured low (a busy machine, or "
                      "a matmul shape slower than the encoder's GEMMs); these MFU figures are not a fraction of "
                      "what the hardware can do."]
        lines.append("")
    kernel_rows = [r for r in rows if r.get("kind") == "kernel"]
    over_ceiling_k = False
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
            thr = (f"{_rate(r['tflops'])} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s" if "gbps" in r
                   else "")
            frac = r.get("frac_copy_bw", r.get("frac_peak"))
            sp = _speedup_cell(r)
            lines.append(f"| {r.get('bench')} | {r.get('name', '')} {r.get('shape', '')} | {r.get('dtype', '')} | "
                         f"{r.get('impl', '')} | {r['ms']:.3f} | {thr} | "
                         f"{'' if frac is None else f'{frac:.0%}' + (' (!)' if frac > 1 else '')} | "
                         f"{sp} |")
            over_ceiling_k |= frac is not None and frac > 1
        if over_ceiling_k:
            lines += ["", "(!) above the ceiling it is a fraction of: part of the case's bytes stay in a cache "
                      "that the ceiling's larger copy does not fit in (results.json: `frac_same_bytes_copy`, a "
                      "copy of the case's own size), or the ceiling was measured low."]
        lines.append("")
    path.write_text("\n".join(lines))


MATMUL_DTYPES = {"cuda": ("bfloat16", "float16", "float32"), "cpu": ("float32",)}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def measure_ceilings(device) -> dict:
    """Copy bandwidth, and the matmul rate in each dtype the run's model rows use (`matmul_<dtype>`; on CUDA fp32
    runs at a fraction of bf16's rate, TF32 being off by default, so an fp32 row's MFU is of the fp32 rate);
    `matmul_tflops` is the headline (bf16 on CUDA, fp32 on CPU)."""
    import torch

    from benchmarks.common import copy_bandwidth_gbs, matmul_tflops
    ceilings = {"copy_gbs": copy_bandwidth_gbs(device)}
    for name in MATMUL_DTYPES[device.type]:
        ceilings[f"matmul_{name}"] = matmul_tflops(device, getattr(torch, name))
    headline = MATMUL_DTYPES[device.type][0]
    return {**ceilings, "matmul_tflops": ceilings[f"matmul_{headline}"], "matmul_dtype": SHORT[headline]}


def combine_ceilings(start: dict, end: dict | None = None) -> dict:
    """The ceilings a run's fractions are taken of: each the higher of its measurements at the start and at the
    end of the run (a ceiling is the best rate the hardware showed; one measurement made while the machine was
    busy - 2026-11-26's AMD CPU run: 0.088 TFLOP/s, against 0.19 on the idle machine - put model rows at 127%
    "MFU"). Both measurements are kept under "start" and "end"."""
    combined = {k: (max(v, end[k]) if end is not None and isinstance(v, float) else v) for k, v in start.items()}
    return {**combined, "start": start, **({"end": end} if end is not None else {})}


def matmul_ceiling(ceilings: dict, dtype: str) -> float:
    """The matmul ceiling of a model row's dtype (the headline for results written before per-dtype ceilings)."""
    return ceilings.get(f"matmul_{dtype}", ceilings["matmul_tflops"])


def _speedup_cell(r: dict) -> str:
    """The kernel table's speed-up: `speedup` (over the benchmark's baseline), or the attention rows' two ratios
    (bench_attention: over SDPA flash on the padded batch, and over the fastest masked SDPA)."""
    if r.get("speedup") is not None:
        return f"{r['speedup']:.2f}x"
    if "speedup" in r:          # benchmarks.common.speedup gave None
        return "n/a (baseline failed, or timed another way)"
    parts = [f"{r[k]:.2f}x {label}" for k, label in (("ratio_vs_sdpa_flash", "flash"),
                                                      ("ratio_vs_sdpa_masked", "masked")) if r.get(k)]
    return ", ".join(parts)


def rebase_kernel_fractions(rows: list[dict], ceilings: dict, device) -> None:
    """GPU kernel rows' frac_copy_bw as a fraction of the higher of their benchmark's own copy (what frac_copy_bw
    was; kept as frac_bench_copy) and the suite's copy ceiling: each GPU benchmark measures its copy once, at its
    start, and the H200 run's was 4116 GB/s against the suite's 4222 (LayerNorm fwd at 16384 x 768: 68.9% of the
    one, 67.1% of the other). CPU rows keep bench_cpu_ops' own: its copy runs on 2 threads, as its ops do."""
    if device.type != "cuda":
        return
    for r in rows:
        if r.get("kind") != "kernel" or not r.get("gbps") or r.get("frac_copy_bw") is None:
            continue
        own = r.setdefault("frac_bench_copy", r["frac_copy_bw"])
        r["frac_copy_bw"] = round(min(own, r["gbps"] / ceilings["copy_gbs"]), 3)


def ceilings_sentence(ceilings: dict) -> str:
    def both(key, fmt):
        if "end" not in ceilings:
            return fmt(ceilings[key])
        return f"{fmt(ceilings[key])} (start {fmt(ceilings['start'][key])}, end {fmt(ceilings['end'][key])})"
    matmuls = [k for k in ceilings if k.startswith("matmul_") and k not in ("matmul_tflops", "matmul_dtype")]
    matmul = (", ".join(f"{SHORT.get(k[7:], k[7:])} {both(k, _rate)}" for k in matmuls) if matmuls else
              f"{ceilings['matmul_dtype']} {both('matmul_tflops', _rate)}")
    when = ("the higher of two measurements, at the start and at the end of this run: " if "end" in ceilings else
            "measured at the start of this run only (not again at its end): " if "start" in ceilings else
            "measured at the start of this run: ")     # results written before the second measurement existed
    text = ("Ceilings: " + when
            + f"copy bandwidth {both('copy_gbs', lambda v: f'{v:.0f}')} GB/s (bytes read + written); "
            f"matmul {matmul} TFLOP/s" + ("; each model row's MFU is of its own dtype's rate" if len(matmuls) > 1
                                           else "")
            + ("; a GPU kernel row's fraction of copy bandwidth is of the higher of this copy and its benchmark's "
               "own (results.json keeps the latter's as frac_bench_copy)." if "matmul_bfloat16" in ceilings
               else "."))
    if "end" in ceilings:
        keys = [k for k, v in ceilings["start"].items() if isinstance(v, float)]
        spread = max(max(ceilings["start"][k], ceilings["end"][k]) / min(ceilings["start"][k], ceilings["end"][k])
                     for k in keys)
        if spread > 1.2:
            text += (f" The two measurements differ by up to {spread - 1:.0%}: the machine's load changed during "
                     "the run, so its fractions of a ceiling are uncertain (its ratios compare rows measured "
                     "side by side).")
    return text


def _rate(tflops: float) -> str:
    """TFLOP/s with three significant digits below 10 (a CPU's 0.19, not 0.2), one decimal above."""
    return f"{tflops:.1f}" if tflops >= 10 else f"{tflops:.3g}"


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
    from benchmarks.common import device_slug
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
    ceilings = combine_ceilings(measure_ceilings(device))
    progress(f"ceilings: copy {ceilings['copy_gbs']:.0f} GB/s, matmul {_rate(ceilings['matmul_tflops'])} TFLOP/s")
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
    if complete:        # an interrupted GPU suite is out of time: it keeps the start's measurement only
        try:            # the time limit's SIGINT or a CUDA error here must not cost a run whose rows all finished
            ceilings = combine_ceilings(ceilings["start"], measure_ceilings(device))
            progress(f"ceilings again: copy {ceilings['end']['copy_gbs']:.0f} GB/s, "
                     f"matmul {_rate(ceilings['end']['matmul_tflops'])} TFLOP/s")
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001
            progress(f"ceilings not measured again ({type(exc).__name__}: {exc}); the start's are kept")
    rebase_kernel_fractions(rows, ceilings, device)
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
