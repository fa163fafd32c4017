"""Side by side: runs of launch/train.py (their OUTPUT_DIRs), as a table and one JSON line.

    python launch/compare_runs.py runs/main/plain runs/main/alam
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load_run(out_dir: Path) -> dict:
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    if not metrics:
        raise SystemExit(f"{out_dir}/metrics.jsonl is empty: did the run fail?")
    summary = json.loads((out_dir / "summary.json").read_text())
    steps = [m["step_s"] for m in metrics if not m["probe_step"]]
    probe = [m["step_s"] for m in metrics if m["probe_step"]]
    last = metrics[-1]
    return {
        "run": out_dir.name,
        "alam": summary["alam"],
        "ranks": summary["world_size"],
        "steps": last["step"],
        "first_loss": metrics[0]["loss"],
        "final_loss": last["loss"],
        "saved_MB_raw_per_rank": last["saved_bytes_raw"] / 2 ** 20,
        "saved_MB_stored_per_rank": last["saved_bytes_packed"] / 2 ** 20,
        "ratio": last["ratio"],
        "median_step_s": statistics.median(steps) if steps else None,
        "probe_step_s": sum(probe) if probe else 0.0,
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics if not m["probe_step"])
        if steps else None,
        "peak_mem_MB_rank0": last["peak_mem_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    rows = [load_run(p) for p in ap.parse_args().runs]
    cols = list(rows[0])
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    a = rows[0]
    print()
    for b in rows[1:]:
        if a["median_step_s"] and b["median_step_s"]:
            print(f"{b['run']} vs {a['run']}: saved activations {a['saved_MB_raw_per_rank']:.2f} MB -> "
                  f"{b['saved_MB_stored_per_rank']:.2f} MB per rank ({b['ratio']:.1f}x less), step "
                  f"time x{b['median_step_s'] / a['median_step_s']:.2f}, final loss "
                  f"{a['final_loss']:.3f} vs {b['final_loss']:.3f}")
    print(json.dumps({"compare_runs": rows}))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


if __name__ == "__main__":
    main()
