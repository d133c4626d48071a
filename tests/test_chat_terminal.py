"""`phi4 chat` driven as a person drives it, through a pseudo-terminal (pexpect): a streamed answer, the same
answer twice under one seed, an answer constrained by /schema, Ctrl-C in the middle of an answer (the
server aborts it); and its slash commands one by one."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from phi4.chat.commands import CommandError, run_command
from phi4.chat.conversation import Conversation

pexpect = pytest.importorskip("pexpect")
PROMPT = ">>>"


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture()
def chat(tmp_path: Path, demo_dir: Path):  # noqa: ANN201 - a pexpect child
    env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1", HOME=str(tmp_path),
               XDG_DATA_HOME=str(tmp_path / "data"), COLUMNS="100", LINES="40")
    # Ctrl-C live as in a user's shell, also when the tests run where SIGINT is ignored (a background job of a
    # non-interactive shell): an ignored signal stays ignored across exec, and Python then never raises it.
    child = pexpect.spawn(sys.executable, ["-m", "phi4.cli", "chat", "--model", "demo", "--max-model-len", "1024"],
                          env=env, encoding="utf-8", timeout=90, dimensions=(40, 100), cwd=str(tmp_path),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect(r"serving demo at (http://127\.0\.0\.1:\d+)/v1")
    child.url = child.match.group(1)
    child.expect(PROMPT)
    yield child
    if child.isalive():
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=60)


def command(child, line: str, reply: str) -> None:  # noqa: ANN001
    child.sendline(line)
    child.expect(re.escape(reply))
    child.expect(PROMPT)


def ask(child, text: str) -> str:  # noqa: ANN001
    """Send a message; return the figures line that ends its answer."""
    child.sendline(text)
    child.expect(r"\d+ tokens · first token [0-9.]+ s[^\r\n]*finish: \w+")
    figures = child.match.group(0)
    child.expect(PROMPT)
    return figures


def test_a_conversation_in_the_terminal(chat, tmp_path: Path) -> None:  # noqa: ANN001
    command(chat, "/set max_tokens 12", "max_tokens = 12")
    figures = ask(chat, "Hello there")
    assert figures.startswith("12 tokens") and "finish: length" in figures  # streamed: a first-token time

    command(chat, "/clear", "conversation cleared")
    command(chat, "/set seed 7", "seed = 7")
    command(chat, "/set temperature 1.0", "temperature = 1.0")
    ask(chat, "Tell me a story")
    command(chat, "/save first.json", "saved 2 messages")
    command(chat, "/clear", "conversation cleared")
    ask(chat, "Tell me a story")
    command(chat, "/save second.json", "saved 2 messages")
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("first.json", "second.json"))
    assert first[1]["role"] == "assistant" and first[1]["content"]
    assert first == second, "same seed, same prompt: the same answer"

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    (tmp_path / "person.json").write_text(json.dumps(schema))
    command(chat, "/clear", "conversation cleared")
    command(chat, "/set max_tokens 60", "max_tokens = 60")
    command(chat, "/schema person.json", "answers follow the schema in person.json")
    chat.sendline("Describe a person")
    chat.expect("valid JSON")
    chat.expect(PROMPT)
    command(chat, "/save person-answer.json", "saved 2 messages")
    answer = json.loads(json.loads((tmp_path / "person-answer.json").read_text())[1]["content"])
    assert set(answer) == {"name", "age"} and isinstance(answer["age"], int)
    command(chat, "/schema off", "answers are free text again")

    command(chat, "/clear", "conversation cleared")
    command(chat, "/set max_tokens 900", "max_tokens = 900")
    generated_before = metric(chat.url, "phi4_generation_tokens_total")
    chat.sendline("Write a very long story")
    deadline = time.monotonic() + 60
    while metric(chat.url, "phi4_num_requests_running") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)  # until the answer is being written (and the terminal is out of the prompt)
    assert metric(chat.url, "phi4_generation_tokens_total") - generated_before < 900, "answered before Ctrl-C"
    chat.sendintr()  # Ctrl-C
    chat.expect(re.escape("stopped (Ctrl-C)"))
    chat.expect(PROMPT)
    deadline = time.monotonic() + 60
    while metric(chat.url, "phi4_num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(chat.url, "phi4_num_requests_running") == 0
    # The server aborted it: it never finished its 900 tokens.
    assert metric(chat.url, "phi4_generation_tokens_total") - generated_before < 900

    command(chat, "/set max_tokens 8", "max_tokens = 8")
    ask(chat, "Still there?")  # the program is still running, and answers
    chat.sendline("/exit")
    chat.expect(pexpect.EOF, timeout=60)
    assert (tmp_path / "data" / "phi4" / "chat_history").read_text().count("Tell me a story") >= 1


def test_multi_line_input_and_errors_keep_the_session(chat) -> None:  # noqa: ANN001
    command(chat, "/set max_tokens 4", "max_tokens = 4")
    chat.sendline('"""first line')
    chat.sendline('second line"""')
    chat.expect(r"\d+ tokens · first token")
    chat.expect(PROMPT)
    command(chat, "/set temperature hot", "temperature: expected a number, got 'hot'")
    command(chat, "/frobnicate", "unknown command /frobnicate")
    command(chat, "/schema missing.json", "cannot read")
    command(chat, "/set temperature 3", "temperature = 3.0")
    chat.sendline("This should be refused")
    chat.expect("error: ")  # the server's own message, and the session goes on
    chat.expect(PROMPT)
    command(chat, "/show", "temperature: 3.0")


