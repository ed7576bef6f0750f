"""The whole encoder on a CUDA device (runs where CUDA is present; elsewhere reported as skipped, because the
CPU machines have no GPU - the kernels themselves are covered there by the interpreter tests).

Error rule (flash-attention's): against transformers run in float64 on the same device, bertfast's error in a
dtype is at most 3x transformers' own error in that dtype (plus a tiny floor for exact cases)."""
import copy

import pytest
import torch

import bertfast
from helpers import bert_config, random_batch, real

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _hf(config, dtype, impl="sdpa"):
    from transformers import BertModel as HFBertModel
    return HFBertModel._from_config(copy.deepcopy(config), attn_implementation=impl).to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden,heads", [(384, 12), (768, 12), (160, 2), (96, 3)])
def test_encoder_parity_cuda(dtype, hidden, heads):
    torch.manual_seed(hidden + heads)
    cfg = bert_config(hidden=hidden, heads=heads, layers=2, vocab=500, max_pos=300)
    ref = _hf(cfg, torch.float64, "eager")
    hf = _hf(cfg, dtype)
    hf.load_state_dict(ref.state_dict())
    ours = bertfast.BertModel.from_hf(hf).eval()
    ids, mask, types = random_batch(6, 257, cfg.vocab_size, cfg.type_vocab_size)
    _check_flash_rule(ref, hf, ours, ids.cuda(), mask.cuda(), types.cuda())


def _check_flash_rule(ref, hf, ours, ids, mask, types):
    """bertfast's error against the float64 model within 3x transformers' own in its dtype, on real tokens and
    on the pooled output of sequences with a real token; padding rows of bertfast's output exactly zero."""
    with torch.inference_mode():
        r = ref(ids, attention_mask=mask, token_type_ids=types)
        a = hf(ids, attention_mask=mask, token_type_ids=types)
        b = ours(ids, attention_mask=mask, token_type_ids=types)
    q = real(mask)
    err_hf = (a.last_hidden_state[q].double() - r.last_hidden_state[q]).abs().max().item()
    err_ours = (b.last_hidden_state[q].double() - r.last_hidden_state[q]).abs().max().item()
    assert torch.isfinite(b.last_hidden_state).all()
    assert err_ours <= 3 * err_hf + 1e-6, f"bertfast error {err_ours:.3e} vs transformers' own {err_hf:.3e}"
    assert not b.last_hidden_state[~q].any()
    nonempty = q.any(dim=1)
    perr_hf = (a.pooler_output[nonempty].double() - r.pooler_output[nonempty]).abs().max().item()
    perr = (b.pooler_output[nonempty].double() - r.pooler_output[nonempty]).abs().max().item()
    assert perr <= 3 * perr_hf + 1e-6


def test_training_step_cuda():
    torch.manual_seed(0)
    cfg = bert_config(hidden=128, heads=2, layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref = _hf(cfg, torch.float64, "eager").train()
    ours = bertfast.BertModel.from_hf(ref).float().train()
    ids, mask, _ = random_batch(4, 70, cfg.vocab_size)
    ids, mask = ids.cuda(), mask.cuda()
    # a loss that depends on the output's direction (the mean square of a LayerNorm output with unit weight and
    # zero bias is constant, and its gradients rounding noise)
    target = torch.randn(int(real(mask).sum()), cfg.hidden_size, dtype=torch.float64, device="cuda")
    for m in (ref, ours):
        out = m(ids, attention_mask=mask).last_hidden_state
        (out[real(mask)].double() * target).sum().backward()
    g_ref = dict(ref.named_parameters())["encoder.layer.0.intermediate.dense.weight"].grad
    g = dict(ours.named_parameters())["encoder.layer.0.intermediate.dense.weight"].grad
    assert (g.double() - g_ref).abs().max() <= 1e-3 * g_ref.abs().max()


def test_cuda_graph_capture():
    cfg = bert_config(hidden=128, heads=2, layers=2)
    ours = bertfast.BertModel(cfg).cuda().half().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        expected = ours(ids).last_hidden_state.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ours(ids)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = ours(ids).last_hidden_state
        g.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, expected)


def test_implementations_on_cuda():
    """auto picks the fused kernels on CUDA (bertfast info shows the same table)."""
    table = bertfast.ops.implementation_table("cuda")
    assert table["varlen_attention"].startswith("triton")
    assert table["add_layer_norm"].startswith("triton")
    assert table["bias_act"].startswith("triton")
    # the forward is bertfast._C's; the backward is torch's (no CUDA embed backward), and the table says so
    assert table["embed"].startswith("cpp") and "backward: torch autograd" in table["embed"]


def test_enable_cuda_graphs_matches_eager():
    torch.manual_seed(1)
    cfg = bert_config(hidden=128, heads=2, layers=2, vocab=300, max_pos=200)
    ours = bertfast.BertModel(cfg).cuda().half().eval()
    graphed = copy.deepcopy(ours).enable_cuda_graphs()
    for batch, seqlen in ((1, 128), (4, 77), (1, 128)):           # the third call replays the first graph
        ids = torch.randint(0, cfg.vocab_size, (batch, seqlen), device="cuda")
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            a = ours(ids, attention_mask=mask)
            b = graphed(ids, attention_mask=mask)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
        assert torch.equal(a.pooler_output, b.pooler_output)
    assert len(graphed._graphs) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graphs_padded_batches(dtype):
    """Padded batches replay a graph captured for their packed length: real tokens within flash-attention's rule
    (3x transformers' own error in the dtype, against float64) like eager bertfast, padding rows exactly zero,
    batches of one packed length reusing one graph (whatever the previous replay left in its buffers)."""
    torch.manual_seed(2)
    cfg = bert_config(hidden=128, heads=2, layers=2, vocab=300, max_pos=200)
    ref = _hf(cfg, torch.float64, "eager")
    hf = _hf(cfg, dtype)
    hf.load_state_dict(ref.state_dict())
    graphed = bertfast.BertModel.from_hf(hf).eval().enable_cuda_graphs()
    batch, seqlen = 4, 90
    for lengths in ([90, 50, 1, 40], [70, 3, 90, 7], [10, 0, 35, 2], [90, 50, 1, 40]):  # 181, 170, 47, 181
        ids, mask, types = random_batch(batch, seqlen, cfg.vocab_size, cfg.type_vocab_size, lengths=lengths)
        _check_flash_rule(ref, hf, graphed, ids.cuda(), mask.cuda(), types.cuda())
    assert sorted(k[2] for k in graphed._graphs) == [48, 192]          # packed lengths (token_bucket)
    ids, mask, types = ids.cuda(), mask.cuda(), types.cuda()
    with torch.inference_mode():
        a = graphed(ids, attention_mask=mask, token_type_ids=types)
    with torch.no_grad():       # a graph captured under inference_mode serves no_grad calls (and the reverse)
        b = graphed(ids, attention_mask=mask, token_type_ids=types)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)
    assert len(graphed._graphs) == 2
    # a batch without a real token runs eagerly (nothing to pack: no graph of packed length 0), zeros as eager
    mask = torch.zeros_like(mask)
    with torch.inference_mode():
        a, b = graphed(ids, attention_mask=mask), bertfast.BertModel.from_hf(hf).eval()(ids, attention_mask=mask)
    assert not a.last_hidden_state.any() and torch.equal(a.pooler_output, b.pooler_output)
    assert len(graphed._graphs) == 2
