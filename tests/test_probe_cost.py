"""The cheap probe round: restart points give the full statistic, derived plans agree
with full ones, batch slicing, and the cost accounting."""
import pytest
import torch

import alam_dist
from alam_dist.probe.blocks import BlockStack, find_blocks, interpolate
from alam_dist.probe.inputs import slice_inputs
from tests.helpers import probe_tiny_llama, tiny_llama, token_batch

pytest.importorskip("transformers")


def test_blocks_roles_and_choice():
    model = tiny_llama(layers=4)
    stack = find_blocks(model)
    assert stack.prefix == "model.layers" and stack.count == 4
    assert stack.block_of("model.layers.3.mlp.down_proj/0.1") == 3
    assert stack.block_of("model.layers.3/0.0") == 3
    assert stack.block_of("model.norm/0.0") is None and stack.block_of("model.layers.30x/0.0") is None
    assert stack.role_of("model.layers.12.self_attn/0.4") == "model.layers.*.self_attn/0.4"
    big = BlockStack("model.layers", tuple(range(32)))
    assert big.choose(3) == [0, 16, 31] and big.choose(1) == [0] and big.choose(40) == list(range(32))
    assert interpolate({0: 1.0, 4: 16.0}, 2) == pytest.approx(4.0)  # geometric
    assert interpolate({0: 1.0, 4: 16.0}, 9) == 16.0 and interpolate({2: 3.0}, 0) == 3.0


