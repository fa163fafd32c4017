"""FSDP2 integration: ``alam_dist.fsdp.apply(model, config)`` on a ``fully_shard``-ed model.

    from torch.distributed.fsdp import fully_shard
    import alam_dist.fsdp

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctl = alam_dist.fsdp.apply(model, {"bits": 1}, optimizer=optimizer)
    for batch in loader:                       # training code unchanged
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

What it does, and nothing more: validates the config (an :class:`ALAMConfig` or the same
dict as DeepSpeed's ``"alam"`` section), installs the controller on the model on every rank
(after ``fully_shard``, so the module names are the model's own), runs the scheduled probe
round on the first forward of a step -- with a slice of that micro-batch, before FSDP's
own pre-forward -- and closes steps when the optimizer steps (or, without an optimizer,
at the end of each backward). The controller's ``state_dict()`` carries the plan and the
step; it is a ``torch.distributed.checkpoint`` ``Stateful``, so ``dcp.save({"model": ...,
"alam": ctl})`` keeps the plan with the model and a resumed run does not re-probe.

How the probe reaches the gradients (docs/fsdp.md): ``autograd.grad`` on FSDP2's sharded
DTensor parameters returns nothing, because the forward runs on unsharded parameters that
FSDP2 all-gathers into the same tensor objects every time. The round asks for the
gradients of those unsharded parameters instead (found once per round by unsharding one
module at a time). Every probe pass then gathers weights through FSDP's own backward
hooks, a collective: jobs are split over the ranks and padded so that all ranks run the
same passes (the controller's ``collective_passes``), as under ZeRO-3; unlike ZeRO-3, one
forward serves all passes (FSDP2 re-gathers into the retained graph's tensors).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from alam_dist.dist import DistributedCollective
from alam_dist.config import ALAMConfig
from alam_dist.controller import Controller
from alam_dist.probe.inputs import loss_of

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch without FSDP2
    FSDPModule = None


def apply(model: torch.nn.Module, config: ALAMConfig | dict | None = None, *,
          optimizer: torch.optim.Optimizer | None = None) -> Controller:
    """Install ALAM on a model sharded with FSDP2 ``fully_shard``; returns its controller.

    ``optimizer``: steps end when it steps (needed with gradient accumulation, where one
    step has several backwards); without it every backward ends a step. The controller
    gains ``ctl.fsdp`` (this integration) and reports probe cost in ``memory_report()``.
    """
    if isinstance(config, dict):
        config = ALAMConfig.from_dict(config)
    config = config or ALAMConfig()
    _check_model(model)
    return FSDPALAM(model, config, optimizer=optimizer).controller


def _check_model(model: torch.nn.Module) -> None:
    if FSDPModule is None:
        raise ImportError("alam_dist.fsdp needs torch.distributed.fsdp.fully_shard (FSDP2, "
                          "torch >= 2.6)")
    from torch.distributed.fsdp import FullyShardedDataParallel
    fsdp1 = [n or "<the model>" for n, m in model.named_modules()
             if isinstance(m, FullyShardedDataParallel)]
    if fsdp1:
        raise TypeError(
            f"alam_dist.fsdp supports FSDP2 (torch.distributed.fsdp.fully_shard), not FSDP1 "
            f"FullyShardedDataParallel (found at {', '.join(fsdp1[:3])}): its flat parameters "
            "hide the per-layer weights ALAM's probes measure. Shard with fully_shard(block) "
            "per decoder block and fully_shard(model) (docs/fsdp.md).")
    if not isinstance(model, FSDPModule):
        sharded = [n or "<the model>" for n, m in model.named_modules() if isinstance(m, FSDPModule)]
        where = (f"its submodules {', '.join(sharded[:3])} are sharded but the root is not"
                 if sharded else "it is not sharded")
        raise TypeError(
            f"alam_dist.fsdp.apply expects the model after fully_shard ({where}): call "
            "fully_shard(block) for each decoder block, then fully_shard(model), then "
            "alam_dist.fsdp.apply(model, config). For a model without FSDP use "
            "alam_dist.apply(model, config).")


def unsharded_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors FSDP2's forward uses for ``model``'s trainable parameters, in
    ``named_parameters()`` order: each FSDP module is unsharded (an all-gather), its own
    unsharded parameters noted, and resharded, one module at a time. FSDP2 gathers into
    the same tensor objects at every forward and backward, so these are the leaves of the
    autograd graph whose gradients training reduce-scatters."""
    from torch.distributed.tensor import DTensor
    found: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        module.unshard()
        for name, p in module.named_parameters():
            if not isinstance(p, DTensor):
                found.setdefault(f"{prefix}.{name}" if prefix else name, p)
        module.reshard()
    params = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        q = found.get(name, p)
        if isinstance(q, DTensor):
            raise RuntimeError(f"parameter {name} stayed sharded after unshard(): it is not "
                               "managed by fully_shard in a way alam_dist knows")
        params.append(q)
    return params


