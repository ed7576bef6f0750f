"""bertfast.optimize(model): swap the encoder inside a transformers model (or a sentence-transformers
SentenceTransformer) for bertfast's, in place, sharing its weights, so heads, losses and ``.encode()`` keep
working.

Sharing: every parameter of the new encoder is the same Parameter object as before (so tied weights, such
as an MLM decoder tied to the word embeddings, stay tied and an optimiser built afterwards sees each weight
once), except the query / key / value projections of each layer, which are packed into one new parameter
(one GEMM per layer); the old Q/K/V parameters leave the model with the old encoder.

Refusal leaves the model untouched: every check runs before anything is changed.
"""
from __future__ import annotations

import torch
from torch import nn

from bertfast import ops
from bertfast.models import AutoModel, EncoderModel
from bertfast.models.base import _convert, hf_base_model
from bertfast.models.layers import SelfAttention, fusable_linear, has_hooks, is_adapter


def optimize(model: nn.Module) -> nn.Module:
    """Return ``model`` with its BERT-family encoder replaced by bertfast's (in place). A transformers *base*
    model (e.g. a plain BertModel) has no parent to swap it in: a bertfast model sharing its weights is
    returned instead. Optimising an optimised model is a no-op."""
    if isinstance(model, EncoderModel) or getattr(model, "_bertfast_optimized", False):
        return model
    st_module = _sentence_transformer_module(model)
    if st_module is not None:
        inner = st_module.model
        if isinstance(inner, EncoderModel):
            return model
        if hf_base_model(inner) is not inner:
            optimize(inner)        # a task model (CrossEncoder's classifier, a fill-mask module): keep its head
        else:
            st_module.model = _encoder_like(inner, inner)
        model._bertfast_optimized = True
        return model
    if not hasattr(model, "config"):
        raise TypeError(f"bertfast.optimize takes a transformers model or a SentenceTransformer, got "
                        f"{type(model).__name__}")
    base = hf_base_model(model)
    if base is model:
        return _encoder_like(base, model)
    if isinstance(base, EncoderModel):
        return model
    ours = _encoder_like(base, model)          # raises (model untouched) when bertfast cannot serve it
    heads = _fusable_head_transforms(model)
    ours._padded_position_reader = _padded_position_reader(model)
    setattr(model, model.base_model_prefix, ours)
    for parent, name, transform in heads:
        setattr(parent, name, FusedHeadTransform(transform))
    for module in model.modules():
        # the heads' other LayerNorms (RoBERTa / ALBERT / ELECTRA / DistilBERT MLM heads) on the fused kernel:
        # fp32 statistics in every dtype (torch's fp16 CPU LayerNorm backward gives NaN on the constant rows that
        # bertfast's zero padded rows become after a zero-bias dense)
        if type(module) is nn.LayerNorm and KernelLayerNorm.serves(module):
            module.__class__ = KernelLayerNorm
    model._bertfast_optimized = True
    return model


_ST_CLASSES = ("SentenceTransformer", "CrossEncoder", "SparseEncoder")


def _sentence_transformer_module(model):
    """The first module (holding the transformers model) of a sentence-transformers model, else None."""
    name = type(model).__name__
    if name not in _ST_CLASSES or not isinstance(model, nn.Sequential):
        return None
    first = model[0] if len(model) else None
    if first is None or not isinstance(getattr(first, "model", None), nn.Module):
        raise TypeError(f"bertfast.optimize: this {name}'s first module has no transformers model")
    return first


