"""``launch/train.py --fsdp``: the training loop's engine calls, served by FSDP2.

The script's loop speaks DeepSpeed's engine interface (``engine(**batch)``,
``engine.backward``, ``engine.step``, checkpoints); this adapter gives the same calls over
a model sharded with ``fully_shard`` (per decoder block, then the root), reading the same
config file: ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``,
``gradient_clipping``, ``bf16.enabled`` (a bf16 ``MixedPrecisionPolicy`` with fp32
reduction) and the ``"alam"`` section (``alam_dist.fsdp.apply``). Checkpoints are
``torch.distributed.checkpoint`` directories holding the model, the optimizer, the ALAM
plan and the loop's own state.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import alam_dist.fsdp
from alam_dist.config import ALAMConfig


class _LoopState:
    """The loop's client state as a DCP Stateful (plain values)."""

    def __init__(self, state: dict | None = None):
        self.state = dict(state or {"train_step": 0, "train_position": []})

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder stack of a Hugging Face causal LM (``model.model.layers`` in LLaMA)."""
    from alam_dist.probe.blocks import find_blocks
    stack = find_blocks(model)
    if stack is None:
        raise ValueError(f"{type(model).__name__}: no decoder block stack found to shard with "
                         "fully_shard (a ModuleList of identical blocks)")
    return list(stack.modules)


def shard(model: torch.nn.Module, ds_config: dict) -> torch.nn.Module:
    """``fully_shard`` each decoder block, then the root; bf16 mixed precision (fp32
    reduction) when the config enables bf16. Make the optimizer after this: it must hold
    the sharded parameters."""
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16 else MixedPrecisionPolicy())
    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


class FSDPEngine:
    """The loop's engine calls over a model already passed through :func:`shard`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ds_config: dict, alam_config: ALAMConfig | None):
        self.module, self.optimizer = model, optimizer
        self._micro_batch = int(ds_config.get("train_micro_batch_size_per_gpu", 1))
        self._accum = int(ds_config.get("gradient_accumulation_steps", 1))
        self._clip = float(ds_config.get("gradient_clipping", 0.0) or 0.0)
        self._micro = 0
        if alam_config is not None and alam_config.enabled:  # ALAM's steps end with the optimizer's
            self.alam = alam_dist.fsdp.apply(model, alam_config, optimizer=optimizer).fsdp

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._micro_batch

    def gradient_accumulation_steps(self) -> int:
        return self._accum

    def __call__(self, **batch):
        if self._accum > 1:  # reduce-scatter gradients only on the last micro-batch
            self.module.set_requires_gradient_sync(self._micro == self._accum - 1)
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self._accum).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro < self._accum:
            return
        self._micro = 0
        if self._clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self._clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _state(self, client: dict | None = None) -> dict:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "client": _LoopState(client)}
        if hasattr(self, "alam"):
            state["alam"] = self.alam.controller
        return state

    def save_checkpoint(self, save_dir: str, client_state: dict | None = None) -> None:
        dcp.save(self._state(client_state), checkpoint_id=str(Path(save_dir) / "dcp"))

    def load_checkpoint(self, load_dir: str) -> tuple[str | None, dict | None]:
        path = Path(load_dir) / "dcp"
        if not (path / ".metadata").exists():
            return None, None
        state = self._state()
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        return str(path), state["client"].state
