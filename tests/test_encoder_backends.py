"""The whole encoder with each backend forced on, against transformers in fp32.

BERTFAST_BACKEND=triton: the Triton kernels, in the Triton interpreter on CPU and on the GPU where one is
present (the interpreter's fp32 dot is exact; on a GPU the attention's fp32 dot is IEEE unless torch allows
TF32). BERTFAST_BACKEND=cpp: the C++ kernels of bertfast._C on this machine's device (attention has no C++
implementation and runs the reference, as `bertfast info` shows)."""
import copy

import pytest
import torch

import bertfast
from helpers import bert_config, hf_bert, random_batch, real

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU = "cpu"


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("BERTFAST_BACKEND", "triton")


@pytest.mark.gpu   # on DEVICE: the GPU where there is one (the C++ tests below run on the CPU everywhere)
@pytest.mark.parametrize("hidden,heads", [(64, 2), (160, 2)])
def test_encoder_forward_triton(triton_backend, hidden, heads):
    torch.manual_seed(hidden)
    cfg = bert_config(hidden=hidden, heads=heads, layers=2, intermediate=3 * hidden)
    hf = hf_bert(cfg).to(DEVICE)
    ours = bertfast.BertModel.from_hf(hf).eval()
    ids, mask, types = (t.to(DEVICE) for t in random_batch(3, 21, cfg.vocab_size, cfg.type_vocab_size))
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, token_type_ids=types)
        b = ours(ids, attention_mask=mask, token_type_ids=types)
    table = bertfast.ops.implementation_table(DEVICE)
    assert table["varlen_attention"].startswith("triton") and table["add_layer_norm"].startswith("triton")
    q = real(mask)
    assert (a.last_hidden_state[q] - b.last_hidden_state[q]).abs().max() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-5


@pytest.mark.gpu
def test_encoder_backward_triton(triton_backend):
    torch.manual_seed(5)
    cfg = bert_config(hidden=64, heads=2, layers=1, intermediate=128, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    hf = hf_bert(cfg).to(DEVICE).train()
    ours = bertfast.BertModel.from_hf(copy.deepcopy(hf)).train()
    ids, mask, _ = (t.to(DEVICE) for t in random_batch(3, 17, cfg.vocab_size))
    q = real(mask)
    target = torch.randn(3, 17, 64, device=DEVICE)
    for m in (hf, ours):
        ((m(ids, attention_mask=mask).last_hidden_state - target)[q] ** 2).mean().backward()
    mine = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        if ".self." in name:
            continue
        if p.grad is None:             # the pooler is not in this loss
            assert mine[name].grad is None, name
            continue
        assert (mine[name].grad - p.grad).abs().max() <= 1e-5 * max(1.0, p.grad.abs().max().item()), name
    wq = dict(hf.named_parameters())["encoder.layer.0.attention.self.query.weight"].grad
    assert (mine["encoder.layer.0.attention.self.qkv_weight"].grad[:64] - wq).abs().max() <= 1e-5


@pytest.mark.parametrize("hidden,heads", [(96, 3), (384, 12)])
def test_encoder_cpp_backend(monkeypatch, hidden, heads):
    """The whole encoder on bertfast._C's CPU kernels (add_layer_norm and bias_act have no CUDA kernel: CPU on
    every machine) against transformers, inference and gradients."""
    monkeypatch.setenv("BERTFAST_BACKEND", "cpp")
    torch.manual_seed(hidden + 1)
    cfg = bert_config(hidden=hidden, heads=heads, layers=2, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    hf = hf_bert(cfg).to(CPU)
    ours = bertfast.BertModel.from_hf(hf).eval()
    table = bertfast.ops.implementation_table(CPU)
    for op in ("add_layer_norm", "bias_act", "embed", "unpad", "pad"):
        assert table[op].startswith("cpp"), (op, table[op])
    ids, mask, types = (t.to(CPU) for t in random_batch(4, 33, cfg.vocab_size, cfg.type_vocab_size))
    q = real(mask)
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, token_type_ids=types)
        b = ours(ids, attention_mask=mask, token_type_ids=types)
    assert (a.last_hidden_state[q] - b.last_hidden_state[q]).abs().max() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-5
    with torch.inference_mode():            # serving runs under inference mode (sentence-transformers does)
        c = ours(ids, attention_mask=mask, token_type_ids=types)
    assert torch.equal(b.last_hidden_state, c.last_hidden_state)
    # training through the C++ backward kernels
    hf.train()
    ours.train()
    # a loss that depends on the output's direction (the mean square of a LayerNorm output with unit weight and
    # zero bias is constant, and its gradients rounding noise)
    target = torch.randn(int(q.sum()), hidden)
    for m in (hf, ours):
        (m(ids, attention_mask=mask, token_type_ids=types).last_hidden_state[q] * target).sum().backward()
    mine = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        if ".self." in name or p.grad is None:
            continue
        assert (mine[name].grad - p.grad).abs().max() <= 1e-5 * max(1.0, p.grad.abs().max().item()), name


def test_encoder_calls_the_index_ops_unchecked(monkeypatch):
    """The model checks every id, position and token type once per batch (one host read) and builds the indices
    from the mask, so its calls of bertfast_C's embed / unpad / pad pass check=False (on a GPU: no error flag read
    back, a stream sync each) - forward, output_attentions, inputs_embeds and backward alike; the public ops
    called directly keep checking."""
    import bertfast._C  # noqa: F401 - registers torch.ops.bertfast_C (the spies read it before any op loads it)
    monkeypatch.setenv("BERTFAST_BACKEND", "cpp")
    calls = []
    for name in ("embed", "unpad", "pad"):
        def spy(*args, _real=getattr(torch.ops.bertfast_C, name), _name=name):
            calls.append((_name, args[-1] if isinstance(args[-1], bool) else "default"))
            return _real(*args)
        monkeypatch.setattr(torch.ops.bertfast_C, name, spy)
    torch.manual_seed(3)
    cfg = bert_config(hidden=64, heads=2, layers=1)
    ours = bertfast.BertModel.from_hf(hf_bert(cfg)).train()
    ids, mask, types = random_batch(3, 17, cfg.vocab_size, cfg.type_vocab_size)
    ours(ids, attention_mask=mask, token_type_ids=types).last_hidden_state.sum().backward()
    ours(ids, attention_mask=mask, output_attentions=True).last_hidden_state.sum().backward()
    ours(inputs_embeds=torch.randn(3, 17, 64, requires_grad=True), attention_mask=mask).last_hidden_state.sum() \
        .backward()
    assert {name for name, _ in calls} == {"embed", "unpad", "pad"}, calls
    assert all(check is False for _, check in calls), calls
    calls.clear()
    x, idx = torch.randn(6, 4), torch.tensor([4, 0, 2])
    bertfast.ops.pad(bertfast.ops.unpad(x, idx), idx, 2, 3)
    w = ours.embeddings
    bertfast.ops.embed(ids[0], torch.arange(3), torch.arange(17), None, w.word_embeddings.weight,
                       w.position_embeddings.weight, None, w.LayerNorm.weight, w.LayerNorm.bias, 1e-12)
    assert calls == [("unpad", True), ("pad", True), ("embed", True)], calls
