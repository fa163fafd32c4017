"""The decoder row of benchmarks/finetune.py: a small LLaMA, pretrained here, then fine-tuned.

MiniLM is an encoder with GELU, LayerNorm and learned positions; LLaMA-style decoders,
which our users fine-tune, have a SiLU-gated MLP, RMSNorm, RoPE, grouped-query causal
attention and a large log-softmax. So the table gets a second model that has those.

Nothing can be downloaded, so the model is pretrained on the fly and cached under
``runs/finetune/``: a 4-layer LLaMA (hidden 192, GQA 4/2 heads, bytes as tokens) trained
as a causal LM on the docstrings of the Python standard library (read with ``ast``, not
imported; about 3 MB of English) for a few minutes. The fine-tune then moves it to
another text: the pydoc topics, split by topic into train and held-out exactly as the
MiniLM row splits them. LLaMA fine-tunes run without dropout, so the noise a row's seed
brings is the data's: every training window is a crop at a seed-drawn offset.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

CONFIG = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              tie_word_embeddings=False)
VOCAB, BOS, EOS, PAD = 259, 256, 257, 258  # launch/data.py's ByteTokenizer
PRETRAIN = dict(steps=600, batch=32, seq=128, lr=2e-3, warmup=30, seed=0, max_files=None)
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo"}


def stdlib_docstrings(min_chars: int = 200, max_files: int | None = None) -> list[str]:
    """Every module, class and function docstring of the standard library's .py files
    with at least ``min_chars`` characters, in file order (the first ``max_files``)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    files = [p for p in sorted(root.rglob("*.py")) if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    for path in files[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    out.append(doc)
    return out


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class DecoderTask:
    """What benchmarks/finetune.py needs of a model: windows, batches, a loss, a model."""

    name = "llama"
    lr = 5e-4

    def __init__(self, seq: int = 128, held_every: int = 5, cache: Path = Path("runs/finetune"),
                 quick: bool = False):
        from pydoc_data.topics import topics
        self.seq, self.slack, self.cache = seq, seq // 2, cache
        # --quick (CI smoke): a 2-step pretraining on 40 files, cached apart from the real one
        self.pretrain_settings = {**PRETRAIN, "steps": 2, "max_files": 40} if quick else dict(PRETRAIN)
        train, held = [], []
        for i, name in enumerate(sorted(topics)):
            ids = _bytes(topics[name])
            span = seq + 1 + self.slack  # a training window is a seed-drawn crop of seq+1 of it
            for start in range(0, len(ids) - seq, span):
                chunk = [BOS, *ids[start:start + span - 1]]
                if len(chunk) < seq + 1:
                    continue
                (held if i % held_every == held_every - 1 else train).append(chunk)
        self.train, self.held = train, held

    def batch(self, windows: list[list[int]], generator: torch.Generator, train: bool = True) -> dict:
        rows = []
        for w in windows:
            room = len(w) - (self.seq + 1)
            off = int(torch.randint(0, room + 1, (), generator=generator)) if train and room > 0 else 0
            rows.append(w[off:off + self.seq + 1])
        return {"input_ids": torch.tensor(rows, dtype=torch.long)}

    @staticmethod
    def loss(model, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = model(input_ids=ids[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))

    def load_model(self):
        model = _build()
        model.load_state_dict(torch.load(self.pretrained(), weights_only=True))
        return model

    def pretrained(self) -> Path:
        """The pretrained weights: made once (a few minutes on 2 CPU cores), then cached."""
        settings = {k: v for k, v in self.pretrain_settings.items() if v is not None}
        key = hashlib.sha256(json.dumps([CONFIG, settings, VOCAB], sort_keys=True).encode()).hexdigest()[:12]
        path = self.cache / f"llama-pretrained-{key}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            model = pretrain(self.pretrain_settings)
            tmp = path.with_suffix(".tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(path)
        return path


def _build():
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS,
                                   pad_token_id=PAD, **CONFIG)
    return transformers.LlamaForCausalLM(cfg)  # attention: sdpa, the default


def pretrain(p: dict):
    """Causal LM on the standard library's docstrings: crops of one long byte stream."""
    stream = []
    for doc in stdlib_docstrings(max_files=p["max_files"]):
        stream += [BOS, *_bytes(doc), EOS]
    data = torch.tensor(stream, dtype=torch.long)
    torch.manual_seed(p["seed"])
    model = _build()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / p["warmup"]) * 0.5 * (1 + math.cos(math.pi * s / p["steps"])))
    g = torch.Generator().manual_seed(p["seed"])
    start = time.perf_counter()
    print(f"[finetune] pretraining the decoder on {len(data) / 1e6:.1f} MB of stdlib docstrings "
          f"({p['steps']} steps; cached afterwards)", file=sys.stderr, flush=True)
    for s in range(p["steps"]):
        offsets = torch.randint(0, len(data) - p["seq"] - 1, (p["batch"],), generator=g)
        batch = {"input_ids": torch.stack([data[o:o + p["seq"] + 1] for o in offsets.tolist()])}
        loss = DecoderTask.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if s % 100 == 0 or s == p["steps"] - 1:
            print(f"[finetune]   step {s}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    return model
