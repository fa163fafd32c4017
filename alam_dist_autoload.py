"""Config-only ALAM: an ``"alam"`` section in ds_config.json is all a user adds.

DeepSpeed ignores unknown top-level config keys, so without help an ``"alam"`` section
would silently do nothing. ``pip install`` puts ``alam_dist_autoload.pth`` into
site-packages; Python runs it at start-up, and it calls :func:`install`, which only adds
an import hook (no torch, no DeepSpeed imported here). When -- and if -- the program
imports ``deepspeed``, the hook wraps ``deepspeed.initialize``:

* the config (``config=`` dict or path, ``config_params=``, or ``args.deepspeed_config``)
  has an ``"alam"`` section: the call goes to :func:`alam_dist.deepspeed.initialize`,
  which validates the section, strips it and installs ALAM on the engine;
* otherwise: the original ``deepspeed.initialize``, called with the very same arguments.

This covers scripts that call ``deepspeed.initialize`` themselves and the Hugging Face
``Trainer`` (``TrainingArguments(deepspeed="ds_config.json")``, through accelerate).
``ALAM_DIST_AUTOLOAD=0`` in the environment turns the hook off.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import sys

ENV_SWITCH = "ALAM_DIST_AUTOLOAD"
_MARK = "_alam_dist_config_only"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def install() -> None:
    """Wrap ``deepspeed.initialize`` now if DeepSpeed is imported, else when it is."""
    if not enabled():
        return
    if "deepspeed" in sys.modules:
        patch(sys.modules["deepspeed"])
    elif not any(isinstance(f, _DeepSpeedImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeepSpeedImportHook())


class _DeepSpeedImportHook(importlib.abc.MetaPathFinder):
    """Finds ``deepspeed`` through the other finders and patches it once executed.

    It stays on ``sys.meta_path`` until then: libraries ask ``importlib.util.find_spec
    ("deepspeed")`` to test availability long before they import it (transformers does),
    and such a look-up must not use the hook up."""

    _busy = False  # our own find_spec call below goes through the meta path too

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "deepspeed" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        hook = self

        def exec_then_patch(module):
            exec_module(module)
            patch(module)
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)

        spec.loader.exec_module = exec_then_patch
        return spec


def patch(deepspeed_module) -> None:
    plain = deepspeed_module.initialize
    if getattr(plain, _MARK, False):
        return

    @functools.wraps(plain)
    def initialize(*args, **kwargs):
        if has_alam_section(args, kwargs):
            from alam_dist.deepspeed import initialize as alam_initialize
            return alam_initialize(*args, **kwargs)
        return plain(*args, **kwargs)

    setattr(initialize, _MARK, True)
    deepspeed_module.initialize = initialize


def has_alam_section(args: tuple, kwargs: dict) -> bool:
    """Whether ``deepspeed.initialize(*args, **kwargs)`` is given a config with "alam"."""
    config = kwargs.get("config", kwargs.get("config_params"))
    cli_args = kwargs.get("args", args[0] if args else None)
    if config is None and cli_args is not None:
        config = getattr(cli_args, "deepspeed_config", None) or getattr(cli_args, "deepscale_config", None)
    if isinstance(config, dict):
        return "alam" in config
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as f:
                loaded = json.load(f)
        except (OSError, ValueError):
            return False  # DeepSpeed reports an unreadable config in its own words
        return isinstance(loaded, dict) and "alam" in loaded
    return False
