"""Moved: :mod:`alam_dist.plan` (``Plan``, ``allocate``). This name is the same module,
kept so that old imports go on working."""
import sys

from alam_dist import plan as _plan

sys.modules[__name__] = _plan
