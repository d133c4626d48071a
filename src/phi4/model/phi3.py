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
        self._lm_head_out_major = torch.empty(0)
        self._linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear
        self._lm_head: Callable[[torch.Tensor], torch.Tensor] = lambda hidden: hidden
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
        self._add_rms_norm, self._silu_and_mul, self._rotate = add_rms_norm, silu_and_mul, self.rotary.apply
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
        self._lm_head_out_major = head.detach().contiguous()  # a plain tensor: not a second parameter
        if embedding.device.type == "cuda":
            self._use_triton_ops(batch_invariant)
        elif embedding.dtype == torch.float32:
            self._use_rowwise_kernel(batch_invariant)
        else:
            self._use_padded_blas(batch_invariant)

    def _use_rowwise_kernel(self, batch_invariant: bool) -> None:
        """CPU, float32: phi4's row-wise kernel (model/cpu_kernels.py) on the weights as stored [out, in].

        Batch-invariant, every product runs on it; otherwise it runs up to 16 rows, where it is the fastest
        kernel, and MKL beyond.
        """
        from phi4.model import cpu_kernels

        product = cpu_kernels.rowwise_matmul if batch_invariant else cpu_kernels.fastest_matmul
        head = self._lm_head_out_major
        self._linear = product
        self._lm_head = lambda hidden: product(hidden, head)

    def _use_padded_blas(self, batch_invariant: bool) -> None:
        """CPU in bfloat16 or float16: MKL, with the row-count classes of model/batch_invariant.py.

        A matrix-vector product reads weights stored [in, out] about 3x faster than the checkpoint's
        [out, in], so every weight becomes a transposed view of a transposed copy (same values and
        shapes); the LM head keeps its original layout too, for W @ x^T at 2 rows and more.
        """
        for module in self.modules():
            if isinstance(module, Linear) and module.fp8 is None:
                module.weight = nn.Parameter(module.weight.t().contiguous().t(), requires_grad=False)
        head = self._lm_head_out_major
        if batch_invariant:
            self._linear = batch_invariant_ops.linear
            self._lm_head = lambda hidden: batch_invariant_ops.lm_head(hidden, head)
            return
        head_in_out = head.t().contiguous().t()
        self._linear = F.linear
        self._lm_head = lambda hidden: (torch.mm(head, hidden.t()).t() if hidden.shape[0] > 1
                                        else F.linear(hidden, head_in_out))

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
        product = triton_ops.matmul if batch_invariant else F.linear
        head = self._lm_head_out_major
        self._linear = product
        self._lm_head = lambda hidden: product(hidden, head)

    def _project(self, x: torch.Tensor, module: Linear) -> torch.Tensor:
        if module.fp8 is not None:
            return fp8_linear(x, module.fp8, self.batch_invariant)
        return self._linear(x, module.weight)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(hidden).float()
