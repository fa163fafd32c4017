"""alam_dist: activation-compressed training (ALAM) for distributed LLM training.

    >>> import alam_dist
    >>> ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=1, total_steps=1000))  # doctest: +SKIP
"""
from alam_dist import codec
from alam_dist.plan import Plan, PlanMismatchError, allocate
from alam_dist.config import ALAMConfig
from alam_dist.controller import Controller, apply, set_config
from alam_dist.dist import Collective
from alam_dist.report import SavedActivationMeter

__version__ = "0.1.0"
__all__ = ["ALAMConfig", "Collective", "Controller", "Plan", "PlanMismatchError",
           "SavedActivationMeter", "allocate", "apply", "codec", "set_config"]
