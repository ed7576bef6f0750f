"""bertfast: BERT-family encoders on fused kernels, a drop-in for transformers.

    import bertfast
    model = bertfast.BertModel.from_pretrained("path/or/id", torch_dtype=torch.float16)
    out = model(input_ids, attention_mask=mask)       # transformers' arguments and output classes
"""
__version__ = "0.1.0"

from bertfast import ops  # noqa: E402,F401
from bertfast.loading import CheckpointError  # noqa: E402,F401
from bertfast.models.bert import BertModel  # noqa: E402,F401

__all__ = ["BertModel", "CheckpointError", "ops", "__version__"]
