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
