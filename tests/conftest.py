"""Shared fixtures: the demo checkpoint, a scaled-down Phi-4-mini checkpoint, and the HF reference model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    import openai

from live_server import API_KEY, Server

from phi4.demo import random_phi3_weights, reference_config, write_checkpoint

# A prompt set with different lengths and scripts, used by the equivalence tests.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Explain quantum entanglement in one sentence. " * 6,
    "日本語のテキストと emoji 🤖 mixed with numbers 1234567890.",
]


@pytest.fixture(scope="session", autouse=True)
def phi4_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test builds `--model demo` into one private cache, never the user's."""
    cache = tmp_path_factory.mktemp("phi4-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("PHI4_CACHE", str(cache))
    yield cache
    patch.undo()


@pytest.fixture(scope="session")
def demo_dir(phi4_cache: Path) -> Path:
    from phi4.demo import demo_checkpoint_path

    return demo_checkpoint_path()


def mini_config() -> dict:
    """Phi-4-mini's architecture scaled down: partial rotary 0.75, LongRoPE, tied embeddings.

    The original context is cut to 64 tokens (maximum 2,048, the same ratio of 32) so that tests cross it
    cheaply. LongRoPE's factors are subsampled to the smaller rotary dimension.
    """
    config = reference_config("phi-4-mini-instruct")
    config.update(
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=6,  # head_dim 32, rotary_dim 24: 12 factors
        num_key_value_heads=2,
        vocab_size=100352,  # Phi-4's tokenizer stands in for mini's o200k one
        bos_token_id=100257,
        eos_token_id=100265,
        pad_token_id=100349,
        original_max_position_embeddings=64,
        max_position_embeddings=2048,
        sliding_window=2048,
    )
    config.pop("auto_map", None)
    rope = config["rope_scaling"]
    rope["short_factor"] = rope["short_factor"][::4]
    rope["long_factor"] = rope["long_factor"][::4]
    return config


@pytest.fixture(scope="session")
def mini_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("phi4-mini-scaled")
    config = mini_config()
    write_checkpoint(directory, config, random_phi3_weights(config, seed=1), num_shards=2)
    return directory


def load_reference(directory: Path) -> torch.nn.Module:
    from transformers import Phi3ForCausalLM

    return Phi3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def reference_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate, greedy, not stopping at EOS (as `ignore_eos=True`)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def server(demo_dir: Path) -> Iterator[Server]:
    """One live `phi4 serve --model demo` for every test module that talks HTTP; SIGTERM at the end."""
    instance = Server()
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    import openai  # here, not at the top: the GPU checks run where the server's packages may be missing

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


THINK_IDS = {"<think>": 100350, "</think>": 100351}  # two of Phi-4's dummy tokens, repurposed


@pytest.fixture(scope="session")
def reasoning_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scripted reasoning checkpoint: Phi-4's tokenizer with <think> and </think> as special tokens, a chat
    template that mentions them, and weights whose greedy answer to any chat prompt is exactly
    `<think>Hmm ok</think>Hello!` then end of turn.

    Attention and MLP outputs are zero, so the last hidden state is the last token's embedding; each token of
    the script has a one-hot embedding whose LM-head column points at the next token of the script."""
    from tokenizers import Tokenizer as HFTokenizer

    from phi4.demo import demo_config, phi4_tokenizer_json

    def one_token(text: str) -> int:
        [token] = HFTokenizer.from_str(phi4_tokenizer_json()).encode(text, add_special_tokens=False).ids
        return token

    script = [100266, THINK_IDS["<think>"], one_token("Hmm"), one_token(" ok"), THINK_IDS["</think>"],
              one_token("Hello"), one_token("!"), 100265]  # from <|im_sep|> to <|im_end|>
    directory = tmp_path_factory.mktemp("phi4-reasoning")
    config = {**demo_config(), "_name_or_path": "phi4-reasoning-scripted"}
    weights = random_phi3_weights(config, seed=7)
    for name, tensor in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.zero_()
    weights["model.norm.weight"].fill_(1.0)
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    for dim, (token, successor) in enumerate(zip(script, script[1:])):
        embed[token] = 0.0
        embed[token, dim] = 1.0
        head[successor, dim] = 4.0
    write_checkpoint(directory, config, weights)
    for path in ("tokenizer.json", "tokenizer_config.json"):
        data = json.loads((directory / path).read_text())
        for tag, token_id in THINK_IDS.items():
            token = (next(t for t in data["added_tokens"] if t["id"] == token_id) if path == "tokenizer.json"
                     else data["added_tokens_decoder"][str(token_id)])
            token.update(content=tag, lstrip=False, rstrip=False, special=True)
        if path == "tokenizer_config.json":
            data["chat_template"] = ("{{- '<|im_start|>system<|im_sep|>Think inside <think> and </think>, then "
                                     "answer.<|im_end|>' -}}" + data["chat_template"])
        write_json(directory / path, data)
    return directory
