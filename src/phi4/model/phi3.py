"""Phi3ForCausalLM over a flat batch of tokens from many sequences.

Parameter names mirror the Hugging Face checkpoint (`model.layers.N.self_attn.qkv_proj.weight`, ...), so the
loader copies tensors by name. Fused projections stay fused as stored: one matmul for q, k and v, one for
gate and up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from phi4.config import ModelConfig
from phi4.model import cpu_kernels
from phi4.model.attention import AttentionMetadata, CpuPagedAttention, TorchPagedAttention
from phi4.model.fp8 import Fp8Weight, fp8_linear, quantize_activations
from phi4.model.layers import RotaryEmbedding, add_rms_norm, silu_and_mul

if TYPE_CHECKING:
    from phi4.model.triton_attention import TritonPagedAttention


AttentionBackend = Union[TorchPagedAttention, CpuPagedAttention, "TritonPagedAttention"]


def make_attention(name: str, device: torch.device, config: ModelConfig, rotary: RotaryEmbedding) -> AttentionBackend:
    """auto: the Triton kernels on CUDA, phi4's own kernel on CPU (both batch-invariant by construction)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    if name == "triton":
        from phi4.model.triton_attention import TritonPagedAttention  # Triton is needed only here

        return TritonPagedAttention(*shape)
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError("the cpu attention backend runs on the CPU only")
        return CpuPagedAttention(*shape, rotary)
    if name == "torch":
        return TorchPagedAttention(*shape)
    raise ValueError(f"unknown attention backend {name!r}; use auto, triton, cpu or torch")


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
        # on CPU: the weight as phi4's kernels read it (the other forms are dropped)
        self.packed: cpu_kernels.PackedWeight | None = None


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
        self.batch_invariant = False
        self.compute_dtype = torch.float32  # activations and KV cache; weights may be stored narrower
        # The kernels, chosen by prepare() for the device: the model below reads the same on every one.
        self._embed: Callable[[torch.Tensor], torch.Tensor] = \
            lambda ids: F.embedding(ids, self.model.embed_tokens.weight)
        self._project: Callable[[torch.Tensor, Linear], torch.Tensor] = self._project_dense
        self._linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear
        self._lm_head: Callable[[torch.Tensor], torch.Tensor] = lambda hidden: hidden
        self._add_rms_norm = add_rms_norm
        self._silu_and_mul = silu_and_mul
        self._rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda x, rows: x
        self._attend: Callable[..., torch.Tensor] = self._rotate_and_attend
        self._packed_head: cpu_kernels.PackedWeight | None = None
        self._decoder: cpu_kernels.DecoderStack | None = None  # on CPU: every layer in one kernel call

    def prepare(self, batch_invariant: bool = True, quantization: str | None = None,
                attention_backend: str = "auto") -> None:
        """Build what depends on the final device and dtype; call once the weights are loaded.

        `batch_invariant` computes every token in an order that does not depend on the batch; off, the
        fastest kernels run, and a token's last bits may change with the batch it shares. On CPU phi4's own
        kernels are both (model/cpu_kernels.c), so there it changes nothing.
        """
        config = self.config
        embedding = self.model.embed_tokens.weight
        device = embedding.device
        self.compute_dtype = embedding.dtype if device.type == "cuda" else torch.float32
        self.rotary = RotaryEmbedding(config, device, self.compute_dtype)
        self.batch_invariant = batch_invariant
        self._add_rms_norm, self._silu_and_mul, self._rotate = add_rms_norm, silu_and_mul, self.rotary.apply
        self.attention = make_attention(attention_backend, device, config, self.rotary)
        if quantization not in (None, "fp8"):
            raise ValueError(f"unknown quantization {quantization!r}; phi4 knows fp8")
        if quantization == "fp8":
            for module in self._projections():
                if module.fp8 is None:  # else loaded as float8 from a pre-quantized checkpoint
                    module.fp8 = Fp8Weight.quantize(module.weight)
                    module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)
        if device.type == "cuda":
            self._use_triton_ops(batch_invariant)
        else:
            self._use_cpu_kernels()

    def _projections(self) -> list[Linear]:
        return [module for layer in self.model.layers for module in (
            layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]

    def _head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def _use_triton_ops(self, batch_invariant: bool) -> None:
        """On CUDA: fused row-wise kernels, and Triton's batch-invariant matmul unless speed is asked for."""
        from phi4.model import triton_ops  # Triton is needed only here

        rotary = self.rotary
        assert rotary is not None
        self._add_rms_norm, self._silu_and_mul = triton_ops.add_rms_norm, triton_ops.silu_and_mul
        self._rotate = lambda x, rows: triton_ops.rotary(x, rotary.cos, rotary.sin, rows)
        product = triton_ops.matmul if batch_invariant else F.linear
        head = self._head_weight().detach().contiguous()  # a plain tensor: not a second parameter
        self._linear = product
        self._lm_head = lambda hidden: product(hidden, head)

    def _use_cpu_kernels(self) -> None:
        """On CPU: phi4's kernels (model/cpu_kernels.c) in float32, every weight packed in its stored precision.

        Norm weights become float32; the embedding table stays as stored (rows are widened as they are
        looked up); a tied head is packed once and the embedding rows read from it.
        """
        for module in self.modules():
            if isinstance(module, Norm):
                module.weight = nn.Parameter(module.weight.detach().float(), requires_grad=False)
        for module in self._projections():
            if module.fp8 is not None:
                module.packed = cpu_kernels.PackedWeight.pack(module.fp8.values, module.fp8.scale)
                module.fp8 = None
            else:
                module.packed = cpu_kernels.PackedWeight.pack(module.weight.detach())
            module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)
        head = self._packed_head = cpu_kernels.PackedWeight.pack(self._head_weight().detach())
        if self.config.tie_word_embeddings:
            self.model.embed_tokens.weight = nn.Parameter(torch.empty(0), requires_grad=False)
            self._embed = head.rows
        else:
            self.lm_head.weight = nn.Parameter(torch.empty(0), requires_grad=False)
            table = self.model.embed_tokens.weight
            self._embed = lambda ids: F.embedding(ids, table).float()
        self._project = self._project_packed
        self._lm_head = lambda hidden: cpu_kernels.linear(hidden, head)
        self._add_rms_norm, self._silu_and_mul = cpu_kernels.add_rms_norm, cpu_kernels.silu_and_mul
        if isinstance(self.attention, CpuPagedAttention):
            self._attend = self.attention.forward_qkv
            if all(module.packed is not None and module.packed.scale is None for module in self._projections()):
                self._decoder = self._decoder_stack()

    def _decoder_stack(self) -> cpu_kernels.DecoderStack:
        config, rotary = self.config, self.rotary
        assert rotary is not None

        def packed(module: Linear) -> cpu_kernels.PackedWeight:
            assert module.packed is not None
            return module.packed

        layers = [cpu_kernels.LayerWeights(
            layer.input_layernorm.weight, layer.post_attention_layernorm.weight, packed(layer.self_attn.qkv_proj),
            packed(layer.self_attn.o_proj), packed(layer.mlp.gate_up_proj), packed(layer.mlp.down_proj))
            for layer in cast(list[DecoderLayer], list(self.model.layers))]
        return cpu_kernels.DecoderStack(
            layers, self.model.norm.weight, intermediate=config.intermediate_size, heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads, head_dim=config.head_dim, rotary_dim=rotary.rotary_dim,
            eps=config.rms_norm_eps, cos=rotary.cos, sin=rotary.sin)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        rope_rows: torch.Tensor,  # [T] row of the rotary table: the position, offset for LongRoPE's long half
        kv_caches: torch.Tensor,  # [layers, 2, num_slots, kv_heads, head_dim]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] (normalised); `compute_logits` turns selected rows into logits."""
        assert self.attention is not None, "call prepare() after loading weights"
        hidden = self._embed(input_ids)
        if self._decoder is not None:
            plan = self.attention.plan_for(metadata, hidden.dtype)
            return self._decoder.forward(hidden.contiguous(), rope_rows, metadata.slot_mapping, kv_caches, plan,
                                         metadata.block_size)
        project, norm, attend = self._project, self._add_rms_norm, self._attend
        eps = self.config.rms_norm_eps
        residual: torch.Tensor | None = None  # the running sum of the residual stream
        for index, layer in enumerate(self.model.layers):
            attn_in, residual = norm(hidden, residual, layer.input_layernorm.weight, eps)
            qkv = project(attn_in, layer.self_attn.qkv_proj)
            attn = attend(qkv, rope_rows, kv_caches[index, 0], kv_caches[index, 1], metadata)
            hidden = project(attn, layer.self_attn.o_proj)
            mlp_in, residual = norm(hidden, residual, layer.post_attention_layernorm.weight, eps)
            hidden = project(self._silu_and_mul(project(mlp_in, layer.mlp.gate_up_proj)), layer.mlp.down_proj)
        return norm(hidden, residual, self.model.norm.weight, eps)[0]

    def _rotate_and_attend(self, qkv: torch.Tensor, rope_rows: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Rotary embedding on q and k, then the attention backend (which writes k and v to the cache)."""
        config, tokens = self.config, qkv.shape[0]
        assert self.attention is not None
        q, k, v = qkv.split([config.q_size, config.kv_size, config.kv_size], dim=-1)
        q = self._rotate(q.reshape(tokens, config.num_attention_heads, config.head_dim), rope_rows)
        k = self._rotate(k.reshape(tokens, config.num_key_value_heads, config.head_dim), rope_rows)
        v = v.reshape(tokens, config.num_key_value_heads, config.head_dim)
        return self.attention.forward(q, k, v, k_cache, v_cache, metadata).view(tokens, config.q_size)

    def _project_dense(self, x: torch.Tensor, module: Linear) -> torch.Tensor:
        if module.fp8 is not None:
            return fp8_linear(x, module.fp8, self.batch_invariant)
        return self._linear(x, module.weight)

    @staticmethod
    def _project_packed(x: torch.Tensor, module: Linear) -> torch.Tensor:
        packed = module.packed
        assert packed is not None
        if packed.scale is not None:  # float8 weights: activations quantized per token, as on a GPU
            values, scale = quantize_activations(x)
            return cpu_kernels.linear(values.float(), packed, scale)
        return cpu_kernels.linear(x, packed)

    def decode_weight_bytes(self) -> int:
        """The weight bytes one decode step reads: every projection and the LM head, as stored in memory
        (embedding rows are negligible)."""
        def stored(module: Linear) -> torch.Tensor:
            if module.packed is not None:
                return module.packed.blocks
            return module.fp8.values if module.fp8 is not None else module.weight

        head = self._packed_head.blocks if self._packed_head is not None else self._head_weight()
        return sum(t.numel() * t.element_size() for t in [head, *map(stored, self._projections())])

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(hidden).float()
