"""What a training step leaves behind, for the GPU-readiness tests (real runs, CPU).

* :class:`SyncCounter`: the ops that make the host wait for the device on a GPU
  (``aten._local_scalar_dense`` behind ``.item()``/``int(t)``/``bool(t)``, ``aten.equal``,
  ``aten.is_nonzero``), counted with a ``TorchDispatchMode``. On the CPU they cost nothing,
  but they are dispatched all the same, so a CPU run shows every one a GPU run would pay.
* :func:`live_step_objects`: compressed activations still alive (``PackedTensor``s and the
  exact copies ALAM holds in ``Saved``), found among all objects the collector tracks --
  uncollected cycles included, since those hold memory too until a collection runs.
"""
from __future__ import annotations

import collections
import gc
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("_local_scalar_dense", "equal", "is_nonzero")


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.where: list[str] = []  # the Python line behind each, for a failing assertion

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.counts[name] += 1
            frames = [f for f in traceback.extract_stack()[:-1] if "step_probes" not in f.filename]
            self.where.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                          for f in frames[-4:][::-1]))
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def live_step_objects() -> dict[str, int]:
    from alam_dist.codec import PackedTensor
    from alam_dist.hooks.policy import Saved
    packed = saved = exact = 0
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: some objects warn when asked for __class__
        if kind is PackedTensor:
            packed += 1
        elif kind is Saved:
            saved += 1
            exact += obj.exact is not None
    return {"packed": packed, "saved": saved, "exact": exact}


def tensor_bytes_alive() -> int:
    """Bytes of all tensors the collector can see (a coarse check beside the counts)."""
    return sum(o.numel() * o.element_size() for o in gc.get_objects()
               if isinstance(o, torch.Tensor) and not isinstance(o, torch.nn.Parameter))
