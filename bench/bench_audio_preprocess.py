"""Audio preprocessing speed: phi4mm's load_audio + log_mel vs transformers' Phi4MultimodalFeatureExtractor.

Both sides do the same work per row and run interleaved in one process, so machine noise hits both alike:
  features      30 s speech already in memory at 16 kHz -> (2998, 80) features
  file 16k      decode a 30 s 16 kHz int16 WAV + features (peer: soundfile.read + extractor)
  file 44.1k    decode a 30 s 44.1 kHz WAV, resample, features (peer: soundfile.read + scipy resample_poly with
                the exact 160/441 ratio, as vLLM does, + extractor; transformers alone refuses 44.1 kHz)
  batch 16      16 WAV files of 5..30 s, decoded and padded into one (16, T_max, 80) batch (peer: one batched
                extractor call)
Median and min of N repeats (ratio = peer / ours), milliseconds. Writes bench/results/audio_preprocess.json.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/bench_audio_preprocess.py [--repeats 20]

One thread per side is how the committed result was made: on a shared 2-core host, both sides' BLAS/OpenMP
worker threads spin between calls and slow each other (and the other side) unpredictably. Preprocessing in
a server runs one clip per worker anyway.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import soxr
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi4mm.inputs.audio import SAMPLE_RATE, load_audio, log_mel, preprocess_audios  # noqa: E402

CLIP_SECONDS = 30.0  # one Whisper-style window; 375 audio tokens
HIGH_RATE = 44100  # the CD rate the original processor mis-resampled
BATCH = 16
BATCH_MIN_SECONDS, BATCH_MAX_SECONDS = 5.0, 30.0
DATA = ROOT / "tests" / "data"
RESULTS = ROOT / "bench" / "results" / "audio_preprocess.json"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def speech_of_length(seconds: float) -> np.ndarray:
    """Real speech (the test clips, concatenated and tiled) cut to `seconds` at 16 kHz."""
    clips = [load_audio(p) for p in sorted(DATA.glob("*.flac"))]
    joined = np.concatenate(clips)  # (n,)
    n = int(seconds * SAMPLE_RATE)
    return np.tile(joined, math.ceil(n / len(joined)))[:n]


def time_pair(ours: Callable[[], object], peer: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median and min ms of each side, alternating calls so load changes hit both alike. On a shared machine the
    min is the better estimate of the uncontended cost; the median says what a busy host sees."""
    ours(), peer()  # warm up caches, FFT plans, lazy imports
    t_ours, t_peer = [], []
    for _ in range(repeats):
        for fn, acc in ((ours, t_ours), (peer, t_peer)):
            t0 = time.perf_counter()
            fn()
            acc.append((time.perf_counter() - t0) * 1e3)
    med_o, med_p, min_o, min_p = (statistics.median(t_ours), statistics.median(t_peer), min(t_ours), min(t_peer))
    return {
        "ours_ms": round(med_o, 2), "peer_ms": round(med_p, 2), "speedup": round(med_p / med_o, 2),
        "ours_min_ms": round(min_o, 2), "peer_min_ms": round(min_p, 2), "speedup_min": round(min_p / min_o, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    import scipy
    import transformers
    from scipy.signal import resample_poly

    fe = transformers.Phi4MultimodalFeatureExtractor(sampling_rate=SAMPLE_RATE)
    hf = lambda w: fe(w, sampling_rate=SAMPLE_RATE, return_tensors="np")["audio_input_features"]  # noqa: E731
    g = math.gcd(SAMPLE_RATE, HIGH_RATE)
    up, down = SAMPLE_RATE // g, HIGH_RATE // g  # 160 / 441

    wav = speech_of_length(CLIP_SECONDS)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        p16 = os.path.join(tmp, "clip16k.wav")
        p44 = os.path.join(tmp, "clip44k.wav")
        sf.write(p16, wav, SAMPLE_RATE, subtype="PCM_16")
        sf.write(p44, soxr.resample(wav, SAMPLE_RATE, HIGH_RATE, quality="VHQ"), HIGH_RATE, subtype="PCM_16")
        batch_paths = []
        for i, sec in enumerate(np.linspace(BATCH_MIN_SECONDS, BATCH_MAX_SECONDS, BATCH)):
            p = os.path.join(tmp, f"b{i}.wav")
            sf.write(p, speech_of_length(float(sec)), SAMPLE_RATE, subtype="PCM_16")
            batch_paths.append(p)

        def peer_file16() -> object:
            return hf(sf.read(p16, dtype="float32")[0])

        def peer_file44() -> object:
            x, sr = sf.read(p44, dtype="float32")
            return hf(resample_poly(x, up, down).astype(np.float32))

        def peer_batch() -> object:
            return hf([sf.read(p, dtype="float32")[0] for p in batch_paths])

        cases = [
            ("features 30 s (array in)", lambda: log_mel(wav), lambda: hf(wav)),
            ("file 16 kHz wav 30 s -> features", lambda: log_mel(load_audio(p16)), peer_file16),
            ("file 44.1 kHz wav 30 s -> resample -> features", lambda: log_mel(load_audio(p44)), peer_file44),
            (
                f"batch {BATCH} wav files {BATCH_MIN_SECONDS:.0f}-{BATCH_MAX_SECONDS:.0f} s -> padded features",
                lambda: preprocess_audios([load_audio(p) for p in batch_paths]),
                peer_batch,
            ),
        ]
        for i, (name, ours, peer) in enumerate(cases):
            # The batch case is ~100x the work of the others; fewer repeats keep the run around a minute.
            repeats = args.repeats if i < len(cases) - 1 else max(3, args.repeats // 4)
            rows.append({"case": name, "repeats": repeats, **time_pair(ours, peer, repeats)})

    width = max(len(r["case"]) for r in rows)
    head = ("ours ms", "peer ms", "ratio", "ours min", "peer min", "ratio")
    print(f"{'case':<{width}}  " + "  ".join(f"{h:>8}" for h in head))
    for r in rows:
        print(
            f"{r['case']:<{width}}  {r['ours_ms']:>8.2f}  {r['peer_ms']:>8.2f}  {r['speedup']:>7.2f}x  "
            f"{r['ours_min_ms']:>8.2f}  {r['peer_min_ms']:>8.2f}  {r['speedup_min']:>7.2f}x"
        )

    result = {
        "benchmark": "audio preprocessing: phi4mm load_audio + log_mel vs transformers Phi4MultimodalFeatureExtractor",
        "peer": f"transformers {transformers.__version__} Phi4MultimodalFeatureExtractor (+ soundfile.read, + scipy "
        "resample_poly for 44.1 kHz)",
        "repeats": args.repeats,
        "statistic": "median (and min) wall ms per call, ours and peer interleaved; speedup = peer / ours",
        "rows": rows,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "scipy": scipy.__version__,
            "soxr": soxr.__version__,
            "soundfile": sf.__version__,
            "libsndfile": sf.__libsndfile_version__,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2),  # other jobs on the host make timings noisy
            "thread_env": {k: os.environ.get(k) for k in THREAD_VARS},
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
