"""alam_dist: activation-compressed training (ALAM) for distributed LLM training."""
from alam_dist import codec

__version__ = "0.1.0"
__all__ = ["codec"]
