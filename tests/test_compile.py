"""ALAM inside torch.compile graphs (alam_dist.hooks.compiled, docs/compile.md).

Compiling costs seconds per graph on CPU, so the few compile tests each check several
things. A counting backend (aot_eager underneath) tells how many graphs were compiled."""
import collections

import pytest
import torch

import alam_dist
from alam_dist.hooks import compiled as compiled_hooks
from alam_dist.probe.inputs import loss_of
from tests.helpers import tiny_llama, token_batch

pytestmark = pytest.mark.skipif(compiled_hooks.unsupported_reason() is not None,
                                reason=str(compiled_hooks.unsupported_reason()))


class CountingBackend:
    """aot_eager, counting the forward graphs it compiles."""

    def __init__(self):
        from torch._dynamo.backends.common import aot_autograd
        self.forward_graphs = 0
        self.encodes = []  # encode ops per forward graph

        def fw(gm, example_inputs):
            self.forward_graphs += 1
            self.encodes.append(sum(1 for n in gm.graph.nodes
                                    if n.op == "call_function" and "alam_dist.encode" in str(n.target)))
            return gm

        self.backend = aot_autograd(fw_compiler=fw, bw_compiler=lambda gm, _: gm)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                               torch.nn.SiLU(), torch.nn.Linear(256, 1))


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_before_apply_is_refused_with_the_fix():
    with pytest.raises(RuntimeError, match=r"already torch.compile'd \(<the model>\).*apply ALAM first"):
        alam_dist.apply(torch.compile(_mlp()), alam_dist.ALAMConfig(bits=2, min_numel=16))
    model = _mlp()
    model[0].compile()
    with pytest.raises(RuntimeError, match=r"already torch.compile'd \(0\)"):
        alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=16))


def test_disabled_alam_does_not_check():
    ctl = alam_dist.apply(torch.compile(_mlp()), alam_dist.ALAMConfig(enabled=False))
    ctl.step_done()  # nothing installed: nothing to complain about


def test_a_step_that_saved_nothing_through_alam_raises():
    model = _mlp()
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=16))
    with torch.no_grad():
        model(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="step 0 saved no activation.*1 forward"):
        ctl.step_done()
    model(torch.randn(8, 64)).sum().backward()  # a real step passes, and compresses
    ctl.step_done()
    assert ctl.memory_report()["ratio"] > 1


def test_compiled_gradients_equal_eager_with_the_same_quantization_bit_for_bit():
    """aot_eager runs the traced aten graphs as they are: with every saved activation at
    the same format and seed, compiled training must give eager's gradients exactly."""
    x = torch.randn(64, 64)

    def run(compile_it: bool):
        model = _mlp()
        ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=4, min_numel=256, probe_steps=()))
        ctl.policy.training.seed_for = lambda key: 11
        ctl.policy.training.compiled_seed_for = lambda key: 11
        backend = CountingBackend()
        run_model = torch.compile(model, backend=backend.backend) if compile_it else model
        run_model(x).pow(2).sum().backward()
        ctl.step_done()
        return _grads(model), ctl.memory_report(), backend

    eager, eager_report, _ = run(False)
    comp, comp_report, backend = run(True)
    assert backend.forward_graphs == 1 and backend.encodes == [4]  # the 4 hidden activations
    assert comp_report["compiled_tensors"] == 4 == eager_report["tensors"]
    assert comp_report["saved_bytes_packed"] == eager_report["saved_bytes_packed"]
    assert torch.equal(comp, eager)
    exact = _mlp()
    exact(x).pow(2).sum().backward()
    assert not torch.equal(comp, _grads(exact))  # it was quantized


def test_decode_uses_the_seed_encode_drew_even_after_the_step_ended():
    """Rotated formats decode with the encode seed's sign flips: the compiled decode op
    reads the seed the encode op drew, not the controller's step at backward time."""
    x = torch.randn(64, 64)

    def run(end_step_before_backward: bool):
        model = _mlp()
        ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=256, probe_steps=()))
        assert ctl.config.formats == "rotated"
        loss = torch.compile(model, backend="aot_eager")(x).pow(2).sum()
        if end_step_before_backward:
            ctl.step_done()
        loss.backward()
        return _grads(model)

    assert torch.equal(run(True), run(False))


