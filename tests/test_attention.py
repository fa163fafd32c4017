"""The consistent attention path: same results as torch's kernel without compression,
installed by alam_dist.apply without model changes, and robust to compressed q/k."""
import pytest
import torch
import torch.nn.functional as F

import alam_dist
from alam_dist import ALAMConfig, Controller, Plan
from alam_dist.attention import ConsistentAttentionMode, consistent_sdpa
from tests.helpers import cosine, flat_grads, tiny_llama, token_batch

pytest.importorskip("transformers")


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, names, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "gqa", "scale"])
def test_matches_torch_kernel_without_compression(case):
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 2, 4, 13, 8  # odd sequence length
    q = torch.randn(b, h, t, d, generator=g, requires_grad=True)
    kv_heads = 2 if case == "gqa" else h
    k = torch.randn(b, kv_heads, t, d, generator=g, requires_grad=True)
    v = torch.randn(b, kv_heads, t, d, generator=g, requires_grad=True)
    kwargs = {"causal": {"is_causal": True}, "gqa": {"enable_gqa": True}, "scale": {"scale": 0.3},
              "bool_mask": {"attn_mask": torch.rand(t, t, generator=g) > 0.3},
              "float_mask": {"attn_mask": torch.randn(b, 1, t, t, generator=g)}}.get(case, {})
    if case == "bool_mask":
        kwargs["attn_mask"].fill_diagonal_(True)  # no fully masked row
    grad_out = torch.randn(b, h, t, d, generator=g)
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    got = consistent_sdpa(q, k, v, **kwargs)
    assert "ConsistentAttentionBackward" in _graph_names(got)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    torch.testing.assert_close(got, want)
    for a, b_ in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)


def test_only_inputs_that_need_grads_get_them():
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4, requires_grad=True)
    out = consistent_sdpa(q, k, v)
    gq, gv = torch.autograd.grad(out.sum(), (q, v))
    assert gq.shape == q.shape and gv.shape == v.shape
    with torch.no_grad():
        assert consistent_sdpa(q, k, v).grad_fn is None


