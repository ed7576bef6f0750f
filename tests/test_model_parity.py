"""bertfast.BertModel against transformers (the reference), fp32 on CPU: configs saved with save_pretrained and
loaded with from_pretrained, padded batches with random lengths (1 and full length always included), token
types, explicit position ids. Real-token positions must agree within 1e-5 absolute."""
import pytest
import torch

import bertfast
from helpers import bert_config, hf_bert, hf_copy, random_batch, real

TOL = 1e-5
CONFIGS = {
    "minilm-like-384x12": dict(hidden=384, heads=12, layers=2),
    "odd-96x3": dict(hidden=96, heads=3, layers=2, intermediate=200),
    "head-dim-80": dict(hidden=160, heads=2, layers=1, intermediate=320),
    "odd-90x5-relu": dict(hidden=90, heads=5, layers=2, hidden_act="relu"),
    "gelu-new": dict(hidden=64, heads=2, layers=2, hidden_act="gelu_new"),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved_model(request, tmp_path_factory):
    torch.manual_seed(hash(request.param) % 2**31)
    config = bert_config(**CONFIGS[request.param])
    hf = hf_bert(config, "eager")
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, bertfast.BertModel.from_pretrained(path), path


def _compare(a, b, mask, what):
    r = real(mask)
    err = (a[r] - b[r]).abs().max().item()
    assert err <= TOL, f"{what}: max abs difference {err:.3e} on real tokens > {TOL}"


def test_state_dict_keys_and_shapes(saved_model):
    hf, ours, _ = saved_model
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch,seqlen", [(1, 1), (5, 37), (4, 64)])
def test_parity_padded(saved_model, attn, batch, seqlen):
    hf, ours, _ = saved_model
    ref = hf if attn == "eager" else hf_copy(hf, "sdpa")
    cfg = hf.config
    ids, mask, types = random_batch(batch, seqlen, cfg.vocab_size, cfg.type_vocab_size)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        b = ours(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    _compare(a.last_hidden_state, b.last_hidden_state, mask, "last_hidden_state")
    assert (a.pooler_output - b.pooler_output).abs().max().item() <= TOL
    assert len(a.hidden_states) == len(b.hidden_states) == cfg.num_hidden_layers + 1
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        _compare(x, y, mask, f"hidden_states[{i}]")
    # documented: padded rows of last_hidden_state are zero
    assert torch.all(b.last_hidden_state[~real(mask)] == 0)


def test_parity_position_ids_and_no_mask(saved_model):
    hf, ours, _ = saved_model
    cfg = hf.config
    ids, mask, types = random_batch(3, 20, cfg.vocab_size, cfg.type_vocab_size)
    pos = torch.randint(0, cfg.max_position_embeddings, (3, 20))
    with torch.no_grad():
        _compare(hf(ids, attention_mask=mask, position_ids=pos).last_hidden_state,
                 ours(ids, attention_mask=mask, position_ids=pos).last_hidden_state, mask, "position_ids")
        full = torch.ones_like(mask)
        _compare(hf(ids, token_type_ids=types).last_hidden_state,
                 ours(ids, token_type_ids=types).last_hidden_state, full, "no attention_mask")
        # inputs_embeds instead of input_ids
        emb = torch.randn(3, 20, cfg.hidden_size)
        _compare(hf(inputs_embeds=emb, attention_mask=mask).last_hidden_state,
                 ours(inputs_embeds=emb, attention_mask=mask).last_hidden_state, mask, "inputs_embeds")


def test_one_row_of_token_types_or_positions_for_the_batch(saved_model):
    """token_type_ids / position_ids of shape [1, S] or [S] serve every sequence, as in transformers (bertfast
    refused such token_type_ids)."""
    hf, ours, _ = saved_model
    cfg = hf.config
    ids, mask, _ = random_batch(3, 12, cfg.vocab_size)
    types = torch.randint(0, cfg.type_vocab_size, (12,))
    pos = torch.randperm(12)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types.expand(3, 12),
                  position_ids=pos.expand(3, 12)).last_hidden_state
        for t, q in ((types, pos), (types[None], pos[None]), (types[None], None)):
            got = ours(ids, attention_mask=mask, token_type_ids=t,
                       position_ids=q if q is not None else pos.expand(3, 12)).last_hidden_state
            _compare(want, got, mask, f"token_type_ids {tuple(t.shape)}")
        with pytest.raises(ValueError, match=r"token_type_ids has shape \(2, 12\), expected \(3, 12\), \(1, 12\)"):
            ours(ids, token_type_ids=torch.zeros(2, 12, dtype=torch.long))


def test_left_padding_and_holes(saved_model):
    """Any mask pattern: a sequence is its real tokens in order (transformers masks the same keys)."""
    hf, ours, _ = saved_model
    cfg = hf.config
    ids, _, _ = random_batch(3, 16, cfg.vocab_size)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, :9] = 0            # left padding
    mask[1, 3:6] = 0           # a hole
    with torch.no_grad():
        _compare(hf(ids, attention_mask=mask).last_hidden_state, ours(ids, attention_mask=mask).last_hidden_state,
                 mask, "left padding / holes")


