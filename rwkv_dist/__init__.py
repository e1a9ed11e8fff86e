"""rwkv_dist: distributed pretraining for RWKV-4 language models."""

__version__ = "0.1.0"
