"""Per-step choices of the block-diffusion sampler: which token at each masked position, and
which positions to accept this step.

Semantics follow LLaDA2's ``generate`` (see docs/inference.md): the number of positions a step
must accept is scheduled over the block (``block_size // steps``, the remainder going to the
first steps); a step accepts every still-masked position whose confidence (probability of the
chosen token) exceeds ``threshold`` when there are at least the scheduled number of them,
otherwise exactly the scheduled number of most confident ones.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Knobs of the generation loop (defaults: LLaDA2 / LLaDA2.0-Uni inference)."""

    block_size: int = 32
    steps: int = 32          # refinement forwards per block, at most
    threshold: float = 0.95  # accept every masked position above this confidence
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0       # nucleus sampling when temperature > 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.steps < 1:
            raise ValueError(f"block_size ({self.block_size}) and steps ({self.steps}) must be >= 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def transfer_schedule(block_size: int, steps: int) -> List[int]:
    """How many positions step i must accept: ``block_size`` spread over ``steps``, remainder first."""
    base, remainder = divmod(block_size, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = cumulative > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()  # keep the token that crosses top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_tokens(logits: torch.Tensor, settings: SamplerSettings,
                  generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``logits [n, V]`` (disallowed ids already -inf) -> (tokens [n], confidence [n]).

    Greedy: argmax and its softmax probability. Sampling: temperature, then top-p, then a draw;
    the confidence is the drawn token's probability under that filtered distribution.
    """
    logits = logits.float()
    if settings.temperature == 0:
        probs = torch.softmax(logits, dim=-1)
        confidence, tokens = probs.max(dim=-1)
        return tokens, confidence
    probs = torch.softmax(_top_p_filter(logits / settings.temperature, settings.top_p), dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def accept_positions(confidence: torch.Tensor, pending: torch.Tensor, scheduled: int,
                     threshold: float) -> torch.Tensor:
    """Bool [n]: the pending positions accepted this step (see the module docstring)."""
    confidence = confidence.masked_fill(~pending, float("-inf"))
    confident = pending & (confidence > threshold)
    if int(confident.sum()) >= scheduled:
        return confident
    count = min(scheduled, int(pending.sum()))
    accepted = torch.zeros_like(pending)
    accepted[confidence.topk(count).indices] = True
    return accepted
