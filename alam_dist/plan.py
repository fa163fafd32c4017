"""The bit plan and how it is made: sensitivities and sizes -> a Plan (pure arithmetic,
deterministic). Stored bits per format come from the registry (alam_dist.codec.formats).

Greedy, as in GACT/ALAM: every tensor starts exact; repeatedly move the tensor whose next
step down the ladder (32 -> 8 -> 4 -> 2 -> 0.5) adds the least gradient variance per bit
saved, until the average stored bits per element (metadata included) is within budget.
The gradient variance of tensor i at format b is ``sens_i * w_i(b)``: ``sens_i`` is
GradNormVar, measured with average quantization, so ``w_i(AQ) = 1``; ``w_i(b)`` for the
other formats is the measured activation-error ratio MSE_i(b) / MSE_i(AQ) of that very
tensor (alam_dist.sensitivity), and exact formats cost 0. Without measured ratios the
model ``w(b) = 1 / (2**b - 1)**2`` (AQ as b = 1, the seed code's convention) is used.
"""
from __future__ import annotations

import hashlib
import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path

from alam_dist.codec.formats import LADDERS, family, stored_bits

PLAN_VERSION = 1


def variance_weight(fmt: float, error_ratio: dict[float, float] | None = None) -> float:
    if fmt >= 16:
        return 0.0
    if fmt == 0.5:
        return 1.0
    if error_ratio and fmt in error_ratio:
        return error_ratio[fmt]
    return 1.0 / (2 ** fmt - 1) ** 2


class PlanMismatchError(RuntimeError):
    """A plan does not fit the model or the tensors it is applied to."""


@dataclass
class Plan:
    """key -> bits for every saved activation, plus what it was made for."""

    bits: dict[str, float]
    numel: dict[str, int] = field(default_factory=dict)
    raw_bits: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""
    budget: float | None = None
    sensitivity: dict[str, float] = field(default_factory=dict)
    formats: str = "minmax"
    """The codec family the bits name (alam.formats); plans older than it are "minmax"
    (which plan files of earlier versions spell "seed")."""
    exact_keys: list[str] = field(default_factory=list)
    """Float tensors the probe saw under ``min_numel`` (kept exact): at a larger batch or
    sequence they may cross it, and are then kept exact instead of being a mismatch."""
    ops: dict[str, str] = field(default_factory=dict)
    """key -> the autograd node that produced the tensor (e.g. ``MulBackward0``): how
    compiled graphs' saved values are matched to the plan (alam_dist.hooks.compiled)."""

    def __post_init__(self) -> None:
        self.formats = family(self.formats)  # the old spelling "seed" is "minmax"

    def average_bits(self) -> float:
        """Stored bits per element over the planned tensors, metadata included."""
        total = sum(self.numel.get(k, 0) for k in self.bits)
        if total == 0:
            return 0.0
        return sum(stored_bits(b, self.raw_bits.get(k, 32), self.formats) * self.numel.get(k, 0)
                   for k, b in self.bits.items()) / total

    def agreement(self, other: "Plan") -> float:
        """Share of this plan's elements that ``other`` puts on the same format."""
        same = sum(self.numel[k] for k in self.bits if self.bits[k] == other.bits.get(k))
        return same / sum(self.numel.values())

    def digest(self) -> str:
        """Hash of what training uses (fingerprint + key -> bits): compared across ranks."""
        what = {"fingerprint": self.fingerprint, "bits": sorted(self.bits.items())}
        if self.formats != "minmax":  # minmax plans keep the digest they always had
            what["formats"] = self.formats
        body = json.dumps(what)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def check_model(self, fingerprint: str) -> None:
        if self.fingerprint and fingerprint and self.fingerprint != fingerprint:
            raise PlanMismatchError(
                f"the bit plan was made for a different model (plan fingerprint "
                f"{self.fingerprint}, this model {fingerprint}); delete load_plan_path or "
                "re-probe with the model you train")

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "fingerprint": self.fingerprint, "budget": self.budget,
                "average_bits": self.average_bits(), "bits": self.bits, "numel": self.numel,
                "raw_bits": self.raw_bits, "sensitivity": self.sensitivity,
                "formats": self.formats, "exact_keys": list(self.exact_keys), "ops": self.ops}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict):
            raise PlanMismatchError(f"not an alam_dist plan: a JSON object was expected, "
                                    f"got {type(d).__name__}")
        if d.get("version") != PLAN_VERSION or "bits" not in d:
            missing = [k for k in ("version", "bits") if k not in d]
            raise PlanMismatchError(
                f"not an alam_dist plan (version {d.get('version')!r}, expected {PLAN_VERSION}"
                + (f"; missing key(s) {missing}" if missing else "") + ")")
        try:
            formats = family(d.get("formats", "minmax"))
        except ValueError:
            raise PlanMismatchError(f"the plan names formats {d.get('formats')!r}; known: "
                                    f"{sorted(LADDERS)} (and 'seed', the old name of "
                                    "'minmax')") from None
        if not isinstance(d["bits"], dict) or not d["bits"]:
            raise PlanMismatchError("the plan's 'bits' must be a non-empty object "
                                    "(saved-tensor key -> bits)")
        allowed = set(LADDERS[formats]) | {16, 32}
        bad = [(k, v) for k, v in d["bits"].items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in allowed]
        if bad:
            raise PlanMismatchError(
                f"the plan gives {len(bad)} tensor(s) bits outside the {formats!r} ladder "
                f"{sorted(allowed)}, e.g. {bad[:3]}")
        return cls(bits={k: float(v) if v == 0.5 else int(v) for k, v in d["bits"].items()},
                   formats=formats,
                   numel={k: int(v) for k, v in d.get("numel", {}).items()},
                   raw_bits={k: int(v) for k, v in d.get("raw_bits", {}).items()},
                   exact_keys=[str(k) for k in d.get("exact_keys", [])],
                   ops={str(k): str(v) for k, v in d.get("ops", {}).items()},
                   fingerprint=d.get("fingerprint", ""), budget=d.get("budget"),
                   sensitivity={k: float(v) for k, v in d.get("sensitivity", {}).items()})

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file; any problem (missing, truncated, hand-edited) raises an error
        naming the file and the problem."""
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"bit plan {path} does not exist; run once with "
                                    "save_plan_path to create it") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanMismatchError(f"bit plan {path}:{err.lineno}: not valid JSON ({err.msg}); "
                                    "the file is truncated or was edited by hand: restore it "
                                    "or re-probe (delete load_plan_path)") from None
        try:
            return cls.from_dict(data)
        except (PlanMismatchError, KeyError, TypeError, ValueError) as err:
            raise PlanMismatchError(f"bit plan {path}: {err}") from None


def _ladder_for(raw_bits: int, ladder: tuple[float, ...], floor: float = 0.0,
                formats: str = "minmax") -> list[float]:
    """The ladder's steps (down to ``floor``) that store fewer bits for this dtype."""
    steps: list[float] = []
    for fmt in ladder:
        if steps and fmt < floor:
            break
        if not steps or stored_bits(fmt, raw_bits, formats) < stored_bits(steps[-1], raw_bits, formats):
            steps.append(fmt)
    return steps


