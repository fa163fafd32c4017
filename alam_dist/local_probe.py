"""Moved: :mod:`alam_dist.probe.local`. This name is the same module, kept so that old
imports go on working."""
import sys

from alam_dist.probe import local as _moved

sys.modules[__name__] = _moved
