"""Bad input gets a clear error naming the argument; never a crash, a silent wrong answer or a silent slow path."""
import json

import pytest
import torch

import bertfast
import bertfast.cli
from bertfast import CheckpointError
from helpers import KERNEL_DEVICE, bert_config, hf_bert, hf_copy, random_batch, real


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return bertfast.BertModel(bert_config(hidden=64, heads=2, layers=1, vocab=50, max_pos=32, type_vocab=2)).eval()


def test_refused_forward_arguments(model):
    """The README's refusals: head_mask, and cross-attention / cache arguments, named (not ignored); arguments
    that change nothing an encoder computes (use_cache, Trainer's num_items_in_batch) are taken."""
    ids = torch.randint(0, 50, (2, 8))
    with pytest.raises(ValueError, match="head_mask is not supported"):
        model(ids, head_mask=torch.ones(1, 2))
    for name in ("encoder_hidden_states", "encoder_attention_mask", "past_key_values"):
        with pytest.raises(TypeError, match=f"forward got unsupported arguments: {name}"):
            model(ids, **{name: torch.ones(2, 8, 64)})
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=True, num_items_in_batch=3).last_hidden_state,
                           model(ids).last_hidden_state)


def test_inputs_embeds_of_another_dtype(model):
    """inputs_embeds in another floating dtype than the weights are taken in the weights' dtype, as transformers'
    embeddings promote them (fp16 embeddings into an fp32 model: an fp32 result)."""
    hf = hf_copy(model, "eager")
    ids, mask, _ = random_batch(2, 8, 50)
    emb = torch.randn(2, 8, 64).half()
    with torch.no_grad():
        a = hf(inputs_embeds=emb.float(), attention_mask=mask).last_hidden_state
        b = model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    q = real(mask)
    assert b.dtype == torch.float32 and (a[q] - b[q]).abs().max() <= 1e-5


def test_ids_outside_vocabulary(model):
    ids = torch.randint(0, 50, (2, 8))
    ids[1, 3] = 50
    with pytest.raises(ValueError, match=r"input_ids.*\[0, 50\).*vocab_size"):
        model(ids)
    ids[1, 3] = -1
    with pytest.raises(ValueError, match="input_ids"):
        model(ids)


@pytest.mark.parametrize("table,arg,rows", [("word_embeddings", "input_ids", 40),
                                             ("position_embeddings", "position_ids", 6)])
def test_ids_outside_a_smaller_table_assigned_to_the_model(table, arg, rows):
    """A table smaller than the config's, assigned directly (not through set_input_embeddings), bounds the ids:
    on CUDA the encoder's gathers run unchecked after the model's own range check."""
    torch.manual_seed(2)
    model = bertfast.BertModel(bert_config(hidden=64, heads=2, layers=1, vocab=50, max_pos=32)).eval()
    old = getattr(model.embeddings, table)
    setattr(model.embeddings, table, torch.nn.Embedding(rows, old.embedding_dim))
    ids = torch.randint(0, 40, (2, 6))
    positions = torch.arange(6).expand(2, 6).clone()
    model(ids, position_ids=positions)                  # in range of the smaller table: runs
    (ids if arg == "input_ids" else positions)[1, 5] = rows
    with pytest.raises(ValueError, match=rf"{arg}.*\[0, {rows}\).*embeddings\.{table}\.weight"):
        model(ids, position_ids=positions)


def test_token_types_outside_type_vocab(model):
    ids = torch.randint(0, 50, (2, 8))
    types = torch.zeros_like(ids)
    types[0, 0] = 2
    with pytest.raises(ValueError, match="token_type_ids.*type_vocab_size"):
        model(ids, token_type_ids=types)


