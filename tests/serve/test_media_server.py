"""Video and recorded-audio containers over the server, through the openai client: video_url parts (data URLs;
files only where the server allows them), m4a / webm uploads to the transcription endpoint, bad files as 400s."""
from __future__ import annotations

import base64
from pathlib import Path

import openai
import pytest
from openai import OpenAI

import phi4mm
from phi4mm.inputs.audio import load_audio
from phi4mm.options import ServeOptions
from phi4mm.serve.app import create_app
from tests.conftest import serve_app
from tests.inputs.media_files import write_audio, write_video
from tests.serve.test_server import NUM_BLOCKS, TIMEOUT

SPOKEN = Path(__file__).parents[2] / "examples" / "spoken.flac"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    speech = load_audio(SPOKEN)
    return {"mp4": write_video(d / "clip.mp4", seconds=3, fps=5, audio=speech),
            "m4a": write_audio(d / "voice.m4a", speech, 16000), "webm": write_audio(d / "voice.webm", speech, 16000)}


@pytest.fixture(scope="module")
def servers(tiny_official, media):
    model = phi4mm.load(tiny_official)
    strict = create_app(model, num_blocks=NUM_BLOCKS, max_batch=8, transcription_max_tokens=3)
    files = create_app(model, num_blocks=NUM_BLOCKS, max_batch=8, allow_local_files=True,
                       options=ServeOptions(allowed_media_dir=str(media["mp4"].parent)))
    with serve_app(strict) as (p1, _), serve_app(files) as (p2, _):
        yield [OpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
               for p in (p1, p2)]


def _ask(client, url: str, **opts):
    return client.chat.completions.create(model="phi4mm", max_tokens=3, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url, **opts}}, {"type": "text", "text": "What happens?"}]}])


def test_video_url_data_url_and_files(servers, media):
    strict, files = servers
    url = "data:video/mp4;base64," + base64.b64encode(media["mp4"].read_bytes()).decode()
    r = _ask(strict, url, fps=1.0, use_audio=True)
    # 3 one-crop frames (448x336 -> 1 crop + global view) and the sound track: the prompt counts them all.
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 3 * 256
    frames_only = _ask(strict, url, fps=1.0)
    assert frames_only.usage.prompt_tokens < r.usage.prompt_tokens  # the audio tokens are gone
    fewer = _ask(strict, url, max_frames=1)
    assert fewer.usage.prompt_tokens < frames_only.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="allow-local-files"):
        _ask(strict, str(media["mp4"]))
    assert _ask(files, str(media["mp4"])).usage.prompt_tokens == frames_only.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="ends early or is damaged"):
        _ask(strict, "data:video/mp4;base64," + base64.b64encode(media["mp4"].read_bytes()[:1500]).decode())
    with pytest.raises(openai.BadRequestError, match="fps must be"):
        _ask(strict, url, fps=-1)


def test_recorded_containers_transcribe(servers, media):
    strict, _ = servers
    for kind in ("m4a", "webm"):
        r = strict.audio.transcriptions.create(model="phi4mm", file=(f"voice.{kind}", media[kind].read_bytes()),
                                               response_format="verbose_json")
        assert len(r.segments) == 1 and r.duration == pytest.approx(1.95, abs=0.1)
        assert r.segments[0].avg_logprob < 0 and r.segments[0].no_speech_prob < 0.5
    cut = media["m4a"].read_bytes()[:2000]
    for name, data, words in (("cut.m4a", cut, "ends early or is damaged"), ("notes.wav", b"my notes\n" * 20,
                              "is not an audio or video file"), ("empty.wav", b"", "empty")):
        with pytest.raises(openai.BadRequestError, match=words) as e:
            strict.audio.transcriptions.create(model="phi4mm", file=(name, data))
        assert "\n" not in e.value.body["message"]
