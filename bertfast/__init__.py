"""bertfast: BERT-family encoders on fused kernels, a drop-in for transformers.

    import bertfast
    model = bertfast.AutoModel.from_pretrained("path/or/id", torch_dtype=torch.float16)
    out = model(input_ids, attention_mask=mask)       # transformers' arguments and output classes
    hf_model = bertfast.optimize(hf_model)            # swap the encoder inside a transformers model
"""
__version__ = "0.1.0"

from bertfast import ops  # noqa: E402,F401
from bertfast.loading import CheckpointError  # noqa: E402,F401
from bertfast.models import (AlbertModel, AutoModel, BertModel, DistilBertModel, ElectraModel,  # noqa: E402,F401
                             RobertaModel, XLMRobertaModel)
from bertfast.optimize import optimize  # noqa: E402,F401

__all__ = ["AutoModel", "AlbertModel", "BertModel", "DistilBertModel", "ElectraModel", "RobertaModel",
           "XLMRobertaModel", "CheckpointError", "optimize", "ops", "__version__"]
