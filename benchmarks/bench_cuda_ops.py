"""Bandwidth of the CUDA kernels of bertfast._C: fused embedding + LayerNorm over packed tokens, unpad and
pad, against the torch composites they replace, at BERT shapes (16384 real tokens of hidden 768 / 1024).

GB/s counts the bytes each op must move at least once: embed reads the ids of the T real tokens and the distinct
word, position and token-type rows they name, and writes the [T, H] output (and fp32 mean / rstd); unpad reads and
writes T rows; pad reads T rows and writes the whole [B*S, H] output. The fraction is against the copy
bandwidth measured at the start of the same run. Each op runs twice: checked (its default: the error flag read
back after the launch, a stream sync) and unchecked (check=False, the encoder's call; csrc/cuda/cuda_common.cuh).
Embed also reads the indices of the real tokens and the LayerNorm's weight and bias.
Timing: triton.testing.do_bench medians with 20/80 quantiles on CUDA, of the call replayed from a CUDA graph
(benchmarks.common.cuda_kernel_time: the kernels' time; the torch composite of embed is 9 launches) except the
checked rows, whose read-back a capture would skip (cuda_common.cuh: not while capturing), so a replay would do
less than a call: those are timed as called, sync included (their `timing` says so), and their speed-up is over
torch's composite as called too ("torch as called"; the unchecked rows' over torch's graph replay: a ratio
never mixes the two timings); on CPU (a smoke run only)
wall clock through benchmarks.common.timeit.

    python -m benchmarks.bench_cuda_ops [--quick]     (from the project root)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import bench_args, copy_bandwidth_gbs, speedup, timeit

SHAPES = [(16384, 768), (16384, 1024)]        # (real tokens T, hidden H)
VOCAB, POSITIONS, TYPES, EPS = 30522, 512, 2, 1e-12


def _inputs(t, h, dtype, device):
    """A padded batch with t real tokens among 2 * t positions (half padding), and embedding tables."""
    gen = torch.Generator().manual_seed(0)
    n = 2 * t
    real = torch.zeros(n, dtype=torch.bool)
    real[torch.randperm(n, generator=gen)[:t]] = True
    indices = torch.nonzero(real).flatten().to(device)
    ids = torch.randint(0, VOCAB, (n,), generator=gen).to(device)
    pos = (torch.arange(n) % POSITIONS).to(device)
    types = torch.randint(0, TYPES, (n,), generator=gen).to(device)
    tables = [torch.randn(rows, h, dtype=dtype, device=device) for rows in (VOCAB, POSITIONS, TYPES)]
    ln_w, ln_b = torch.randn(h, dtype=dtype, device=device), torch.randn(h, dtype=dtype, device=device)
    return indices, ids, pos, types, tables, ln_w, ln_b


def run(device="cuda", quick=False, on_row=None) -> list[dict]:
    """The rows; on_row(row) is called for each once its op's rows are measured (the suite saves after each). An
    op that fails gives error rows; the others still run."""
    import bertfast._C  # noqa: F401 - registers torch.ops.bertfast_C
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_cuda_ops: no CUDA device")
    copy_bw = copy_bandwidth_gbs(device)
    shapes = SHAPES[:1] if quick else SHAPES
    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16]
    rows = []
    for dtype in dtypes:
        elem = torch.finfo(dtype).bits // 8
        for t, h in shapes:
            indices, ids, pos, types, (word, pemb, temb), ln_w, ln_b = _inputs(t, h, dtype, device)
            n = ids.shape[0]
            packed = torch.randn(t, h, dtype=dtype, device=device)
            padded = torch.randn(n, h, dtype=dtype, device=device)

            def embed_torch():
                i = ids.index_select(0, indices)
                e = F.embedding(i, word) + F.embedding(types.index_select(0, indices), temb) + \
                    F.embedding(pos.index_select(0, indices), pemb)
                return F.layer_norm(e, (h,), ln_w, ln_b, EPS)

            # embed's gathers: the distinct word / position / type rows of the real tokens (a repeated row comes
            # from memory once; counting 3 rows a token overstated the bytes ~2x, 2026-11-27 review)
            gathered = sum(int(torch.unique(v.index_select(0, indices)).numel()) for v in (ids, pos, types))
            # ours(check): check=True reads the kernel's error flag back (a stream sync, the op's default);
            # check=False is the encoder's call, whose ids and indices were checked once per batch
            cases = {
                "embed": (lambda check: torch.ops.bertfast_C.embed(ids, indices, pos, types, word, pemb, temb, ln_w,
                                                                   ln_b, EPS, check), embed_torch,
                          t * 4 * 8 + gathered * h * elem + 2 * h * elem + t * h * elem + 2 * t * 4),
                "unpad": (lambda check: torch.ops.bertfast_C.unpad(padded, indices, check),
                          lambda: padded.index_select(0, indices), t * 8 + 2 * t * h * elem),
                "pad": (lambda check: torch.ops.bertfast_C.pad(packed, indices, n, check),
                        lambda: packed.new_zeros((n, h)).index_copy_(0, indices, packed),
                        t * 8 + t * h * elem + n * h * elem),
            }
            for name, (ours, theirs, nbytes) in cases.items():
                times, group = {}, []
                for impl, fn, graph in (("bertfast_C", lambda: ours(True), False),
                                        ("bertfast_C unchecked", lambda: ours(False), True), ("torch", theirs, True),
                                        ("torch as called", theirs, False)):
                    row = dict(name=name, shape=f"{t}x{h}", dtype=str(dtype).replace("torch.", ""), impl=impl)
                    try:
                        t_ = timeit(fn, device, warmup_ms=25 if quick else 50, rep_ms=100 if quick else 300,
                                    graph=graph)
                    except Exception as exc:  # noqa: BLE001 - an error row; the other cases still run
                        group.append(dict(row, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                        continue
                    times[impl] = t_
                    gbps = nbytes / (t_["ms"] * 1e-3) / 1e9
                    timing = t_.get("timing", "as called (check=True reads the error flag back: a sync)"
                                    if not graph else "as called")
                    group.append(dict(row, ms=round(t_["ms"], 4), ms_q20=round(t_["p20"], 4),
                                     ms_q80=round(t_["p80"], 4), gbps=round(gbps, 1),
                                     frac_copy_bw=round(gbps / copy_bw, 3), timing=timing,
                                     **({"host_ms": round(t_["host_ms"], 4)} if "host_ms" in t_ else {})))
                for r in group:     # each of ours against torch timed the same way (None if that failed)
                    if r["impl"].startswith("bertfast_C") and r["impl"] in times:
                        sp = speedup(times.get("torch") if r["impl"] == "bertfast_C unchecked"
                                     else times.get("torch as called"), times[r["impl"]])
                        r["speedup"] = None if sp is None else round(sp, 3)
                rows += group
                for r in group:
                    if on_row:
                        on_row(r)
    return rows


def main(argv=None) -> int:
    args = bench_args(__doc__, argv)
    rows = run(args.device, args.quick)
    print(f"{'op':<8} {'shape':<11} {'dtype':<9} {'impl':<21} {'ms':>8} {'GB/s':>8} {'of copy':>8} {'speed-up':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<8} {r['shape']:<11} {r['dtype']:<9} {r['impl']:<21} error: {r['error']}")
            continue
        print(f"{r['name']:<8} {r['shape']:<11} {r['dtype']:<9} {r['impl']:<21} {r['ms']:>8.3f} {r['gbps']:>8.0f} "
              f"{r['frac_copy_bw']:>8.0%} {r.get('speedup') or float('nan'):>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