def test_output_attentions_and_tuple_return(saved_model):
    hf, ours, _ = saved_model
    cfg = hf.config
    ids, mask, _ = random_batch(3, 12, cfg.vocab_size)
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, output_attentions=True)
        b = ours(ids, attention_mask=mask, output_attentions=True)
        t = ours(ids, attention_mask=mask, return_dict=False)
    assert len(a.attentions) == len(b.attentions) == cfg.num_hidden_layers
    q = real(mask)
    for x, y in zip(a.attentions, b.attentions):
        assert x.shape == y.shape
        # probabilities of real query rows
        assert (x.permute(0, 2, 1, 3)[q] - y.permute(0, 2, 1, 3)[q]).abs().max() <= TOL
        _compare(a.last_hidden_state, b.last_hidden_state, mask, "output_attentions path")
    assert isinstance(t, tuple) and len(t) == 2
    _compare(t[0], b.last_hidden_state, mask, "tuple output")


def test_output_class(saved_model):
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
    hf, ours, _ = saved_model
    ids, mask, _ = random_batch(2, 5, hf.config.vocab_size)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
    assert isinstance(out, BaseModelOutputWithPoolingAndCrossAttentions)
    assert out.hidden_states is None and out.attentions is None


def test_from_hf_matches_from_pretrained(saved_model):
    hf, ours, _ = saved_model
    other = bertfast.BertModel.from_hf(hf)
    ids, mask, _ = random_batch(3, 9, hf.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(other(ids, attention_mask=mask).last_hidden_state,
                           ours(ids, attention_mask=mask).last_hidden_state)


def test_state_dict_round_trip(saved_model, tmp_path):
    """state_dict() -> load_state_dict() of a fresh model gives the same outputs (the packed QKV is split and
    re-packed by the hooks)."""
    hf, ours, _ = saved_model
    fresh = bertfast.BertModel(hf.config).eval()
    fresh.load_state_dict(ours.state_dict())
    ids, mask, _ = random_batch(2, 7, hf.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(fresh(ids, attention_mask=mask).last_hidden_state,
                           ours(ids, attention_mask=mask).last_hidden_state)


def test_pickle_checkpoint_and_dtype(saved_model, tmp_path):
    """A pytorch_model.bin checkpoint (loaded with weights_only=True) and torch_dtype on load."""
    import shutil
    hf, ours, path = saved_model
    shutil.copy(path / "config.json", tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    m = bertfast.BertModel.from_pretrained(tmp_path)
    ids, mask, _ = random_batch(2, 7, hf.config.vocab_size)
    with torch.no_grad():
        _compare(m(ids, attention_mask=mask).last_hidden_state, ours(ids, attention_mask=mask).last_hidden_state,
                 mask, "pickle checkpoint")
    half = bertfast.BertModel.from_pretrained(path, torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_task_model_checkpoint(tmp_path):
    """A BertForSequenceClassification checkpoint: the 'bert.' prefix is stripped, the head is set aside."""
    from transformers import BertForSequenceClassification
    cfg = bert_config(hidden=64, heads=2, layers=1)
    clf = BertForSequenceClassification._from_config(cfg).eval()
    clf.save_pretrained(tmp_path)
    ours = bertfast.BertModel.from_pretrained(tmp_path)
    ids, mask, _ = random_batch(2, 9, cfg.vocab_size)
    with torch.no_grad():
        _compare(clf.bert(ids, attention_mask=mask).last_hidden_state,
                 ours(ids, attention_mask=mask).last_hidden_state, mask, "task checkpoint")
