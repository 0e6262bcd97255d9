"""Models of the async benchmark that are not in bench/_child.py: the graph-break model and
the parallel case's independent blocks.

The classes live at module level so that graphs referring to them (training graphs do)
can be pickled by name and imported in a compile worker; the benchmark's children put
bench/ on ``sys.path``, which fxoffload's workers inherit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The graph-break model: 4 transformer blocks, each its own graph (3 graph breaks). The
# blocks differ (MLP width, activation), so no two graphs are alike.
BREAKS_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"batch": 2, "seq": 16, "d": 64, "heads": 4, "vocab": 128},
    "bench": {"batch": 8, "seq": 512, "d": 768, "heads": 12, "vocab": 32000},
}
PARALLEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"batch": 2, "seq": 16, "d": 64, "heads": 4},
    "bench": {"batch": 8, "seq": 512, "d": 1024, "heads": 16},
}
ACTS = ("gelu", "silu", "relu", "tanh", "sigmoid", "mish", "elu", "softplus")


class Block(nn.Module):
    """Pre-norm causal attention + MLP; ``mult`` and ``act`` make blocks differ."""

    def __init__(self, d: int, heads: int, mult: int, act: str) -> None:
        super().__init__()
        self.heads = heads
        self.act_name = act
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, mult * d)
        self.down = nn.Linear(mult * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
                   .permute(2, 0, 3, 1, 4).unbind(0))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(getattr(F, self.act_name)(self.up(self.ln2(x))))


class BreaksLM(nn.Module):
    """A small LM of 4 different blocks with a graph break between each two: 4 forward
    graphs (and 4 backward graphs when training)."""

    def __init__(self, d: int, heads: int, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.b0 = Block(d, heads, 4, "gelu")
        self.b1 = Block(d, heads, 3, "silu")
        self.b2 = Block(d, heads, 2, "relu")
        self.b3 = Block(d, heads, 4, "tanh")
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.b0(self.emb(input_ids))
        torch._dynamo.graph_break()
        x = self.b1(x)
        torch._dynamo.graph_break()
        x = self.b2(x)
        torch._dynamo.graph_break()
        logits = self.head(self.ln_f(self.b3(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return out


def build_breaks(size: str, device: str, dtype: Any, train: bool, batch: int | None,
                 seq: int | None) -> tuple[nn.Module, Callable[[], dict[str, Any]]]:
    s = BREAKS_SIZES[size]
    batch = batch or s["batch"]
    seq = seq or s["seq"]
    torch.manual_seed(0)
    model = BreaksLM(s["d"], s["heads"], s["vocab"]).to(device=device, dtype=dtype)
    model.train(train)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s["vocab"], (batch, seq), generator=gen).to(device)
    if train:
        return model, lambda: {"input_ids": ids, "labels": ids}
    return model, lambda: {"input_ids": ids}


def build_parallel(g: int, size: str, device: str, dtype: Any
                   ) -> tuple[list[nn.Module], torch.Tensor]:
    """G independent blocks, each a different graph (activation and MLP width vary)."""
    s = PARALLEL_SIZES[size]
    torch.manual_seed(0)
    blocks = [Block(s["d"], s["heads"], 2 + (k // len(ACTS)) % 3, ACTS[k % len(ACTS)])
              .to(device=device, dtype=dtype).eval() for k in range(g)]
    x = torch.randn(s["batch"], s["seq"], s["d"], generator=torch.Generator().manual_seed(1))
    return blocks, x.to(device=device, dtype=dtype)
