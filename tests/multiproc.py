"""Launch a test worker on real ranks (torchrun, the deepspeed launcher or mpirun; gloo
on CPU) and collect each rank's JSON result per scenario. No mocks."""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: Path, scenarios: list[dict], out: Path, launcher: str = "torchrun",
           timeout: int = 600, nproc: int = 2) -> dict:
    """Run ``worker`` on ``nproc`` ranks; return {scenario: [result of rank 0, 1, ...]}
    plus ``"_shm_leftover"``: DeepSpeed CPU allreduce segments the run left in /dev/shm."""
    spec = out / "scenarios.json"
    out.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(scenarios))
    env = dict(os.environ, ALAM_TEST_LAUNCHER=launcher, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = str(free_port())
    worker_args = [str(worker), "--out", str(out), "--scenarios", f"@{spec}"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", port, *worker_args]
    elif launcher == "deepspeed":
        hostfile = out / "hostfile"
        hostfile.write_text(f"localhost slots={nproc}\n")
        cmd = [shutil.which("deepspeed") or "deepspeed", "--hostfile", str(hostfile),
               "--no_ssh_check", "--master_addr", "127.0.0.1",
               "--num_gpus", str(nproc), "--master_port", port, *worker_args]
    elif launcher == "mpirun":
        cmd = [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe",
               "-n", str(nproc), "-x", "PYTHONPATH", "-x", "ALAM_TEST_LAUNCHER", "-x", "OMP_NUM_THREADS",
               "-x", f"MASTER_PORT={port}", "-x", "MASTER_ADDR=127.0.0.1",
               sys.executable, *worker_args]
    else:
        raise ValueError(launcher)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    # DeepSpeed's CPU allreduce segments (69 MB of RAM each) that the run left behind:
    # alam_dist.deepspeed.initialize unlinks them; removed here anyway so that a failing
    # run cannot fill /dev/shm for the rest of the suite.
    leftover = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    for path in leftover:
        os.unlink(path)
    results: dict = {"_shm_leftover": leftover}
    for sc in scenarios:
        files = [out / f"{sc['name']}.rank{r}.json" for r in range(nproc)]
        if not all(f.exists() for f in files):
            raise AssertionError(f"{launcher} run produced no result for {sc['name']} "
                                 f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[sc["name"]] = [json.loads(f.read_text()) for f in files]
    return results


def ok(results: list[dict]) -> list[dict]:
    for r in results:
        assert "error" not in r, r.get("traceback", r.get("error"))
    return results


def run_scenarios(run, out_dir: Path, scenarios: list[dict]) -> None:
    """Worker side: run each scenario on this rank, record its result or its error."""
    import traceback

    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir.mkdir(parents=True, exist_ok=True)
    for sc in scenarios:
        if sc.get("fault"):  # meant to fail: let the error end the process, as in real use
            run(sc, rank, world)
            continue
        try:
            result = run(sc, rank, world)
        except Exception as err:  # recorded for the test to assert on
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        result.update(rank=rank, world=world, launcher=os.environ.get("ALAM_TEST_LAUNCHER", ""))
        (out_dir / f"{sc['name']}.rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()


def launch_raw(worker: Path, scenarios: list[dict], out: Path, nproc: int = 2,
               timeout: int = 180) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``worker`` under torchrun and return the finished process and its wall time:
    for runs that are meant to fail (fault injection)."""
    import time
    spec = out / "scenarios.json"
    out.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(scenarios))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", port, str(worker), "--out", str(out), "--scenarios", f"@{spec}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        os.unlink(path)
    return proc, time.monotonic() - start


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (leftover ranks)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def install_fault(module, fault: dict, rank: int, in_probe, current_step) -> None:
    """Make ``rank`` fail in ``module``'s forward: during a probe round (``at: "probe"``) or
    in the training forward of step ``fault["step"]`` (``at: "step"``), by SIGKILL, an
    exception, or hanging (``how``)."""
    import signal
    import time

    def hook(mod, args):
        if rank != fault["rank"]:
            return
        if fault["at"] == "probe" and not in_probe():
            return
        if fault["at"] == "step" and (in_probe() or current_step() != fault.get("step", 1)):
            return
        if fault["how"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault["how"] == "raise":
            raise RuntimeError(f"injected fault on rank {rank}")
        elif fault["how"] == "hang":
            time.sleep(3600)

    module.register_forward_pre_hook(hook)
