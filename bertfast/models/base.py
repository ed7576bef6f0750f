"""The family-neutral drop-in encoder: everything transformers' BERT-family base models share.

Each family (bert.py, roberta.py, electra.py, albert.py, distilbert.py) is a subclass that says how to read
its config, how its state-dict keys map onto the common module tree, how it derives position ids, whether it
has a pooler and which output class it returns. The batch is unpadded once (bertfast.padding) and every
layer runs on the real tokens only; ``last_hidden_state`` is padded once at the end, and **its padded rows are
zero** (transformers leaves values computed from pad tokens there; compare real tokens only). The pooler
reads each sequence's first real token (for right-padded batches, every tokenizer's default, that is
transformers' position 0).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import os
import pathlib
import re

import torch
import torch.utils.checkpoint
from torch import nn

from bertfast import loading, ops
from bertfast.models import layers
from bertfast.padding import full_batch, graph_width, token_bucket, unpad_mask, unpad_mask_fixed

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# keyword arguments transformers' task models and Trainer pass to an encoder that change nothing an encoder
# computes (num_items_in_batch: Trainer's loss normalisation; cache_position / use_cache: decoder caching);
# head_mask is refused separately when given
_IGNORED_FORWARD_KWARGS = ("head_mask", "use_cache", "num_items_in_batch", "cache_position")
# transformers' from_pretrained arguments that bertfast takes at their default value (or, for the first three,
# any value: they change nothing bertfast loads - one attention implementation, loading on the meta device, no
# code from a repo; a value other than the default is said once). Other values are an error naming them.
_NO_EFFECT_LOADING_ARGS = {"attn_implementation": None, "low_cpu_mem_usage": None, "trust_remote_code": False}
_DEFAULT_ONLY_LOADING_ARGS = {
    "weights_only": True, "variant": None, "ignore_mismatched_sizes": False, "quantization_config": None,
    "from_tf": False, "from_flax": False, "state_dict": None, "key_mapping": None,
    "max_memory": None, "offload_folder": None, "offload_state_dict": None, "offload_buffers": False,
    "adapter_kwargs": None, "adapter_name": None, "gguf_file": None, "mirror": None, "proxies": None,
    "resume_download": None, "tp_plan": None, "tp_size": None, "device_mesh": None, "use_kernels": False,
    "generation_config": None, "_from_auto": False, "_from_pipeline": None, "_commit_hash": None,
    "_fast_init": True}
# activation checkpointing's default (transformers' checkpoint function, when it set one, is used instead)
_CHECKPOINT = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def _pattern(template: str):
    """'encoder.layer.{i}.attention.self.query.{p}' -> (regex matching such keys, the placeholder names)."""
    groups = re.findall(r"\{(\w+)\}", template)
    regex = re.escape(template)
    for g in groups:
        regex = regex.replace(re.escape("{" + g + "}"), r"(\d+)" if g in ("i", "g", "j") else r"(weight|bias)")
    return re.compile("^" + regex + "$"), groups


def _convert(key: str, mapping) -> str:
    for (src_re, src_groups), dst in mapping:
        m = src_re.match(key)
        if m:
            values = dict(zip(src_groups, m.groups()))
            return dst.format(**values)
    return key


class EncoderModel(nn.Module):
    """transformers' <Family>Model interface on bertfast's kernels. Subclasses set the class attributes and
    ``spec_of(config)``. Build with from_pretrained / from_hf, or ``Model(config)`` for random weights."""

    model_types: tuple = ()
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    has_token_types = True
    positions_count_tokens = False     # default position ids count the non-padding ids (RoBERTa), not 0..S-1
    # (internal key template, family key template) pairs; internal = the BERT-style module tree of layers.py
    key_map: tuple = ()
    embedding_projection: str | None = None     # attribute holding the E -> H projection, if the family has one

    def __init__(self, config, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.check_config(config)
        self.spec = spec = self.spec_of(config)
        self.embeddings = layers.Embeddings(spec)
        self.build_encoder(spec)
        self.pooler = self.build_pooler(spec) if add_pooling_layer else None
        layers.init_weights(self, spec.initializer_range)
        self._graphs = None            # CUDA graphs per input shape, when enabled (enable_cuda_graphs)
        self._graph_watch = None       # the modules _graph_unsafe_modules checks before each replay
        # activation checkpointing per layer in training, transformers' attribute names (its task models'
        # gradient_checkpointing_enable sets them on every module that has them)
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None
        self._checkpoint_every = 1
        # set by bertfast.optimize when the task head reads a fixed position of last_hidden_state (RoBERTa /
        # ELECTRA classification heads and DistilBERT's read position 0; an ELECTRA sequence summary may read the
        # last position or average all): (who reads, position 0 / -1, or None for every position). A batch with
        # padding there would hand the head zero (uncomputed) rows, so it is refused.
        self._padded_position_reader: tuple[str, int | None] | None = None
        # graphs read the weights' storage of their capture: loading weights drops them (as _apply does)
        self.register_load_state_dict_post_hook(_drop_graphs_after_load)
        if self.key_map:
            self._to_family = [(_pattern(a), b) for a, b in self.key_map]
            self._to_internal = [(_pattern(b), a) for a, b in self.key_map]
            self._register_state_dict_hook(EncoderModel._family_keys)
            self._register_load_state_dict_pre_hook(EncoderModel._internal_keys, with_module=True)
            self.register_load_state_dict_post_hook(_family_names_in_report)
            self._load_state = None    # (prefix, error_msgs, renamed keys) of a load in progress

    # ------------------------------------------------------------------------------------ family hooks
    @classmethod
    def spec_of(cls, config) -> layers.EncoderSpec:
        raise NotImplementedError

    def build_encoder(self, spec):
        self.encoder = layers.Encoder(spec)

    def build_pooler(self, spec):
        return layers.Pooler(spec)

    def default_position_ids(self, input_ids, shape, device):
        """Position ids when none are given: 0..S-1 (RoBERTa overrides: offsets from padding_idx)."""
        return torch.arange(shape[1], device=device).expand(shape)

    def max_sequence_length(self) -> int:
        return self.spec.max_positions

    @staticmethod
    def output_class():
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
        return BaseModelOutputWithPoolingAndCrossAttentions

    @classmethod
    def check_config(cls, config) -> None:
        """Raise for a config these kernels cannot serve, naming the field."""
        model_type = getattr(config, "model_type", None)
        if model_type not in cls.model_types:
            raise ValueError(f"config.model_type is {model_type!r}; {cls.__name__} serves "
                             f"{' / '.join(repr(t) for t in cls.model_types)} checkpoints")
        pet = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if pet != "absolute":
            raise ValueError(f"config.position_embedding_type={pet!r} is not supported (only 'absolute')")
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError("config.is_decoder / config.add_cross_attention: bertfast serves encoders only")
        spec = cls.spec_of(config)
        if spec.hidden % spec.heads != 0:
            raise ValueError(f"config: the hidden size {spec.hidden} (hidden_size / dim) is not a multiple of the "
                             f"number of attention heads {spec.heads} (num_attention_heads / n_heads)")

    # ----------------------------------------------------------------------------- state-dict key names
    @staticmethod
    def _family_keys(module, state_dict, prefix, local_metadata):
        for key in list(state_dict):
            if key.startswith(prefix):
                new = prefix + _convert(key[len(prefix):], module._to_family)
                if new != key:
                    state_dict[new] = state_dict.pop(key)
        return state_dict

    @staticmethod
    def _internal_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
        renamed = {}
        for key in list(state_dict):
            if key.startswith(prefix):
                rest = key[len(prefix):]
                new = _convert(rest, module._to_internal)
                if new != rest:
                    state_dict[prefix + new] = state_dict.pop(key)
                    renamed[prefix + new] = key
                elif _convert(rest, module._to_family) != rest:
                    # bertfast's internal name of a key this family names otherwise: not a key of state_dict(),
                    # so unexpected (as in transformers), not loaded under a name the model does not have
                    unexpected_keys.append(key)
                    state_dict.pop(key)
        module._load_state = (prefix, error_msgs, renamed)   # for _family_names_in_report

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_id, torch_dtype: torch.dtype | str | None = None, device=None,
                        add_pooling_layer: bool | None = None, dtype: torch.dtype | str | None = None,
                        config=None, use_safetensors: bool | None = None, device_map=None, **kwargs):
        """Load config.json + model.safetensors (or a pickle checkpoint, weights_only=True) from a directory or a
        hub id. Strict: keys and shapes must equal the model's, or a CheckpointError names file and key.
        dtype (transformers 5's name) and torch_dtype are one argument; when neither is given, transformers'
        default ("auto" from transformers 5 on, float32 before); "auto": the config's dtype, else the checkpoint
        weights'. add_pooling_layer None (default): a pooler where the checkpoint has its weights (MLM and
        RoBERTa classifier checkpoints have none: pooler_output is then None, where transformers initialises a
        random pooler); True: the checkpoint must hold it; False: none, its weights set aside.

        As in transformers: config (a config object, copied, or a directory / id to read one from) replaces the
        checkpoint's; other keyword arguments that are config fields (hidden_dropout_prob=0.2,
        output_hidden_states=True, ...) override the config's; revision, subfolder, cache_dir, token,
        local_files_only and force_download go to the hub download (of config= too); use_safetensors True / False
        loads only safetensors / only pickle weights; device_map names one device ("auto", "balanced",
        "sequential": the GPU when there is one) - bertfast places the whole model on one device. Transformers'
        other loading arguments are accepted at their default (e.g. variant=None, weights_only=True); other values
        are an error naming them, and so is any argument transformers does not know.

        output_loading_info=True returns (model, info) as transformers does, info holding sets missing_keys,
        unexpected_keys (the checkpoint's keys, by their names there, that bertfast set aside: a task head's,
        layers past num_hidden_layers, a pooler under add_pooling_layer=False), mismatched_keys and a list
        error_msgs; loading is strict, so missing_keys, mismatched_keys and error_msgs are always empty (a
        missing or misshapen key is an error)."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        if dtype is not None and torch_dtype is not None and _dtype_spelling(dtype) != _dtype_spelling(torch_dtype):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one of them")
        torch_dtype = dtype if dtype is not None else torch_dtype
        device = _device_of_map(device, device_map)
        hub = {k: kwargs.pop(k) for k in (*loading.HUB_ARGS, "subfolder") if k in kwargs}
        _take_transformers_loading_args(kwargs)
        directory = loading.resolve(path_or_id, use_safetensors=use_safetensors, **hub)
        if config is None or isinstance(config, (str, os.PathLike)):
            source = directory if config is None else loading.resolve(config, config_only=True, **hub)
            config, unused = loading.read_config(source, cls.model_types[0] if cls.model_types else None, **kwargs)
        else:
            config = copy.deepcopy(config)   # as transformers: the model's config is its own
            unused = kwargs   # transformers hands these to the model's __init__, which takes none of them
        if unused:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected arguments {', '.join(sorted(unused))}: "
                            f"neither fields of {type(config).__name__} nor loading options of transformers")
        info = {}
        model = cls._from_state(config, *loading.read_state_dict(directory, use_safetensors), directory, torch_dtype,
                                device, add_pooling_layer, info)
        return (model, info) if output_loading_info else model

    @classmethod
    def _from_state(cls, config, state, origin, directory, torch_dtype, device, add_pooling_layer, info=None):
        """info, when given, is filled with transformers' loading info (see from_pretrained)."""
        dtype = _dtype_arg(torch_dtype, state, config)
        with torch.device("meta"):
            model = cls(config, add_pooling_layer=add_pooling_layer is not False)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        in_checkpoint, sources = set(state), {}
        state, origin = loading.normalise_keys(state, origin, set(expected), cls.base_model_prefix, directory,
                                               sources)
        # what normalise_keys dropped, less the buffers that carry no weights: a task checkpoint's head
        head_keys = {k for k in in_checkpoint - set(sources.values()) if not k.endswith(loading.IGNORED_KEYS)}
        state, origin = loading.set_aside_deeper_layers(state, origin, expected, directory)
        pooler_keys = {k for k in expected if k.startswith("pooler.")}
        if add_pooling_layer is None and pooler_keys and not pooler_keys & set(state):
            ops.notice_once(f"no-pooler:{cls.__name__}", f"the checkpoint in {directory} has no pooler weights "
                            "(an MLM or RoBERTa-classifier checkpoint): pooler_output is None (transformers would "
                            "initialise a random pooler); add_pooling_layer=True makes this an error")
            with torch.device("meta"):
                model = cls(config, add_pooling_layer=False)
            expected = {k: v for k, v in expected.items() if k not in pooler_keys}
        elif add_pooling_layer is False:
            state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        elif add_pooling_layer and pooler_keys - set(state):
            raise loading.CheckpointError(f"checkpoint in {directory} has no pooler weights "
                                          f"({', '.join(sorted(pooler_keys - set(state)))}) but add_pooling_layer="
                                          "True asks for a pooler; pass add_pooling_layer=False (or None)")
        loading.check_state_dict(state, origin, expected, directory)
        if info is not None:
            info.update(missing_keys=set(), mismatched_keys=set(), error_msgs=[],
                        unexpected_keys=head_keys | {sources[k] for k in sources.keys() - state.keys()})
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        model.eval()
        return model.to(device) if device is not None else model

    @classmethod
    def from_hf(cls, hf_model: nn.Module):
        """A bertfast model with a copy of a loaded transformers model's encoder weights, dtype and device
        (a task model's encoder is used; see bertfast.optimize to swap it in place instead)."""
        base = hf_encoder_of(hf_model)
        config = copy.deepcopy(base.config)
        param = next(base.parameters())
        with torch.device("meta"):
            model = cls(config, add_pooling_layer=_hf_has_pooler(base))
        state = {k: v for k, v in base.state_dict().items() if k not in loading.IGNORED_KEYS}
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        loading.check_state_dict(state, {k: "the transformers model" for k in state}, expected,
                                 type(hf_model).__name__)
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        model.train(base.training)
        return model.to(device=param.device, dtype=param.dtype)

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                **kwargs):
        cfg = self.config
        unsupported = {k: v for k, v in kwargs.items() if v is not None and k not in _IGNORED_FORWARD_KWARGS}
        if unsupported:
            raise TypeError(f"{type(self).__name__}.forward got unsupported arguments: {', '.join(unsupported)}")
        if kwargs.get("head_mask") is not None:
            raise ValueError("head_mask is not supported by bertfast")
        output_hidden_states = bool(getattr(cfg, "output_hidden_states", False) if output_hidden_states is None
                                    else output_hidden_states)
        output_attentions = bool(getattr(cfg, "output_attentions", False) if output_attentions is None
                                 else output_attentions)
        return_dict = getattr(cfg, "return_dict", True) if return_dict is None else return_dict

        if _exporting():
            _refuse_export(type(self).__name__)
        positions_given = position_ids is not None
        input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds = self._check_inputs(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        batch, seqlen = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = self.embeddings.word_embeddings.weight.device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # CUDA graph capture: nothing may be read on the host. Unpadding reads the mask, so only unpadded
            # batches can be captured; the id range checks (a host read) are skipped while capturing.
            if attention_mask is not None:
                raise ValueError("attention_mask cannot be given while a CUDA graph is being captured: unpadding "
                                 "reads the mask on the host; capture batches without padding, or let "
                                 "model.enable_cuda_graphs() capture padded batches")
            max_seqlen, unpadded, total = seqlen, True, batch * seqlen
        else:
            max_seqlen, unpadded, total = self._check_ranges(input_ids, attention_mask, token_type_ids,
                                                             position_ids, batch, seqlen, positions_given)
        if output_attentions:
            ops.notice_once("output_attentions", "output_attentions=True runs a padded attention path that "
                            "materialises the probabilities; it is slower than the default path")
        if self._graphs is not None and self._graph_eligible(device, inputs_embeds, total, batch, unpadded,
                                                             output_hidden_states or output_attentions):
            last, pooled = self._graph_forward(input_ids, None if unpadded else attention_mask, token_type_ids,
                                               position_ids, total, capture=self._graph_capture)
            return self._outputs(last, pooled, None, None, return_dict)
        unp = unpad_mask(attention_mask, max_seqlen) if attention_mask is not None and not unpadded else \
            full_batch(batch, seqlen, device)

        last, pooled, all_hidden, all_attn = self._encode(input_ids, token_type_ids, position_ids, inputs_embeds,
                                                          unp, output_hidden_states, output_attentions)
        return self._outputs(last, pooled, all_hidden, all_attn, return_dict)

    def _outputs(self, last, pooled, all_hidden, all_attn, return_dict):
        fields = dict(last_hidden_state=last, hidden_states=all_hidden, attentions=all_attn)
        if self.has_pooler_output():
            fields["pooler_output"] = pooled
        # transformers' encoders whose output class has cross_attentions return an empty tuple there whenever
        # attentions are asked for (also at the end of the return_dict=False tuple)
        cross = () if all_attn is not None and "cross_attentions" in self._output_fields() else None
        if cross is not None:
            fields["cross_attentions"] = cross
        if not return_dict:
            return tuple(v for v in (last, pooled, all_hidden, all_attn, cross) if v is not None)
        return self.output_class()(**fields)

    @classmethod
    @functools.lru_cache(maxsize=None)
    def _output_fields(cls) -> frozenset:
        return frozenset(f.name for f in dataclasses.fields(cls.output_class()))

    # ----------------------------------------------------------------------------------------- CUDA graphs
    def enable_cuda_graphs(self, enabled: bool = True, max_graphs: int = 16):
        """Replay captured CUDA graphs for inference: the whole forward becomes one graph launch, which removes
        the per-kernel launch cost that dominates eager batches on a GPU.

        Padded batches run padding-free in the graph too. Their graph is captured for a batch size and a packed
        length (bertfast.padding.token_bucket: the real tokens rounded up, by under a quarter from 64 tokens on),
        not for a sequence length: the batch is placed in buffers as long as the model's positions (at most 512
        or the next power of two of the padded length, bertfast.padding.graph_width), the graph
        unpads the mask on the device, fills the packed rows past the real tokens with padding positions and
        clears their outputs. So one graph serves every batch of B sequences whose real tokens round to the same
        packed length, whatever they were padded to. Unpadded batches (no mask, or all ones) get a graph per
        (batch, seq_len). Graphs are captured on first use (two warm-up forwards and a capture), at most
        max_graphs kept, the least recently used dropped first; outputs are copied out of the graph's buffers.
        Training, gradients, inputs_embeds, output_hidden_states / output_attentions, batches with no real token,
        encoders with hooks, padded batches of 65,535 sequences or more, and models whose attention does not run
        the Triton kernel run eagerly (the last three said once). A module swapped in after a capture (an adapter)
        drops the graphs, which are captured again. A graph is kept per
        autocast dtype, BERTFAST_BACKEND and BERTFAST_LINEAR_EPILOGUE as well. Graphs read
        the weights' storage and the other kernel choices (TF32) of their capture: moving or casting the model
        (.to, .half, ...) and load_state_dict drop them, to be captured again; in-place edits of the weights are
        seen. Calls from several threads or streams at once share the graphs' buffers: serialise them. Returns
        self."""
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self._graphs = collections.OrderedDict() if enabled else None
        self._graph_watch = None
        self._max_graphs = max_graphs
        self._graph_pool = None
        self._graph_capture = True     # False (tests): run the graphs' functions uncaptured
        return self

    def __getstate__(self):
        # captured graphs (and their replay closures) do not pickle and are bound to this process's memory: a
        # pickled or deep-copied model captures its own again
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        if state.get("_graphs"):
            state["_graphs"] = collections.OrderedDict()
            state["_graph_pool"] = None
        state["_graph_watch"] = None
        return state

    def _drop_graphs(self) -> None:
        """Forget the captured graphs (they are captured again on use)."""
        if getattr(self, "_graphs", None):
            self._graphs.clear()
            self._graph_pool = None
        self._graph_watch = None

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() move or recast the weights into new storage, which captured graphs never read
        out = super()._apply(fn, *args, **kwargs)
        self._drop_graphs()
        return out

    def _graph_eligible(self, device, inputs_embeds, total: int, batch: int, unpadded: bool,
                        extra_outputs: bool) -> bool:
        """Whether this forward replays a graph (enable_cuda_graphs says which forwards do)."""
        if device.type != "cuda":
            ops.notice_once(f"graphs:{device.type}", f"enable_cuda_graphs: the model is on the {device.type.upper()}: "
                            "forwards run eagerly (CUDA graphs replay on a CUDA device only)")
            return False
        if (inputs_embeds is not None or total == 0 or extra_outputs or self.training
                or torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing()):
            return False
        if self._graph_unsafe_modules():
            ops.notice_once("graphs:hooks", "enable_cuda_graphs: forwards run eagerly while modules of the encoder "
                            "have hooks: a replay would not run them")
            return False
        spec = self.spec
        impl = ops.choose("varlen_attention", device, dtype=self.dtype, head_dim=spec.hidden // spec.heads)
        if impl != "triton":
            ops.notice_once(f"graphs:{impl}", f"enable_cuda_graphs: forwards run eagerly: varlen_attention runs "
                            f"the {impl} implementation here, which reads the device on the host; only the Triton "
                            "attention can be captured")
            return False
        from bertfast.kernels.attention import MAX_GRID_YZ
        if not unpadded and batch + 1 > MAX_GRID_YZ:    # the graph's attention takes one sequence of fillers more
            ops.notice_once("graphs:batch", f"enable_cuda_graphs: padded batches of more than {MAX_GRID_YZ - 1} "
                            "sequences run eagerly")
            return False
        return True

    def _graph_unsafe_modules(self) -> bool:
        """Whether any module of the encoder has hooks (its own or global ones): Python that a replay would skip.
        Walks a list of the modules made once; the linear layers' slots in their parents are checked first, so that
        a module swapped in later (e.g. a LoRA adapter) is seen: the graphs of the old modules are then dropped and
        captured again with the new ones."""
        if layers.has_global_hooks():
            return True
        watch = self._graph_watch
        if watch is None or any(slots.get(name) is not child for slots, name, child in watch[1]):
            if watch is not None:
                self._drop_graphs()
            linears = tuple((parent._modules, name, child) for parent in self.modules()
                            for name, child in parent._modules.items() if isinstance(child, nn.Linear)
                            or layers.is_adapter(child))
            watch = self._graph_watch = (tuple(m for m in self.modules() if m is not self), linears)
        return any(layers.has_local_hooks(m) for m in watch[0])

    def _graph_forward(self, input_ids, attention_mask, token_type_ids, position_ids, total: int,
                       capture: bool = True):
        """The graphed forward of an inference batch with `total` real tokens (attention_mask None: unpadded).
        capture=False runs the same static-buffer function without capturing it (how the CPU tests check this
        path's unpadding, filler tokens and buffer reuse). Runs outside inference mode (under no_grad), so that
        graphs captured in one mode serve calls in the other."""
        with torch.inference_mode(False), torch.no_grad():
            batch, seqlen = input_ids.shape
            if attention_mask is None:
                width, packed = seqlen, batch * seqlen
            else:
                width = graph_width(seqlen, self.max_sequence_length())
                packed = token_bucket(total, batch, width)
            # autocast changes the dtypes inside the graph, and the settings the kernels it holds: a graph serves
            # only calls under the autocast dtype and BERTFAST_BACKEND / BERTFAST_LINEAR_EPILOGUE of its capture
            key = (batch, width, packed, attention_mask is not None, token_type_ids is not None,
                   ops.autocast_dtype(input_ids.device), ops.backend_setting(), ops.linear_epilogue_setting())
            entry = self._graphs.get(key)
            if entry is None:
                if len(self._graphs) >= self._max_graphs:
                    self._graphs.popitem(last=False)
                entry = self._capture(input_ids, attention_mask, token_type_ids, position_ids, width, packed,
                                      capture)
                self._graphs[key] = entry
            else:
                self._graphs.move_to_end(key)
            replay, static, (last, pooled) = entry
            # every input is copied in on every call; columns past seqlen keep valid ids and no real token
            static["input_ids"][:, :seqlen].copy_(input_ids)
            static["position_ids"][:, :seqlen].copy_(position_ids)
            if token_type_ids is not None:
                static["token_type_ids"][:, :seqlen].copy_(token_type_ids)
            if attention_mask is not None:
                static["real"][:, seqlen:].fill_(False)
                static["real"][:, :seqlen].copy_(attention_mask != 0)
            replay()
            # copied out of the graph's buffers; padding positions that filler tokens were scattered onto cleared
            if attention_mask is None:
                last = last.clone()
            else:
                last = torch.where(static["real"][:, :seqlen, None], last[:, :seqlen], last.new_zeros(()))
            return last, (pooled.clone() if pooled is not None else None)

    def _capture(self, input_ids, attention_mask, token_type_ids, position_ids, width: int, packed: int,
                 capture: bool):
        """(replay function, static input buffers [batch, width], static outputs) of one graph."""
        batch, seqlen = input_ids.shape
        device = input_ids.device

        def buffer(t, dtype=torch.long):      # zeros past seqlen: a valid id, position and token type
            out = torch.zeros((batch, width), dtype=dtype, device=device)
            out[:, :seqlen].copy_(t)
            return out
        static = {"input_ids": buffer(input_ids), "position_ids": buffer(position_ids),
                  "token_type_ids": buffer(token_type_ids) if token_type_ids is not None else None,
                  "real": buffer(attention_mask != 0, torch.bool) if attention_mask is not None else None}

        amp = ops.autocast_dtype(device)

        def run():
            unp = (full_batch(batch, width, device) if static["real"] is None
                   else unpad_mask_fixed(static["real"], packed))
            # under autocast, without its cast cache: a graph must not read the cached casts of the weights, which
            # are freed when the caller's autocast region ends (torch's make_graphed_callables refuses the cache)
            with (torch.autocast(device.type, dtype=amp, cache_enabled=False) if amp is not None
                  else contextlib.nullcontext()):
                return self._encode(static["input_ids"], static["token_type_ids"], static["position_ids"], None,
                                    unp)[:2]
        if not capture:
            outputs = run()

            def replay():
                last, pooled = run()
                outputs[0].copy_(last)
                if pooled is not None:
                    outputs[1].copy_(pooled)
            return replay, static, outputs
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):        # warm-up: Triton compiles and cuBLAS workspaces outside the capture
                run()
        torch.cuda.current_stream(device).wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            outputs = run()
        return graph.replay, static, outputs

    def _encode(self, input_ids, token_type_ids, position_ids, inputs_embeds, unp,
                output_hidden_states=False, output_attentions=False):
        """Embeddings -> layers on the packed tokens -> (padded last_hidden_state, pooled output, padded hidden
        states or None, attention probabilities or None)."""
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, unp)
        if self.embedding_projection is not None:
            x = self.get_submodule(self.embedding_projection)(x)
        # output_hidden_states under autograd: each state is padded as it is made and the next layer (the pooler
        # after the last) reads its rows back from the padded tensor, so that the returned states are on the
        # gradient path as transformers' are (torch.autograd.grad of a later output with respect to them,
        # retain_grad); otherwise the layers read the packed rows and the states are padded at the end
        reroute = output_hidden_states and torch.is_grad_enabled()
        hidden_states = [x] if output_hidden_states else None
        if reroute:
            hidden_states[0], x = self._padded_and_read_back(x, unp)
        attentions = [] if output_attentions else None
        checkpoint = self._layer_checkpoint() if self.training and torch.is_grad_enabled() else None
        for depth, layer in enumerate(self.encoder.schedule()):
            if checkpoint is not None and depth % self._checkpoint_every == 0:
                # the layer's dropout seeds come from torch's CPU generator, whose state checkpoint restores for
                # the recomputation: the same masks both times
                x, probs = checkpoint(layer.__call__, x, unp, output_attentions)
            else:
                x, probs = layer(x, unp, output_attentions)
            if reroute:
                padded, x = self._padded_and_read_back(x, unp)
                hidden_states.append(padded)
            elif output_hidden_states:
                hidden_states.append(x)
            if output_attentions:
                attentions.append(probs)
        if reroute:
            last, all_hidden = hidden_states[-1], tuple(hidden_states)
        else:
            last = ops.pad(x, unp.indices, unp.batch, unp.seqlen, validate=False)
            all_hidden = tuple(last if h is x else ops.pad(h, unp.indices, unp.batch, unp.seqlen, validate=False)
                               for h in hidden_states) if output_hidden_states else None
        pooled = self.pooler(x, unp) if self.pooler is not None else None
        return last, pooled, all_hidden, tuple(attentions) if output_attentions else None

    @staticmethod
    def _padded_and_read_back(x: torch.Tensor, unp) -> tuple[torch.Tensor, torch.Tensor]:
        padded = ops.pad(x, unp.indices, unp.batch, unp.seqlen, validate=False)
        return padded, ops.unpad(padded.flatten(0, 1), unp.indices, validate=False)

    def has_pooler_output(self) -> bool:
        return True

    # ---------------------------------------------------------------------------- activation checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute layers' activations in the backward instead of keeping them (training memory), as
        transformers' method of the same name: every every_n_layers-th layer of the schedule from the first;
        kwargs go to torch.utils.checkpoint.checkpoint (default use_reentrant=False). offload=True (activations
        moved to host memory) is not supported."""
        if offload:
            raise ValueError("bertfast encoders do not support offload=True for activation checkpointing")
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be an int >= 1, got {every_n_layers!r}")
        self._gradient_checkpointing_func = functools.partial(_CHECKPOINT, **(gradient_checkpointing_kwargs or {}))
        self._checkpoint_every = every_n_layers
        self.gradient_checkpointing = True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers 5's name for gradient_checkpointing_enable."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.gradient_checkpointing)

    is_activation_checkpointing = is_gradient_checkpointing

    def _layer_checkpoint(self):
        if not self.gradient_checkpointing:
            return None
        return self._gradient_checkpointing_func or _CHECKPOINT

    # ---------------------------------------------------------------------------------------- validation
    def _check_inputs(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds):
        spec = self.spec
        device = self.embeddings.word_embeddings.weight.device
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds "
                             f"(got {'both' if input_ids is not None else 'neither'})")
        if input_ids is not None:
            input_ids = _int_tensor("input_ids", input_ids, device)
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
            shape = tuple(input_ids.shape)
        else:
            e = spec.embedding_size
            if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
                raise ValueError(f"inputs_embeds must be a floating-point tensor [batch, seq_len, {e}]")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != e:
                raise ValueError(f"inputs_embeds must have shape [batch, seq_len, {e}], got "
                                 f"{tuple(inputs_embeds.shape)}")
            inputs_embeds = inputs_embeds.to(device=device, dtype=self.embeddings.word_embeddings.weight.dtype)
            shape = tuple(inputs_embeds.shape[:2])
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                attention_mask = torch.as_tensor(attention_mask)
            if attention_mask.dim() in (3, 4):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}: 3-D / 4-D (extended or "
                                 f"per-pair) masks are not supported; bertfast runs padding-free from a "
                                 f"[batch, seq_len] padding mask (1 = token, 0 = padding), here {shape}")
            if tuple(attention_mask.shape) != shape:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids / "
                                 f"inputs_embeds have [batch, seq_len] = {shape}; they must match")
            attention_mask = attention_mask.to(device)
        if token_type_ids is not None:
            if not self.has_token_types:
                raise ValueError(f"token_type_ids: {type(self).__name__} has no token type embeddings (transformers' "
                                 f"model ignores them); leave them out, e.g. tokenizer(..., "
                                 f"return_token_type_ids=False)")
            token_type_ids = _rows_of_batch("token_type_ids", _int_tensor("token_type_ids", token_type_ids, device),
                                            shape)
        if position_ids is not None:
            position_ids = _rows_of_batch("position_ids", _int_tensor("position_ids", position_ids, device), shape)
        else:
            # RoBERTa counts positions over the non-padding ids: a batch padded past the positions is fine as long
            # as its sequences fit (_check_ranges checks the counted positions)
            if shape[1] > self.max_sequence_length() and not (input_ids is not None and self.positions_count_tokens):
                raise ValueError(f"sequence length {shape[1]} of input_ids / inputs_embeds is longer than the "
                                 f"model's positions allow ({self.max_sequence_length()}, from "
                                 f"config.max_position_embeddings)")
            position_ids = self.default_position_ids(input_ids, shape, device)
        return input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds

    def _check_ranges(self, input_ids, attention_mask, token_type_ids, position_ids, batch,
                      seqlen, positions_given: bool = True) -> tuple[int, bool, int]:
        """Range checks of every id, the batch's longest sequence, whether it has any padding and its number of
        real tokens, in one host read. -> (max_seqlen, unpadded, total)"""
        spec = self.spec
        stats = []
        if attention_mask is not None:
            lengths = (attention_mask != 0).sum(dim=1)
            zero = torch.zeros((), device=attention_mask.device, dtype=torch.long)
            stats += [lengths.max(), lengths.min(), lengths.sum()] if attention_mask.shape[0] else [zero] * 3
            if self._padded_position_reader is not None:
                # rows whose position read by the head is padding
                position = self._padded_position_reader[1]
                if not seqlen and position is not None:
                    raise ValueError(f"input_ids / inputs_embeds have no positions (seq_len 0), and "
                                     f"{self._padded_position_reader[0]} reads position {position}")
                padded = (lengths < seqlen) if position is None else (attention_mask[:, position] == 0)
                stats.append(padded.sum() if attention_mask.shape[0] and seqlen else zero)
            if self.pooler is not None:
                # rows padded at position 0 that hold a real token: the pooler reads another token than
                # transformers' (said, not refused: both are computed states)
                left = ((attention_mask[:, 0] == 0) & (lengths > 0)).sum() if attention_mask.shape[0] and seqlen \
                    else zero
                stats.append(left)
        for t in (input_ids, token_type_ids, position_ids):
            if t is not None and t.numel():
                stats += [t.min(), t.max()]
        values = _read_on_host(torch.stack([s.long() for s in stats])) if stats else []
        max_seqlen, unpadded, total = seqlen, True, batch * seqlen
        if attention_mask is not None:
            max_seqlen, min_seqlen, total = int(values.pop(0)), int(values.pop(0)), int(values.pop(0))
            unpadded = min_seqlen == seqlen
            if self._padded_position_reader is not None:
                padded = int(values.pop(0))
                if padded:
                    reader, position = self._padded_position_reader
                    where = {0: "position 0 (left padding)", -1: "their last position (right padding)",
                             None: "some positions"}[position]
                    fix = {0: "pad on the right (tokenizer.padding_side = 'right')",
                           -1: "pad on the left (tokenizer.padding_side = 'left')", None: "pass unpadded batches"}
                    raise ValueError(
                        f"attention_mask: {padded} row(s) hold padding at {where}, which {reader} reads; bertfast "
                        f"computes nothing for padded positions (their rows of last_hidden_state are zero, where "
                        f"transformers hands the head the pad tokens' hidden states): {fix[position]}")
            if self.pooler is not None and int(values.pop(0)):
                ops.notice_once("pooler:left-padding", "attention_mask: a left-padded batch: pooler_output reads each "
                                "sequence's first real token, where transformers' pooler reads position 0 (a pad "
                                "token's state there), so pooled outputs (and the sequence-classification and "
                                "multiple-choice logits computed from them) differ from transformers' for these rows; "
                                "right padding, the BERT tokenizers' default, gives the same")
        emb = self.embeddings
        for name, t, limit, what, table in (
                ("input_ids", input_ids, spec.vocab, "config.vocab_size", "word_embeddings"),
                ("token_type_ids", token_type_ids, spec.type_vocab, "config.type_vocab_size", "token_type_embeddings"),
                ("position_ids", position_ids, spec.max_positions, "config.max_position_embeddings",
                 "position_embeddings")):
            if t is None or not t.numel():
                continue
            lo, hi = values.pop(0), values.pop(0)
            rows = getattr(emb, table).weight.shape[0]
            if rows < limit:
                # a table swapped in by assignment rather than set_input_embeddings: the kernels gather from it
                # unchecked on CUDA, so its own size bounds the ids
                limit, what = rows, f"the rows of embeddings.{table}.weight"
            if lo < 0 or hi >= limit:
                if name == "position_ids" and not positions_given:   # RoBERTa's, counted from the real tokens
                    raise ValueError(f"input_ids hold a sequence of {hi - self.spec.pad_token_id} tokens (not counting "
                                     f"padding), longer than the model's positions allow "
                                     f"({self.max_sequence_length()}, from config.max_position_embeddings)")
                raise ValueError(f"{name} holds values in [{lo}, {hi}], outside [0, {limit}) ({what})")
        return max_seqlen, unpadded, total

    # -------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory, safe_serialization: bool = True, state_dict: dict | None = None,
                        **kwargs) -> None:
        """Write config.json and model.safetensors (pytorch_model.bin with safe_serialization=False) in the
        family's transformers key names: transformers' <Family>Model.from_pretrained and bertfast both load the
        folder (sentence-transformers' save calls this after bertfast.optimize). Arguments of transformers'
        save_pretrained that this does not do (push_to_hub, sharding, ...) are refused."""
        if kwargs:
            raise TypeError(f"{type(self).__name__}.save_pretrained does not support {', '.join(sorted(kwargs))}")
        directory = pathlib.Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        for pattern in loading.SAFETENSORS_PATTERNS + loading.PICKLE_PATTERNS:
            for old in directory.glob(pattern):    # an older save's weights would be read instead of these
                old.unlink()
        config = copy.deepcopy(self.config)
        config.architectures = [type(self).__name__]     # the transformers base-model class of the same name
        config.dtype = self.dtype
        config.save_pretrained(str(directory))
        state = self.state_dict() if state_dict is None else state_dict
        # one tensor per key (Q / K / V are views of the packed parameter: safetensors refuses shared storage)
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        if safe_serialization:
            from safetensors.torch import save_file
            save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(state, directory / "pytorch_model.bin")

    # --------------------------------------------------------------------------------------- conveniences
    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    # transformers' PreTrainedModel conveniences that code written for its base models calls
    main_input_name = "input_ids"

    def get_output_embeddings(self):
        """None: an encoder has no language-model head (as transformers' base models)."""
        return None

    def tie_weights(self, *args, **kwargs) -> None:
        """Nothing to tie: an encoder has no output embeddings (task models tie their head's decoder)."""

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the model, as transformers counts them (each shared parameter once)."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if (p.requires_grad or not only_trainable) and not (exclude_embeddings and id(p) in embeddings))

    def enable_input_require_grads(self) -> None:
        """The word embeddings' output requires grad (adapters on a frozen model with gradient checkpointing), as
        transformers' method does: a forward hook, which runs the unfused embedding path."""
        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(_output_requires_grad)

    def disable_input_require_grads(self) -> None:
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """transformers' resize_token_embeddings for a base model: the word embeddings get new_num_tokens rows
        (rounded up to a multiple of pad_to_multiple_of), the old rows kept, rows past them dropped; added rows
        drawn around the old rows' mean (mean_resizing: a normal with the old rows' mean and 1e-9 times their
        covariance, the mean itself where that is not positive definite) or from normal(0, initializer_range).
        The Parameter object stays (an optimizer holding it sees the new rows); config.vocab_size and the id range
        check follow. Returns the embeddings; both arguments None returns them unchanged."""
        old = self.get_input_embeddings()
        if pad_to_multiple_of is not None:
            if (isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int)
                    or pad_to_multiple_of < 1):
                raise ValueError(f"pad_to_multiple_of must be an int >= 1, got {pad_to_multiple_of!r}")
            rows = old.num_embeddings if new_num_tokens is None else new_num_tokens
            new_num_tokens = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens is None:
            return old
        if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be an int >= 1, got {new_num_tokens!r}")
        weight, n_old = old.weight.data, old.num_embeddings
        if new_num_tokens != n_old:
            new = weight.new_empty((new_num_tokens, weight.shape[1]))
            kept = min(n_old, new_num_tokens)
            new[:kept] = weight[:kept]
            if new_num_tokens > n_old and mean_resizing:
                new[n_old:] = _rows_around_the_mean(weight, new_num_tokens - n_old)
            elif new_num_tokens > n_old:
                new[n_old:].normal_(0.0, self.spec.initializer_range)
            old.weight.data = new
            old.num_embeddings = new_num_tokens
            if old.padding_idx is not None and old.padding_idx >= new_num_tokens:
                old.padding_idx = None
        self.set_input_embeddings(old)
        self.config.vocab_size = new_num_tokens
        return old

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the word embeddings (transformers' resize_token_embeddings calls this); the id range checks
        follow the new vocabulary size."""
        if not isinstance(value, nn.Embedding) or value.embedding_dim != self.spec.embedding_size:
            raise ValueError(f"set_input_embeddings takes an nn.Embedding of dimension {self.spec.embedding_size}, "
                             f"got {value!r}")
        self.embeddings.word_embeddings = value
        self.spec = dataclasses.replace(self.spec, vocab=value.num_embeddings)
        self._drop_graphs()


def _output_requires_grad(module, args, output):
    output.requires_grad_(True)


def _rows_around_the_mean(weight: torch.Tensor, count: int) -> torch.Tensor:
    """resize_token_embeddings' new rows under mean_resizing: a normal with the old rows' mean and 1e-9 times their
    covariance (the mean itself where that is not positive definite)."""
    old = weight.float()
    mean = old.mean(dim=0)
    centred = old - mean
    covariance = 1e-9 * (centred.T @ centred) / old.shape[0]
    if bool(torch.distributions.constraints.positive_definite.check(covariance)):
        rows = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance).sample((count,))
    else:
        rows = mean.expand(count, -1)
    return rows.to(weight.dtype)


def _family_names_in_report(module, incompatible_keys) -> None:
    """load_state_dict post-hook of families with their own key names: what the load reports under the names the
    caller used and state_dict() shows, not those of the internal modules the keys were loaded into. Missing keys
    (the model's own parameters) under the family's names; unexpected keys and size mismatches under the name
    given."""
    prefix, errors, renamed = module._load_state
    module._load_state = None
    missing = incompatible_keys.missing_keys
    missing[:] = [prefix + _convert(k[len(prefix):], module._to_family) if k.startswith(prefix) else k
                  for k in missing]
    incompatible_keys.unexpected_keys[:] = [renamed.get(k, k) for k in incompatible_keys.unexpected_keys]
    for i, msg in enumerate(errors):   # torch's messages naming a key (and SelfAttention's, worded as torch's)
        m = re.match(r'(size mismatch for |While copying the parameter named ")([^\s"]+?)(: |")', msg)
        if m:
            errors[i] = m.group(1) + renamed.get(m.group(2), m.group(2)) + msg[m.end(2):]


def _drop_graphs_after_load(module, incompatible_keys) -> None:
    """load_state_dict post-hook (a module-level function: models must pickle)."""
    module._drop_graphs()


def hf_base_model(hf_model: nn.Module) -> nn.Module:
    """The base encoder of a transformers model (itself for a base model, e.g. model.bert for BertFor...)."""
    prefix = getattr(hf_model, "base_model_prefix", "")
    inner = getattr(hf_model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else hf_model


def hf_encoder_of(hf_model) -> nn.Module:
    """hf_base_model for from_hf, which takes a loaded transformers model (or a bertfast-optimised one) only."""
    from transformers import PreTrainedModel
    base = hf_base_model(hf_model) if isinstance(hf_model, nn.Module) else hf_model
    if not isinstance(base, (PreTrainedModel, EncoderModel)):
        hint = " (pass model[0].auto_model, or bertfast.optimize(model) to swap its encoder in place)" \
            if type(hf_model).__name__ in ("SentenceTransformer", "CrossEncoder") else ""
        raise TypeError(f"from_hf takes a loaded transformers model (a PreTrainedModel with a config), got "
                        f"{type(hf_model).__name__}{hint}")
    return base


def _hf_has_pooler(base: nn.Module) -> bool:
    return getattr(base, "pooler", None) is not None


def _rows_of_batch(name: str, t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """t of shape [batch, seq_len], or one row for every sequence ([1, seq_len] or [seq_len], broadcast as
    transformers' embeddings do), as [batch, seq_len]."""
    rows = t.unsqueeze(0) if t.dim() == 1 else t
    if rows.dim() != 2 or rows.shape[1] != shape[1] or rows.shape[0] not in (1, shape[0]):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}, (1, {shape[1]}) or ({shape[1]},)")
    return rows.expand(shape)


def _int_tensor(name: str, value, device) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.to(device=device, dtype=torch.long)


def _take_transformers_loading_args(kwargs: dict) -> None:
    """Remove from kwargs transformers' loading arguments that bertfast honours by ignoring them (see
    _NO_EFFECT_LOADING_ARGS / _DEFAULT_ONLY_LOADING_ARGS); raise for one it cannot honour."""
    said = []
    for name, default in _NO_EFFECT_LOADING_ARGS.items():
        if name in kwargs and kwargs.pop(name) not in (default, None):
            said.append(name)
    if said:
        verb = "has" if len(said) == 1 else "have"
        ops.notice_once(f"from_pretrained-no-effect:{said}",
                        f"from_pretrained: {', '.join(said)} {verb} no effect in bertfast")
    for name, default in _DEFAULT_ONLY_LOADING_ARGS.items():
        if name not in kwargs:
            continue
        value = kwargs.pop(name)
        if value is not None and value != default:
            raise ValueError(f"from_pretrained: {name}={value!r} is not supported by bertfast (only the default, "
                             f"{default!r})")


def _device_of_map(device, device_map):
    """from_pretrained's device: device, or transformers' device_map where it names a single device."""
    if device_map is None:
        return device
    target = device_map
    if isinstance(device_map, dict):
        places = set(device_map.values())
        if len(places) != 1:
            raise ValueError(f"device_map={device_map!r} splits the model across devices; bertfast places the whole "
                             "model on one device (pass device= or a device_map naming one device)")
        target = places.pop()
    if target in ("auto", "balanced", "balanced_low_0", "sequential"):
        target = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(target)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r} does not name a device; bertfast places the whole "
                         "model on one device: pass device= or a device_map such as 'cuda:0' or 'auto'") from None
    if device is not None and _indexed(torch.device(device)) != _indexed(target):
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; give one of them")
    return target


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:<current device> (for comparing devices given with and without an index)."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _dtype_spelling(value):
    """torch.float16 and "float16" as one value (for comparing dtype and torch_dtype)."""
    return getattr(torch, value, value) if isinstance(value, str) and value != "auto" else value


@torch.compiler.disable(reason="bertfast reads each batch's lengths and id ranges on the host, to unpad it and "
                               "check the ids: a bertfast model is not one graph; compile it with fullgraph=False "
                               "(the default)")
def _read_on_host(stats: torch.Tensor) -> list:
    """The forward's one host read of a batch's statistics (lengths, id ranges), outside torch.compile's graphs."""
    functorch, t = torch._C._functorch, stats
    while functorch.is_functorch_wrapped_tensor(t) and not functorch.is_batchedtensor(t):
        t = functorch.get_unwrapped(t)      # (grad transforms wrap every tensor; those read fine)
    if functorch.is_batchedtensor(t):       # vmap over the ids or the mask: a value per sample, none to read
        raise NotImplementedError(
            "a bertfast model cannot run under torch.func.vmap over its ids or mask: it reads the batch's lengths "
            "and id ranges on the host to unpad it; call it on the whole batch (vmap over inputs_embeds without "
            "an attention_mask runs)")
    return stats.tolist()


_NO_EXPORT = ("bertfast reads each batch's lengths and id ranges on the host to unpad it, so its shapes depend on "
              "the data; serve it eagerly or with torch.compile, or export transformers' model")


def _exporting() -> bool:
    """Whether torch.export is running. Not torch.compiler.is_exporting() under dynamo: torch 2.11's dynamo (the
    GPU machines') reads that as True in every trace, torch.compile's included, so each compiled forward was refused
    as an export; the flag it returns is read as the module global it is (torch 2.13 reads it so itself)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


@torch.compiler.disable(reason=f"torch.export cannot capture a bertfast model: {_NO_EXPORT}")
def _refuse_export(name: str) -> None:
    """torch.export's non-strict mode runs this (strict mode stops at the disable, with its reason)."""
    raise NotImplementedError(f"torch.export cannot capture {name}: {_NO_EXPORT}")


def _transformers_default_dtype():
    """What transformers' from_pretrained loads when given no dtype: "auto" from transformers 5 on, torch's default
    dtype (float32) before."""
    import transformers
    return "auto" if int(transformers.__version__.split(".")[0]) >= 5 else None


def _dtype_arg(torch_dtype, state: dict, config=None) -> torch.dtype:
    """from_pretrained's dtype, as transformers resolves it: None is transformers' own default; "auto" the
    config's dtype (config.json's "dtype" / "torch_dtype"), else the checkpoint's first floating-point weight's."""
    if torch_dtype is None:
        torch_dtype = _transformers_default_dtype()
    if torch_dtype is None:
        return torch.get_default_dtype()
    if isinstance(torch_dtype, str) and torch_dtype == "auto":
        declared = getattr(config, "dtype", None)
        if declared is None and "torch_dtype" in getattr(config, "__dict__", {}):
            declared = config.torch_dtype           # (transformers 4's name, before 4.56)
        if declared is not None:
            torch_dtype = declared
        else:
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    return value.dtype
            return torch.get_default_dtype()
    dtype = getattr(torch, torch_dtype, None) if isinstance(torch_dtype, str) else torch_dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch_dtype={torch_dtype!r} is not a torch dtype")
    if not dtype.is_floating_point:
        raise ValueError(f"torch_dtype={torch_dtype!r}: the weights need a floating-point dtype (float32, float16, "
                         f"bfloat16, float64)")
    return dtype
