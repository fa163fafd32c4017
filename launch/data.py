"""Training data for launch/train.py: instruction data (Alpaca JSON / JSONL), plain text
files, or a built-in set made at run time from text every Python install carries.

Every source becomes a list of :class:`Example` (token ids + labels, prompt tokens masked
with -100), so the loop never cares where text came from. Errors name the file and line.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

IGNORE_INDEX = -100  # labels the loss skips (prompt tokens, padding)

PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response "
          "that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
          "{input_block}### Response:\n")


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255) plus bos/eos/pad: the tokenizer of the built-in
    model configs, which have no checkpoint to bring one."""

    vocab_size = 259
    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


class DataError(ValueError):
    """Bad training data: names the file, the line and what is wrong."""


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return PROMPT.format(with_input=", paired with an input that provides further context",
                             instruction=instruction, input_block=f"### Input:\n{input_text}\n\n")
    return PROMPT.format(with_input="", instruction=instruction, input_block="")


def instruction_example(tok: Tokenizer, instruction: str, input_text: str, output: str,
                        max_len: int) -> Example:
    """Prompt + response (+ eos); loss only on the response: prompt labels are -100."""
    prompt = tok.encode(alpaca_prompt(instruction, input_text), add_special_tokens=False)
    response = tok.encode(output, add_special_tokens=False)
    if tok.eos_token_id is not None:
        response = response + [tok.eos_token_id]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    # Too long for max_len: the response keeps at least half the window (an example
    # without a single label would give a NaN loss), the prompt keeps its end.
    response = response[:max(max_len - len(bos) - len(prompt), max_len // 2)]
    keep = max(max_len - len(bos) - len(response), 0)
    prompt = bos + (prompt[len(prompt) - keep:] if keep else [])
    ids = (prompt + response)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_len]
    return Example(ids, labels)


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) of a JSON array file or a JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read data file {path}: {err}") from None
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg}); each line of a "
                                "JSONL file must hold one object") from None
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(records).__name__}")
    # line numbers of each record's start, for the messages below
    starts = _object_lines(text)
    for i, rec in enumerate(records):
        yield (starts[i] if i < len(starts) else 0), rec


def _object_lines(text: str) -> list[int]:
    """Line numbers where the array's top-level objects start."""
    lines, depth, line, in_str, escape = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            escape = (ch == "\\") and not escape
            if ch == '"' and not escape:
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            if ch == "{" and depth == 1:
                lines.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return lines


def load_alpaca(path: str | Path, tok: Tokenizer, max_len: int) -> list[Example]:
    """Alpaca-format records: {"instruction": str, "input": str (optional), "output": str}."""
    path = Path(path)
    out = []
    for lineno, rec in _records(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with instruction/input/output, "
                            f"got {type(rec).__name__}")
        missing = [k for k in ("instruction", "output") if not isinstance(rec.get(k), str)]
        if missing:
            raise DataError(f"{where}: missing or non-string field(s) {missing}; Alpaca records "
                            "need \"instruction\" and \"output\" (\"input\" is optional)")
        if not isinstance(rec.get("input", ""), str):
            raise DataError(f"{where}: \"input\" must be a string")
        out.append(instruction_example(tok, rec["instruction"], rec.get("input", ""),
                                       rec["output"], max_len))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def load_text(paths: list[Path], tok: Tokenizer, max_len: int) -> list[Example]:
    """Plain text: the token stream of all files cut into windows of ``max_len``."""
    stream: list[int] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read text file {path}: {err}") from None
        stream += tok.encode(text, add_special_tokens=False)
        if tok.eos_token_id is not None:
            stream.append(tok.eos_token_id)
    windows = [stream[i:i + max_len] for i in range(0, len(stream) - 1, max_len)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise DataError(f"text file(s) {[str(p) for p in paths]} hold no text")
    return [Example(w, list(w)) for w in windows]


def builtin_records() -> list[dict]:
    """Instruction/response pairs from the Python documentation in ``pydoc_data.topics``
    (shipped with every CPython): 'explain topic T' with a paragraph of T's text as the
    response. Nothing is downloaded or copied into the repository."""
    from pydoc_data.topics import topics
    records = []
    for name in sorted(topics):
        paragraphs = [p.strip() for p in topics[name].split("\n\n") if len(p.strip()) > 80]
        for i, para in enumerate(paragraphs[:12]):
            records.append({"instruction": f"Explain part {i + 1} of the Python topic '{name}'.",
                            "input": "", "output": " ".join(para.split())})
    return records


def load_examples(data: str | None, tok: Tokenizer, max_len: int) -> list[Example]:
    """``data``: None or "builtin" (stdlib docs), a .json/.jsonl Alpaca file, a .txt file,
    or a directory of .txt files."""
    if data in (None, "builtin"):
        return [instruction_example(tok, r["instruction"], r["input"], r["output"], max_len)
                for r in builtin_records()]
    path = Path(data)
    if not path.exists():
        raise DataError(f"data path {path} does not exist (give an Alpaca .json/.jsonl file, "
                        "a .txt file or a directory of them, or omit --data for the built-in set)")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"data directory {path} holds no .txt files")
        return load_text(files, tok, max_len)
    if path.suffix in (".json", ".jsonl"):
        return load_alpaca(path, tok, max_len)
    return load_text([path], tok, max_len)


def rank_order(n_examples: int, *, rank: int, world: int, micro_batch: int, seed: int,
               epoch: int = 0) -> list[int]:
    """This rank's example indices for one epoch: a seeded shuffle shared by all ranks,
    then every world-th index from ``rank`` on (ranks see disjoint data, and lengths
    differ across ranks as real data does), cut so every rank gets the same number of
    whole micro-batches (DeepSpeed steps are collectives)."""
    order = list(range(n_examples))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    per_rank = n_examples // world // micro_batch * micro_batch
    return order[rank::world][:per_rank]


def collate(batch: list[Example], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest example (or to ``width``, for steps of one shape): input_ids,
    labels (-100 on padding), attention_mask."""
    width = max([len(e.input_ids) for e in batch] + ([width] if width else []))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
        mask[row, :len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
