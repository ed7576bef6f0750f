"""RobertaModel (also XLM-RoBERTa): BERT's layers; position ids count from padding_idx + 1 over real tokens."""
from __future__ import annotations

import dataclasses

import torch

from bertfast.models.bert import bert_spec
from bertfast.models.base import EncoderModel


class RobertaModel(EncoderModel):
    model_types = ("roberta", "xlm-roberta", "camembert")   # CamemBERT: the RoBERTa architecture
    base_model_prefix = "roberta"
    positions_count_tokens = True

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        pad = getattr(config, "pad_token_id", None)
        if not isinstance(pad, int) or not 0 <= pad < config.max_position_embeddings - 1:
            raise ValueError(f"config.pad_token_id must be an int in [0, max_position_embeddings - 1 = "
                             f"{config.max_position_embeddings - 1}): RoBERTa counts its positions from it, got {pad!r}")

    @classmethod
    def spec_of(cls, config):
        # transformers' RobertaEmbeddings build the position table with padding_idx = pad_token_id: that row
        # starts at zero and gets no gradient (pad tokens' positions; also ids a caller passes as positions)
        return dataclasses.replace(bert_spec(config), position_padding_idx=config.pad_token_id)

    def default_position_ids(self, input_ids, shape, device):
        pad = self.spec.pad_token_id
        if input_ids is None:      # transformers: sequential from padding_idx + 1 for inputs_embeds
            return torch.arange(pad + 1, shape[1] + pad + 1, device=device).expand(shape)
        real = (input_ids != pad).long()
        return torch.cumsum(real, dim=1) * real + pad

    def max_sequence_length(self) -> int:
        return self.spec.max_positions - self.spec.pad_token_id - 1


XLMRobertaModel = RobertaModel
