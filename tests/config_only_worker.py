"""User code that knows nothing of alam_dist: a Hugging Face Trainer run, or a plain
``deepspeed.initialize`` loop, driven by a ds_config.json. With an "alam" section in that
file, the installed config-only hook (alam_dist_autoload.pth) turns ALAM on.

    deepspeed --num_gpus 2 tests/config_only_worker.py --mode trainer|plain \\
        --ds_config CONFIG --out RESULT.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=["trainer", "plain"], required=True)
ap.add_argument("--ds_config", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--local_rank", type=int, default=None)
ap.add_argument("--steps", type=int, default=4)
args = ap.parse_args()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import tiny_llama, token_batch  # noqa: E402  (test models only)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=32):
        self.rows = token_batch(n, seq, seed=3)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


result = {}
try:
    model = tiny_llama(seed=0)
    if args.mode == "trainer":
        from transformers import Trainer, TrainingArguments
        targs = TrainingArguments(output_dir=str(Path(args.out).parent / "trainer_out"),
                                  deepspeed=args.ds_config, use_cpu=True, max_steps=args.steps,
                                  per_device_train_batch_size=2, learning_rate=3e-3,
                                  logging_steps=1, save_strategy="no", report_to=[], seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=Tokens())
        trainer.train()
        engine = trainer.model_wrapped
        result["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    else:
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=args.ds_config)
        rank = torch.distributed.get_rank()
        losses = []
        for step in range(args.steps):
            x = token_batch(2, 32, seed=100 * rank + step)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        result["losses"] = losses
    alam = getattr(engine, "alam", None)
    result["alam"] = alam is not None
    if alam is not None:
        report = alam.memory_report()
        result["ratio"] = report["ratio"]
        result["probe_rounds"] = report["probe_cost"]["rounds"]
    result["rank"] = torch.distributed.get_rank()
except Exception as err:  # noqa: BLE001 - recorded for the test
    import traceback
    result["error"] = f"{type(err).__name__}: {err}"
    result["traceback"] = traceback.format_exc()
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
Path(f"{args.out}.rank{rank}").write_text(json.dumps(result))
