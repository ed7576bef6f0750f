"""The FFN up-projection with its epilogue: bertfast._C's cuBLASLt linear_act against the unfused path.

Issue 5 leaves the default to this benchmark: without the fused epilogue the encoder computes
`bias_act(F.linear(x, W), b, act)` (cuBLAS GEMM, then the Triton bias + activation kernel); bertfast_C::linear_act
folds the bias (and ReLU, or the tanh GELU that cuBLASLt offers) into the GEMM's epilogue. For each BERT FFN shape
(T tokens x hidden -> intermediate) and dtype:

  unfused      bias_act(F.linear(x, W), b, act)                          (the encoder's path without the epilogue)
  torch        act(F.linear(x, W, b))                                    (transformers' path)
  lt+act       bias_act(linear_act(x, W, b, "bias"), None, act)          (bias in the epilogue, activation in Triton)
  lt-fused     linear_act(x, W, b, "bias_gelu_tanh" | "bias_relu")       (gelu_tanh, relu: all in the epilogue)
  gemm         F.linear(x, W) and linear_act(x, W, None, "none")         (the GEMM alone, the ceiling of the above)

for exact GELU (BERT), tanh GELU (gelu_new models) and ReLU. `python -m benchmarks.decide` turns the lt-fused /
unfused ratios into the encoder's default per GPU (bertfast/measured.py). Then the whole encoder, a bert-base-sized
gelu_new model at inference, with BERTFAST_LINEAR_EPILOGUE=off and =on (rows "encoder gelu_new ..."): what the
fused epilogue is worth in a forward. TFLOP/s count the GEMM's 2 T K O. Timing: triton.testing.do_bench medians
with 20/80 quantiles on CUDA; on CPU only a smoke run of the rows that exist there (linear_act is CUDA-only).

    python -m benchmarks.bench_linear_act [--quick]
"""
from __future__ import annotations

import os
from unittest import mock

import torch
import torch.nn.functional as F

from benchmarks.common import bench_args, timeit

SHAPES = [(16384, 768, 3072), (4096, 768, 3072), (16384, 1024, 4096)]   # (T, K = hidden, O = intermediate)
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
ENCODER_BATCHES = ((1, 128), (32, 128))


