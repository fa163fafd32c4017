"""Moved: :mod:`alam_dist.probe.blocks`. This name is the same module, kept so that old
imports go on working."""
import sys

from alam_dist.probe import blocks as _moved

sys.modules[__name__] = _moved
