"""``from alam.controller import Controller`` as in the ALAM reference code."""
from alam_dist.controller import Controller, set_config  # noqa: F401
