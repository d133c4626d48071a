"""The chat page at `/`: one HTML file and its scripts, all shipped in the package (phi4/assets/web), so it
works on a machine with no network. It talks to the same OpenAI API as any client; `/ui/config` tells it
what it must know before the first request (whether a key is needed, the stop-sequence limit)."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

if TYPE_CHECKING:
    from phi4.server.app import LoadingState

WEB_ASSETS = resources.files("phi4") / "assets" / "web"


def add_web_page(app: FastAPI, loading: LoadingState) -> None:
    index = (WEB_ASSETS / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index, headers={"Cache-Control": "no-cache"})

    @app.get("/ui/config", include_in_schema=False)
    async def config() -> dict[str, Any]:
        state = loading.get()
        return {"model": state.served_model_name, "requires_api_key": state.api_key is not None,
                "max_stop_sequences": state.max_stop_sequences, "max_model_len": state.max_model_len}

    app.mount("/ui", StaticFiles(directory=str(WEB_ASSETS)), name="ui")
