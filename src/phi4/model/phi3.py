"""Phi3ForCausalLM over a flat batch of tokens from many sequences.

Parameter names mirror the Hugging Face checkpoint (`model.layers.N.self_attn.qkv_proj.weight`, ...), so the
loader copies tensors by name. Fused projections stay fused as stored: one matmul for q, k and v, one for
gate and up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Union

import torch
import torch.nn.functional as F
from torch import nn

from phi4.config import ModelConfig
from phi4.model import batch_invariant as batch_invariant_ops
from phi4.model.attention import AttentionMetadata, TiledPagedAttention, TorchPagedAttention
from phi4.model.fp8 import Fp8Weight, fp8_linear
from phi4.model.layers import RotaryEmbedding, add_rms_norm, silu_and_mul

if TYPE_CHECKING:
    from phi4.model.triton_attention import TritonPagedAttention


AttentionBackend = Union[TorchPagedAttention, TiledPagedAttention, "TritonPagedAttention"]


def make_attention(name: str, device: torch.device, batch_invariant: bool, config: ModelConfig) -> AttentionBackend:
    """auto: the Triton kernels on CUDA (batch-invariant by construction), else tiled or SDPA on CPU."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "tiled" if batch_invariant else "torch"
    shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    if name == "triton":
        from phi4.model.triton_attention import TritonPagedAttention  # Triton is needed only here

        return TritonPagedAttention(*shape)
    if name == "tiled":
        return TiledPagedAttention(*shape)
    if name == "torch":
        return TorchPagedAttention(*shape)
    raise ValueError(f"unknown attention backend {name!r}; use auto, triton, tiled or torch")


def _weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Norm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = _weight(size)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = _weight(out_features, in_features)
        self.fp8: Fp8Weight | None = None  # set by prepare(quantization="fp8"), which then drops `weight`


class Embedding(nn.Module):
    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.weight = _weight(rows, dim)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.qkv_proj = Linear(config.hidden_size, config.q_size + 2 * config.kv_size)
        self.o_proj = Linear(config.q_size, config.hidden_size)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = Norm(config.hidden_size)
        self.self_attn = SelfAttention(config)
        self.post_attention_layernorm = Norm(config.hidden_size)
        self.mlp = MLP(config)


class Phi3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Norm(config.hidden_size)


