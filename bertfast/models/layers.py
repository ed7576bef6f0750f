"""The building blocks of a BERT-family encoder on packed tokens.

Module names and parameter shapes mirror transformers' Bert* modules, so ``state_dict()`` has exactly the same
keys. The one internal difference: the query / key / value projections of a layer are one packed parameter
(``qkv_weight`` [3H, H], ``qkv_bias`` [3H]) so the layer runs one GEMM; state-dict hooks split it into
``query.*`` / ``key.*`` / ``value.*`` on save and pack those on load.

Every forward here takes packed activations x [T, H] (T = real tokens of the batch) and the batch's
:class:`bertfast.padding.Unpadded`; nothing is computed on padding.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from bertfast import ops
from bertfast.padding import Unpadded

# transformers' hidden_act names -> the kernels' activation names
ACTIVATION_OF_HIDDEN_ACT = {
    "gelu": "gelu",
    "gelu_python": "gelu",          # transformers' erf GELU written in Python: the same function
    "gelu_new": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",   # the tanh form too (transformers' AccurateGELUActivation)
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def activation_of(act, field: str = "config.hidden_act") -> str:
    if not isinstance(act, str) or act not in ACTIVATION_OF_HIDDEN_ACT:
        raise ValueError(f"{field}={act!r} is not supported; bertfast supports "
                         f"{', '.join(ACTIVATION_OF_HIDDEN_ACT)}")
    return ACTIVATION_OF_HIDDEN_ACT[act]


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """What the packed encoder needs from a family's config, under family-neutral names."""
    hidden: int
    heads: int
    layers: int
    intermediate: int
    activation: str            # kernel activation name (gelu, gelu_tanh, relu, silu)
    vocab: int
    max_positions: int
    type_vocab: int            # 0: the family has no token types (DistilBERT)
    embedding_size: int        # == hidden unless the family projects embeddings (ALBERT, ELECTRA)
    pad_token_id: int | None
    eps: float
    hidden_dropout: float      # after the embeddings' LayerNorm input (every family)
    attention_dropout: float   # on the attention probabilities
    attention_output_dropout: float  # on the attention's output projection, before its residual (0: DistilBERT)
    ffn_output_dropout: float  # on the FFN's output projection, before its residual (0: ALBERT never applies it)
    initializer_range: float
    # the position row that stays zero and gets no gradient (RoBERTa's position table has padding_idx =
    # pad_token_id, as transformers builds it); None: every row trains
    position_padding_idx: int | None = None


def has_local_hooks(module: nn.Module) -> bool:
    """Whether hooks (forward or backward) are registered on `module` itself."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def has_global_hooks() -> bool:
    """Whether hooks registered for every module (torch.nn.modules.module.register_module_*_hook) exist."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks (its own or global ones, forward or backward)."""
    return has_local_hooks(module) or has_global_hooks()


def is_adapter(module: nn.Module) -> bool:
    """Whether `module` is a peft module (a LoRA layer, a modules_to_save wrapper, ...)."""
    return type(module).__module__.startswith("peft.")


def fusable_linear(module: nn.Module, where: str) -> bool:
    """Whether `module` is exactly an nn.Linear without hooks, whose weight and bias the fused path reads directly.
    Anything else in its place (a LoRA / PEFT wrapper, a quantised linear) or hooks on it: the module is called,
    and only what follows it is fused (said once)."""
    if type(module) is nn.Linear and not has_hooks(module):
        return True
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    ops.notice_once(f"unfused-linear:{where}:{kind}",
                    f"{where} is a {kind}{' with hooks' if has_hooks(module) else ''}, not a plain nn.Linear: it runs "
                    f"as a module (its bias outside the fused kernel)")
    return False


class _ReadByKernels:
    """A module whose parameters bertfast's fused kernels read without calling it (so its hooks would not run on
    that path): registering a hook on it says so, once per kind of module."""

    def _hook_notice(self):
        ops.notice_once(f"hook-on-fused:{type(self).__name__}",
                        f"a hook was registered on a {type(self).__name__}: bertfast's fused kernels read its "
                        f"parameters without calling it, so the hook does not run on the fused path; hook the "
                        f"enclosing layer (or a linear layer, which then runs as a module) instead")

    def register_forward_hook(self, *args, **kwargs):
        self._hook_notice()
        return super().register_forward_hook(*args, **kwargs)

    def register_forward_pre_hook(self, *args, **kwargs):
        self._hook_notice()
        return super().register_forward_pre_hook(*args, **kwargs)

    def register_full_backward_hook(self, *args, **kwargs):
        self._hook_notice()
        return super().register_full_backward_hook(*args, **kwargs)

    def register_full_backward_pre_hook(self, *args, **kwargs):
        self._hook_notice()
        return super().register_full_backward_pre_hook(*args, **kwargs)


