"""Integrations: thin layers that translate an engine's life cycle into controller calls.

* :mod:`~alam_dist.integrations.deepspeed` -- ``deepspeed.initialize`` plus the config's
  ``"alam"`` section (public name: ``alam_dist.deepspeed``);
* :mod:`~alam_dist.integrations.fsdp` -- ``alam_dist.fsdp.apply`` on an FSDP2 model;
* the config-only hook (``alam_dist_autoload.py`` at the top level: a ``.pth`` imports it
  at start-up, so it cannot live in the package) routes ``deepspeed.initialize`` here;
* the reference code's API (``alam.set_config``, ``alam.Controller``) is
  :mod:`alam_dist.controller`'s seed API and the ``alam`` package.

None holds an algorithm: probing, planning and compression are the controller's.
"""
