"""Bad input gets a clear error naming the argument; never a crash, a silent wrong answer or a silent slow path."""
import json

import pytest
import torch

import bertfast
from bertfast import CheckpointError
from helpers import bert_config, hf_bert, random_batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return bertfast.BertModel(bert_config(hidden=64, heads=2, layers=1, vocab=50, max_pos=32, type_vocab=2)).eval()


def test_ids_outside_vocabulary(model):
    ids = torch.randint(0, 50, (2, 8))
    ids[1, 3] = 50
    with pytest.raises(ValueError, match=r"input_ids.*\[0, 50\).*vocab_size"):
        model(ids)
    ids[1, 3] = -1
    with pytest.raises(ValueError, match="input_ids"):
        model(ids)


def test_token_types_outside_type_vocab(model):
    ids = torch.randint(0, 50, (2, 8))
    types = torch.zeros_like(ids)
    types[0, 0] = 2
    with pytest.raises(ValueError, match="token_type_ids.*type_vocab_size"):
        model(ids, token_type_ids=types)


def test_sequence_longer_than_positions(model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(0, 50, (1, 33)))
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.randint(0, 50, (1, 4)), position_ids=torch.tensor([[0, 1, 2, 40]]))


def test_shape_mismatch_ids_mask(model):
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(0, 50, (2, 8)), attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="token_type_ids"):
        model(torch.randint(0, 50, (2, 8)), token_type_ids=torch.zeros(2, 9, dtype=torch.long))


def test_both_or_neither_ids_and_embeds(model):
    with pytest.raises(ValueError, match="input_ids and inputs_embeds.*neither"):
        model()
    with pytest.raises(ValueError, match="input_ids and inputs_embeds.*both"):
        model(torch.randint(0, 50, (1, 4)), inputs_embeds=torch.randn(1, 4, 64))


def test_non_integer_ids(model):
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.rand(2, 4))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(torch.randint(0, 50, (8,)))


@pytest.mark.parametrize("field,value,match", [
    ("num_attention_heads", 5, "hidden_size.*num_attention_heads"),
    ("position_embedding_type", "relative_key", "position_embedding_type"),
    ("is_decoder", True, "is_decoder"),
    ("hidden_act", "mish", "hidden_act"),
])
def test_config_the_kernels_cannot_serve(field, value, match):
    cfg = bert_config(hidden=64, heads=2, layers=1)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        bertfast.BertModel(cfg)


def test_forced_backend_that_cannot_serve(monkeypatch):
    """BERTFAST_BACKEND=triton with a head dim the attention kernel does not take: an error, not a fallback."""
    monkeypatch.setenv("BERTFAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qkv = torch.randn(5, 3, 2, 48)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(bertfast.ops.BackendError, match="head_dim 48"):
        bertfast.ops.varlen_attention(qkv, cu, 5)
    monkeypatch.setenv("BERTFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="BERTFAST_BACKEND"):
        bertfast.ops.varlen_attention(qkv, cu, 5)


def test_all_zero_mask_row_is_finite(model):
    ids, mask, _ = random_batch(3, 8, 50)
    mask[1] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    assert torch.all(out.last_hidden_state[1] == 0)
    with torch.no_grad():
        empty = model(ids, attention_mask=torch.zeros_like(mask))
    assert torch.isfinite(empty.pooler_output).all() and torch.all(empty.last_hidden_state == 0)


@pytest.fixture
def checkpoint(tmp_path):
    cfg = bert_config(hidden=64, heads=2, layers=1, vocab=50, max_pos=32)
    hf_bert(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_checkpoint_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        bertfast.BertModel.from_pretrained(checkpoint)


def test_checkpoint_missing_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        bertfast.BertModel.from_pretrained(checkpoint)


def test_checkpoint_wrong_shape_names_file_and_key(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: key encoder.layer.0.intermediate.dense.weight"):
        bertfast.BertModel.from_pretrained(checkpoint)


def test_checkpoint_missing_and_unexpected_keys(checkpoint):
    from safetensors.torch import load_file, save_file
    state = load_file(str(checkpoint / "model.safetensors"))
    state.pop("pooler.dense.bias")
    state["encoder.layer.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(checkpoint / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: pooler.dense.bias.*unexpected keys: "
                                              r"encoder.layer.0.extra.weight"):
        bertfast.BertModel.from_pretrained(checkpoint)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="neither a local directory"):
        bertfast.BertModel.from_pretrained(tmp_path / "does-not-exist")


def test_ops_bad_arguments():
    from bertfast import ops
    qkv = torch.randn(6, 3, 2, 32)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        ops.varlen_attention(qkv, torch.tensor([0, 6]), 6)
    with pytest.raises(ValueError, match=r"qkv must be a tensor of shape \[T, 3, heads, head_dim\]"):
        ops.varlen_attention(torch.randn(6, 2, 2, 32), torch.tensor([0, 6], dtype=torch.int32), 6)
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="weight has dtype torch.float16"):
        ops.add_layer_norm(x, torch.ones(16, dtype=torch.float16), torch.zeros(16), 1e-5)
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 16\)"):
        ops.add_layer_norm(x, torch.ones(16), torch.zeros(16), 1e-5, residual=torch.randn(4, 15))
    with pytest.raises(ValueError, match="activation"):
        ops.bias_act(x, torch.zeros(16), "mish")
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        ops.bias_gelu(x, torch.zeros(15))


def test_checkpoint_token_type_ids_buffer_ignored(checkpoint):
    """Some transformers versions saved the embeddings' token_type_ids buffer: it carries no weights."""
    from safetensors.torch import load_file, save_file
    state = load_file(str(checkpoint / "model.safetensors"))
    state["embeddings.token_type_ids"] = torch.zeros(1, 32, dtype=torch.long)
    save_file(state, str(checkpoint / "model.safetensors"))
    bertfast.BertModel.from_pretrained(checkpoint)


class _NotATensor:
    pass


def test_pickle_checkpoint_with_objects_refused_by_name(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2), "payload": _NotATensor()},
               checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin could not be loaded as a weights-only pickle"):
        bertfast.BertModel.from_pretrained(checkpoint)


def test_hub_ids_fetch_config_and_weights_only(tmp_path, monkeypatch):
    """A hub id is fetched with patterns that take the top-level config and weights, safetensors first; pickle
    weights only where the repo has no safetensors (a stand-in for snapshot_download over a repo's file list)."""
    import fnmatch
    import itertools

    import huggingface_hub

    def fake_repo(files):
        def snapshot_download(repo_id, allow_patterns):
            calls.append(list(allow_patterns))
            folder = tmp_path / f"snap{next(serial)}"
            for name in files:
                if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_text("x")
            folder.mkdir(exist_ok=True)
            return str(folder)
        return snapshot_download

    calls, serial = [], itertools.count()
    repo = ["config.json", "model.safetensors", "pytorch_model.bin", "onnx/model.onnx", "onnx/config.json",
            "openvino/openvino_model.bin", "training_args.bin", "tokenizer.json", "vocab.txt"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_repo(repo))
    folder = bertfast.loading.resolve("someone/some-bert")
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt"] and len(calls) == 1
    calls.clear()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_repo([n for n in repo if n != "model.safetensors"]))
    folder = bertfast.loading.resolve("someone/old-bert")
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == ["config.json", "pytorch_model.bin", "tokenizer.json", "vocab.txt"] and len(calls) == 2
