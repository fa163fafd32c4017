"""The controller: ties policy, GradNormVar probes, allocation and the plan together.

It knows nothing of DeepSpeed or FSDP: integrations pass a :class:`Collective` (how to
split probe jobs across ranks and combine results) and call :meth:`Controller.probe` /
:meth:`Controller.step_done` from their engine's life cycle.

Seed-compatible use (also available as ``import alam``)::

    import alam_dist as alam
    alam.set_config(bit=1, total_step=1000)
    controller = alam.Controller(model, save_bit_path="plan.json")
    controller.install_hook()
    def backprop():
        loss = model(x).loss
        optimizer.zero_grad()
        loss.backward()
    for step in range(1000):
        controller.iterate(backprop)   # probes when due, then backprop() once
        optimizer.step()
    controller.uninstall_hook()
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from typing import Callable

import torch

from alam_dist.config import ALAMConfig
from alam_dist.dist import Collective, MismatchCheck
from alam_dist.plan import Plan, PlanMismatchError, allocate
from alam_dist.hooks import compiled as compiled_hooks
from alam_dist.hooks.compiled import compiled_modules
from alam_dist.hooks.modes import Compress
from alam_dist.hooks.classify import KeySeeds
from alam_dist.hooks.policy import SavedTensorPolicy, key_seed, model_fingerprint
from alam_dist.memory import MemoryTarget
from alam_dist.probe import RoundContext, RoundOutcome, run_round
from alam_dist.probe.blocks import find_blocks
from alam_dist.probe.inputs import loss_of, slice_inputs  # noqa: F401 (loss_of: old import path)
from alam_dist.probe.watchdog import ProbeWatchdog
from alam_dist.report import (ProbeCost, SavedActivationMeter, StepClock,  # noqa: F401
                             probe_cost_report, stats_report)

log = logging.getLogger("alam_dist")


def _uniform_bits(budget: float, ladder: tuple[float, ...]) -> float:
    """Before any probe: the largest format at or under the budget (or the cheapest)."""
    under = [b for b in ladder if b <= budget]
    return max(under) if under else min(ladder)


class Controller:
    """ALAM for one model. See the module docstring for the seed API."""

    def __init__(self, model: torch.nn.Module, save_bit_path: str | None = None,
                 load_bit_path: str | None = None, *, config: ALAMConfig | None = None,
                 collective: Collective | None = None):
        cfg = config or _global_config()
        updates = {}
        if save_bit_path is not None:
            updates["save_plan_path"] = str(save_bit_path)
        if load_bit_path is not None:
            updates["load_plan_path"] = str(load_bit_path)
        self.config = ALAMConfig(**{**cfg.to_dict(), **updates}) if updates else cfg
        self.model = model
        self.collective = collective or Collective()
        self.policy = SavedTensorPolicy(model, min_numel=self.config.min_numel,
                                        backend=self.config.backend,
                                        formats=self.config.formats,
                                        attention=self.config.attention,
                                        training=Compress(self._bits_for, self._seed_for,
                                                          self._compiled_bits,
                                                          self._compiled_seed,
                                                          self._planned_bits))
        self.step = 0
        self.probed_steps: set[int] = set()
        """Steps whose scheduled probe round ran (saved with the plan: a resumed run
        does not repeat them)."""
        self.plan: Plan | None = None
        self.probe_cost = ProbeCost()
        self._last_stats = None
        self._last_probe: tuple | None = None
        self._fingerprint = model_fingerprint(model)
        self._blocks = find_blocks(model)
        self._default_bits = _uniform_bits(self.config.bits, self.config.ladder_for(self.config.bits))
        self._mismatch_warned: set[str] = set()
        self._step_mismatches: dict[str, str] = {}
        self._mismatches = MismatchCheck(self.collective)
        self._plan_mapping: compiled_hooks.PlanMapping | None = None
        self._seeds: KeySeeds | None = None
        self.clock = StepClock()  # forward_started() / end_step()
        self.memory_target: MemoryTarget | None = None
        if self.config.memory_target_gb is not None:
            # the forecast counts q, k, v at their bits, not torch's kernel's exact output
            self.policy.stock_kernel = False
            self.memory_target = MemoryTarget(self.config.memory_target_gb,
                                              self.config.memory_reserve_gb, self.collective,
                                              _model_device(model))
        self._planned_scale = 1.0
        if self.config.load_plan_path:
            self.load_plan(self.config.load_plan_path)

    # -- hooks ----------------------------------------------------------------------------
    def install_hook(self) -> "Controller":
        if self.config.enabled:
            compiled = compiled_modules(self.model)
            if compiled:
                reason = compiled_hooks.unsupported_reason()
                fix = ("apply ALAM first, then torch.compile the model or its blocks "
                       "(docs/compile.md)" if reason is None else
                       f"{reason}: upgrade torch, or train without torch.compile")
                raise RuntimeError(
                    f"alam_dist: the model is already torch.compile'd "
                    f"({', '.join(compiled[:3])}), and ALAM must see the module tree "
                    f"itself to key its plan; {fix}.")
            if compiled_hooks.unsupported_reason() is None:
                compiled_hooks.offer_block_inputs()
                compiled_hooks.patch_checkpoint_rng_names()
            self.policy.install()
        return self

    def close(self) -> None:
        """End of training: settle what the last step left pending (its plan-mismatch
        check, read a step late on GPUs, so a last-step mismatch still raises on every
        rank). Collective in multi-rank runs: every rank calls it."""
        self._mismatches.close()

    def uninstall_hook(self) -> None:
        self.policy.uninstall()

    def __enter__(self) -> "Controller":
        return self.install_hook()

    def __exit__(self, *exc) -> None:
        self.uninstall_hook()

    # Seed API: the README's manual pack/unpack form.
    def quantize(self, tensor: torch.Tensor):
        return self.policy.pack(tensor)

    def dequantize(self, saved):
        return self.policy.unpack(saved)

    # -- plan -----------------------------------------------------------------------------
    def _bits_for(self, key: str, t: torch.Tensor) -> float:
        if self.plan is None:
            return self._default_bits
        bits = self.plan.bits.get(key)
        if bits is None and key in self.plan.exact_keys:
            return 32  # under min_numel when the plan was made; kept exact, as it was then
        if bits is None and self.policy.compiled_forward_seen:
            # an eager piece of a compiled model (a graph break): keyed by the module
            # that was running outside the graph, which the eager probe never saw
            return self._default_bits
        if bits is None:
            msg = (f"saved tensor {key!r} ({tuple(t.shape)}, {t.dtype}) is not in the bit plan "
                   f"({len(self.plan.bits)} keys): the model's forward changed since the plan "
                   "was made. Re-probe (delete load_plan_path) or set "
                   "alam.on_plan_mismatch='warn' to keep such tensors exact.")
            if self.config.on_plan_mismatch == "error":
                if self.collective.world_size > 1:
                    # Raising here would stop this rank alone, while the others wait in
                    # the step's collectives: keep the tensor exact, and let step_done()
                    # raise on every rank together.
                    self._step_mismatches.setdefault(key, f"{tuple(t.shape)} {t.dtype}")
                    return 32
                raise PlanMismatchError(msg)
            if key not in self._mismatch_warned:
                self._mismatch_warned.add(key)
                warnings.warn(msg, stacklevel=2)
            return 32
        return bits

    def _planned_bits(self, key: str) -> float | None:
        if self.plan is None:
            return self._default_bits
        return self.plan.bits.get(key)

    def _seed_for(self, key: str) -> int:
        prefix = (self.config.seed, self.step, self.collective.rank, self.policy.stats.forwards)
        if self._seeds is None or self._seeds.prefix != prefix:
            self._seeds = KeySeeds(*prefix)  # once per forward: the prefix hashed once
        return self._seeds(key)

    def _compiled_seed(self, key: str) -> int:
        # drawn by a compiled graph's encode op when it runs, carried to its decode op
        return key_seed(self.config.seed, self.step, self.collective.rank,
                        self.policy.stats.forwards, "compiled", key)

    def _compiled_bits(self, path: str, key: str, op: str) -> float:
        """The plan's bits for a compiled graph's saved value (hooks.compiled.PlanMapping)."""
        if self.plan is None:
            return self._default_bits
        if self._plan_mapping is None or self._plan_mapping.plan is not self.plan:
            # the compiled modules: a graph's values outside any submodule belong to them
            roots = [n for n in compiled_modules(self.model) if n != "<the model>"] or [""]
            self._plan_mapping = compiled_hooks.PlanMapping(
                self.plan, self.config.ladder_for(self.plan.budget or self.config.bits), roots)
        return self._plan_mapping.bits(path, op, self._default_bits)

    def set_plan(self, plan: Plan) -> None:
        self._adopt(lambda: plan)

    def load_plan(self, path: str) -> Plan:
        self._adopt(lambda: Plan.load(path))
        log.info("alam_dist: loaded bit plan %s (%d tensors, %.3f bits)", path,
                 len(self.plan.bits), self.plan.average_bits())
        return self.plan

    def _adopt(self, get_plan: Callable[[], Plan]) -> None:
        """Get a plan, check it fits this model, then check it across ranks. Every rank
        reaches the collective check holding its plan or its error, so a failure on one
        rank raises on all of them instead of leaving the others waiting."""
        plan, error = None, None
        try:
            plan = get_plan()
            plan.check_model(self._fingerprint)
            if plan.formats != self.config.formats:
                raise PlanMismatchError(
                    f"the bit plan names {plan.formats!r} formats but alam.formats is "
                    f"{self.config.formats!r}; set alam.formats to {plan.formats!r} to use "
                    "this plan, or re-probe (delete load_plan_path)")
        except (OSError, ValueError, PlanMismatchError) as err:
            error = err
        self.collective.check_plan(plan, error)
        self.plan = plan
        self.policy.refresh_hooks()  # compiled regions recompile once with the new plan

    # -- probing --------------------------------------------------------------------------
    def probe_due(self) -> bool:
        return self.config.enabled and self.step in self.config.probe_steps_resolved()

    def probe(self, closure: Callable[[], object], *, forward_per_pass: bool = False,
              collective_passes: bool = False, batch_share: tuple[int, int] = (1, 1),
              grad_params: list[torch.Tensor] | None = None) -> Plan:
        """Run one GradNormVar round with ``closure`` as the forward, allocate, set the plan.

        ``closure`` runs the model's forward and returns the loss (or calls
        ``loss.backward()``, which is intercepted). Training state is left untouched.
        ``forward_per_pass`` re-runs the forward for every backward pass instead of
        retaining one graph (ZeRO-3 re-partitions weights after each backward).
        ``collective_passes`` says that every probe pass runs collectives (ZeRO-3 and FSDP
        gather weights in forward and backward): then every rank runs the same number of
        passes from the same restart points -- a rank with fewer jobs, or one whose
        forward did not save a job's tensor, runs padding passes whose results are
        dropped -- so that no rank reaches the result gather while another is still
        gathering weights.

        With ``probe="cheap"`` (default) and a model with a transformer block stack, each
        pass restarts at the output of the block its tensor belongs to (the same
        statistic); with ``probe_blocks=N`` only N blocks are probed, the others
        interpolated, and only those blocks' tensors are kept exact during the round
        (docs/controller.md, "Probe cost"). Integrations also pass a slice of the
        micro-batch (:func:`slice_inputs`) and its ``batch_share`` (kept, total samples),
        so that the probe sees exactly the tensors training saves (``min_numel`` is
        judged at training size).

        ``grad_params``: the tensors whose gradient norms the statistic compares, when they
        are not the model's parameters (FSDP2: the unsharded parameters its forward uses;
        the sharded ones get no gradient from ``autograd.grad``).
        """
        if not self.policy.installed:
            raise RuntimeError("install_hook() before probing")
        rank, world = self.collective.rank, self.collective.world_size
        what = f"the ALAM probe round at step {self.step} on rank {rank} of {world}"
        watchdog = ProbeWatchdog(self.config.probe_timeout_s if world > 1 else 0, what)
        # the round runs the model eagerly, compiled or not: its passes key, record and
        # swap saved tensors one by one, which only eager autograd lets it do
        with watchdog, _eager_stance():
            try:
                return self._probe_round(closure, watchdog, forward_per_pass, collective_passes,
                                         batch_share, grad_params)
            except PlanMismatchError:
                raise
            except Exception as err:
                if world == 1:
                    raise
                # a peer that died shows up here as a failed collective: say where we were
                raise RuntimeError(f"alam_dist: {what} failed while {watchdog.phase}: "
                                   f"{type(err).__name__}: {err}") from err

    def _probe_round(self, closure, watchdog: ProbeWatchdog, forward_per_pass: bool,
                     collective_passes: bool, batch_share: tuple[int, int],
                     grad_params: list[torch.Tensor] | None) -> Plan:
        start = time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.memory_target is not None:
            self.memory_target.round_begins()
        ctx = RoundContext(
            policy=self.policy, model=self.model, blocks=self._blocks,
            collective=self.collective, config=self.config, closure=closure,
            beat=watchdog.beat, seed=key_seed(self.config.seed, self.step, "probe"),
            params=params, grad_params=grad_params, forward_per_pass=forward_per_pass,
            collective_passes=collective_passes, batch_share=batch_share)
        out = run_round(ctx, self.config.probe)
        missing = sorted(set(out.seen) - set(out.sens))
        if missing:  # a key some rank saved but whose probe job nobody ran
            raise PlanMismatchError(f"ranks saved different tensors in the probe forward "
                                    f"(e.g. {missing[:3]}): the model's forward must take the "
                                    "same path on every rank")
        self._last_probe = (out.sens, out.seen, out.ratios, sorted(set(out.small) - set(out.seen)))
        kept, total = batch_share
        self._planned_scale = total / kept  # the round saw a slice of the micro-batch
        budget = self.config.bits
        if self.memory_target is not None:
            watchdog.beat("choosing the budget for the memory target")
            budget = self._budget_for_target(out, params)
        watchdog.beat("checking the new plan across ranks")
        plan = self.reallocate(budget)
        elapsed = time.perf_counter() - start
        self._account(out, plan, elapsed)
        if self.config.save_plan_path and self.collective.rank == 0:
            plan.save(self.config.save_plan_path)
        log.info("alam_dist: probed %d/%d tensors in %.1fs; plan %.3f bits/element",
                 out.jobs_this_rank, len(out.seen), elapsed, plan.average_bits())
        return plan

    def _account(self, out: RoundOutcome, plan: Plan, elapsed: float) -> None:
        """The round's cost, in the totals and as a history entry."""
        cost = self.probe_cost
        cost.rounds += 1
        cost.jobs += out.jobs_this_rank
        cost.forward_passes += out.forwards
        cost.backward_passes += out.backwards
        cost.padding_passes += out.padding_passes
        cost.seconds += elapsed
        cost.history.append({"step": self.step, "probe": out.kind, **out.extra,
                             "tensors": len(out.seen), "jobs": out.jobs,
                             "jobs_this_rank": out.jobs_this_rank,
                             "probed_blocks": out.probed_blocks,
                             "backward_passes": out.passes, "padding_passes": out.padding_passes,
                             "restart_backward": out.restart_backward,
                             "seconds": elapsed, "fixed_seconds": out.fixed_seconds,
                             "groups": out.groups, "average_bits": plan.average_bits()})

    def reallocate(self, budget: float) -> Plan:
        """Allocate (and use) a plan for ``budget`` from the last probe round's statistics,
        without probing again."""
        plan = self.allocation(budget)
        self.set_plan(plan)
        return plan

    def allocation(self, budget: float) -> Plan:
        """The plan the last probe round's statistics give at ``budget`` (not adopted)."""
        if self._last_probe is None:
            raise RuntimeError("reallocate() needs a probe round first (controller.probe)")
        sens, seen, error_ratio, small = self._last_probe
        plan = allocate(sens, {k: v.numel for k, v in seen.items()},
                        {k: v.raw_bits for k, v in seen.items()}, budget,
                        self.config.ladder_for(budget), self._fingerprint, error_ratio=error_ratio,
                        floors={k: self.config.floor_for(k, v.module_type, v.op, v.role)
                                for k, v in seen.items()},
                        formats=self.config.formats)
        plan.exact_keys = small
        plan.ops = {k: v.op for k, v in seen.items()}
        return plan

    # -- memory target ----------------------------------------------------------------------
    def planned_bytes(self, plan: Plan, scale: float | None = None) -> int:
        """Saved bytes of ``plan``'s tensors in one training forward (stored bits,
        metadata included), at training size (``scale``: per element of the probed
        slice; default: the last round's)."""
        numel = sum(plan.numel.get(k, 0) for k in plan.bits)
        return int(plan.average_bits() * numel / 8 * (scale or self._planned_scale))

    def _budget_for_target(self, out: RoundOutcome, params: list[torch.Tensor]) -> float:
        seen, scale = out.seen, self._planned_scale
        raw = {k: v.numel * v.raw_bits // 8 for k, v in seen.items()}
        block_of = self._blocks.block_of if self._blocks is not None else None
        numel = sum(v.numel for v in seen.values()) * scale
        return self.memory_target.round_budget(
            lambda b: self.planned_bytes(self.allocation(b), scale), numel,
            min(self.config.ladder_for(0.5)),
            lambda: self.memory_target.estimate_beside(params, raw, block_of, scale))

    def _memory_step_done(self, stats) -> None:
        if self.memory_target is None or self.plan is None:
            return
        planned = sum(stats.per_key_bytes.values()) // max(1, stats.forwards)
        budget = self.memory_target.step_measured(planned)
        if budget is not None and self.plan.budget != budget:
            plan = self.reallocate(budget)
            if self.config.save_plan_path and self.collective.rank == 0:
                plan.save(self.config.save_plan_path)
            log.info("alam_dist: memory target %s", self.memory_target.state())

    def take_due_probe(self) -> bool:
        """Whether a probe round is due at this step and has not run yet; marks it as run.
        Integrations call it on the first forward of a step."""
        if self.probe_due() and self.step not in self.probed_steps:
            self.probed_steps.add(self.step)
            return True
        return False

    # -- checkpoint state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Step, probed steps, plan and config: what a resumed run needs so that it does not
        re-probe. Plain Python values, so it fits DeepSpeed's client state and
        ``torch.distributed.checkpoint`` (the controller is a DCP ``Stateful``)."""
        return {"step": self.step, "probed": sorted(self.probed_steps),
                "plan": json.dumps(self.plan.to_dict()) if self.plan else "",
                "config": json.dumps(self.config.to_dict())}

    def load_state_dict(self, state: dict) -> None:
        """Restore the plan (checked across ranks like a loaded plan) and the step."""
        self.step = int(state["step"])
        self.probed_steps = set(int(s) for s in state.get("probed", []))
        plan = state.get("plan")
        if isinstance(plan, str):
            plan = json.loads(plan) if plan else None
        if plan:
            self.set_plan(Plan.from_dict(plan))

    # -- the training step ----------------------------------------------------------------
    def iterate(self, backprop: Callable[[], object]) -> object:
        """Probe when due (with ``backprop`` as the forward), then run ``backprop()`` once."""
        if self.probe_due():
            self.probe(backprop)
        out = backprop()
        self.step_done()
        return out

    def step_done(self) -> None:
        """Close the step: keep its memory statistics, advance the step counter.

        Raises if the step's forwards never reached ALAM's hooks or saved nothing through
        them (a compiled forward, a forward under no_grad, or a forward of another module
        than the one ALAM was applied to): ALAM would be installed and compress nothing."""
        if self.collective.world_size > 1 and self.config.on_plan_mismatch == "error" \
                and self.policy.installed:
            mine, self._step_mismatches = self._step_mismatches, {}
            self._mismatches.end_step(self.step, mine)
        s = self.policy.stats
        if self.policy.installed and self.policy.compiled_forward_seen \
                and self.policy.hooks is None:
            raise RuntimeError(
                f"alam_dist: the model was run through torch.compile, but "
                f"{compiled_hooks.unsupported_reason()}, so compiled graphs saved their "
                "activations uncompressed. Upgrade torch (>= 2.8), or train without "
                "torch.compile to use ALAM.")
        if self.policy.installed and s.tensors + s.skipped_weights + s.skipped_other == 0:
            raise RuntimeError(
                f"alam_dist: training step {self.step} saved no activation through ALAM's hooks "
                f"({s.forwards} forward(s) of the model seen), so nothing was compressed. Usual "
                "causes: the forward ran under torch.no_grad(); the forward was of another "
                "module than the one ALAM was applied to; or a module was torch.compile'd "
                "with its own saved-tensor hooks active (apply ALAM first, then compile).")
        self._last_stats = self.policy.stats
        self.policy.stats = type(self._last_stats)()
        self._memory_step_done(self._last_stats)
        self.step += 1

    def memory_report(self, count_nonfinite: bool = True) -> dict:
        """Saved-activation bytes of the last finished step (or the current one).

        ``count_nonfinite``: count the compressed tensors that held NaN/inf -- one
        device-to-host read (a sync on GPUs); per-step logging can leave it out."""
        report = stats_report(self._last_stats or self.policy.stats, count_nonfinite)
        report["step"] = self.step - 1 if self._last_stats else self.step
        report["plan_average_bits"] = self.plan.average_bits() if self.plan else None
        report["bits"] = dict(self.plan.bits) if self.plan else {}
        report["probe_cost"] = self.probe_cost_report()
        if self.memory_target is not None:
            report["memory_target"] = self.memory_target.state()
        return report

    def probe_cost_report(self) -> dict:
        """Probe rounds so far: passes, seconds and step-equivalents (alam_dist.report)."""
        return probe_cost_report(self.probe_cost, self.clock.step_seconds)

    def forward_started(self) -> None:
        """Integrations call it at each training forward: the first of a step starts the
        clock :meth:`end_step` reads."""
        self.clock.forward_started()

    def end_step(self) -> None:
        """:meth:`step_done` for integrations: a step in which no probe round ran is timed
        (from :meth:`forward_started`), so that probe cost reads in step-equivalents."""
        self.clock.end_step(self.probe_cost.rounds)
        self.step_done()

    def probe_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, tuple[int, int]]:
        """The part of a training forward's inputs a probe round runs on, and its
        ``batch_share``: local and cheap rounds take ``probe_batch_fraction`` of the
        samples (:func:`~alam_dist.probe.inputs.slice_inputs`), full rounds all of them."""
        fraction = self.config.probe_batch_fraction if self.config.probe in ("local", "cheap") else 1.0
        return slice_inputs(args, kwargs, fraction)

    def note_step_seconds(self, seconds: float) -> None:
        """Tell the controller how long a (non-probe) training step took."""
        self.clock.note(seconds)


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where the model trains: its parameters' accelerator, else the current CUDA device
    (a model built on the CPU or offloaded, moved later), else the CPU."""
    first = next(model.parameters(), None)
    if first is not None and first.device.type not in ("cpu", "meta"):
        return first.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _eager_stance():
    """A context in which torch.compile'd modules run eagerly (nothing where torch lacks
    ``torch.compiler.set_stance``: nothing there is compiled with ALAM)."""
    import contextlib
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


# -- seed API: module-level config -----------------------------------------------------------
_CONFIG = ALAMConfig()


def set_config(bit: float = 1, total_step: int | None = None, **kwargs) -> ALAMConfig:
    """Seed-compatible global config: ``set_config(bit=1, total_step=N)``."""
    global _CONFIG
    _CONFIG = ALAMConfig(bits=bit, total_steps=total_step, **kwargs)
    return _CONFIG


def _global_config() -> ALAMConfig:
    return _CONFIG


def apply(model: torch.nn.Module, config: ALAMConfig | None = None, **kwargs) -> Controller:
    """The one verb: install ALAM on ``model`` and return its controller.

        >>> import torch, alam_dist
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
        >>> ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=16))
        >>> loss = model(torch.randn(32, 64)).sum()
        >>> loss.backward()
        >>> ctl.memory_report()["ratio"] > 1
        True
    """
    return Controller(model, config=config, **kwargs).install_hook()
