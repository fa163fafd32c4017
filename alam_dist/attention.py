"""Attention whose backward stays consistent with compressed q, k, v.

``F.scaled_dot_product_attention`` saves q, k, v, its output and the logsumexp, and its
backward rebuilds the probabilities as ``exp(q kᵀ scale - lse)`` from the *saved* q, k
against the *saved, exact* lse. Once q or k are decoded from a few bits those
"probabilities" no longer sum to one, and the gradient error grows exponentially with
the quantization error: on MiniLM-L6 one layer-0 query tensor at 2 bits alone took the
whole model's gradient cosine to ~0.01 (issue 14).

:class:`ConsistentAttention` saves only q, k, v (compressed by the policy like any
activation) and, in backward, decodes them, reruns the attention forward with autograd
and back-propagates through it: probabilities, logsumexp and output all come from the
same decoded q, k, v, so the error stays proportional to the quantization error. It
costs one attention forward in backward and saves the output and logsumexp tensors.

With attention dropout (``dropout_p > 0``, BERT-style fine-tuning) the forward notes the
RNG state of q's device before the kernel draws its mask, and the backward recompute runs
from that state inside ``torch.random.fork_rng`` (as ``torch.utils.checkpoint`` does): the
same mask, without storing it, and the caller's RNG stream is left as the forward left it.

It is installed by the policy (``attention="recompute"``, the default) as a torch
function mode active only during a compressed forward: user code keeps calling
``F.scaled_dot_product_attention`` (as Hugging Face's "sdpa" attention does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention


def _rng_state(device: torch.device) -> torch.Tensor:
    """The generator state a dropout kernel on ``device`` draws from (host memory: reading
    it does not wait for the device)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return getattr(torch, device.type).get_rng_state(device)


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        getattr(torch, device.type).set_rng_state(state, device)


def _kernel_choice(q, k, v, attn_mask, dropout_p, kwargs):
    """The SDPBackend torch runs for these arguments here (None where torch cannot say)."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    try:
        from torch.nn.attention import SDPBackend
        return SDPBackend(choose(q, k, v, attn_mask, dropout_p, kwargs.get("is_causal", False),
                                 kwargs.get("scale"), kwargs.get("enable_gqa", False)))
    except (ImportError, TypeError, ValueError, RuntimeError):
        return None


class ConsistentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, dropout_p, kwargs):
        ctx.kwargs = kwargs
        ctx.dropout_p = dropout_p
        if dropout_p:
            ctx.rng_state = _rng_state(q.device)
            # the kernel this call runs: backward must draw the mask with the same one
            # (torch picks by grad mode, too; each kernel draws its mask differently)
            ctx.backend = _kernel_choice(q, k, v, attn_mask, dropout_p, kwargs)
        ctx.mask_is_tensor = isinstance(attn_mask, torch.Tensor)
        if ctx.mask_is_tensor:
            ctx.save_for_backward(q, k, v, attn_mask)
        else:
            ctx.attn_mask = attn_mask
            ctx.save_for_backward(q, k, v)
        return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, **kwargs)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        q, k, v = (t.detach().requires_grad_(need)
                   for t, need in zip(saved[:3], ctx.needs_input_grad[:3]))
        mask = saved[3] if ctx.mask_is_tensor else ctx.attn_mask
        with torch.enable_grad(), _replayed_rng(ctx, q.device):
            out = _SDPA(q, k, v, attn_mask=mask, dropout_p=ctx.dropout_p, **ctx.kwargs)
        inputs = [t for t in (q, k, v) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, inputs, grad_out)) if inputs else iter(())
        return (*(next(grads) if t.requires_grad else None for t in (q, k, v)), None, None, None)


class _replayed_rng:
    """Within: the RNG of the forward's device as it was before the forward's kernel;
    after: as it was before this block (fork_rng semantics, one device)."""

    def __init__(self, ctx, device: torch.device):
        self.ctx, self.device = ctx, device

    def __enter__(self):
        self.kernel = None
        if self.ctx.dropout_p:
            self.saved = _rng_state(self.device)
            _set_rng_state(self.device, self.ctx.rng_state)
            if self.ctx.backend is not None:
                from torch.nn.attention import sdpa_kernel
                self.kernel = sdpa_kernel([self.ctx.backend])
                self.kernel.__enter__()

    def __exit__(self, *exc):
        if self.kernel is not None:
            self.kernel.__exit__(*exc)
        if self.ctx.dropout_p:
            _set_rng_state(self.device, self.saved)


def consistent_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, **kwargs):
    """Drop-in for ``F.scaled_dot_product_attention`` (same arguments and result; with
    dropout, the same mask for the same RNG state)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (query, key, value)):
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, **kwargs)
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Do autocast's cast here, where autograd sees it: backward reruns the kernel
        # outside autocast and needs inputs of one dtype (and saves the narrower copies).
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(dtype) if t.is_floating_point() else t
                             for t in (query, key, value))
        if isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return ConsistentAttention.apply(query, key, value, attn_mask, dropout_p, kwargs)
    return ConsistentAttention.apply(query, key, value, attn_mask, dropout_p, kwargs)


class ConsistentAttentionMode(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` calls to :func:`consistent_sdpa`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return consistent_sdpa(*args, **kwargs)
        return func(*args, **kwargs)
