"""The `phi4mm` command line, run as a user runs it: the installed entry point in a subprocess, on the tiny
random checkpoint. Subprocesses cost ~6 s each (torch import + tokenizer), so each one covers several cases;
errors found before the model loads are checked in-process through `cli.main`."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phi4mm.cli import main as cli

DATA = Path(__file__).parents[1] / "data"
FLACS = sorted(DATA.glob("*.flac"))
SCRIPT = Path(sys.executable).parent / "phi4mm"
ENTRY = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "phi4mm.cli.main"]
SRT_CUE = re.compile(r"(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.+?)\n(?:\n|$)", re.DOTALL)
VTT_CUE = re.compile(r"(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})\n(.+?)\n(?:\n|$)", re.DOTALL)


def run(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(ENTRY + [str(a) for a in args], input=stdin, capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return p


def one_line_error(p: subprocess.CompletedProcess | tuple[int, str], *words: str) -> str:
    rc, err = (p.returncode, p.stderr) if isinstance(p, subprocess.CompletedProcess) else p
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def in_process(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def srt_cues(text: str) -> list[tuple]:
    cues = SRT_CUE.findall(text)
    assert [int(c[0]) for c in cues] == list(range(1, len(cues) + 1))
    return cues


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("cmd", [[], ["chat"], ["transcribe"], ["translate"], ["serve"], ["bench"], ["eval"],
                                 ["batch"], ["make-checkpoint"]])
def test_help(cmd):
    p = ok(run(*cmd, "--help"))
    assert p.stdout.startswith("usage: phi4mm")
    if cmd and cmd[0] != "make-checkpoint":
        assert "examples:" in p.stdout and "--model" in p.stdout
    if cmd == ["serve"]:
        for flag in ("--host", "--port", "--api-key", "--device", "--dtype", "--max-batch", "--max-waiting",
                     "--allow-remote-media", "--allow-local-files"):
            assert flag in p.stdout


def test_train_offers_every_stage_the_trainer_has():
    from phi4mm.train.stages import STAGES
    train = next(a for a in cli._parser()._subparsers._group_actions[0].choices["train"]._actions
                 if a.dest == "stage")
    assert sorted(train.choices) == sorted(STAGES)


def test_eval_offers_every_metric():
    from phi4mm.tasks.evaluate import METRICS
    ev = next(a for a in cli._parser()._subparsers._group_actions[0].choices["eval"]._actions
              if a.dest == "metric")
    assert sorted(ev.choices) == sorted(METRICS)


# ------------------------------------------------------------------------------------------------ errors
def test_errors_before_loading_are_one_sentence(capsys, tiny_official, tmp_path):
    m = ["--model", tiny_official]
    one_line_error(in_process(capsys, "transcribe", "nope.wav", *m), "nope.wav", "no such file")
    one_line_error(in_process(capsys, "transcribe", str(tmp_path / "*.flac"), *m), "matches no files")
    (tmp_path / "empty").mkdir()
    one_line_error(in_process(capsys, "transcribe", tmp_path / "empty", *m), "no audio files")
    one_line_error(in_process(capsys, "transcribe", FLACS[0], "--format", "docx", *m), "docx", "srt, vtt")
    one_line_error(in_process(capsys, "transcribe", FLACS[0], "-f", "json,verbose_json", "-o", tmp_path, *m),
                   "both be written")
    one_line_error(in_process(capsys, "translate", FLACS[0], "--language", "xx", *m), "'xx'", "French (fr)")
    one_line_error(in_process(capsys, "transcribe", FLACS[0], "--max-seconds", "0", *m), "--max-seconds")
    one_line_error(in_process(capsys, "chat", "hi", "--image", "missing.jpg", *m), "missing.jpg")
    one_line_error(in_process(capsys, "chat", "hi", "--max-tokens", "0", *m), "--max-tokens")
    one_line_error(in_process(capsys, "serve", "--port", "70000", *m), "--port")
    one_line_error(in_process(capsys, "serve", "--replicas", "0", *m), "--replicas")
    one_line_error(in_process(capsys, "batch", FLACS[0], tmp_path / "o.jsonl", "--max-tokens", "0", *m),
                   "--max-tokens")
    one_line_error(in_process(capsys, "batch", FLACS[0], tmp_path / "o.jsonl", "--replicas", "0", *m), "--replicas")
    one_line_error(in_process(capsys, "bench", "--model", tmp_path / "nowhere"), "not a directory")
    one_line_error(in_process(capsys, "chat", "hi", "--model", tmp_path / "nowhere"), "not a directory")
    one_line_error(in_process(capsys, "eval", tmp_path / "none.jsonl", "--metric", "wer", *m), "none.jsonl",
                   "not a file")
    one_line_error(in_process(capsys, "eval", FLACS[0], "--metric", "wer", "--limit", "0", *m), "--limit")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": oops}\n')
    one_line_error(in_process(capsys, "eval", bad, "--metric", "exact", *m), "bad.jsonl", "2")
    last_user = tmp_path / "last_user.jsonl"
    last_user.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    one_line_error(in_process(capsys, "eval", last_user, "--metric", "exact", *m), "reference")
    # two inputs that would write the same file
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        shutil.copy(FLACS[0], tmp_path / d / "x.flac")
    one_line_error(in_process(capsys, "transcribe", tmp_path / "a/x.flac", tmp_path / "b/x.flac", "-o", tmp_path,
                              *m), "both be written")


def test_missing_embedded_model_is_one_sentence(capsys, tmp_path, monkeypatch):
    from phi4mm.micro import recipe as micro
    monkeypatch.setattr(micro, "MICRO_DIR", tmp_path / "micro_model")  # an install without the package data
    one_line_error(in_process(capsys, "transcribe", FLACS[0]), "--model", "missing from this install")
    one_line_error(in_process(capsys, "chat", "hi"), "--model", "missing from this install")


def test_errors_in_a_subprocess(tiny_official, tmp_path):
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    one_line_error(run("transcribe", bad, "--model", tiny_official), "corrupt.wav", "damaged")
    assert run("transcribe").returncode == 2  # argparse usage error


# ------------------------------------------------------------------------------------------------ chat
def test_chat_one_shot_with_image_and_audio(tiny_official):
    p = ok(run("chat", "--model", tiny_official, "Describe both.", "--image", DATA / "coffee_300x200.jpg",
               "--audio", FLACS[0], "--max-tokens", "5"))
    assert p.stdout.endswith("\n") and len(p.stdout.strip().splitlines()) >= 1


def test_chat_interactive(tiny_official):
    script = "\n".join(["Hello there", "/image " + str(DATA / "astronaut_192.jpg"), "What is this?",
                        "/audio " + str(DATA / "no_such.flac"), "/frobnicate", "", "/audio " + str(FLACS[1]),
                        "And this?", "/reset", "/exit", "never sent"]) + "\n"
    p = ok(run("chat", "--model", tiny_official, "--interactive", "--max-tokens", "4", stdin=script))
    assert p.stdout.count("\n") >= 3  # one streamed reply per user turn, each ended by a newline
    assert p.stderr.count("attached") == 2 and "no_such.flac" in p.stderr and "unknown command" in p.stderr
    assert "cleared" in p.stderr


# ------------------------------------------------------------------------------------------------ transcribe
def test_transcribe_folder_srt(tiny_official, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for f in FLACS[:2]:
        shutil.copy(f, src / f.name)
    shutil.copy(FLACS[2], src / "sub" / FLACS[2].name)
    (src / "notes.txt").write_text("not audio")
    out = tmp_path / "out"
    ok(run("transcribe", src, "--model", tiny_official, "--format", "srt", "--output-dir", out,
           "--max-tokens", "4"))
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert written == sorted([f.stem + ".srt" for f in FLACS[:2]] + ["sub", f"sub/{FLACS[2].stem}.srt"])
    import soundfile as sf
    for f in out.rglob("*.srt"):
        cues = srt_cues(f.read_text())
        duration = sf.info(str(next(src.rglob(f.stem + ".flac")))).duration

        def sec(t: str) -> float:  # "HH:MM:SS,mmm"
            h, m, rest = t.split(":")
            return int(h) * 3600 + int(m) * 60 + float(rest.replace(",", "."))
        times = [(sec(c[1]), sec(c[2])) for c in cues]
        # Cues follow the speech the voice-activity detector found: ordered, inside the clip, at most 15 s.
        assert times and all(0 <= a < b <= duration + 0.05 and b - a <= 15.0 for a, b in times)
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(times, times[1:]))


def test_transcribe_glob_vtt_next_to_inputs(tiny_official, tmp_path):
    for f in FLACS:
        shutil.copy(f, tmp_path / f.name)
    ok(run("transcribe", "*.flac", "--model", tiny_official, "-f", "vtt", "--max-tokens", "3", cwd=tmp_path))
    for f in FLACS:
        text = (tmp_path / (f.stem + ".vtt")).read_text()
        assert text.startswith("WEBVTT\n\n")
        assert len(VTT_CUE.findall(text)) == text.count(" --> ")


def test_transcribe_json_several_files_and_long_audio(tiny_official, tmp_path):
    import numpy as np
    import soundfile as sf

    from phi4mm.inputs.audio import load_audio
    long = np.concatenate([load_audio(f) for f in FLACS] * 3)  # ~35 s: several timed cues
    sf.write(tmp_path / "long.wav", long, 16000)
    out = tmp_path / "out"
    ok(run("transcribe", tmp_path / "long.wav", FLACS[0], "--model", tiny_official, "--format",
           "txt,verbose_json", "-o", out, "--max-tokens", "3"))
    assert sorted(p.name for p in out.iterdir()) == sorted(["long.txt", "long.json", FLACS[0].stem + ".txt",
                                                            FLACS[0].stem + ".json"])
    v = json.loads((out / "long.json").read_text())
    assert (out / "long.txt").read_text() == v["text"] + "\n"
    assert v["task"] == "transcribe" and v["duration"] == pytest.approx(long.size / 16000, abs=1e-3)
    segs = v["segments"]
    # Cues follow the detected speech: more than one for 35 s, in order, inside the file, each <= 15 s.
    assert len(segs) >= 2 and all(0 <= s["start"] < s["end"] <= v["duration"] + 1e-3 for s in segs)
    assert all(a["end"] <= b["start"] for a, b in zip(segs, segs[1:]))
    assert all(s["end"] - s["start"] <= 15.0 for s in segs)
    assert all(s["avg_logprob"] < 0 and 0 <= s["no_speech_prob"] <= 1 for s in segs)  # measured, not placeholders
    assert set(json.loads((out / (FLACS[0].stem + ".json")).read_text())) >= {"text", "segments"}
    assert all(len(s["tokens"]) <= 3 for s in segs)


def test_transcribe_goes_on_past_bad_files_and_reads_stdin(tiny_official, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(FLACS[0], src / "a.flac")
    (src / "empty.wav").write_bytes(b"")
    (src / "notes.mp3").write_text("not a recording")
    out = tmp_path / "out"
    p = run("transcribe", src, "--model", tiny_official, "-o", out, "--max-tokens", "2")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "empty.wav' is empty (0 bytes)" in p.stderr and "notes.mp3' is not an audio or video file" in p.stderr
    assert "2 of 3 inputs could not be read" in p.stderr and (out / "a.txt").read_text().strip()
    piped = subprocess.run(ENTRY + ["transcribe", "-", "--model", str(tiny_official), "--max-tokens", "2"],
                           input=FLACS[0].read_bytes(), capture_output=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout.decode() == (out / "a.txt").read_text()


def test_summarize_and_chat_video(tiny_official, tmp_path):
    from tests.inputs.media_files import write_video
    p = ok(run("summarize", FLACS[2], "--model", tiny_official, "--max-tokens", "2", "--json"))
    s = json.loads(p.stdout)
    assert set(s) == {"text", "duration", "parts"} and len(s["parts"]) == 1
    clip = write_video(tmp_path / "clip.mp4", seconds=2, fps=5)
    ok(run("chat", "What happens?", "--video", clip, "--video-max-frames", "2", "--model", tiny_official,
           "--max-tokens", "2"))
    one_line_error(run("chat", "hi", "--video", clip, "--video-audio", "--model", tiny_official), "no audio track")
    one_line_error(run("summarize", tmp_path / "nope.m4a", "--model", tiny_official), "no such file")


def test_translate_one_file_json_to_stdout(tiny_official):
    p = ok(run("translate", FLACS[1], "--model", tiny_official, "--language", "fr", "--format", "json",
               "--max-tokens", "3"))
    assert set(json.loads(p.stdout)) == {"text"} and "wrote" not in p.stderr
    merged = ok(run("translate", FLACS[1], "--model", tiny_official, "--language", "fr", "--format", "json",
                    "--max-tokens", "3", "--merge-adapter", "speech"))  # the merged fast path: the same text
    assert merged.stdout == p.stdout


def test_train_command_runs_a_stage_and_refuses_bad_data(tiny_official, tmp_path, capsys):
    import json as _json

    from phi4mm.cli import main as cli
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("red", "blue")]
    data.write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "trained"
    assert cli.main(["train", str(data), str(out), "--model", str(tiny_official), "--stage", "text",
                     "--max-steps", "2", "--lr", "1e-3"]) == 0
    assert "trained text: 2 steps" in capsys.readouterr().out
    assert (out / "config.json").is_file() and (out / "text-lora" / "adapter_model.safetensors").is_file()
    data.write_text(_json.dumps(rows[0]) + "\n{not json\n")
    assert cli.main(["train", str(data), str(tmp_path / "bad"), "--model", str(tiny_official), "--stage", "text"]) == 2
    err = capsys.readouterr().err.strip()
    assert ":2" in err and len(err.splitlines()) == 1


def test_one_stage_on_a_gpu_prepares_media_in_workers_shared_by_the_host(monkeypatch):
    from phi4mm.cli.main import stage_workers
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert stage_workers(None, "cuda") == 8  # up to 8 per process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 processes on this host share its cores
    assert stage_workers(None, "cuda:3") == 4
    assert stage_workers(None, "cpu") == 0  # inline: workers would take the training's cores
    assert stage_workers(3, "cuda") == 3 and stage_workers(0, "cuda") == 0  # what the user asked for


# ------------------------------------------------------------------------------------------------ eval
def test_eval_scores_the_embedded_model_and_writes_its_predictions(tmp_path, capsys):
    """The default model on held-out shape questions and tool calls (the first 12 of each: the model's quality
    on all of them is tests/micro's business): the printed score is the share of written predictions that match
    their reference."""
    preds = tmp_path / "preds.jsonl"
    # In-process: the entry point's own start is proven by the subprocess tests above (~6 s each here).
    assert cli.main([str(a) for a in ("eval", DATA / "micro_heldout_shapes.jsonl", DATA / "micro_heldout_tools.jsonl",
                                      "--metric", "exact", "--max-tokens", "8", "--json", "--limit", "12",
                                      "--predictions", tmp_path / "preds")]) == 0
    res = json.loads(capsys.readouterr().out)
    shapes = res[str(DATA / "micro_heldout_shapes.jsonl")]
    assert shapes["metric"] == "exact" and shapes["n"] == 12
    rows = [json.loads(x) for x in (tmp_path / "preds" / "micro_heldout_shapes.predictions.jsonl").read_text()
            .splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 13))
    hits = sum(r["prediction"].strip().lower() == r["references"][0].lower() for r in rows)
    assert shapes["score"] == pytest.approx(hits / 12) and hits >= 9
    assert (tmp_path / "preds" / "micro_heldout_tools.predictions.jsonl").is_file()
    # one file, --limit, a file path for --predictions and the plain table
    assert cli.main(["eval", str(DATA / "micro_heldout_shapes.jsonl"), "--metric", "exact", "--max-tokens", "8",
                     "--limit", "4", "--predictions", str(preds)]) == 0
    name, metric, score, n = capsys.readouterr().out.strip().split("\t")
    assert (metric, n) == ("exact", "n=4") and 0 <= float(score) <= 1
    assert len(preds.read_text().splitlines()) == 4
