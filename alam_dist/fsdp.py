"""``alam_dist.fsdp``, the public name of :mod:`alam_dist.integrations.fsdp` (the same
module object, so attributes set on one are seen on the other)."""
import sys

from alam_dist.integrations import fsdp as _integration

sys.modules[__name__] = _integration
