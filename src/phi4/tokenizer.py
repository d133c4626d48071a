"""Tokenizer: HF `tokenizers` for ids, jinja2 for the chat template, bytes for streaming text."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from phi4.bpe_conversion import bytes_to_unicode
from phi4.config import read_json
from phi4.errors import CheckpointError, InvalidRequestError


@dataclass(frozen=True)
class ReasoningTags:
    """How a reasoning model (phi-4-reasoning) marks its thinking; `special` when the tags are special tokens."""

    open: str = "<think>"
    close: str = "</think>"
    special: bool = False


class Tokenizer:
    """A checkpoint's tokenizer: `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`."""

    def __init__(self, directory: Path) -> None:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        try:
            self._tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise CheckpointError(f"{path} is not a valid tokenizer.json: {exc}") from exc
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        generation_path = directory / "generation_config.json"
        generation = read_json(generation_path) if generation_path.is_file() else {}

        self.special_tokens: dict[str, str] = {
            key: _token_content(config[key])
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(key)
        }
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        added = self._tokenizer.get_added_tokens_decoder()
        self.special_token_ids = frozenset(index for index, token in added.items() if token.special)
        self.token_bytes = _token_bytes(vocab, added)
        eos_ids = generation.get("eos_token_id")
        if eos_ids is None and "eos_token" in self.special_tokens:
            eos_ids = vocab.get(self.special_tokens["eos_token"])
        self.eos_token_ids: tuple[int, ...] = tuple(
            eos_ids if isinstance(eos_ids, list) else ([] if eos_ids is None else [eos_ids])
        )
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self._compiled_template: jinja2.Template | None = None
        self.reasoning_tags: ReasoningTags | None = None  # a chat template with think tags: a reasoning model
        self.shown_special_ids: frozenset[int] = frozenset()  # special tokens whose text is never skipped
        if template is not None and "<think>" in template and "</think>" in template:
            ids = [vocab.get(tag) for tag in ("<think>", "</think>")]
            self.reasoning_tags = ReasoningTags(special=all(i in self.special_token_ids for i in ids))
            self.shown_special_ids = frozenset(i for i in ids if i is not None)  # the answer is split at them

    # ids <-> text

    def encode(self, text: str) -> list[int]:
        # Phi-4 adds no BOS/EOS around a prompt; special-token text in the input is parsed as special tokens,
        # exactly as transformers does.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    # chat

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render like transformers' `apply_chat_template(..., tokenize=False)`."""
        if self.chat_template is None:
            raise InvalidRequestError("this model has no chat template; use the completions API", "messages")
        if self._compiled_template is None:
            self._compiled_template = _jinja_environment().from_string(self.chat_template)
        try:
            return self._compiled_template.render(
                messages=list(messages),
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
                **template_kwargs,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}", "messages") from exc


def _token_content(value: Any) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


def _token_bytes(vocab: dict[str, int], added: dict[int, Any]) -> list[bytes]:
    """Each id's exact bytes: ByteLevel characters mapped back to bytes, added tokens as UTF-8."""
    byte_decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    table = [b""] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        try:
            table[index] = bytes(byte_decoder[char] for char in token)
        except KeyError:
            table[index] = token.encode("utf-8")
    for index, token in added.items():
        table[index] = token.content.encode("utf-8")
    return table


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _jinja_environment() -> jinja2.Environment:
    # The same environment transformers builds for chat templates, so templates render identically.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces.

    Works on bytes: a token may end inside a UTF-8 character, so pieces are emitted only for complete
    characters, and the pieces concatenate to exactly the full decode (invalid bytes become U+FFFD, as in
    the full decode). Special tokens are dropped when `skip_special_tokens` is set.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._token_bytes = tokenizer.token_bytes
        self._skipped = tokenizer.special_token_ids - tokenizer.shown_special_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: Iterable[int]) -> str:
        table, skipped = self._token_bytes, self._skipped
        data = b"".join(table[t] for t in token_ids if t not in skipped and t < len(table))
        return self._decoder.decode(data) if data else ""

    def flush(self) -> str:
        """The end of the stream: whatever incomplete character is left decodes to U+FFFD."""
        return self._decoder.decode(b"", final=True)
