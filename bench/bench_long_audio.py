"""Peak RSS of streaming a long recording through decoding, resampling and the voice-activity cue cutter.

    python bench/bench_long_audio.py --minutes 10 120 [--transcribe]

For each length a recording is generated (tests/inputs/long_audio.py: three real speech clips every 60 s,
silence between them; a 16-bit wav, or --format m4a/webm through FFmpeg), then a fresh process streams it and
reports its peak RSS (ru_maxrss), the cues found and the wall time. With --transcribe the process also runs the
micro model on every cue (max 4 tokens each). Memory flat in the length means the same peak for every length.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))


def child(path: str, transcribe: bool) -> None:
    from phi4mm.inputs.av_audio import stream_audio
    from phi4mm.inputs.vad import CueCutter, cut_cues
    t = time.perf_counter()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if transcribe:
        import phi4mm
        from phi4mm.engine.engine import Engine, cpu_kv_blocks
        from phi4mm.micro.recipe import default_model_dir
        from phi4mm.tasks.transcribe import transcribe_stream
        model = phi4mm.load(default_model_dir())
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = sum(1 for _ in transcribe_stream(Engine(model, num_blocks=cpu_kv_blocks(model.device)), path,
                                             max_tokens=4))
        dur = None
    else:
        cutter = CueCutter()
        n = sum(1 for _ in cut_cues(stream_audio(path), cutter=cutter))
        dur = cutter.duration
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"cues": n, "duration_s": dur, "peak_rss_mb": peak / 1024, "rss_before_mb": base / 1024,
                      "wall_s": round(time.perf_counter() - t, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, nargs="+", default=[10, 120])
    ap.add_argument("--transcribe", action="store_true")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.transcribe)
    from tests.inputs.long_audio import write_long_recording
    with tempfile.TemporaryDirectory() as d:
        for m in a.minutes:
            path = Path(d) / f"long_{m:g}min.wav"
            write_long_recording(path, m, speech_every_s=60)
            out = subprocess.run([sys.executable, __file__, "--child", str(path)] + (["--transcribe"] if a.transcribe
                                 else []), capture_output=True, text=True, check=True, cwd=ROOT)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"minutes": m, "file_mb": round(path.stat().st_size / 2**20, 1), **r}), flush=True)


if __name__ == "__main__":
    main()
