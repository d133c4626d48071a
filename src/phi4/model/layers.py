"""Building blocks of Phi3ForCausalLM: RMSNorm, rotary embeddings (full, partial, LongRoPE), gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phi4.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The reference's order of operations: normalise in float32, cast back, then scale.
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual): the decoder's residual stream, one norm at a time."""
    summed = x if residual is None else residual + x
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


class RotaryEmbedding:
    """Precomputed cos/sin tables, looked up per token.

    For LongRoPE there are two tables, short factors at rows [0, P) and long factors at rows [P, 2P); the
    runner picks a row per token (`rope_rows`), so one batch can mix sequences on either side of the
    original context.
    """

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.rotary_dim = config.rotary_dim
        self.max_positions = config.max_position_embeddings
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        base = config.rope_theta**exponents
        if config.longrope is None:
            tables = [self._table(1.0 / base, 1.0)]
        else:
            scale = config.longrope.attention_factor
            tables = [
                self._table(1.0 / (torch.tensor(factors, dtype=torch.float32) * base), scale)
                for factors in (config.longrope.short_factor, config.longrope.long_factor)
            ]
        cos, sin = zip(*tables)
        self.cos = torch.cat(cos).to(device=device, dtype=dtype)
        self.sin = torch.cat(sin).to(device=device, dtype=dtype)

    def _table(self, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(self.max_positions, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos() * scale, angles.sin() * scale

    def apply(self, x: torch.Tensor, rope_rows: torch.Tensor) -> torch.Tensor:
        """Rotate the first `rotary_dim` features of x [T, heads, head_dim]; the rest pass through."""
        cos = self.cos[rope_rows].unsqueeze(1)
        sin = self.sin[rope_rows].unsqueeze(1)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated_half * sin
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
