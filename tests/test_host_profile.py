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
