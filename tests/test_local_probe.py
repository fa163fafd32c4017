"""The block-local probe round (alam_dist/local_probe.py): what it measures exactly, what
it estimates, its memory bound, and where it steps aside for the cheap round."""
import warnings

import pytest
import torch

import alam_dist
from alam_dist import local_probe
from alam_dist.probe.local import BELOW, LocalJobResult, LocalRound, finish, rhos
from tests.helpers import probe_tiny_llama, tiny_llama, token_batch

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def full_and_local():
    full_ctl, _ = probe_tiny_llama(4, bits=1, probe="full")
    local_ctl, _ = probe_tiny_llama(4, bits=1)
    return full_ctl, local_ctl


def test_local_is_the_default_and_measures_what_it_can_exactly(full_and_local):
    """Jobs of block 0 (their window is everything below) and tensors that do not reach
    the gradient handed down (a linear layer's input) are measured, not estimated: the
    same sensitivity as the full round."""
    assert alam_dist.ALAMConfig().probe == "local"
    full_ctl, local_ctl = full_and_local
    assert local_ctl.probe_cost.history[-1]["probe"] == "local"
    full, local = full_ctl._last_probe[0], local_ctl._last_probe[0]
    assert set(full) == set(local)
    exact = [k for k in full if k.startswith("model.layers.0.")
             or k.split("/")[0].endswith(("o_proj", "q_proj", "down_proj", "gate_proj"))]
    assert len(exact) >= 12
    for key in exact:
        assert local[key] == pytest.approx(full[key], rel=1e-5), key
    # the rest is estimated beyond the window: same order of magnitude, same plan mostly
    for key in full:
        assert 0.2 < local[key] / full[key] < 5, key


def test_local_plans_agree_with_full_plans(full_and_local):
    """At the budgets the issue judges (2 and 1 bits) the plans agree on >= 90% of
    elements (on this toy: all of them; at 4 bits ~88%, measured in benchmarks)."""
    full_ctl, local_ctl = full_and_local
    for bits in (2, 1):
        assert full_ctl.reallocate(bits).agreement(local_ctl.reallocate(bits)) >= 0.9, bits


def test_local_round_holds_at_most_two_blocks_exact_and_releases_everything(monkeypatch):
    seen_blocks: list[set] = []
    original = LocalRound.recompute

    def recompute(self, capture, b):
        out = original(self, capture, b)
        seen_blocks.append({self.stack.block_of(k) for k in self.policy.recorded_exact()} - {None})
        return out

    monkeypatch.setattr(LocalRound, "recompute", recompute)
    ctl, _ = probe_tiny_llama(5, bits=1)
    assert len(seen_blocks) == 5  # each block recomputed once (no ZeRO-3 here)
    assert max(len(s) for s in seen_blocks) <= 2
    assert ctl.policy.recorded_exact() == {} and ctl.policy.mode is ctl.policy.training
    assert not ctl.policy.activation_leaves
    h = ctl.probe_cost.history[-1]
    assert h["block_forwards"] == 5 and h["forwards"] == 1
    # passes: per level an exact pass (+ a calibration pass below the top), per job up
    # to 3 passes through its level and 3 through its window
    jobs = h["jobs"]
    assert 3 * jobs < h["backward_passes"] <= 6 * jobs + 2 * 7


def test_training_is_untouched_by_a_local_round():
    model = tiny_llama(seed=3, layers=3)
    x = token_batch(4, 32, seed=2)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=1))
    ctl.probe(lambda: model(input_ids=x, labels=x).loss)
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))
    # and the model still trains through the compressed path afterwards
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in params)


class _SideBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(32, 32)

    def forward(self, h, side):
        return torch.tanh(self.lin(h)) * side