@pytest.mark.parametrize("mask", [None, "float"])
def test_dropout_attention_replays_the_mask_and_equals_torch_bit_for_bit(mask):
    """With dropout the recompute runs from the forward's RNG state: the same mask, so
    output and gradients equal torch's kernel under the same seed, bit for bit, and the
    RNG stream after the call is the one torch's kernel leaves."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=g, requires_grad=True) for _ in range(3))
    attn_mask = torch.randn(2, 1, 33, 33, generator=g) if mask else None
    grad_out = torch.randn(2, 4, 33, 16, generator=g)
    results = []
    for fn in (F.scaled_dot_product_attention, consistent_sdpa):
        torch.manual_seed(7)
        out = fn(q, k, v, attn_mask=attn_mask, dropout_p=0.3)
        after_forward = torch.rand(4)  # backward must not move the caller's stream
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results.append((out, grads, after_forward, torch.rand(4)))
    (want, want_grads, want_a, want_b), (got, got_grads, got_a, got_b) = results
    assert torch.equal(got, want) and torch.equal(got_a, want_a) and torch.equal(got_b, want_b)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    torch.manual_seed(7)
    other = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.3)
    torch.manual_seed(8)
    assert not torch.equal(consistent_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=0.3), other)


def test_the_kernel_choice_is_torchs():
    """What the dropout replay pins and the stock path requires (torch 2.13 takes scale
    and enable_gqa as keywords only: a positional call always answered None)."""
    from torch.nn.attention import SDPBackend

    from alam_dist.attention import _kernel_choice
    q = torch.randn(2, 4, 9, 16)
    assert _kernel_choice(q, q, q, None, 0.0, {"is_causal": True}) == SDPBackend.FLASH_ATTENTION
    assert _kernel_choice(q, q[:, :2], q[:, :2], None, 0.0, {"enable_gqa": True}) is not None
    assert _kernel_choice(q, q, q, None, 0.3, {}) == SDPBackend.MATH  # CPU dropout


def test_mode_reroutes_user_calls_and_leaves_others_alone():
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    with ConsistentAttentionMode():
        out = F.scaled_dot_product_attention(q, q, q)
        other = torch.relu(q)
    assert "ConsistentAttentionBackward" in _graph_names(out)
    assert "ConsistentAttentionBackward" not in _graph_names(other)


def test_apply_routes_hf_sdpa_attention_and_saves_only_q_k_v():
    model = tiny_llama(seed=3)
    x = token_batch(2, 24)
    ctl = alam_dist.apply(model, ALAMConfig(bits=4))
    loss = model(input_ids=x, labels=x).loss
    assert "ConsistentAttentionBackward" in _graph_names(loss)
    attn_keys = [k for k in ctl.policy.seen if k.startswith("model.layers.0.self_attn/")]
    loss.backward()
    ctl.uninstall_hook()
    stock = alam_dist.apply(tiny_llama(seed=3), ALAMConfig(bits=4, attention="stock"))
    loss = stock.model(input_ids=x, labels=x).loss
    assert "ConsistentAttentionBackward" not in _graph_names(loss)
    stock_keys = [k for k in stock.policy.seen if k.startswith("model.layers.0.self_attn/")]
    # torch's kernel also saves its output and logsumexp; the consistent path q, k, v only
    assert len(attn_keys) < len(stock_keys)
    stock.uninstall_hook()
    # outside a forward of the hooked model nothing is rerouted
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    assert "ConsistentAttentionBackward" not in _graph_names(F.scaled_dot_product_attention(q, q, q))


class _ThroughF(torch.nn.Module):
    """Attention through F's attribute, as Hugging Face calls it."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def qkv(self, x):
        return self.proj(x).view(x.shape[0], 1, x.shape[1], 3, 16).unbind(3)

    def forward(self, x):
        return F.scaled_dot_product_attention(*self.qkv(x)).flatten(1, 2)


class _Held(_ThroughF):
    """Attention through torch's function object, held since import."""

    sdpa = staticmethod(torch._C._nn.scaled_dot_product_attention)

    def forward(self, x):
        return self.sdpa(*self.qkv(x)).flatten(1, 2)


def test_routing_needs_no_mode_after_the_first_forward_unless_a_call_bypasses_f():
    """HF's attention calls F.scaled_dot_product_attention: routed by the attribute, and
    from the second forward without the TorchFunctionMode that costs every torch call.
    A module holding torch's function itself is routed too, by the mode it keeps."""
    from torch.overrides import _get_current_function_mode_stack
    x = token_batch(2, 24)
    held_x = torch.randn(3, 40, 16)  # 3 sequences: uneven against the LLaMA batch
    for model, forward, bypass in (
            (tiny_llama(seed=3), lambda m: m(input_ids=x, labels=x).loss, False),
            (_Held(), lambda m: m(held_x).square().mean(), True)):
        ctl = alam_dist.apply(model, ALAMConfig(bits=4, probe="cheap"))
        ctl.probe(lambda: forward(model))
        modes = []  # modes active inside the forward (the probe's forward decided)
        inner = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        inner.register_forward_pre_hook(
            lambda m, a: modes.append(len(_get_current_function_mode_stack())))
        for _ in range(3):
            loss = forward(model)
            assert "ConsistentAttentionBackward" in _graph_names(loss)
            loss.backward()
            ctl.step_done()
        assert modes == [int(bypass)] * 3, modes
        assert F.scaled_dot_product_attention is _Held.sdpa  # torch's own between forwards
        ctl.uninstall_hook()