def conversation() -> Conversation:
    return Conversation("microsoft/phi-4")


def test_set_reads_each_setting_as_its_type() -> None:
    c = conversation()
    run_command(c, "/set seed 7")
    run_command(c, "/set top_p 0.5")
    run_command(c, '/set stop ["END", "\\n\\n"]')
    run_command(c, "/set presence_penalty -0.5")
    assert c.settings == {"seed": 7, "top_p": 0.5, "stop": ["END", "\n\n"], "presence_penalty": -0.5}
    run_command(c, "/set stop \\n")
    assert c.settings["stop"] == ["\n"]
    run_command(c, "/set seed none")
    assert "seed" not in c.request() and c.request()["stream"] is True
    for bad in ("/set seed 1.5", "/set colour red", "/set max_tokens", '/set stop [1, 2]'):
        with pytest.raises(CommandError):
            run_command(c, bad)


def test_system_schema_tools_save_and_load(tmp_path: Path) -> None:
    c = conversation()
    run_command(c, "/system You are terse.")
    c.messages.append({"role": "user", "content": "hi"})
    (tmp_path / "bad-schema.json").write_text('{"type": "frobnicate"}')
    with pytest.raises(CommandError, match="not a valid JSON schema"):
        run_command(c, f"/schema {tmp_path / 'bad-schema.json'}")
    (tmp_path / "tools.json").write_text(json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}]))
    assert run_command(c, f"/tools {tmp_path / 'tools.json'}").text == "tools: get_weather"
    body = c.request()
    assert body["tools"][0] == {"type": "function", "function": {"name": "get_weather",
                                                                 "parameters": {"type": "object"}}}
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    run_command(c, f"/save {tmp_path / 'chat.json'}")
    run_command(c, "/clear")
    assert c.messages == [{"role": "system", "content": "You are terse."}]
    run_command(c, f"/load {tmp_path / 'chat.json'}")
    assert [m["role"] for m in c.messages] == ["system", "user"]
    (tmp_path / "not-messages.json").write_text('[{"content": "no role"}]')
    with pytest.raises(CommandError, match="OpenAI messages"):
        run_command(c, f"/load {tmp_path / 'not-messages.json'}")
    assert run_command(c, "/exit").exit and "/schema FILE" in run_command(c, "/help").text
