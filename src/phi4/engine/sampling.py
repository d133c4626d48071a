"""Turning a batch of logits into next tokens.

Randomness comes from (request seed, output position) alone: each row draws its noise from its own
generator seeded by both, so a request's tokens do not depend on what else shares the batch, or on
whether it was preempted and resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): decorrelated generator seeds for neighbouring positions."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class SamplingRow:
    temperature: float
    top_p: float
    top_k: int
    seed: int
    position: int  # index of the token being sampled among the request's outputs


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """Next token per row of `logits` [B, V] (float32). Temperature 0 is argmax, ties to the lowest id."""
    greedy = logits.argmax(dim=-1)
    if all(row.temperature == 0.0 for row in rows):
        return greedy.tolist()
    device = logits.device
    temperature = torch.tensor([row.temperature or 1.0 for row in rows], device=device)
    scaled = logits / temperature[:, None]
    if any(row.top_k or row.top_p < 1.0 for row in rows):
        scaled = _top_k_top_p(scaled, rows)
    probs = torch.softmax(scaled, dim=-1)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws index i with probability p_i.
    noise = torch.stack([_exponential_noise(row, logits.shape[-1], device) for row in rows])
    sampled = (probs / noise).argmax(dim=-1)
    is_greedy = torch.tensor([row.temperature == 0.0 for row in rows], device=device)
    return torch.where(is_greedy, greedy, sampled).tolist()


def _exponential_noise(row: SamplingRow, vocab_size: int, device: torch.device) -> torch.Tensor:
    if row.temperature == 0.0:
        return torch.ones(vocab_size, device=device)
    generator = torch.Generator(device=device).manual_seed(mix_seed(row.seed, row.position))
    return torch.empty(vocab_size, device=device).exponential_(generator=generator)


def _top_k_top_p(scaled: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    device = scaled.device
    vocab_size = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab_size, device=device)[None, :]
    top_k = torch.tensor([row.top_k or vocab_size for row in rows], device=device)
    drop = ranks >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # top_p: keep the smallest prefix whose probability reaches top_p (the first token always stays).
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = torch.tensor([row.top_p for row in rows], device=device)
    drop = mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
