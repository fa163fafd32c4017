"""Peak resident-set growth of a plain training step and of a probe round as the
integrations run it (on ``probe_batch_fraction`` of the micro-batch), in a fresh process
with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed memory leaves the resident set). Prints one
JSON line: MiB per phase. Used by tests/test_step_hygiene.py."""
from __future__ import annotations

import gc
import json
import sys

import torch

import alam_dist
from alam_dist import memory
from alam_dist.probe.inputs import loss_of
from tests.helpers import tiny_llama, token_batch

torch.set_num_threads(1)
cpu = torch.device("cpu")


def growth(fn) -> float:
    gc.collect()
    before = memory.in_use(cpu)
    memory.reset_peak(cpu)
    fn()
    return (memory.peak(cpu) - before) / 2 ** 20


def main() -> None:
    probe, attn = sys.argv[1], sys.argv[2]
    forward_per_pass = len(sys.argv) > 3 and sys.argv[3] == "per_pass"
    model = tiny_llama(layers=2, hidden=256, attn=attn)
    x = token_batch(4, 256)

    def plain_step():
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()

    plain_step()  # warm: the allocator's first-touch pages
    plain = max(growth(plain_step) for _ in range(2))
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(bits=2, probe=probe))
    (pargs, pkw, share) = ctl.probe_inputs((), {"input_ids": x, "labels": x})
    rounds = [growth(lambda: ctl.probe(lambda: loss_of(model(*pargs, **pkw)), batch_share=share,
                                       forward_per_pass=forward_per_pass)) for _ in range(2)]
    print(json.dumps({"plain_MiB": plain, "round_MiB": max(rounds), "share": list(share)}))


if __name__ == "__main__":
    main()
