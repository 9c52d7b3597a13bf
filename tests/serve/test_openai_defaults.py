"""`phi4mm serve` as a vLLM / OpenAI user starts and calls it: real servers in subprocesses on 127.0.0.1 with the
embedded micro model, driven by the official `openai` client.

Two servers: the default one (`phi4mm serve`, no flag), and one started with the model card's whole vLLM command
line (tiny adapter folders: the micro model's own, copied). The micro model calls play_music for "I want to
listen to Coldplay." when offered examples/tools.json, which makes tool_choice testable on real decoding.
"""
from __future__ import annotations

import base64
import io
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import phi4mm_serve as serve_cli

ROOT = Path(__file__).parents[2]
TOOLS = json.loads((ROOT / "examples" / "tools.json").read_text())
MICRO = ROOT / "phi4mm" / "micro" / "model"
COLDPLAY = [{"role": "user", "content": "I want to listen to Coldplay."}]
START_S = 180  # a loaded CI machine takes a while to import torch and load the model
TIMEOUT = 120.0


@contextmanager
def phi4mm_serve(*flags: str):
    """`python -m phi4mm serve FLAGS` (conftest.phi4mm_serve); yields (openai client, base URL, stderr path)."""
    with serve_cli(*flags, start_s=START_S) as (base, _, log):
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0), base, log


@pytest.fixture(scope="module")
def default_server():
    with phi4mm_serve() as s:
        yield s


def test_the_plainest_openai_call_works_on_the_default_server(default_server):
    client, base, log = default_server
    r = client.chat.completions.create(model="microsoft/Phi-4-multimodal-instruct",
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content
    assert r.usage.completion_tokens >= 1
    banner = log.read_text()
    for word in ("phi4mm-micro", "cpu", "float32", "speech, vision", "KV cache", "max model len",
                 f"serving at {base}"):
        assert word in banner, banner
    assert httpx.get(base + "/version").json()["version"]
    names = [m.id for m in client.models.list().data]
    assert {"phi4mm-micro", "microsoft/Phi-4-multimodal-instruct", "speech", "vision"} <= set(names)


def test_defaults_are_the_checkpoints_greedy_ones(default_server):
    """The micro model's generation_config.json asks for no sampling: no temperature means greedy, so two calls
    agree (the server used to sample at 1.0 where the CLI was greedy)."""
    client = default_server[0]
    ask = {"model": "phi4mm-micro", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12}
    assert client.chat.completions.create(**ask).choices[0].message.content == \
        client.chat.completions.create(**ask).choices[0].message.content


def calls(r) -> list[tuple[str, dict]]:
    return [(t.function.name, json.loads(t.function.arguments)) for t in r.choices[0].message.tool_calls or []]


def test_tool_choice_required_named_and_none(default_server):
    client = default_server[0]
    ask = {"model": "phi4mm-micro", "messages": COLDPLAY, "tools": TOOLS, "max_tokens": 60}
    auto = client.chat.completions.create(**ask)
    assert calls(auto) == [("play_music", {"artist": "Coldplay"})] and auto.choices[0].finish_reason == "tool_calls"
    required = client.chat.completions.create(**ask, tool_choice="required")
    assert [n for n, _ in calls(required)] == ["play_music"]
    named = client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "search_web"}})
    assert [n for n, _ in calls(named)] == ["search_web"] and named.choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(**ask, tool_choice="none")
    assert calls(none) == [] and none.choices[0].finish_reason == "stop"
    assert "<|tool_call|>" not in none.choices[0].message.content
    # A question the micro model answers with a call to a tool nobody offered: never a tool call.
    stray = client.chat.completions.create(model="phi4mm-micro", tools=TOOLS, max_tokens=60,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert all(n in {t["function"]["name"] for t in TOOLS} for n, _ in calls(stray))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice" and "nope" in e.value.body["message"]


def test_streamed_tool_call_names_first_then_arguments(default_server):
    client = default_server[0]
    chunks = list(client.chat.completions.create(model="phi4mm-micro", messages=COLDPLAY, tools=TOOLS,
                                                 max_tokens=60, stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].function.name == "play_music" and deltas[0].id and deltas[0].function.arguments == ""
    assert all(d.function.name is None and d.id is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments for d in deltas)) == {"artist": "Coldplay"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_the_model_cards_vllm_command_line_starts_and_serves(tmp_path):
    speech, vision = tmp_path / "speech-lora", tmp_path / "vision-lora"
    shutil.copytree(MICRO / "speech-lora", speech)
    shutil.copytree(MICRO / "vision-lora", vision)
    card = ["--model", str(MICRO), "--dtype", "auto", "--trust-remote-code", "--max-model-len", "131072",
            "--enable-lora", "--max-lora-rank", "320", "--lora-extra-vocab-size", "0", "--limit-mm-per-prompt",
            "audio=3,image=3", "--max-loras", "2", "--lora-modules", f"speech={speech}", f"vision={vision}",
            "--served-model-name", "phi-4", "phi-4-mm", "--tensor-parallel-size", "1"]
    with phi4mm_serve(*card) as (client, _, log):
        startup = log.read_text()
        for flag in ("--trust-remote-code", "--enable-lora", "--max-loras", "--lora-extra-vocab-size"):
            assert f"{flag} accepted;" in startup, startup
        names = {m.id for m in client.models.list().data}
        assert {"phi-4", "phi-4-mm", "microsoft/Phi-4-multimodal-instruct", "speech", "vision"} <= names
        ask = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 3, "logprobs": True}
        plain = client.chat.completions.create(model="phi-4", **ask)
        assert plain.choices[0].message.content
        # Naming an adapter runs the prompt through it: the same greedy text scored by another network.
        lp = [client.chat.completions.create(model=m, **ask).choices[0].logprobs.content[0].logprob
              for m in ("phi-4", "speech", "vision")]
        assert lp[0] == pytest.approx(plain.choices[0].logprobs.content[0].logprob)
        assert lp[1] != pytest.approx(lp[0]) and lp[2] != pytest.approx(lp[0])
        image = {"type": "image_url", "image_url": {"url": png_data_url()}}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="phi-4", max_tokens=2, messages=[
                {"role": "user", "content": [image] * 4 + [{"type": "text", "text": "Compare them."}]}])
        assert "--limit-mm-per-prompt image=3" in e.value.body["message"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=ask["messages"])
