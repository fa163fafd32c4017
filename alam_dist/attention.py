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

How calls reach it (``attention="recompute"``, the default): user code keeps calling
``F.scaled_dot_product_attention`` (as Hugging Face's "sdpa" attention does), and the
policy opens a :func:`routing` scope around each compressed or probe forward. For the
scope, :func:`routed_sdpa` takes ``torch.nn.functional``'s attribute (put back when the
scope ends: outside compressed forwards ``F`` is torch's own); it calls
:func:`consistent_sdpa`, or torch's function under ``torch.compile``. That costs nothing
per torch call -- a ``TorchFunctionMode`` (:class:`ConsistentAttentionMode`) costs ~2 µs
of Python on every torch call of the forward. Calls that do not go through the attribute
(code holding torch's function object, e.g. ``from torch.nn.functional import
scaled_dot_product_attention``) are found by :class:`BypassWatch`, a mode the policy runs
in the first forward of each top-level module and in probe forwards; a model that made
one keeps the mode from then on, as does a forward that finds another library's
function in ``F``'s place (its wrapper keeps working, the mode routes what reaches torch).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SDPA = torch._C._nn.scaled_dot_product_attention  # torch's, whatever F's attribute holds
_CALLING = [0]  # routed_sdpa calls running: their torch-level calls are not bypasses


class _Scope:
    """One open routing scope (compared by identity)."""

    __slots__ = ("stock",)

    def __init__(self, stock):
        self.stock = stock


_SCOPES: list[_Scope] = []
"""Open routing scopes, innermost last. Process-wide, like F's attribute: a call from
another thread during a scope is routed too (same output; its saves are not ALAM's, as
the scope's stock callback answers only for its own policy's forward)."""


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
        extra = {"enable_gqa": True} if kwargs.get("enable_gqa") else {}  # torch < 2.5: none
        return SDPBackend(choose(q, k, v, attn_mask, dropout_p, kwargs.get("is_causal", False),
                                 scale=kwargs.get("scale"), **extra))
    except (ImportError, TypeError, ValueError, RuntimeError):
        return None


def sdpa_arguments(args: tuple, kwargs: dict) -> tuple:
    """(attn_mask, dropout_p, the other keyword arguments) of a call's arguments after
    query, key, value (F.scaled_dot_product_attention's signature)."""
    kwargs = dict(kwargs)
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    for name, value in zip(names, args):
        kwargs[name] = value
    return kwargs.pop("attn_mask", None), kwargs.pop("dropout_p", 0.0), kwargs


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


def autocast_inputs(query, key, value, attn_mask):
    """(q, k, v, mask, autocast device type or None): autocast's cast done here, where
    autograd sees it -- backward reruns the kernel outside autocast and needs inputs of
    one dtype (and the narrower copies are what is saved)."""
    device_type = query.device.type
    if not torch.is_autocast_enabled(device_type):
        return query, key, value, attn_mask, None
    dtype = torch.get_autocast_dtype(device_type)
    query, key, value = (t.to(dtype) if t.is_floating_point() else t
                         for t in (query, key, value))
    if isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(dtype)
    return query, key, value, attn_mask, device_type


def consistent_sdpa(query, key, value, *args, **kwargs):
    """Drop-in for ``F.scaled_dot_product_attention`` (same arguments, positional or
    not, and result; with dropout, the same mask for the same RNG state)."""
    attn_mask, dropout_p, kwargs = sdpa_arguments(args, kwargs)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (query, key, value)):
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, **kwargs)
    query, key, value, attn_mask, autocast = autocast_inputs(query, key, value, attn_mask)
    with torch.autocast(autocast, enabled=False) if autocast else contextlib.nullcontext():
        return ConsistentAttention.apply(query, key, value, attn_mask, dropout_p, kwargs)


def routed_sdpa(query, key, value, *args, **kwargs):
    """``F.scaled_dot_product_attention`` during a :func:`routing` scope: the scope's
    choice for this call (torch's kernel under saves keyed as the consistent path's, or
    :func:`consistent_sdpa`); torch's function under ``torch.compile`` and outside
    scopes. Every path gives torch's output; the choice is what backward keeps."""
    if torch.compiler.is_compiling() or not _SCOPES:  # compiled models keep torch's
        return _SDPA(query, key, value, *args, **kwargs)
    stock = _SCOPES[-1].stock
    _CALLING[0] += 1
    try:
        if stock is not None:
            attn_mask, dropout_p, rest = sdpa_arguments(args, kwargs)
            q, k, v, mask, autocast = autocast_inputs(query, key, value, attn_mask)
            saves = stock(q, k, v, mask, dropout_p, rest)
            if saves is not None:  # torch's kernel, its saves keyed as the rerun path's
                with saves, (torch.autocast(autocast, enabled=False) if autocast
                             else contextlib.nullcontext()):
                    return _SDPA(q, k, v, attn_mask=mask, dropout_p=dropout_p, **rest)
        return consistent_sdpa(query, key, value, *args, **kwargs)
    finally:
        _CALLING[0] -= 1


@contextlib.contextmanager
def routing(stock: Callable | None = None) -> Iterator[bool]:
    """Within: ``F.scaled_dot_product_attention`` is :func:`routed_sdpa` (torch's own is
    put back at the end). Yields whether calls through ``F`` are routed that way: False
    when another library's function holds ``F``'s place (left there; the caller routes
    with :class:`ConsistentAttentionMode` instead).

    ``stock(q, k, v, attn_mask, dropout_p, other_kwargs)``: asked per call; a context
    manager it returns runs torch's kernel inside it instead (the saved-tensor policy's,
    where the plan keeps q and k at 8 bits or more: alam_dist.hooks.stock_attention)."""
    current = F.scaled_dot_product_attention
    patched = current is _SDPA
    if patched:
        F.scaled_dot_product_attention = routed_sdpa
    scope = _Scope(stock)
    _SCOPES.append(scope)
    try:
        yield patched or current is routed_sdpa
    finally:
        for i in range(len(_SCOPES) - 1, -1, -1):  # by identity: scopes may close unordered
            if _SCOPES[i] is scope:
                del _SCOPES[i]
                break
        if patched and F.scaled_dot_product_attention is routed_sdpa:
            F.scaled_dot_product_attention = _SDPA


class ConsistentAttentionMode(TorchFunctionMode):
    """Routes every call of torch's ``scaled_dot_product_attention`` to
    :func:`consistent_sdpa`, however the caller reached it (at ~2 µs per torch call)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA and not _CALLING[0]:
            return self.route(args, kwargs)
        return func(*args, **kwargs)

    def route(self, args, kwargs):
        return consistent_sdpa(*args, **kwargs)


class BypassWatch(ConsistentAttentionMode):
    """The mode for forwards whose calls are not known yet to come through ``F``: routes
    those that did not come through :func:`routed_sdpa` (the caller holds torch's
    function itself), and notes that there were some (``bypassed``)."""

    bypassed = False

    def route(self, args, kwargs):
        self.bypassed = True
        return super().route(args, kwargs)
