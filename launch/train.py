"""Fine-tune a LLaMA-architecture causal LM with DeepSpeed, with or without ALAM.

    deepspeed --num_gpus 2 launch/train.py --deepspeed configs/ds_config_zero2_alam.json --alam
    deepspeed --num_gpus 2 launch/train.py --deepspeed configs/ds_config_zero2_alam.json --no_alam

Model: ``--model DIR`` (a local Hugging Face checkpoint: weights and tokenizer from disk,
never downloaded) or ``--model_config tiny|llama2-7b|config.json`` (random init, byte-level
tokenizer). Data: ``--data`` Alpaca .json/.jsonl (prompt tokens masked out of the loss),
.txt files, or by default instruction pairs built from the Python docs in the stdlib.

ALAM is on with ``--alam``, or when the DeepSpeed config has an ``"alam"`` section (unless
``--no_alam``). Every ``"alam"`` key can be set here as ``--alam_<key> VALUE`` (JSON for
lists and objects). Per optimizer step rank 0 writes ``OUTPUT_DIR/metrics.jsonl``: loss,
lr, tokens/s, saved-activation bytes raw and packed (equal without ALAM: measured, not
compressed), peak memory. docs/launch.md has a command per launcher.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

def share_cpu_threads() -> None:
    """One share of the cores per local rank, unless the user chose (OMP_NUM_THREADS).

    torchrun sets one thread per rank; the deepspeed launcher and mpirun set nothing,
    so every rank would start a thread per core for torch and for the codec's OpenMP
    kernels, and spinning threads of several ranks on the same cores slowed probe rounds
    here by up to 20x. Must run before torch is imported."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = next((int(os.environ[k]) for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                                               "OMPI_COMM_WORLD_LOCAL_SIZE") if k in os.environ), 1)
    if local > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // local))


share_cpu_threads()  # before anything imports torch (alam_dist does)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `launch` and `alam_dist` importable
    sys.path.insert(0, str(ROOT))

from alam_dist.config import ALAMConfig  # noqa: E402
from alam_dist.memory import MemoryTargetError  # noqa: E402
from launch import data as data_lib  # noqa: E402

MODEL_CONFIGS = {
    # tests and the demo: trains in seconds on a CPU
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    # LLaMA-2-7B's shapes (random init): memory planning and kernel benchmarks
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-5),
}
DEFAULT_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 1.0,
    "steps_per_print": 10 ** 9,
}
ALAM_KEYS = [f.name for f in dataclasses.fields(ALAMConfig) if f.name != "enabled"]


class UsageError(SystemExit):
    """A bad command line, config, model path or data file: reported before any work."""

    def __init__(self, message: str):
        super().__init__(f"launch/train.py: error: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="local Hugging Face checkpoint directory (config, weights, tokenizer)")
    src.add_argument("--model_config", default=None,
                     help=f"random-init model: {', '.join(MODEL_CONFIGS)} or an HF config.json path (default tiny)")
    ap.add_argument("--data", default=None, help="Alpaca .json/.jsonl, a .txt file or a directory of them (default: built-in)")
    ap.add_argument("--seq_len", type=int, default=256, help="longest training sequence (tokens)")
    ap.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed_config", default=None,
                    help="DeepSpeed config JSON (may hold an \"alam\" section)")
    ap.add_argument("--max_steps", type=int, default=20, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (when the config has no optimizer)")
    ap.add_argument("--warmup_steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output_dir", default="runs/train")
    ap.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: never)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUTPUT_DIR")
    ap.add_argument("--gradient_checkpointing", action="store_true", help="non-reentrant, per decoder layer")
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="torch.compile every decoder block (torchtitan's layout; ALAM compresses "
                         "inside the compiled graphs: docs/compile.md); BACKEND: inductor "
                         "(default) or aot_eager")
    ap.add_argument("--compile_scope", choices=["blocks", "model"], default="blocks",
                    help="with --compile: every decoder block (default), or the whole model "
                         "through DeepSpeed's engine.compile()")
    ap.add_argument("--fsdp", action="store_true",
                    help="run under torchrun with FSDP2 (fully_shard per decoder block) instead of "
                         "DeepSpeed; the config file's batch, accumulation, clipping, bf16 and "
                         "\"alam\" keys apply")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    ap.add_argument("--alam_plan_only", action="store_true",
                    help="with --alam_memory_target_gb: run the probe round and the two measured "
                         "steps after it (nothing saved), print per candidate micro-batch the "
                         "budget, predicted peak and expected held-out loss cost, and exit")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher
    switch = ap.add_mutually_exclusive_group()
    switch.add_argument("--alam", dest="alam", action="store_true", default=None, help="turn ALAM on")
    switch.add_argument("--no_alam", dest="alam", action="store_false", help="turn ALAM off (plain DeepSpeed)")
    keys = ap.add_argument_group("ALAM keys (override the config's \"alam\" section; docs: README)")
    for key in ALAM_KEYS:
        keys.add_argument(f"--alam_{key}", metavar="VALUE", default=None, help=argparse.SUPPRESS
                          if key not in ("bits", "total_steps", "probe_steps", "save_plan_path",
                                         "load_plan_path", "memory_target_gb") else f"alam.{key}")
    return ap.parse_args(argv)


