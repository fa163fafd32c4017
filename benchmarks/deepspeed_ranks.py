"""ALAM under DeepSpeed and FSDP2 for R ranks, side by side: probe cost and step time per rank.

    python benchmarks/deepspeed_ranks.py                 # R = 1, 2; ZeRO-2, ZeRO-3, FSDP2
    python benchmarks/deepspeed_ranks.py --ranks 1 2 4 --zero 3 fsdp --steps 6

For each R and ZeRO stage it launches real ranks (torchrun, gloo on CPU; NCCL where the
machine has GPUs) of tests/dist_worker.py twice in one process group: without ALAM and
with ALAM (budget --bits, one probe round). It reports, per rank: probe backward passes
(about 3*L/R), probe wall time, median step time with and without ALAM (probe steps
excluded), and saved-activation bytes with the compression ratio. Table + one JSON line.
``fsdp`` in ``--zero`` runs tests/fsdp_worker.py instead: fully_shard per decoder block and
root, alam_dist.fsdp.apply.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _util import print_json, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ranks: int, zero: str, args) -> dict:
    fsdp = zero == "fsdp"
    base = {"steps": args.steps, "seq": args.seq, "hidden": args.hidden,
            "layers": args.layers, "micro_batch": args.micro_batch, "attn": args.attn}
    if not fsdp:
        base["zero"] = int(zero)
    probe_step = 1 if zero == "3" else 0  # ZeRO-3 runs the step-0 round at step 1
    worker = ROOT / "tests" / ("fsdp_worker.py" if fsdp else "dist_worker.py")
    scenarios = [dict(base, name="exact"),
                 dict(base, name="alam", alam={"bits": args.bits, "probe_steps": [0]})]
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "s.json"
        spec.write_text(json.dumps(scenarios))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(_port()), str(worker),
               "--out", tmp, "--scenarios", f"@{spec}"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(max(1, args.threads // ranks)))
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        res = {}
        for name in ("exact", "alam"):
            paths = [Path(tmp) / f"{name}.rank{r}.json" for r in range(ranks)]
            if not all(p.exists() for p in paths):
                raise RuntimeError(f"R={ranks} {zero} failed:\n{proc.stderr[-3000:]}")
            res[name] = [json.loads(p.read_text()) for p in paths]
            for r in res[name]:
                if "error" in r:
                    raise RuntimeError(r["traceback"])
    exact, alam = res["exact"][0], res["alam"][0]
    hist = alam["probe_cost"]["history"][0]
    slowest = max(r["probe_cost"]["history"][0]["seconds"] for r in res["alam"])
    train_steps = [t for i, t in enumerate(alam["step_seconds"]) if i != probe_step]
    return {
        "ranks": ranks, "sharding": "fsdp2" if fsdp else f"zero{zero}", "tensors": hist["tensors"],
        "probe_jobs_per_rank": hist["jobs_this_rank"],
        "probe_backward_passes_per_rank": hist["backward_passes"],
        "padding_passes_rank0": hist.get("padding_passes", 0),
        "probe_seconds": hist["seconds"],
        "probe_seconds_slowest_rank": slowest,
        "step_s_exact": statistics.median(exact["step_seconds"][1:]),
        "step_s_alam": statistics.median(train_steps[1:] or train_steps),
        "saved_MB_raw_per_rank": alam["memory"]["saved_bytes_raw"] / 2**20,
        "saved_MB_alam_per_rank": alam["memory"]["saved_bytes_packed"] / 2**20,
        "ratio": alam["memory"]["ratio"],
        "probe_step_equivalents": hist["seconds"] / statistics.median(train_steps[1:] or train_steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--zero", nargs="+", default=["2", "3", "fsdp"], choices=["0", "1", "2", "3", "fsdp"],
                    help="ZeRO stages to run, and/or fsdp (FSDP2 fully_shard)")
    ap.add_argument("--bits", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    rows = []
    for zero in args.zero:
        for ranks in args.ranks:
            rows.append(run(ranks, zero, args))
            print(f"  done R={ranks} {zero}", file=sys.stderr, flush=True)
    print_table(rows, list(rows[0]))
    print_json("deepspeed_ranks", rows, bits=args.bits, seq=args.seq, hidden=args.hidden,
               layers=args.layers)


if __name__ == "__main__":
    main()
