"""End-to-end encoder benchmarks: bertfast against transformers (eager, SDPA, torch.compile of SDPA) in the same
run, on random-weight BERT-base / BERT-large / MiniLM configurations.

Workloads: fixed 32x128 and 32x512, latency 1x128, variable length (32 sequences, lengths uniform in 16..512,
seeded), and a fine-tuning step (forward + backward + AdamW) at 32x128. FLOPs count the useful work on real
tokens only (the same for every implementation), so model FLOP utilisation is comparable across them.
"""
from __future__ import annotations

import copy
import gc

import torch

from benchmarks.common import child_rows, compiled_baseline, timeit, timeit_interleaved

MODELS = {
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def workloads(device, quick: bool):
    """name -> (batch, padded length, lengths or None for all full)."""
    gen = torch.Generator().manual_seed(0)
    if torch.device(device).type == "cpu":
        out = {"fixed-8x128": (8, 128, None),
               "varlen-32x16..256": (32, 256, torch.randint(16, 257, (32,), generator=gen)),
               "latency-1x128": (1, 128, None)}
        return out
    return {"fixed-32x128": (32, 128, None), "fixed-32x512": (32, 512, None), "latency-1x128": (1, 128, None),
            "varlen-32x16..512": (32, 512, torch.randint(16, 513, (32,), generator=gen))}


def plan(device, quick: bool):
    """The (model, dtype) pairs and which baselines run, sized to the time budget of the device."""
    if torch.device(device).type == "cpu":
        models = [("minilm-l6", torch.float32), ("bert-base", torch.float32)]
        compile_for = {("minilm-l6", torch.float32, "fixed-8x128")}
        if not quick:
            compile_for.add(("bert-base", torch.float32, "varlen-32x16..256"))
        return models, compile_for
    models = [("bert-base", torch.float16), ("bert-base", torch.bfloat16), ("minilm-l6", torch.float16),
              ("bert-large", torch.float16)]
    if not quick:
        models.append(("bert-base", torch.float32))
    # each compile is a cold, static one (compiled_baseline): ~15-20 s apiece on the H100, so --quick compiles
    # the fp16 rows only
    compile_for = {("bert-base", torch.float16, "fixed-32x128"), ("bert-base", torch.float16, "varlen-32x16..512")}
    if not quick:
        compile_for |= {("bert-base", torch.bfloat16, w) for w in ("fixed-32x128", "varlen-32x16..512")}
    return models, compile_for


def forward_flops(cfg: dict, lengths: torch.Tensor) -> float:
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tokens = float(lengths.sum())
    gemm = 2 * tokens * (4 * h * h + 2 * h * i)
    attn = 4 * float((lengths.double() ** 2).sum()) * h
    return layers * (gemm + attn)


def _batch(b, s, lengths, vocab, device):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (b, s), generator=gen)
    if lengths is None:
        lengths = torch.full((b,), s)
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    return ids.to(device), mask.to(device), lengths


def build_models(dims: dict, dtype, device, eager: bool = True):
    """(config, transformers SDPA model, transformers eager model or None, bertfast model), random weights
    (seed 0) shared by all three, for a BertConfig with `dims` (hidden_size, num_hidden_layers, ...)."""
    from transformers import BertConfig
    from transformers import BertModel as HFBertModel

    import bertfast
    cfg = BertConfig(**dims, vocab_size=30522)
    torch.manual_seed(0)
    sdpa = HFBertModel._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").to(device, dtype).eval()
    eager_model = None
    if eager:
        eager_model = HFBertModel._from_config(copy.deepcopy(cfg), attn_implementation="eager").to(device, dtype)
        eager_model.eval().load_state_dict(sdpa.state_dict())
    return cfg, sdpa, eager_model, bertfast.BertModel.from_hf(sdpa).eval()


def _models(name, dtype, device):
    return build_models(MODELS[name], dtype, device)


