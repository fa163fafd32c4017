"""DeepSpeed integration: ``alam_dist.deepspeed.initialize`` is ``deepspeed.initialize``
plus the ``"alam"`` section of the config.

    import alam_dist.deepspeed as ads
    engine, optimizer, _, _ = ads.initialize(model=model, model_parameters=model.parameters(),
                                             config="ds_config.json")   # has an "alam" section
    for batch in loader:                       # training code unchanged
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()

What it does, and nothing more: validates the section with :class:`ALAMConfig`, removes it
before DeepSpeed parses the config, installs the controller on ``engine.module`` on every
rank (after DeepSpeed's own hooks), runs the GradNormVar probe round on the first forward
of each scheduled optimizer step -- with that micro-batch, through ``engine.module``,
sharded across ranks; under ZeRO-3 a round scheduled for step 0 runs at step 1, once
ZeRO-3 has traced its parameter fetches --, advances the controller at
gradient-accumulation boundaries, and stores the plan in the engine's checkpoints. With no section, or ``"enabled": false``, it is ``deepspeed.initialize``.
"""
from __future__ import annotations

import copy
import glob
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from alam_dist.dist import DistributedCollective
from alam_dist.config import ALAMConfig
from alam_dist.controller import Controller
from alam_dist.probe.inputs import loss_of
from alam_dist.plan import Plan

try:
    import deepspeed as _deepspeed
except ImportError:  # optional dependency
    _deepspeed = None

log = logging.getLogger("alam_dist")
CLIENT_STATE_KEY = "alam_dist"


def split_config(config: str | Path | dict | None, args: Any = None) -> tuple[dict | None, ALAMConfig | None]:
    """(DeepSpeed config without "alam", parsed ALAMConfig or None)."""
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        return None, None
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.exists():
            raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
        config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a path to ds_config.json, got {type(config).__name__}")
    config = copy.deepcopy(config)
    section = config.pop("alam", None)
    if section is None:
        return config, None
    if not isinstance(section, dict):
        raise ValueError(f"the 'alam' config section must be an object, got {section!r}")
    return config, ALAMConfig.from_dict(section)


