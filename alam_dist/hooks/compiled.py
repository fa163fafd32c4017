"""ALAM inside torch.compile graphs.

AOTAutograd (torch >= 2.8, PR 150032) inlines saved-tensor hooks into a compiled forward's
epilogue and its backward's prologue when both hooks are ``torch.fx.GraphModule``\\ s. So
the policy's hooks are GraphModules (:class:`CompiledHooks`) that call one module-level
function each:

* in eager code (no graph being compiled) they are the policy's ordinary ``pack`` and
  ``unpack``, keys from the module stack (alam_dist.hooks.keys);
* while AOTAutograd compiles a graph, ``pack`` is traced once per saved value of the
  graph, with the fx node at hand: it decides there, at trace time, whether the value is
  compressed and at which bits (the controller maps its plan onto the node: module path
  and op, :func:`node_key`), and records an opaque ``alam_dist::encode`` op into the
  graph; ``unpack`` records the matching ``alam_dist::decode``.

Bits are compile-time constants: a new plan means new hook modules, and dynamo, which
guards on their identity, recompiles once. Seeds are not: the encode op draws one when it
runs (step, rank, forward, value: :class:`Site`) and hands it to the decode op in a host
scalar, so stochastic rounding and rotations change every step. Blocks compiled one by
one share a graph, and so share their values' seeds within a forward.

Values left exact in a graph (``skip_reason``): tensors no gradient flows through (an
in-graph additive mask holding -inf: quantized, it turns gradients into NaN), views of
graph inputs (weights), the graph's own outputs, non-float tensors other than bool masks,
tensors under ``min_numel``. Limits of the torch API and their workarounds are in
docs/compile.md.
"""
from __future__ import annotations

import itertools
import uuid
import math
import re
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.utils._python_dispatch

from alam_dist import codec
from alam_dist.codec.formats import REGISTRY, family, format_for, stored_bits
from alam_dist.hooks.classify import FLOATS

if TYPE_CHECKING:
    from alam_dist.hooks.policy import SavedTensorPolicy


def unsupported_reason() -> str | None:
    """Why this torch cannot inline saved-tensor hooks into compiled graphs (None: it can)."""
    try:
        from torch._functorch._aot_autograd import graph_compile, utils
    except ImportError as err:  # pragma: no cover - very old torch
        return f"torch {torch.__version__} has no AOTAutograd graph_compile module ({err})"
    needed = [(graph_compile, "_get_saved_tensor_hook_context"),
              (graph_compile, "maybe_inline_graph_saved_tensors_hooks"),
              (utils, "saved_tensors_hooks_are_inlineable")]
    missing = [name for mod, name in needed if not hasattr(mod, name)]
    if missing:
        return (f"torch {torch.__version__} cannot inline saved-tensor hooks into compiled "
                f"graphs (no {', '.join(missing)}; it came with torch 2.8)")
    return None


def _trace_context() -> dict | None:
    """The fx context of the saved value AOTAutograd is tracing the pack hook for (None in
    eager code)."""
    global _trace_context
    from torch._functorch._aot_autograd.graph_compile import _get_saved_tensor_hook_context
    _trace_context = _get_saved_tensor_hook_context  # looked up once
    return _get_saved_tensor_hook_context()


# -- the opaque ops ------------------------------------------------------------------------

@dataclass
class Site:
    """One compressed value of a compiled graph: what its ops need when they run."""

    policy: "weakref.ReferenceType[SavedTensorPolicy]"
    key: str
    format: str
    bits: float

    def seed(self) -> int:
        policy = self.policy()
        return 0 if policy is None else policy.compiled_seed(self.key)


_SITES: list[Site] = []
_SITE_INDEX: dict[tuple, int] = {}


def _site(policy: "SavedTensorPolicy", generation: int, key: str, fmt: str, bits: float) -> int:
    """The slot of a site (the pack hook is traced more than once per value: same slot)."""
    ident = (id(policy), generation, key, fmt)
    slot = _SITE_INDEX.get(ident)
    if slot is None or _SITES[slot].policy() is not policy:
        slot = len(_SITES)
        _SITES.append(Site(weakref.ref(policy), key, fmt, bits))
        _SITE_INDEX[ident] = slot
    return slot


