"""The block-local probe round: GradNormVar one transformer block at a time.

A full round's pass for a tensor saved in block b back-propagates through the whole
model. Split the compared norm vector by where its parameters live:

* above block b: the same in every pass (0 to the statistic, see BlockRestarts);
* in block b: measured exactly by a backward through block b alone, from the exact
  dL/dh_b at its output (its *level*);
* in block b-1 (its *window*): measured exactly too, by a backward through block b-1 from
  the gradient block b handed down in that pass;
* further down: estimated. The norms there move only through the perturbation of the
  gradient the window hands on, ``delta``; to first order they move by
  ``R(b-1) * |delta|^2``, where R is measured once per block, not per tensor: perturbing
  a block's output gradient with seeded noise shaped like the gradient gives the block's
  own response ``lam`` and its gain ``gam``, and ``R(l) = lam(l-1) + gam(l-1) R(l-1)``.
  A compression error is coherent across tokens, noise is not (and weight gradients sum
  over tokens), so the estimate is scaled by how much more the job's own perturbation
  moved the window's norms than the noise did (without that, on MiniLM it fell 5-30x
  short; with it, within about 2x, and the plans keep their quality: docs/controller.md).

The segment above the stack (final norm, head, loss) and the one below it (embeddings)
are levels too. So a tensor's three passes cost two blocks' backward each (one, where the
tensor does not reach the gradient handed down: a linear layer's input), plus per block
one recomputed forward of the block, one exact pass and one calibration pass (every
rank runs those; the tensors' passes are shared across ranks). Memory is bounded like
activation checkpointing: the round's first forward keeps only each block's input (and
the small segments above and below the stack exact); two blocks' saved tensors are exact
at a time.

Preconditions, checked on the first forward (otherwise the round falls back to the
cheap one, with a warning): every block runs exactly once, in order; nothing but the
hidden state that carries a gradient passes from one block to another; no saved tensor
outside the blocks is saved between two blocks. Key/value caches passed to blocks are
dropped from the recorded calls; the recompute replays the first forward's RNG state
and autocast contexts.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from alam_dist.hooks.modes import Record
from alam_dist.hooks.policy import SavedTensorPolicy, TensorInfo, key_seed
from alam_dist.probe.blocks import BlockStack
from alam_dist.probe.restart import ProbeRound
from alam_dist.probe.statistic import (ProbeJob, ProbeResult, error_ratio, gradnormvar_of,
                                       grad_norms_and, pair_distances, probe_formats,
                                       record_forward)

if TYPE_CHECKING:
    from alam_dist.probe import RoundOutcome

BELOW = -1
"""Level of the segment below the stack (embeddings): nothing is below it."""

CALIBRATION_SCALE = 0.1
"""The calibration noise is this fraction of the gradient, element-wise: small enough to
measure the stack's first-order response, large enough to stand above rounding."""


class NotLocal(Exception):
    """The model's forward does not meet the block-local round's preconditions."""


def _split_hidden(args: tuple, kwargs: dict) -> tuple[str, object, torch.Tensor]:
    """Where a block's hidden-state argument is: the first tensor positional argument,
    else ``hidden_states=``."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return "arg", i, a
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "kw", "hidden_states", kwargs["hidden_states"]
    raise NotLocal("a block was called without a tensor hidden state")


def _with_hidden(args: tuple, kwargs: dict, where: tuple[str, object], h: torch.Tensor):
    kind, slot = where
    if kind == "arg":
        args = args[:slot] + (h,) + args[slot + 1:]
    else:
        kwargs = dict(kwargs, **{slot: h})
    return args, kwargs


def _first_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


_CACHE_KWARGS = frozenset({"past_key_value", "past_key_values", "cache", "layer_past"})


def _is_cache(name: str | None, value) -> bool:
    """A key/value cache (Hugging Face ``Cache`` objects): stateful, and holding every
    block's keys and values. A recompute given it would attend to the first forward's
    cached keys instead of its own, so it is dropped from the recorded call."""
    return (name in _CACHE_KWARGS and value is not None) or type(value).__name__.endswith("Cache")


def _gradient_free(value):
    """``value`` as is, after checking that no tensor in it carries a gradient (such a
    tensor would tie the block to the graph of another: NotLocal)."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise NotLocal("a tensor that carries a gradient (other than the hidden state) "
                           "is passed to a block")
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_gradient_free(v) for v in value)
    if isinstance(value, dict):
        return {k: _gradient_free(v) for k, v in value.items()}
    return value


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """The autocast contexts active now (device type, dtype): a block's recompute runs
    under the same ones as its first forward."""
    active = []
    for device in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device):
                active.append((device, torch.get_autocast_dtype(device)))
        except (RuntimeError, TypeError):  # a device type this build does not know
            continue
    return active


