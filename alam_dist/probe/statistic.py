"""GradNormVar: how much compressing one saved tensor perturbs the gradient.

For saved tensor ``i``, compress only ``i`` (others exact) and look at the vector of
gradient L2 norms (per parameter row by default, see :func:`grad_norms`): ``n_s`` and ``n_s1`` with average quantization under two
seeds, ``n8`` at 8 bits. Then

    sens_i = max(|n_s - n_s1|^2, 2 * max(|n_s - n8|^2, |n_s1 - n8|^2))

Cost: one forward serves every probe -- the forward is recorded with exact copies and
``unpack`` returns a compressed copy only for the probed key -- and each probe is three
backward passes with ``retain_graph=True``. Probes are independent :class:`ProbeJob`s,
so a distributed caller can run a share of them per rank and gather the results.

Nothing of training is disturbed: gradients come from ``torch.autograd.grad`` (``.grad``
untouched, and restored anyway in case the closure zeroes it), the CPU and CUDA RNG
states, module buffers (e.g. BatchNorm statistics) and train/eval flags are restored.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from alam_dist.hooks.modes import Record
from alam_dist.hooks.policy import SavedTensorPolicy

AQ, Q8 = 0.5, 8


@dataclass(frozen=True)
class ProbeJob:
    key: str
    index: int  # position in the round's job order (across groups): what rank-sharding splits on
    start: int | None = None
    """Where its backward passes start: None at the loss, else at the output of this
    transformer block (cheap rounds; see :class:`BlockRestarts`)."""


@dataclass
class ProbeResult:
    key: str
    sensitivity: float
    backward_passes: int
    seconds: float
    error_ratio: dict[float, float] = field(default_factory=dict)
    """Activation MSE of each compressed format relative to average quantization, measured
    on this tensor: scales ``sensitivity`` (measured at AQ) to the other formats."""


@contextlib.contextmanager
def preserved_training_state(model: torch.nn.Module,
                             params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Restore .grad, RNG (CPU + every CUDA device), buffers and train flags on exit."""
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            with torch.no_grad():
                for b, copy in buffers:
                    b.copy_(copy)
            for m, mode in modes:
                m.train(mode)


class captured_backward(TorchFunctionMode):
    """Within the block, ``tensor.backward()`` records the tensor instead of running.

    Lets a seed-style closure (forward, ``zero_grad``, ``loss.backward()``) serve as the
    probe's forward: the loss is captured, no gradient is computed or accumulated. A torch
    function mode, so it is scoped to this thread and this block (``torch.Tensor.backward``
    itself is never replaced: other threads and code outside the block are untouched).

        with captured_backward() as captured:
            closure()
        loss = captured[-1]
    """

    def __init__(self):
        super().__init__()
        self.captured: list[torch.Tensor] = []

    def __enter__(self) -> list[torch.Tensor]:
        super().__enter__()
        return self.captured

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.backward:
            self.captured.append(args[0])
            return None
        return func(*args, **(kwargs or {}))


def record_forward(policy: SavedTensorPolicy, closure: Callable[[], object],
                   mode: Record | None = None) -> torch.Tensor:
    """Run the closure's forward in record ``mode`` (default: every tensor exact) and
    return its (scalar) loss."""
    policy.release_recorded()
    with policy.using(mode or Record()), captured_backward() as captured:
        out = closure()
    loss = out if isinstance(out, torch.Tensor) else (captured[-1] if captured else None)
    if loss is None:
        raise RuntimeError("the probe closure neither returned a loss tensor nor called "
                           "loss.backward(); return the loss from the closure")
    if loss.numel() != 1:
        loss = loss.sum()
    return loss


def grad_norms(loss: torch.Tensor, params: list[torch.nn.Parameter],
               granularity: str = "row", retain_graph: bool = True,
               grad_output: torch.Tensor | None = None) -> torch.Tensor:
    """The vector GradNormVar compares: L2 norms of the parameter gradients.

    ``"param"``: one norm per parameter (the reference code). ``"row"`` (default): one
    per output row of each parameter (per element for 1-D ones). Still a vector of L2
    norms, O(rows) memory, but it also moves when a compressed activation turns the
    gradient without changing whole-parameter norms -- e.g. average quantization of a
    final RMSNorm input, which the per-parameter statistic misses (docs/controller.md).

    ``loss`` may be any tensor with ``grad_output`` (a restart point's dL/d(tensor)).
    Parameters it does not reach get norms of 0, without a gradient-sized zero buffer.

    Memory: each parameter's gradient is reduced to its norms by a hook the moment it is
    computed and replaced by a zero-stride placeholder, so a pass never holds more than
    one parameter's gradient (``autograd.grad`` alone would return all of them at once:
    the whole model's gradients, on every rank even under ZeRO-3).
    """
    return grad_norms_and(loss, params, None, granularity, retain_graph, grad_output)[0]


