"""Moved: :mod:`alam_dist.probe.watchdog`. This name is the same module, kept so that old
imports go on working."""
import sys

from alam_dist.probe import watchdog as _moved

sys.modules[__name__] = _moved
