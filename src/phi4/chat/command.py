"""`phi4 chat`: connect to an endpoint (or serve a model in this process) and talk."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from phi4.chat.client import ChatClient, ChatError
from phi4.chat.conversation import Conversation
from phi4.chat.repl import Repl, ReplOptions


@dataclass(frozen=True)
class ChatOptions:
    model: str = "microsoft/phi-4"
    base_url: str | None = None
    api_key: str | None = None
    served_model: str | None = None
    max_model_len: int | None = None
    device: str = "auto"
    system: str | None = None
    history: Path | None = None
    plain: bool = False


def run_chat(options: ChatOptions) -> int:
    from phi4.chat.repl import default_history

    local = None
    if options.base_url is None:
        from phi4.chat.local import LocalServer
        from phi4.config import EngineConfig
        from phi4.server.serve import ServeOptions

        log = Path(tempfile.gettempdir()) / "phi4-chat-server.log"
        engine = EngineConfig(max_model_len=options.max_model_len) if options.max_model_len else EngineConfig()
        local = LocalServer(ServeOptions(model=options.model, device=options.device, engine=engine), log)
        print(f"loading {options.model} (server log: {log}) ...", file=sys.stderr, flush=True)
        try:
            local.start()
        except (RuntimeError, TimeoutError) as exc:
            print(f"phi4 chat: {exc}", file=sys.stderr)
            local.stop()
            return 1
        print(f"serving {options.model} at {local.url}/v1", file=sys.stderr, flush=True)
    client = ChatClient(options.base_url or f"{local.url}/v1", options.api_key)  # type: ignore[union-attr]
    try:
        model = options.served_model or client.first_model()
        conversation = Conversation(model)
        conversation.set_system(options.system)
        return Repl(client, conversation, ReplOptions(options.history or default_history(),
                                                      options.plain or not sys.stdout.isatty())).run()
    except ChatError as exc:
        print(f"phi4 chat: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
        if local is not None:
            local.stop()
