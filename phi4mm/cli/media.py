"""The media commands of the CLI: transcribe / translate (files, folders, globs, stdin), summarize, and chat's
--video option. Errors a user can fix are a UserError: one sentence on stderr, exit code 2."""
from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

from phi4mm.cli.args import AUDIO_EXTENSIONS, TRANSCRIBE_FORMATS

STDIN = "-"


class UserError(ValueError):
    """A mistake on the command line; printed as one sentence, exit code 2."""


def positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"--{name} must be positive; got {value}")


def warn(cmd: str, message: str) -> None:
    print(f"phi4mm {cmd}: warning: {' '.join(message.split())}", file=sys.stderr)


def language_warning(cmd: str, language: str | None) -> None:
    """Any language name is accepted; one outside the model card's list gets a warning, never a refusal."""
    from phi4mm.tasks.transcribe import (
        SPEECH_LANGUAGES,
        is_card_language,
        language_name,
    )
    name = language_name(language)
    if not is_card_language(name):
        warn(cmd, f"{name} is not one of the model card's speech languages ({', '.join(SPEECH_LANGUAGES.values())})"
             "; the base model was not trained on it, so expect poor output unless this checkpoint was fine-tuned "
             "for it")


# ------------------------------------------------------------------------------------------------ inputs
def expand_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(audio file, path relative to where its name came from) for files, folders (recursive), globs and "-"."""
    out: dict[Path, Path] = {}
    for item in inputs:
        p = Path(item)
        if item == STDIN:
            found = [(p, Path("stdin"))]
        elif p.is_file():
            found = [(p, Path(p.name))]
        elif p.is_dir():
            found = [(f, f.relative_to(p)) for f in sorted(p.rglob("*"))
                     if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS]
            if not found:
                raise UserError(f"folder {item} holds no audio files ({' '.join(AUDIO_EXTENSIONS)})")
        elif glob.has_magic(item):
            found = [(Path(f), Path(Path(f).name)) for f in sorted(glob.glob(item, recursive=True))
                     if Path(f).is_file()]
            if not found:
                raise UserError(f"the pattern {item} matches no files")
        else:
            raise UserError(f"{item}: no such file or folder")
        for f, rel in found:
            out.setdefault(f, rel)
    if sum(str(f) == STDIN for f in out) and len(out) > 1:
        raise UserError("- (stdin) must be the only input; run the other files separately")
    return list(out.items())


def output_paths(files: list[tuple[Path, Path]], out_dir: Path | None, formats: list[str]
                 ) -> list[dict[str, Path | None]]:
    """Per file: format -> where to write it (None = stdout: one file, one format, no --output-dir)."""
    if len(files) == 1 and out_dir is None and len(formats) == 1:
        return [{formats[0]: None}]
    seen: dict[Path, str] = {}
    outs = []
    for f, rel in files:
        outs.append({})
        for fmt in formats:
            base = (out_dir / rel if out_dir else (Path("stdin") if str(f) == STDIN else f))
            p = base.with_suffix("." + {"text": "txt", "verbose_json": "json"}.get(fmt, fmt))
            if p in seen:
                raise UserError(f"{seen[p]} and {f} ({fmt}) would both be written to {p}; rename one, pick other "
                                "formats or run them separately")
            seen[p], outs[-1][fmt] = f"{f} ({fmt})", p
    return outs


def probe(path: Path) -> str | None:
    """A cheap check before the model loads: None if the file opens as audio, else one sentence why not."""
    if str(path) == STDIN:
        return None
    from phi4mm.inputs.av_audio import DecodeError, stream_audio
    try:
        next(iter(stream_audio(path, block_seconds=0.5)), None)
    except DecodeError as e:
        return str(e)
    return None


def _engine(args, max_batch: int):
    import phi4mm
    from phi4mm.engine.engine import Engine, cpu_kv_blocks
    model = phi4mm.load(args.model, device=args.device, dtype=args.dtype)
    return Engine(model, num_blocks=cpu_kv_blocks(model.device), max_batch=max_batch, max_waiting=1024,
                  merge_adapter=getattr(args, "merge_adapter", None))


# ------------------------------------------------------------------------------------------------ transcribe
def transcribe_command(args) -> int:
    """transcribe / translate: every input, going on past bad files; exit 2 at the end if any failed."""
    formats = list(dict.fromkeys(f.strip() for f in args.format.split(",")))
    for fmt in formats:
        if fmt not in TRANSCRIBE_FORMATS:
            raise UserError(f"--format {fmt!r} is not supported; use one of {', '.join(TRANSCRIBE_FORMATS)} "
                            "(or several, comma-separated)")
    for name in ("max_seconds", "max_tokens", "max_batch"):
        positive(name.replace("_", "-"), getattr(args, name))
    then = getattr(args, "then_translate", None)
    if then is not None and args.cmd != "transcribe":
        raise UserError("--then-translate goes with transcribe; for translate, name the target with --language")
    files = expand_inputs(args.inputs)
    outs = output_paths(files, args.output_dir, formats)
    from phi4mm.tasks.transcribe import render, transcription_prompt
    transcription_prompt(args.cmd, args.language, args.prompt, then)  # validate language and prompt up front
    language_warning(args.cmd, args.language if args.cmd == "translate" else None)
    if then is not None:
        language_warning(args.cmd, then)
    bad = {i: why for i, (f, _) in enumerate(files) if (why := probe(f)) is not None}
    for why in bad.values():
        print(f"phi4mm {args.cmd}: {why}", file=sys.stderr)
    if len(bad) == len(files):  # nothing to do: fail before loading the model
        return 2
    good = [i for i in range(len(files)) if i not in bad]
    engine = _engine(args, args.max_batch)
    failed = len(bad)
    from tqdm import tqdm

    from phi4mm.tasks.transcribe import transcribe_files
    bar = tqdm(total=len(good), unit="file", file=sys.stderr, disable=None, dynamic_ncols=True)
    for res in transcribe_files(engine, [str(files[i][0]) for i in good], args.cmd, args.language, args.prompt,
                                args.max_seconds, args.max_tokens, then, max_in_flight=args.max_batch):
        i = good[res.index]
        bar.update(1)
        if res.error is not None:
            failed += 1
            print(f"phi4mm {args.cmd}: {' '.join(str(res.error).split())}", file=sys.stderr)
            continue
        if not res.segments:
            what = "is silent" if res.silent else "has no speech the voice-activity detector could find"
            warn(args.cmd, f"{files[i][0]} ({res.duration:.1f} s) {what}; its transcript is empty")
        for fmt, path in outs[i].items():
            write(render(res.segments, fmt, language=args.language, duration=res.duration, task=args.cmd), path)
    bar.close()
    if failed:
        print(f"phi4mm {args.cmd}: {failed} of {len(files)} inputs could not be read (see above)", file=sys.stderr)
        return 2
    return 0


def write(text: str, path: Path | None) -> None:
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ summarize
def summarize_command(args) -> int:
    positive("chunk-minutes", args.chunk_minutes)
    positive("max-tokens", args.max_tokens)
    if args.input != STDIN and not Path(args.input).is_file():
        raise UserError(f"{args.input}: no such file")
    if args.input != STDIN and (why := probe(Path(args.input))) is not None:
        raise UserError(why)
    from phi4mm.tasks.summarize import summarize
    s = summarize(_engine(args, 8), args.input, question=args.question, chunk_minutes=args.chunk_minutes,
                  max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps({"text": s.text, "duration": round(s.duration, 3),
                          "parts": [{"start": round(a, 3), "end": round(b, 3), "text": t} for a, b, t in s.parts]},
                         ensure_ascii=False))
    else:
        print(s.text)
    return 0


# ------------------------------------------------------------------------------------------------ chat --video
def video_options(args) -> dict:
    """chat's --video-* flags as load_video keyword arguments."""
    return {"fps": args.video_fps, "max_frames": args.video_max_frames, "max_image_tokens": args.video_max_tokens,
            "use_audio": args.video_audio}


def check_chat_files(args) -> None:
    """Every --image / --video names a file, --audio a file or "-" (stdin, once, with a prompt)."""
    for f in args.image + args.video + [a for a in args.audio if a != STDIN]:
        if not Path(f).is_file():
            raise UserError(f"{f}: no such file")
    if args.audio.count(STDIN) > 1:
        raise UserError("only one --audio may be - (stdin)")
    if STDIN in args.audio and (args.interactive or args.prompt is None):
        raise UserError("--audio - reads stdin, which an interactive chat needs too; give a prompt instead")
    for name in ("video_fps", "video_max_frames", "video_max_tokens"):
        positive(name.replace("_", "-"), getattr(args, name))
