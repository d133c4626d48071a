"""The demo checkpoint's tokenizer is Phi-4's: proven against tiktoken and transformers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

from phi4.demo import asset_path
from phi4.tokenizer import IncrementalDetokenizer, Tokenizer

# tiktoken's own cl100k_base split pattern (tiktoken_ext.openai_public), not the one phi4 writes.
TIKTOKEN_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
ADDED_TOKENS: dict[str, int] = json.loads(asset_path("phi-4", "added_tokens.json").read_text())

CODE = [
    "def main(argv: list[str]) -> int:\n    return 0\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "const f = async (x) => { await fetch(`/api/${x}`); };",
    '{"key": [1, 2.5, -3e10, null, true], "nested": {"a": "b"}}',
    "<div class=\"x\">&nbsp;&lt;tag&gt;</div>",
    "SELECT a.id, COUNT(*) FROM t a JOIN u ON a.id = u.id WHERE x >= 10;",
    "    if x:\n\t\treturn y  # comment\r\n",
    "#include <stdio.h>\nint main(){printf(\"%d\\n\", 42);}",
    "fn main() { let v: Vec<u8> = vec![0xff; 16]; println!(\"{:?}\", v); }",
    "$ ls -la | grep '^d' && echo \"done\" > /dev/null 2>&1",
]
SCRIPTS = [
    "naïve café déjà vu, Übermäßig große Straße", "Привет, как дела? Съешь же ещё этих мягких булок",
    "Γειά σου Κόσμε", "مرحبا بالعالم، كيف حالك؟", "שלום עולם", "नमस्ते दुनिया, आप कैसे हैं?",
    "你好，世界！今天天气很好。", "こんにちは世界、カタカナとひらがな", "안녕하세요 세계", "สวัสดีชาวโลก",
    "გამარჯობა მსოფლიო", "Բարեւ աշխարհ", "Xin chào thế giới", "Witaj świecie, zażółć gęślą jaźń",
    "Merhaba dünya, ığüşöç", "ሰላም ልዑል", "ᚠᛇᚻ᛫ᛒᛦᚦ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∀x∈ℝ: x²≥0",
]
EMOJI = ["🤖", "👩‍👩‍👧‍👦", "🇫🇷🇯🇵", "👍🏽", "❤️‍🔥", "😀😃😄😁", "🧑🏿‍🚀", "✨🎉🎊", "🏳️‍🌈", "1️⃣#️⃣"]
WHITESPACE = [" ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2003",
              " \t \n\n  ", "\n    \n"]
WORDS = ["hello", "world", "It's", "they'LL", "I'M", "we've", "you'd", "DON'T", "token", "izer", "Phi-4", "GPT",
         "e.g.", "U.S.A.", "x=y+z", "...", "!!!", "???", "--", "__init__", "snake_case", "CamelCase", "ALLCAPS"]


def random_number(rng: random.Random) -> str:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
    return rng.choice([digits, f"{digits}.{rng.randint(0, 99999)}", f"-{digits}", f"{int(digits):,}", f"{digits}e-7"])


def special_token_strings() -> list[str]:
    # Phi-4's added tokens have lstrip/rstrip set, so they absorb neighbouring whitespace (tested separately);
    # here they sit between non-space characters, where tiktoken and HF must agree exactly.
    return [f"a{token}b" for token in ADDED_TOKENS] + ["".join(ADDED_TOKENS)]


def corpus(size: int = 2400, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    fragments = [CODE, SCRIPTS, EMOJI, WHITESPACE, WORDS]
    strings = special_token_strings() + CODE + SCRIPTS + EMOJI + WHITESPACE
    while len(strings) < size:
        parts = []
        for _ in range(rng.randint(1, 6)):
            kind = rng.randrange(7)
            if kind < 5:
                parts.append(rng.choice(fragments[kind]))
            elif kind == 5:
                parts.append(random_number(rng))
            else:
                parts.append("".join(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0xD7FF),
                                                     rng.randint(0xE000, 0x10FFFF)])) for _ in range(rng.randint(1, 8))))
        strings.append(rng.choice(["", " ", "\n", "", "\t"]).join(parts))
    return strings


@pytest.fixture(scope="module")
def tokenizer(demo_dir: Path) -> Tokenizer:
    return Tokenizer(demo_dir)


@pytest.fixture(scope="module")
def reference_encoding() -> tiktoken.Encoding:
    ranks = tiktoken.load.load_tiktoken_bpe(str(asset_path("phi-4", "cl100k_base.tiktoken")))
    return tiktoken.Encoding("phi4_cl100k", pat_str=TIKTOKEN_CL100K_PATTERN, mergeable_ranks=ranks,
                             special_tokens=ADDED_TOKENS)


def test_vocabulary_and_special_tokens_are_phi4s(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 100352
    assert len(tokenizer.special_token_ids) == 96 and min(tokenizer.special_token_ids) == 100256
    assert tokenizer.eos_token_ids == (100265,)
    assert tokenizer.token_to_id("<|im_start|>") == 100264 and tokenizer.token_to_id("<|im_sep|>") == 100266
    assert tokenizer.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                        "pad_token": "<|dummy_85|>"}


def test_ids_equal_tiktoken_on_a_varied_corpus(tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding) -> None:
    strings = corpus()
    assert len(strings) >= 2000
    assert all(any(token in s for s in strings) for token in ADDED_TOKENS), "every special token is covered"
    mismatches = [s for s, ids in zip(strings, tokenizer.encode_batch(strings))
                  if ids != reference_encoding.encode(s, allowed_special="all")]
    assert not mismatches, f"{len(mismatches)} strings differ, first: {mismatches[0]!r}"


def test_decode_inverts_encode(tokenizer: Tokenizer) -> None:
    for s in corpus():
        assert tokenizer.decode(tokenizer.encode(s)) == s


def test_special_tokens_absorb_surrounding_whitespace_like_phi4(tokenizer: Tokenizer) -> None:
    # Phi-4 marks every added token lstrip/rstrip: the spaces around it are not tokens of their own.
    assert tokenizer.encode("a <|im_end|> b") == tokenizer.encode("a<|im_end|>b")
    assert tokenizer.encode("<|im_start|>user<|im_sep|>Hi<|im_end|>") == [100264, 882, 100266, 13347, 100265]


CONVERSATIONS = [
    [{"role": "user", "content": "Explain quantum entanglement in one sentence."}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Écris un haïku 🌸\n\nwith two lines"},
    ],
    [{"role": "user", "content": ""}],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(
    tokenizer: Tokenizer, demo_dir: Path, conversation: list[dict], add_generation_prompt: bool
) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(demo_dir)
    expected_text = reference.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == expected_text
    expected_ids = reference.apply_chat_template(conversation, tokenize=True,
                                                 add_generation_prompt=add_generation_prompt)
    if isinstance(expected_ids, dict) or hasattr(expected_ids, "input_ids"):
        expected_ids = expected_ids["input_ids"]
    assert tokenizer.encode(text) == list(expected_ids)


def test_chat_template_output_is_phi4s_format(tokenizer: Tokenizer) -> None:
    text = tokenizer.apply_chat_template(CONVERSATIONS[1])
    assert text == ("<|im_start|>system<|im_sep|>You are a helpful assistant.<|im_end|>"
                    "<|im_start|>user<|im_sep|>2+2?<|im_end|><|im_start|>assistant<|im_sep|>")


def stream_pieces(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    return [detokenizer.push([t]) for t in ids] + [detokenizer.flush()]


def test_streamed_pieces_concatenate_to_the_full_decode(tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    specials = sorted(tokenizer.special_token_ids)
    for _ in range(300):
        # Random ids, byte tokens included (ids < 256 are single bytes, often half a UTF-8 character).
        ids = [rng.choice([rng.randrange(256), rng.randrange(100256), rng.choice(specials)])
               for _ in range(rng.randint(1, 40))]
        for skip in (False, True):
            assert "".join(stream_pieces(tokenizer, ids, skip)) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_streaming_never_emits_half_a_character(tokenizer: Tokenizer) -> None:
    for text in EMOJI + SCRIPTS:
        ids = tokenizer.encode(text)
        pieces = stream_pieces(tokenizer, ids, skip_special_tokens=True)
        assert "".join(pieces) == text
        assert not any("\ufffd" in piece for piece in pieces)
    # An emoji whose 4 bytes arrive as 4 single-byte tokens comes out whole, once, at the last byte.
    detokenizer = IncrementalDetokenizer(tokenizer)
    robot = "🤖".encode()
    byte_token = {tokenizer.token_bytes[i]: i for i in range(256)}
    pieces = [detokenizer.push([byte_token[bytes([b])]]) for b in robot]
    assert pieces == ["", "", "", "🤖"]
