"""torch.compile'd models: ALAM cannot see their saved tensors, so it refuses loudly
instead of training with nothing compressed (at install, and at the end of any step
whose forwards saved nothing through its hooks)."""
import pytest
import torch

import alam_dist


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 1))


def test_compiled_model_is_refused_at_install():
    with pytest.raises(RuntimeError, match=r"torch.compile'd modules \(<the model>\).*148222"):
        alam_dist.apply(torch.compile(_mlp()), alam_dist.ALAMConfig(bits=2, min_numel=16))


def test_module_compiled_in_place_is_named():
    model = _mlp()
    model[0].compile()
    with pytest.raises(RuntimeError, match=r"torch.compile'd modules \(0\)"):
        alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=16))


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


def test_disabled_alam_does_not_check():
    model = _mlp()
    ctl = alam_dist.apply(torch.compile(model), alam_dist.ALAMConfig(enabled=False))
    ctl.step_done()  # nothing installed: nothing to complain about


def test_compiling_after_install_is_refused_at_the_step():
    """torch.compile applied after ALAM: the hooks see a traced forward and only a few
    tensors (outside the graph); the step must fail, not report a compression."""
    pytest.importorskip("torch._dynamo")
    model = _mlp()
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, min_numel=16))
    compiled = torch.compile(model, backend="aot_eager")
    compiled(torch.randn(8, 64)).sum().backward()
    with pytest.raises(RuntimeError, match="run through torch.compile after ALAM was installed"):
        ctl.step_done()


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
