"""Plots for docs/results.md from benchmarks/compare.py output (needs matplotlib).

    python benchmarks/plot_results.py docs/results/compare_tiny_fp32.json --out docs/results

Writes ``<name>_memory_vs_time.png`` (peak memory against step time, one point per row)
and ``<name>_loss.png`` (loss per step: no saving against ALAM's budgets), and prints each
file's table in Markdown (``--markdown-only``: the tables alone, no matplotlib needed).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


COLUMNS = [("row", "row", "{}"), ("saved_MB", "saved MB", "{:.2f}"),
           ("peak_fwd_MB", "peak fwd MB", "{:.1f}"), ("peak_MB", "peak MB", "{:.1f}"), ("step_s", "step s", "{:.3f}"),
           ("step_ratio", "step x", "{:.2f}"), ("grad_cosine", "grad cos", "{:.3f}"),
           ("final_loss", "loss after N", "{:.3f}"), ("probe_step_equivalents", "probe step-eq", "{:.1f}"),
           ("plan_bits", "plan bits", "{:.2f}")]


def markdown(data: dict) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in data["results"]:
        if "skipped" in r:
            lines.append(f"| {r['row']} | did not run: {r['skipped'][:120]} |" + " |" * (len(COLUMNS) - 2))
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_json", nargs="+")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--markdown-only", action="store_true")
    args = ap.parse_args()
    for path in args.compare_json:
        data = json.loads(Path(path).read_text())
        print(f"\n{path}: {data['model']}, {data['dtype']}, batch {data['batch']} x {data['seq']} "
              f"tokens, {data['steps']} steps\n")
        print(markdown(data))
    if args.markdown_only:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.compare_json:
        data = json.loads(Path(path).read_text())
        rows = [r for r in data["results"] if "peak_MB" in r]
        name = Path(path).stem
        title = f"{data['model']}, {data['dtype']}, {data['batch']}x{data['seq']} tokens"

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
        panels = [("peak_MB", "peak of forward + backward (MB)"),
                  ("peak_fwd_MB", "at the end of the forward (MB)")]
        for ax, (key, label) in zip(axes, panels):
            for r in rows:
                if r.get(key) is None:
                    continue
                colour = "tab:red" if r["row"].startswith("alam") else "tab:blue"
                ax.scatter(r["step_s"] * 1000, r[key], color=colour)
                ax.annotate(r["row"], (r["step_s"] * 1000, r[key]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
            ax.set_xlabel("median step time (ms)")
            ax.set_ylabel(f"memory above the step's start: {label}", fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(f"Memory vs time ({title}; red: ALAM)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{name}_memory_vs_time.png", dpi=110)
        plt.close(fig)

        curves = [r for r in rows if len(r.get("losses", [])) > 2
                  and (r["row"] == "none" or (r["row"].startswith("alam_") and "+" not in r["row"]))]
        if curves:
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            for r in curves:
                label = "exact (no saving)" if r["row"] == "none" else \
                    f"ALAM budget {r['row'].split('_')[1]} bits"
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=label,
                        linewidth=2 if r["row"] == "none" else 1.2)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.set_title(f"Loss ({title})", fontsize=10)
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / f"{name}_loss.png", dpi=110)
            plt.close(fig)
        print(f"wrote {out / name}_*.png")


if __name__ == "__main__":
    main()
