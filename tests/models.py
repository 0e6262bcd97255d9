"""Small real models for the tests and benchmarks (random weights, no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = self.conv2(x).mean(dim=(2, 3))
        return self.fc(x)


class Block(nn.Module):
    """A pre-norm transformer block, written out (attention, MLP, residuals)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        pos = torch.arange(t, device=x.device)
        mask = pos[None, :] <= pos[:, None]
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GraphBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return torch.tanh(self.b(x))


def mutate_input(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x.add_(1)
    return x * y


def aliased_outputs(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    y = x * 2
    return y, y.view(-1), y.t(), x.sum(), x[0]


def transformers_model(name: str, device: str = "cpu") -> tuple[nn.Module, Callable[[], Any]]:
    """A tiny GPT-2 / BERT / Llama from ``transformers`` configs, and an input factory."""
    import transformers as tf

    torch.manual_seed(0)
    vocab, seq, batch = 128, 16, 2
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=64)
        model = tf.BertForMaskedLM(cfg)
    elif name == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(name)
    model.config.use_cache = False
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    return model, lambda: {"input_ids": ids}


class OddWidth(nn.Module):
    """A hidden width (33) that Inductor pads when padding is on: its saved activations
    get strides eager would not give them."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 33)
        self.down = nn.Linear(33, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.sin(self.up(x)) * 2)
