"""Saved-tensor policy: which saved tensors are compressed, under which stable key.

Installed on a model, it hooks every module's forward to know *where* a tensor is saved:
the key of a saved tensor is ``"<module qualified name>/<call>.<ordinal>"`` -- the module
running when autograd saves it, how many times that module already ran in this forward,
and the position of the save inside that call. This does not depend on the order of saves
across a step, so it is the same under gradient accumulation, with activation
checkpointing (tensors inside a checkpointed region are never packed by us: the
checkpoint's own hooks are innermost there), and on every rank.

Skipped (kept exact): weights -- parameters (leaves), their views and autocast copies
(found by walking the autograd graph to AccumulateGrad), anything an extra detector
claims --, every leaf tensor (inputs, frozen weights, and tensors built without grad such
as additive attention masks, whose finfo.min entries must stay exact), non-float tensors
other than bool masks (always bit-packed), and tensors below ``min_numel``. A tensor
saved by several ops (the input of q/k/v projections) is packed once and shared.
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from alam_dist import codec
from alam_dist.attention import ConsistentAttentionMode
from alam_dist.codec import PackedTensor

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Autograd nodes that only view or cast their single input: a weight seen through them
# is still a weight.
_VIEW_OR_CAST = frozenset({
    "ToCopyBackward0", "ViewBackward0", "TBackward0", "TransposeBackward0",
    "PermuteBackward0", "ExpandBackward0", "UnsafeViewBackward0", "AliasBackward0",
    "SliceBackward0", "SelectBackward0", "AsStridedBackward0", "ReshapeAliasBackward0",
    "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
})

WeightDetector = Callable[[torch.Tensor], bool]


@dataclass
class Saved:
    """What autograd holds instead of a compressed activation."""

    key: str
    packed: PackedTensor | None = None
    exact: torch.Tensor | None = None  # record mode (probes) keeps the exact tensor

    def __repr__(self) -> str:
        return f"Saved({self.key!r}, {self.packed or 'exact'})"


@dataclass
class TensorInfo:
    numel: int
    raw_bits: int
    dtype: str
    module_type: str = ""
    op: str = ""  # the autograd node that produced it, e.g. "LogSoftmaxBackward0"


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
    per_key_bytes: dict[str, int] = field(default_factory=dict)
    nonfinite_flags: list = field(default_factory=list)
    """One 0-d bool tensor per compressed tensor: whether a group of it held NaN/inf (its
    metadata is NaN). Kept on the tensor's device and summed only when reported, so
    training never waits for a device-to-host copy."""

    def nonfinite_tensors(self) -> int:
        """How many compressed tensors held NaN/inf: one device-to-host read."""
        if not self.nonfinite_flags:
            return 0
        return int(torch.stack(self.nonfinite_flags).sum())


def storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return -1


class SavedTensorPolicy:
    """Owns the module hooks and the pack/unpack functions. Modes:

    * ``"compress"``: encode with ``bits_for(key)`` (training);
    * ``"record"``: keep exact copies, return a compressed one for the probed key
      (``probe_target``) -- GradNormVar probes (alam_dist.sensitivity);
    * ``"measure"``: keep every tensor as autograd gave it, only count its bytes (the
      uncompressed side of a comparison, same accounting as compression);
    * ``"off"``: plain autograd.
    """

    def __init__(self, model: torch.nn.Module, *, min_numel: int = 1024, backend: str = "auto",
                 formats: str = "minmax", attention: str = "stock"):
        self.model = model
        self.min_numel = min_numel
        self.formats = formats  # the codec family plan bits name
        # "recompute": route F.scaled_dot_product_attention through alam_dist.attention
        # during compressed and probe forwards
        self.attention = attention
        # (kept, total) samples of a sliced probe forward: a tensor is "small" when the
        # training-size tensor would be, i.e. numel * total < min_numel * kept
        self.size_share: tuple[int, int] = (1, 1)
        self.backend = backend
        self.mode = "compress"
        self.bits_for: Callable[[str, torch.Tensor], float] = lambda key, t: 32
        self.seed_for: Callable[[str], int] = lambda key: 0
        self.probe_target: tuple[str, float, int] | None = None
        # record mode: which keys keep an exact copy (None: all); the others are
        # compressed as in training, so a probe forward holds little more than a step
        self.record_exact: Callable[[str], bool] | None = None
        # record mode: keys kept as autograd gave them (not copied, not compressed): the
        # block-local round's first forward, whose block graphs die at once
        self.record_plain: Callable[[str], bool] | None = None
        self.weight_detectors: list[WeightDetector] = []
        # leaves that are activations, not weights: the block-local probe round cuts the
        # graph at block boundaries with leaves that stand for the hidden state
        self.activation_leaves: dict[int, torch.Tensor] = {}
        self.seen: dict[str, TensorInfo] = {}
        self.seen_small: set[str] = set()  # float tensors kept exact for being under min_numel
        self.stats = StepStats()
        self._handles: list = []
        self._names: dict[int, str] = {}
        self._types: dict[str, str] = {}
        self._stack: list[list] = []  # frames: [name, call index, next ordinal]
        self._calls: dict[str, int] = {}
        self._dedup: dict[tuple, tuple[weakref.ref, weakref.ref | None]] = {}
        self._recorded: dict[str, torch.Tensor] = {}  # record mode: key -> exact tensor
        self.compiled_forward_seen = False
        self._hooks_ctx = None
        self._attention_ctx = None
        self._recompute_depth = 0  # nesting of module calls inside a checkpoint recompute

    # -- installation -------------------------------------------------------------------
    def install(self) -> None:
        if self._handles:
            return
        for name, module in self.model.named_modules():
            self._names[id(module)] = name
            self._types[name] = type(module).__name__
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(module.register_forward_hook(self._post_hook, always_call=True))

    def uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._exit_context()
        self._stack.clear()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    # -- module tracking ----------------------------------------------------------------
    def _pre_hook(self, module, args):
        if torch.compiler.is_compiling():
            # dynamo is tracing this forward: the compiled graph will save its tensors
            # without our hooks. Recorded (dynamo replays the write) so the controller
            # can refuse the step instead of reporting a compression that did not happen.
            self.compiled_forward_seen = True
            return
        if not self._stack:
            if torch._C._current_graph_task_id() != -1:
                # A forward run by backward (checkpoint recompute): its saves are not ours,
                # but its attention calls must take the path the original forward took,
                # or the checkpoint sees different saved tensors.
                if self._routes_attention():
                    if self._recompute_depth == 0:
                        self._attention_ctx = ConsistentAttentionMode()
                        self._attention_ctx.__enter__()
                    self._recompute_depth += 1
                return
            self._begin_forward()
        name = self._names.get(id(module), "?")
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        self._stack.append([name, call, 0])

    def _post_hook(self, module, args, output):
        if not self._stack:
            if self._recompute_depth > 0:
                self._recompute_depth -= 1
                if self._recompute_depth == 0:
                    self._exit_context()
            return
        self._stack.pop()
        if not self._stack:
            self._exit_context()

    def _begin_forward(self) -> None:
        # A step may call several top-level modules (an encoder, then a head on some of
        # its outputs): each starts here, so the record round's exact copies are not
        # dropped here but by record_forward / release_recorded.
        self._calls.clear()
        self._dedup.clear()
        self.stats.forwards += 1
        if self.mode != "off":
            self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            self._hooks_ctx.__enter__()
            if self._routes_attention():
                self._attention_ctx = ConsistentAttentionMode()
                self._attention_ctx.__enter__()

    def _routes_attention(self) -> bool:
        return self.attention == "recompute" and self.mode in ("compress", "record")

    def _exit_context(self) -> None:
        if self._attention_ctx is not None:
            ctx, self._attention_ctx = self._attention_ctx, None
            ctx.__exit__(None, None, None)
        if self._hooks_ctx is not None:
            ctx, self._hooks_ctx = self._hooks_ctx, None
            ctx.__exit__(None, None, None)

    def current_key(self) -> str:
        frame = self._stack[-1]
        key = f"{frame[0] or '<root>'}/{frame[1]}.{frame[2]}"
        frame[2] += 1
        return key

    # -- classification -----------------------------------------------------------------
    def is_weight(self, t: torch.Tensor) -> bool:
        # Identity, never addresses: ZeRO-3 frees and re-gathers weight buffers, so an
        # activation can land at a freed weight's address (a storage-pointer test made
        # compression decisions, and so training, irreproducible).
        if t.is_leaf:
            if self.activation_leaves and self.activation_leaves.get(id(t)) is t:
                return False
            # Parameters, inputs, frozen weights and their autocast copies, and tensors
            # built without grad (additive attention masks holding finfo.min, rotary
            # tables): held elsewhere, or unsafe to quantize. Bool masks are packed before
            # this check.
            return True
        fn = t.grad_fn
        for _ in range(6):
            if fn is None:
                break
            if type(fn).__name__ == "AccumulateGrad":
                leaf = fn.variable if self.activation_leaves else None
                return not (leaf is not None and self.activation_leaves.get(id(leaf)) is leaf)
            if fn.name() not in _VIEW_OR_CAST:
                break
            nexts = [f for f, _ in fn.next_functions if f is not None]
            if len(nexts) != 1:
                break
            fn = nexts[0]
        return any(detect(t) for detect in self.weight_detectors)

    # -- the hooks ------------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        if not self._stack:
            return t
        key = self.current_key()
        is_mask = t.dtype == torch.bool
        if not is_mask and self.is_weight(t):
            self.stats.skipped_weights += 1
            return t
        kept, total = self.size_share
        if not is_mask and (t.dtype not in _FLOATS or t.numel() * total < self.min_numel * kept):
            # Kept as is, but still activation memory: counted on both sides of the ratio.
            nbytes = t.numel() * t.element_size()
            self.stats.skipped_other += 1
            self.stats.raw_bytes += nbytes
            self.stats.packed_bytes += nbytes
            self.stats.exact_bytes += nbytes
            if t.dtype in _FLOATS:  # a plan remembers it: larger batches may cross min_numel
                self.seen_small.add(key)
            return _as_is(t)
        # Ops often save a fresh *view* of a shared input (F.linear reshapes 3-D inputs), so
        # identity is checked on the view's base, which stays alive while its users run;
        # a dead base can never match, so a reused address cannot alias another tensor.
        base = t._base if t._base is not None else t
        dedup_key = (storage_ptr(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                     t.dtype, t._version)
        hit = self._dedup.get(dedup_key)
        if hit is not None and hit[0]() is base:
            shared = hit[1]() if hit[1] is not None else None
            if hit[1] is None or shared is not None:
                self.stats.deduplicated += 1
                return shared if shared is not None else _as_is(t)
        saved = self._pack_new(key, t, is_mask)
        # Weak references only: the graph owns what it saved, and the table must not keep a
        # step's packed tensors (or exact copies) alive past its backward -- through the
        # optimizer step, where peak memory often is. A tensor handed back as is is noted
        # without a reference (None).
        self._dedup[dedup_key] = (weakref.ref(base),
                                  weakref.ref(saved) if isinstance(saved, Saved) else None)
        return saved

    def _pack_new(self, key: str, t: torch.Tensor, is_mask: bool) -> Saved | torch.Tensor:
        raw = t.numel() * t.element_size()
        self.stats.tensors += 1
        self.stats.raw_bytes += raw
        if not is_mask:
            self.seen[key] = TensorInfo(t.numel(), t.element_size() * 8, str(t.dtype),
                                        self._types.get(self._stack[-1][0], ""),
                                        type(t.grad_fn).__name__ if t.grad_fn is not None else "")
        if self.mode == "measure":
            self.stats.packed_bytes += raw
            self.stats.exact_bytes += raw
            return _as_is(t)
        if self.mode == "record" and self.record_plain is not None and self.record_plain(key):
            self.stats.exact_bytes += raw
            return _as_is(t)
        if self.mode == "record" and (self.record_exact is None or self.record_exact(key)):
            self.stats.exact_bytes += raw
            # detached: an op that saves its own output (rsqrt, sigmoid, softmax) would
            # otherwise close a cycle through C++ (node -> saved -> tensor -> node) that
            # Python's collector cannot see, and the round's tensors would never be freed
            exact = t.detach()
            self._recorded[key] = exact
            return Saved(key, exact=exact)
        bits = 32 if is_mask else self.bits_for(key, t)
        packed = codec.encode(t.detach(), bits, seed=self.seed_for(key), backend=self.backend,
                              formats=self.formats)
        if packed.format == "raw":
            self.stats.exact_bytes += raw
        if packed.meta is not None:  # NaN/inf groups store NaN metadata (docs/codec.md)
            self.stats.nonfinite_flags.append(torch.isnan(packed.meta).any())
        self.stats.packed_bytes += packed.nbytes
        self.stats.per_key_bytes[key] = self.stats.per_key_bytes.get(key, 0) + packed.nbytes
        return Saved(key, packed=packed)

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
            target = self.probe_target
            if target is not None and target[0] == saved.key:
                return self.round_trip(saved.exact, target[1], target[2])
            return saved.exact
        return codec.decode(saved.packed, backend=self.backend)


def _as_is(t: torch.Tensor) -> torch.Tensor:
    """A saved tensor kept exact, without its graph. Handing autograd the tensor itself
    closes a cycle for ops that save their own output (rsqrt, sigmoid, softmax): node ->
    saved tensor -> its grad_fn -> node, through C++, where Python's collector cannot see
    it. Backward breaks it, but a graph dropped without one (probe rounds, a forward under
    evaluation) would never be freed."""
    return t.detach()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of parameter names and full shapes (ZeRO-3 and FSDP shards report theirs)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        shape = tuple(getattr(p, "ds_shape", None) or p.shape)
        h.update(f"{name}:{shape};".encode())
    return h.hexdigest()[:16]


def key_seed(base: int, *parts) -> int:
    """A stable 64-bit seed from a base seed and any parts (never Python's salted hash)."""
    body = "|".join(str(p) for p in (base, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "little")