def test_sequence_longer_than_positions(model):
    # one past the positions is refused by its length (not as out-of-range position ids it never gave)
    for kwargs in (dict(input_ids=torch.randint(0, 50, (1, 33))), dict(inputs_embeds=torch.randn(1, 33, 64))):
        with pytest.raises(ValueError, match=r"sequence length 33 of input_ids / inputs_embeds is longer than the "
                                             r"model's positions allow \(32, from config.max_position_embeddings\)"):
            model(**kwargs)
    assert model(torch.randint(0, 50, (1, 32))).last_hidden_state.shape == (1, 32, 64)     # exactly the positions
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
    dev = _backend(monkeypatch, "triton")
    qkv = torch.randn(5, 3, 2, 48, device=dev)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=dev)
    with pytest.raises(bertfast.ops.BackendError, match="head_dim 48"):
        bertfast.ops.varlen_attention(qkv, cu, 5)
    monkeypatch.setenv("BERTFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="BERTFAST_BACKEND"):
        bertfast.ops.varlen_attention(qkv, cu, 5)


def test_attention_inputs_the_kernel_cannot_take_are_refused_or_routed(monkeypatch):
    """More sequences (or heads) than the attention kernel's grid takes: forced Triton is a BackendError naming the
    limit (it was the kernel's own UnsupportedInput), auto routes around the kernel with a notice. bfloat16 in a
    Triton interpreter whose dot multiplies bfloat16's raw bits (Triton 3.6; the tests patch it) is refused by
    name: it gave answers off by ~1e9."""
    from bertfast import ops
    from bertfast.kernels.attention import MAX_GRID_YZ
    dev = _backend(monkeypatch, "triton")
    n = MAX_GRID_YZ + 1
    qkv = torch.randn(n, 3, 1, 32, device=dev)
    cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
    with pytest.raises(ops.BackendError, match=f"{n} sequences of 1 heads .*at most {MAX_GRID_YZ}"):
        ops.varlen_attention(qkv, cu, 1)
    facts = dict(dtype=torch.float16, head_dim=64, sequences=n, heads=12)
    assert "at most" in ops._supports("triton", "varlen_attention", facts, "cuda")
    assert ops._supports("triton", "varlen_attention", dict(facts, sequences=n - 1), "cuda") is None
    monkeypatch.setitem(ops.PREFERENCE, "varlen_attention", dict(ops.PREFERENCE["varlen_attention"],
                                                                 cpu=ops.PREFERENCE["varlen_attention"]["cuda"]))
    monkeypatch.setenv("BERTFAST_BACKEND", "auto")
    if dev == "cpu":
        ops._notices.clear()
        assert ops.choose("varlen_attention", torch.device("cpu"), **facts) == "reference"
        assert any("triton skipped" in v and "at most" in v for v in ops.notices().values())
        from triton.runtime import interpreter
        monkeypatch.setattr(interpreter.InterpreterBuilder, "_bertfast_bf16_patch", False, raising=False)
        bf16 = dict(facts, dtype=torch.bfloat16, sequences=2)
        assert "triton issue #11584" in ops._supports("triton", "varlen_attention", bf16, "cpu")
        monkeypatch.setenv("BERTFAST_BACKEND", "triton")
        with pytest.raises(ops.BackendError, match="bfloat16 in the Triton interpreter"):
            ops.varlen_attention(torch.randn(5, 3, 2, 64, dtype=torch.bfloat16), torch.tensor([0, 2, 5],
                                 dtype=torch.int32), 3)


def test_all_zero_mask_row_is_finite(model):
    ids, mask, _ = random_batch(3, 8, 50)
    mask[1] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    assert torch.all(out.last_hidden_state[1] == 0)
    # the pooler reads a zero row for a sequence without a real token (not another sequence's token)
    with torch.no_grad():
        no_token = torch.tanh(model.pooler.dense.bias)
    assert torch.equal(out.pooler_output[1], no_token)
    with torch.no_grad():
        empty = model(ids, attention_mask=torch.zeros_like(mask))
    assert torch.isfinite(empty.pooler_output).all() and torch.all(empty.last_hidden_state == 0)
    assert torch.equal(empty.pooler_output, no_token.expand_as(empty.pooler_output))


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


def test_config_without_model_type_read_by_the_family_class(checkpoint):
    """Older config.json files have no model_type: transformers' BertModel reads them with BertConfig, and so
    does bertfast.BertModel; AutoModel cannot tell the family and says how to load it."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg.pop("model_type")
    cfg.pop("architectures", None)
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    from transformers import BertModel as HFBertModel
    theirs = HFBertModel.from_pretrained(checkpoint).eval()
    ours = bertfast.BertModel.from_pretrained(checkpoint)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert (ours(ids).last_hidden_state - theirs(ids).last_hidden_state).abs().max() <= 1e-5
    with pytest.raises(CheckpointError, match="no model_type: load it with its family's class"):
        bertfast.AutoModel.from_pretrained(checkpoint)


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_checkpoints_as_transformers(tmp_path, safe):
    """A checkpoint saved in shards (model-0000i-of-0000n.safetensors / pytorch_model-*.bin and an index): every
    shard is read, the outputs equal transformers' load of the same folder, an error names the shard that holds the
    key, and a shard the index lists but the folder lacks is named."""
    torch.manual_seed(7)
    cfg = bert_config(hidden=64, heads=2, layers=2, vocab=50, max_pos=32)
    hf_bert(cfg).save_pretrained(tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    ext = "safetensors"
    if not safe:      # the same shards as pickle files (transformers 5 saves safetensors only)
        from safetensors.torch import load_file
        ext, renamed = "bin", {}
        for name in sorted(set(weight_map.values())):
            renamed[name] = name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            torch.save(load_file(str(tmp_path / name)), tmp_path / renamed[name])
            (tmp_path / name).unlink()
        index.unlink()
        weight_map = {k: renamed[v] for k, v in weight_map.items()}
        index = tmp_path / "pytorch_model.bin.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 3 and all(s.endswith("." + ext) for s in shards)
    from transformers import BertModel as HFBertModel
    theirs = HFBertModel.from_pretrained(tmp_path).eval()
    ours = bertfast.BertModel.from_pretrained(tmp_path)
    ids, mask, types = random_batch(3, 11, 50, 2)
    with torch.no_grad():
        a = theirs(ids, attention_mask=mask, token_type_ids=types)
        b = ours(ids, attention_mask=mask, token_type_ids=types)
    q = real(mask)
    assert (a.last_hidden_state[q] - b.last_hidden_state[q]).abs().max() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-5
    # a shape error names the shard the key came from, not the index
    key = "encoder.layer.1.intermediate.dense.weight"
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=f"{weight_map[key]}: key {key} has shape"):
        bertfast.BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1]} is missing \\(listed in .*{index.name}\\)"):
        bertfast.BertModel.from_pretrained(tmp_path)


def test_tensorflow_era_layer_norm_names_load_as_transformers(checkpoint):
    """Old checkpoints name the LayerNorms' parameters gamma / beta: both renamed (weight / bias) as transformers
    renames them, the outputs equal transformers' load of the same file."""
    from safetensors.torch import load_file, save_file
    from transformers import BertModel as HFBertModel
    state = load_file(str(checkpoint / "model.safetensors"))
    old = {}
    for key, value in state.items():
        if ".LayerNorm." in key:
            key = key.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(".LayerNorm.bias", ".LayerNorm.beta")
        old[key] = value
    assert any(k.endswith(".gamma") for k in old) and any(k.endswith(".beta") for k in old)
    save_file(old, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    theirs = HFBertModel.from_pretrained(checkpoint).eval()
    ours = bertfast.BertModel.from_pretrained(checkpoint)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert (ours(ids).last_hidden_state - theirs(ids).last_hidden_state).abs().max() <= 1e-5


_LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234567\n"


@pytest.mark.parametrize("name,content,message", [
    ("model.safetensors", _LFS, "model.safetensors is a Git LFS pointer, not the weights"),
    ("pytorch_model.bin", _LFS, "pytorch_model.bin is a Git LFS pointer, not the weights"),
    ("model.safetensors", "x" * 64, "model.safetensors could not be read as a safetensors file"),
    ("model.safetensors.index.json", "{oops", "model.safetensors.index.json could not be read as JSON"),
    ("model.safetensors.index.json", '{"metadata": {}}', "model.safetensors.index.json has no weight_map"),
    ("model.safetensors.index.json", '{"weight_map": {"pooler.dense.bias": 3}}',
     "model.safetensors.index.json has no weight_map"),          # a shard named by something other than a file name
    ("pytorch_model.bin", torch.zeros(3), "pytorch_model.bin holds a Tensor, not a state dict"),
    ("pytorch_model.bin", {"state_dict": {"a": torch.zeros(1)}, "epoch": 1},
     r"pytorch_model.bin is not a state dict: epoch, state_dict hold no tensor"),
])
def test_unreadable_weight_files_named(checkpoint, name, content, message):
    """Weights that are not weights (a Git LFS pointer, a truncated file, a broken index, a training checkpoint)
    give a CheckpointError naming the file and what is wrong with it."""
    (checkpoint / "model.safetensors").unlink()
    if isinstance(content, str):
        (checkpoint / name).write_text(content)
    else:
        torch.save(content, checkpoint / name)
    with pytest.raises(CheckpointError, match=message):
        bertfast.BertModel.from_pretrained(checkpoint)


def test_from_hf_takes_transformers_models_only():
    with pytest.raises(TypeError, match="from_hf takes a loaded transformers model .* got Linear"):
        bertfast.BertModel.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="from_hf takes a loaded transformers model .* got Linear"):
        bertfast.AutoModel.from_hf(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("device,message", [("bogus", "'bogus' is not a device"),
                                            ("meta", "must be cpu or cuda, got 'meta'")])
def test_bench_device_argument_checked(device, message, capsys):
    from benchmarks import suite
    with pytest.raises(SystemExit) as info:
        suite.main(["--device", device, "--dry-run"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


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
        def snapshot_download(repo_id, allow_patterns, **hub):
            calls.append(list(allow_patterns))
            hubs.append(hub)
            folder = tmp_path / f"snap{next(serial)}"
            for name in files:
                if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_text("x")
            folder.mkdir(exist_ok=True)
            return str(folder)
        return snapshot_download

    calls, hubs, serial = [], [], itertools.count()
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
    # transformers' hub arguments reach snapshot_download; subfolder narrows the patterns and the folder returned
    calls.clear(), hubs.clear()
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        fake_repo(repo + ["sub/config.json", "sub/model.safetensors"]))
    folder = bertfast.loading.resolve("someone/some-bert", subfolder="sub", revision="v2", token="t", cache_dir=None)
    assert folder.name == "sub" and sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert hubs == [dict(revision="v2", token="t")] and all(p.startswith("sub/") for p in calls[0])
    with pytest.raises(TypeError, match="mirror"):
        bertfast.loading.resolve("someone/some-bert", mirror="x")
    # use_safetensors=False fetches the pickle weights of a repo that has both; config_only fetches no weights
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_repo(repo))
    folder = bertfast.loading.resolve("someone/some-bert", use_safetensors=False)
    assert sorted(p.name for p in folder.iterdir() if "model" in p.name) == ["pytorch_model.bin"]
    folder = bertfast.loading.resolve("someone/some-bert", config_only=True)
    assert not [p.name for p in folder.iterdir() if "model" in p.name]


BACKENDS_ON_CPU = ["auto", "reference", "triton"]


def _backend(monkeypatch, backend):
    """Forces `backend` and returns the device its tensors go on: the Triton kernels take the GPU's tensors where
    there is one, else CPU tensors in the interpreter (conftest sets TRITON_INTERPRET=1 before they are defined;
    setting it later does not make defined kernels interpreted)."""
    monkeypatch.setenv("BERTFAST_BACKEND", backend)
    return KERNEL_DEVICE if backend == "triton" else "cpu"


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_strided_ids_and_length_one_rows_match_transformers(backend, monkeypatch):
    """Valid inputs that are views: a batch of length-1 rows (its default position ids are an expanded view),
    column slices and strided ids / token types / positions. All match transformers."""
    dev = _backend(monkeypatch, backend)
    torch.manual_seed(3)
    cfg = bert_config(hidden=64, heads=2, layers=1, vocab=50, max_pos=32, type_vocab=2)
    hf = hf_bert(cfg).to(dev)
    ours = bertfast.BertModel.from_hf(hf).eval()
    ids = torch.randint(0, 50, (3, 14), device=dev)
    types = torch.randint(0, 2, (3, 14), device=dev)
    positions = torch.randint(0, 32, (3, 14), device=dev)
    cases = [dict(input_ids=ids[:, :1].contiguous()), dict(input_ids=ids[:, :1]), dict(input_ids=ids[:, ::2]),
             dict(input_ids=ids[:, ::2], token_type_ids=types[:, ::2], position_ids=positions[:, ::2]),
             dict(input_ids=ids[:, :1], attention_mask=torch.ones(3, 1, dtype=torch.long, device=dev))]
    for kwargs in cases:
        with torch.no_grad():
            a, b = hf(**kwargs), ours(**kwargs)
        assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= 1e-5, kwargs.keys()


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_layer_norm_of_an_empty_last_dimension_refused(backend, monkeypatch):
    """A LayerNorm over nothing (x [..., 0], or a 0-d x) is refused by every implementation alike, naming x (the C++
    kernel, the Triton launcher and the reference used to disagree: two different errors and an empty y)."""
    monkeypatch.setenv("BERTFAST_BACKEND", backend)
    for x in (torch.randn(4, 0), torch.randn(2, 3, 0), torch.tensor(1.0)):
        w = torch.ones(0)
        with pytest.raises(ValueError, match=r"x must have a non-empty last dimension .* got shape"):
            bertfast.ops.add_layer_norm(x, w, torch.zeros(0), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_empty_batches(backend, monkeypatch):
    """Batch 0, sequence length 0 and an all-padding batch give empty / zero outputs, as transformers' shapes."""
    dev = _backend(monkeypatch, backend)
    model = bertfast.BertModel(bert_config(hidden=64, heads=2, layers=1, vocab=50, max_pos=32)).eval().to(dev)
    ids = torch.randint(0, 50, (3, 7), device=dev)
    with torch.no_grad():
        assert model(ids[:0]).last_hidden_state.shape == (0, 7, 64)
        assert model(ids[:, :0]).last_hidden_state.shape == (3, 0, 64)
        out = model(ids, attention_mask=torch.zeros_like(ids))
    assert out.last_hidden_state.shape == (3, 7, 64) and not out.last_hidden_state.any()
    # output_attentions (the padded path) on batches without a real token: the probabilities of transformers'
    # eager attention, uniform over the (all masked) keys
    with torch.no_grad():
        for b, mask in ((3, torch.zeros_like(ids)), (0, None)):
            out = model(ids[:b], attention_mask=None if mask is None else mask[:b], output_attentions=True)
            assert out.last_hidden_state.shape == (b, 7, 64) and not out.last_hidden_state.any()
            (probs,) = out.attentions
            assert probs.shape == (b, 2, 7, 7) and torch.equal(probs, torch.full_like(probs, 1 / 7))
    qkv = torch.randn(0, 3, 2, 32, device=dev, requires_grad=True)
    zeros = torch.zeros(3, dtype=torch.int32, device=dev)
    assert bertfast.ops.varlen_attention(qkv, zeros[:1], 0).shape == (0, 2, 32)
    out = bertfast.ops.varlen_attention(qkv, zeros, 0)
    out.sum().backward()
    assert out.shape == (0, 2, 32) and qkv.grad.shape == qkv.shape
    with pytest.raises(ValueError, match=r"cu_seqlens \[0\] describes no sequence but qkv holds 5 tokens"):
        bertfast.ops.varlen_attention(torch.randn(5, 3, 2, 32, device=dev), zeros[:1], 5)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("cu,max_seqlen,message", [
    ([1, 3, 8, 9], 5, "must start at 0, got 1"),
    ([0, 8, 3, 9], 8, "monotonic non-decreasing"),
    ([0, 5, 4, 9], 5, "monotonic non-decreasing"),      # a sequence of length -1
    ([0, -3, 8, 9], 11, "monotonic non-decreasing"),
    ([0, 3, 8], 5, r"must end at T = qkv.shape\[0\] = 9, got 8"),
    ([0, 3, 8, 12], 5, r"must end at T = qkv.shape\[0\] = 9, got 12"),
    ([0, 3, 8, 9], 2, r"max_seqlen 2 is smaller than the longest sequence in cu_seqlens \(5\)"),
    ([0, 3, 8, 9], 4, r"max_seqlen 4 is smaller than the longest sequence in cu_seqlens \(5\)"),     # one short
])
def test_varlen_attention_checks_cu_seqlens_values(backend, cu, max_seqlen, message, monkeypatch):
    """A kernel addresses memory by cu_seqlens: wrong values are refused on every backend (the CPU path reads them
    anyway; the GPU kernels after one host read), not turned into garbage or a crash."""
    dev = _backend(monkeypatch, backend)
    qkv = torch.randn(9, 3, 2, 32, device=dev)
    with pytest.raises(ValueError, match=message):
        bertfast.ops.varlen_attention(qkv, torch.tensor(cu, dtype=torch.int32, device=dev), max_seqlen)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_strided_vectors_are_taken(backend, monkeypatch):
    """Strided views of cu_seqlens, weights, biases and index vectors are valid inputs: same results as
    contiguous copies."""
    dev = _backend(monkeypatch, backend)
    ops = bertfast.ops
    qkv = torch.randn(9, 3, 2, 32, device=dev)
    cu = torch.tensor([0, 99, 3, 99, 8, 99, 9, 99], dtype=torch.int32, device=dev)[::2]
    assert torch.equal(ops.varlen_attention(qkv, cu, 5), ops.varlen_attention(qkv, cu.contiguous(), 5))
    x, r = torch.randn(5, 64, device=dev), torch.randn(5, 64, device=dev)
    w, b, xb = (torch.randn(128, device=dev)[::2] for _ in range(3))
    assert torch.equal(ops.add_layer_norm(x, w, b, 1e-5, residual=r, x_bias=xb),
                       ops.add_layer_norm(x, w.contiguous(), b.contiguous(), 1e-5, residual=r,
                                          x_bias=xb.contiguous()))
    assert torch.equal(ops.bias_gelu(x, xb), ops.bias_gelu(x, xb.contiguous()))
    idx = torch.tensor([0, 9, 2, 9, 4, 9], device=dev)[::2]
    assert torch.equal(ops.unpad(x, idx), x[[0, 2, 4]])
    assert torch.equal(ops.pad(x[:3], idx, 2, 3).reshape(6, 64)[[0, 2, 4]], x[:3])


def test_cpu_attention_reads_cu_seqlens_checked_even_unvalidated(monkeypatch):
    """validate=False skips the GPU's host read of cu_seqlens; the CPU attention, which reads the values on the
    host anyway, still refuses bad ones rather than slicing garbage."""
    qkv = torch.randn(9, 3, 2, 32)
    for backend in ("auto", "cpp", "reference"):
        monkeypatch.setenv("BERTFAST_BACKEND", backend)
        for cu, message in (([0, 8, 3, 9], "monotonic"), ([1, 3, 9], "start at 0"), ([0, 3, 8], "end at T")):
            with pytest.raises(ValueError, match=message):
                bertfast.ops.varlen_attention(qkv, torch.tensor(cu, dtype=torch.int32), 8, validate=False)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_op_arguments_named(monkeypatch, backend):
    dev = _backend(monkeypatch, backend)
    ops = bertfast.ops
    x, w, b = torch.randn(3, 8, device=dev), torch.ones(8, device=dev), torch.zeros(8, device=dev)
    for eps in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="eps must be >= 0"):
            ops.add_layer_norm(x, w, b, eps)
    qkv, cu = torch.randn(6, 3, 2, 32, device=dev), torch.tensor([0, 6], dtype=torch.int32, device=dev)
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            ops.varlen_attention(qkv, cu, 6, dropout_p=p)
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            ops.add_layer_norm(x, w, b, 1e-5, dropout_p=p)
    with pytest.raises(ValueError, match=r"qkv must be contiguous in its last dimension"):
        ops.varlen_attention(torch.randn(6, 3, 32, 2, device=dev).transpose(2, 3), cu, 6)
    ids, idx = torch.tensor([1, 2, 3], device=dev), torch.arange(3, device=dev)
    word, pos = torch.randn(10, 8, device=dev), torch.randn(6, 8, device=dev)
    for kw, name in ((dict(padding_idx=10), "padding_idx=10"), (dict(padding_idx=-1), "padding_idx=-1"),
                     (dict(pos_padding_idx=6), "pos_padding_idx=6")):
        with pytest.raises(ValueError, match=f"{name} is not a row of its table"):
            ops.embed(ids, idx, idx, None, word, pos, None, w, b, 1e-5, **kw)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[\.\.\., I\]"):
        ops.bias_gelu(torch.tensor(1.0), None)
    with pytest.raises(ValueError, match=r"attention_mask must be a \[batch, seq_len\] tensor, got \(4,\)"):
        bertfast.padding.unpad_mask(torch.ones(4))


def test_roberta_batches_padded_past_the_positions(tmp_path):
    """RoBERTa counts positions over the non-padding ids, so a batch padded wider than its positions is valid
    when every sequence fits (transformers takes it); a sequence that does not fit is refused by name."""
    import transformers as T
    torch.manual_seed(5)
    cfg = T.RobertaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96,
                          vocab_size=100, max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
    hf = T.RobertaModel._from_config(cfg, attn_implementation="eager").eval()
    ours = bertfast.optimize(hf.__class__._from_config(cfg, attn_implementation="eager").eval())
    ours.load_state_dict(hf.state_dict())
    ids = torch.randint(3, 100, (2, 39))
    mask = torch.ones_like(ids)
    ids[:, 30:], mask[:, 30:] = 1, 0          # 30 real tokens padded to 39 > 38 positions
    with torch.no_grad():
        a, b = hf(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    q = mask.bool()
    assert (a.last_hidden_state[q] - b.last_hidden_state[q]).abs().max() <= 1e-5
    ids = torch.randint(3, 100, (1, 39))
    with pytest.raises(ValueError, match=r"input_ids hold a sequence of 39 tokens \(not counting padding\), longer "
                                         r"than the model's positions allow \(38"):
        ours(ids)
    # inputs_embeds have no padding to leave out: their length is what must fit, and it is what the error names
    embeds = torch.randn(2, 38, 64)
    with torch.no_grad():
        a, b = hf(inputs_embeds=embeds), ours(inputs_embeds=embeds)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"sequence length 39 of input_ids / inputs_embeds is longer than the "
                                         r"model's positions allow \(38"):
        ours(inputs_embeds=torch.randn(1, 39, 64))


def test_reference_pad_and_unpad_check_indices(monkeypatch):
    """The reference pad / unpad name a bad index as the C++ kernels do (out of range, a row written twice)."""
    for backend in ("reference", "cpp"):
        monkeypatch.setenv("BERTFAST_BACKEND", backend)
        y = torch.randn(3, 4)
        with pytest.raises((ValueError, RuntimeError), match="indices holds (row 0 twice|a row more than once)"):
            bertfast.ops.pad(y, torch.zeros(3, dtype=torch.long), 2, 3)
        with pytest.raises((ValueError, RuntimeError), match="indices"):
            bertfast.ops.unpad(y, torch.tensor([0, 3]))
        with pytest.raises((ValueError, RuntimeError), match="indices"):
            bertfast.ops.pad(y, torch.tensor([0, 1, 6]), 2, 3)


def test_from_pretrained_refuses_integer_dtypes(tmp_path):
    hf_bert(bert_config(hidden=32, heads=2, layers=1, vocab=50, max_pos=16)).save_pretrained(tmp_path)
    for value in (torch.int64, "int8", "float17"):
        with pytest.raises(ValueError, match="torch_dtype="):
            bertfast.BertModel.from_pretrained(tmp_path, torch_dtype=value)


@pytest.mark.parametrize("argv,message", [
    (["demo", "--device", "cpu", "--repeats", "1"], "--repeats: must be >= 2"),
    (["check", "--device", "cuda"], "asked for CUDA, but torch"),
    (["demo", "--device", "cpu", "--model", "/nonexistent/bertfast"], "is not a directory"),
])
def test_cli_errors_name_the_argument(argv, message, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    with pytest.raises(SystemExit) as exc:
        bertfast.cli.main(argv)
    assert message in str(exc.value.code) + capsys.readouterr().err


def test_cli_bad_backend_setting_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("BERTFAST_BACKEND", "bogus")
    assert bertfast.cli.main(["info"]) == 2
    err = capsys.readouterr().err
    assert "BERTFAST_BACKEND='bogus' is not one of" in err and "Traceback" not in err


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_attention_without_heads_refused(backend, monkeypatch):
    """0 heads or head_dim 0: a named error on every backend (ATen's CPU flash attention, which the CPU path calls,
    died of SIGFPE on 0 heads; head_dim 0 divided by zero in the default scale)."""
    dev = _backend(monkeypatch, backend)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=dev)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in ((8, 3, 0, 32), (8, 3, 2, 0)):
            with pytest.raises(ValueError, match=r"qkv must have at least one head and head_dim >= 1"):
                bertfast.ops.varlen_attention(torch.randn(shape, device=dev).to(dtype), cu, 5)


def _embed_args(dev, dtype=torch.float32):
    n, e = 6, 8
    return dict(input_ids=torch.randint(0, 10, (n,), device=dev), indices=torch.tensor([0, 2, 5], device=dev),
                position_ids=torch.arange(n, device=dev), token_type_ids=torch.zeros(n, dtype=torch.long, device=dev),
                word_emb=torch.randn(10, e, device=dev, dtype=dtype), pos_emb=torch.randn(n, e, device=dev, dtype=dtype),
                type_emb=torch.randn(2, e, device=dev, dtype=dtype), ln_weight=torch.ones(e, device=dev, dtype=dtype),
                ln_bias=torch.zeros(e, device=dev, dtype=dtype), eps=1e-12)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpp"])
def test_embed_arguments_named(backend, monkeypatch):
    """embed checks its arguments itself, as the C++ op does, for every implementation: the reference cast mixed
    dtypes, ignored token_type_ids without a type table and took a negative eps or int32 ids."""
    monkeypatch.setenv("BERTFAST_BACKEND", backend)
    ops = bertfast.ops
    for dtype in (torch.float32, torch.float64) if backend != "cpp" else (torch.float32,):
        good = _embed_args("cpu", dtype)
        ref = ops.embed(**good)
        assert ref.shape == (3, 8) and ref.dtype == dtype
        cases = [
            (dict(type_emb=None), "token_type_ids given but type_emb is None"),
            (dict(pos_emb=good["pos_emb"].half()), "pos_emb has dtype torch.float16 but word_emb has dtype"),
            (dict(ln_weight=good["ln_weight"].half()), "ln_weight has dtype torch.float16"),
            (dict(ln_bias=torch.zeros(7, dtype=dtype)), r"ln_bias must have shape \(8,\)"),
            (dict(type_emb=torch.randn(2, 7, dtype=dtype)), r"type_emb must have shape \[type_vocab >= 1, 8\]"),
            (dict(eps=-1.0), "eps must be >= 0"),
            (dict(eps=float("nan")), "eps must be >= 0"),
            (dict(input_ids=good["input_ids"].int()), "input_ids must be a 1-D int64 tensor"),
            (dict(indices=good["indices"].view(1, 3)), "indices must be a 1-D int64 tensor"),
            (dict(position_ids=torch.arange(5)), "position_ids must have input_ids' length 6"),
            (dict(word_emb=torch.randn(10, 0, dtype=dtype)), r"word_emb must be a floating-point tensor \[vocab, E\]"),
        ]
        for change, message in cases:
            with pytest.raises(ValueError, match=message):
                ops.embed(**dict(good, **change))
        # a table that is a strided view is taken (made contiguous), with the same result
        wide = torch.zeros(10, 16, dtype=dtype)
        wide[:, ::2] = good["word_emb"]
        assert torch.equal(ops.embed(**dict(good, word_emb=wide[:, ::2])), ref)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpp"])
def test_pad_unpad_any_dtype_and_no_0d(backend, monkeypatch):
    """pad / unpad copy rows as bytes, so every backend takes integer and bool rows (the C++ backend, forced, was
    refused for dtypes the math kernels do not take); a 0-d x is a named error (the reference raised IndexError)."""
    monkeypatch.setenv("BERTFAST_BACKEND", backend)
    ops = bertfast.ops
    idx = torch.tensor([3, 0, 2])
    for x in (torch.randint(-100, 100, (4, 5)), torch.rand(4, 5) > 0.5, torch.randint(0, 9, (4,), dtype=torch.uint8)):
        rows = ops.unpad(x, idx)
        assert torch.equal(rows, x[idx])
        back = ops.pad(rows, idx, 2, 2)
        want = torch.zeros_like(x)
        want[idx] = x[idx]
        assert torch.equal(back.reshape(x.shape), want)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[N, \.\.\.\] \(at least 1-D\), got a 0-d"):
        ops.unpad(torch.tensor(1.0), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[T, \.\.\.\] \(at least 1-D\), got a 0-d"):
        ops.pad(torch.tensor(1.0), torch.tensor([0]), 1, 1)
    with pytest.raises(ValueError, match="batch and seqlen must be >= 0"):
        ops.pad(torch.randn(0, 3), torch.zeros(0, dtype=torch.long), -1, 2)


def test_linear_act_arguments_named():
    """linear_act names a weight / bias of another dtype or device on every path (torch's F.linear said "expected
    m1 and m2 to have the same dtype"); under autocast mixed dtypes stay allowed (autocast casts them)."""
    ops = bertfast.ops
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight has dtype torch.float16 but x has dtype torch.float32"):
        ops.linear_act(x, torch.randn(4, 8, dtype=torch.float16), None, "gelu")
    with pytest.raises(ValueError, match="bias has dtype torch.float64 but x has dtype torch.float32"):
        ops.linear_act(x, torch.randn(4, 8), torch.zeros(4, dtype=torch.float64), "gelu")
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        ops.linear_act(x, torch.randn(4, 8), torch.zeros(5), "relu")
    w, b = torch.randn(4, 8), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear_act(x.bfloat16(), w, b, "gelu")
    want = torch.nn.functional.gelu(torch.nn.functional.linear(x.bfloat16().double(), w.bfloat16().double(),
                                                               b.bfloat16().double()))
    assert y.dtype == torch.bfloat16 and (y.double() - want).abs().max() <= 0.05


@pytest.mark.parametrize("pad", [None, -1, 39])
def test_roberta_without_a_usable_pad_token_id(pad):
    """RoBERTa counts positions from config.pad_token_id: without one (or outside the positions) the model is refused
    at construction by name (its first forward raised a TypeError from int - None)."""
    import transformers as T
    cfg = T.RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          vocab_size=50, max_position_embeddings=40, type_vocab_size=1)
    cfg.pad_token_id = pad
    with pytest.raises(ValueError, match=r"config.pad_token_id must be an int in \[0, max_position_embeddings - 1"):
        bertfast.RobertaModel(cfg)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpp"])
def test_ops_refuse_each_bad_argument_by_name(backend, monkeypatch):
    """Each check of the ops layer's public functions names its argument: a tensor on another device (the meta
    device stands in for a second device on a CPU-only machine), a negative size, an index vector of the wrong
    dtype, length or values, an empty table, a mismatched x_bias."""
    monkeypatch.setenv("BERTFAST_BACKEND", backend)
    ops = bertfast.ops
    meta = torch.device("meta")
    qkv, cu = torch.randn(6, 3, 2, 32), torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens is on meta but qkv is on cpu"):
        ops.varlen_attention(qkv, cu.to(meta), 6)
    with pytest.raises(ValueError, match="max_seqlen must be >= 0, got -1"):
        ops.varlen_attention(qkv, cu, -1, validate=False)
    x, w, b = torch.randn(3, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        ops.bias_act(x, torch.zeros(8, device=meta), "gelu")
    with pytest.raises(ValueError, match="residual is on meta but x is on cpu"):
        ops.add_layer_norm(x, w, b, 1e-5, residual=torch.randn(3, 8, device=meta))
    with pytest.raises(ValueError, match=r"x_bias must have shape \(8,\), got \(7,\)"):
        ops.add_layer_norm(x, w, b, 1e-5, x_bias=torch.zeros(7))
    good = _embed_args("cpu")
    with pytest.raises(ValueError, match="position_ids is on meta but word_emb is on cpu"):
        ops.embed(**dict(good, position_ids=good["position_ids"].to(meta)))
    with pytest.raises(ValueError, match=r"pos_emb must have shape \[max_positions >= 1, 8\]"):
        ops.embed(**dict(good, pos_emb=torch.randn(0, 8)))
    with pytest.raises(ValueError, match="padding_idx=10 is not a row of its table"):
        ops.embed(**good, padding_idx=10)
    y = torch.randn(3, 4)
    with pytest.raises(ValueError, match="batch and seqlen must be >= 0, got 3 and -1"):
        ops.pad(y, torch.tensor([0, 1, 2]), 3, -1)
    with pytest.raises(ValueError, match=r"indices must be a 1-D int64 tensor with one entry per row of x \(3\)"):
        ops.pad(y, torch.tensor([0, 1]), 2, 3)
    with pytest.raises(ValueError, match="indices must be a 1-D int64 tensor, got torch.int32"):
        ops.unpad(y, torch.tensor([0, 1], dtype=torch.int32))
    # out-of-range and repeated rows: the reference checks them itself, the C++ kernels in their own words
    with pytest.raises((ValueError, RuntimeError), match=r"indices holds .*(outside|valid range)"):
        ops.pad(y, torch.tensor([0, 1, 6]), 2, 3)          # row 6 of a [2 * 3] output
    with pytest.raises((ValueError, RuntimeError), match=r"indices holds .*(outside|valid range)"):
        ops.unpad(y, torch.tensor([1, -1]))
    with pytest.raises((ValueError, RuntimeError), match="indices holds (row 2 twice|a row more than once)"):
        ops.pad(y, torch.tensor([2, 0, 2]), 2, 3)
