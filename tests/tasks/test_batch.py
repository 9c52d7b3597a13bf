"""Offline batch jobs (`phi4mm batch`, here and on Ray Data replicas) and server replicas on Ray Serve.

Ray runs here as a local cluster on this machine's CPUs, the same code path a multi-node cluster takes (Ray
places the actors); both Ray cases share one cluster to pay its start-up (~10 s) once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import free_port, scene, tone

import phi4mm
from phi4mm.engine.engine import Engine
from phi4mm.inputs.records import DataError
from phi4mm.sampling import SamplingParams
from phi4mm.tasks.batch import read_prompts, run_batch

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """Text, image, audio and image + audio prompts, per-line sampling, tools, an id, a reference answer and
    one image the processor cannot decode (that line fails, the others go on)."""
    d = tmp_path_factory.mktemp("batch")
    scene(320, 240, seed=1).save(d / "pic.png")
    sf.write(d / "clip.wav", *tone(1.5))
    (d / "broken.png").write_bytes(b"this is not a png")
    text = {"type": "text", "text": "What is this?"}
    lines = [
        {"messages": _user({"type": "text", "text": "Say hello."}), "id": "a"},
        {"messages": _user({"type": "image_url", "image_url": {"url": "pic.png"}}, text),
         "sampling": {"max_tokens": 3}},
        {"messages": _user({"type": "audio_url", "audio_url": {"url": "clip.wav"}},
                           {"type": "text", "text": "Transcribe the audio clip into text."}), "id": 7},
        {"messages": _user({"type": "image_url", "image_url": {"url": "broken.png"}}, text)},
        {"messages": _user({"type": "image_url", "image_url": {"url": "pic.png"}},
                           {"type": "audio_url", "audio_url": {"url": "clip.wav"}}, text),
         "sampling": {"temperature": 0.8, "seed": 3}},
        {"messages": _user({"type": "text", "text": "Weather in Paris?"}), "tools": TOOLS},
        {"messages": _user({"type": "text", "text": "2+2?"}) + [{"role": "assistant", "content": "4"}]},
    ]
    f = d / "prompts.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")  # a blank last line is skipped
    return f


def _reference(model, prompts: Path) -> list[dict]:
    """Each line alone through a fresh engine: what the batch must reproduce, line for line."""
    defaults = SamplingParams(max_tokens=6)
    out = []
    for row in read_prompts(prompts, defaults):
        try:
            prep = model.prepare(json.loads(row["messages"]), json.loads(row["images"]), json.loads(row["audios"]),
                                 json.loads(row["tools"]))
        except ValueError:
            out.append(None)
            continue
        with torch.inference_mode():
            r = Engine(model, num_blocks=256).generate([{"prompt": prep,
                                                         "params": SamplingParams(**json.loads(row["sampling"]))}])
        out.append(r[0]["token_ids"])
    return out


@pytest.fixture(scope="module")
def local(tiny_official, prompts, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("batch_out") / "replies.jsonl"
    r = run_batch(tiny_official, prompts, out, defaults=SamplingParams(max_tokens=6), progress=False)
    assert r == {"lines": 7, "errors": 1, "out": str(out)}
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_batch_here_matches_each_line_alone(tiny_official, prompts, local):
    model = phi4mm.load(tiny_official)
    ref = _reference(model, prompts)
    assert [r["line"] for r in local] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["id"] for r in local] == ["a", None, 7, None, None, None, None]
    tok = model.tokenizer
    for r, ids in zip(local, ref):
        if ids is None:
            assert r["error"] and "broken.png" in r["error"] and r["finish_reason"] == "error"
            continue
        assert r["error"] is None and r["usage"]["completion_tokens"] == len(ids)
        if not r["tool_calls"]:
            assert r["text"] == tok.decode(ids, skip_special_tokens=True)
    assert local[1]["usage"]["completion_tokens"] <= 3  # its own max_tokens
    assert local[6]["reference"] == "4" and local[6]["usage"]["prompt_tokens"] > 0


def test_bad_batch_files_stop_before_any_work(tiny_official, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": nope}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2"):
        run_batch(tiny_official, f, tmp_path / "o.jsonl")
    f.write_text('{"messages": [{"role": "user", "content": "hi"}], "sampling": {"temprature": 1}}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1.*temprature"):
        run_batch(tiny_official, f, tmp_path / "o.jsonl")
    f.write_text('{"messages": [{"role": "user", "content": "hi"}], "sampling": {"temperature": -1}}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1.*temperature"):
        run_batch(tiny_official, f, tmp_path / "o.jsonl")
    f.write_text('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
                 '{"url": "gone.png"}}]}]}\n')
    with pytest.raises(DataError, match="gone.png"):
        run_batch(tiny_official, f, tmp_path / "o.jsonl")
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="input file"):
        run_batch(tiny_official, f, f)
    assert not (tmp_path / "o.jsonl").exists()
    # the CLI says it in one sentence, exit code 2
    p = subprocess.run([sys.executable, "-m", "phi4mm.cli.main", "batch", "--model", str(tiny_official),
                        str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl")], capture_output=True, text=True,
                       check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "missing.jsonl" in p.stderr


# ------------------------------------------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # Logical CPUs: two replicas of 1 CPU each, plus Ray Data's own tasks and Serve's proxy and controller.
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    from ray import serve
    serve.shutdown()
    ray.shutdown()


@pytest.mark.slow  # a Ray cluster and replicas, each loading the model
def test_batch_on_ray_replicas_equals_the_batch_here(ray_cluster, tiny_official, prompts, local, tmp_path):
    out = tmp_path / "ray.jsonl"
    r = run_batch(tiny_official, prompts, out, defaults=SamplingParams(max_tokens=6), replicas=2, batch_size=2)
    assert r["lines"] == 7 and r["errors"] == 1
    assert ray_cluster.is_initialized()  # a cluster the caller started is left running
    assert [json.loads(x) for x in out.read_text().splitlines()] == local


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_official):
    """Two server replicas of the tiny checkpoint on Ray Serve (API key "k"), shared by the serving tests."""
    from ray import serve

    from phi4mm.serve import replicas
    url = replicas.start(tiny_official, 2, port=free_port(), api_key="k", max_batch=4, max_waiting=8, num_blocks=128)
    yield url
    serve.delete("phi4mm")


@pytest.mark.slow  # a Ray cluster and replicas, each loading the model
def test_server_replicas_on_ray_serve(served, tiny_official):
    import openai
    from openai import OpenAI
    from ray import serve
    url = served
    st = serve.status().applications["phi4mm"].deployments["phi4mm"]
    assert st.replica_states.get("RUNNING") == 2
    client = OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)
    assert next(m.id for m in client.models.list().data) == Path(tiny_official).name
    msgs = [{"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(model="phi4mm", messages=msgs, max_tokens=5, temperature=0)
    assert whole.usage.completion_tokens >= 1
    parts = client.chat.completions.create(model="phi4mm", messages=msgs, max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == whole.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="phi4mm", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}


AUTH = {"Authorization": "Bearer k"}


def _replicas_answering(url: str, n: int, exclude: frozenset[int] = frozenset(), seconds: float = 180.0) -> list:
    """`GET /replica` until n different replica processes (none of them in exclude) have answered."""
    import httpx
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + seconds
    while len(seen) < n and time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/replica", headers=AUTH, timeout=10)
            if r.status_code == 200 and r.json()["pid"] not in exclude:
                seen.setdefault(r.json()["pid"], r.json())
        except httpx.TransportError:  # the proxy itself is restarting: ask again
            pass
        time.sleep(0.05)
    return list(seen.values())


def _ask(url: str, k: int) -> dict:
    """One streamed chat request, sent again only after a connection error before any answer arrived (the
    openai client's retry: it re-sends a request, never a stream it has started reading). How many attempts
    it took, how many streamed an answer, whether one stream ended with [DONE], the last error seen."""
    import httpx
    body = {"model": "phi4mm", "messages": [{"role": "user", "content": f"Count to {k}."}], "max_tokens": 24,
            "ignore_eos": True, "temperature": 0, "stream": True}
    rec = {"attempts": 0, "answers": 0, "complete": False, "error": None}
    for _ in range(3):
        rec["attempts"] += 1
        answered = False
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
                if r.status_code != 200:
                    rec["error"] = f"HTTP {r.status_code}"
                    return rec
                for line in r.iter_lines():
                    if not answered and line.startswith("data: {") and '"content":"' in line.replace(" ", ""):
                        answered = True
                        rec["answers"] += 1
                    rec["complete"] = rec["complete"] or line == "data: [DONE]"
        except httpx.TransportError as e:
            rec["error"] = type(e).__name__
            if not answered:
                continue
        return rec
    return rec


@pytest.mark.slow  # a Ray cluster and replicas, each loading the model
def test_a_killed_replica_is_replaced_and_later_requests_reach_the_live_one(served):
    """A replica's process killed (SIGKILL) while requests stream on both: every request ends (none hangs);
    each answer that completes is whole and given once; requests sent after the kill all complete once (Ray
    routes around the dead process); Ray starts a new replica process in its place."""
    infos = _replicas_answering(served, 2)
    assert len(infos) == 2 and all(i["device"] == "cpu" and i["gpu"] is None for i in infos)  # seen from inside
    victim = infos[0]["pid"]
    assert b"ServeReplica" in Path(f"/proc/{victim}/cmdline").read_bytes()  # the replica's own process, here
    with ThreadPoolExecutor(8) as pool:
        during = [pool.submit(_ask, served, k) for k in range(8)]
        time.sleep(0.5)  # the first requests are streaming on both replicas
        os.kill(victim, signal.SIGKILL)
        during = [f.result() for f in during]
        after = list(pool.map(lambda k: _ask(served, k), range(8, 16)))
    assert all(r["answers"] <= 1 for r in during + after), during + after  # none answered twice
    # A request on the killed process may fail, but visibly (an HTTP error or a cut stream), never half-done.
    assert all(r["complete"] or r["error"] for r in during), during
    assert any(r["complete"] for r in during), during  # the live replica went on serving
    assert all(r["complete"] and r["answers"] == 1 for r in after), after
    back = _replicas_answering(served, 2, exclude=frozenset({victim}))
    assert len(back) == 2, f"only {len(back)} replica(s) answer after the kill"
    assert all(_ask(served, k)["complete"] for k in range(16, 18))  # and the service is whole again
