"""The encoder families. AutoModel picks one from config.json's model_type."""
from bertfast.models.albert import AlbertModel
from bertfast.models.base import EncoderModel
from bertfast.models.bert import BertModel
from bertfast.models.distilbert import DistilBertModel
from bertfast.models.electra import ElectraModel
from bertfast.models.roberta import RobertaModel, XLMRobertaModel

FAMILIES = {t: cls for cls in (BertModel, RobertaModel, ElectraModel, AlbertModel, DistilBertModel)
            for t in cls.model_types}


class AutoModel:
    """``AutoModel.from_pretrained(path_or_id)``: the family from config.json's model_type."""

    @staticmethod
    def family(config) -> type[EncoderModel]:
        model_type = getattr(config, "model_type", None)
        if model_type not in FAMILIES:
            raise ValueError(f"config.model_type {model_type!r} is not served by bertfast; supported: "
                             f"{', '.join(sorted(FAMILIES))}")
        return FAMILIES[model_type]

    @classmethod
    def from_pretrained(cls, path_or_id, **kwargs) -> EncoderModel:
        """The family's from_pretrained (same arguments); the family comes from config= when given, else from
        the checkpoint's config.json."""
        import os

        from bertfast import loading
        config = kwargs.get("config")
        if config is None or isinstance(config, (str, os.PathLike)):
            hub = {k: kwargs[k] for k in (*loading.HUB_ARGS, "subfolder") if k in kwargs and k != "force_download"}
            config, _ = loading.read_config(loading.resolve(path_or_id if config is None else config,
                                                             config_only=True, **hub))
        return cls.family(config).from_pretrained(path_or_id, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs) -> EncoderModel:
        return cls.family(config)(config, **kwargs)

    @classmethod
    def from_hf(cls, hf_model) -> EncoderModel:
        from bertfast.models.base import hf_encoder_of
        return cls.family(hf_encoder_of(hf_model).config).from_hf(hf_model)


__all__ = ["AutoModel", "AlbertModel", "BertModel", "DistilBertModel", "ElectraModel", "EncoderModel",
           "RobertaModel", "XLMRobertaModel", "FAMILIES"]
