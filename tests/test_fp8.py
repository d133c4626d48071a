"""`quantization="fp8"`: float8 weights with per-channel scales and per-token activation scales."""

from __future__ import annotations

import random

import torch

from phi4 import LLM, SamplingParams
from phi4.model.fp8 import FP8_MAX, Fp8Weight, fp8_linear, quantize_activations


def test_weights_round_trip_within_float8_precision() -> None:
    weight = torch.randn(384, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 384)[:, None]
    packed = Fp8Weight.quantize(weight)
    assert packed.values.dtype == torch.float8_e4m3fn and packed.scale.shape == (384,)
    assert float(packed.values.float().abs().amax(dim=1).min()) == FP8_MAX  # each channel uses the full range
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative; subnormals step by 2^-9 of the scale.
    error = (packed.dequantize() - weight).abs()
    assert bool((error <= weight.abs() * 2**-4 + packed.scale[:, None] * 2**-9 + 1e-12).all())


def test_fp8_products_track_the_float_ones_and_do_not_depend_on_the_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    weight, x = torch.randn(896, 256, generator=generator), torch.randn(40, 256, generator=generator)
    packed = Fp8Weight.quantize(weight)
    out = fp8_linear(x, packed, batch_invariant=True)
    reference = x @ weight.t()
    assert float((out - reference).abs().max() / reference.abs().max()) < 0.05
    assert all(torch.equal(fp8_linear(x[:m], packed, True)[0], out[0]) for m in (1, 2, 5, 9, 17))
    values, scale = quantize_activations(x)
    assert torch.allclose(values.float() * scale[:, None], x, rtol=2**-4, atol=1e-6)


def test_an_fp8_engine_generates_close_to_the_float_one(demo_dir) -> None:  # type: ignore[no-untyped-def]
    reference = LLM("demo", enable_prefix_caching=False)
    quantized = LLM("demo", enable_prefix_caching=False, quantization="fp8")
    rng = random.Random(0)
    kls = []
    for _ in range(8):
        prompt = [rng.randrange(100, 100_000) for _ in range(rng.randint(8, 40))]
        log_p = torch.log_softmax(reference.engine.prompt_logits(prompt)[-1], -1)
        log_q = torch.log_softmax(quantized.engine.prompt_logits(prompt)[-1], -1)
        kls.append(float((log_p.exp() * (log_p - log_q)).sum()))
    assert 0.0 < sum(kls) / len(kls) < 0.5  # measured ~0.1 on the demo's sharp random logits
    result = quantized.generate("Hello", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert len(result.token_ids) == 12
    layer = quantized.engine.model.model.layers[0]
    assert layer.mlp.gate_up_proj.fp8 is not None and layer.mlp.gate_up_proj.weight.numel() == 0