def test_whole_model_compile_trains_compressed_by_the_plan():
    """A tiny LLaMA compiled whole after apply + probe: the compiled graphs compress
    (the memory report counts them), tables and masks stay exact, gradients stay close,
    seeds change per step, a new plan recompiles once, and a new sequence length under
    dynamic shapes compiles nothing new."""
    x = token_batch(2, 64)
    exact = tiny_llama()
    exact(input_ids=x, labels=x).loss.backward()
    model = tiny_llama()
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2))
    ctl.probe(lambda: loss_of(model(input_ids=x, labels=x)))
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend.backend, dynamic=True)
    grads = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        compiled(input_ids=x, labels=x).loss.backward()
        ctl.step_done()
        grads.append(_grads(model))
    graphs = backend.forward_graphs
    report = ctl.memory_report()
    assert report["compiled_tensors"] > 0 and report["ratio"] > 3
    assert sum(backend.encodes) > 0
    why = collections.Counter(v[3] for v in ctl.policy.compiled_seen.values())
    assert why["no gradient flows through it (a mask or table)"] > 0, why  # RoPE tables, masks
    assert all(torch.isfinite(g).all() for g in grads)
    assert _cos(grads[0], _grads(exact)) > 0.8
    assert not torch.equal(grads[0], grads[1])  # same batch, new seeds
    # the same plan and another length: dynamic shapes, no recompile
    y = token_batch(2, 48, seed=3)
    compiled(input_ids=y, labels=y).loss.backward()
    ctl.step_done()
    assert backend.forward_graphs == graphs
    assert ctl.memory_report()["compiled_tensors"] == report["compiled_tensors"]
    # a new plan: each compiled graph once more, then stable
    ctl.reallocate(1)
    for _ in range(2):
        compiled(input_ids=x, labels=x).loss.backward()
        ctl.step_done()
    assert backend.forward_graphs == 2 * graphs
    assert ctl.memory_report()["saved_bytes_packed"] < report["saved_bytes_packed"]


def test_per_block_compile_with_checkpointing_inside_blocks():
    """torchtitan's layout: each decoder block compiled (one graph shared by all), with
    activation checkpointing inside the compiled blocks; the probe round runs eagerly."""
    x = token_batch(2, 64)
    model = tiny_llama(layers=3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2))
    backend = CountingBackend()
    for block in model.model.layers:
        block.compile(backend=backend.backend)
    ctl.probe(lambda: loss_of(model(input_ids=x, labels=x)))  # eager, although compiled
    assert backend.forward_graphs == 0
    model(input_ids=x, labels=x).loss.backward()
    ctl.step_done()
    assert backend.forward_graphs >= 1
    report = ctl.memory_report()
    assert report["compiled_tensors"] >= 3  # every block's graph compresses its input
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class _CheckpointedBlock(torch.nn.Module):
    """A residual MLP whose inside is checkpointed, dropout included (an RNG op: the
    compiled graph saves its RNG state, which the hook inliner of torch 2.13 cannot find
    without alam_dist's rename)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)
        self.drop = torch.nn.Dropout(0.1)

    def inner(self, x):
        return self.down(self.drop(torch.nn.functional.gelu(self.up(x))))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return x + checkpoint(self.inner, x, use_reentrant=False)


class _CheckpointedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(32, 64)
        self.blocks = torch.nn.ModuleList([_CheckpointedBlock() for _ in range(3)])
        self.out = torch.nn.Linear(64, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h).pow(2).mean()


def test_checkpointing_with_dropout_inside_compiled_blocks():
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(1))
    grads = {}
    for with_alam in (False, True):
        torch._dynamo.reset()
        net = _CheckpointedNet()
        ctl = alam_dist.apply(net, alam_dist.ALAMConfig(bits=4, min_numel=256, probe_steps=())) \
            if with_alam else None
        for block in net.blocks:
            block.compile(backend="aot_eager")
        torch.manual_seed(5)
        net(x).backward()
        grads[with_alam] = _grads(net)
        if ctl is not None:
            ctl.step_done()
            report = ctl.memory_report()
            # checkpointing leaves each block its input: compressed inside the graph
            assert report["compiled_tensors"] == 3 and report["ratio"] > 4
    assert not torch.equal(grads[True], grads[False])
    assert _cos(grads[True], grads[False]) > 0.99  # same dropout masks, 4-bit block inputs


def test_compiled_autograd_is_refused_clearly():
    model = _mlp()
    alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=16))
    from torch._dynamo import compiled_autograd
    with compiled_autograd._enable(torch.compile(backend="eager")):
        with pytest.raises(RuntimeError, match="compiled autograd is on"):
            model(torch.randn(8, 64))


def test_selective_checkpointing_caches_outside_alam():
    """Selective activation checkpointing keeps the ops its policy saves in its own cache,
    not through saved-tensor hooks: ALAM sees (and compresses) only what full checkpointing
    leaves, and the SAC cache stays exact and out of the memory report (measured and
    documented in docs/reliability.md)."""
    import functools
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    from tests.helpers import tiny_llama, token_batch

    def save_matmuls(ctx, op, *args, **kwargs):
        return (CheckpointPolicy.MUST_SAVE if op in (torch.ops.aten.mm.default,
                                                     torch.ops.aten.addmm.default)
                else CheckpointPolicy.PREFER_RECOMPUTE)

    reports = {}
    for mode in ("full", "selective"):
        model = tiny_llama(layers=2)
        kwargs = {"use_reentrant": False}
        if mode == "selective":
            kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, save_matmuls)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2))
        x = token_batch(2, 32)
        model(input_ids=x, labels=x).loss.backward()
        ctl.step_done()
        reports[mode] = ctl.memory_report()
    assert reports["selective"]["tensors"] == reports["full"]["tensors"] > 0
    assert reports["selective"]["saved_bytes_raw"] == reports["full"]["saved_bytes_raw"]