def _rng_state() -> tuple:
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = (torch.cuda.current_device(), torch.cuda.get_rng_state())
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda[1], cuda[0])


@dataclass
class BlockCall:
    where: tuple[str, object]
    args: tuple
    kwargs: dict
    hidden: torch.Tensor  # the block's input, detached
    rng: tuple  # RNG state at the call: the recompute draws the same dropout masks
    autocast: list = field(default_factory=list)  # (device, dtype) of active autocast contexts


class BoundaryForward:
    """Hooks for the round's first forward: keep each block's call (input detached), cut
    the graph at every block's input, and root the segment above the stack at a leaf."""

    def __init__(self, stack: BlockStack, policy: SavedTensorPolicy):
        self.stack, self.policy = stack, policy
        self.calls: dict[int, BlockCall] = {}
        self.order: list[int] = []
        self.bottom_root: torch.Tensor | None = None  # block 0's input, with its graph
        self.top_leaf: torch.Tensor | None = None  # the last block's output, as a leaf
        self.seen_at: dict[str, int] = {}  # inventory size when each block started / ended
        self.problem: str | None = None
        self._handles = []
        for b, module in enumerate(stack.modules):
            self._handles.append(module.register_forward_pre_hook(self._pre(b), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(b)))

    def _pre(self, b: int):
        def hook(module, args, kwargs):
            try:
                if b in self.calls:
                    raise NotLocal(f"block {b} ran twice in one forward")
                if self.order and self.order[-1] != b - 1 or not self.order and b != 0:
                    raise NotLocal(f"block {b} ran out of order")
                kind, slot, h = _split_hidden(args, kwargs)
                # the hidden state's slot is left empty: the tensor (with its graph) would
                # keep every earlier block's saved tensors alive for the whole round
                rest_args = tuple(None if _is_cache(None, a) or a is h else _gradient_free(a)
                                  for a in args)
                rest_kwargs = {k: (None if _is_cache(k, v) or v is h else _gradient_free(v))
                               for k, v in kwargs.items()}
                if "use_cache" in rest_kwargs:
                    rest_kwargs["use_cache"] = False
            except NotLocal as err:
                self.problem = self.problem or str(err)
                return None
            self.order.append(b)
            if b == 0:
                self.bottom_root = h if h.requires_grad else None
                self.seen_at["first"] = len(self.policy.seen)
            # a leaf that wants a gradient: the block records the graph (and saves the
            # tensors) it records in training; the policy knows it for an activation
            hidden = h.detach().requires_grad_(h.requires_grad)
            self.policy.activation_leaves[id(hidden)] = hidden
            self.calls[b] = BlockCall((kind, slot), rest_args, rest_kwargs, hidden, _rng_state(),
                                      _autocast_state())
            # the block's graph dies with its output: its tensors are not kept
            return _with_hidden(args, kwargs, (kind, slot), hidden)
        return hook

    def _post(self, b: int):
        def hook(module, args, output):
            if b != self.stack.count - 1 or self.problem:
                return None
            self.seen_at["last"] = len(self.policy.seen)
            out = _first_tensor(output)
            leaf = out.detach().requires_grad_(True)
            self.policy.activation_leaves[id(leaf)] = leaf
            self.top_leaf = leaf
            if isinstance(output, tuple):
                return (leaf,) + tuple(output[1:])
            if isinstance(output, list):
                return [leaf] + list(output[1:])
            return leaf
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def segments(self, keys_in_order: list[str]) -> tuple[list[str], list[str]]:
        """(keys saved below the stack, keys saved above it); raises NotLocal for a key
        outside the blocks saved between two blocks."""
        if self.problem:
            raise NotLocal(self.problem)
        if self.order != list(range(self.stack.count)) or self.top_leaf is None:
            raise NotLocal("not every block ran (in order) in the probe forward")
        first, last = self.seen_at["first"], self.seen_at["last"]
        below, above = [], []
        for i, key in enumerate(keys_in_order):
            if self.stack.block_of(key) is not None:
                continue
            if i < first:
                below.append(key)
            elif i >= last:
                above.append(key)
            else:
                raise NotLocal(f"{key!r} is saved between two blocks, outside both")
        return below, above


