"""ElectraModel: BERT's layers, embeddings of size embedding_size projected to the hidden size, no pooler."""
from __future__ import annotations

from torch import nn

from bertfast.models.bert import bert_spec
from bertfast.models.base import EncoderModel


class ElectraModel(EncoderModel):
    model_types = ("electra",)
    base_model_prefix = "electra"

    def __init__(self, config, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=False)
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = nn.Linear(config.embedding_size, config.hidden_size)
            self.embedding_projection = "embeddings_project"
            from bertfast.models.layers import init_weights
            init_weights(self.embeddings_project, config.initializer_range)

    @classmethod
    def spec_of(cls, config):
        return bert_spec(config, embedding_size=config.embedding_size)

    def has_pooler_output(self) -> bool:
        return False

    @staticmethod
    def output_class():
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
        return BaseModelOutputWithPastAndCrossAttentions
