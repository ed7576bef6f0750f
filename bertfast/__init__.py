"""bertfast: BERT-family encoders on fused kernels, drop-in for transformers."""
__version__ = "0.1.0"