class FusedLayerNorm(_ReadByKernels, nn.LayerNorm):
    """nn.LayerNorm's parameters, applied by the fused add_layer_norm / embed kernels."""


class FusedEmbedding(_ReadByKernels, nn.Embedding):
    """nn.Embedding's table, gathered by the fused embed kernel (called as a module on the unfused paths)."""


class Embeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm (BertEmbeddings' parameters)."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        e = spec.embedding_size
        self.word_embeddings = nn.Embedding(spec.vocab, e, padding_idx=spec.pad_token_id)
        self.position_embeddings = FusedEmbedding(spec.max_positions, e, padding_idx=spec.position_padding_idx)
        if spec.type_vocab:
            self.token_type_embeddings = FusedEmbedding(spec.type_vocab, e)
        else:
            self.token_type_embeddings = None
        self.LayerNorm = FusedLayerNorm(e, eps=spec.eps)
        self.dropout_p = spec.hidden_dropout

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds, unp: Unpadded) -> torch.Tensor:
        """input_ids / token_type_ids / position_ids: [B, S] int64 (position_ids already expanded);
        inputs_embeds [B, S, H] or None. Returns the packed embeddings [T, H]."""
        ln = self.LayerNorm
        if inputs_embeds is None and has_hooks(self.word_embeddings):
            # hooks on the input embeddings (transformers' NEFTune noise, enable_input_require_grads) get what
            # transformers' embeddings give them, [B, S, E]: the unfused path then (documented for the embeddings'
            # own hooks; global module hooks, which every module runs, are said once)
            if not has_local_hooks(self.word_embeddings):
                ops.notice_once("unfused-embeddings:global-hooks",
                                "global module hooks are registered: the word embeddings run as a module so that "
                                "the hooks see them, and the fused gather + LayerNorm kernel (embed) is not used")
            inputs_embeds = self.word_embeddings(input_ids)
        if inputs_embeds is None:
            tt = token_type_ids.reshape(-1) if token_type_ids is not None else None
            types = self.token_type_embeddings.weight if self.token_type_embeddings is not None else None
            x = ops.embed(input_ids.reshape(-1), unp.indices, position_ids.reshape(-1), tt,
                          self.word_embeddings.weight, self.position_embeddings.weight, types, ln.weight, ln.bias,
                          ln.eps, self.word_embeddings.padding_idx, self.position_embeddings.padding_idx,
                          validate=False)   # the model's forward checked every id (_check_ranges, one host read)
        else:
            rows = ops.unpad(inputs_embeds.reshape(-1, inputs_embeds.shape[-1]), unp.indices, validate=False)
            pos = position_ids.reshape(-1).index_select(0, unp.indices)
            extra = self.position_embeddings(pos)
            if self.token_type_embeddings is not None:
                tt = (token_type_ids.reshape(-1).index_select(0, unp.indices) if token_type_ids is not None
                      else torch.zeros_like(pos))
                extra = self.token_type_embeddings(tt) + extra
            x = ops.add_layer_norm(rows, ln.weight, ln.bias, ln.eps, residual=extra)
        return F.dropout(x, self.dropout_p, self.training)


