"""Synthetic training and test data for the micro model, generated offline and deterministically.

    paths = generate("data/micro", "train", seed=0)   # {task: JSONL path}; media under data/micro/media/

Tasks: asr / ast / sqa (synthetic speech, see micro.speech), ocr and ocr_line (a rendered word or line of words,
see micro.render), shapes (counting and colour questions on drawn scenes), count (only the counting ones), scene
(every shape of a scene named, top to bottom), caption (scikit-image's bundled photos), vsqa (a scene plus a
spoken question), text (small talk, repetition, translation, facts, arithmetic) and tools (function calling).
The test split adds held-out speech sets: asr_heldout_voice and vsqa_heldout_voice (voices no training sample
uses, micro.voices), one set per voice (VOICE_SETS) and one per recording condition (CONDITION_SETS).
Every item is built from its own `random.Random(f"{seed}-{split}-{task}-{i}")`, so the output does not depend
on the number of workers, and a second run gives byte-identical files. Sentences come from a small grammar
over VOCAB; a stable hash holds out ~10% of them (`is_heldout`): the train split never uses those, the test
split uses nothing else. "Vellish" is an invented language, a fixed word-for-word code of English, so speech
translation can be learnt and scored without any real parallel data. Files are `out/{task}.jsonl` and
`out/media/{task}_{i:06d}.{flac,png,jpg}`: give each split its own output folder.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import random
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from phi4mm.micro.render import (  # noqa: F401 (re-exported: the micro data API)
    LINE_FONT_SIZES,
    OCR_FONT_SIZES,
    OCR_SIZE,
    OCR_TEST_SIZES,
    OCR_WORDS,
    fonts,
    line_text,
    render_text,
)
from phi4mm.micro.speech import (
    RATE_WPM,
    Conditions,
    MissingTool,
    check_binaries,
    speak,
    speak_as,
)
from phi4mm.micro.text import (  # noqa: F401 (re-exported: the micro data API)
    ARTISTS,
    CITIES,
    COLOURS,
    DETERMINERS,
    GREETINGS,
    HELDOUT_MODULUS,
    LANGUAGE,
    MESSAGES,
    NO_TOOL_ANSWER,
    NO_TOOL_SHARE,
    NOUNS,
    NUMBERS,
    PEOPLE,
    PLACES,
    PLURALS,
    PREPOSITIONS,
    QA,
    QUERIES,
    ROOMS,
    SENTENCE_WORDS,
    SIZES,
    SYSTEM_TOOLS,
    TIMES,
    TOOL_TABLE,
    VERBS_INTRANSITIVE,
    VERBS_TRANSITIVE,
    VOCAB,
    is_heldout,
    sentence,
    split_sentence,
    to_vellish,
    tool_args,
    tool_spec,
)
from phi4mm.micro.voices import draw_voice, heldout_voices, set_name, trained_voices

# ---- images -----------------------------------------------------------------------------------------------
CANVAS = 448  # longest image side: one 448x448 crop of the vision encoder, no tiling
SHAPE_COLOURS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 30),
                 "purple": (140, 50, 180), "orange": (250, 140, 20)}
SHAPES = ("circle", "square", "triangle")
PATCH_PX = 14  # the vision encoder's patch: scene descriptions follow a raster scan of patches
SHAPE_RADIUS = (45, 75)  # radius of the circle each shape fits in: large enough to see at 448 px
NUMERALS = "012345"
# scikit-image images bundled with the wheel (no download), with short captions. Text-bearing ones are not
# mirrored by the augmentation.
CAPTIONS = {
    "astronaut": ("an astronaut", "a woman in a space suit", "a smiling astronaut next to a flag"),
    "camera": ("a man with a camera", "a black and white photo of a cameraman"),
    "coffee": ("a cup of coffee", "a coffee cup on a saucer"), "chelsea": ("a cat", "an orange cat", "a tabby cat"),
    "rocket": ("a rocket", "a rocket on a launch pad"), "coins": ("old coins", "many coins on a table"),
    "horse": ("a horse", "the black shape of a horse"), "moon": ("the moon", "the surface of the moon"),
    "page": ("a page of text", "a printed page"), "text": ("some text", "letters and numbers on a sign"),
    "clock": ("a clock", "a blurry clock"), "immunohistochemistry": ("cells under a microscope", "a tissue sample"),
    "hubble_deep_field": ("galaxies in space", "many stars and galaxies"), "logo": ("a logo", "a logo with a snake"),
    "brick": ("a brick wall", "gray bricks"), "grass": ("grass", "a close up of grass"),
    "gravel": ("gravel", "small stones on the ground"), "colorwheel": ("a color wheel", "a circle of colors"),
    "cell": ("a cell under a microscope", "a gray picture of a cell"), "retina": ("a retina", "the back of an eye"),
}
NO_FLIP = {"page", "text", "logo", "clock"}

# ---- tasks ------------------------------------------------------------------------------------------------
PROMPTS = {"asr": "Transcribe the audio clip into text.", "ast": f"Translate the audio to {LANGUAGE}.",
           "sqa": "Answer the question in the audio.", "ocr": "What word is written in the image?",
           "ocr_line": "What text is written in the image?", "caption": "Describe the image.",
           "scene": "List the shapes from top to bottom."}
# "count" asks only how many (all or of one colour): counting was what the shapes questions missed most. asr is
# twice the first recipe's 6,000: ~100 training voices instead of 11, and the speech branch of the recipe is the
# shorter one in every phase, so more speech costs no wall time on two GPUs.
TRAIN_COUNTS = {"asr": 12000, "ast": 3000, "sqa": 2000, "ocr": 12000, "ocr_line": 6000, "shapes": 5000,
                "count": 3000, "scene": 5000, "caption": 500, "vsqa": 2000, "text": 4000, "tools": 1500}
# Held-out speech sets, test split only. One per voice (`micro.voices`: every held-out voice, and the trained
# accents, numbered variants and flite voices to compare with), each the same sentences at SCORING_WPM with no
# augmentation; and one per recording condition, on held-out voices, so a run shows what each augmentation paid.
VOICE_SETS = {set_name(e, v): (e, v) for e, v in heldout_voices() + trained_voices()}
CONDITION_SETS = {"asr_rate120": Conditions(wpm=RATE_WPM[0]), "asr_rate200": Conditions(wpm=RATE_WPM[1]),
                  "asr_pitch_low": Conditions(semitones=-3.0), "asr_pitch_high": Conditions(semitones=3.0),
                  "asr_quiet": Conditions(level_dbfs=-35.0), "asr_noise": Conditions(snr_db=15.0),
                  "asr_reverb": Conditions(rt60_s=0.5, drr_db=3.0)}
SPEECH_SET_ITEMS = 40
TEST_COUNTS = {**{t: 200 for t in ("asr", "asr_heldout_voice", "ast", "sqa", "ocr", "ocr_line", "shapes", "count",
                                   "scene", "caption", "vsqa", "vsqa_heldout_voice", "text", "tools")},
               **{t: SPEECH_SET_ITEMS for t in (*VOICE_SETS, *CONDITION_SETS)}}
COUNTS = {"train": TRAIN_COUNTS, "test": TEST_COUNTS}
SPEECH_TASKS = {"asr", "asr_heldout_voice", "sqa", "vsqa", "vsqa_heldout_voice", *VOICE_SETS, *CONDITION_SETS}
MIN_ITEMS = 2


@cache
def _caption_image(name: str) -> Image.Image | None:
    """The named scikit-image sample as RGB, or None when this install cannot load it without a download."""
    try:
        import skimage.data
    except ImportError as e:
        raise MissingTool(f"the caption task needs scikit-image's sample images ({e}); pip install scikit-image")
    try:
        arr = getattr(skimage.data, name)()
    except Exception:  # noqa: BLE001 (not bundled with this version: it would need pooch and a download)
        return None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    img = Image.fromarray(arr)
    if img.mode == "RGBA":  # the logo: flatten its transparency onto white
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        img = bg
    return img.convert("RGB")


def caption_names() -> list[str]:
    """The CAPTIONS images that load on this machine."""
    names = [n for n in CAPTIONS if _caption_image(n) is not None]
    if not names:
        raise MissingTool("none of scikit-image's bundled sample images loads; reinstall scikit-image")
    return names


def _scene(rng: random.Random) -> tuple[Image.Image, list[tuple[str, str]], list[tuple[float, float]]]:
    """1-5 non-overlapping shapes on a light background; returns the image, [(shape, colour)] and each shape's
    topmost point as (y, x)."""
    img = Image.new("RGB", (CANVAS, CANVAS), tuple(rng.randint(225, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    placed: list[tuple[int, int, int]] = []
    items, tops = [], []
    for _ in range(rng.randint(1, 5)):
        for _attempt in range(200):
            r = rng.randint(*SHAPE_RADIUS)
            x, y = rng.randint(r + 4, CANVAS - r - 4), rng.randint(r + 4, CANVAS - r - 4)
            if all((x - a) ** 2 + (y - b) ** 2 > (r + c + 10) ** 2 for a, b, c in placed):
                break
        else:
            continue  # no room left: the scene keeps the shapes it has (the answers count what was drawn)
        placed.append((x, y, r))
        shape, colour = rng.choice(SHAPES), rng.choice(list(SHAPE_COLOURS))
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in SHAPE_COLOURS[colour])
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
            tops.append((y - r, x))
        else:
            k = 4 if shape == "square" else 3
            turn = math.radians(rng.uniform(-15, 15)) + (math.pi / 4 if k == 4 else -math.pi / 2)
            corners = [(x + r * math.cos(turn + 2 * math.pi * j / k), y + r * math.sin(turn + 2 * math.pi * j / k))
                       for j in range(k)]
            draw.polygon(corners, fill=fill)
            tops.append(min((b, a) for a, b in corners))
        items.append((shape, colour))
    return img, items, tops


def _scene_question(rng: random.Random, items: list[tuple[str, str]], kinds: tuple[str, ...] | None = None,
                    ) -> tuple[str, str]:
    """A question about the scene and its answer; `kinds` limits which kinds may be asked."""
    shapes = [s for s in SHAPES if sum(s == a for a, _ in items) == 1]
    colours = [c for c in SHAPE_COLOURS if sum(c == b for _, b in items) == 1]
    kinds = kinds or ("count", "count_colour", *(["colour_of"] if shapes else []), *(["shape_of"] if colours else []))
    kind = rng.choice(kinds)
    if kind == "count":
        return "How many shapes are there?", NUMERALS[len(items)]
    if kind == "count_colour":
        # Mostly a colour that is there, so "0" does not dominate the answers.
        c = rng.choice([b for _, b in items] if rng.random() < 0.7 else list(SHAPE_COLOURS))
        return f"How many {c} shapes are there?", NUMERALS[sum(c == b for _, b in items)]
    if kind == "colour_of":
        s = rng.choice(shapes)
        return f"What color is the {s}?", next(b for a, b in items if a == s)
    c = rng.choice(colours)
    return f"What shape is {c}?", next(a for a, b in items if b == c)


# ---- one item per task ------------------------------------------------------------------------------------
_CTX: dict[str, Any] = {}  # out, split, seed, counts, tmp: set in every worker by _init


def _init(ctx: dict[str, Any]) -> None:
    _CTX.clear()
    _CTX.update(ctx)


def _tmp() -> Path:
    d = Path(_CTX["tmp"]) / str(os.getpid())  # per-process: parallel synthesis never shares a temp file
    d.mkdir(exist_ok=True)
    return d


def _rng(task: str, i: int) -> random.Random:
    return random.Random(f"{_CTX['seed']}-{_CTX['split']}-{task}-{i}")


def _media_name(task: str, i: int, ext: str) -> str:
    return f"media/{task}_{i:06d}.{ext}"


def _part(kind: str, url: str) -> dict[str, Any]:
    return {"type": f"{kind}_url", f"{kind}_url": {"url": url}}


def _chat(parts: list[dict[str, Any]], prompt: str | None, answer: str) -> dict[str, Any]:
    content = parts + ([{"type": "text", "text": prompt}] if prompt is not None else [])
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def _speak(task: str, i: int, text: str, rng: random.Random, heldout_voice: bool = False) -> str:
    name = _media_name(task, i, "flac")
    speak(text, Path(_CTX["out"]) / name, rng, _tmp(), heldout_voice)
    return name


def _asr(task: str, i: int) -> dict[str, Any]:
    rng = _rng(task, i)
    text = split_sentence(rng, _CTX["split"])  # drawn first: ast re-derives it from the same seed
    return _chat([_part("audio", _speak(task, i, text, rng, task == "asr_heldout_voice"))], PROMPTS["asr"], text)


def _ast(task: str, i: int) -> dict[str, Any]:
    # Reuses asr item j's audio (saves synthesis); its sentence comes back from asr's seed, drawn the same way.
    j = i % _CTX["counts"]["asr"]
    text = split_sentence(_rng("asr", j), _CTX["split"])
    return _chat([_part("audio", _media_name("asr", j, "flac"))], PROMPTS["ast"], to_vellish(text))


def _sqa(task: str, i: int) -> dict[str, Any]:
    rng = _rng(task, i)
    q, a = rng.choice(QA)
    return _chat([_part("audio", _speak(task, i, q, rng))], PROMPTS["sqa"], a)


def _ocr(task: str, i: int) -> dict[str, Any]:
    """A rendered word (ocr) or a line of 2-4 words (ocr_line), in the split's fonts and sizes (micro.render)."""
    rng = _rng(task, i)
    split = _CTX["split"]
    if task == "ocr":
        text = rng.choice(OCR_WORDS)
        img = render_text(rng, text, split, OCR_FONT_SIZES[split])
    else:
        text = line_text(rng)
        img = render_text(rng, text, split, LINE_FONT_SIZES[split])
    name = _media_name(task, i, "png")
    img.save(Path(_CTX["out"]) / name)
    return _chat([_part("image", name)], PROMPTS[task], text)


