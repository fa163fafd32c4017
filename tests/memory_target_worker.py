"""A memory target in one training process (tests/test_memory_target.py runs it in a fresh
process with MALLOC_MMAP_THRESHOLD_=65536: freed memory leaves the resident set). Three
runs of a tiny LLaMA: room for everything exact; a target cut into that room; a target
below what the step holds beside its activations. Prints one JSON line."""
from __future__ import annotations

import json

import torch

import alam_dist
from alam_dist import memory
from alam_dist.memory import GIB, MemoryTargetError
from tests.helpers import tiny_llama, token_batch

torch.set_num_threads(1)


def train(target_gb: float, steps: int = 4):
    model = tiny_llama(seed=0, layers=2, hidden=256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(memory_target_gb=target_gb,
                                                      probe_steps=[0], probe_batch_fraction=0.25))
    x = token_batch(4, 256, seed=1)
    peaks = []
    for _ in range(steps):
        if ctl.probe_due():  # on a quarter of the batch, as the integrations do
            pargs, pkw, share = ctl.probe_inputs((), {"input_ids": x, "labels": x})
            ctl.probe(lambda: model(*pargs, **pkw).loss, batch_share=share)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        peaks.append(memory.peak(torch.device("cpu")))  # since the controller's last reset
        ctl.step_done()
    f = ctl.memory_target.forecast
    return {"budget": f.budget, "plan_budget": ctl.plan.budget, "fits": f.fits,
            "source": f.beside_source, "beside": f.beside, "activations": f.activations,
            "predicted": f.predicted_peak, "target": f.target, "round_peak": f.round_peak,
            "peaks_after": peaks[2:],
            "report_budget": ctl.memory_report()["memory_target"]["budget"]}


def main() -> None:
    roomy = train(64)
    tight = train((roomy["beside"] + 0.7 * roomy["activations"]) / GIB)
    try:
        train(roomy["beside"] * 0.5 / GIB)
        impossible = None
    except MemoryTargetError as err:
        impossible = {"share": err.tokens_share, "message": str(err)}
    print(json.dumps({"roomy": roomy, "tight": tight, "impossible": impossible}))


if __name__ == "__main__":
    main()
