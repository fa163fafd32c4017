"""Shared helpers for the benchmarks: timing and output (a table + one JSON line)."""
from __future__ import annotations

import json
import platform
import time
from typing import Callable

import torch


def best_of(fn: Callable[[], object], repeats: int, sync: bool = False) -> float:
    """Best wall time of ``repeats`` calls after one warm-up (these machines are noisy)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def print_json(name: str, rows: list[dict], **extra) -> None:
    print(json.dumps({"benchmark": name, "machine": machine(), **extra, "results": rows}))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