def _asr_set(task: str, i: int) -> dict[str, Any]:
    """Held-out speech: item i of a voice set (the same sentence in every voice, clean, at SCORING_WPM) or of a
    condition set (a held-out voice under that one condition)."""
    rng = _rng("asr_set" if task in VOICE_SETS else task, i)
    text = split_sentence(rng, _CTX["split"])
    engine, voice = VOICE_SETS[task] if task in VOICE_SETS else draw_voice(rng, True)
    name = _media_name(task.replace("@", "_").replace("+", "_"), i, "flac")
    speak_as(text, Path(_CTX["out"]) / name, engine, voice, CONDITION_SETS.get(task, Conditions()), rng, _tmp())
    return _chat([_part("audio", name)], PROMPTS["asr"], text)


def _shapes(task: str, i: int) -> dict[str, Any]:
    """A drawn scene with a question about it (shapes; vsqa: spoken), or every shape of it named (scene)."""
    rng = _rng(task, i)
    img, items, tops = _scene(rng)
    name = _media_name(task, i, "png")
    img.save(Path(_CTX["out"]) / name)
    if task == "scene":
        return _chat([_part("image", name)], PROMPTS["scene"], scene_description(items, tops))
    q, a = _scene_question(rng, items, ("count", "count_colour") if task == "count" else None)
    if task in ("shapes", "count"):
        return _chat([_part("image", name)], q, a)
    heard = _speak(task, i, q, rng, task == "vsqa_heldout_voice")
    return _chat([_part("image", name), _part("audio", heard)], None, a)  # vsqa


