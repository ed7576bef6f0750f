"""Benchmark of bertfast's fused variable-length attention against torch SDPA and flash-attn.

Forward and forward+backward, batch 32, 12 heads, head dim 64; fixed lengths 128 and 512 and variable lengths
16..512 (seeded); fp16 and bf16. Compared with torch.nn.functional.scaled_dot_product_attention under each
backend (flash, efficient, math; flash cannot take a mask) on the padded [B, heads, S, head_dim] layout, with
and without the padding mask, and with flash_attn.flash_attn_varlen_qkvpacked_func when it is installed.

FLOPs are counted on real tokens only: 4 * sum(len^2) * heads * head_dim for the forward, 2.5x that for the
backward, so every implementation is credited with the same useful work whatever it computes on padding.
Ratios (time of the baseline / ours; None when the two were timed differently, benchmarks.common.speedup):
ratio_vs_sdpa_flash against SDPA's flash backend on the padded batch with no mask - at varlen it attends to the
padding keys too (a different result, ~3x the useful work at the seeded lengths' 51% padding), so it says how
bertfast compares with the fastest kernel run on the padded layout, not what a user with padded batches gets;
ratio_vs_sdpa_masked against the faster of SDPA's backends that take the padding mask (efficient, math): the
design target's "SDPA with a 50% padding mask".
Timing: triton.testing.do_bench, median of the quantiles (0.5, 0.2, 0.8), of the callable replayed from a CUDA
graph (benchmarks.common.cuda_kernel_time: the kernels' time; a forward + backward's launches took longer on the
host than on the GPU at 32x128). Each row also has host_ms (the host's time a call issued back to back) and timing.

    python benchmarks/bench_attention.py [--quick]
`run(device="cuda", quick=False)` returns the rows (dicts with name, shape, dtype, impl, ms, tflops,
ratio_vs_sdpa_flash, ratio_vs_sdpa_masked, plus ms_p20 / ms_p80, device and versions) for the benchmark suite.
"""
from __future__ import annotations

import argparse
import sys

import torch

BATCH, HEADS, HEAD_DIM = 32, 12, 64


def _lengths(shape: str, batch: int) -> list[int]:
    if shape.startswith("varlen"):
        gen = torch.Generator().manual_seed(1234)
        return torch.randint(16, 513, (batch,), generator=gen).tolist()
    return [int(shape.split("x")[1])] * batch


