"""The memory target's budget (alam_dist.memory), in one process: the budget solved from
the room, and a real training loop that meets a target measured on the CPU's resident set.
Two ranks through the launcher: tests/test_launch.py."""
from __future__ import annotations

import pytest
import torch

import alam_dist
from alam_dist import memory
from alam_dist.memory import GIB, MemoryTargetError, solve_budget
from tests.helpers import tiny_llama, token_batch

pytest.importorskip("transformers")


def test_the_budget_of_the_room():
    numel = 1_000_000  # planned elements: b bits cost b * numel / 8 bytes

    def at(b):
        return int(b * numel / 8)
    target = GIB
    for room_bits in (1.0, 2.0, 4.0, 13.0):
        beside = int(target * (1 - memory.HEADROOM) - room_bits * numel / 8)
        budget, nbytes, fits = solve_budget(target, beside, numel, at, 0.5)
        assert fits and budget == pytest.approx(room_bits, rel=1e-4) and beside + nbytes <= target
    # floors keep a plan above its budget: the budget is lowered until it fits
    floored = lambda b: int(max(b, 3.0) * numel / 8 * 0.5 + b * numel / 8 * 0.5)  # noqa: E731
    beside = int(target * (1 - memory.HEADROOM) - 2.5 * numel / 8)
    budget, nbytes, fits = solve_budget(target, beside, numel, floored, 0.5)
    assert fits and budget < 2.5 and beside + nbytes <= target * (1 - memory.HEADROOM)
    # nothing fits at the lowest format
    budget, nbytes, fits = solve_budget(target, target, numel, at, 0.5)
    assert not fits and budget == 0.5
    # room for every tensor exact
    assert solve_budget(target, 0, numel, at, 0.5)[0] == memory.MAX_BUDGET


def _train(target_gb: float, steps: int = 4):
    model = tiny_llama(seed=0, layers=2, hidden=256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(memory_target_gb=target_gb, probe_steps=[0]))
    x = token_batch(4, 256, seed=1)
    peaks = []
    for _ in range(steps):
        if ctl.probe_due():
            ctl.probe(lambda: model(input_ids=x, labels=x).loss)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        peaks.append(memory.peak(torch.device("cpu")))  # since the controller's last reset
        ctl.step_done()
    return ctl, peaks


@pytest.fixture(scope="module")
def roomy():
    """Room for every tensor exact: the forecast of everything-exact, measured."""
    ctl, _ = _train(64)
    return ctl.memory_target.forecast


def test_a_training_loop_meets_its_target_and_a_tighter_one_costs_bits(roomy):
    f = roomy
    assert f.budget == 32 and f.beside_source == "measured"
    # a target between everything-exact and the lowest formats
    target = (f.beside + 0.7 * f.activations) / GIB
    ctl, peaks = _train(target)
    t = ctl.memory_target.forecast
    assert t.fits and t.beside_source == "measured" and 0.5 <= t.budget < 32
    assert ctl.plan.budget == t.budget
    assert max(peaks[2:]) <= t.target  # the steps after the measured ones
    assert t.predicted_peak == pytest.approx(max(peaks[2:]), rel=0.10)
    assert ctl.memory_report()["memory_target"]["budget"] == t.budget


def test_an_impossible_target_says_what_would_fit(roomy):
    beside = roomy.beside
    with pytest.raises(MemoryTargetError, match="more than the target") as err:
        _train(beside * 0.5 / GIB)
    assert err.value.tokens_share == 0.0
