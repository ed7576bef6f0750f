"""bertfast.BertModel: a drop-in for transformers.BertModel (also MiniLM and every BERT checkpoint)."""
from __future__ import annotations

from bertfast.models import layers
from bertfast.models.base import EncoderModel


def bert_spec(config, embedding_size: int | None = None, ffn_output_dropout: bool = True) -> layers.EncoderSpec:
    """The encoder spec of a BERT-style config (BERT, RoBERTa, ELECTRA, ALBERT share these field names).
    ffn_output_dropout False: the layer applies no dropout to its FFN output (ALBERT)."""
    return layers.EncoderSpec(
        hidden=config.hidden_size, heads=config.num_attention_heads, layers=config.num_hidden_layers,
        intermediate=config.intermediate_size, activation=layers.activation_of(config.hidden_act),
        vocab=config.vocab_size, max_positions=config.max_position_embeddings,
        type_vocab=config.type_vocab_size, embedding_size=embedding_size or config.hidden_size,
        pad_token_id=config.pad_token_id, eps=config.layer_norm_eps, hidden_dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob, attention_output_dropout=config.hidden_dropout_prob,
        ffn_output_dropout=config.hidden_dropout_prob if ffn_output_dropout else 0.0,
        initializer_range=config.initializer_range)


class BertModel(EncoderModel):
    model_types = ("bert",)
    base_model_prefix = "bert"

    @classmethod
    def spec_of(cls, config):
        return bert_spec(config)
