"""Moved: GradNormVar is :mod:`alam_dist.probe.statistic`; the pass runner and block
restarts are in :mod:`alam_dist.probe.restart`. These names keep old imports working."""
from alam_dist.probe.restart import BlockRestarts, ProbeRound  # noqa: F401
from alam_dist.probe.statistic import (AQ, Q8, ProbeJob, ProbeResult,  # noqa: F401
                                       captured_backward, error_ratio, grad_norms,
                                       grad_norms_and, gradnormvar, gradnormvar_of,
                                       pair_distances, preserved_training_state,
                                       probe_formats, record_forward)