def scene_description(items: list[tuple[str, str]], tops: list[tuple[float, float]]) -> str:
    """The scene's shapes in the order a row-by-row scan of 14-px patches meets them (the patch row of each
    shape's topmost point, then its patch column): "red circle, blue square". Every shape of every scene is
    named, so each image teaches what all its shapes are (a shapes question names one), in an order an encoder
    read in raster order can emit (the scene is 448 px: one crop at 1:1, so pixel patches are the encoder's)."""
    def key(k: int) -> tuple:
        y, x = tops[k]
        return int(y) // PATCH_PX, int(x) // PATCH_PX, y, x
    order = sorted(range(len(items)), key=key)
    return ", ".join(f"{items[k][1]} {items[k][0]}" for k in order)


def _caption(task: str, i: int) -> dict[str, Any]:
    rng = _rng(task, i)
    key = rng.choice(caption_names())
    img = _caption_image(key)
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch))
    if key not in NO_FLIP and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = rng.randint(CANVAS // 2, CANVAS)
    f = side / max(cw, ch)
    img = img.resize((max(1, min(CANVAS, round(cw * f))), max(1, min(CANVAS, round(ch * f)))), Image.BICUBIC)
    name = _media_name(task, i, "jpg")
    img.save(Path(_CTX["out"]) / name, quality=90)
    return _chat([_part("image", name)], PROMPTS["caption"], rng.choice(CAPTIONS[key]))


def _text_turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.choices(("greet", "repeat", "translate", "fact", "arith"), (3, 3, 3, 2, 2))[0]
    if kind == "greet":
        return rng.choice(GREETINGS)
    if kind in ("repeat", "translate"):
        s = split_sentence(rng, _CTX["split"])
        return (f"Repeat after me: {s}", s) if kind == "repeat" else (f"Translate to {LANGUAGE}: {s}", to_vellish(s))
    if kind == "fact":
        q, a = rng.choice(QA)
        return q[0].upper() + q[1:] + "?", a
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5 or a < b:
        return f"What is {a} + {b}?", str(a + b)
    return f"What is {a} - {b}?", str(a - b)


def _text(task: str, i: int) -> dict[str, Any]:
    rng = _rng(task, i)
    msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.2 else []
    for _ in range(2 if rng.random() < 0.15 else 1):
        q, a = _text_turn(rng)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def _tools(task: str, i: int) -> dict[str, Any]:
    rng = _rng(task, i)
    names = sorted(TOOL_TABLE)
    need: str | None = rng.choice(names)
    others = [n for n in names if n != need]
    k = rng.randint(2, 5)
    if rng.random() < NO_TOOL_SHARE:  # nothing offered fits: asks for a tool not in the list, or small talk
        offered = rng.sample(others, k)
        if rng.random() < 0.4:
            need = None
    else:
        offered = [need] + rng.sample(others, k - 1)
    rng.shuffle(offered)
    if need is None:
        question, answer = rng.choice(GREETINGS)
    else:
        args = tool_args(need, rng)
        question = rng.choice(TOOL_TABLE[need][2]).format(**args)
        answer = (f"<|tool_call|>{json.dumps([{'name': need, 'arguments': args}])}<|/tool_call|>"
                  if need in offered else NO_TOOL_ANSWER)
    msgs = [{"role": "system", "content": SYSTEM_TOOLS}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]
    return {"messages": msgs, "tools": [tool_spec(n) for n in offered]}


MAKERS = {"asr": _asr, "asr_heldout_voice": _asr, "ast": _ast, "sqa": _sqa, "ocr": _ocr, "ocr_line": _ocr,
          "shapes": _shapes, "count": _shapes, "scene": _shapes, "vsqa": _shapes, "vsqa_heldout_voice": _shapes,
          "caption": _caption, "text": _text, "tools": _tools, **{t: _asr_set for t in (*VOICE_SETS, *CONDITION_SETS)}}


def _run(job: tuple[str, int]) -> str:
    task, i = job
    try:
        return json.dumps(MAKERS[task](task, i))
    except Exception as e:
        raise RuntimeError(f"micro data: {_CTX['split']} {task} item {i} failed: {type(e).__name__}: {e}") from e


def generate(out: str | Path, split: str, seed: int, scale: float = 1.0, workers: int | None = None,
             progress: bool = True, tasks: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write `{task}.jsonl` files (and media under out/media/) for every task; returns {task: path}.

    Deterministic in (split, seed, scale) whatever `workers` is (default: os.cpu_count()). Each task gets
    round(count * scale) items, at least 2; item i does not depend on scale, so a larger scale is a superset.
    Train and test need separate folders (the file names are the same). Workers are spawned, so a script
    calling this needs the usual `if __name__ == "__main__":` guard. `tasks` limits it to those tasks (a probe's
    data); items are the same as in a full run.
    """
    if split not in COUNTS:
        raise ValueError(f"split must be one of {sorted(COUNTS)}, got {split!r}")
    unknown = set(tasks or ()) - set(COUNTS[split])
    if unknown:
        raise ValueError(f"unknown micro tasks {sorted(unknown)}; the {split} split has {sorted(COUNTS[split])}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (a multiplier of the item counts), got {scale!r}")
    counts = {t: max(MIN_ITEMS, round(n * scale)) for t, n in COUNTS[split].items()}
    if tasks is not None:  # ast reuses asr's audio: its count (and so its items) comes from the full table
        counts = {t: n for t, n in counts.items() if t in tasks or (t == "asr" and "ast" in tasks)}
    if SPEECH_TASKS & set(counts):
        check_binaries()  # fail here, with the install hint, rather than in a worker
    fonts(split), caption_names()  # same for fonts and scikit-image
    out = Path(out)
    (out / "media").mkdir(parents=True, exist_ok=True)
    paths = {t: out / f"{t}.jsonl" for t in counts}
    jobs = [(t, i) for t, n in counts.items() for i in range(n)]
    workers = max(1, workers or os.cpu_count() or 1)
    tmp = tempfile.mkdtemp(prefix="phi4mm-micro-")
    ctx = {"out": str(out), "split": split, "seed": seed, "counts": counts, "tmp": tmp}
    pool = None
    files = {t: p.open("w", encoding="utf-8", newline="\n") for t, p in paths.items()}
    try:
        if workers == 1:
            _init(ctx)
            lines = map(_run, jobs)
        else:
            # spawn, not fork: the caller may hold torch / CUDA threads, which a fork can deadlock on.
            pool = mp.get_context("spawn").Pool(workers, _init, (ctx,))
            lines = pool.imap(_run, jobs, chunksize=max(1, min(16, len(jobs) // (workers * 8))))
        for (task, _), line in zip(jobs, tqdm(lines, total=len(jobs), desc=f"micro data ({split})",
                                              disable=not progress)):
            files[task].write(line + "\n")
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        if pool is not None:
            pool.terminate()
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