class Phi3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.attention: AttentionBackend | None = None
        self.rotary: RotaryEmbedding | None = None
        self.lm_head_weight: torch.Tensor | None = None
        self._lm_head_out_major: torch.Tensor | None = None
        self._linear = F.linear
        self._add_rms_norm = add_rms_norm
        self._silu_and_mul = silu_and_mul
        self._rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda x, rows: x
        self.batch_invariant = False

    def prepare(self, batch_invariant: bool = True, quantization: str | None = None,
                attention_backend: str = "auto") -> None:
        """Build what depends on the final device and dtype; call once the weights are loaded.

        `batch_invariant` computes every token in an order that does not depend on the batch (see
        model/batch_invariant.py); off, the fastest kernels run, and a token's last bits may change with
        the batch it shares.
        """
        config = self.config
        embedding = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config, embedding.device, embedding.dtype)
        self.batch_invariant = batch_invariant
        self._linear = batch_invariant_ops.linear if batch_invariant else F.linear
        self._add_rms_norm, self._silu_and_mul, self._rotate = add_rms_norm, silu_and_mul, self.rotary.apply
        if embedding.device.type == "cuda":
            self._use_triton_ops(batch_invariant)
        self.attention = make_attention(attention_backend, embedding.device, batch_invariant, config)
        if quantization not in (None, "fp8"):
            raise ValueError(f"unknown quantization {quantization!r}; phi4 knows fp8")
        if quantization == "fp8":
            for layer in self.model.layers:
                for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                               layer.mlp.down_proj):
                    if module.fp8 is not None:
                        continue  # loaded as float8 from a pre-quantized checkpoint
                    module.fp8 = Fp8Weight.quantize(module.weight)
                    module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)
        head = embedding if config.tie_word_embeddings else self.lm_head.weight
        self.lm_head_weight = head.detach()  # a plain tensor: not a second registered parameter
        self._lm_head_out_major = head.detach().contiguous()
        if embedding.device.type == "cpu":
            # On CPU, decode is bound by MKL's fp32 kernels, whose speed depends on the weight layout. A
            # matrix-vector product reads weights stored [in, out] about 3x faster than the checkpoint's
            # [out, in], so every weight becomes a transposed view of a transposed copy (same values and
            # shapes; F.linear takes the fast path). For the LM head with 2-16 rows, W @ x^T over the
            # original layout is faster still, so the head keeps both layouts (measured: 100k x 256 head,
            # 4.8 ms at 1 row instead of 12.5; 4-7 ms at 2-8 rows instead of 15-26).
            for module in self.modules():
                if isinstance(module, Linear) and module.fp8 is None:
                    module.weight = nn.Parameter(module.weight.t().contiguous().t(), requires_grad=False)
            if not batch_invariant:  # the batch-invariant head reads only the original layout
                self.lm_head_weight = head.detach().t().contiguous().t()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        rope_rows: torch.Tensor,  # [T] row of the rotary table: the position, offset for LongRoPE's long half
        kv_caches: torch.Tensor,  # [layers, 2, num_slots, kv_heads, head_dim]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] (normalised); `compute_logits` turns selected rows into logits."""
        config, rotary, attention, project = self.config, self.rotary, self.attention, self._project
        assert rotary is not None and attention is not None, "call prepare() after loading weights"
        norm, rotate = self._add_rms_norm, self._rotate
        eps = config.rms_norm_eps
        num_tokens = input_ids.shape[0]
        hidden = F.embedding(input_ids, self.model.embed_tokens.weight)
        residual: torch.Tensor | None = None  # the running sum of the residual stream
        for index, layer in enumerate(self.model.layers):
            attn_in, residual = norm(hidden, residual, layer.input_layernorm.weight, eps)
            qkv = project(attn_in, layer.self_attn.qkv_proj)
            q, k, v = qkv.split([config.q_size, config.kv_size, config.kv_size], dim=-1)
            q = rotate(q.reshape(num_tokens, config.num_attention_heads, config.head_dim), rope_rows)
            k = rotate(k.reshape(num_tokens, config.num_key_value_heads, config.head_dim), rope_rows)
            v = v.reshape(num_tokens, config.num_key_value_heads, config.head_dim)
            attn = attention.forward(q, k, v, kv_caches[index, 0], kv_caches[index, 1], metadata)
            hidden = project(attn.view(num_tokens, config.q_size), layer.self_attn.o_proj)
            mlp_in, residual = norm(hidden, residual, layer.post_attention_layernorm.weight, eps)
            hidden = project(self._silu_and_mul(project(mlp_in, layer.mlp.gate_up_proj)), layer.mlp.down_proj)
        return norm(hidden, residual, self.model.norm.weight, eps)[0]

    def _use_triton_ops(self, batch_invariant: bool) -> None:
        """On CUDA: fused row-wise kernels, and Triton's batch-invariant matmul unless speed is asked for."""
        from phi4.model import triton_ops  # Triton is needed only here

        rotary = self.rotary
        assert rotary is not None
        self._add_rms_norm, self._silu_and_mul = triton_ops.add_rms_norm, triton_ops.silu_and_mul
        self._rotate = lambda x, rows: triton_ops.rotary(x, rotary.cos, rotary.sin, rows)
        self._linear = triton_ops.matmul if batch_invariant else F.linear

    def _project(self, x: torch.Tensor, module: Linear) -> torch.Tensor:
        if module.fp8 is not None:
            return fp8_linear(x, module.fp8, self.batch_invariant)
        return self._linear(x, module.weight)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self._lm_head_out_major is not None and self.lm_head_weight is not None
        if self.batch_invariant:
            if hidden.device.type == "cuda":
                return self._linear(hidden, self._lm_head_out_major).float()
            return batch_invariant_ops.lm_head(hidden, self._lm_head_out_major).float()
        if hidden.device.type == "cpu" and hidden.shape[0] > 1:
            return torch.mm(self._lm_head_out_major, hidden.t()).t().float()
        return F.linear(hidden, self.lm_head_weight).float()
