"""AlbertModel: embeddings of size embedding_size mapped to the hidden size, groups of layers shared across
depth (num_hidden_groups x inner_group_num unique layers run num_hidden_layers times), a dense + tanh pooler."""
from __future__ import annotations

from torch import nn

from bertfast.models import layers
from bertfast.models.base import EncoderModel
from bertfast.models.bert import bert_spec

_LAYER = "encoder.albert_layer_groups.{g}.albert_layers.{j}."
_OURS = "encoder.groups.{g}.{j}."


class AlbertEncoder(nn.Module):
    def __init__(self, config, spec):
        super().__init__()
        self.embedding_hidden_mapping_in = nn.Linear(spec.embedding_size, spec.hidden)
        self.groups = nn.ModuleList([nn.ModuleList([layers.Layer(spec) for _ in range(config.inner_group_num)])
                                     for _ in range(config.num_hidden_groups)])
        self.num_layers = config.num_hidden_layers

    def schedule(self):
        per_group = self.num_layers / len(self.groups)
        return [layer for i in range(self.num_layers) for layer in self.groups[int(i / per_group)]]


class AlbertModel(EncoderModel):
    model_types = ("albert",)
    base_model_prefix = "albert"
    embedding_projection = "encoder.embedding_hidden_mapping_in"
    key_map = tuple((_OURS + a, _LAYER + b) for a, b in (
        ("attention.self.query.{p}", "attention.query.{p}"),
        ("attention.self.key.{p}", "attention.key.{p}"),
        ("attention.self.value.{p}", "attention.value.{p}"),
        ("attention.output.dense.{p}", "attention.dense.{p}"),
        ("attention.output.LayerNorm.{p}", "attention.LayerNorm.{p}"),
        ("intermediate.dense.{p}", "ffn.{p}"),
        ("output.dense.{p}", "ffn_output.{p}"),
        ("output.LayerNorm.{p}", "full_layer_layer_norm.{p}"),
    )) + (("pooler.dense.{p}", "pooler.{p}"),)

    @classmethod
    def spec_of(cls, config):
        # transformers' AlbertLayer defines a dropout but adds its FFN output to the residual without it
        return bert_spec(config, embedding_size=config.embedding_size, ffn_output_dropout=False)

    def build_encoder(self, spec):
        self.encoder = AlbertEncoder(self.config, spec)

    @staticmethod
    def output_class():
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        return BaseModelOutputWithPooling