class SelfAttention(nn.Module):
    """Packed Q/K/V projection + variable-length attention. Public keys: query/key/value .weight/.bias."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        hidden, heads = spec.hidden, spec.heads
        self.num_heads = heads
        self.head_dim = hidden // heads
        self.hidden = hidden
        self.dropout_p = spec.attention_dropout
        self.qkv_weight = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.qkv_bias = nn.Parameter(torch.empty(3 * hidden))
        self._register_state_dict_hook(SelfAttention._split_qkv)
        self.register_load_state_dict_pre_hook(SelfAttention._pack_qkv)
        self.register_load_state_dict_post_hook(SelfAttention._hide_packed_keys)
        self._packed_missing: list[str] = []

    @staticmethod
    def _split_qkv(module, state_dict, prefix, local_metadata):
        for kind in ("weight", "bias"):
            packed = state_dict.pop(prefix + f"qkv_{kind}")
            for name, part in zip(("query", "key", "value"), packed.chunk(3, dim=0)):
                state_dict[prefix + f"{name}.{kind}"] = part
        return state_dict

    @staticmethod
    def _pack_qkv(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """query / key / value (the public keys) -> qkv_weight / qkv_bias. Any subset loads as it would into
        transformers' three Linears: a part the state dict lacks keeps its current value, bit for bit, and is
        reported missing under its public name (never as qkv_*, which state_dict() does not show); a part that
        is not a tensor or has the wrong shape is torch's error under its public name. With assign=True the
        packed parameter takes the given parts' dtype and device (one tensor: parts cannot differ)."""
        assign = local_metadata.get("assign_to_params_buffers", False)
        missing = []
        module._packed_missing.clear()     # (left over if an earlier load raised before the post-hook)
        for kind in ("weight", "bias"):
            packed_name = prefix + f"qkv_{kind}"
            if packed_name in state_dict:          # the internal name: not a key of state_dict(), as in transformers
                unexpected_keys.append(packed_name)
                state_dict.pop(packed_name)
            module._packed_missing.append(packed_name)   # torch lists it missing unless packed below
            param = getattr(module, f"qkv_{kind}")
            names = [prefix + f"{n}.{kind}" for n in ("query", "key", "value")]
            current = dict(zip(names, param.detach().chunk(3, dim=0)))
            given = {}
            for n in names:
                if n not in state_dict:
                    missing.append(n)
                    continue
                value = state_dict.pop(n)
                if not isinstance(value, torch.Tensor):
                    error_msgs.append(f'While copying the parameter named "{n}", expected torch.Tensor or '
                                      f'Tensor-like object from checkpoint but received {type(value)}')
                elif value.shape != current[n].shape:
                    error_msgs.append(f"size mismatch for {n}: copying a param with shape {value.shape} from "
                                      f"checkpoint, the shape in current model is {current[n].shape}.")
                else:
                    given[n] = value
            if not given:
                continue
            if assign:
                if param.is_meta and len(given) < 3:
                    error_msgs.append(f"{', '.join(n for n in names if n not in given)}: query / key / value are "
                                      f"one packed parameter in bertfast; a model on the meta device loads them "
                                      f"together, not one without the others")
                    continue
                first = next(iter(given.values()))
                parts = [given[n] if n in given else current[n].to(first.device, first.dtype) for n in names]
            else:   # copied into the parameter: the given parts as torch's copy_ would cast them, the rest exact
                parts = [given[n].to(param.device, param.dtype) if n in given else current[n] for n in names]
            state_dict[packed_name] = torch.cat(parts, dim=0)
        parts = ("query", "key", "value")    # torch's order: query.weight, query.bias, key.weight, ... (stable sort)
        missing_keys.extend(sorted(missing, key=lambda n: parts.index(n[len(prefix):].split(".")[0])))

    @staticmethod
    def _hide_packed_keys(module, incompatible_keys):
        """The internal qkv_* names out of the missing keys: _pack_qkv reported the public ones."""
        for name in module._packed_missing:
            while name in incompatible_keys.missing_keys:
                incompatible_keys.missing_keys.remove(name)
        module._packed_missing.clear()

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, 3, heads, head_dim], one GEMM."""
        return F.linear(x, self.qkv_weight, self.qkv_bias).view(x.shape[0], 3, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, unp: Unpadded) -> torch.Tensor:
        qkv = self.qkv(x)
        ctx = ops.varlen_attention(qkv, unp.cu_seqlens, unp.max_seqlen,
                                   dropout_p=self.dropout_p if self.training else 0.0, validate=False)
        return ctx.reshape(x.shape[0], self.hidden)

    def forward_with_probs(self, x: torch.Tensor, unp: Unpadded):
        """The attention path that also returns the probabilities [B, heads, S, S] (output_attentions=True).

        Runs on the padded batch like transformers' eager attention (masked keys get the dtype's minimum), so
        the probabilities of real query rows equal transformers'; padded query rows are computed from zero
        queries. Slower than forward(): used only when probabilities are asked for."""
        b, s = unp.batch, unp.seqlen
        qkv = ops.pad(self.qkv(x).reshape(x.shape[0], 3 * self.hidden), unp.indices, b, s, validate=False)
        q, k, v = qkv.view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        real = torch.zeros(b * s, dtype=torch.bool, device=x.device).index_fill_(0, unp.indices, True).view(b, s)
        mask = torch.zeros((b, 1, 1, s), dtype=q.dtype, device=x.device).masked_fill(
            ~real[:, None, None, :], torch.finfo(q.dtype).min)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask, dim=-1)
        dropped = F.dropout(probs, self.dropout_p, self.training)
        ctx = (dropped @ v).permute(0, 2, 1, 3).reshape(b * s, self.hidden)
        return ops.unpad(ctx, unp.indices, validate=False), dropped   # as transformers: the probabilities after dropout


class DenseLayerNorm(nn.Module):
    """dense (bias fused into the LayerNorm kernel) -> dropout -> + residual -> LayerNorm
    (transformers' BertSelfOutput / BertOutput)."""

    def __init__(self, in_features, spec: EncoderSpec, dropout_p: float):
        super().__init__()
        self.dense = nn.Linear(in_features, spec.hidden)
        self.LayerNorm = FusedLayerNorm(spec.hidden, eps=spec.eps)
        self.dropout_p = dropout_p

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        ln, dense = self.LayerNorm, self.dense
        if fusable_linear(dense, "a layer's output dense"):
            h, x_bias = F.linear(h, dense.weight), dense.bias
        else:
            h, x_bias = dense(h), None
        return ops.add_layer_norm(h, ln.weight, ln.bias, ln.eps, residual=residual, x_bias=x_bias,
                                  dropout_p=self.dropout_p if self.training else 0.0)


class Attention(nn.Module):
    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.self = SelfAttention(spec)
        self.output = DenseLayerNorm(spec.hidden, spec, spec.attention_output_dropout)

    def forward(self, x, unp: Unpadded, output_attentions: bool = False):
        if output_attentions:
            ctx, probs = self.self.forward_with_probs(x, unp)
            return self.output(ctx, x), probs
        return self.output(self.self(x, unp), x), None


class Intermediate(nn.Module):
    """dense -> bias + activation: in the GEMM's epilogue or in one pass after it (ops.linear_act)."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.dense = nn.Linear(spec.hidden, spec.intermediate)
        self.activation = spec.activation

    def forward(self, x):
        dense = self.dense
        if not fusable_linear(dense, "intermediate.dense"):
            # the module's output may be held by its hooks or an adapter: never written over
            return ops.bias_act(dense(x), None, self.activation)
        # the GEMM's epilogue where BERTFAST_LINEAR_EPILOGUE says (NOTES change 30), else GEMM + bias_act
        return ops.linear_act(x, dense.weight, dense.bias, self.activation)


class Layer(nn.Module):
    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.attention = Attention(spec)
        self.intermediate = Intermediate(spec)
        self.output = DenseLayerNorm(spec.intermediate, spec, spec.ffn_output_dropout)

    def forward(self, x, unp: Unpadded, output_attentions: bool = False):
        x, probs = self.attention(x, unp, output_attentions)
        return self.output(self.intermediate(x), x), probs


class Encoder(nn.Module):
    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.layer = nn.ModuleList([Layer(spec) for _ in range(spec.layers)])

    def schedule(self):
        """The layer module run at each depth (ALBERT's encoder repeats shared layers)."""
        return list(self.layer)


class Pooler(nn.Module):
    """tanh(dense(first token)) - reads each sequence's first real token straight from the packed rows."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.dense = nn.Linear(spec.hidden, spec.hidden)

    def forward(self, x: torch.Tensor, unp: Unpadded) -> torch.Tensor:
        return torch.tanh(self.dense(first_tokens(x, unp)))


def first_tokens(x: torch.Tensor, unp: Unpadded) -> torch.Tensor:
    """[B, H]: each sequence's first real token from the packed rows (zeros for an empty row)."""
    if unp.total == 0:
        return x.new_zeros((unp.batch, x.shape[1]))
    first = x.index_select(0, unp.first_token)
    return torch.where((unp.seqlens > 0)[:, None], first, torch.zeros_like(first))


def init_weights(module: nn.Module, std: float) -> None:
    """transformers' BERT initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, SelfAttention):
            nn.init.normal_(m.qkv_weight, std=std)
            nn.init.zeros_(m.qkv_bias)