@dataclass
class LocalJobResult:
    """A job's three passes, as pairwise squared distances (AQ seed s vs s+1, s vs 8 bits,
    s+1 vs 8 bits) of what each pass measured."""

    key: str
    level: int  # block index; stack.count above the stack, BELOW below it
    window: int | None  # the level below it that its passes also ran through (None: none)
    local: tuple[float, float, float]  # norms of its own level's parameters
    window_norms: tuple[float, float, float]  # norms of the window's parameters
    handed: tuple[float, float, float]  # the gradient its level hands down
    beyond: tuple[float, float, float]  # the gradient the window hands further down
    seconds: float
    error_ratio: dict[float, float] = field(default_factory=dict)


class _Segments:
    """The graphs of the segments above and below the stack (final norm, head, loss;
    embeddings): the first forward's once, then -- where weights are re-partitioned
    after each backward (ZeRO-3) -- a new forward per pass."""

    def __init__(self, round_: "LocalRound", loss: torch.Tensor, capture: "BoundaryForward"):
        self._round, self.loss, self.capture = round_, loss, capture
        self._used = False

    def take(self) -> tuple["BoundaryForward", torch.Tensor | None]:
        if self.capture is not None and (not self._round.forward_per_pass or not self._used):
            self._used = True
            return self.capture, self.loss
        self.clear()
        self.loss, self.capture = self._round.boundary_forward()
        return self.capture, self.loss

    def clear(self) -> None:
        self.capture = self.loss = None


class _Level:
    """One level's graph: where a pass starts, what it measures, where it ends. Blocks
    are recomputed from the first forward's recorded input (again per pass where
    weights are re-partitioned after each backward); the segments come from
    :class:`_Segments`."""

    def __init__(self, round_: "LocalRound", level: int, capture: "BoundaryForward",
                 segments: _Segments, params: list[torch.Tensor]):
        self._round, self.level, self._capture, self._segments = round_, level, capture, segments
        self.params = params
        self._segment = level in (round_.stack.count, BELOW)
        self._pair = None if self._segment else round_.recompute(capture, level)
        self._fresh = True

    def _graph(self) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        """(root, does the pass start at the loss?, the input whose gradient is handed down)"""
        if self.level == self._round.stack.count:
            capture, loss = self._segments.take()
            return loss, True, capture.top_leaf
        if self.level == BELOW:
            capture, _ = self._segments.take()
            return capture.bottom_root, False, None
        if self._round.forward_per_pass and not self._fresh:
            self._pair = None
            self._pair = self._round.recompute(self._capture, self.level)
        self._fresh = False
        return self._pair[0], False, self._pair[1]

    def run(self, upstream: torch.Tensor | None, target) -> tuple[torch.Tensor, torch.Tensor | None]:
        root, from_loss, down = self._graph()
        return self._round.local_pass(root, None if from_loss else upstream, self.params, down, target)

    def close(self) -> None:
        self._pair = None


