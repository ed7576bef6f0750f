"""Reading configs and checkpoints: safetensors first, pickle checkpoints only with weights_only=True, strict
key and shape checks that name the file and the key."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from bertfast.ops import notice_once

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# every file of a checkpoint's weights, shards included (glob / hub patterns), per format
SAFETENSORS_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors")
PICKLE_PATTERNS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin")
# Buffers that older transformers versions saved and that carry no weights.
IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: names the file and, where it applies, the key."""


# from_pretrained's hub arguments, passed to huggingface_hub.snapshot_download (subfolder is handled here)
HUB_ARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


def resolve(path_or_id: str | os.PathLike, subfolder: str = "", use_safetensors: bool | None = None,
            config_only: bool = False, **hub) -> Path:
    """A local directory, or a hub id resolved through the local Hugging Face cache (or the hub when online).
    subfolder: the checkpoint lies in that folder of the directory or repo; hub: HUB_ARGS for snapshot_download;
    use_safetensors True / False: fetch only those weights (None: safetensors, else pickle); config_only: fetch
    no weights."""
    bad = sorted(set(hub) - set(HUB_ARGS))
    if bad:
        raise TypeError(f"resolve got unexpected arguments {', '.join(bad)}; hub arguments: {', '.join(HUB_ARGS)}")
    subfolder = str(subfolder or "").strip("/")
    path = Path(path_or_id)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise CheckpointError(f"subfolder={subfolder!r}: {folder} is not a directory")
        return folder
    if path.exists():
        raise CheckpointError(f"{path} is a file; from_pretrained expects a directory with config.json and "
                              f"model.safetensors")
    try:
        from huggingface_hub import snapshot_download
        # the top-level config and weights only (a repo's onnx/, openvino/ or training_args.bin are not needed),
        # safetensors first; pickle weights fetched only where a repo has no safetensors
        prefix = subfolder + "/" if subfolder else ""
        common = ["config.json", "tokenizer*", "vocab.txt", "special_tokens_map.json"]
        hub = {k: v for k, v in hub.items() if v is not None}

        def fetch(patterns):
            root = Path(snapshot_download(str(path_or_id), allow_patterns=[prefix + p for p in patterns], **hub))
            return root / subfolder if subfolder else root
        if config_only:
            return fetch(common)
        if use_safetensors is False:
            return fetch(common + list(PICKLE_PATTERNS))
        folder = fetch(common + list(SAFETENSORS_PATTERNS))
        if use_safetensors is None and not any((folder / name).is_file() for name in WEIGHT_FILES):
            folder = fetch(common + list(PICKLE_PATTERNS))
        return folder
    except Exception as exc:  # noqa: BLE001 - re-raised with the path named
        raise CheckpointError(f"{path_or_id!r} is neither a local directory nor a model id that could be "
                              f"fetched ({type(exc).__name__}: {exc})") from exc


