"""The suite's cases through pytest-benchmark: `pytest benchmarks/ --benchmark-json=out.json`.

Runs the whole-encoder workloads of bench_model on this machine's device (CUDA when present, else CPU) for
bertfast and transformers SDPA, so pytest-benchmark's own statistics and comparisons are available too.
These are measurements, not tests: nothing here asserts a speed.
"""
import pytest
import torch

from benchmarks import bench_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
MODEL = "bert-base" if DEVICE.type == "cuda" else "minilm-l6"


@pytest.fixture(scope="module")
def models():
    return bench_model._models(MODEL, DTYPE, DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("workload", list(bench_model.workloads(DEVICE, quick=True)))
@pytest.mark.parametrize("impl", ["bertfast", "transformers-sdpa"])
def test_encoder(benchmark, models, workload, impl):
    cfg, sdpa, _, ours = models
    b, s, lengths = bench_model.workloads(DEVICE, quick=True)[workload]
    ids, mask, lengths = bench_model._batch(b, s, lengths, cfg.vocab_size, DEVICE)
    model = ours if impl == "bertfast" else sdpa
    benchmark.extra_info.update(model=MODEL, dtype=str(DTYPE), device=str(DEVICE), real_tokens=int(lengths.sum()))

    def run():
        with torch.inference_mode():
            model(ids, attention_mask=mask)
        _sync()
    benchmark.pedantic(run, warmup_rounds=2, rounds=5 if DEVICE.type == "cpu" else 50)