class _JobPasses:
    """A job's pass at one level: through the level, then through its window from the
    gradient the level handed down. Returns (level norms, window norms, gradient handed
    down, gradient the window hands on)."""

    def __init__(self, current: _Level, window: _Level | None, upstream: torch.Tensor | None,
                 g_exact: torch.Tensor | None, collective_passes: bool):
        self.current, self.window, self.upstream = current, window, upstream
        self.g_exact, self.collective_passes = g_exact, collective_passes
        self._window_exact: tuple | None = None

    def __call__(self, target):
        n, g = self.current.run(self.upstream, target)
        if self.window is None or g is None:
            return n, None, g, None
        if not self.collective_passes and torch.equal(g, self.g_exact):
            # the tensor does not reach the gradient handed down (a linear layer's
            # input): the window sees the exact gradient; measured once per level
            # (where passes are collectives every rank runs every pass instead)
            if self._window_exact is None:
                self._window_exact = self.window.run(self.g_exact, None)
            return (n, self._window_exact[0], g, self._window_exact[1])
        n_w, g_w = self.window.run(g, None)
        return n, n_w, g, g_w


@dataclass
class _Tally:
    """What a round collects over its levels."""

    results: list = field(default_factory=list)
    group_cost: list = field(default_factory=list)
    lam: dict = field(default_factory=dict)
    gam: dict = field(default_factory=dict)
    mine: int = 0
    padding: int = 0
    job_passes: int = 0