def grad_norms_and(root: torch.Tensor, params: list[torch.Tensor], also: torch.Tensor | None,
                   granularity: str = "row", retain_graph: bool = True,
                   grad_output: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`grad_norms`, and in the same backward the whole gradient at ``also`` (a
    block's input: what the block-local round hands down); None when ``also`` is None
    or not reached."""
    norms: dict[int, torch.Tensor] = {}

    def keep_norms(index: int):
        def hook(g: torch.Tensor) -> torch.Tensor:
            norms[index] = _norm_vector(g.detach(), granularity)
            return g.new_zeros(()).expand_as(g)
        return hook

    handles = [p.register_hook(keep_norms(i)) for i, p in enumerate(params)]
    inputs = list(params) + ([also] if also is not None else [])
    try:
        grads = torch.autograd.grad(root, inputs, grad_outputs=grad_output,
                                    retain_graph=retain_graph, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    parts = []
    for i, p in enumerate(params):
        if i in norms:
            parts.append(norms[i])
            continue
        shape = tuple(getattr(p, "ds_shape", None) or p.shape)  # ZeRO-3 partitions report theirs
        rows = 1 if granularity == "param" else (shape[0] if len(shape) >= 2 else
                                                   max(1, int(torch.Size(shape).numel())))
        parts.append(torch.zeros(rows, dtype=torch.float32, device=p.device))  # not reached
    vector = torch.cat(parts).double() if parts else torch.zeros(0, dtype=torch.float64)
    g_also = grads[-1] if also is not None else None
    return vector, (g_also.detach() if g_also is not None else None)


def _norm_vector(g: torch.Tensor, granularity: str) -> torch.Tensor:
    g = g.float()
    if granularity == "param":
        return g.norm().reshape(1)
    if g.dim() >= 2:
        return g.reshape(g.shape[0], -1).norm(dim=1)
    return g.abs().reshape(-1)


def pair_distances(values: list[torch.Tensor | None]) -> tuple[float, float, float]:
    """|a - b|^2, |a - c|^2, |b - c|^2 of three passes' vectors, in pass order (AQ seed s,
    AQ seed s+1, 8 bits); 0 where a pass measured nothing."""
    if any(v is None for v in values):
        return (0.0, 0.0, 0.0)
    a, b, c = (v.double() for v in values)
    return (float((a - b).pow(2).sum()), float((a - c).pow(2).sum()), float((b - c).pow(2).sum()))


def gradnormvar_of(pairs: tuple[float, float, float]) -> float:
    """sens = max(|n_s - n_s1|^2, 2 * max(|n_s - n8|^2, |n_s1 - n8|^2)) from the distances."""
    between_seeds, s_vs_8bit, s1_vs_8bit = pairs
    return max(between_seeds, 2.0 * max(s_vs_8bit, s1_vs_8bit))


def gradnormvar(n_s: torch.Tensor, n_s1: torch.Tensor, n8: torch.Tensor) -> float:
    return gradnormvar_of(pair_distances([n_s, n_s1, n8]))


def probe_formats(ladder: tuple[float, ...]) -> tuple[float, ...]:
    """The formats whose error ratio to AQ a probe measures: the ladder's compressed ones."""
    return tuple(f for f in ladder if f < 16 and f != AQ)


def error_ratio(policy: SavedTensorPolicy, x: torch.Tensor | None, seed: int,
                formats: tuple[float, ...]) -> dict[float, float]:
    """MSE(format) / MSE(AQ) of a tensor's own values (1 encode+decode per format): scales
    a sensitivity measured at AQ to the other formats. {} without the tensor."""
    if x is None:
        return {}
    xf = x.detach().float()

    def mse(fmt: float) -> float:
        y = policy.round_trip(x, fmt, seed)
        return float((y.float() - xf).pow(2).mean())

    base = mse(AQ)
    if base <= 0.0:
        return {f: 0.0 for f in formats}
    return {f: mse(f) / base for f in formats}
