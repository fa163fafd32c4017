"""The saved-tensor policy: which saved tensors are compressed, and how.

The pack hook runs for every tensor autograd saves during one of the model's forwards.
It keys the tensor by where it is saved (alam_dist.hooks.keys), skips what is not an
activation (alam_dist.hooks.classify), shares one packed copy between the ops that save
the same tensor, and hands the rest to the current mode (alam_dist.hooks.modes):
compressed in training, recorded exactly in probe forwards, only counted when measuring.

Skipped (kept exact): weights -- parameters (leaves), their views and autocast copies
(found by walking the autograd graph to AccumulateGrad), anything an extra detector
claims --, every leaf tensor (inputs, frozen weights, and tensors built without grad such
as additive attention masks, whose finfo.min entries must stay exact), non-float tensors
other than bool masks (always bit-packed), and tensors below ``min_numel``. A tensor
saved by several ops (the input of q/k/v projections) is packed once and shared.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from alam_dist import codec
from alam_dist import attention as sdpa_routing
from alam_dist.codec import PackedTensor, backends
from alam_dist.hooks import compiled, stock_attention
from alam_dist.hooks.classify import (FLOATS, WeightDetector, is_weight, key_seed,  # noqa: F401
                                      model_fingerprint, role, storage_ptr)
from alam_dist.hooks.keys import ModuleKeys
from alam_dist.hooks.modes import Compress, Mode, Record  # noqa: F401


class Saved:
    """What autograd holds instead of a compressed activation."""

    __slots__ = ("key", "packed", "exact", "__weakref__")  # one per saved tensor per step

    def __init__(self, key: str, packed: PackedTensor | None = None,
                 exact: torch.Tensor | None = None):
        self.key = key
        self.packed = packed
        self.exact = exact  # record mode (probes) keeps the exact tensor

    def __repr__(self) -> str:
        return f"Saved({self.key!r}, {self.packed or 'exact'})"


@dataclass
class TensorInfo:
    numel: int
    raw_bits: int
    dtype: str
    module_type: str = ""
    op: str = ""  # the autograd node that produced it, e.g. "LogSoftmaxBackward0"
    role: str = ""  # what it is to the module that saved it (alam_dist.hooks.classify.role)


@dataclass
class StepStats:
    """Saved-activation bytes of the forwards of one training step."""

    raw_bytes: int = 0
    packed_bytes: int = 0
    exact_bytes: int = 0  # eligible activations kept exact (tiny ones, or plan says 32)
    tensors: int = 0
    deduplicated: int = 0
    skipped_weights: int = 0
    skipped_other: int = 0
    forwards: int = 0
    compiled_tensors: int = 0  # of ``tensors``: compressed inside compiled graphs
    attention_stock: int = 0  # attention calls run by torch's kernel (q, k at >= 8 bits)
    per_key_bytes: dict[str, int] = field(default_factory=dict)
    nonfinite_flags: list = field(default_factory=list)
    """Per forward (and device), one 0-d tensor: how many of its compressed tensors held
    NaN/inf (their metadata is NaN). Kept on the device and counted only when reported,
    so training never waits for a device-to-host copy."""
    forward_meta: list = field(default_factory=list)
    """The running forward's metadata tensors, reduced when it ends (:meth:`end_forward`):
    a few launches per forward instead of one per tensor."""

    def end_forward(self) -> None:
        """Count the forward's NaN/inf tensors: the norm of a metadata tensor is NaN when
        a group of it held NaN/inf, and never for finite values (an overflow is inf) --
        one fused launch for all of them on a GPU (``_foreach_norm``, as
        ``clip_grad_norm_`` uses)."""
        metas, self.forward_meta = self.forward_meta, []
        by_device: dict = {}
        for meta in metas:
            by_device.setdefault((meta.device, meta.dtype), []).append(meta)
        for group in by_device.values():
            self.nonfinite_flags.append(torch.stack(torch._foreach_norm(group)).isnan().sum())

    def nonfinite_tensors(self) -> int:
        """How many compressed tensors held NaN/inf: one device-to-host read."""
        self.end_forward()  # a forward still open (reported from inside a step)
        if not self.nonfinite_flags:
            return 0
        device = self.nonfinite_flags[0].device
        return int(torch.stack([f.to(device) for f in self.nonfinite_flags]).sum())


class SavedTensorPolicy:
    """Owns the pack/unpack hooks of one model: keys (via :class:`ModuleKeys`), what is
    skipped, the shared copies, the statistics, and the current :class:`Mode`.

    ``training`` is the mode of training forwards (``Compress`` with the controller's
    plan, or ``Measure``); probe code swaps in others with :meth:`using`, and points a
    probe pass at one recorded tensor with :meth:`targeting`."""

    def __init__(self, model: torch.nn.Module, *, min_numel: int = 1024, backend: str = "auto",
                 formats: str = "minmax", attention: str = "stock",
                 training: Mode | None = None):
        self.model = model
        self.min_numel = min_numel
        self.formats = formats  # the codec family plan bits name
        # "recompute" / "recompute_all": route F.scaled_dot_product_attention through
        # alam_dist.attention during compressed and probe forwards (config.ATTENTION_PATHS)
        self.attention = attention
        # (kept, total) samples of a sliced probe forward: a tensor is "small" when the
        # training-size tensor would be, i.e. numel * total < min_numel * kept
        self.size_share: tuple[int, int] = (1, 1)
        self.backend = backend
        self.training: Mode = training or Compress()
        self.mode: Mode = self.training
        self._target: tuple[str, float, int] | None = None
        self.weight_detectors: list[WeightDetector] = []
        # leaves that are activations, not weights: the block-local probe round cuts the
        # graph at block boundaries with leaves that stand for the hidden state
        self.activation_leaves: dict[int, torch.Tensor] = {}
        self.seen: dict[str, TensorInfo] = {}
        self.seen_small: set[str] = set()  # float tensors kept exact for being under min_numel
        self.stats = StepStats()
        self.keys = ModuleKeys(model, on_forward_begin=self._begin_forward,
                               on_forward_end=self._exit_context,
                               on_recompute=self._recompute, on_compiling=self._compiling)
        self._dedup: dict[tuple, tuple[weakref.ref, weakref.ref | None]] = {}
        # (bits, device) -> the codec's encoder, resolved once: the pack hook's fast path
        self._encoders: dict[tuple, codec.Encoder] = {}
        self._backends: dict[torch.device, backends.Backend] = {}  # device -> decoding backend
        self._recorded: dict[str, torch.Tensor] = {}  # record mode: key -> exact tensor
        self.compiled_forward_seen = False
        """Whether dynamo traced one of the model's forwards (compiled regions exist)."""
        self.compiled_seen: dict[str, tuple] = {}
        """Saved values of compiled graphs, by graph key: (shape, dtype, bits, why exact)."""
        # The hooks are GraphModules where torch can inline them into compiled graphs
        # (alam_dist.hooks.compiled); a new plan gets new ones (one recompile per region).
        self._hook_generation = 0
        self._all_hooks: list = []
        self.hooks = (compiled.CompiledHooks(self, 0) if compiled.unsupported_reason() is None
                      else None)
        self._hooks_ctx = None
        self._attention_ctx: contextlib.ExitStack | None = None
        # Whether this model calls torch's attention other than through
        # F.scaled_dot_product_attention: found by a watch mode in the first forward of
        # each top-level module (by id) and in probe forwards; once found, the mode stays.
        self._attention_bypass = False
        self._watched: set[int] = set()
        self._bypass_watch: tuple[int, sdpa_routing.BypassWatch] | None = None
        # attention calls (by their query's key) where torch's kernel saved more than its
        # output and logsumexp: the rerun path for them (alam_dist.hooks.stock_attention)
        self.stock_refused: set[str] = set()
        self.stock_kernel = attention == "recompute"
        """Whether torch's kernel may run where q and k are planned at >= 8 bits (off for
        "recompute_all", and under a memory target, whose forecast counts q, k, v only)."""

    # -- installation -------------------------------------------------------------------
    def install(self) -> None:
        self.keys.install()

    def uninstall(self) -> None:
        self.keys.uninstall()
        self._exit_context()

    @property
    def installed(self) -> bool:
        return self.keys.installed

    # -- modes ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def using(self, mode: Mode) -> Iterator[Mode]:
        """Forwards within the block run in ``mode`` (the previous one comes back)."""
        previous, self.mode = self.mode, mode
        try:
            yield mode
        finally:
            self.mode = previous

    @contextlib.contextmanager
    def targeting(self, target: tuple[str, float, int] | None) -> Iterator[None]:
        """Backward passes within the block unpack the recorded tensor ``target[0]``
        compressed at format ``target[1]`` with seed ``target[2]`` (None: all exact)."""
        previous, self._target = self._target, target
        try:
            yield
        finally:
            self._target = previous

    @contextlib.contextmanager
    def probe_scope(self, batch_share: tuple[int, int]) -> Iterator[None]:
        """A probe round's state: a fresh inventory and byte count, the slice's share; on
        exit every recorded copy and activation leaf released and the step's own
        statistics back."""
        stats_before = self.stats
        self.stats = StepStats()
        self.seen.clear()
        self.seen_small.clear()
        self.size_share = batch_share
        try:
            yield
        finally:
            self.activation_leaves.clear()
            self.size_share = (1, 1)
            self.release_recorded()
            self.stats = stats_before

    # -- forward life cycle (ModuleKeys' callbacks) ---------------------------------------
    def _compiling(self) -> None:
        # Recorded (dynamo replays the write): compiled regions exist in this model.
        self.compiled_forward_seen = True

    def refresh_hooks(self) -> None:
        """New hook modules (after a plan change): each compiled region recompiles once
        with the new plan; eager forwards behave the same with either."""
        if self.hooks is not None:
            # every generation stays alive with the policy: dynamo guards on the hooks'
            # ids, and a freed module's id reused by a later one would match a graph
            # compiled for an older plan
            self._all_hooks.append(self.hooks)
            self._hook_generation += 1
            self.hooks = compiled.CompiledHooks(self, self._hook_generation)
            self.compiled_seen.clear()

    # -- what compiled graphs ask (alam_dist.hooks.compiled) ------------------------------
    def compiled_bits(self, path: str, key: str, op: str) -> float:
        """Bits of a compiled graph's saved value (traced once per graph)."""
        bits_for = getattr(self.mode, "compiled_bits_for", None)
        return 32.0 if bits_for is None else bits_for(path, key, op)

    def compiled_seed(self, key: str) -> int:
        seed_for = getattr(self.training, "compiled_seed_for", None)
        return 0 if seed_for is None else seed_for(key)

    def note_compiled(self, key: str, x: torch.Tensor, why_exact: str, bits: float) -> None:
        self.compiled_seen[key] = (tuple(compiled._hint(d) for d in x.shape), str(x.dtype),
                                   bits, why_exact)

    def count_compiled_exact(self, key: str, x: torch.Tensor) -> None:
        """A compiled graph kept an activation as it is (counted on both sides)."""
        self.stats.tensors += 1
        self._count_kept(x.numel() * x.element_size())

    def _count_kept(self, nbytes: int) -> None:
        """An activation kept as it is: still activation memory, on both sides of the ratio."""
        self.stats.raw_bytes += nbytes
        self.stats.packed_bytes += nbytes
        self.stats.exact_bytes += nbytes

    def count_compiled(self, key: str, x: torch.Tensor, packed: PackedTensor) -> None:
        """A compiled graph's encode op ran: the step's statistics, as for eager saves."""
        s = self.stats
        s.tensors += 1
        s.compiled_tensors += 1
        s.raw_bytes += x.numel() * x.element_size()
        self._count_packed(key, packed)

    def _recompute(self, begins: bool) -> None:
        """A forward run by backward (checkpoint recompute): its saves are not ours, but
        its attention calls must take the path the original forward took, or the
        checkpoint sees different saved tensors."""
        if begins and self._routes_attention() and not self._compiled_model():
            self._route_attention()
        elif not begins:
            self._exit_context()

    def _begin_forward(self) -> None:
        # A step may call several top-level modules (an encoder, then a head on some of
        # its outputs): each starts here, so the record round's exact copies are not
        # dropped here but by record_forward / release_recorded.
        self._dedup.clear()
        self.stats.end_forward()  # one left open (a forward that raised)
        self.stats.forwards += 1
        if self.mode.hooks:
            if compiled.compiled_autograd_enabled():
                raise RuntimeError(
                    "alam_dist: compiled autograd is on (torch._dynamo.config."
                    "compiled_autograd or torch._dynamo.compiled_autograd.enable): it runs "
                    "saved-tensor hooks outside the compiled graphs, so ALAM would compress "
                    "nothing there. Turn compiled autograd off (torch.compile of the model "
                    "is supported), or leave ALAM off.")
            compiled_model = self._compiled_model()
            # graph-module hooks only where compiled graphs may inline them (a compiled
            # module, or dynamo at work in this process: a compiled function that calls the
            # model); in eager code they cost a GraphModule call and a dynamo-disabled frame
            # per pack and unpack
            graph_hooks = self.hooks is not None and (compiled_model or compiled.dynamo_used())
            self._hooks_ctx = (self.hooks.context() if graph_hooks else
                               torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack))
            self._hooks_ctx.__enter__()
            if self._routes_attention() and not compiled_model:
                self._route_attention()

    def _route_attention(self) -> None:
        """Attention calls of this forward go to alam_dist.attention.consistent_sdpa (or
        torch's kernel, hooks.stock_attention): by the routed F.scaled_dot_product_attention,
        free per torch call; plus a watch mode that catches calls not made through F in
        the first forward of each top-level module and in probe forwards; once one was
        found (or another library's function holds F's place), the mode for good."""
        stack = contextlib.ExitStack()
        through_f = stack.enter_context(sdpa_routing.routing(
            stock=self._stock_attention if self.stock_kernel else None))
        top = id(self.keys.top)
        if not through_f or self._attention_bypass:
            stack.enter_context(sdpa_routing.ConsistentAttentionMode())
        elif top not in self._watched or self.mode is not self.training:
            self._bypass_watch = (top, stack.enter_context(sdpa_routing.BypassWatch()))
        self._attention_ctx = stack

    def _stock_attention(self, query, key, value, attn_mask, dropout_p, kwargs):
        return stock_attention.stock_saves(self, query, key, value, attn_mask, dropout_p, kwargs)

    def owns_top_hooks(self, top_pack) -> bool:
        """Whether ``top_pack``, the innermost saved-tensor pack hook, is this policy's
        (eager, or its graph-module hooks): otherwise a checkpoint's or the user's hooks
        save what runs now."""
        return top_pack == self.pack or (self.hooks is not None and top_pack is self.hooks.pack)

    def _compiled_model(self) -> bool:
        """Whether this forward may run compiled code. Dynamo cannot trace the attention
        router (a TorchFunctionMode) under dynamic shapes, so compiled models keep
        torch's attention, whose saved tensors the compiled graph keys like any other."""
        return (self.compiled_forward_seen or compiled.in_optimized_module()
                or bool(compiled.compiled_modules(self.model)))

    def _routes_attention(self) -> bool:
        return self.attention in ROUTED_PATHS and self.mode.routes_attention

    def _exit_context(self) -> None:
        self.stats.end_forward()
        if self._attention_ctx is not None:
            ctx, self._attention_ctx = self._attention_ctx, None
            ctx.__exit__(None, None, None)
            if self._bypass_watch is not None:
                top, watch = self._bypass_watch
                self._watched.add(top)
                self._attention_bypass |= watch.bypassed
                self._bypass_watch = None
        if self._hooks_ctx is not None:
            ctx, self._hooks_ctx = self._hooks_ctx, None
            ctx.__exit__(None, None, None)

    def is_weight(self, t: torch.Tensor) -> bool:
        return is_weight(t, self.activation_leaves, self.weight_detectors)

    # -- the hooks ------------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        # Runs for every tensor autograd saves in a forward: kept lean (host time per
        # tensor is what a GPU step pays on top of the kernels; benchmarks/hook_overhead.py).
        keys = self.keys
        if not keys.in_forward:
            return t
        return self.pack_as(keys.next_key(), t)

    def pack_as(self, key: str, t: torch.Tensor):
        """What the pack hook does with ``t`` saved under ``key`` (also for callers that
        key their own saves: alam_dist.hooks.stock_attention)."""
        stats = self.stats
        dtype = t.dtype
        is_mask = dtype == torch.bool
        if not is_mask:
            if is_weight(t, self.activation_leaves, self.weight_detectors):
                stats.skipped_weights += 1
                return t
            kept, total = self.size_share
            if dtype not in FLOATS or t.numel() * total < self.min_numel * kept:
                # Kept as is, but still activation memory: counted on both sides of the ratio.
                stats.skipped_other += 1
                self._count_kept(t.numel() * t.element_size())
                if dtype in FLOATS:  # a plan remembers it: larger batches may cross min_numel
                    self.seen_small.add(key)
                return _as_is(t)
        # Ops often save a fresh *view* of a shared input (F.linear reshapes 3-D inputs), so
        # identity is checked on the view's base, which stays alive while its users run;
        # a dead base can never match, so a reused address cannot alias another tensor.
        base = t._base
        if base is None:
            base = t
        dedup_key = (storage_ptr(t), t.storage_offset(), t.shape, t.stride(), dtype, t._version)
        hit = self._dedup.get(dedup_key)
        if hit is not None and hit[0]() is base:
            shared = hit[1]() if hit[1] is not None else None
            if hit[1] is None or shared is not None:
                stats.deduplicated += 1
                return shared if shared is not None else _as_is(t)
        saved = self._pack_new(key, t, is_mask)
        # Weak references only: the graph owns what it saved, and the table must not keep a
        # step's packed tensors (or exact copies) alive past its backward -- through the
        # optimizer step, where peak memory often is. A tensor handed back as is is noted
        # without a reference (None).
        self._dedup[dedup_key] = (weakref.ref(base),
                                  weakref.ref(saved) if type(saved) is Saved else None)
        return saved

    def _pack_new(self, key: str, t: torch.Tensor, is_mask: bool) -> Saved | torch.Tensor:
        numel, size = t.numel(), t.element_size()
        raw = numel * size
        stats = self.stats
        stats.tensors += 1
        stats.raw_bytes += raw
        if not is_mask:
            info = self.seen.get(key)
            if info is None or info.numel != numel or info.raw_bits != size * 8:
                # once per key, not per step: the inventory only changes with shapes
                module_type = self.keys.module_type()
                self.seen[key] = TensorInfo(numel, size * 8, str(t.dtype), module_type,
                                            type(t.grad_fn).__name__ if t.grad_fn is not None else "",
                                            role(key, module_type, self.seen))
        return self.mode.keep(self, key, t, is_mask, raw)

    # -- what modes call ------------------------------------------------------------------
    def encode(self, key: str, t: torch.Tensor, bits: float, seed: int, raw: int) -> Saved:
        """``t`` compressed at ``bits`` (training, and probe forwards' other keys)."""
        if bits < 16:  # quantized: the codec's encoder for (bits, device), resolved once
            encoder = self._encoders.get((bits, t.device))
            if encoder is None:
                encoder = self._encoders[(bits, t.device)] = codec.Encoder(
                    bits, self.formats, self.backend, t.device)
            packed = encoder(t, seed)
        else:
            packed = codec.encode(t.detach(), bits, seed=seed, backend=self.backend,
                                  formats=self.formats)
            if packed.format == "raw":
                self.stats.exact_bytes += raw
        self._count_packed(key, packed)
        return Saved(key, packed)

    def _count_packed(self, key: str, packed: PackedTensor) -> None:
        """An encoded tensor's bytes, and its metadata for the forward's NaN/inf count
        (NaN/inf groups store NaN metadata, docs/codec.md; StepStats.end_forward)."""
        if packed.meta is not None:
            self.stats.forward_meta.append(packed.meta)
        nbytes = packed.nbytes
        self.stats.packed_bytes += nbytes
        per_key = self.stats.per_key_bytes
        per_key[key] = per_key.get(key, 0) + nbytes

    def record(self, key: str, t: torch.Tensor) -> Saved:
        """An exact copy of ``t`` for probe passes (held by key until released).
        Detached: an op that saves its own output (rsqrt, sigmoid, softmax) would
        otherwise close a cycle through C++ (node -> saved -> tensor -> node) that
        Python's collector cannot see, and the round's tensors would never be freed."""
        exact = t.detach()
        self._recorded[key] = exact
        return Saved(key, exact=exact)

    def recorded_exact(self) -> dict[str, torch.Tensor]:
        """Key -> exact tensor of the last record-mode forward (for probe statistics).
        Kept by key, not through the dedup table, where a later tensor with the same
        storage signature replaces an earlier entry."""
        return dict(self._recorded)

    def release_recorded(self, which: Callable[[str], bool] | None = None) -> None:
        """Drop the record forward's exact tensors (they would pin a step's activations);
        ``which``: only those keys."""
        if which is not None:
            for key in [k for k in self._recorded if which(k)]:
                del self._recorded[key]
            return
        self._recorded.clear()
        self._dedup.clear()

    def round_trip(self, t: torch.Tensor, bits: float, seed: int) -> torch.Tensor:
        """``t`` as training would see it after compression at ``bits``."""
        return codec.decode(codec.encode(t.detach(), bits, seed=seed, backend=self.backend,
                                         formats=self.formats), backend=self.backend)

    def unpack(self, saved):
        if not isinstance(saved, Saved):
            return saved
        if saved.exact is not None:
            target = self._target
            if target is not None and target[0] == saved.key:
                return self.round_trip(saved.exact, target[1], target[2])
            return saved.exact
        packed = saved.packed
        impl = self._backends.get(packed.device)
        if impl is None:
            impl = self._backends[packed.device] = backends.resolve(self.backend, packed.device)
        return codec.decode(packed, impl=impl)  # encoded here: trusted, not validated again


ROUTED_PATHS = ("recompute", "recompute_all")  # the alam.attention values that route calls


def _as_is(t: torch.Tensor) -> torch.Tensor:
    """A saved tensor kept exact, without its graph. Handing autograd the tensor itself
    closes a cycle for ops that save their own output (rsqrt, sigmoid, softmax): node ->
    saved tensor -> its grad_fn -> node, through C++, where Python's collector cannot see
    it. Backward breaks it, but a graph dropped without one (probe rounds, a forward under
    evaluation) would never be freed."""
    return t.detach()