@dataclass
class LocalRound:
    """Runs a block-local round. The controller supplies the pieces it owns."""

    policy: SavedTensorPolicy
    stack: BlockStack
    closure: Callable[[], object]
    model_params: list[torch.Tensor]
    stat_params: list[torch.Tensor]
    param_names: list[str]
    seed: int
    formats: tuple[float, ...]
    granularity: str
    forward_per_pass: bool
    beat: Callable[[str], None]
    passes: int = 0
    forwards: int = 0
    block_forwards: int = 0

    PASSES = ProbeRound.PASSES

    # -- the pieces -------------------------------------------------------------------------
    def boundary_forward(self) -> tuple[torch.Tensor, BoundaryForward]:
        """The closure's forward: block tensors inventoried but not kept; the segments
        below and above the stack recorded exactly."""
        stack = self.stack
        capture = BoundaryForward(stack, self.policy)
        mode = Record(exact=lambda key: stack.block_of(key) is None,
                      plain=lambda key: stack.block_of(key) is not None)
        try:
            loss = record_forward(self.policy, self.closure, mode)
        finally:
            capture.remove()
        self.forwards += 1
        return loss, capture

    def recompute(self, capture: BoundaryForward, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block b's forward again from its recorded input, its tensors exact."""
        call = capture.calls[b]
        h = call.hidden.detach().requires_grad_(True)
        self.policy.activation_leaves[id(h)] = h
        args, kwargs = _with_hidden(call.args, call.kwargs, call.where, h)
        saved_rng = _rng_state()
        try:
            _set_rng_state(call.rng)
            with contextlib.ExitStack() as contexts:
                contexts.enter_context(self.policy.using(
                    Record(exact=lambda key: self.stack.block_of(key) == b)))
                contexts.enter_context(torch.enable_grad())
                for device, dtype in call.autocast:
                    contexts.enter_context(torch.autocast(device, dtype=dtype))
                out = _first_tensor(self.stack.modules[b](*args, **kwargs))
        finally:
            _set_rng_state(saved_rng)
        self.block_forwards += 1
        return out, h

    def local_pass(self, root: torch.Tensor, grad_output: torch.Tensor | None,
                   params: list[torch.Tensor], down: torch.Tensor | None,
                   target: tuple[str, float, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Row norms of ``params``' gradients and the gradient at ``down`` (None: none),
        with ``target`` (key, format, seed) compressed."""
        with self.policy.targeting(target):
            out = grad_norms_and(root, params, down, self.granularity, True, grad_output)
        self.passes += 1
        return out

    # -- the round ---------------------------------------------------------------------------
    def run(self, collective, collective_passes: bool) -> LocalOutcome:
        """The whole round on this rank; raises NotLocal (on every rank alike) when the
        model does not meet the preconditions -- nothing of training was touched then."""
        count = self.stack.count
        self.beat("recording the probe forward")
        loss, capture = self.boundary_forward()
        seen, small, below, groups = self._inventory(capture, collective)
        in_block, outside_params = self._parameters_by_level()
        # the segment below keeps its exact tensors (in its graph) while the blocks run;
        # their copies for the error ratios are kept here
        below_exact = {k: v for k, v in self.policy.recorded_exact().items() if k in below}
        has_bottom = capture.bottom_root is not None and capture.bottom_root.grad_fn is not None
        if below and not has_bottom:
            raise NotLocal("tensors are saved below the blocks but block 0's input has no graph")
        segments = _Segments(self, loss, capture)
        del loss

        def level_graph(level: int) -> _Level:
            params = (outside_params if level in (count, BELOW)
                      else [self.stat_params[i] for i in in_block.get(level, [])])
            return _Level(self, level, capture, segments, params)

        def level_exists(level: int) -> bool:
            return level >= 0 or (level == BELOW and has_bottom)

        # the window below block 0 is the segment below the stack; where every pass needs a
        # new forward (ZeRO-3) that would be a whole forward per pass: no window there
        def window_of(level: int) -> int | None:
            w = level - 1
            if w == BELOW and (self.forward_per_pass or not has_bottom):
                return None
            return w if level_exists(w) and level != BELOW else None

        tally = _Tally()
        upstream = None  # dL/d(output of the current level); None above the stack
        current = level_graph(count)
        for gi, level in enumerate([count] + list(reversed(range(count))) + [BELOW]):
            self.beat(f"level {level} of the block-local round")
            t_level = time.perf_counter()
            w = window_of(level)
            window = level_graph(w) if w is not None else None
            upstream = self._run_level(level, current, window, upstream, groups[gi], collective,
                                       collective_passes, tally, below_exact, t_level)
            current.close()
            done = None if level in (count, BELOW) else level
            self.policy.release_recorded(lambda key, lv=done: self.stack.block_of(key) == lv)
            if level == count:
                segments.loss = None  # the segment above is done: free its graph
            if window is not None:
                current = window
            elif level_exists(level - 1) and level != BELOW:
                current = level_graph(level - 1)
            else:
                break
        segments.clear()
        self.policy.release_recorded()
        rho = rhos(tally.lam, tally.gam, count)
        return LocalOutcome(finish(tally.results, rho, tally.lam), seen, small, groups,
                            tally.group_cost, tally.mine, tally.padding, rho, passes=self.passes,
                            forwards=self.forwards, block_forwards=self.block_forwards,
                            job_passes=tally.job_passes)

    def _inventory(self, capture: "BoundaryForward", collective):
        """(seen, small, below, groups), identical on every rank: the merged inventory,
        the keys saved below the stack, and the jobs by level -- above the stack, the
        blocks top down, below the stack. Every rank decides alike whether the round
        applies (one rank falling back alone would desynchronise them)."""
        try:
            below, above = capture.segments(list(self.policy.seen))
            problem = None
        except NotLocal as err:
            below, above, problem = [], [], str(err)
        views = collective.gather((problem, below, above))
        problems = [p for p, _, _ in views if p]
        if problems:
            raise NotLocal(problems[0])
        below = sorted({k for _, b, _ in views for k in b})
        above = sorted({k for _, _, a in views for k in a})
        self.beat("gathering the saved-tensor inventory from every rank")
        seen = collective.gather_inventory(dict(self.policy.seen))
        small = collective.gather_inventory({k: TensorInfo(0, 0, "") for k in self.policy.seen_small})
        block_keys: dict[int, list[str]] = {}
        for key in seen:
            b = self.stack.block_of(key)
            if b is not None:
                block_keys.setdefault(b, []).append(key)
            elif key not in below and key not in above:
                above.append(key)  # saved only on other ranks, after their stacks
        order = [(self.stack.count, sorted(above))] + [
            (b, sorted(block_keys.get(b, []))) for b in reversed(range(self.stack.count))
        ] + [(BELOW, below)]
        groups, index = [], 0
        for level, keys in order:  # indices run on across groups: shares stay within one job
            groups.append([ProbeJob(k, index + i, level) for i, k in enumerate(keys)])
            index += len(keys)
        return seen, small, below, groups

    def _parameters_by_level(self) -> tuple[dict[int, list[int]], list[torch.Tensor]]:
        """Indices of the statistic's parameters per block, and those outside the stack."""
        in_block: dict[int, list[int]] = {}
        outside: list[int] = []
        for i, name in enumerate(self.param_names):
            b = self.stack.block_of(name)
            (in_block.setdefault(b, []) if b is not None else outside).append(i)
        return in_block, [self.stat_params[i] for i in outside]

    def _run_level(self, level: int, current: "_Level", window: "_Level | None",
                   upstream: torch.Tensor | None, group: list[ProbeJob], collective,
                   collective_passes: bool, tally: "_Tally", below_exact: dict,
                   t_level: float) -> torch.Tensor | None:
        """One level: its exact pass (the gradient it hands down, returned), its calibration
        pass, then this rank's jobs (and padding, where passes are collectives)."""
        n_exact, g_exact = current.run(upstream, None)
        if upstream is not None:  # calibration: the response to noise on the gradient from above
            z = calibration_noise(upstream, self.seed, level)
            n_z, g_z = current.run(upstream + z, None)
            tally.lam[level], tally.gam[level] = response(n_z, n_exact, g_z, g_exact, z)
            del n_z, g_z, z
        one_pass = _JobPasses(current, window, upstream, g_exact, collective_passes)
        t0 = time.perf_counter()
        mine = [j for j in collective.my_jobs(group) if j.key in self.policy.seen]
        tally.mine += len(mine)
        before_jobs = self.passes
        for job in mine:
            self.beat(f"probe job {job.key!r} (job {job.index})")
            t = time.perf_counter()
            outs = [one_pass((job.key, fmt, self.seed + offset)) for fmt, offset in self.PASSES]
            tally.results.append(LocalJobResult(
                job.key, level, window.level if window is not None else None,
                pair_distances([o[0] for o in outs]), pair_distances([o[1] for o in outs]),
                pair_distances([o[2] for o in outs]), pair_distances([o[3] for o in outs]),
                time.perf_counter() - t, self.error_ratio(job.key, below_exact)))
        tally.job_passes += self.passes - before_jobs
        if collective_passes:
            before_padding = self.passes
            for _ in range(collective.jobs_per_rank(len(group)) - len(mine)):
                self.beat("a padding pass (lockstep with ranks with more jobs)")
                for _ in self.PASSES:
                    one_pass(None)
            tally.padding += self.passes - before_padding
        # seconds: the jobs' passes (shared by ranks); level_seconds: the level's own
        # recompute, exact and calibration passes (every rank runs them)
        tally.group_cost.append({"start": level, "jobs": len(group), "jobs_this_rank": len(mine),
                                 "seconds": time.perf_counter() - t0, "level_seconds": t0 - t_level})
        return g_exact

    def error_ratio(self, key: str, extra: dict | None = None) -> dict[float, float]:
        x = self.policy.recorded_exact().get(key)
        return error_ratio(self.policy, x if x is not None or not extra else extra.get(key),
                           self.seed, self.formats)


def calibration_noise(grad: torch.Tensor, seed: int, block: int) -> torch.Tensor:
    """Seeded noise shaped like ``grad`` (element-wise ``CALIBRATION_SCALE * grad * N(0,1)``):
    the same draw on every rank, drawn on the gradient's device (no host-sized draw and
    copy per level on GPUs; ranks share a device type, so they share the stream)."""
    g = torch.Generator(device=grad.device).manual_seed(key_seed(seed, "calibration", block) % (2 ** 63))
    eps = torch.randn(grad.shape, generator=g, dtype=torch.float32, device=grad.device).to(grad.dtype)
    return grad * eps * CALIBRATION_SCALE


def response(n_z: torch.Tensor, n_exact: torch.Tensor, g_z: torch.Tensor | None,
             g_exact: torch.Tensor | None, z: torch.Tensor) -> tuple[float, float]:
    """(lam, gam): squared change of the local norms and of the gradient handed down, per
    unit squared perturbation."""
    zz = float(z.double().pow(2).sum())
    if zz <= 0.0:
        return 0.0, 0.0
    lam = float((n_z - n_exact).pow(2).sum()) / zz
    gam = 0.0 if g_z is None or g_exact is None else float((g_z - g_exact).double().pow(2).sum()) / zz
    return lam, gam


def rhos(lam: dict[int, float], gam: dict[int, float], count: int) -> dict[int, float]:
    """R(l): response of every level below level l to a unit squared perturbation of the
    gradient at l's input. R(BELOW) = 0, R(0) = lam(BELOW), R(l) = lam(l-1) + gam(l-1) R(l-1)."""
    rho = {BELOW: 0.0, 0: lam.get(BELOW, 0.0)}
    for level in range(1, count + 1):
        rho[level] = lam.get(level - 1, 0.0) + gam.get(level - 1, 0.0) * rho[level - 1]
    return rho


def finish(results: list[LocalJobResult], rho: dict[int, float],
           lam: dict[int, float]) -> list[ProbeResult]:
    """GradNormVar of each job from its split terms (module docstring): its own level and
    its window measured; beyond the window ``R(window) * |gradient handed on|^2``, scaled
    by how much more this job's perturbation moved the window's norms than the
    calibration noise did (a compression error is coherent across tokens, noise is not,
    and weight gradients sum over tokens: on MiniLM the plain estimate fell 5-30x short)."""
    out = []
    for r in results:
        pairs = []
        for i in range(3):
            measured = r.local[i] + r.window_norms[i]
            if r.window is None:
                beyond = rho.get(r.level, 0.0) * r.handed[i]
            else:
                unit = lam.get(r.window, 0.0)
                coherence = (r.window_norms[i] / r.handed[i]) / unit \
                    if unit > 0 and r.handed[i] > 0 else 1.0
                beyond = rho.get(r.window, 0.0) * r.beyond[i] * coherence
            pairs.append(measured + beyond)
        out.append(ProbeResult(r.key, gradnormvar_of(tuple(pairs)), len(LocalRound.PASSES),
                               r.seconds, r.error_ratio))
    return out


@dataclass
class LocalOutcome:
    results: list[ProbeResult]
    seen: dict
    small: dict
    groups: list[list[ProbeJob]]
    group_cost: list[dict]
    jobs_this_rank: int
    padding_passes: int
    rho: dict[int, float]
    passes: int = 0  # every backward pass: the jobs', the levels' own, padding
    forwards: int = 0
    block_forwards: int = 0
    job_passes: int = 0


def run_local_round(ctx) -> "RoundOutcome":
    """The block-local round as a :class:`~alam_dist.probe.RoundOutcome` (every rank's
    results merged); raises NotLocal, on every rank alike, where it does not apply."""
    from alam_dist.probe import RoundOutcome, probe_state
    names = [n for n, p in ctx.model.named_parameters() if p.requires_grad]
    with probe_state(ctx):
        runner = LocalRound(ctx.policy, ctx.blocks, ctx.closure, ctx.params, ctx.stat_params,
                            names, ctx.seed, probe_formats(ctx.config.ladder),
                            ctx.config.probe_granularity, ctx.forward_per_pass, ctx.beat)
        out = runner.run(ctx.collective, ctx.collective_passes)
    ctx.beat("gathering probe results from every rank")
    results = ctx.collective.gather_results(out.results)
    return RoundOutcome(
        kind="local", sens={r.key: r.sensitivity for r in results},
        ratios={r.key: r.error_ratio for r in results}, seen=out.seen, small=list(out.small),
        jobs=sum(len(g) for g in out.groups), jobs_this_rank=out.jobs_this_rank,
        padding_passes=out.padding_passes, passes=out.passes, forwards=out.forwards,
        backwards=out.passes, groups=out.group_cost,
        extra={"block_forwards": out.block_forwards, "forwards": out.forwards,
               "job_passes": out.job_passes,
               "level_passes": out.passes - out.job_passes - out.padding_passes,
               "rho": {str(k): v for k, v in sorted(out.rho.items())}})