def test_restarting_at_block_outputs_gives_the_full_statistic():
    """Every block probed: the cheap round differs from the full one only in where its
    backward passes start, so the sensitivities must be the same numbers."""
    full, _ = probe_tiny_llama(3, bits=1, probe="full")
    cheap, _ = probe_tiny_llama(3, bits=1, probe="cheap", probe_blocks=3)
    s_full, _, r_full, _ = full._last_probe
    s_cheap, _, r_cheap, _ = cheap._last_probe
    assert s_full.keys() == s_cheap.keys()
    for key, value in s_full.items():
        assert s_cheap[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key
        assert r_cheap[key] == pytest.approx(r_full[key], rel=1e-6)
    h = cheap.probe_cost.history[-1]
    assert h["restart_backward"] and h["probed_blocks"] == [0, 1, 2]


@pytest.mark.parametrize("bits, blocks, chosen", [(2, 3, [0, 4, 7]), (1, 3, [0, 4, 7]),
                                                   (2, 2, [0, 7]), (1, 2, [0, 7])])
def test_interpolated_plan_agrees_with_the_full_plan_on_the_toy(bits, blocks, chosen):
    full_ctl, full = probe_tiny_llama(8, bits=bits, probe="full")
    cheap_ctl, cheap = probe_tiny_llama(8, bits=bits, probe="cheap", probe_blocks=blocks)
    assert full.bits.keys() == cheap.bits.keys()
    assert full.agreement(cheap) >= 0.9
    assert abs(cheap.average_bits() - full.average_bits()) < 0.1
    f, c = full_ctl.probe_cost.history[-1], cheap_ctl.probe_cost.history[-1]
    # 2 or 3 of 8 blocks probed (plus the tensors outside the stack): under half the jobs
    assert c["probed_blocks"] == chosen and c["jobs"] < 0.5 * f["jobs"]
    assert c["backward_passes"] == 3 * c["jobs"] and f["backward_passes"] == 3 * f["jobs"]


def test_cheap_round_is_the_full_statistic():
    """Every block probed, passes restarted at block outputs: the same plan as the full
    round, from fewer backward FLOPs."""
    assert alam_dist.ALAMConfig().probe_blocks is None
    _, full = probe_tiny_llama(6, bits=1, probe="full")
    ctl, cheap = probe_tiny_llama(6, bits=1, probe="cheap")
    assert cheap.bits == full.bits
    assert ctl.probe_cost.history[-1]["probed_blocks"] == list(range(6))


def test_cheap_round_keeps_only_probed_blocks_exact_and_releases_them():
    ctl, _ = probe_tiny_llama(6, bits=1, probe="cheap", probe_blocks=2)
    assert ctl.policy.recorded_exact() == {}  # nothing pinned after the round
    assert ctl.policy.mode is ctl.policy.training


def test_slice_inputs_cuts_samples_only():
    ids, mask = torch.zeros(8, 16, dtype=torch.long), torch.ones(8, 16)
    table = torch.zeros(5, 16)  # not batch-shaped: passed as is
    args, kwargs, share = slice_inputs((ids,), {"attention_mask": mask, "table": table, "n": 3}, 0.25)
    assert share == (2, 8)
    assert args[0].shape == (2, 16) and kwargs["attention_mask"].shape == (2, 16)
    assert kwargs["table"] is table and kwargs["n"] == 3
    one = torch.zeros(1, 16)
    assert slice_inputs((one,), {}, 0.1)[0][0] is one  # one sample: used whole
    assert slice_inputs((one,), {}, 0.1)[2] == (1, 1)
    assert slice_inputs((ids,), {}, 1.0)[0][0] is ids
    assert slice_inputs((ids,), {}, 0.01)[0][0].shape[0] == 1


def test_probe_cost_in_step_equivalents():
    ctl, _ = probe_tiny_llama(2, bits=2)
    assert ctl.memory_report()["probe_cost"]["step_equivalents"] is None  # no step timed yet
    for seconds in (0.5, 0.1, 0.2):
        ctl.note_step_seconds(seconds)
    cost = ctl.memory_report()["probe_cost"]
    assert cost["step_equivalents"] == pytest.approx(cost["seconds"] / 0.2)


def test_bad_probe_config_is_refused():
    with pytest.raises(ValueError, match="alam.probe must be"):
        alam_dist.ALAMConfig(probe="fast")
    with pytest.raises(ValueError, match="probe_batch_fraction"):
        alam_dist.ALAMConfig(probe_batch_fraction=0)
    with pytest.raises(ValueError, match="probe_blocks"):
        alam_dist.ALAMConfig(probe_blocks=0)


def _scan_allocate(sensitivity, numel, raw_bits, budget, ladder, error_ratio, floors):
    """The allocator's rule written as a plain scan for the minimum: the oracle."""
    from alam_dist.plan import _ladder_for, stored_bits, variance_weight
    keys = sorted(numel)
    steps = {k: _ladder_for(raw_bits[k], ladder, floors.get(k, 0.0)) for k in keys}
    level = {k: 0 for k in keys}
    cost = {k: stored_bits(steps[k][0], raw_bits[k]) * numel[k] for k in keys}
    total, limit = sum(cost.values()), budget * sum(numel.values())
    while total > limit * (1 + 1e-12):
        best = None
        for k in keys:
            if level[k] + 1 >= len(steps[k]):
                continue
            cur, nxt = steps[k][level[k]], steps[k][level[k] + 1]
            saved = cost[k] - stored_bits(nxt, raw_bits[k]) * numel[k]
            r = error_ratio.get(k)
            added = max(sensitivity[k], 0.0) * max(variance_weight(nxt, r) - variance_weight(cur, r), 0.0)
            if best is None or (added / saved, k) < best:
                best = (added / saved, k)
        if best is None:
            break
        k = best[1]
        level[k] += 1
        new = stored_bits(steps[k][level[k]], raw_bits[k]) * numel[k]
        total, cost[k] = total + new - cost[k], new
    return {k: steps[k][level[k]] for k in keys}


def test_heap_allocator_matches_the_scan_oracle():
    import random
    from alam_dist.plan import allocate
    rng = random.Random(0)
    for _ in range(15):
        keys = [f"k{i:03d}" for i in range(rng.randint(1, 200))]
        sens = {k: rng.choice([0.0, 1.0, rng.random(), rng.random() * 1e-6]) for k in keys}  # ties too
        numel = {k: rng.choice([1024, 4096, 8192]) for k in keys}
        raw = {k: rng.choice([16, 32]) for k in keys}
        ratio = {k: {8: rng.random() * 0.01, 4: rng.random() * 0.1, 2: rng.random()}
                 for k in keys if rng.random() < 0.7}
        floors = {keys[0]: 2}
        for budget in (0.5, 1, 2, 4, 8):
            plan = allocate(sens, numel, raw, budget, (32, 8, 4, 2, 0.5), error_ratio=ratio, floors=floors)
            assert plan.bits == _scan_allocate(sens, numel, raw, budget, (32, 8, 4, 2, 0.5), ratio, floors)


def test_a_sliced_probe_plans_every_tensor_training_saves():
    """min_numel is judged at training size: the RMSNorm variance [4, 64, 1] has exactly
    min_numel=256 elements in training but 64 in a one-sample probe slice; a probe that
    judged it at slice size left it out of the plan, and training then raised
    PlanMismatchError (found by the main job at min_numel=1024, 4 x 256 tokens)."""
    model = tiny_llama(seed=0, layers=2)
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=256))
    x = token_batch(4, 64, seed=1)
    (xs,), _, share = slice_inputs((x,), {}, 0.25)
    assert share == (1, 4)
    ctl.probe(lambda: model(input_ids=xs, labels=xs).loss, batch_share=share)
    assert any(k.endswith("input_layernorm/0.1") for k in ctl.plan.bits)
    model(input_ids=x, labels=x).loss.backward()  # every saved tensor is in the plan
    ctl.step_done()
    assert set(ctl.memory_report()["bits"]) == set(ctl.plan.bits)