def test_each_top_level_module_is_watched_and_f_is_torchs_outside_forwards():
    """A step that calls an encoder (through F) and then a head holding torch's function:
    the head's first forward is watched too, so its attention stays routed in every
    step. nn.TransformerEncoderLayer (positional is_causal) is routed. A forward that
    raises leaves F as torch's own and no scope open."""
    from alam_dist import attention
    torch.manual_seed(0)
    holder = torch.nn.ModuleDict({
        "enc": _ThroughF(), "head": _Held(),
        "layer": torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)})
    ctl = alam_dist.apply(holder, ALAMConfig(bits=2, min_numel=16, probe_steps=[]))  # no probe
    x = torch.randn(3, 11, 16)
    for step in range(3):
        h = holder["enc"](x)
        head_in = torch.randn(3, 11, 16, requires_grad=True)  # its own graph
        out = holder["head"](head_in)
        layer_out = holder["layer"](h.detach().requires_grad_())
        for t in (h, out, layer_out):
            assert "ConsistentAttentionBackward" in _graph_names(t), step
        (h.mean() + out.square().mean() + layer_out.mean()).backward()
        ctl.step_done()
    with pytest.raises(RuntimeError):
        holder["enc"](torch.randn(3, 11, 5))  # a bad input: the forward raises
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert not attention._SCOPES
    ctl.uninstall_hook()


def test_q_k_at_8_bits_take_torchs_kernel_under_the_same_keys():
    """Where the plan keeps an attention call's q and k at 8 bits or more, torch's fused
    kernel runs (no attention forward in backward); its q, k, v take the consistent
    path's keys, so the probe's plan (made on the consistent path) serves the step with
    no mismatch and every later key of the layer is unchanged. Layers below 8 bits keep
    the recompute. 3 sequences of 29 tokens, GQA (4 heads, 2 key/value heads)."""
    model = tiny_llama(seed=4, layers=3)
    x = token_batch(3, 29)
    fn = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
    exact = flat_grads(fn(), list(model.parameters()))
    ctl = alam_dist.apply(model, ALAMConfig(bits=4, probe="cheap"))
    ctl.probe(fn)
    calls = []  # per attention call of a forward: the keys its q, k, v are saved under
    decide = ctl.policy._stock_attention
    ctl.policy._stock_attention = lambda *a: calls.append(ctl.policy.keys.peek(3)) or decide(*a)

    def step(q_k_bits):
        for keys, bits in zip(calls[:3] or [[]] * 3, q_k_bits):
            for key in keys[:2]:
                ctl.plan.bits[key] = bits
        calls.clear()
        loss = fn()
        names = _graph_names(loss)
        grads = flat_grads(loss, list(model.parameters()))
        keys = set(ctl.policy.stats.per_key_bytes)
        stock = ctl.policy.stats.attention_stock
        ctl.step_done()
        return names, grads, keys, stock

    step([2, 2, 2])  # learns the keys
    names, _, consistent_keys, stock = step([2, 2, 2])
    assert stock == 0 and "ConsistentAttentionBackward" in names and len(calls) == 3
    names, _, mixed_keys, stock = step([8, 32, 2])  # layers 0 and 1 stock, layer 2 not
    assert stock == 2 and "ConsistentAttentionBackward" in names
    assert any("FlashAttention" in n for n in names), names
    assert mixed_keys == consistent_keys  # the same saves under the same keys
    names, grads, stock_keys, stock = step([8, 8, 8])
    assert stock == 3 and "ConsistentAttentionBackward" not in names
    assert stock_keys == consistent_keys
    for key in calls[0][:3]:  # q, k, v compressed as planned (v at its 4-bit-budget bits)
        assert ctl.plan.bits[key] < 32 and key in stock_keys
    assert cosine(exact, grads) > 0.98  # the rest of the model still at a 4-bit budget
    assert not ctl.policy.stock_refused
    ctl.uninstall_hook()


