"""Alias of alam_dist with the ALAM reference code's names (``import alam``)."""
from alam_dist import *  # noqa: F401,F403
from alam_dist import ALAMConfig, Controller, codec, set_config  # noqa: F401
from alam import controller  # noqa: F401
