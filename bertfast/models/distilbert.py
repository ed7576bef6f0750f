"""DistilBertModel: BERT's layer arithmetic under DistilBERT's key names; no token types, no pooler."""
from __future__ import annotations

import torch

from bertfast.models import layers
from bertfast.models.base import EncoderModel

_L = "encoder.layer.{i}."
_T = "transformer.layer.{i}."


class DistilBertModel(EncoderModel):
    model_types = ("distilbert",)
    base_model_prefix = "distilbert"
    has_token_types = False
    key_map = tuple((_L + a, _T + b) for a, b in (
        ("attention.self.query.{p}", "attention.q_lin.{p}"),
        ("attention.self.key.{p}", "attention.k_lin.{p}"),
        ("attention.self.value.{p}", "attention.v_lin.{p}"),
        ("attention.output.dense.{p}", "attention.out_lin.{p}"),
        ("attention.output.LayerNorm.{p}", "sa_layer_norm.{p}"),
        ("intermediate.dense.{p}", "ffn.lin1.{p}"),
        ("output.dense.{p}", "ffn.lin2.{p}"),
        ("output.LayerNorm.{p}", "output_layer_norm.{p}"),
    ))

    def __init__(self, config, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=False)
        if getattr(config, "sinusoidal_pos_embds", False):
            # as transformers initialises it (a checkpoint's table replaces it when one is loaded)
            with torch.no_grad():
                table = self.embeddings.position_embeddings.weight
                table.copy_(sinusoidal_table(table.shape[0], table.shape[1]).to(table.dtype))

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        """transformers' DistilBertModel.forward argument order (no token types: a token_type_ids argument is an
        error naming it)."""
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions, return_dict=return_dict, **kwargs)

    @classmethod
    def spec_of(cls, config):
        return layers.EncoderSpec(
            hidden=config.dim, heads=config.n_heads, layers=config.n_layers, intermediate=config.hidden_dim,
            activation=layers.activation_of(config.activation, "config.activation"), vocab=config.vocab_size,
            max_positions=config.max_position_embeddings, type_vocab=0, embedding_size=config.dim,
            pad_token_id=config.pad_token_id, eps=1e-12, hidden_dropout=config.dropout,
            attention_dropout=config.attention_dropout,
            # transformers' DistilBERT: no dropout after the attention's out_lin, config.dropout after the FFN
            attention_output_dropout=0.0, ffn_output_dropout=config.dropout,
            initializer_range=config.initializer_range)

    def has_pooler_output(self) -> bool:
        return False

    @staticmethod
    def output_class():
        from transformers.modeling_outputs import BaseModelOutput
        return BaseModelOutput


def sinusoidal_table(positions: int, dim: int) -> torch.Tensor:
    """DistilBERT's sinusoidal positions (float64): sin in the even columns, cos in the odd ones, each pair of
    columns at the frequency 10000 ** (-2 * (j // 2) / dim)."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    freq = torch.tensor([10000.0 ** (-2 * (j // 2) / dim) for j in range(dim)], dtype=torch.float64)
    angle = pos * freq
    table = torch.empty(positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table