class FSDPALAM:
    """Binds a Controller to an FSDP2 model's forward, backward and optimizer steps."""

    def __init__(self, model: torch.nn.Module, config: ALAMConfig,
                 optimizer: torch.optim.Optimizer | None = None):
        self.model = model
        collective = DistributedCollective() if dist.is_initialized() else None
        self.controller = Controller(model, config=config, collective=collective)
        self.controller.fsdp = self
        self._in_probe = False
        self._handles: list = []
        if config.enabled:
            self.controller.install_hook()
            # before FSDP's own pre-forward (prepended at fully_shard): the probe's forward
            # is a whole forward of its own, finished before the training forward begins
            self._handles.append(model.register_forward_pre_hook(
                self._pre_forward, prepend=True, with_kwargs=True))
            if optimizer is not None:
                self._handles.append(optimizer.register_step_post_hook(self._optimizer_stepped))
            else:
                self._handles.append(model.register_forward_hook(self._close_at_backward_end))

    # -- life cycle -------------------------------------------------------------------------
    def _pre_forward(self, module, args: tuple, kwargs: dict) -> None:
        if self._in_probe or not (module.training and torch.is_grad_enabled()):
            return
        ctl = self.controller
        ctl.forward_started()
        if ctl.take_due_probe():
            pargs, pkwargs, share = ctl.probe_inputs(args, kwargs)
            self.probe(lambda: loss_of(module(*pargs, **pkwargs)), batch_share=share)

    def _close_at_backward_end(self, module, args, output) -> None:
        """Without an optimizer: the step ends when the backward of this forward ends."""
        if self._in_probe or not torch.is_grad_enabled():
            return
        tensors = [t for t in _tensors_in(output) if t.requires_grad]
        if not tensors:
            return
        engine = torch.autograd.Variable._execution_engine

        def on_first_grad(_grads):
            if not self._in_probe:
                engine.queue_callback(self.controller.end_step)

        torch.autograd.graph.register_multi_grad_hook(tensors, on_first_grad, mode="any")

    def _optimizer_stepped(self, *_) -> None:
        # A step with no forward since the last one is not a training step: DCP's
        # get_state_dict steps a fresh optimizer with zero gradients to create its state.
        if self.controller.policy.stats.forwards > 0:
            self.controller.end_step()

    # -- probing ----------------------------------------------------------------------------
    def probe(self, closure, batch_share: tuple[int, int] = (1, 1)):
        """One probe round with ``closure`` (a forward of the model returning the loss).
        Every pass gathers weights in FSDP's backward hooks, so all ranks run the same
        number of passes (padding where a rank has fewer jobs)."""
        self._in_probe = True
        try:
            params = unsharded_parameters(self.model)
            return self.controller.probe(closure, forward_per_pass=False, collective_passes=True,
                                         batch_share=batch_share, grad_params=params)
        finally:
            self._in_probe = False

    def memory_report(self, count_nonfinite: bool = True) -> dict:
        return self.controller.memory_report(count_nonfinite)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.controller.uninstall_hook()


def _tensors_in(output: Any) -> list[torch.Tensor]:
    """Tensors in a forward's output (a tensor, a dict or ModelOutput, a tuple or list)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        loss = getattr(output, "loss", None)
        return [loss] if isinstance(loss, torch.Tensor) else []
    return [t for v in values for t in _tensors_in(v)]
