"""Small models and data shared by the tests (config-built, random init, no download)."""
from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 128, vocab: int = 256,
               attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg)


def probe_tiny_llama(layers: int, **cfg):
    """One probe round on a tiny LLaMA (seed 0) over a 4x48 token batch, ALAMConfig(**cfg):
    (controller, plan)."""
    import alam_dist
    model = tiny_llama(seed=0, layers=layers)
    ctl = alam_dist.apply(model, alam_dist.ALAMConfig(**cfg))
    x = token_batch(4, 48, seed=1)
    return ctl, ctl.probe(lambda: model(input_ids=x, labels=x).loss)


def token_batch(batch: int = 4, seq: int = 64, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """Learnable sequences: arithmetic progressions mod vocab."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    step = torch.randint(1, 4, (batch, 1), generator=g)
    return (start + step * torch.arange(seq)) % vocab


class SmallCNN(torch.nn.Module):
    """Conv + BatchNorm + dropout + masked_fill: exercises buffers and bool masks."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.drop = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        h = h.masked_fill(h > 3.0, 3.0)  # saves a bool mask for backward
        return self.head(h.flatten(1))


def flat_grads(loss: torch.Tensor, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