def _encoder_like(base: nn.Module, owner: nn.Module) -> EncoderModel:
    """A bertfast encoder built on base's own Parameter objects (Q/K/V packed into a new one)."""
    config = getattr(base, "config", None)
    if config is None:
        raise TypeError(f"bertfast.optimize: {type(owner).__name__}'s encoder has no config")
    cls = AutoModel.family(config)
    cls.check_config(config)
    adapters = [name for name, module in base.named_modules() if is_adapter(module)]
    if adapters:
        raise ValueError(f"bertfast.optimize: {type(owner).__name__} holds PEFT adapter layers ({', '.join(adapters[:3])}"
                         f"{' ...' if len(adapters) > 3 else ''}): merge them into the weights first "
                         f"(model.merge_and_unload()), or optimize the model without adapters and add LoRA after it to "
                         f"its dense layers (attention.output.dense, intermediate.dense, output.dense); bertfast packs "
                         f"query / key / value into one parameter, which LoRA cannot target")
    words = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if isinstance(words, nn.Embedding) and (words.max_norm is not None or words.sparse):
        raise ValueError(f"bertfast.optimize: {type(owner).__name__}'s word embeddings have "
                         f"{'max_norm=' + repr(words.max_norm) if words.max_norm is not None else 'sparse=True'}: the "
                         f"fused embedding kernel renormalises no row and gives dense gradients; set them back to "
                         f"nn.Embedding's defaults first")
    pooler = getattr(base, "pooler", None) is not None
    with torch.device("meta"):
        ours = cls(config, add_pooling_layer=pooler)
    hf_params = dict(base.named_parameters())
    to_family = getattr(ours, "_to_family", None)

    def family_name(internal: str) -> str:
        return _convert(internal, to_family) if to_family else internal

    plan = []     # (module, attribute, parameter)
    for mod_name, module in ours.named_modules():
        prefix = mod_name + "." if mod_name else ""
        if isinstance(module, SelfAttention):
            for kind in ("weight", "bias"):
                parts = []
                for part in ("query", "key", "value"):
                    key = family_name(f"{prefix}{part}.{kind}")
                    if key not in hf_params:
                        raise ValueError(f"bertfast.optimize: {type(owner).__name__} has no parameter {key}")
                    parts.append(hf_params[key])
                packed = nn.Parameter(torch.cat([p.detach() for p in parts]), requires_grad=parts[0].requires_grad)
                plan.append((module, f"qkv_{kind}", packed))
            continue
        for attr, _ in module.named_parameters(recurse=False):
            key = family_name(prefix + attr)
            if key not in hf_params:
                raise ValueError(f"bertfast.optimize: {type(owner).__name__} has no parameter {key}")
            if tuple(hf_params[key].shape) != tuple(getattr(module, attr).shape):
                raise ValueError(f"bertfast.optimize: parameter {key} has shape {tuple(hf_params[key].shape)}, "
                                 f"expected {tuple(getattr(module, attr).shape)}")
            plan.append((module, attr, hf_params[key]))
    for module, attr, param in plan:
        module._parameters[attr] = param
    # the word-embedding module itself is kept (it holds the same Parameter): hooks on it (transformers'
    # enable_input_require_grads, NEFTune, user hooks) stay in place, and so does its padding_idx, which the
    # fused kernel reads (one set to None, so that the pad row trains, trains here too)
    mine = ours.embeddings.word_embeddings
    if isinstance(words, nn.Embedding) and words.weight is mine.weight:
        ours.embeddings.word_embeddings = words
    _refuse_hooks(base, owner, kept=ours.embeddings.word_embeddings)
    ours.train(base.training)
    if base.training and any(param.requires_grad for module, attr, param in plan if attr.startswith("qkv_")):
        # an optimizer holds Parameter objects: one built before this call has the old Q/K/V, which no longer
        # get gradients (transformers' Trainer builds its optimizer in train(): unaffected)
        ops.notice_once("optimize:qkv", "bertfast.optimize packed each layer's query / key / value parameters "
                        "into one new parameter: an optimizer built before optimize() does not hold it and would "
                        "leave Q/K/V untrained; build optimizers (and load optimizer state) after optimize()")
    # activation checkpointing switched on in the transformers model stays on (transformers keeps the flag and
    # its checkpoint function on the encoder's modules)
    for module in base.modules():
        if getattr(module, "gradient_checkpointing", False):
            ours.gradient_checkpointing = True
            ours._gradient_checkpointing_func = getattr(module, "_gradient_checkpointing_func", None)
            break
    return ours


def _ours_to_drop(hook) -> bool:
    """Hooks transformers installs itself, harmless to lose: its output-capturing hooks (transformers 5 puts them on
    every layer the first time hidden states or attentions are asked for; they record only while a capture runs,
    and bertfast's forward returns those outputs itself)."""
    return getattr(hook, "__module__", "").startswith("transformers.utils.output_capturing")


