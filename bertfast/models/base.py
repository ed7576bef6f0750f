"""bertfast.BertModel: a drop-in for transformers.BertModel that runs padding-free.

Same config, same checkpoints and state-dict keys, same forward arguments and output classes. The batch is
unpadded once (bertfast.padding) and every layer runs on the real tokens only; ``last_hidden_state`` is padded
once at the end, and **its padded rows are zero** (transformers leaves values computed from pad tokens
there; compare real tokens only). The pooler reads each sequence's first real token (for right-padded
batches, every tokenizer's default, that is transformers' position 0).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from bertfast import loading, ops
from bertfast.models import layers
from bertfast.padding import Unpadded, full_batch, unpad_mask

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _output_classes():
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
    return BaseModelOutputWithPoolingAndCrossAttentions


class BertModel(nn.Module):
    """transformers.BertModel's interface on bertfast's kernels. Build with from_pretrained / from_hf, or
    ``BertModel(config)`` for random weights (transformers' initialisation)."""

    model_type = "bert"
    base_model_prefix = "bert"

    def __init__(self, config, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.check_config(config)
        self.embeddings = layers.Embeddings(config)
        self.encoder = layers.Encoder(config)
        self.pooler = layers.Pooler(config) if add_pooling_layer else None
        layers.init_weights(self, config.initializer_range)

    # ---------------------------------------------------------------------------------------------- config
    @classmethod
    def check_config(cls, config) -> None:
        """Raise for a config these kernels cannot serve, naming the field."""
        if getattr(config, "model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"config.model_type is {config.model_type!r}; {cls.__name__} serves "
                             f"{cls.model_type!r} checkpoints")
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(f"config.hidden_size ({config.hidden_size}) is not a multiple of "
                             f"config.num_attention_heads ({config.num_attention_heads})")
        pet = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if pet != "absolute":
            raise ValueError(f"config.position_embedding_type={pet!r} is not supported (only 'absolute')")
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError("config.is_decoder / config.add_cross_attention: bertfast serves encoders only")
        layers.activation_of(config)

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_id, torch_dtype: torch.dtype | str | None = None, device=None,
                        add_pooling_layer: bool = True, **unused):
        """Load config.json + model.safetensors (or a pickle checkpoint, weights_only=True) from a directory or a
        hub id. Strict: keys and shapes must equal the model's, or a CheckpointError names file and key."""
        if unused:
            ops.notice_once(f"from_pretrained-unused:{sorted(unused)}",
                            f"from_pretrained ignores the arguments {', '.join(sorted(unused))}")
        directory = loading.resolve(path_or_id)
        config = loading.read_config(directory)
        state, origin = loading.read_state_dict(directory)
        dtype = _dtype_arg(torch_dtype, state)
        with torch.device("meta"):
            model = cls(config, add_pooling_layer=add_pooling_layer)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state, origin = loading.normalise_keys(state, origin, set(expected), cls.base_model_prefix)
        loading.check_state_dict(state, origin, expected, directory)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        model.eval()
        return model.to(device) if device is not None else model

    @classmethod
    def from_hf(cls, hf_model: nn.Module):
        """A bertfast model with a copy of a loaded transformers BertModel's weights, dtype and device."""
        base = getattr(hf_model, hf_model.base_model_prefix, hf_model) if hasattr(hf_model, "base_model_prefix") \
            else hf_model
        config = copy.deepcopy(base.config)
        param = next(base.parameters())
        with torch.device("meta"):
            model = cls(config, add_pooling_layer=getattr(base, "pooler", None) is not None)
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
        unsupported = {k: v for k, v in kwargs.items() if v is not None and k not in ("head_mask",)}
        if unsupported:
            raise TypeError(f"{type(self).__name__}.forward got unsupported arguments: {', '.join(unsupported)}")
        if kwargs.get("head_mask") is not None:
            raise ValueError("head_mask is not supported by bertfast")
        output_hidden_states = bool(cfg.output_hidden_states if output_hidden_states is None
                                    else output_hidden_states)
        output_attentions = bool(getattr(cfg, "output_attentions", False) if output_attentions is None
                                 else output_attentions)
        return_dict = getattr(cfg, "return_dict", True) if return_dict is None else return_dict

        input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds = self._check_inputs(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        batch, seqlen = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = self.embeddings.word_embeddings.weight.device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # CUDA graph capture: nothing may be read on the host. Unpadding reads the mask, so only unpadded
            # batches can be captured; the id range checks (a host read) are skipped while capturing.
            if attention_mask is not None:
                raise ValueError("attention_mask cannot be given while a CUDA graph is being captured: unpadding "
                                 "reads the mask on the host; capture batches without padding instead")
            max_seqlen = seqlen
        else:
            max_seqlen = self._check_ranges(input_ids, attention_mask, token_type_ids, position_ids, seqlen)
        unp = unpad_mask(attention_mask, max_seqlen) if attention_mask is not None else \
            full_batch(batch, seqlen, device)
        if output_attentions:
            ops.notice_once("output_attentions", "output_attentions=True runs a padded attention path that "
                            "materialises the probabilities; it is slower than the default path")

        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, unp)
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for layer in self.encoder.layer:
            x, probs = layer(x, unp, output_attentions)
            if output_hidden_states:
                hidden_states.append(x)
            if output_attentions:
                attentions.append(probs)

        last = ops.pad(x, unp.indices, batch, seqlen)
        pooled = self.pooler(x, unp) if self.pooler is not None else None
        all_hidden = tuple(last if h is x else ops.pad(h, unp.indices, batch, seqlen) for h in hidden_states) \
            if output_hidden_states else None
        all_attn = tuple(attentions) if output_attentions else None
        if not return_dict:
            return tuple(v for v in (last, pooled, all_hidden, all_attn) if v is not None)
        return _output_classes()(last_hidden_state=last, pooler_output=pooled, hidden_states=all_hidden,
                                 attentions=all_attn)

    # ---------------------------------------------------------------------------------------- validation
    def _check_inputs(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds):
        cfg = self.config
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
            if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
                raise ValueError("inputs_embeds must be a floating-point tensor [batch, seq_len, hidden_size]")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
                raise ValueError(f"inputs_embeds must have shape [batch, seq_len, {cfg.hidden_size}], got "
                                 f"{tuple(inputs_embeds.shape)}")
            inputs_embeds = inputs_embeds.to(device=device, dtype=self.embeddings.word_embeddings.weight.dtype)
            shape = tuple(inputs_embeds.shape[:2])
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                attention_mask = torch.as_tensor(attention_mask)
            if tuple(attention_mask.shape) != shape:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids / "
                                 f"inputs_embeds have [batch, seq_len] = {shape}; they must match")
            attention_mask = attention_mask.to(device)
        if token_type_ids is not None:
            token_type_ids = _int_tensor("token_type_ids", token_type_ids, device)
            if tuple(token_type_ids.shape) != shape:
                raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}, expected {shape}")
        if position_ids is not None:
            position_ids = _int_tensor("position_ids", position_ids, device)
            if position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0)
            if position_ids.dim() != 2 or position_ids.shape[1] != shape[1] or position_ids.shape[0] not in (1, shape[0]):
                raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {shape} or "
                                 f"(1, {shape[1]})")
            position_ids = position_ids.expand(shape)
        else:
            if shape[1] > cfg.max_position_embeddings:
                raise ValueError(f"sequence length {shape[1]} of input_ids / inputs_embeds is longer than the "
                                 f"model's max_position_embeddings ({cfg.max_position_embeddings})")
            position_ids = torch.arange(shape[1], device=device).expand(shape)
        return input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds

    def _check_ranges(self, input_ids, attention_mask, token_type_ids, position_ids, seqlen) -> int:
        """Range checks of every id, and the batch's longest sequence, in one host read."""
        cfg = self.config
        stats = []
        if attention_mask is not None:
            stats.append((attention_mask != 0).sum(dim=1).max() if attention_mask.shape[0] else
                         torch.zeros((), device=attention_mask.device, dtype=torch.long))
        for t in (input_ids, token_type_ids, position_ids):
            if t is not None and t.numel():
                stats += [t.min(), t.max()]
        values = torch.stack([s.long() for s in stats]).tolist() if stats else []
        max_seqlen = int(values.pop(0)) if attention_mask is not None else seqlen
        for name, t, limit, what in (("input_ids", input_ids, cfg.vocab_size, "config.vocab_size"),
                                     ("token_type_ids", token_type_ids, cfg.type_vocab_size,
                                      "config.type_vocab_size"),
                                     ("position_ids", position_ids, cfg.max_position_embeddings,
                                      "config.max_position_embeddings")):
            if t is None or not t.numel():
                continue
            lo, hi = values.pop(0), values.pop(0)
            if lo < 0 or hi >= limit:
                raise ValueError(f"{name} holds values in [{lo}, {hi}], outside [0, {limit}) ({what})")
        return max_seqlen

    # --------------------------------------------------------------------------------------- conveniences
    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings


def _int_tensor(name: str, value, device) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.to(device=device, dtype=torch.long)


def _dtype_arg(torch_dtype, state: dict) -> torch.dtype:
    if torch_dtype is None or torch_dtype == "auto":
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        return floats[0] if (torch_dtype == "auto" and floats) else torch.float32
    if isinstance(torch_dtype, str):
        dtype = getattr(torch, torch_dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"torch_dtype={torch_dtype!r} is not a torch dtype")
        return dtype
    return torch_dtype
