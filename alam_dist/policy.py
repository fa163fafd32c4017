"""Moved: :mod:`alam_dist.hooks.policy` (keys, classification and modes beside it in
:mod:`alam_dist.hooks`). This name is the same module, kept so that old imports go on
working."""
import sys

from alam_dist.hooks import policy as _moved

sys.modules[__name__] = _moved