def _cli_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # plain strings (paths, "warn") need no quotes


def resolve_configs(args) -> tuple[dict, ALAMConfig | None]:
    """(DeepSpeed config with or without its "alam" section, the parsed ALAMConfig)."""
    if args.deepspeed_config:
        path = Path(args.deepspeed_config)
        try:
            ds_config = json.loads(path.read_text())
        except OSError as err:
            raise UsageError(f"cannot read DeepSpeed config {path}: {err.strerror}") from None
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{err.lineno}: DeepSpeed config is not valid JSON ({err.msg})") from None
    else:
        ds_config = json.loads(json.dumps(DEFAULT_DS_CONFIG))
    section = ds_config.pop("alam", None)
    overrides = {k: _cli_value(getattr(args, f"alam_{k}")) for k in ALAM_KEYS
                 if getattr(args, f"alam_{k}") is not None}
    on = args.alam if args.alam is not None else section is not None
    if not on:
        if overrides:
            raise UsageError(f"--alam_* options given ({sorted(overrides)}) but ALAM is off: add --alam")
        return ds_config, None
    section = {**(section or {}), **overrides}
    section.setdefault("total_steps", args.max_steps)
    try:
        alam_config = ALAMConfig.from_dict(section)
    except (TypeError, ValueError) as err:
        raise UsageError(f"bad \"alam\" config: {err}") from None
    ds_config["alam"] = alam_config.to_dict()
    return ds_config, alam_config


def check_model_source(args) -> None:
    if args.model:
        path = Path(args.model)
        if not path.is_dir():
            raise UsageError(f"--model {path}: no such directory (a local Hugging Face checkpoint "
                             "directory holding config.json, weights and a tokenizer)")
        if not (path / "config.json").exists():
            raise UsageError(f"--model {path}: no config.json there; is it a Hugging Face checkpoint?")
    elif args.model_config and args.model_config not in MODEL_CONFIGS and not Path(args.model_config).is_file():
        raise UsageError(f"--model_config {args.model_config!r}: not one of {sorted(MODEL_CONFIGS)} "
                         "and not a config.json file")


def load_tokenizer(args):
    if not args.model:
        return data_lib.ByteTokenizer()
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {args.model}: cannot load its tokenizer ({err})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


_KEEP_ALIVE: list = []