def read_config(directory: Path, model_type: str | None = None, **overrides) -> tuple:
    """(the directory's config, the overrides that are not config fields); overrides: config fields to set
    (from_pretrained's keyword arguments, as transformers applies them). model_type: the family's, when the
    caller is a family class: a config.json without "model_type" (older checkpoints) is then read with that
    family's config class, as transformers' <Family>Model.from_pretrained reads it."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: a checkpoint directory needs config.json")
    from transformers import CONFIG_MAPPING, AutoConfig
    fields = _json_object(config_file)
    reader = CONFIG_MAPPING[model_type] if model_type and "model_type" not in fields else AutoConfig
    try:
        return reader.from_pretrained(str(directory), return_unused_kwargs=True, **overrides)
    except Exception as exc:  # noqa: BLE001
        hint = "" if "model_type" in fields else \
            " (config.json has no model_type: load it with its family's class, e.g. bertfast.BertModel)"
        raise CheckpointError(f"{config_file} could not be read: {exc}{hint}") from exc


def _load_file(path: Path) -> dict:
    """The {name: tensor} of one weights file; a CheckpointError naming the file for anything else."""
    with open(path, "rb") as f:
        if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
            raise CheckpointError(f"{path} is a Git LFS pointer, not the weights (the repository was cloned "
                                  f"without them: run `git lfs pull` there)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise CheckpointError(f"{path} could not be read as a safetensors file (truncated or not one?): "
                                  f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    else:
        # pickle checkpoints: tensors only, never arbitrary objects
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise CheckpointError(f"{path} could not be loaded as a weights-only pickle checkpoint (objects other "
                                  f"than tensors are refused): {type(exc).__name__}: {str(exc)[:300]}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict ({{name: tensor}})")
    other = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if other:
        raise CheckpointError(f"{path} is not a state dict: {', '.join(other[:4])}{', ...' if len(other) > 4 else ''}"
                              f" hold{'s' if len(other) == 1 else ''} no tensor (a training checkpoint? save the "
                              f"model's state_dict() there)")
    return state


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _json_object(path: Path) -> dict:
    """The JSON object in a checkpoint's file (config.json, an index), or a CheckpointError naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} could not be read as JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _weight_map(path: Path) -> dict:
    """The weight_map of a sharded checkpoint's index file (a CheckpointError naming it when there is none)."""
    weight_map = _json_object(path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path} has no weight_map (a JSON object mapping each weight's name to its shard)")
    return weight_map


def read_state_dict(directory: Path, use_safetensors: bool | None = None) -> tuple[dict, dict]:
    """(state_dict, key -> file it came from). Prefers safetensors; follows sharded index files.
    use_safetensors True: safetensors files only; False: pickle files only (transformers' meaning)."""
    names = WEIGHT_FILES if use_safetensors is None else \
        tuple(n for n in WEIGHT_FILES if n.startswith("model.safetensors") == bool(use_safetensors))
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = _weight_map(path)
            state, origin = {}, {}
            for shard in sorted(set(weight_map.values())):
                shard_path = directory / shard
                if not shard_path.is_file():
                    raise CheckpointError(f"{shard_path} is missing (listed in {path})")
                part = _load_file(shard_path)
                state.update(part)
                origin.update({k: shard_path.name for k in part})
            return state, origin
        state = _load_file(path)
        return state, {k: name for k in state}
    raise CheckpointError(f"no weights in {directory}: expected one of {', '.join(names)}"
                          + ("" if use_safetensors is None else f" (use_safetensors={use_safetensors})"))


def normalise_keys(state: dict, origin: dict, expected: set, base_prefix: str,
                   directory: Path | str = "", sources: dict | None = None) -> tuple[dict, dict]:
    """Map a checkpoint's keys onto the encoder's: strip the task model's prefix (e.g. "bert." in a
    BertForMaskedLM checkpoint; the head's own keys are then set aside with a notice), rename the old
    TensorFlow-era LayerNorm names (gamma/beta), drop buffers that carry no weights. sources, when given, is
    filled with each returned key's name in the checkpoint."""
    prefix = base_prefix + "."
    stripped = ""
    if not any(k in expected for k in state) and any(k.startswith(prefix) for k in state):
        head = sorted(k for k in state if not k.startswith(prefix))
        if head:
            notice_once(f"head-keys:{directory}:{head[0]}", f"the checkpoint{f' in {directory}' if directory else ''} "
                        f"holds a task model; {len(head)} weights outside "
                        f"'{prefix}' (the head: {', '.join(head[:4])}{', ...' if len(head) > 4 else ''}) are not "
                        f"part of the encoder and are not loaded")
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        origin = {k[len(prefix):]: f for k, f in origin.items() if k.startswith(prefix)}
        stripped = prefix
    renamed, renamed_origin = {}, {}
    for key, value in state.items():
        new = key
        if new.endswith(".gamma") and ("LayerNorm" in new or "layer_norm" in new):
            new = new[: -len("gamma")] + "weight"
        elif new.endswith(".beta") and ("LayerNorm" in new or "layer_norm" in new):
            new = new[: -len("beta")] + "bias"
        if new in IGNORED_KEYS:
            continue
        renamed[new] = value
        renamed_origin[new] = origin.get(key, "?")
        if sources is not None:
            sources[new] = stripped + key
    return renamed, renamed_origin


# a key of one encoder layer: "encoder.layer.3.output.dense.weight" (BERT, RoBERTa, ELECTRA), "transformer.layer.3.
# ffn.lin1.weight" (DistilBERT); ALBERT's shared layer has no index (num_hidden_layers changes no weight)
_LAYER_KEY = re.compile(r"^((?:.+\.)?layer\.)(\d+)\.(.+)$")
_LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layers")   # config.json's name for it (DistilBERT: n_layers)


def set_aside_deeper_layers(state: dict, origin: dict, expected: dict, directory: Path | str) -> tuple[dict, dict]:
    """A model configured with fewer layers than its checkpoint holds (from_pretrained(..., num_hidden_layers=6),
    or a config= with fewer) loads the checkpoint's first layers, as transformers does, and sets the deeper ones
    aside with a notice (a distillation student, a pruned encoder). Only for a checkpoint that is itself whole:
    its config.json (where it has one) counts the layers its weights hold, and every deeper key is a key of the
    model's layer 0 at a later index. Anything else stays for check_state_dict to refuse. A model asking for more
    layers than the checkpoint holds is refused here by name: bertfast does not initialise layers at random."""
    def layers_of(keys):
        out = {}
        for key in keys:
            m = _LAYER_KEY.match(key)
            if m:
                out.setdefault(m.group(1), {}).setdefault(int(m.group(2)), set()).add(m.group(3))
        return out

    wanted, held = layers_of(expected), layers_of(state)
    declared = None
    config_file = Path(directory) / "config.json"
    if config_file.is_file():
        fields = _json_object(config_file)
        declared = next((fields[f] for f in _LAYER_COUNT_FIELDS if isinstance(fields.get(f), int)), None)
    drop = set()
    for stem, model_layers in wanted.items():
        n, layer0 = len(model_layers), model_layers.get(0, set())
        ckpt_layers = held.get(stem, {})
        m = len(ckpt_layers)
        if sorted(model_layers) != list(range(n)) or sorted(ckpt_layers) != list(range(m)):
            continue
        # a whole checkpoint of this architecture: every layer holds layer 0's keys, and config.json agrees
        whole = all(ckpt_layers[i] == layer0 for i in range(m)) and (declared is None or declared == m)
        if whole and 0 < m < n:
            raise CheckpointError(f"checkpoint in {directory} holds {m} layer{'s' if m != 1 else ''} and the config "
                                  f"asks for {n} (num_hidden_layers): bertfast does not initialise layers at random; "
                                  f"load at most {m} layers")
        if whole and m > n:
            drop.update(f"{stem}{i}.{rest}" for i in range(n, m) for rest in ckpt_layers[i])
            unused = f"{stem}{n} is" if m == n + 1 else f"{stem}{n}..{m - 1} are"
            notice_once(f"deeper-layers:{directory}:{stem}:{n}",
                        f"the model has {n} layer{'s' if n != 1 else ''} (num_hidden_layers) and the checkpoint in "
                        f"{directory} has {m}: the first {n} load, {unused} not used")
    if not drop:
        return state, origin
    return ({k: v for k, v in state.items() if k not in drop}, {k: v for k, v in origin.items() if k not in drop})


def check_state_dict(state: dict, origin: dict, expected: dict, directory: Path | str) -> None:
    """Strict: the same keys as the model and the same shapes, or an error naming every offender."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(f"{k} (in {origin.get(k, '?')})" for k in unexpected))
    for key in sorted(set(state) & set(expected)):
        if tuple(state[key].shape) != tuple(expected[key]):
            problems.append(f"{origin.get(key, '?')}: key {key} has shape {tuple(state[key].shape)}, the config "
                            f"asks for {tuple(expected[key])}")
    if problems:
        raise CheckpointError(f"checkpoint in {directory} does not match the model: " + "; ".join(problems))