def allocate(sensitivity: dict[str, float], numel: dict[str, int], raw_bits: dict[str, int],
             budget: float, ladder: tuple[float, ...] = (32, 8, 4, 2, 0.5),
             fingerprint: str = "",
             error_ratio: dict[str, dict[float, float]] | None = None,
             floors: dict[str, float] | None = None, formats: str = "minmax") -> Plan:
    """Greedy allocation under ``budget`` average stored bits per element.

    Deterministic: candidates are scanned in key order and ties broken by key, so equal
    inputs give equal plans on every rank. ``floors`` (key -> lowest format allowed) cut
    a tensor's ladder. A budget below what the floors and the cheapest format allow
    leaves every tensor at its lowest allowed format.
    """
    ladder = tuple(sorted(set(ladder), reverse=True))
    keys = sorted(numel)
    missing = [k for k in keys if k not in sensitivity]
    if missing:
        raise ValueError(f"no sensitivity for {len(missing)} tensor(s), e.g. {missing[:3]}")
    floors = floors or {}
    steps = {k: _ladder_for(raw_bits[k], ladder, floors.get(k, 0.0), formats) for k in keys}
    level = {k: 0 for k in keys}
    cost = {k: stored_bits(steps[k][0], raw_bits[k], formats) * numel[k] for k in keys}
    total, limit = sum(cost.values()), budget * sum(numel.values())

    def candidate(k: str) -> tuple[float, str] | None:
        """(added variance per bit saved, key) of k's next step down, None at the bottom."""
        if level[k] + 1 >= len(steps[k]):
            return None
        cur, nxt = steps[k][level[k]], steps[k][level[k] + 1]
        saved = cost[k] - stored_bits(nxt, raw_bits[k], formats) * numel[k]
        ratio = (error_ratio or {}).get(k)
        added = max(sensitivity[k], 0.0) * max(
            variance_weight(nxt, ratio) - variance_weight(cur, ratio), 0.0)
        return (added / saved, k)

    # A key's candidate changes only when that key moves, so a heap of (score, key)
    # picks exactly what a full scan for the minimum would (ties broken by key), in
    # O(n log n) instead of O(n) per step: thousands of keys at LLM scale.
    heap = [c for c in map(candidate, keys) if c is not None]
    heapq.heapify(heap)
    while total > limit * (1 + 1e-12) and heap:
        _, k = heapq.heappop(heap)
        level[k] += 1
        new_cost = stored_bits(steps[k][level[k]], raw_bits[k], formats) * numel[k]
        total += new_cost - cost[k]
        cost[k] = new_cost
        nxt = candidate(k)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return Plan(bits={k: steps[k][level[k]] for k in keys}, numel=dict(numel),
                raw_bits=dict(raw_bits), fingerprint=fingerprint, budget=budget,
                sensitivity={k: float(sensitivity[k]) for k in keys}, formats=formats)
