"""The OpenAI-compatible server, driven over real HTTP by the official `openai` client.

Two servers on loopback: the real engine on the tiny random checkpoint, and the same app over `ScriptedEngine`,
which answers with a chosen text one real token at a time through the StepOutput path (tokenized and
detokenized with the model's tokenizer), so the tool-call / JSON plumbing is tested on text the random model
would never write. Everything above the engine (AsyncEngine, parsers, streaming, errors) is the real code.
"""
from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from openai import OpenAI

import phi4mm
from phi4mm.engine.engine import EngineBusy, StepOutput
from phi4mm.inputs.audio import load_audio
from phi4mm.inputs.prepare import Prepared
from phi4mm.options import ServeOptions
from phi4mm.serve.app import create_app
from tests.conftest import serve_app

DATA = Path(__file__).parents[1] / "data"
KEY = "test-key"
NUM_BLOCKS = 512
TIMEOUT = 60.0  # per HTTP call: bounds every test even if the server hangs


@pytest.fixture(scope="module")
def model(tiny_official):
    return phi4mm.load(tiny_official)


@pytest.fixture(scope="module")
def live(model):
    # raw completion prompts: the model-card format on /v1/completions, compared with chat below
    app = create_app(model, num_blocks=NUM_BLOCKS, max_batch=16, api_key=KEY, max_body_bytes=4 << 20,
                     transcription_max_tokens=4, options=ServeOptions(raw_completion_prompts=True, max_prompt_chars=800_000))
    with serve_app(app) as (port, _):
        yield app, port


@pytest.fixture(scope="module")
def client(live):
    return OpenAI(base_url=f"http://127.0.0.1:{live[1]}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


class ScriptedEngine:
    """Engine stand-in: every request is answered with `self.script`, one token per step, as Engine does it."""

    def __init__(self, model):
        self.model, self.script = model, ""
        self.waiting, self.running, self.seqs = [], [], {}
        self.pool = type("Pool", (), {"num_free": 1, "num_blocks": 1})()
        self.max_model_len = model.config.text.max_position_embeddings
        self._n = 0

    def add_request(self, prompt, images=None, audios=None, params=None, tools=None, request_id=None):
        params.validate()
        if self.script == "BUSY":
            raise EngineBusy("1 request is already waiting (limit 1); retry shortly")
        prep = prompt if isinstance(prompt, Prepared) else self.model.prepare(prompt, images, audios, tools)
        rid, self._n = request_id or f"s-{self._n}", self._n + 1
        tok = self.model.tokenizer
        self.seqs[rid] = dict(ids=tok.encode(self.script), n=0, dec=tok.stream_decoder(skip_special_tokens=True),
                              prompt=prep.num_tokens, max=params.max_tokens)
        return rid

    def step(self):
        if self.script == "RAISE":
            self.seqs.clear()
            raise RuntimeError("scripted failure")
        outs = []
        for rid, s in list(self.seqs.items()):
            tok = s["ids"][s["n"]]
            s["n"] += 1
            out = StepOutput(rid, tok, s["dec"].push(tok), num_prompt_tokens=s["prompt"], num_generated=s["n"])
            if s["n"] == len(s["ids"]) or s["n"] == s["max"]:
                out.text += s["dec"].flush()
                out.finished, out.finish_reason = True, "stop" if s["n"] == len(s["ids"]) else "length"
                del self.seqs[rid]
            outs.append(out)
        return outs

    def cancel(self, rid):
        return self.seqs.pop(rid, None) is not None

    def has_work(self):
        return bool(self.seqs)


@pytest.fixture(scope="module")
def scripted(model):
    eng = ScriptedEngine(model)
    with serve_app(create_app(model, eng)) as (port, _):
        yield eng, OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def chat(client, content, **kw):
    kw = {"max_tokens": 8, "temperature": 0, **kw}
    return client.chat.completions.create(model="phi-4-multimodal-instruct",
                                          messages=[{"role": "user", "content": content}], **kw)


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# ---------------------------------------------------------------------------------------------- basics
def test_models_health_metrics(live, client):
    _, port = live
    assert {m.id for m in client.models.list()} == {"phi-4-multimodal-instruct", "phi4mm", "speech", "vision",
                                                    "microsoft/Phi-4-multimodal-instruct"}
    assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
    chat(client, "warm up the counters")
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    for name in ("phi4mm_requests_total", "phi4mm_generation_tokens_total", "phi4mm_requests_waiting",
                 "phi4mm_time_to_first_token_seconds_bucket", "phi4mm_inter_token_latency_seconds_bucket"):
        assert name in text


def test_text_stream_equals_greedy_answer(client):
    full = chat(client, "Tell me about the sea.", max_tokens=12)
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    text, chunks = stream_text(chat(client, "Tell me about the sea.", max_tokens=12, stream=True,
                                    stream_options={"include_usage": True}))
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    # aliases work as model names; max_completion_tokens wins over nothing
    r = client.chat.completions.create(model="phi4mm", messages=[{"role": "user", "content": "Tell me about the sea."}],
                                       max_completion_tokens=12, temperature=0)
    assert r.choices[0].message.content == full.choices[0].message.content


def test_image_audio_and_both(client):
    img = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(DATA / "coffee_300x200.jpg")}}
    aud = {"type": "input_audio", "input_audio": {"data": b64(DATA / "espeak_weather.flac"), "format": "flac"}}
    text_only = chat(client, "What is this?").usage.prompt_tokens
    for parts in ([img], [aud], [img, aud]):
        r = chat(client, parts + [{"type": "text", "text": "What is this?"}], max_tokens=4)
        assert r.usage.prompt_tokens > text_only + 30 and r.usage.completion_tokens == 4
    text, _ = stream_text(chat(client, [img, {"type": "text", "text": "What?"}], max_tokens=4, stream=True))
    assert text == chat(client, [img, {"type": "text", "text": "What?"}], max_tokens=4).choices[0].message.content


