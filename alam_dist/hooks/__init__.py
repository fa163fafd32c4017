"""Saved-tensor hooks: where a tensor is saved (keys), what it is (classify), what is done
with it (modes), and the policy that ties them to one model (policy)."""
from alam_dist.hooks.classify import is_weight, key_seed, model_fingerprint  # noqa: F401
from alam_dist.hooks.modes import Compress, Measure, Mode, Off, Record  # noqa: F401
from alam_dist.hooks.policy import (Saved, SavedTensorPolicy, StepStats,  # noqa: F401
                                    TensorInfo)

__all__ = ["Compress", "Measure", "Mode", "Off", "Record", "Saved", "SavedTensorPolicy",
           "StepStats", "TensorInfo", "is_weight", "key_seed", "model_fingerprint"]
