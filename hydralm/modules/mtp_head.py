"""Multi-token prediction head (DeepSeek-V3 style), sized to stay under 1% of the model.

Module k (1-based) at position i combines RMSNorm(h^{k-1}_i) with RMSNorm(embed(x_{i+k})) and predicts
x_{i+k+1} through the shared LM head; h^0 is the backbone's last hidden state. DeepSeek-V3 puts a full
Transformer block in each module; here each module is a residual SwiGLU bottleneck of width d_model / 4
(5 d^2 / 4 parameters), which keeps two modules under 1% of the `160m` preset and makes every module
token-local: drafting from a decode state needs only the last hidden state, never a KV cache.
"""

from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.kernels.cross_entropy import linear_cross_entropy
from hydralm.modules.linear import BlockIO, Linear
from hydralm.modules.rmsnorm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, d_model: int, eps: float):
        super().__init__()
        rank = max(1, d_model // 4)
        self.hidden_norm = RMSNorm(d_model, eps)
        self.embed_norm = RMSNorm(d_model, eps)
        self.gate_up = Linear(2 * d_model, 2 * rank, bias=False)
        self.down = Linear(rank, d_model, bias=False)
        self.down.residual_out = True
        self.out_norm = RMSNorm(d_model, eps)  # before the shared LM head

    def forward(self, hidden: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.hidden_norm(hidden), self.embed_norm(token_embedding)], dim=-1)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return hidden + self.down(F.silu(gate) * up)


class MTPHead(nn.Module):
    def __init__(self, d_model: int, depth: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(MTPModule(d_model, eps) for _ in range(depth))

    def forward(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, embed: nn.Embedding, lm_head: Callable
    ) -> List[torch.Tensor]:
        """Training form. hidden (B, N, d); returns logits of module k as (B, N - k, V): row i predicts
        x_{i+k+1} (the last row of each looks past the sequence end and has no target)."""
        return [lm_head(features) for features in self.head_inputs(hidden, input_ids, embed)]

    def head_inputs(self, hidden: torch.Tensor, input_ids: torch.Tensor, embed: nn.Embedding) -> List[torch.Tensor]:
        """What each module feeds the shared LM head: (B, N - k, d) for module k (``forward`` without the head,
        so the loss can skip the logits)."""
        features, h = [], hidden
        N = hidden.shape[1]
        for k, layer in enumerate(self.layers, start=1):
            h = layer(h[:, : N - k], embed(input_ids[:, k:]))
            features.append(layer.out_norm(h))
        return features

    def draft_step(
        self, k: int, hidden: torch.Tensor, token: torch.Tensor, embed: nn.Embedding, lm_head: nn.Linear
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode form of module k (1-based): hidden (B, d) = h^{k-1} at the last position, token (B,) the
        token k ahead of it. Returns (h^k, logits (B, V) for the token k + 1 ahead): lm_head(out_norm(h^k)), one
        GEMV with the norm folded in where decode projections fold (hydralm/modules/linear.py)."""
        layer = self.layers[k - 1]
        h = layer(hidden, embed(token))
        return h, BlockIO(layer.out_norm).project_in(lm_head, h)


def mtp_loss(mtp_logits: List[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean over modules of the token CE. labels (B, N) aligned with the main logits (labels[:, t] is the
    token after t, -100 = no loss), so module k's row i targets labels[:, i + k]."""
    losses = []
    for k, logits in enumerate(mtp_logits, start=1):
        target = labels[:, k:].flatten()
        # sum / count (not mean): no NaN and no host sync when a batch has no targets for module k
        total = F.cross_entropy(logits.flatten(0, 1).float(), target, ignore_index=-100, reduction="sum")
        losses.append(total / (target != -100).sum().clamp(min=1))
    return torch.stack(losses).mean()


def mtp_linear_loss(head_inputs: List[torch.Tensor], head_weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``mtp_loss`` from the LM head's inputs (``MTPHead.head_inputs``) and weight, without any (B, N, V)
    logits: each module's CE runs through the chunked linear + cross-entropy."""
    losses = [
        linear_cross_entropy(features, head_weight, labels[:, k:]) for k, features in enumerate(head_inputs, start=1)
    ]
    return torch.stack(losses).mean()
