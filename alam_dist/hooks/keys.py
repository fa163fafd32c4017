"""Where a tensor is saved: the stable key of every saved tensor.

Installed on a model, :class:`ModuleKeys` hooks every module's forward. The key of a saved
tensor is ``"<module qualified name>/<call>.<ordinal>"`` -- the module running when
autograd saves it, how many times that module already ran in this forward, and the
position of the save inside that call. This does not depend on the order of saves across
a step, so it is the same under gradient accumulation, with activation checkpointing
(tensors inside a checkpointed region are never packed by us: the checkpoint's own hooks
are innermost there), and on every rank.
"""
from __future__ import annotations

from typing import Callable

import torch


class ModuleKeys:
    """Module hooks that track the module stack of the running forward.

    The owner is told when a top-level forward begins and ends, when a forward runs
    inside backward (a checkpoint recompute: its saves are not ours, but it must route
    attention as the original forward did), and when dynamo traces a forward."""

    def __init__(self, model: torch.nn.Module, *, on_forward_begin: Callable[[], None],
                 on_forward_end: Callable[[], None], on_recompute: Callable[[bool], None],
                 on_compiling: Callable[[], None]):
        self.model = model
        self._on_begin, self._on_end = on_forward_begin, on_forward_end
        self._on_recompute, self._on_compiling = on_recompute, on_compiling
        self._handles: list = []
        self._names: dict[int, str] = {}
        self._types: dict[str, str] = {}
        self._stack: list[list] = []  # frames: [name, call index, next ordinal]
        self._calls: dict[str, int] = {}
        self._recompute_depth = 0  # nesting of module calls inside a checkpoint recompute
        self.top: torch.nn.Module | None = None
        """The module whose call began the running forward (a step may call several)."""

    def install(self) -> None:
        if self._handles:
            return
        for name, module in self.model.named_modules():
            self._names[id(module)] = name
            self._types[name] = type(module).__name__
            if module is self.model:
                # The root's hooks always run eagerly, also when the whole model is
                # compiled (a graph break before and after its forward): they begin and
                # end the step's saved-tensor hooks, which compiled graphs then inline.
                pre, post = _eager(self._pre_hook), _eager(self._post_hook)
            else:
                pre, post = self._pre_hook, self._post_hook
            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post, always_call=True))

    def uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    @property
    def in_forward(self) -> bool:
        """Whether one of the model's forwards (not a recompute) is running."""
        return bool(self._stack)

    def next_key(self) -> str:
        """The key of the next tensor saved in the running module call."""
        frame = self._stack[-1]
        key = f"{frame[0] or '<root>'}/{frame[1]}.{frame[2]}"
        frame[2] += 1
        return key

    def peek(self, count: int) -> list[str]:
        """The keys of the next ``count`` saves in the running module call (not taken)."""
        name, call, ordinal = self._stack[-1]
        return [f"{name or '<root>'}/{call}.{ordinal + i}" for i in range(count)]

    def skip(self, count: int) -> None:
        """Take the next ``count`` ordinals of the running call without saves: a call that
        saved its tensors under keys of its own (alam_dist.hooks.stock_attention) leaves
        the ordinals after it as the call it stands in for would."""
        self._stack[-1][2] += count

    def module_type(self) -> str:
        """The class name of the running module."""
        return self._types.get(self._stack[-1][0], "")

    def _pre_hook(self, module, args):
        if torch.compiler.is_compiling():
            # dynamo is tracing this forward: its saves are keyed by the graph
            # (alam_dist.hooks.compiled), not by this stack
            self._on_compiling()
            return
        if not self._stack:
            if torch._C._current_graph_task_id() != -1:
                # A forward run by backward (checkpoint recompute)
                if self._recompute_depth == 0:
                    self._on_recompute(True)
                self._recompute_depth += 1
                return
            self._calls.clear()
            self.top = module
            self._on_begin()
        name = self._names.get(id(module), "?")
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        self._stack.append([name, call, 0])

    def _post_hook(self, module, args, output):
        if torch.compiler.is_compiling():
            return
        if not self._stack:
            if self._recompute_depth > 0:
                self._recompute_depth -= 1
                if self._recompute_depth == 0:
                    self._on_recompute(False)
            return
        self._stack.pop()
        if not self._stack:
            self._on_end()


def _eager(hook: Callable) -> Callable:
    """``hook`` run outside dynamo's tracing (where torch has dynamo)."""
    disable = getattr(getattr(torch, "_dynamo", None), "disable", None)
    if disable is None:
        return hook
    return disable(hook)
