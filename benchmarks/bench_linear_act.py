"""The FFN up-projection with its epilogue: bertfast._C's cuBLASLt linear_act against what the encoder runs now.

Issue 5 leaves the default to this benchmark: the encoder computes `bias_act(F.linear(x, W), b, act)` (cuBLAS GEMM,
then the Triton bias + activation kernel); bertfast_C::linear_act folds the bias (and ReLU, or the tanh GELU that
cuBLASLt offers) into the GEMM's epilogue. For each BERT FFN shape (T tokens x hidden -> intermediate) and dtype:

  encoder      bias_act(F.linear(x, W), b, act)                          (today's path)
  torch        act(F.linear(x, W, b))                                    (transformers' path)
  lt+act       bias_act(linear_act(x, W, b, "bias"), None, act)          (bias in the epilogue, activation in Triton)
  lt-fused     linear_act(x, W, b, "bias_gelu_tanh")                     (gelu_tanh only: all in the epilogue)
  gemm         F.linear(x, W) and linear_act(x, W, None, "none")         (the GEMM alone, the ceiling of the above)

for exact GELU (BERT) and tanh GELU (gelu_new models). TFLOP/s count the GEMM's 2 T K O. Timing:
triton.testing.do_bench medians with 20/80 quantiles on CUDA; on CPU only a smoke run of the rows that exist
there (linear_act is CUDA-only).

    python -m benchmarks.bench_linear_act [--quick]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import bench_args, timeit

SHAPES = [(16384, 768, 3072), (4096, 768, 3072), (16384, 1024, 4096)]   # (T, K = hidden, O = intermediate)


def cases(t, k, o, dtype, device, activation):
    """{impl: callable} for one shape; linear_act rows only where bertfast._C has a kernel for the device."""
    import bertfast._C  # noqa: F401 - registers torch.ops.bertfast_C
    from bertfast import ops
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(t, k, generator=gen).to(device, dtype)
    w = (torch.randn(o, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = torch.randn(o, generator=gen).to(device, dtype)
    torch_act = (lambda z: F.gelu(z)) if activation == "gelu" else (lambda z: F.gelu(z, approximate="tanh"))
    out = {"encoder": lambda: ops.bias_act(F.linear(x, w), b, activation),
           "torch": lambda: torch_act(F.linear(x, w, b)),
           "gemm F.linear": lambda: F.linear(x, w)}
    lt = torch.ops.bertfast_C.linear_act
    if torch._C._dispatch_has_kernel_for_dispatch_key("bertfast_C::linear_act", "CUDA") and device.type == "cuda":
        out["lt+act"] = lambda: ops.bias_act(lt(x, w, b, "bias"), None, activation)
        if activation == "gelu_tanh":
            out["lt-fused"] = lambda: lt(x, w, b, "bias_gelu_tanh")
        out["gemm linear_act"] = lambda: lt(x, w, None, "none")
    return out


def run(device="cuda", quick=False, on_row=None) -> list[dict]:
    """The rows; on_row(row) is called for each once its group is measured (the suite saves after each)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_linear_act: no CUDA device")
    shapes = SHAPES[:1] if quick else SHAPES
    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16]
    if device.type == "cpu":                    # a smoke run: one small shape, fp32
        shapes, dtypes = [(64, 32, 128)], [torch.float32]
    rows = []
    with torch.inference_mode():
        for dtype in dtypes:
            for t, k, o in shapes:
                for activation in ("gelu", "gelu_tanh"):
                    group = []
                    for impl, fn in cases(t, k, o, dtype, device, activation).items():
                        row = dict(name=f"ffn up + {activation}", shape=f"{t}x{k}->{o}",
                                   dtype=str(dtype).replace("torch.", ""), impl=impl)
                        try:
                            r = timeit(fn, device, warmup_ms=25 if quick else 50, rep_ms=100 if quick else 300)
                        except Exception as exc:  # noqa: BLE001 - one implementation failing is a row, not the end
                            group.append({**row, "error": f"{type(exc).__name__}: {exc}"})
                            continue
                        group.append({**row, "ms": round(r["ms"], 4), "ms_q20": round(r["p20"], 4),
                                      "ms_q80": round(r["p80"], 4),
                                      "tflops": round(2 * t * k * o / (r["ms"] * 1e-3) / 1e12, 1)})
                    encoder = next((g["ms"] for g in group if g["impl"] == "encoder" and "ms" in g), None)
                    for g in group:
                        if encoder and "ms" in g:
                            g["speedup"] = round(encoder / g["ms"], 3)      # against today's encoder path
                    rows += group
                    for g in group:
                        if on_row:
                            on_row(g)
    return rows


def main(argv=None) -> int:
    args = bench_args(__doc__, argv)
    rows = run(args.device, args.quick)
    print(f"{'case':<20} {'shape':<16} {'dtype':<9} {'impl':<16} {'ms':>8} {'TFLOP/s':>8} {'vs encoder':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<20} {r['shape']:<16} {r['dtype']:<9} {r['impl']:<16} error: {r['error']}")
            continue
        print(f"{r['name']:<20} {r['shape']:<16} {r['dtype']:<9} {r['impl']:<16} {r['ms']:>8.3f} {r['tflops']:>8.1f} "
              f"{r.get('speedup', ''):>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