class _SideNet(torch.nn.Module):
    """Blocks that also take a tensor carrying a gradient (not the hidden state)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(32, 32)
        self.blocks = torch.nn.ModuleList(_SideBlock() for _ in range(3))
        self.head = torch.nn.Linear(32, 1)

    def forward(self, x):
        side = torch.sigmoid(self.inp(x))
        h = side
        for block in self.blocks:
            h = block(h, side)
        return self.head(h).pow(2).mean()


def test_a_model_the_local_round_cannot_split_gets_the_cheap_round():
    x = torch.randn(64, 32)
    plans = {}
    for mode in ("local", "cheap"):
        net = _SideNet()
        ctl = alam_dist.apply(net, alam_dist.ALAMConfig(bits=1, probe=mode))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plans[mode] = ctl.probe(lambda: net(x))
        assert ctl.probe_cost.history[-1]["probe"] == "cheap"
        if mode == "local":
            assert any("does not apply" in str(w.message) and "gradient" in str(w.message)
                       for w in caught)
    assert plans["local"].bits == plans["cheap"].bits


def test_the_estimate_beyond_the_window():
    # R(l) = lam(l-1) + gam(l-1) R(l-1), R(0) = lam(BELOW)
    rho = rhos({BELOW: 2.0, 0: 3.0, 1: 5.0}, {0: 0.5, 1: 0.25}, 2)
    assert rho == {BELOW: 0.0, 0: 2.0, 1: 3.0 + 0.5 * 2.0, 2: 5.0 + 0.25 * 4.0}
    lam = {BELOW: 2.0, 0: 3.0, 1: 5.0}
    # a job in block 2 with window 1: beyond = R(1) * |handed on|^2 * coherence, where
    # coherence = (window response / |handed|^2) / lam(window)
    job = LocalJobResult("k", 2, 1, local=(1.0, 2.0, 0.5), window_norms=(10.0, 20.0, 0.0),
                         handed=(1.0, 2.0, 0.0), beyond=(0.5, 1.0, 0.0), seconds=0.0)
    (result,) = finish([job], rho, lam)
    coherence = (10.0 / 1.0) / 5.0  # = (20 / 2) / 5 as well
    ss = 1.0 + 10.0 + rho[1] * 0.5 * coherence
    s8 = 2.0 + 20.0 + rho[1] * 1.0 * coherence
    s18 = 0.5
    assert result.sensitivity == pytest.approx(max(ss, 2 * max(s8, s18)))
    # no window (block 0 under ZeRO-3): R(own level) * what it hands down
    alone = LocalJobResult("k0", 0, None, (1.0, 1.0, 1.0), (0.0,) * 3, (1.0, 1.0, 1.0), (0.0,) * 3, 0.0)
    assert finish([alone], rho, lam)[0].sensitivity == pytest.approx(2 * (1.0 + rho[0]))


def test_calibration_noise_is_seeded_and_shaped_like_the_gradient():
    g = torch.randn(2, 8, 16)
    a, b = local_probe.calibration_noise(g, 7, 3), local_probe.calibration_noise(g, 7, 3)
    assert torch.equal(a, b) and a.shape == g.shape
    assert not torch.equal(a, local_probe.calibration_noise(g, 7, 4))
    assert torch.all((a == 0) == (g == 0))


@pytest.mark.parametrize("probe", ["local", "cheap", "full"])
def test_a_probe_round_leaves_no_graph_behind(probe):
    """Ops that save their own output (rsqrt, softmax) close a reference cycle through C++
    when autograd is handed the tensor itself; a round's graphs are dropped without a
    final backward, so such cycles outlived every round (found measuring the round's
    memory). Nothing of a round may stay alive."""
    import gc

    from alam_dist.hooks.policy import Saved

    def survivors() -> dict[int, object]:
        # other tests' objects may live on in this process (module fixtures): only what
        # appears during this round counts
        gc.collect()
        return {id(o): o for o in gc.get_objects()
                if isinstance(o, Saved) or isinstance(o, torch.Tensor) and o.grad_fn is not None}

    before = set(survivors())
    model = tiny_llama(seed=0, layers=3)
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=1, probe=probe))
    x = token_batch(4, 48, seed=1)
    ctl.probe(lambda: model(input_ids=x, labels=x).loss)
    new = [o for i, o in survivors().items() if i not in before]
    assert not new, new[:3]
