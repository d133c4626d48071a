"""The demo checkpoint, the `--model` resolution and the loader's errors."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from phi4 import LLM, CheckpointError, ModelNotFoundError, SamplingParams
from phi4.cli import main as cli_main
from phi4.demo import cache_dir
from phi4.model.loader import load_model, resolve_checkpoint

HF_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json"}


def test_demo_checkpoint_has_phi4s_layout_scaled_down(demo_dir: Path) -> None:
    assert HF_FILES | {"model.safetensors"} <= {p.name for p in demo_dir.iterdir()}
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert (config["vocab_size"], config["max_position_embeddings"], config["rope_theta"]) == (100352, 16384, 250000)
    assert config["num_attention_heads"] // config["num_key_value_heads"] == 4  # Phi-4's GQA ratio
    assert config["intermediate_size"] == 3.5 * config["hidden_size"]
    weights = load_file(demo_dir / "model.safetensors")
    assert weights["model.layers.0.self_attn.qkv_proj.weight"].shape == (256 + 2 * 64, 256)
    assert weights["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 896, 256)
    assert weights["lm_head.weight"].shape == (100352, 256)


def test_demo_is_built_once_into_the_cache(demo_dir: Path, phi4_cache: Path) -> None:
    assert demo_dir.parent == phi4_cache
    stamp = (demo_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_checkpoint("demo") == demo_dir
    assert (demo_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_cache_dir_respects_phi4_cache_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PHI4_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("PHI4_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "phi4"


def test_demo_weights_are_deterministic(demo_dir: Path, tmp_path: Path) -> None:
    assert cli_main(["demo-model", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (demo_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (demo_dir / "tokenizer.json").read_bytes()


def test_sharded_checkpoint_loads_and_generates_the_same(demo_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    assert cli_main(["demo-model", str(sharded), "--shards", "3"]) == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (sharded / "model.safetensors").exists()
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    one = LLM(str(demo_dir)).generate("Shards or not", params)[0]
    three = LLM(str(sharded)).generate("Shards or not", params)[0]
    assert one.token_ids == three.token_ids


@pytest.fixture()
def checkpoint_copy(demo_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(demo_dir, target)
    return target


def _load(directory: Path) -> None:
    load_model(directory, torch.device("cpu"), torch.float32)


def test_missing_config_is_named(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        _load(checkpoint_copy)


def test_malformed_config_is_named(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        _load(checkpoint_copy)


def test_another_architecture_is_refused(checkpoint_copy: Path) -> None:
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM.*not supported"):
        _load(checkpoint_copy)


def test_shape_mismatch_names_the_tensor(checkpoint_copy: Path) -> None:
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["intermediate_size"] = 1024
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape \[\d+, \d+\], config.json implies"):
        _load(checkpoint_copy)


def test_missing_tensor_is_named(checkpoint_copy: Path) -> None:
    weights = load_file(checkpoint_copy / "model.safetensors")
    del weights["model.layers.2.mlp.down_proj.weight"]
    save_file(weights, checkpoint_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing.*model.layers.2.mlp.down_proj.weight"):
        _load(checkpoint_copy)


def test_corrupt_weights_file_is_named(checkpoint_copy: Path) -> None:
    path = checkpoint_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        _load(checkpoint_copy)


def test_pickle_weights_are_never_loaded(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "model.safetensors").unlink()
    (checkpoint_copy / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        _load(checkpoint_copy)


def test_index_naming_a_missing_shard_is_named(checkpoint_copy: Path) -> None:
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        _load(checkpoint_copy)


def test_hub_id_offline_fails_at_once_with_advice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="local directory"):
        resolve_checkpoint("microsoft/phi-4")
    assert time.monotonic() - start < 10


def test_unknown_model_name_is_refused() -> None:
    with pytest.raises(ModelNotFoundError, match="neither an existing directory"):
        resolve_checkpoint("no such model")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_checkpoint(os.devnull)