def test_sampling_fields_n_logprobs_and_completions(client):
    kw = dict(max_tokens=6, temperature=0.9, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.3)
    a, b = chat(client, "Say something.", n=2, **kw), chat(client, "Say something.", n=2, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 2 and a.usage.completion_tokens == 12
    r = chat(client, "Say something.", logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == 8 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lp)
    assert "".join(t.token for t in lp) == r.choices[0].message.content
    stop = r.choices[0].message.content[5:8]
    s = chat(client, "Say something.", stop=[stop])
    assert s.choices[0].finish_reason == "stop" and s.choices[0].message.content == \
        r.choices[0].message.content[:r.choices[0].message.content.find(stop)]
    prompt = "<|user|>Say something.<|end|><|assistant|>"
    c = client.completions.create(model="phi4mm", prompt=[prompt, prompt], max_tokens=8, temperature=0, logprobs=2,
                                  echo=True)
    assert len(c.choices) == 2 and c.choices[0].text == prompt + r.choices[0].message.content
    assert len(c.choices[1].logprobs.tokens) == 8
    chunks = list(client.completions.create(model="phi4mm", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].message.content


# ---------------------------------------------------------------------------------------------- tools / JSON
TOOLS = [{"type": "function", "function": {"name": "sum_all", "parameters": {
    "type": "object", "properties": {"xs": {"type": "array", "items": {"type": "number"}}}}}}]


def test_tool_calls_streamed_and_not(scripted):
    eng, client = scripted
    eng.script = 'Let me add. <|tool_call|>[{"name": "sum_all", "arguments": {"xs": [1, 2.5, -3]}}]<|/tool_call|>'
    r = chat(client, "Add 1, 2.5 and -3.", tools=TOOLS, max_tokens=200)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Let me add. "
    (call,) = msg.tool_calls
    assert call.function.name == "sum_all" and json.loads(call.function.arguments) == {"xs": [1, 2.5, -3]}
    text, chunks = stream_text(chat(client, "Add 1, 2.5 and -3.", tools=TOOLS, max_tokens=200, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # as OpenAI streams a call: id and name first, then the arguments
    assert text == "Let me add. " and deltas[0].function.name == "sum_all" and deltas[0].id.startswith("call_")
    assert json.loads("".join(d.function.arguments for d in deltas)) == {"xs": [1, 2.5, -3]}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice "none": the same output is plain content, nothing lost
    r = chat(client, "Add.", tools=TOOLS, tool_choice="none", max_tokens=200)
    assert r.choices[0].message.content == eng.script and not r.choices[0].message.tool_calls
    # a malformed call stays content, streamed or not
    eng.script = 'oops <|tool_call|>[{"name": "sum_all", "arguments": {"xs": [1, 2'
    r = chat(client, "Add.", tools=TOOLS, max_tokens=200)
    assert r.choices[0].message.content == eng.script and not r.choices[0].message.tool_calls
    assert stream_text(chat(client, "Add.", tools=TOOLS, max_tokens=200, stream=True))[0] == eng.script


def test_json_mode_repairs_to_the_object(scripted):
    eng, client = scripted
    eng.script = 'Sure! Here it is: {"city": "Paris", "tags": [1, 2]} Hope that helps.'
    r = chat(client, "Give JSON.", response_format={"type": "json_object"}, max_tokens=200)
    assert json.loads(r.choices[0].message.content) == {"city": "Paris", "tags": [1, 2]}


def test_engine_busy_and_internal_error_then_recovery(scripted):
    eng, client = scripted
    eng.script = "BUSY"
    with pytest.raises(openai.RateLimitError):
        chat(client, "x")
    eng.script = "RAISE"
    with pytest.raises(openai.InternalServerError, match="engine failed") as e:
        chat(client, "x")
    assert "scripted" not in str(e.value)  # no internal text leaks
    eng.script = "fine again"
    assert chat(client, "x").choices[0].message.content == "fine again"


# ---------------------------------------------------------------------------------------------- audio endpoints
def long_clip(seconds: float = 36.0) -> bytes:
    parts, total = [], 0
    while total < seconds * 16000:
        for f in sorted(DATA.glob("*.flac")):
            parts += [load_audio(str(f)), np.zeros(8000, np.float32)]
            total += parts[-2].size + 8000
    buf = io.BytesIO()
    sf.write(buf, np.concatenate(parts), 16000, format="FLAC")
    return buf.getvalue()


def test_transcriptions_and_translations_every_format(client):
    clip = (DATA / "flite_quick_brown_fox.flac").read_bytes()
    got = {fmt: client.audio.transcriptions.create(model="speech", file=("fox.flac", clip), response_format=fmt)
           for fmt in ("json", "text", "srt", "vtt", "verbose_json")}
    verbose = got["verbose_json"]
    assert verbose.duration == pytest.approx(4.9, abs=0.1) and len(verbose.segments) == 1
    # Every format carries the one transcript: the plain text, the JSON's, and the one cue of the subtitles.
    text = got["json"].text
    assert got["text"].strip() == text == verbose.text == verbose.segments[0].text
    words = text.replace("-->", "->").split()  # a cue's payload: the text with no "-->" and no blank line
    srt, vtt = got["srt"].strip().splitlines(), got["vtt"].strip().splitlines()
    assert vtt[:2] == ["WEBVTT", ""][:len(vtt)] and " ".join(vtt[3:]).split() == words
    assert " ".join(srt[2:]).split() == words and (srt[:1] == ["1"] if words else srt == [])
    t = client.audio.translations.create(model="speech", file=("fox.flac", clip), response_format="verbose_json")
    assert t.duration == pytest.approx(4.9, abs=0.1) and len(t.segments) == 1
    r = client.audio.transcriptions.create(model="speech", file=("long.flac", long_clip()),
                                           response_format="verbose_json", language="en", prompt="fox")
    assert len(r.segments) >= 2 and r.duration - 1.0 < r.segments[-1].end <= r.duration
    assert all(s.end - s.start <= 15.0 for s in r.segments) and r.language == "english"
    assert all(s.avg_logprob < 0 and 0 <= s.no_speech_prob < 1 for s in r.segments)  # measured per cue
    srt = client.audio.transcriptions.create(model="speech", file=("long.flac", long_clip()), response_format="srt")
    assert "2\n00:00:" in srt


# ---------------------------------------------------------------------------------------------- errors
def test_client_mistakes_are_typed_4xx(live, client):
    _, port = live
    bad = [
        ([{"role": "wizard", "content": "hi"}], openai.BadRequestError, "role"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "%%%not base64"}}]}],
         openai.BadRequestError, "base64"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]}],
         openai.BadRequestError, "allow-remote-media"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(DATA / "coffee_300x200.jpg")}}]}],
         openai.BadRequestError, "allowed-media-dir"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}]}],
         openai.BadRequestError, "image"),
        ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], openai.BadRequestError, "allow-local-files"),
        ([{"role": "user", "content": [{"type": "hologram", "hologram": "x"}]}], openai.BadRequestError, "unknown type"),
        ([{"role": "user", "content": "word " * 140_000}], openai.BadRequestError, "context"),
        ([{"role": "user", "content": "word " * 170_000}], openai.BadRequestError, "max-prompt-chars"),
    ]
    for messages, exc, words in bad:
        with pytest.raises(exc, match=words) as e:
            client.chat.completions.create(model="speech", messages=messages, max_tokens=2)
        assert e.value.body["message"] and "type" in e.value.body
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(client, "hi", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.audio.transcriptions.create(model="speech", file=("a.flac", b"x"), response_format="docx")
    with pytest.raises(openai.BadRequestError, match="audio"):
        client.audio.transcriptions.create(model="speech", file=("a.flac", b"not audio at all"))
    url, auth = f"http://127.0.0.1:{port}/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    for body, status in ((b"{not json", 400), (b'{"model": "speech", "messages": 3}', 400), (b"x" * (5 << 20), 413)):
        r = httpx.post(url, content=body, headers={**auth, "Content-Type": "application/json"}, timeout=TIMEOUT)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.post(url, json={}, timeout=TIMEOUT).status_code == 401
    assert chat(client, "still serving?").choices[0].message.content


# ---------------------------------------------------------------------------------------------- concurrency
def test_many_clients_get_their_own_answers(client):
    prompts = [f"Client {i} asks about topic {i * 7}." for i in range(16)]
    alone = [chat(client, p, max_tokens=10).choices[0].message.content for p in prompts[:4]]

    def one(i):
        if i % 2:
            return stream_text(chat(client, prompts[i], max_tokens=10, stream=True))[0]
        return chat(client, prompts[i], max_tokens=10).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, range(16)))
    assert together[:4] == alone
    assert len(set(together)) > 1  # distinct prompts, distinct answers (no cross-talk)
    again = [chat(client, p, max_tokens=10).choices[0].message.content for p in prompts[4:8]]
    assert together[4:8] == again


def test_disconnect_mid_stream_cancels_and_frees_cache(live):
    app, port = live
    eng = app.state.server.engine
    body = {"model": "speech", "messages": [{"role": "user", "content": "Talk for a long time."}],
            "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as h:
        with h.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert eng.call(lambda e: len(e.seqs)) == 1
    deadline = time.monotonic() + 10
    while eng.call(lambda e: (e.pool.num_free, len(e.seqs), e.has_work())) != (NUM_BLOCKS, 0, False):
        assert time.monotonic() < deadline, "the disconnected request still holds cache"
        time.sleep(0.05)
    assert eng.num_in_flight == 0
