"""benchmarks/host_profile.py's per-op rows call what their labels say (the GPU suite's host-profile step runs them
on CUDA, where every op is a Triton kernel: here the same path runs in the interpreter)."""
import pytest
import torch

from benchmarks import host_profile
from bertfast import ops


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_op_rows_run_the_labelled_implementation(backend, monkeypatch):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("on a GPU the suite's host-profile step runs this for real")
    monkeypatch.setenv("BERTFAST_BACKEND", backend)
    from transformers import BertConfig
    cfg = BertConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128)
    seen = []
    real_run = {name: getattr(ops, name) for name in ("_add_layer_norm_op", "_bias_act_op", "_varlen_attention_op")}
    for name, op in real_run.items():
        fn = op._init_fn

        def spy(*args, _fn=fn, _name=name):
            seen.append((_name, args[-1]))
            return _fn(*args)
        monkeypatch.setattr(op, "_init_fn", spy)
    cases = host_profile._op_cases(cfg, torch.float32, torch.device("cpu"), 16)
    for op_name, variants in cases.items():
        for variant, fn in variants.items():
            fn()
            if variant.startswith("impl ("):
                assert seen[-1][1] == variant[len("impl ("):-1], (op_name, variant, seen[-1])
    if backend == "triton":
        assert all("launcher" in cases[op] for op in ("add_layer_norm", "bias_act", "varlen_attention"))
    assert {impl for _, impl in seen} <= {backend, "reference"}


def test_the_profile_runs_and_times_the_launch_cache_both_ways(monkeypatch, tmp_path):
    """The GPU suite's host-profile step, as a smoke run on the CPU (tiny model): every section is written, and
    with the launch cache on (it is off in this interpreted process; the CPU ops launch no Triton kernel, so only
    the rows' plumbing runs) the forward and the fine-tuning step are timed with it switched off too, and the
    switch is put back."""
    import json

    from bertfast.kernels import launch
    monkeypatch.setattr(launch, "ENABLED", True)
    host_profile.run(device="cpu", tiny=True, calls=2, out_dir=tmp_path)
    result = json.loads((tmp_path / "host_profile.json").read_text())
    assert "bertfast, mask given, launch cache off" in result["forward"]
    assert set(result["train_step"]) == {"bertfast", "transformers sdpa", "bertfast, launch cache off"}
    text = (tmp_path / "host_profile.txt").read_text()
    assert all(f"\n{n}. " in text for n in range(1, 6)), text
    assert launch.ENABLED is True
