"""The web page for chat and transcription: static files shipped inside the package, served at `/`.

Plain HTML/CSS/JS with no build step and no network access beyond this server, so the page works offline. It
talks to the same OpenAI-style routes as any client (`/v1/chat/completions`, `/v1/audio/*`); the only extra it
reads is the `x-phi4mm-adapter` response header (which LoRA ran), which OpenAI clients ignore.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")
UI_PREFIX = "/ui"  # the page's scripts and styles; like `/`, open without the API key (the page asks for it)
ADAPTER_HEADER = "x-phi4mm-adapter"  # "vision", "speech", "text" or "none": the adapter a chat request used


def public_path(path: str) -> bool:
    """True for the page's own files, which a browser must load before it can ask the user for the API key."""
    return path == "/" or path.startswith(UI_PREFIX + "/")


def mount_ui(app: FastAPI) -> None:
    """Serve index.html at `/` and the other static files under `/ui/`."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"the web page is missing from the package ({index}); reinstall phi4mm, or start "
                                "the server with --no-ui")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    app.mount(UI_PREFIX, StaticFiles(directory=STATIC_DIR), name="ui")