def test_torchs_kernel_under_autocast_and_not_with_a_bool_mask():
    """Under autocast the cast is done before the kernel (its saves are the bf16 q, k, v,
    packed under their keys: nothing refused); a bool mask keeps the rerun path (the
    kernel would save a float copy of it)."""
    model = tiny_llama(seed=5, layers=2)
    x = token_batch(2, 21)
    ctl = alam_dist.apply(model, ALAMConfig(bits=8, ladder=[32, 8], probe="cheap"))

    def fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=x, labels=x).loss

    ctl.probe(fn)
    for _ in range(2):
        fn().backward()
        assert ctl.policy.stats.attention_stock == 2
        ctl.step_done()
    assert not ctl.policy.stock_refused
    ctl.uninstall_hook()

    class Masked(_ThroughF):
        def forward(self, x):
            return F.scaled_dot_product_attention(*self.qkv(x), attn_mask=self.mask)

    masked = Masked()
    ctl = alam_dist.apply(masked, ALAMConfig(bits=8, min_numel=16))  # no plan: 8 bits
    for mask, stock in ((torch.ones(7, 7, dtype=torch.bool).tril(), 0), (torch.zeros(7, 7), 1)):
        masked.mask = mask
        out = masked(torch.randn(2, 7, 16))
        assert ctl.policy.stats.attention_stock == stock
        assert ("ConsistentAttentionBackward" in _graph_names(out)) == (not stock)
        out.sum().backward()
        ctl.step_done()
    assert not ctl.policy.stock_refused  # the float mask is the call's own, not a copy
    ctl.uninstall_hook()


def test_gradients_at_8_bits_match_exact():
    model = tiny_llama(seed=4)
    x = token_batch(2, 32)
    fn = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
    exact = flat_grads(fn(), list(model.parameters()))
    with Controller(model, config=ALAMConfig(bits=8, ladder=[32, 8])):
        got = flat_grads(fn(), list(model.parameters()))
    assert cosine(exact, got) > 0.9995


def test_compressed_query_key_stay_consistent():
    """Only the attention inputs compressed (2 bits, seed formats): torch's kernel pairs
    decoded q, k with the exact logsumexp; the consistent path does not. Attention is
    made peaked, as in pretrained models (random init attends almost uniformly)."""
    x = token_batch(4, 64)
    results = {}
    for attention in ("stock", "recompute"):
        model = tiny_llama(seed=2)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(4)
                layer.self_attn.k_proj.weight.mul_(4)
        fn = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
        exact = flat_grads(fn(), list(model.parameters()))
        with Controller(model, config=ALAMConfig(bits=2, formats="seed", attention=attention)) as ctl:
            fn().backward()
            model.zero_grad()
            seen = ctl.policy.seen
            # q and k as saved by the attention call: 4-D [batch, heads, seq, dim]
            qk = {k for k, info in seen.items() if "self_attn/" in k and info.numel == 4 * 4 * 64 * 32}
            assert qk, "no attention inputs found"
            bits = {k: (2 if k in qk else 32) for k in seen}
            ctl.set_plan(Plan(bits=bits, numel={k: v.numel for k, v in seen.items()},
                              raw_bits={k: v.raw_bits for k, v in seen.items()},
                              fingerprint=ctl._fingerprint, formats="seed"))
            results[attention] = cosine(exact, flat_grads(fn(), list(model.parameters())))
    assert 1 - results["recompute"] < 0.5 * (1 - results["stock"])
    assert results["recompute"] > 0.93  # measured 0.955 (stock: 0.850)


# 8 bits in fp32: q and k would take torch's kernel, but not inside a checkpoint, whose
# recompute must see the saves the forward made
@pytest.mark.parametrize("bits, autocast", [(2, True), (8, False)])
def test_autocast_and_checkpointing_take_the_same_path(bits, autocast):
    model = tiny_llama(seed=6)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = token_batch(2, 16)
    ctl = alam_dist.apply(model, ALAMConfig(bits=bits))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    ctl.uninstall_hook()
