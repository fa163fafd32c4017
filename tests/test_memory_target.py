"""The memory target's budget (alam_dist.memory): the budget solved from the room, and real
training loops that meet a target measured on the CPU's resident set (in a fresh process:
tests/memory_target_worker.py). Two ranks through the launcher: tests/test_launch.py."""
from __future__ import annotations

import pytest

from alam_dist import memory
from alam_dist.memory import GIB, solve_budget

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


@pytest.fixture(scope="module")
def runs():
    """tests/memory_target_worker.py in a fresh process (the resident set is the measure)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(root / "tests" / "memory_target_worker.py")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_training_loop_meets_its_target_and_a_tighter_one_costs_bits(runs):
    roomy, tight = runs["roomy"], runs["tight"]
    assert roomy["budget"] == 32 and roomy["source"] == "measured"
    assert tight["fits"] and tight["source"] == "measured" and 0.5 <= tight["budget"] < 32
    assert tight["plan_budget"] == tight["budget"] == tight["report_budget"]
    assert max(tight["peaks_after"]) <= tight["target"]  # the steps after the measured ones
    assert tight["round_peak"] <= tight["target"]
    assert tight["predicted"] == pytest.approx(max(tight["peaks_after"]), rel=0.10)


def test_an_impossible_target_says_what_would_fit(runs):
    impossible = runs["impossible"]
    assert impossible is not None, "a target below the step's own state trained on"
    assert impossible["share"] == 0.0 and "more than the target" in impossible["message"]
