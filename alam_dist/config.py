"""ALAMConfig: the ``"alam"`` section of ds_config.json, as a typed object.

    >>> from alam_dist import ALAMConfig
    >>> cfg = ALAMConfig.from_dict({"bits": 1, "total_steps": 1000})
    >>> cfg.probe_steps_resolved()
    (0, 100)
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass
from typing import Any

from alam_dist.codec.backends import BACKENDS
from alam_dist.codec.formats import AQ_AVG, GROUP, REGISTRY, allowed_bits, family
from alam_dist.hooks.classify import ROLES

DEFAULT_LADDERS = {"rotated": (32, 8, 4, 2, 1, 0.5), "minmax": (32, 8, 4, 2, 0.5)}
# "*Norm:*/*.0": the input of an RMSNorm-style layer (LLaMA's, T5's, nn.RMSNorm: saved
# first). nn.LayerNorm saves its weight first, so BERT's input is not matched -- measured
# right (docs/controller.md: "role:norm_input" at 2 bits cost MiniLM's fine-tune).
DEFAULT_FLOORS = {"*Norm:*/*.0": 2, "op:LogSoftmaxBackward0": 8}
DEFAULT_LADDER = DEFAULT_LADDERS["rotated"]


def _is_number(value: Any) -> bool:
    """An int or float, not a bool (JSON's true would pass isinstance(int))."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


ATTENTION_PATHS = ("recompute", "recompute_all", "stock")


@dataclass(kw_only=True)
class ALAMConfig:
    enabled: bool = True
    """Master switch: with False every integration behaves exactly as without alam_dist."""
    bits: float = 1.0
    """Average bit budget per compressed activation element, metadata included (0.5–32)."""
    total_steps: int | None = None
    """Training steps; with it the default probe schedule is step 0 and 10% of total."""
    probe_steps: tuple[int, ...] | None = None
    """Explicit steps at which GradNormVar probes run (overrides the default schedule)."""
    formats: str = "rotated"
    """Codec family the ladder's numbers name: "rotated" (default: 8/4/2/1 bits in
    Walsh-Hadamard-rotated groups of 128 with a bf16 step and mean, round to nearest;
    0.5 = the sign code on a seed-drawn half of the rotated values) or "minmax" (the ALAM paper's, formerly spelled "seed",
    which is still accepted: 8/4/2 bits in min/max groups, stochastic rounding; 0.5 =
    average quantization). Registry: alam_dist/codec/formats.py; measurements behind the
    default: docs/controller.md."""
    ladder: tuple[float, ...] | None = None
    """Formats the allocator steps through, from exact down; null gives the family's
    default ([32, 8, 4, 2, 1, 0.5] rotated, [32, 8, 4, 2, 0.5] minmax; rotated budgets of
    1.25 bits and more, which the sign code can meet, leave 0.5 out). Entries from 32,
    16, 8, 4, 2, 1 (rotated only: the sign code), 0.5."""
    attention: str = "recompute"
    """"recompute" (default): F.scaled_dot_product_attention keeps only q, k, v and reruns
    the attention forward in backward, so its probabilities stay consistent with the
    compressed q, k (docs/controller.md) -- except calls whose q and k the plan keeps at
    8 bits or more, which run torch's fused kernel (no rerun; its output and logsumexp
    kept exact); "recompute_all": the rerun for every call (the least memory);
    "stock": the saved tensors of torch's kernel."""
    group_size: int = 128
    """Values per quantization group (fixed by the kernel ABI; kept for config clarity)."""
    aq_average: int = 4
    """Values averaged by average quantization (fixed by the kernel ABI)."""
    min_bits: dict[str, float] | None = None
    """Floors: fnmatch pattern over "ModuleClass:key", "op:<autograd node>" (the op that
    produced the tensor) or "role:<role>" (what it is to the module that saved it:
    "role:norm_input", a normalization layer's input, whatever the order of its saves)
    -> lowest format allowed; null gives the default: RMSNorm-style layers' inputs
    ("*Norm:*/*.0") at 2 bits -- below that, the tiny LLaMA's training stalled (average
    quantization's bias, and the sign code's) -- and the loss's
    log-probabilities at 8 bits: judged by size, they were sent to 1 bit and masked-LM
    fine-tuning of MiniLM stalled (docs/controller.md). ``{}`` gives the plain ALAM
    allocation."""
    probe: str = "local"
    """Probe round: "local" (default: one transformer block at a time, each tensor's passes
    through its own block and the one below, the rest of the stack estimated from one
    calibration per block; memory of one block; docs/controller.md), "cheap" (every
    block's passes restarted at its output, the statistic of the full round on a slice of
    the micro-batch) or "full" (every saved tensor, full backward passes, whole
    micro-batch: the reference). Models without a block stack use "cheap"."""
    probe_blocks: int | None = None
    """Cheap rounds: None (default) probes every block, the same statistic as the full
    round; N probes N evenly spaced blocks (first and last included) and interpolates the
    others per role -- several times cheaper, but on a real model (MiniLM) its plans lose
    quality (docs/controller.md), so it is opt-in."""
    probe_batch_fraction: float = 0.25
    """Local and cheap rounds: share of the micro-batch's samples the probe forward uses (at least
    one; a one-sample micro-batch is used whole), through the integrations."""
    probe_granularity: str = "row"
    """GradNormVar's norm vector: "row" (per output row, default) or "param" (reference)."""
    probe_timeout_s: float = 300.0
    """Multi-rank probe rounds: a rank whose round makes no progress for this many seconds
    (another rank died or hangs) logs which round and phase, and exits, so the launcher
    stops the job instead of every rank waiting for the process group's 30-minute timeout.
    0 disables it (docs/reliability.md)."""
    min_numel: int = 1024
    """Saved tensors smaller than this are kept exact (metadata would dominate)."""
    seed: int = 0
    """Base seed of the stochastic rounding; mixed with step, rank and tensor key."""
    on_plan_mismatch: str = "error"
    """A saved tensor whose key is not in the plan: "error" (default) or "warn" (keep it exact)."""
    save_plan_path: str | None = None
    """Write the allocated plan (JSON) here after each probe round."""
    load_plan_path: str | None = None
    """Use this plan and skip probing (unless probe_steps is set explicitly)."""
    backend: str = "auto"
    """Codec backend: auto, reference, cpp or cuda."""
    memory_target_gb: float | str | None = None
    """Peak memory per rank (GiB) the training step must fit, or "auto" (the device's
    memory less ``memory_reserve_gb``): each probe round then chooses the highest budget
    whose predicted peak fits, in place of ``bits``, and solves again from the first two
    measured steps (docs/memory.md). null: the budget is ``bits``."""
    memory_reserve_gb: float = 2.0
    """With ``memory_target_gb: "auto"``: GiB of the device left to others (CUDA context,
    NCCL, fragmentation)."""

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------
    def validate(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"alam.enabled must be true or false, got {self.enabled!r}")
        if not _is_number(self.bits) or not 0.5 <= self.bits <= 32:
            raise ValueError(f"alam.bits is the average bit budget and must be a number in "
                             f"[0.5, 32], got {self.bits!r}")
        if self.total_steps is not None and (not isinstance(self.total_steps, int)
                                             or self.total_steps < 1):
            raise ValueError(f"alam.total_steps must be a positive integer, got {self.total_steps!r}")
        if self.probe_steps is not None:
            steps = tuple(self.probe_steps)
            if not all(isinstance(s, int) and s >= 0 for s in steps):
                raise ValueError(f"alam.probe_steps must be non-negative integers, got {self.probe_steps!r}")
            self.probe_steps = tuple(sorted(set(steps)))
        try:
            self.formats = family(self.formats)  # the old spelling "seed" is "minmax"
        except ValueError as err:
            raise ValueError(f"alam.formats: {err}") from None
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"alam.attention must be one of {ATTENTION_PATHS}, got "
                             f"{self.attention!r}")
        if self.ladder is None or not hasattr(self, "_ladder_default"):
            # whether the family's default is in use (kept across re-validation): budgets
            # then choose their own ladder (ladder_for)
            self._ladder_default = self.ladder is None
        ladder = tuple(DEFAULT_LADDERS[self.formats] if self.ladder is None else self.ladder)
        allowed = allowed_bits(self.formats)
        bad = [b for b in ladder if isinstance(b, bool) or b not in allowed]
        if bad or not ladder:
            raise ValueError(f"alam.ladder entries must come from {allowed} (formats "
                             f"{self.formats!r}), got {list(ladder)}")
        if max(ladder) != 32:
            raise ValueError("alam.ladder must start at 32 (kept exact), e.g. [32, 8, 4, 2, 0.5]")
        self.ladder = tuple(sorted(set(ladder), reverse=True))
        if self.group_size != GROUP:
            raise ValueError(f"alam.group_size={self.group_size}: the kernels use groups of "
                             f"{GROUP}; remove the key or set it to {GROUP}")
        if self.aq_average != AQ_AVG:
            raise ValueError(f"alam.aq_average={self.aq_average}: average quantization averages "
                             f"{AQ_AVG} values; remove the key or set it to {AQ_AVG}")
        if self.min_bits is None:
            self.min_bits = dict(DEFAULT_FLOORS)
        if not isinstance(self.min_bits, dict) or not all(
                isinstance(k, str) and v in allowed for k, v in self.min_bits.items()):
            raise ValueError(f"alam.min_bits maps key patterns to formats in {allowed}, "
                             f"got {self.min_bits!r}")
        for pattern in self.min_bits:
            if pattern.startswith("role:") and not fnmatch.filter(
                    [f"role:{r}" for r in ROLES], pattern):
                raise ValueError(f"alam.min_bits: {pattern!r} names no role; roles are "
                                 f"{', '.join('role:' + r for r in ROLES)}")
        if self.probe not in ("local", "cheap", "full"):
            raise ValueError(f"alam.probe must be 'local', 'cheap' or 'full', got {self.probe!r}")
        if self.probe_blocks is not None and self.probe != "cheap":
            raise ValueError(f"alam.probe_blocks applies to probe='cheap' rounds only (probe is "
                             f"{self.probe!r}): set alam.probe to 'cheap' or drop probe_blocks")
        if self.probe_blocks is not None and (isinstance(self.probe_blocks, bool) or not isinstance(
                self.probe_blocks, int) or self.probe_blocks < 1):
            raise ValueError(f"alam.probe_blocks must be a positive integer or null (every "
                             f"block), got {self.probe_blocks!r}")
        if not _is_number(self.probe_batch_fraction) or not 0 < self.probe_batch_fraction <= 1:
            raise ValueError(f"alam.probe_batch_fraction must be in (0, 1], got "
                             f"{self.probe_batch_fraction!r}")
        if not _is_number(self.probe_timeout_s) or self.probe_timeout_s < 0:
            raise ValueError(f"alam.probe_timeout_s must be seconds >= 0 (0: no watchdog), got "
                             f"{self.probe_timeout_s!r}")
        if self.probe_granularity not in ("row", "param"):
            raise ValueError(f"alam.probe_granularity must be 'row' or 'param', got "
                             f"{self.probe_granularity!r}")
        if not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"alam.min_numel must be a non-negative integer, got {self.min_numel!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"alam.seed must be an integer, got {self.seed!r}")
        if self.on_plan_mismatch not in ("error", "warn"):
            raise ValueError(f"alam.on_plan_mismatch must be 'error' or 'warn', got {self.on_plan_mismatch!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"alam.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        target = self.memory_target_gb
        if target is not None and target != "auto" and (not _is_number(target) or not target > 0):
            raise ValueError(f"alam.memory_target_gb must be GiB > 0, \"auto\" or null, got "
                             f"{target!r}")
        if not _is_number(self.memory_reserve_gb) or self.memory_reserve_gb < 0:
            raise ValueError(f"alam.memory_reserve_gb must be GiB >= 0, got "
                             f"{self.memory_reserve_gb!r}")

    # -- schedule ---------------------------------------------------------------------
    def floor_for(self, key: str, module_type: str, op: str = "", role: str = "") -> float:
        """Lowest format allowed for a saved tensor (0 when no pattern matches)."""
        names = {"op": f"op:{op}", "role": f"role:{role}"}
        name = f"{module_type}:{key}"
        return max((b for pat, b in self.min_bits.items()
                    if fnmatch.fnmatchcase(names.get(pat.partition(":")[0], name), pat)),
                   default=0.0)

    def ladder_for(self, budget: float) -> tuple[float, ...]:
        """The ladder an allocation at ``budget`` steps through: ``ladder``, except that
        with the rotated family's default a budget the sign code can meet (>= its 1.25
        stored bits) leaves the 0.5-bit rung out -- on the MiniLM fine-tune, budget 2
        held-out loss +1.5 % / +1.4 % without it against +2.9 % / +2.6 % with it (then
        average quantization; seeds 0 / 1), and on the LLaMA decoder +1.2 % without it
        against +2.0 % with h05 (docs/controller.md)."""
        if self._ladder_default and self.formats == "rotated" \
                and budget >= REGISTRY["h1"].stored_bits:
            return tuple(b for b in self.ladder if b != 0.5)
        return self.ladder

    def probe_steps_resolved(self) -> tuple[int, ...]:
        """Steps at which a probe round runs."""
        if self.probe_steps is not None:
            return self.probe_steps
        if self.load_plan_path:
            return ()
        if self.total_steps is None:
            return (0,)
        later = int(self.total_steps * 0.1)
        return (0, later) if later > 0 else (0,)

    # -- (de)serialisation ------------------------------------------------------------
    @classmethod
    def from_dict(cls, section: dict[str, Any] | None) -> "ALAMConfig":
        """Parse the ``"alam"`` section of a ds_config; unknown keys are errors."""
        section = dict(section or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(section) - set(names))
        if unknown:
            raise ValueError(f"unknown key(s) in the 'alam' config section: {unknown}; "
                             f"allowed keys are {names}")
        for key in ("probe_steps", "ladder"):
            if key in section and section[key] is not None:
                if not isinstance(section[key], (list, tuple)):
                    raise ValueError(f"alam.{key} must be a list, got {section[key]!r}")
                section[key] = tuple(section[key])
        return cls(**section)

    @classmethod
    def reference(cls) -> str:
        """The ``"alam"`` key reference (Markdown) from this class's fields and their
        docstrings: the README embeds it and a test keeps the two identical."""
        import ast
        import inspect
        docs: dict[str, str] = {}
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(nxt.value.value.split())
        rows = ["| key | default | meaning |", "|---|---|---|"]
        defaults = cls().to_dict()
        for f in dataclasses.fields(cls):
            default = json.dumps(defaults[f.name])
            rows.append(f"| `{f.name}` | `{default}` | {docs.get(f.name, '')} |")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["min_bits"] = dict(self.min_bits)
        for key in ("probe_steps", "ladder"):
            if out[key] is not None:
                out[key] = list(out[key])
        if self._ladder_default:
            out["ladder"] = None  # the budget-dependent default (ladder_for), not a list
        return out