def _user_hook_kinds(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on this module itself (global hooks run on any module: not counted)."""
    kinds = (("forward", module._forward_hooks), ("forward pre", module._forward_pre_hooks),
             ("backward", module._backward_hooks), ("backward pre", module._backward_pre_hooks))
    return [kind for kind, hooks in kinds if any(not _ours_to_drop(h) for h in hooks.values())]


def _refuse_hooks(base: nn.Module, owner: nn.Module, kept: nn.Module) -> None:
    """Hooks on the encoder's modules would silently stop running once it is swapped out (except on `kept`, the
    word-embedding module when the new encoder keeps it): refuse, naming them."""
    found = [f"{name or type(base).__name__} ({', '.join(kinds)})" for name, module in base.named_modules()
             if module is not kept and (kinds := _user_hook_kinds(module))]
    if found:
        raise ValueError(f"bertfast.optimize: {type(owner).__name__}'s encoder modules have hooks that would no "
                         f"longer run once bertfast replaces them: {'; '.join(found[:5])}"
                         f"{' ...' if len(found) > 5 else ''}. Remove them (handle.remove()) before optimize and "
                         f"register them after it on the optimised encoder's layers or linear layers (its "
                         f"LayerNorms and embedding tables are read by fused kernels, never called), or leave this "
                         f"model unoptimised")


def _padded_position_reader(model: nn.Module) -> tuple[str, int | None] | None:
    """What in a task model reads a fixed position of last_hidden_state, and which (0, -1, None = all):
    bertfast leaves padded rows zero, so such a head must not be handed padding there. The pooler is not one:
    bertfast's reads each row's first real token."""
    name = type(model).__name__
    if name.startswith("DistilBertFor") and name.endswith(("SequenceClassification", "MultipleChoice")):
        return f"{name} (hidden_state[:, 0])", 0
    for mod_name, module in model.named_modules():
        cls = type(module).__name__
        if cls.endswith("ClassificationHead"):        # RoBERTa / XLM-R / ELECTRA: features[:, 0, :]
            return f"{name}.{mod_name} ({cls})", 0
        if cls.endswith("SequenceSummary"):            # ELECTRA multiple choice
            kind = getattr(module, "summary_type", "last")
            position = {"first": 0, "last": -1, "cls_index": -1}.get(kind)
            return f"{name}.{mod_name} ({cls}, summary_type {kind!r})", position
    return None


class KernelLayerNorm(nn.LayerNorm):
    """An nn.LayerNorm (same parameters and keys) computed, in fp16 / bf16, by bertfast's add_layer_norm kernel:
    statistics in fp32. optimize gives this class to the LayerNorms of task heads that it does not fuse further.
    fp32 / fp64 inputs and torch.func transforms run torch's LayerNorm (so double backward and vmap through the
    head keep working there)."""

    @staticmethod
    def serves(module: nn.LayerNorm) -> bool:
        return (len(module.normalized_shape) == 1 and module.weight is not None
                and module.bias is not None)

    def forward(self, x):
        if (x.dtype in (torch.float32, torch.float64) or torch._C._functorch.peek_interpreter_stack() is not None
                or (x.dtype != self.weight.dtype and ops.autocast_dtype(x.device) is None)):
            # full precision (torch's own is exact there), functorch transforms, or a dtype mix torch takes and
            # the fused op refuses outside autocast
            return super().forward(x)
        return ops.add_layer_norm(x, self.weight, self.bias, self.eps)


class FusedHeadTransform(nn.Module):
    """An MLM head transform (dense -> activation -> LayerNorm) run as a GEMM plus one fused
    bias + activation + LayerNorm kernel. Keeps the wrapped transform's submodules, so the state-dict keys
    stay the same."""

    def __init__(self, transform: nn.Module):
        super().__init__()
        self.dense = transform.dense
        self.LayerNorm = transform.LayerNorm
        self.activation = transform._bertfast_activation

    def forward(self, hidden_states):
        ln, dense = self.LayerNorm, self.dense
        if has_hooks(ln):      # transformers' LayerNorm module, hooked after optimize: called as a module
            ops.notice_once("unfused-head-transform:hooks",
                            "the MLM head transform's LayerNorm has hooks: it runs as a module so that they run, "
                            "and the fused bias + activation + LayerNorm kernel is not used there")
            return ln(ops.bias_act(dense(hidden_states), None, self.activation))
        if fusable_linear(dense, "the MLM head transform's dense"):
            h, x_bias = torch.nn.functional.linear(hidden_states, dense.weight), dense.bias
        else:
            h, x_bias = dense(hidden_states), None
        return ops.add_layer_norm(h, ln.weight, ln.bias, ln.eps, x_bias=x_bias, activation=self.activation)


def _fusable_head_transforms(model: nn.Module):
    """BERT-style MLM head transforms (modules with dense, transform_act_fn, LayerNorm) whose activation the
    fused kernel computes exactly."""
    from bertfast.models.layers import ACTIVATION_OF_HIDDEN_ACT
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("PredictionHeadTransform") and hasattr(module, "dense") and \
                isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm):
            hooked = [n for n, m in module.named_modules() if _user_hook_kinds(m)]
            if hooked:     # the fused module would not call the hooked modules: keep transformers' transform
                ops.notice_once(f"hooked-head:{name}", f"bertfast.optimize: {name} has hooks "
                                f"({', '.join(n or 'itself' for n in hooked)}): it keeps running transformers' "
                                f"unfused transform")
                continue
            act = getattr(model.config, "hidden_act", None)
            if isinstance(act, str) and ACTIVATION_OF_HIDDEN_ACT.get(act) in ("gelu", "gelu_tanh", "relu", "silu"):
                module._bertfast_activation = ACTIVATION_OF_HIDDEN_ACT[act]
                parent_name, _, attr = name.rpartition(".")
                found.append((model.get_submodule(parent_name), attr, module))
    return found