def run(device="cuda", quick=False, progress=None, on_model_done=None) -> list[dict]:
    """All rows; on_model_done(rows so far) is called after every row, so a caller can save partial results (a
    run cut at its time limit keeps every row it finished). A model or workload that cannot be set up gives error
    rows and the rest still run."""
    device = torch.device(device)
    models, compile_for = plan(device, quick)
    rows = []

    def add(*new_rows):
        rows.extend(new_rows)
        if on_model_done:
            on_model_done(rows)

    for name, dtype in models:
        try:
            cfg, sdpa, eager, ours = _models(name, dtype, device)
        except Exception as exc:  # noqa: BLE001 - this model's rows say why; the others still run
            add({"kind": "model", "model": name, "dtype": str(dtype).replace("torch.", ""), "workload": "setup",
                 "impl": "all", "device": device.type, "error": f"{type(exc).__name__}: {exc}"})
            continue
        for wname, (b, s, lengths) in workloads(device, quick).items():
            ids, mask, lengths = _batch(b, s, lengths, cfg.vocab_size, device)
            flops = forward_flops(MODELS[name], lengths)
            impls = {"bertfast": lambda: ours(ids, attention_mask=mask),
                     "transformers-sdpa": lambda: sdpa(ids, attention_mask=mask),
                     "transformers-eager": lambda: eager(ids, attention_mask=mask)}
            if device.type == "cuda":      # padded batches too: graphs of their packed length (NOTES change 25)
                impls["bertfast-cudagraph"] = _deferred(lambda: copy.deepcopy(ours).enable_cuda_graphs(),
                                                        lambda graphed: graphed(ids, attention_mask=mask))
            if (name, dtype, wname) in compile_for:
                impls["transformers-sdpa-compile"] = _deferred(lambda: compiled_baseline(sdpa),
                                                               lambda compiled: compiled(ids, attention_mask=mask))
            if device.type == "cpu":   # one group, repetitions alternating: the VM's drift hits each impl alike
                if progress:
                    progress(f"{name} {str(dtype)[6:]} {wname} {', '.join(impls)} (interleaved on CPU)")
                add(*interleaved_rows(impls, lambda impl, t, error=None: _row(name, dtype, wname, impl, t, flops,
                                                                              lengths, device, error=error),
                                      device, rep_ms=300 if quick else 600))
                impls.clear()
                continue
            for impl, fn in impls.items():
                if progress:
                    progress(f"{name} {str(dtype)[6:]} {wname} {impl}")
                try:
                    with torch.inference_mode():
                        # a graph's memory is its pool, reserved at capture: a replay allocates only the copy out
                        peak = peak_mib(fn, device) if impl != "bertfast-cudagraph" else None
                        t = timeit(fn, device, rep_ms=300 if quick else 600)
                    add(_row(name, dtype, wname, impl, t, flops, lengths, device, peak_mib=peak))
                except Exception as exc:  # noqa: BLE001
                    add(_row(name, dtype, wname, impl, None, flops, lengths, device,
                             error=f"{type(exc).__name__}: {exc}"))
            impls.clear()
            del fn           # the last callable holds a compiled model or a graphed copy of the encoder
        add(*_train_step(name, dtype, cfg, sdpa, ours, device, quick, progress))
        if device.type == "cpu" and name == "bert-base":
            add(*_train_step_memory_kept(quick, progress))
        del sdpa, eager, ours
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def interleaved_rows(impls: dict, make_row, device, rep_ms: float) -> list[dict]:
    """Rows of impls timed together by timeit_interleaved under inference_mode (CPU forwards: run one after another,
    the implementations of a workload were timed seconds to minutes apart on a shared VM whose speed drifts 10-20%
    in that time). An impl whose first call fails gets an error row and the others are still timed; rows keep the
    order of impls. make_row(impl, t, error=None) builds a row (t None for an error)."""
    errors, ok = {}, {}
    with torch.inference_mode():
        for impl, fn in impls.items():
            try:
                fn()
                ok[impl] = fn
            except Exception as exc:  # noqa: BLE001 - this impl's row says why; the others still run
                errors[impl] = f"{type(exc).__name__}: {exc}"
        times = {}
        if ok:
            try:
                times = timeit_interleaved(ok, device, rep_ms=rep_ms, warmup=False)   # each was just called
            except Exception as exc:  # noqa: BLE001
                errors.update({impl: f"{type(exc).__name__}: {exc}" for impl in ok})
    return [make_row(impl, times[impl]) if impl in times else make_row(impl, None, error=errors[impl])
            for impl in impls]


def _deferred(make, call):
    """A benchmark callable whose setup (make) runs at its first call, inside the row's try: a setup that fails
    (a graph capture, a compile) becomes that row's error instead of ending the benchmark."""
    made = []

    def fn():
        if not made:
            made.append(make())
        return call(made[0])
    return fn


