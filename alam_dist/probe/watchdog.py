"""A watchdog for multi-rank probe rounds: no hang when another rank dies.

A probe round runs collectives (the inventory and result gathers, the plan check, and
under ZeRO-3 and FSDP the weight gathers of every pass). If a peer dies or hangs, gloo and
NCCL wait for the process group's timeout -- 30 minutes by default -- and a blocked
collective cannot be interrupted from Python. So, as PyTorch's own NCCL watchdog does, a
thread watches the round's progress (each phase and each probe job beats) and, after
``timeout`` seconds without progress, reports the round, the rank and the phase it was
in, and ends the process; the launcher (torchrun, deepspeed, mpirun) then stops the rest.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger("alam_dist")
EXIT_CODE = 75  # EX_TEMPFAIL: the job may be restarted


class ProbeWatchdog:
    def __init__(self, timeout_s: float, what: str):
        self.timeout_s, self.what = timeout_s, what
        self.phase = "starting"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, phase: str) -> None:
        self.phase, self._last = phase, time.monotonic()

    def __enter__(self) -> "ProbeWatchdog":
        if self.timeout_s > 0:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="alam-probe-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                message = (f"alam_dist: {self.what} made no progress for {idle:.0f} s (in: "
                           f"{self.phase}): this rank is stuck, or a rank it waits for has "
                           f"died or hangs (see the other ranks' logs). Ending this rank (exit {EXIT_CODE}) so that the launcher "
                           "stops the job instead of every rank waiting for the process "
                           "group's timeout. Raise alam.probe_timeout_s if one probe job "
                           "legitimately takes longer; 0 disables this watchdog.")
                log.error(message)
                print(message, file=sys.stderr, flush=True)
                os._exit(EXIT_CODE)
