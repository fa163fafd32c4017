"""``alam_dist.deepspeed``, the public name of :mod:`alam_dist.integrations.deepspeed` (the same
module object, so attributes set on one are seen on the other)."""
import sys

from alam_dist.integrations import deepspeed as _integration

sys.modules[__name__] = _integration
