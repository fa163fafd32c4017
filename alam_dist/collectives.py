"""Moved: :mod:`alam_dist.dist` (the Collective protocol and its torch.distributed
implementation). This name keeps old imports working."""
from alam_dist.dist import Collective, DistributedCollective  # noqa: F401