class DeepSpeedALAM:
    """Binds a Controller to a DeepSpeed engine's life cycle (see the module docstring)."""

    def __init__(self, engine, config: ALAMConfig):
        self.engine = engine
        collective = DistributedCollective() if torch.distributed.is_initialized() else None
        self.controller = Controller(engine.module, config=config, collective=collective)
        self.controller.install_hook()
        self._in_probe = False
        self._pending = False
        self._wrap()

    def _wrap(self) -> None:
        engine, ctl = self.engine, self.controller
        forward, step = engine.forward, engine.step
        save, load = engine.save_checkpoint, engine.load_checkpoint
        module = engine.module
        zero3 = engine.zero_optimization_stage() == 3

        def alam_forward(*args, **kwargs):
            ctl.forward_started()
            if not self._in_probe:
                if ctl.take_due_probe():
                    self._pending = True
                # ZeRO-3 traces its parameter fetches during the first step; before that a
                # second backward over one graph finds weights re-partitioned, so a round
                # due at step 0 waits for step 1 (step 0 trains on the default format).
                if self._pending and not (zero3 and engine.global_steps == 0):
                    self._pending = False
                    # The bare module, not the engine: engine outputs carry ZeRO's
                    # backward bookkeeping (stage 0 refuses any backward but
                    # engine.backward; at stage 3 an extra engine forward + grad changes
                    # later steps); ZeRO-3's parameter gathering lives on the modules.
                    # cheap rounds probe a slice of the micro-batch (alam.probe_batch_fraction)
                    pargs, pkwargs, share = ctl.probe_inputs(args, kwargs)
                    self.probe(lambda: loss_of(module(*pargs, **pkwargs)), batch_share=share)
            return forward(*args, **kwargs)

        def alam_step(*args, **kwargs):
            boundary = engine.is_gradient_accumulation_boundary()
            out = step(*args, **kwargs)
            if boundary:
                ctl.end_step()
            return out

        def alam_save_checkpoint(save_dir, tag=None, client_state=None, *args, **kwargs):
            state = dict(client_state or {})
            state[CLIENT_STATE_KEY] = self.state_dict()
            return save(save_dir, tag, state, *args, **kwargs)

        def alam_load_checkpoint(*args, **kwargs):
            path, client_state = load(*args, **kwargs)
            if client_state and CLIENT_STATE_KEY in client_state:
                self.load_state_dict(client_state.pop(CLIENT_STATE_KEY))
            return path, client_state

        engine.forward = alam_forward
        engine.step = alam_step
        engine.save_checkpoint = alam_save_checkpoint
        engine.load_checkpoint = alam_load_checkpoint
        engine.alam = self

    def probe(self, closure, batch_share: tuple[int, int] = (1, 1)) -> Plan:
        """One probe round with ``closure`` (a forward of ``engine.module`` returning the
        loss), as the integration runs it. ZeRO-3 re-partitions weights after each
        backward, so each probe pass there gets its own forward, and every pass gathers
        weights (a collective): ranks must run the same number of passes."""
        zero3 = self.engine.zero_optimization_stage() == 3
        self._in_probe = True
        try:
            return self.controller.probe(closure, forward_per_pass=zero3,
                                         collective_passes=zero3, batch_share=batch_share)
        finally:
            self._in_probe = False

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the plan and step: a resumed run does not re-probe steps already probed."""
        self.controller.load_state_dict(state)

    def memory_report(self, count_nonfinite: bool = True) -> dict:
        return self.controller.memory_report(count_nonfinite)


def release_cpu_allreduce_buffer() -> list[str]:
    """Unlink this rank's DeepSpeed CPU shared-memory allreduce segment.

    On the CPU accelerator DeepSpeed maps a 69 MB ``/dev/shm/deepspeed_allreduce_buffer_*``
    segment per rank and never unlinks it: every run leaves them behind, and /dev/shm is
    RAM (a test suite of short runs filled 22 GB and was killed for memory). Once every
    rank has mapped its peers' segments (the barrier), the names can go: the mappings stay
    valid until the processes exit, and then the memory is freed, also after a crash.
    Returns the paths removed (none off the CPU accelerator or before DeepSpeed's init).
    """
    if not torch.distributed.is_initialized() or "MASTER_PORT" not in os.environ:
        return []
    torch.distributed.barrier()
    rank = torch.distributed.get_rank()
    pattern = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_"
               f"{os.environ['MASTER_PORT']}_{rank}")
    removed = []
    for path in glob.glob(pattern):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, mpu=None, dist_init_required=None, collate_fn=None,
               config=None, config_params=None, **kwargs):
    """``deepspeed.initialize`` with ALAM from the config's ``"alam"`` section.

    Same arguments and return value; the engine gains ``engine.alam`` (a
    :class:`DeepSpeedALAM`: ``memory_report()``, ``controller``) when ALAM is enabled.
    """
    if _deepspeed is None:
        raise ImportError("alam_dist.deepspeed needs DeepSpeed: pip install deepspeed")
    if config is None and config_params is not None:
        config, config_params = config_params, None
    ds_config, alam_config = split_config(config, args)
    if args is not None and ds_config is not None:
        # DeepSpeed would re-read the file and find "alam": pass the dict instead.
        for attr in ("deepspeed_config", "deepscale_config"):
            if getattr(args, attr, None) is not None:
                setattr(args, attr, None)
    # the original, also when the config-only hook (alam_dist_autoload) wrapped it
    plain_initialize = getattr(_deepspeed.initialize, "__wrapped__", _deepspeed.initialize)
    result = plain_initialize(args=args, model=model, optimizer=optimizer,
                              model_parameters=model_parameters, training_data=training_data,
                              lr_scheduler=lr_scheduler, mpu=mpu,
                              dist_init_required=dist_init_required, collate_fn=collate_fn,
                              config=ds_config, **kwargs)
    if alam_config is not None and alam_config.enabled:
        DeepSpeedALAM(result[0], alam_config)
    release_cpu_allreduce_buffer()
    return result