def build_model(args, tok, ds_config: dict):
    import torch
    import transformers
    from transformers.integrations import HfDeepSpeedConfig
    # FSDP keeps fp32 parameters and computes in bf16 through its MixedPrecisionPolicy
    bf16 = ds_config.get("bf16", {}).get("enabled") and not args.fsdp
    dtype = torch.bfloat16 if bf16 else torch.float32
    if ds_config.get("zero_optimization", {}).get("stage") == 3 and not args.fsdp:
        # transformers then builds (and loads) the model partitioned under zero.Init:
        # a 7B model never exists whole on one rank. The object must stay alive.
        _KEEP_ALIVE.append(HfDeepSpeedConfig({k: v for k, v in ds_config.items() if k != "alam"}))
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                                  dtype=dtype)
    else:
        name = args.model_config or "tiny"
        if name in MODEL_CONFIGS:
            config = transformers.LlamaConfig(**{"vocab_size": tok.vocab_size, **MODEL_CONFIGS[name]})
        else:
            config = transformers.AutoConfig.from_pretrained(name)
        config.pad_token_id, config.bos_token_id, config.eos_token_id = (
            tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
        torch.manual_seed(args.seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def peak_memory_mb(device) -> float:
    """The run's peak (max_memory_allocated on a GPU, the peak resident set on the CPU),
    across the resets an ALAM memory target makes to measure single steps."""
    from alam_dist.memory import peak_so_far
    return peak_so_far(device) / 2 ** 20


def plan_table(args, engine, alam, micro_batch: int) -> list[dict]:
    """--alam_plan_only: the memory target's forecast per candidate micro-batch."""
    target = alam.controller.memory_target
    if not target.measured:
        raise UsageError("--alam_plan_only: no probe round and measured steps within 8 steps; "
                         "the probe schedule (alam.probe_steps) must start at step 0")
    cost_path = ROOT / "docs" / "results" / "finetune.json"
    costs = {}
    if cost_path.exists():
        table = json.loads(cost_path.read_text()).get("current_defaults_vs_exact_pct", {})
        costs = {float(k): v for k, v in table.items() if not k.startswith("_")}
    candidates = sorted({1, 2, 4, 8, 16, 32, micro_batch})
    rows = target.candidates([b / micro_batch for b in candidates])
    for b, row in zip(candidates, rows):
        row.pop("scale")
        row["micro_batch"], row["seq_len"] = b, args.seq_len
        row["heldout_loss_cost_pct"] = (expected_cost(costs, row["budget"])
                                        if row["fits"] and costs else None)
    return rows


def expected_cost(costs: dict[float, float], budget: float) -> float | None:
    """Held-out loss change at ``budget``, interpolated (in log2 bits) between the budgets
    the fine-tune benchmark measured (docs/results/finetune.json)."""
    import math
    known = sorted(costs)
    if budget < known[0]:
        return None  # below what was measured
    if budget == known[0]:
        return costs[known[0]]
    for lo, hi in zip(known, known[1:]):
        if budget <= hi:
            t = (math.log2(budget) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            return round(costs[lo] + t * (costs[hi] - costs[lo]), 2)
    return costs[known[-1]]


class Batches:
    """Endless micro-batches for this rank, epoch after epoch; ``position`` counts the
    micro-batches handed out, so a resumed run continues with the next one."""

    def __init__(self, examples, *, rank, world, micro_batch, seed, pad_id, pad_to=None):
        self.examples, self.pad_id, self.micro_batch = examples, pad_id, micro_batch
        self.pad_to = pad_to
        self.order_kw = dict(rank=rank, world=world, micro_batch=micro_batch, seed=seed)
        self.per_epoch = len(examples) // world // micro_batch
        if self.per_epoch == 0:
            raise UsageError(f"{len(examples)} examples cannot fill one micro-batch of "
                             f"{micro_batch} on each of {world} ranks")
        self.position = 0
        self._epoch, self._order = -1, []

    def skip_to(self, position: int) -> None:
        self.position = position

    def __next__(self):
        epoch, index = divmod(self.position, self.per_epoch)
        self.position += 1
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = data_lib.rank_order(len(self.examples), epoch=epoch, **self.order_kw)
        picked = self._order[index * self.micro_batch:(index + 1) * self.micro_batch]
        return data_lib.collate([self.examples[i] for i in picked], self.pad_id, self.pad_to)


def compile_blocks(model, backend: str) -> None:
    """torch.compile each decoder block in place, after ALAM is installed (ALAM keys its
    plan by the eager module tree; its probe rounds run the blocks eagerly)."""
    from alam_dist.probe.blocks import find_blocks
    stack = find_blocks(model)
    if stack is None:
        raise UsageError("--compile: no stack of decoder blocks found in the model")
    for block in stack.modules:
        block.compile(backend=backend)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Everything that can be wrong with the input is checked here, before any
    # process group exists or any rank starts work.
    ds_config, alam_config = resolve_configs(args)
    if args.alam_plan_only:
        if alam_config is None or alam_config.memory_target_gb is None:
            raise UsageError("--alam_plan_only forecasts for a memory target: add --alam "
                             "--alam_memory_target_gb GIB (or \"auto\")")
        if args.resume or alam_config.load_plan_path or alam_config.probe_steps_resolved()[:1] != (0,):
            raise UsageError("--alam_plan_only runs the probe round at step 0 and the steps after "
                             "it: drop --resume, alam.load_plan_path and a probe_steps list that "
                             "does not start at 0")
    if args.fsdp and ("optimizer" in ds_config or "scheduler" in ds_config):
        raise UsageError("--fsdp trains with AdamW at --lr (and --warmup_steps); the config's "
                         "\"optimizer\"/\"scheduler\" sections are DeepSpeed's: remove them or "
                         "run without --fsdp")
    if args.compile_scope == "model" and args.fsdp:
        raise UsageError("--compile_scope model compiles through DeepSpeed's engine.compile(); "
                         "with --fsdp, use the default --compile_scope blocks")
    check_model_source(args)
    tok = load_tokenizer(args)
    try:
        examples = data_lib.load_examples(args.data, tok, args.seq_len)
    except data_lib.DataError as err:
        raise UsageError(str(err)) from None

    import torch
    import alam_dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.fsdp:
        if "LOCAL_RANK" not in os.environ:
            raise UsageError("--fsdp runs under torchrun: torchrun --nproc_per_node N "
                             "launch/train.py --fsdp ...")
        torch.distributed.init_process_group(backend)
    else:
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    out_dir = Path(args.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    model = build_model(args, tok, ds_config)
    optimizer = None
    if args.fsdp:
        from launch.fsdp_engine import FSDPEngine, shard
        shard(model.to(device), ds_config)  # first: the optimizer must hold the shards
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=args.lr, weight_decay=0.0)
        engine = FSDPEngine(model, optimizer, ds_config, alam_config)
        scheduler = None
    else:
        import alam_dist.deepspeed as ads
        if "optimizer" not in ds_config:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                          lr=args.lr, weight_decay=0.0)
        engine, _, _, scheduler = ads.initialize(
            model=model, optimizer=optimizer,
            model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
    if args.compile and args.compile_scope == "model":
        engine.compile(backend=args.compile)
    elif args.compile:
        compile_blocks(engine.module, args.compile)
    alam = getattr(engine, "alam", None)
    meter = None if alam else alam_dist.SavedActivationMeter(engine.module)
    micro_batch = engine.train_micro_batch_size_per_gpu()
    accum = engine.gradient_accumulation_steps()
    # a memory target plans for micro-batch x --seq_len tokens: every step gets that shape
    # (padded), or a step of longer examples than the probed one could exceed the target
    targeted = bool(alam) and alam.controller.memory_target is not None
    if args.alam_plan_only:
        alam.controller.memory_target.strict = False  # a micro-batch that does not fit is a row
    batches = Batches(examples, rank=rank, world=world, micro_batch=micro_batch, seed=args.seed,
                      pad_id=tok.pad_token_id, pad_to=args.seq_len if targeted else None)
    start_step = 0
    if args.resume:
        path, client = engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise UsageError(f"--resume: no checkpoint in {ckpt_dir}")
        start_step = int(client["train_step"])
        batches.skip_to(int(client["train_position"][rank]))

    def lr_at(step: int) -> float:
        return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr

    metrics_path = out_dir / "metrics.jsonl"
    metrics_file = (open(metrics_path, "a" if args.resume else "w")
                    if rank == 0 and not args.alam_plan_only else None)
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.max_steps, initial=start_step, desc="alam" if alam else "plain",
                   unit="step", dynamic_ncols=True)
    history = []
    try:
        history = train_loop(args, Run(engine, alam, meter, batches, optimizer, scheduler,
                                       device, world, accum, lr_at, bar, metrics_file, ckpt_dir),
                             start_step)
    except MemoryTargetError as err:  # every rank: the budget is decided from gathered numbers
        fits = int(micro_batch * min(err.tokens_share, 1.0))
        hint = (f" At --seq_len {args.seq_len}, a micro-batch of {fits} would fit." if fits >= 1
                else "")
        torch.distributed.destroy_process_group()
        raise UsageError(f"{err}{hint}") from None
    if bar:
        bar.close()
    if args.alam_plan_only:
        alam.controller.close()
        rows = plan_table(args, engine, alam, micro_batch)
        if rank == 0:
            from benchmarks._util import print_table
            print(f"\n[alam] plan only: memory target {alam.controller.memory_target.target / 2**30:.3f}"
                  " GiB per rank", flush=True)
            print_table(rows, ["micro_batch", "seq_len", "fits", "budget", "predicted_peak_gib",
                               "activations_gib", "heldout_loss_cost_pct"])
            print(json.dumps({"plan_only": rows}), flush=True)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return {"plan_only": rows}
    peaks = torch.tensor([peak_memory_mb(device)], dtype=torch.float64, device=device)
    peak_ranks = [torch.zeros_like(peaks) for _ in range(world)]
    torch.distributed.all_gather(peak_ranks, peaks)
    if alam:
        alam.controller.close()  # the last step's plan-mismatch check (read late on GPUs)
    train_steps = [r["step_s"] for r in history if not r["probe_step"]]
    summary = {"alam": bool(alam), "world_size": world, "steps": args.max_steps,
               "final_loss": history[-1]["loss"] if history else None,
               "memory": (alam or meter).memory_report() if history else None,
               "median_step_s": statistics.median_high(train_steps) if train_steps else None,
               "peak_mem_mb_ranks": [float(p) for p in torch.cat(peak_ranks).tolist()]}
    if rank == 0:
        report = summary["memory"] or {}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        print(f"\n[{'alam' if alam else 'plain'}] steps {args.max_steps}, final loss "
              f"{summary['final_loss']}, saved activations per rank "
              f"{report.get('saved_bytes_raw', 0) / 2**20:.2f} MB raw -> "
              f"{report.get('saved_bytes_packed', 0) / 2**20:.2f} MB stored "
              f"({report.get('ratio', 1.0):.1f}x)", flush=True)
        if alam:
            rep = {k: v for k, v in report.items() if k != "bits"}
            print("[alam] memory report: " + json.dumps(rep, default=str), flush=True)
    if metrics_file:
        metrics_file.close()
    # an orderly end of the process group (every rank done with every collective)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return summary


@dataclasses.dataclass
class Run:
    """What the training loop works with."""

    engine: object
    alam: object
    meter: object
    batches: Batches
    optimizer: object
    scheduler: object
    device: object
    world: int
    accum: int
    lr_at: object
    bar: object
    metrics_file: object
    ckpt_dir: Path


def train_loop(args, run: Run, start_step: int) -> list[dict]:
    """Train from ``start_step`` to --max_steps; the history of rows (metrics.jsonl).
    With --alam_plan_only: until the memory target's measured steps are in."""
    import torch
    engine, alam, meter, batches = run.engine, run.alam, run.meter, run.batches
    optimizer, scheduler, device, world, accum = (run.optimizer, run.scheduler, run.device,
                                                  run.world, run.accum)
    lr_at, bar, metrics_file, ckpt_dir = run.lr_at, run.bar, run.metrics_file, run.ckpt_dir
    history = []
    # plan only: the round (step 0; 1 under ZeRO-3) and the measured steps after it
    max_steps = start_step + 8 if args.alam_plan_only else args.max_steps
    for step in range(start_step, max_steps):
        if args.alam_plan_only and alam.controller.memory_target.measured:
            break
        if optimizer is not None and scheduler is None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        t0 = time.perf_counter()
        probes_before = alam.controller.probe_cost.rounds if alam else 0
        # the loss stays on the device until the step's one read (after the all-reduce);
        # token counts come from the host copy of the batch
        loss_sum, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
        for _ in range(accum):
            host_batch = next(batches)
            tokens += int(host_batch["attention_mask"].sum())
            batch = {k: v.to(device, non_blocking=True) for k, v in host_batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double() / accum
        seconds = time.perf_counter() - t0
        probed = bool(alam) and alam.controller.probe_cost.rounds > probes_before
        if meter:
            meter.step_done()
        # collective tensors on the rank's device: NCCL reduces nothing else
        totals = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=device),
                              torch.tensor(seconds, dtype=torch.float64, device=device)])
        torch.distributed.all_reduce(totals)
        total_loss, total_tokens, total_seconds = totals.tolist()
        report = (alam or meter).memory_report(count_nonfinite=False)
        row = {"step": step + 1, "loss": total_loss / world, "lr": engine.get_lr()[0],
               "tokens_per_s": total_tokens / max(total_seconds / world, 1e-9),
               "step_s": seconds, "probe_step": probed,
               "saved_bytes_raw": report["saved_bytes_raw"],
               "saved_bytes_packed": report["saved_bytes_packed"],
               "ratio": report["ratio"], "peak_mem_mb": peak_memory_mb(device), "rank0_tokens": tokens}
        history.append(row)
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", saved_MB=f"{row['saved_bytes_packed'] / 2**20:.1f}",
                            ratio=f"{row['ratio']:.1f}x")
        if args.save_steps and (step + 1) % args.save_steps == 0 and not args.alam_plan_only:
            positions = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
            torch.distributed.all_gather(positions, torch.tensor([batches.position], device=device))
            engine.save_checkpoint(str(ckpt_dir), client_state={
                "train_step": step + 1, "train_position": [int(p) for p in positions]})
    return history


def end_process(code: int = 0) -> None:
    """Leave without interpreter finalization, once the work is done and written.

    ``destroy_process_group()`` does not end gloo's worker threads (``pt_gloo_runloop``,
    ``gloo_tcp_loop``) when something still holds the process group -- under FSDP2 its
    module state and DeviceMesh do, past ``del model`` and a collection. The group's C++
    destructor, which joins those threads and frees their last work, then runs during
    interpreter finalization, where a worker thread that needs the GIL to free a tensor
    is killed inside a destructor: ``terminate called without an active exception``
    (SIGABRT, exit -6) on a rank whose training had finished, now and then, under load.
    Nothing is left to do at that point, so the process ends here, with its output
    flushed, and those threads end with it."""
    import logging
    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun DeepSpeed initialised MPI: mpirun
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():  # wants Finalize
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
    end_process(0)
