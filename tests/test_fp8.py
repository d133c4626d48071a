"""`quantization="fp8"`: float8 weights with per-channel scales and per-token activation scales."""

from __future__ import annotations

import random

import torch

from phi4 import LLM, SamplingParams
from phi4.model.cpu_kernels import PackedWeight, linear
from phi4.model.fp8 import FP8_MAX, Fp8Weight, quantize_activations


def test_weights_round_trip_within_float8_precision() -> None:
    weight = torch.randn(384, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 384)[:, None]
    packed = Fp8Weight.quantize(weight)
    assert packed.values.dtype == torch.float8_e4m3fn and packed.scale.shape == (384,)
    assert float(packed.values.float().abs().amax(dim=1).min()) == FP8_MAX  # each channel uses the full range
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative; subnormals step by 2^-9 of the scale.
    error = (packed.dequantize() - weight).abs()
    assert bool((error <= weight.abs() * 2**-4 + packed.scale[:, None] * 2**-9 + 1e-12).all())


def fp8_product(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """What the CPU model computes for a float8 projection: per-token activation scales, float8 weights."""
    values, scale = quantize_activations(x)
    return linear(values.float(), weight, scale)


def test_fp8_products_track_the_float_ones_and_do_not_depend_on_the_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    weight, x = torch.randn(896, 256, generator=generator), torch.randn(40, 256, generator=generator)
    quantized = Fp8Weight.quantize(weight)
    packed = PackedWeight.pack(quantized.values, quantized.scale)
    out = fp8_product(x, packed)
    values, scale = quantize_activations(x)
    # exactly _scaled_mm's arithmetic: float8 x float8 products summed in float32, then both scales
    expected = (values.double() @ quantized.values.double().t()) * scale.double()[:, None] * quantized.scale[None, :]
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-4)
    reference = x @ weight.t()
    assert float((out - reference).abs().max() / reference.abs().max()) < 0.05
    assert all(torch.equal(fp8_product(x[:m], packed)[0], out[0]) for m in (1, 2, 5, 9, 17))
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
    assert layer.mlp.gate_up_proj.packed.dtype == torch.float8_e4m3fn  # the kernel reads the float8 bytes
    assert layer.mlp.gate_up_proj.weight.numel() == 0


def test_a_prequantized_compressed_tensors_checkpoint_loads_as_its_own_float8_weights(tmp_path) -> None:  # noqa: ANN001
    """`phi4 demo-model DIR --fp8` writes the layout published fp8 checkpoints use; loading it gives exactly
    what quantizing the bf16 demo at load time gives, from half the bytes on disk."""
    import json

    from phi4.cli import main
    from phi4.model.fp8 import FP8
    from safetensors import safe_open

    plain, packed = tmp_path / "bf16", tmp_path / "fp8"
    assert main(["demo-model", str(plain)]) == 0 and main(["demo-model", str(packed), "--fp8"]) == 0
    config = json.loads((packed / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    with safe_open(str(packed / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == FP8
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight_scale").shape[1] == 1
        assert handle.get_tensor("lm_head.weight").dtype == torch.bfloat16
    checkpoint_bytes = [sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (plain, packed)]
    assert checkpoint_bytes[1] < checkpoint_bytes[0]
    prompts = [[100 + i for i in range(20)], [5000, 6000, 7000]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    on_the_fly = LLM(str(plain), quantization="fp8", enable_prefix_caching=False)
    prequantized = LLM(str(packed), enable_prefix_caching=False)  # fp8 without being asked: the checkpoint says so
    assert prequantized.engine.model.model.layers[0].mlp.down_proj.packed.dtype == torch.float8_e4m3fn
    assert [(r.token_ids, r.logprobs) for r in prequantized.generate(prompts, params)] == \
        [(r.token_ids, r.logprobs) for r in on_the_fly.generate(prompts, params)]


def test_an_unsupported_quantization_config_is_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    import json

    import pytest

    from phi4.cli import main
    from phi4.errors import CheckpointError

    directory = tmp_path / "awq"
    assert main(["demo-model", str(directory)]) == 0
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="awq"):
        LLM(str(directory))