def _impls(lengths, dtype, device, backward):
    """{impl name: zero-argument callable} for one shape; each callable runs forward (and backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    from bertfast.kernels.attention import attention_backward, attention_forward

    batch, seq = len(lengths), max(lengths)
    total = sum(lengths)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    qkv = torch.randn(total, 3, HEADS, HEAD_DIM, device=device, dtype=dtype)
    dout = torch.randn(total, HEADS, HEAD_DIM, device=device, dtype=dtype)
    impls = {}

    def bertfast_fn():
        out, lse = attention_forward(qkv, cu_seqlens, seq, validate=False)
        if backward:
            attention_backward(dout, qkv, out, lse, cu_seqlens, seq)
    impls["bertfast"] = bertfast_fn

    # padded layout for SDPA: [B, heads, S, head_dim]
    q, k, v = (torch.randn(batch, HEADS, seq, HEAD_DIM, device=device, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    pdout = torch.randn(batch, HEADS, seq, HEAD_DIM, device=device, dtype=dtype)
    keep = torch.arange(seq, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]   # [B, S]
    # key padding mask (True = attend); padded query rows attend to the real keys so no row is all -inf
    mask = keep[:, None, None, :].expand(batch, 1, seq, seq)

    # gradients through torch.autograd.grad: .backward() would accumulate into q.grad / k.grad / v.grad from the
    # second call on (three extra read-modify-writes of the inputs' size that bertfast's backward does not pay)
    def sdpa(backend, attn_mask):
        def fn():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
                if backward:
                    torch.autograd.grad(out, (q, k, v), pdout)
        return fn

    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
        impls[f"sdpa-{name}"] = sdpa(backend, None)
        if backend != SDPBackend.FLASH_ATTENTION:
            impls[f"sdpa-{name}+mask"] = sdpa(backend, mask)

    try:
        from flash_attn import flash_attn_varlen_qkvpacked_func
    except ImportError:
        flash_attn_varlen_qkvpacked_func = None
    if flash_attn_varlen_qkvpacked_func is not None:
        fqkv = qkv.detach().clone().requires_grad_(backward)

        def flash_fn():
            out = flash_attn_varlen_qkvpacked_func(fqkv, cu_seqlens, seq, 0.0)
            if backward:
                torch.autograd.grad(out, fqkv, dout)
        impls["flash_attn-varlen"] = flash_fn
    return impls


def run(device="cuda", quick=False, on_row=None) -> list[dict]:
    """The rows; on_row(row) is called for each once its shape / dtype / mode group is measured (the suite saves
    after each, so a run cut at its time limit keeps them)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_attention needs a CUDA device")
    import triton

    from benchmarks.common import cuda_kernel_time

    device = torch.device(device)
    if device.index is None:          # "cuda" means the current device; set_device needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    shapes = ["32x128", "varlen 16..512"] if quick else ["32x128", "32x512", "varlen 16..512"]
    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16]
    meta = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__, triton=triton.__version__)
    rows = []
    for shape in shapes:
        lengths = _lengths(shape, BATCH)
        fwd_flops = 4.0 * sum(n * n for n in lengths) * HEADS * HEAD_DIM
        for dtype in dtypes:
            for backward in (False, True):
                name = "attention fwd+bwd" if backward else "attention fwd"
                flops = fwd_flops * (3.5 if backward else 1.0)
                group = []
                for impl, fn in _impls(lengths, dtype, device, backward).items():
                    row = dict(name=name, shape=f"{shape} h{HEADS} d{HEAD_DIM}", dtype=str(dtype).replace("torch.", ""),
                               impl=impl, ms=None, ms_p20=None, ms_p80=None, tflops=None, ratio_vs_sdpa_flash=None,
                               ratio_vs_sdpa_masked=None, **meta)
                    try:
                        fn()
                        torch.cuda.synchronize()
                        t = cuda_kernel_time(fn)
                        row.update(ms=t["ms"], ms_p20=t["p20"], ms_p80=t["p80"], host_ms=t["host_ms"],
                                   timing=t["timing"])
                        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    except Exception as err:  # noqa: BLE001 - a backend that cannot run this input; the rest go on
                        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                    group.append(row)
                    torch.cuda.empty_cache()
                add_ratios(group)
                rows.extend(group)
                for r in group:
                    if on_row:
                        on_row(r)
    return rows


def add_ratios(group: list[dict]) -> None:
    """ratio_vs_sdpa_flash and ratio_vs_sdpa_masked (module docstring) on each row of one shape / dtype / mode."""
    from benchmarks.common import speedup
    flash = next((r for r in group if r["impl"] == "sdpa-flash" and r["ms"]), None)
    # the fastest masked baseline, whichever way it was timed (an as-called time bounds its kernels' from above, so
    # a slower graph-timed backend is no stand-in for it): no ratio when it was timed differently from r
    fastest_masked = min((r for r in group if r["impl"].endswith("+mask") and r["ms"]), key=lambda r: r["ms"],
                         default=None)
    for r in group:
        if not r["ms"]:
            continue
        r["ratio_vs_sdpa_flash"] = speedup(flash, r)
        r["ratio_vs_sdpa_masked"] = speedup(fastest_masked, r)


def _print(rows):
    print(f"{'name':18s} {'shape':26s} {'dtype':9s} {'impl':22s} {'ms':>9s} {'TFLOP/s':>8s} {'vs flash':>8s} "
          f"{'vs masked':>9s}")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
        ratio = f"{r['ratio_vs_sdpa_flash']:.2f}x" if r["ratio_vs_sdpa_flash"] else "-"
        masked = f"{r['ratio_vs_sdpa_masked']:.2f}x" if r["ratio_vs_sdpa_masked"] else "-"
        extra = f"  ({r['error']})" if r.get("error") else ""
        print(f"{r['name']:18s} {r['shape']:26s} {r['dtype']:9s} {r['impl']:22s} {ms:>9s} {tf:>8s} {ratio:>8s} "
              f"{masked:>9s}{extra}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and dtypes")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device here; this benchmark runs on a GPU machine only.", file=sys.stderr)
        return 1
    rows = run(args.device, quick=args.quick)
    print(f"# {rows[0]['device']}  torch {rows[0]['torch']}  triton {rows[0]['triton']}" if rows else "# no rows")
    _print(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