def cases(t, k, o, dtype, device, activation):
    """{impl: callable} for one shape; linear_act rows only where bertfast._C has a kernel for the device."""
    import bertfast._C  # noqa: F401 - registers torch.ops.bertfast_C
    from bertfast import ops
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(t, k, generator=gen).to(device, dtype)
    w = (torch.randn(o, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = torch.randn(o, generator=gen).to(device, dtype)
    torch_act = {"gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu}[activation]
    out = {"unfused": lambda: ops.bias_act(F.linear(x, w), b, activation),
           "torch": lambda: torch_act(F.linear(x, w, b)),
           "gemm F.linear": lambda: F.linear(x, w)}
    lt = torch.ops.bertfast_C.linear_act
    if torch._C._dispatch_has_kernel_for_dispatch_key("bertfast_C::linear_act", "CUDA") and device.type == "cuda":
        out["lt+act"] = lambda: ops.bias_act(lt(x, w, b, "bias"), None, activation)
        if activation in ops.LINEAR_EPILOGUES:
            out["lt-fused"] = lambda: lt(x, w, b, ops.LINEAR_EPILOGUES[activation])
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
    dtypes = [torch.float16, torch.bfloat16]
    if device.type == "cpu":                    # a smoke run: one small shape, fp32
        shapes, dtypes = [(64, 32, 128)], [torch.float32]
    rows = []
    with torch.inference_mode():
        for dtype in dtypes:
            for t, k, o in shapes:
                for activation in ACTIVATIONS:
                    group = []
                    for impl, fn in cases(t, k, o, dtype, device, activation).items():
                        row = dict(name=f"ffn up + {activation}", shape=f"{t}x{k}->{o}",
                                   dtype=str(dtype).replace("torch.", ""), impl=impl)
                        try:
                            r = timeit(fn, device, warmup_ms=25 if quick else 50, rep_ms=100 if quick else 300,
                                       graph=True)
                        except Exception as exc:  # noqa: BLE001 - one implementation failing is a row, not the end
                            group.append({**row, "error": f"{type(exc).__name__}: {exc}"})
                            continue
                        group.append({**row, "ms": round(r["ms"], 4), "ms_q20": round(r["p20"], 4),
                                      "ms_q80": round(r["p80"], 4),
                                      "tflops": round(2 * t * k * o / (r["ms"] * 1e-3) / 1e12, 1),
                                      **({"host_ms": round(r["host_ms"], 4), "timing": r["timing"]}
                                         if "timing" in r else {})})
                    rows += _finish(group, on_row)
        if device.type == "cuda":
            rows += encoder_rows(device, quick, on_row)
    return rows


def _finish(group: list[dict], on_row) -> list[dict]:
    """Each row's speedup over the group's unfused row; on_row(row) for each."""
    from benchmarks.common import speedup
    base = next((g for g in group if g["impl"] in ("unfused", "epilogue off") and "ms" in g), None)
    for g in group:
        if "ms" in g and base is not None:
            sp = speedup(base, g)        # None when the two were timed differently (a failed capture)
            g["speedup"] = None if sp is None else round(sp, 3)
        if on_row:
            on_row(g)
    return group


def encoder_rows(device, quick: bool, on_row=None, dtype=torch.float16, model="bert-base", dims=None,
                 batches=ENCODER_BATCHES) -> list[dict]:
    """A gelu_new encoder's eager forward (random weights; bert-base-sized unless `dims` says otherwise) with the
    fused epilogue off and on, for each (batch, seqlen) of `batches` (full sequences)."""
    from benchmarks.bench_model import MODELS, _batch, build_models
    dims = dict(dims or MODELS[model], hidden_act="gelu_new")
    row = dict(name="encoder gelu_new", dtype=str(dtype).replace("torch.", ""))
    try:
        ours = build_models(dims, dtype, device, eager=False)[3]
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built is an error row
        return _finish([{**row, "shape": model, "impl": "epilogue off",
                         "error": f"{type(exc).__name__}: {exc}"}], on_row)
    rows = []
    for batch, seqlen in batches:
        ids, mask, _ = _batch(batch, seqlen, None, 30522, device)
        rows += _finish(_encoder_group(ours, ids, mask, {**row, "shape": f"{batch}x{seqlen} {model}"}, quick,
                                       device), on_row)
    return rows


def _encoder_group(ours, ids, mask, row: dict, quick: bool, device) -> list[dict]:
    group = []
    for impl, value in (("epilogue off", "off"), ("epilogue on", "on")):
        try:
            # set once for the timing, not inside the timed forward; restored after
            with mock.patch.dict(os.environ, {"BERTFAST_LINEAR_EPILOGUE": value}):
                r = timeit(lambda: ours(input_ids=ids, attention_mask=mask), device,
                           warmup_ms=25 if quick else 50, rep_ms=100 if quick else 300)
        except Exception as exc:  # noqa: BLE001
            group.append({**row, "impl": impl, "error": f"{type(exc).__name__}: {exc}"})
            continue
        group.append({**row, "impl": impl, "ms": round(r["ms"], 4), "ms_q20": round(r["p20"], 4),
                      "ms_q80": round(r["p80"], 4)})
    return group


def main(argv=None) -> int:
    args = bench_args(__doc__, argv)
    rows = run(args.device, args.quick)
    print(f"{'case':<20} {'shape':<20} {'dtype':<9} {'impl':<16} {'ms':>8} {'TFLOP/s':>8} {'vs unfused':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<20} {r['shape']:<20} {r['dtype']:<9} {r['impl']:<16} error: {r['error']}")
            continue
        tf = f"{r['tflops']:.1f}" if "tflops" in r else "-"
        print(f"{r['name']:<20} {r['shape']:<20} {r['dtype']:<9} {r['impl']:<16} {r['ms']:>8.3f} {tf:>8} "
              f"{r.get('speedup') or '-':>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
