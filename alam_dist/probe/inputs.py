"""What a probe round's forward runs on and returns: a slice of the training forward's
inputs, and the loss in the model's output. Integrations call these."""
from __future__ import annotations

import math

import torch


def loss_of(output: object) -> torch.Tensor:
    """The loss in a model's output: the tensor itself, ``.loss`` or ``["loss"]`` (Hugging
    Face models given labels). Probes need it from the model's own forward."""
    if isinstance(output, torch.Tensor):
        return output
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise ValueError("ALAM probes need the loss from the model's forward: return a loss "
                         "tensor, or an output with .loss / ['loss'] (e.g. Hugging Face models "
                         "given labels)")
    return loss


def slice_inputs(args: tuple, kwargs: dict, fraction: float) -> tuple[tuple, dict, tuple[int, int]]:
    """The first ``ceil(batch * fraction)`` samples of a forward's inputs (at least one):
    every tensor argument whose first dimension is the batch size (that of the first
    tensor argument) is cut, the rest passed as is. Samples, not tokens: a token prefix
    would shrink attention-sized tensors quadratically and skew the sizes the allocator
    weighs tensors by. A micro-batch of one sample is used whole. Returns the sliced
    arguments and (kept, total) samples: pass it to :meth:`Controller.probe` as
    ``batch_share``."""
    first = next((t for t in (*args, *kwargs.values())
                  if isinstance(t, torch.Tensor) and t.dim() >= 1), None)
    if fraction >= 1 or first is None or first.shape[0] <= 1:
        return args, kwargs, (1, 1)
    batch = first.shape[0]
    rows = max(1, math.ceil(batch * fraction))

    def cut(t):
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch:
            return t[:rows]
        return t

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}, (rows, batch)
