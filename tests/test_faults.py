"""Faults with real ranks (torchrun, gloo, 2 CPU processes): a rank that dies, raises or
hangs during a probe round or a compressed step must stop the job in bounded time,
leave no process behind, and say where it happened (docs/reliability.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import multiproc

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
DS_WORKER, FSDP_WORKER = TESTS / "dist_worker.py", TESTS / "fsdp_worker.py"
TIMEOUT_S = 6  # alam.probe_timeout_s in these runs


def run_fault(tmp_path, worker: Path, fault: dict, **scenario):
    sc = {"name": "fault", "steps": 3, "fault": fault,
          "alam": {"bits": 2, "probe_steps": [0], "probe_timeout_s": TIMEOUT_S}, **scenario}
    proc, seconds = multiproc.launch_raw(worker, [sc], tmp_path, timeout=240)
    return proc, seconds, proc.stdout + proc.stderr


def assert_stopped(proc, seconds, tmp_path, limit_s: float):
    assert proc.returncode != 0
    assert seconds < limit_s, f"the job took {seconds:.0f} s to stop"
    assert multiproc.processes_mentioning(str(tmp_path)) == []  # no rank left running


@pytest.mark.parametrize("worker, zero", [(DS_WORKER, 2), (DS_WORKER, 3), (FSDP_WORKER, None)],
                         ids=["zero2", "zero3", "fsdp2"])
def test_a_rank_hanging_in_a_probe_round_stops_the_job_with_a_named_error(tmp_path, worker, zero):
    if worker is DS_WORKER:
        pytest.importorskip("deepspeed")
    # ZeRO-3 defers the step-0 round to step 1 (docs/deepspeed.md)
    proc, seconds, log = run_fault(tmp_path, worker, {"rank": 1, "at": "probe", "how": "hang"},
                                   zero=zero)
    assert_stopped(proc, seconds, tmp_path, 120)
    # a watchdog (on the stuck rank, or on the one waiting for it: whichever stalls
    # first) names the round, the rank and the phase
    assert f"the ALAM probe round at step {1 if zero == 3 else 0} on rank" in log
    assert "made no progress" in log
    assert "(in: recording the probe forward)" in log or "(in: gathering" in log
    assert "probe_timeout_s" in log


@pytest.mark.parametrize("how", ["kill", "raise"])
@pytest.mark.parametrize("worker", [DS_WORKER, FSDP_WORKER], ids=["zero2", "fsdp2"])
def test_a_rank_dying_in_a_probe_round_stops_the_job(tmp_path, worker, how):
    if worker is DS_WORKER:
        pytest.importorskip("deepspeed")
    proc, seconds, log = run_fault(tmp_path, worker, {"rank": 1, "at": "probe", "how": how}, zero=2)
    assert_stopped(proc, seconds, tmp_path, 90)
    if how == "raise":
        assert "injected fault on rank 1" in log


@pytest.mark.parametrize("worker", [DS_WORKER, FSDP_WORKER], ids=["zero2", "fsdp2"])
def test_a_rank_raising_in_a_compressed_step_stops_the_job(tmp_path, worker):
    if worker is DS_WORKER:
        pytest.importorskip("deepspeed")
    proc, seconds, log = run_fault(tmp_path, worker, {"rank": 1, "at": "step", "how": "raise",
                                                      "step": 1}, zero=2)
    assert_stopped(proc, seconds, tmp_path, 90)
    assert "injected fault on rank 1" in log