_SEED_MASK = (1 << 63) - 1  # an int64 holds it


@torch.library.custom_op("alam_dist::encode", mutates_args=())
def encode_op(x: torch.Tensor, fmt: str, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(payload, meta, seed): the seed is drawn here, when the graph runs (per step, rank,
    forward and value), and handed to decode in a host scalar, so decoding neither
    recomputes it (the step may have ended) nor waits for the device to read it."""
    site = _SITES[slot]
    policy = site.policy()
    backend = policy.backend if policy is not None else "auto"
    family_name = "rotated" if REGISTRY[fmt].rotated else "minmax"
    seed = site.seed() & _SEED_MASK
    packed = codec.encode(x, site.bits, seed=seed, backend=backend, formats=family_name)
    if policy is not None:
        policy.count_compiled(site.key, x, packed)
    return packed.data, packed.meta, torch.tensor(seed, dtype=torch.int64)


@encode_op.register_fake
def _(x, fmt, slot):
    f = REGISTRY[fmt]
    n = x.numel()
    return (x.new_empty((f.payload_bytes(n),), dtype=torch.uint8),
            x.new_empty((f.num_groups(n), 2), dtype=f.meta_dtype),
            torch.empty((), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("alam_dist::decode", mutates_args=())
def decode_op(payload: torch.Tensor, meta: torch.Tensor, seed: torch.Tensor, shape: list[int],
              fmt: str, dtype: torch.dtype, slot: int) -> torch.Tensor:
    policy = _SITES[slot].policy()
    packed = codec.PackedTensor(fmt, torch.Size(shape), dtype, payload.device, payload, meta,
                                seed=int(seed) if REGISTRY[fmt].rotated else 0)  # host scalar
    return codec.decode(packed, backend=policy.backend if policy is not None else "auto")


@decode_op.register_fake
def _(payload, meta, seed, shape, fmt, dtype, slot):
    return payload.new_empty(shape, dtype=dtype)


@torch.library.custom_op("alam_dist::count_exact", mutates_args=())
def count_exact_op(x: torch.Tensor, slot: int) -> torch.Tensor:
    """A value the graph keeps as it is: counted in the step's statistics as eager saves
    are (its bytes on both sides of the ratio). Returns an empty tensor (an op's output
    may not alias its input), saved beside the value at no cost."""
    site = _SITES[slot]
    policy = site.policy()
    if policy is not None:
        policy.count_compiled_exact(site.key, x)
    return x.new_empty(0)


@count_exact_op.register_fake
def _(x, slot):
    return x.new_empty(0)


# -- what a compiled graph keeps exact -------------------------------------------------------

_VIEW_OPS = {"t", "view", "_unsafe_view", "permute", "transpose", "expand", "reshape",
             "detach", "alias", "slice", "select", "unsqueeze", "squeeze", "as_strided",
             "_to_copy", "clone"}


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _gradient_reaches(fw: torch.fx.Graph, bw: torch.fx.Graph) -> dict:
    """node -> whether it depends on a forward input that gets a gradient. The backward
    graph returns one gradient (or None) per forward placeholder, in order."""
    grads = bw.output_node().args[0]
    reaches = {}
    for i, ph in enumerate(fw.find_nodes(op="placeholder")):
        reaches[ph] = i < len(grads) and grads[i] is not None
    for n in fw.nodes:
        if n.op != "placeholder":
            reaches[n] = any(reaches.get(a, False) for a in n.all_input_nodes)
    return reaches


_GRAPH_MEMO: dict = {}


def _graph_facts(fw: torch.fx.Graph, bw: torch.fx.Graph) -> tuple[dict, dict]:
    """(gradient reach, node -> key) of one forward graph, computed once per graph pair."""
    memo_key = (id(fw), id(bw))
    facts = _GRAPH_MEMO.get(memo_key)
    if facts is None:
        keys, counts = {}, {}
        for n in fw.nodes:
            if n.op == "output":
                continue
            base = f"{module_path(n)}|{_op_name(n)}"
            k = counts.get(base, 0)
            counts[base] = k + 1
            keys[n] = f"{base}#{k}"
        facts = (_gradient_reaches(fw, bw), keys)
        _GRAPH_MEMO.clear()  # only the graph being compiled is ever asked about
        _GRAPH_MEMO[memo_key] = facts
    return facts


def skip_reason(node: torch.fx.Node, ctx: dict) -> str | None:
    """Why a saved value of a compiled graph stays exact (None: compress it)."""
    reaches, _ = _graph_facts(ctx["_fw_graph"], ctx["_bw_graph"])
    if not reaches.get(node, True):
        return "no gradient flows through it (a mask or table)"
    if (_op_name(node) == "getitem" and node.args and isinstance(node.args[0], torch.fx.Node)
            and _is_attention(node.args[0]) and node.args[1] != 0):
        return "the attention kernel's logsumexp (its backward needs it exact)"
    root = node
    while (root.op == "call_function" and root.args and isinstance(root.args[0], torch.fx.Node)
           and _op_name(root) in _VIEW_OPS):
        root = root.args[0]
    if root is not node and root.op == "placeholder":
        return "a view of a graph input (a weight)"
    outputs = node.graph.output_node().args[0]
    if sum(1 for o in outputs if o is node) > 1 or (root is not node and any(o is root for o in outputs)):
        return "also an output of the graph"
    return None


def module_path(node: torch.fx.Node) -> str:
    """Innermost module of a node, relative to the compiled module: dynamo writes
    ``L['self'].model.layers[0].mlp``, ``L['args'][0].model...`` (the whole model called
    through torch.compile's wrapper) or ``getattr(...)`` forms."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    raw = list(stack.values())[-1][0]
    raw = re.sub(r"getattr\((.*?), '([^']+)'\)", r"\1.\2", raw)
    raw = re.sub(r"^L\['[^']+'\](\[\d+\])?\.?", "", raw)  # L['self'], L['args'][0]
    raw = re.sub(r"\['([^']+)'\]", r".\1", raw)
    raw = re.sub(r"\[(\d+)\]", r".\1", raw)
    return raw.replace("._orig_mod", "").strip(".")


ATTENTION_QK_BITS = 8
"""Floor for q and k of torch's attention kernels inside compiled graphs. Their backward
rebuilds the probabilities as exp(q kᵀ - lse) from the saved q, k against the exact lse:
below 8 bits the probabilities stop summing to one (issue 14). Eager models avoid it by
recomputing attention from the decoded q, k, v (alam_dist.attention), which dynamo cannot
trace under dynamic shapes."""


def _is_attention(node: torch.fx.Node) -> bool:
    name = _op_name(node)
    return name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention"


def feeds_attention_scores(node: torch.fx.Node) -> bool:
    """Whether a value is the query or key of a scaled-dot-product attention kernel."""
    return any(_is_attention(user) and node in user.args[:2] for user in node.users)


def producer_op(node: torch.fx.Node) -> str:
    """The op that produced a saved value, normalised to compare with eager autograd's
    node names (``_unsafe_view`` ~ ``UnsafeViewBackward0``)."""
    return normalise_op(_op_name(node))


def normalise_op(name: str) -> str:
    name = re.sub(r"Backward\d*$", "", name)
    return name.replace("_", "").lower()


def consumer_path(node: torch.fx.Node) -> str:
    """The module a saved value is saved *for*: that of its first forward user inside a
    module (eager plans key a tensor by the module whose op saves it -- the norm for a
    block input, ``down_proj`` for the MLP's product), else its own."""
    for user in node.users:
        if user.op != "output" and user.meta.get("nn_module_stack"):
            return module_path(user)
    return module_path(node)


def node_key(node: torch.fx.Node, ctx: dict) -> str:
    """``"<module path>|<aten op>#<k>"``, k counting earlier nodes of the same path and op:
    stable between static and dynamic-shape compiles (fx node names are not)."""
    return _graph_facts(ctx["_fw_graph"], ctx["_bw_graph"])[1][node]


def _hint(n: Any) -> int:
    if isinstance(n, torch.SymInt):
        return int(n.node.hint) if n.node.hint is not None else 1 << 62
    return int(n)


def _split_shape(shape) -> tuple[tuple, tuple]:
    """(distinct SymInts, spec): torch 2.13's inliner breaks on a SymInt returned twice by
    the pack hook (a (B, 1, S, S) mask), so each symbol is returned once and ``spec[i]``
    says where dimension i comes from: ("c", int) or ("s", index)."""
    syms, spec = [], []
    for d in shape:
        if isinstance(d, torch.SymInt):
            for j, u in enumerate(syms):
                if u.node.expr == d.node.expr:
                    spec.append(("s", j))
                    break
            else:
                spec.append(("s", len(syms)))
                syms.append(d)
        else:
            spec.append(("c", int(d)))
    return tuple(syms), tuple(spec)


def _join_shape(syms, spec) -> list:
    return [syms[v] if k == "s" else v for k, v in spec]


def _pack_mask(x: torch.Tensor) -> torch.Tensor:
    flat = torch.nn.functional.pad(x.reshape(-1).to(torch.uint8), (0, (-x.numel()) % 8))
    q = flat.view(-1, 8)
    acc = q[:, 0]
    for k in range(1, 8):
        acc = acc | (q[:, k] << k)
    return acc


def _unpack_mask(p: torch.Tensor, shape) -> torch.Tensor:
    bits = torch.stack([(p >> k) & 1 for k in range(8)], dim=1).reshape(-1)
    return bits[: math.prod(shape)].view(shape).to(torch.bool)


# -- the plan, mapped onto compiled graphs -----------------------------------------------------

class PlanMapping:
    """A plan's bits for the saved values of compiled graphs.

    Compiled graphs save other tensors than eager autograd (the partitioner chooses), and
    blocks compiled one by one share one graph, so a value is mapped by module and op: the
    plan's keys of the module that uses it (``path``, relative to the compiled module, so
    matched as a suffix: inside every compiled copy of a block; else its nearest enclosing
    module with keys; a value outside any submodule belongs to the compiled ``roots``),
    those produced by the same op (``plan.ops``, recorded by the probe round), their
    element-weighted mean of stored bits, rounded to the nearest rung of the ladder."""

    def __init__(self, plan, ladder: tuple[float, ...], roots: list[str]):
        self.plan = plan
        self.ladder = sorted(ladder)
        self.roots = roots
        self.by_module: dict[str, list[tuple[str, int, float]]] = {}
        for key, bits in plan.bits.items():
            name = key.rsplit("/", 1)[0].replace("._orig_mod", "")
            name = "" if name == "<root>" else name
            self.by_module.setdefault(name, []).append(
                (normalise_op(plan.ops.get(key, "")), plan.numel.get(key, 1),
                 stored_bits(bits, plan.raw_bits.get(key, 32), plan.formats)))

    def _entries(self, path: str) -> list:
        if not path:
            return [e for r in self.roots for e in self.by_module.get(r, [])]
        return [e for name, entries in self.by_module.items()
                if name == path or name.endswith("." + path) for e in entries]

    def bits(self, path: str, op: str, default: float) -> float:
        while True:
            found = self._entries(path)
            if found or not path:
                break
            path = path.rpartition(".")[0]
        if not found:
            return default
        found = [e for e in found if e[0] == op] or found
        mean = sum(n * b for _, n, b in found) / sum(n for _, n, _ in found)
        return min(self.ladder, key=lambda b: (abs(stored_bits(b, 32, self.plan.formats) - mean), b))


# -- the hooks -------------------------------------------------------------------------------

_POLICIES: dict[int, tuple["weakref.ReferenceType[SavedTensorPolicy]", int]] = {}
_hook_ids = itertools.count(1)


COUNTED_EXACT = ("under min_numel", "exact in the plan",
                 "the attention kernel's logsumexp (its backward needs it exact)")
"""Why-exact reasons of activations: counted per step like eager saves kept exact (weights,
masks and tables are not activation memory and are not counted, as in eager)."""


def _trace_pack(policy: "SavedTensorPolicy", generation: int, x: torch.Tensor, ctx: dict):
    node = ctx["_node"]
    key = node_key(node, ctx)
    reason = None
    if torch.utils._python_dispatch.is_traceable_wrapper_subclass(x):
        reason = f"a tensor subclass ({type(x).__name__})"
    reason = reason or skip_reason(node, ctx)
    if reason is None and x.dtype == torch.bool:
        policy.note_compiled(key, x, "mask", 1)
        return ("mask", _pack_mask(x)) + _split_shape(x.shape)
    bits = 32.0
    if reason is None:
        if x.dtype not in FLOATS:
            reason = f"dtype {x.dtype}"
        elif _hint(x.numel()) < policy.min_numel:
            reason = "under min_numel"
        else:
            bits = policy.compiled_bits(consumer_path(node), key, producer_op(node))
            if bits < ATTENTION_QK_BITS and feeds_attention_scores(node):
                bits = ATTENTION_QK_BITS
            raw_bits = x.element_size() * 8
            if bits >= raw_bits or bits == 32:
                reason = "exact in the plan"
    if reason is not None:
        policy.note_compiled(key, x, reason, 32)
        if reason in COUNTED_EXACT or reason.startswith("dtype"):
            slot = _site(policy, generation, key, "exact", 32)
            return ("exact", x, torch.ops.alam_dist.count_exact(x, slot))
        return x
    if bits == 16:
        policy.note_compiled(key, x, "", 16)
        return ("bf16", x.to(torch.bfloat16), x.dtype)
    fmt = format_for(bits, family(policy.formats))
    slot = _site(policy, generation, key, fmt.name, bits)
    policy.note_compiled(key, x, "", bits)
    payload, meta, seed = torch.ops.alam_dist.encode(x, fmt.name, slot)
    return ("q", payload, meta, seed) + _split_shape(x.shape) + (fmt.name, x.dtype, slot)


@torch.fx.wrap
def alam_pack(x, hooks_id):
    policy_ref, generation = _POLICIES[hooks_id]
    policy = policy_ref()
    if policy is None:
        return x
    ctx = _trace_context()
    if ctx is None:  # eager code
        return policy.pack(x)
    return _trace_pack(policy, generation, x, ctx)


@torch.fx.wrap
def alam_unpack(packed, hooks_id):
    if isinstance(packed, tuple):
        tag = packed[0]
        if tag == "mask":
            return _unpack_mask(packed[1], _join_shape(packed[2], packed[3]))
        if tag == "bf16":
            return packed[1].to(packed[2])
        if tag == "exact":
            return packed[1]
        _, payload, meta, seed, syms, spec, fmt, dtype, slot = packed
        return torch.ops.alam_dist.decode(payload, meta, seed, _join_shape(syms, spec), fmt,
                                          dtype, slot)
    policy = _POLICIES[hooks_id][0]()
    return packed if policy is None else policy.unpack(packed)


class CompiledHooks:
    """The (pack, unpack) GraphModules of one policy and plan generation. Dynamo guards on
    their identity: a new instance (a new plan) recompiles each compiled region once."""

    def __init__(self, policy: "SavedTensorPolicy", generation: int):
        hooks_id = next(_hook_ids)
        _POLICIES[hooks_id] = (weakref.ref(policy), generation)

        # closures of this module: torch.fx.wrap patches this module's globals while
        # tracing, so each becomes one call_function node with a constant hooks id
        def pack(x):
            return alam_pack(x, hooks_id)

        def unpack(p):
            return alam_unpack(p, hooks_id)

        self.pack = torch.fx.symbolic_trace(pack)
        self.unpack = torch.fx.symbolic_trace(unpack)
        disable = getattr(torch._dynamo, "disable", None)
        if disable is not None:
            # Called by autograd in eager code that runs inside a compiled call (between
            # graph breaks), a hook would itself be compiled by dynamo, once per stride
            # pattern: never trace them (AOTAutograd inlines them by calling them)
            for gm in (self.pack, self.unpack):
                gm.forward = disable(gm.forward)
        # AOTAutogradCache keys a graph on this: the plan generation must be part of it
        cache_hash = f"alam_dist:{uuid.uuid4().hex}"  # never a hit across plans or runs
        for gm in (self.pack, self.unpack):
            for n in gm.graph.nodes:
                if n.meta.get("is_wrapped", False):
                    n.meta["user_cache_hash"] = cache_hash

    def context(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def offer_block_inputs() -> None:
    """Let compiled blocks compress their inputs too (the hidden state each block saves
    for its norm): AOTAutograd's default offers only the graph's own intermediates.
    Parameters and buffers (static inputs) stay excluded."""
    cfg = torch._functorch.config
    if getattr(cfg, "saved_tensors_hooks_filtering_mode", None) == "donated":
        cfg.saved_tensors_hooks_filtering_mode = "no_static"


def compiled_modules(model: torch.nn.Module) -> list[str]:
    """Names of torch.compile'd modules in ``model``: the model itself when it is the
    wrapper torch.compile returns, and every module compiled in place (module.compile())."""
    names = []
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        names.append("<the model>")
    for name, module in model.named_modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            names.append(name or "<the model>")
    return names


def in_optimized_module() -> bool:
    """Whether a ``torch.compile(module)`` wrapper is running (its hooks run eagerly)."""
    eval_frame = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    return bool(getattr(eval_frame, "_in_optimized_module", False))


def dynamo_used() -> bool:
    """Whether dynamo has begun compiling any frame in this process (then a forward may be
    running inside a compiled function, where only graph-module hooks are inlined)."""
    utils = getattr(getattr(torch, "_dynamo", None), "utils", None)
    counters = getattr(utils, "counters", None)
    return bool(counters is not None and counters["frames"]["total"])


def compiled_autograd_enabled() -> bool:
    ca = getattr(torch._dynamo, "compiled_autograd", None)
    return bool(ca is not None and (getattr(ca, "compiled_autograd_enabled", False)
                                    or getattr(ca, "in_compiled_autograd_region", False)))


def _same_value(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Whether two graph values look alike (shape and dtype of their example values): the
    rename pairs RNG states only, in order, and refuses anything else."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
            and va.dtype == vb.dtype and tuple(va.shape) == tuple(vb.shape))


def patch_checkpoint_rng_names() -> None:
    """torch 2.13: inside an activation-checkpointed compiled region, an RNG op (dropout;
    CPU SDPA is tagged nondeterministic) saves its RNG state as forward output
    ``getitem_N`` but the backward names its placeholder ``rng_state_output_K``, and the
    hook inliner asserts "could not find saved tensor". Rename those backward placeholders
    to the forward names (pairing the unmatched ones in order) before inlining."""
    from torch._functorch._aot_autograd import graph_compile as gc
    original = gc.maybe_inline_graph_saved_tensors_hooks
    if getattr(original, "_alam_patched", False):
        return

    def inline(fw_module, bw_module, num_inner_fwd_outputs, *args, **kwargs):
        saved = fw_module.graph.output_node().args[0][num_inner_fwd_outputs:]
        saved_names = [n.name for n in saved if isinstance(n, torch.fx.Node)]
        placeholders = [n for n in bw_module.graph.find_nodes(op="placeholder")
                        if not n.name.startswith("tangents")]
        names = {n.name for n in placeholders}
        missing = [s for s in saved_names if s not in names]
        extra = [n for n in placeholders if n.name not in set(saved_names)]
        by_name = {n.name: n for n in saved if isinstance(n, torch.fx.Node)}
        if missing and len(missing) == len(extra) and all(
                _same_value(by_name[name], ph) for name, ph in zip(missing, extra)):
            namespace = bw_module.graph._graph_namespace
            for name, ph in zip(missing, extra):
                for other in bw_module.graph.nodes:
                    if other.name == name:
                        other._rename(name + "_bw")
                ph.name = name
                namespace._rename_object(ph, name)
            bw_module.recompile()
        try:
            return original(fw_module, bw_module, num_inner_fwd_outputs, *args, **kwargs)
        finally:
            _GRAPH_MEMO.clear()  # the graph's facts are needed only while it is inlined

    inline._alam_patched = True
    gc.maybe_inline_graph_saved_tensors_hooks = inline