def peak_mib(fn, device) -> float | None:
    """Memory one call of fn allocates at its peak beyond what was allocated before it (the weights of every
    model of the run and the benchmark's own buffers stay out of it), MiB; None on CPU."""
    if device.type != "cuda":
        return None
    fn()                                  # first-call setup (graphs, compiles) outside the measured call
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _train_step(name, dtype, cfg, sdpa, ours, device, quick, progress):
    """One fine-tuning step (forward + backward + AdamW) at 32x128 (8x128 on CPU), dropout on as in training."""
    if name != "bert-base" or (device.type == "cuda" and dtype == torch.float32):
        return []
    b = 32 if device.type == "cuda" else 8
    ids, mask, lengths = _batch(b, 128, None, cfg.vocab_size, device)
    workload = f"train-{b}x128"

    def make_step(model):
        model = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

        def step():
            out = model(ids, attention_mask=mask).last_hidden_state
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if progress:
        progress(f"{name} {str(dtype)[6:]} {workload} bertfast / transformers-sdpa (interleaved on CPU)")
    steps = {}
    try:
        steps = {"bertfast": make_step(ours), "transformers-sdpa": make_step(sdpa)}
        times = timeit_interleaved(steps, device, rep_ms=300 if quick else 600)
        return [_row(name, dtype, workload, impl, t, 3 * forward_flops(MODELS[name], lengths), lengths, device)
                for impl, t in times.items()]
    except Exception as exc:  # noqa: BLE001
        return [_row(name, dtype, workload, impl, None, 0, lengths, device, error=f"{type(exc).__name__}: {exc}")
                for impl in ("bertfast", "transformers-sdpa")]


# glibc keeps freed memory in the process (as jemalloc / tcmalloc do) instead of serving each large block from
# fresh pages: set in a child process, since it has to be in place when the process starts
MEMORY_KEPT_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"
MEMORY_KEPT = "freed memory kept"


def _train_step_memory_kept(quick, progress):
    """The CPU fine-tuning step again in a child process whose glibc keeps freed memory: with the defaults every
    step faults in fresh pages for its large temporaries, which changes the comparison (NOTES, "The CPU
    fine-tuning step and the allocator"). Rows carry the workload "<train workload>, freed memory kept"."""
    if progress:
        progress(f"bert-base float32 train step, {MEMORY_KEPT} (child process)")
    try:
        rows = child_rows("benchmarks.bench_model", ["--train-cpu"] + (["--quick"] if quick else []),
                          env={"GLIBC_TUNABLES": MEMORY_KEPT_TUNABLES})
    except RuntimeError as exc:
        return [{"kind": "model", "model": "bert-base", "dtype": "float32", "workload": f"train, {MEMORY_KEPT}",
                 "impl": impl, "device": "cpu", "error": str(exc)} for impl in ("bertfast", "transformers-sdpa")]
    return [dict(r, workload=f"{r['workload']}, {MEMORY_KEPT}", malloc=MEMORY_KEPT) for r in rows]


def _row(model, dtype, workload, impl, t, flops, lengths, device, peak_mib=None, error=None):
    row = {"kind": "model", "model": model, "dtype": str(dtype).replace("torch.", ""), "workload": workload,
           "impl": impl, "device": device.type, "real_tokens": int(lengths.sum())}
    if t is None:
        row["error"] = error
        return row
    row.update(ms=t["ms"], p20=t["p20"], p80=t["p80"], tflops=flops / (t["ms"] * 1e-3) / 1e12,
               tokens_per_s=float(lengths.sum()) / (t["ms"] * 1e-3))
    if peak_mib is not None:
        row["peak_mib"] = peak_mib
    return row


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_<baseline> = baseline ms / this ms, for rows of the same model, dtype and workload."""
    groups = {}
    for r in rows:
        if r.get("kind") == "model" and "ms" in r:
            groups.setdefault((r["model"], r["dtype"], r["workload"]), {})[r["impl"]] = r["ms"]
    for r in rows:
        if r.get("kind") != "model" or "ms" not in r:
            continue
        base = groups[(r["model"], r["dtype"], r["workload"])]
        for b in ("transformers-sdpa", "transformers-eager", "transformers-sdpa-compile"):
            if b in base and b != r["impl"]:
                r[f"vs_{b}"] = base[b] / r["ms"]


def main():
    import argparse
    import json
    parser = argparse.ArgumentParser(description="bertfast end-to-end benchmarks (use `bertfast bench` for all)")
    parser.add_argument("--train-cpu", action="store_true", help="only the CPU fine-tuning step of BERT-base")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="PATH", required=True, help="write the rows to PATH as JSON")
    args = parser.parse_args()
    if not args.train_cpu:
        parser.error("only --train-cpu is supported here; `bertfast bench` runs the rest")
    device = torch.device("cpu")
    cfg, sdpa, _, ours = _models("bert-base", torch.float32, device)
    rows = _train_step("bert-base", torch.float32, cfg, sdpa, ours, device, args.quick, None)
    with open(args.json, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main()
