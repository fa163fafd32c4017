"""FSDP2 integration with real ranks: torchrun, 2 or 3 CPU processes, gloo. No mocks.

Each launch runs several scenarios in one process group (tests/fsdp_worker.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import multiproc
from tests.multiproc import ok

pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("FSDP2 (fully_shard) needs a newer torch", allow_module_level=True)

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
pytestmark = pytest.mark.slow
ALAM = {"bits": 2, "probe_steps": [0, 4]}


def launch(scenarios: list[dict], out: Path, nproc: int = 2) -> dict:
    return multiproc.launch(WORKER, scenarios, out, "torchrun", 600, nproc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    plan_2, plan_1, ckpt = out / "plan2.json", out / "plan1.json", out / "dcp"
    first = launch([
        {"name": "errors", "kind": "apply_errors"},
        {"name": "exact", "steps": 5},
        {"name": "fp32", "steps": 5, "alam": ALAM, "compare_keys": True, "save_plan": str(plan_2)},
        {"name": "bf16", "dtype": "bf16", "steps": 3, "alam": {"bits": 2, "probe_steps": [0]}},
        {"name": "bits1", "steps": 2, "alam": {"bits": 1, "probe_steps": [0]},
         "save_plan": str(plan_1)},
        {"name": "first_half", "steps": 3, "alam": ALAM, "save_dcp": str(ckpt)},
        {"name": "accum_ckpt", "steps": 3, "grad_accum": 2, "activation_checkpointing": True,
         "alam": {"bits": 2, "probe_steps": [0, 2]}},
        {"name": "no_optimizer_hook", "steps": 3, "alam": {"bits": 2, "probe_steps": [1]},
         "no_optimizer_hook": True},
    ], out / "first")
    second = launch([
        {"name": "resumed", "steps": 2, "start_step": 3, "alam": ALAM, "load_dcp": str(ckpt)},
        {"name": "loaded", "steps": 3, "alam": {"bits": 2, "load_plan_path": str(plan_2)}},
        {"name": "loaded_probing", "steps": 3, "extra_probe_at": 1,
         "alam": {"bits": 2, "load_plan_path": str(plan_2)}},
        {"name": "mismatch", "steps": 1, "alam": {"bits": 2}, "plan_per_rank": [str(plan_2), str(plan_1)]},
    ], out / "second")
    return {**first, **second}


def test_fp32_and_bf16_train_with_identical_plans_on_every_rank(runs):
    exact = ok(runs["exact"])[0]
    for name in ("fp32", "bf16"):
        r0, r1 = ok(runs[name])
        assert r0["param_types"] == ["DTensor"]  # really sharded
        assert r0["plan_digest"] and r0["plan_digest"] == r1["plan_digest"]
        assert r0["checksum"] == r1["checksum"]  # full parameters agree across ranks
        assert all(loss == loss and loss < 10 for loss in r0["losses"])
        assert abs(r0["losses"][2] - exact["losses"][2]) < 0.05
        assert r0["memory"]["ratio"] > (6 if name == "fp32" else 4)
        # the round was split over the ranks, and ranks ran the same passes (collectives)
        h0, h1 = r0["probe_cost"]["history"][0], r1["probe_cost"]["history"][0]
        assert h0["jobs_this_rank"] + h1["jobs_this_rank"] == h0["jobs"]
        assert abs(h0["jobs_this_rank"] - h1["jobs_this_rank"]) <= 1
        assert h0["backward_passes"] == h1["backward_passes"]
        # the block-local round: each job's 3 passes run through its block and the one
        # below (every pass a collective: no pass skipped), plus each level's own passes
        assert h0["probe"] == "local"
        for h in (h0, h1):
            assert h["job_passes"] == 6 * h["jobs_this_rank"]
            assert h["backward_passes"] == h["job_passes"] + h["level_passes"] + h["padding_passes"]


def test_weights_are_found_under_fsdp_as_without_it(runs):
    r0, _ = ok(runs["fp32"])
    # FSDP2 hands the forward unsharded parameters: none is mistaken for an activation,
    # so ALAM sees exactly the saved tensors it sees on the same model without FSDP
    assert sorted(r0["plan_bits"]) == r0["keys_without_fsdp"]
    assert r0["memory"]["skipped_weights"] > 0


def test_probe_schedule_and_step_equivalents(runs):
    r0, _ = ok(runs["fp32"])
    assert [h["step"] for h in r0["probe_cost"]["history"]] == [0, 4]
    assert r0["controller_step"] == 5 and r0["probed_steps"] == [0, 4]
    assert r0["probe_cost"]["step_equivalents"] > 0


def test_probing_leaves_training_bit_identical(runs):
    loaded, probing = ok(runs["loaded"]), ok(runs["loaded_probing"])
    assert loaded[0]["probe_cost"]["rounds"] == 0 and probing[0]["probe_cost"]["rounds"] == 1
    assert loaded[0]["plan_digest"] == probing[0]["plan_digest"]
    for a, b in zip(loaded, probing):
        assert a["losses"] == b["losses"]
        assert a["checksum"] == b["checksum"]


def test_dcp_resume_is_exact_and_does_not_reprobe(runs):
    straight, first, resumed = ok(runs["fp32"]), ok(runs["first_half"]), ok(runs["resumed"])
    for s, f, r in zip(straight, first, resumed):
        assert f["losses"] == s["losses"][:3]
        assert r["losses"] == s["losses"][3:]  # bit for bit
        assert r["checksum"] == s["checksum"]
        assert r["controller_step"] == 5
        # the round done before the checkpoint is not repeated; the one due after it runs
        assert [h["step"] for h in r["probe_cost"]["history"]] == [4]
        assert r["probed_steps"] == [0, 4]
        assert r["plan_digest"] == s["plan_digest"]


def test_gradient_accumulation_and_activation_checkpointing(runs):
    r0, r1 = ok(runs["accum_ckpt"])
    assert r0["plan_digest"] == r1["plan_digest"]
    assert r0["controller_step"] == 3  # optimizer steps, not micro-batches
    assert [h["step"] for h in r0["probe_cost"]["history"]] == [0, 2]
    assert r0["memory"]["forwards"] == 2 and r0["memory"]["ratio"] > 4
    assert r0["losses"][-1] < r0["losses"][0]


def test_without_optimizer_each_backward_ends_a_step(runs):
    r0, _ = ok(runs["no_optimizer_hook"])
    assert r0["controller_step"] == 3
    assert [h["step"] for h in r0["probe_cost"]["history"]] == [1]


def test_ranks_with_different_plans_fail_with_a_clear_error(runs):
    for r in runs["mismatch"]:
        assert "PlanMismatchError" in r["error"] and "rank 1" in r["error"]


def test_wrong_order_fsdp1_and_bad_config_are_refused(runs):
    for r in runs["errors"]:
        assert "expects the model after fully_shard (it is not sharded)" in r["not_sharded"]
        assert "the root is not" in r["root_not_sharded"]
        assert "not FSDP1" in r["fsdp1"] and "fully_shard" in r["fsdp1"]
        assert "ladder" in r["bad_ladder"] and "probe_step" in r["typo"]


@pytest.fixture(scope="module")
def three_rank_runs(tmp_path_factory):
    """3 ranks, different sequence lengths: uneven probe shares, padding passes."""
    out = tmp_path_factory.mktemp("fsdp3")
    plan = out / "plan.json"
    first = launch([{"name": "probed", "steps": 2, "seq_per_rank": [32, 24, 40],
                     "alam": {"bits": 2, "probe_steps": [0]}, "save_plan": str(plan)}],
                   out / "first", nproc=3)
    second = launch([
        {"name": "loaded", "steps": 2, "seq_per_rank": [32, 24, 40],
         "alam": {"bits": 2, "load_plan_path": str(plan)}},
        {"name": "loaded_probing", "steps": 2, "seq_per_rank": [32, 24, 40], "extra_probe_at": 0,
         "alam": {"bits": 2, "load_plan_path": str(plan)}},
    ], out / "second", nproc=3)
    return {**first, **second}


def test_three_ranks_with_uneven_work_stay_in_lockstep(three_rank_runs):
    ranks = ok(three_rank_runs["probed"])
    assert len({r["plan_digest"] for r in ranks}) == 1
    hist = [r["probe_cost"]["history"][0] for r in ranks]
    assert sum(h["jobs_this_rank"] for h in hist) == hist[0]["jobs"]
    assert hist[0]["jobs"] % 3 != 0  # the shares are uneven ...
    assert len({h["backward_passes"] for h in hist}) == 1  # ... the passes are not
    assert sum(h["padding_passes"] for h in hist) > 0
    loaded, probing = ok(three_rank_runs["loaded"]), ok(three_rank_runs["loaded_probing"])
    for a, b in zip(loaded, probing):
        assert a["losses"] == b["losses"] and a["checksum"] == b["checksum"]
