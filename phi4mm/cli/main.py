"""The `phi4mm` command line. Errors a user can fix end with one sentence on stderr and exit code 2.

Subcommands: chat (one-shot or interactive), transcribe / translate (files, folders, globs -> txt/srt/vtt/json),
serve (the OpenAI-compatible server, or Ray Serve replicas), batch (a JSONL file of prompts, here or on Ray
Data replicas), eval (scores on JSONL sets), bench (offline engine throughput), train (a recipe stage),
make-checkpoint (random weights). The arguments are in args.py.
Heavy imports (torch, the model) happen inside the commands so `--help` stays instant.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
import time
from pathlib import Path

from phi4mm.cli.args import AUDIO_EXTENSIONS, TRANSCRIBE_FORMATS
from phi4mm.cli.args import parser as _parser
from phi4mm.options import ServeOptions

NO_MODEL = "train needs --model DIR, the checkpoint to fine-tune (or --recipe micro to train the micro model)"


class UserError(ValueError):
    """A mistake on the command line; printed as one sentence, exit code 2."""


# ------------------------------------------------------------------------------------------------ helpers
def _load(args):
    """Load --model (the embedded micro model when none was given) with --device / --dtype."""
    import phi4mm
    return phi4mm.load(args.model, device=args.device, dtype=args.dtype)


def _engine(model, max_batch: int = 64, max_waiting: int = 1024, merge_adapter: str | None = None):
    from phi4mm.engine.engine import Engine, cpu_kv_blocks
    return Engine(model, num_blocks=cpu_kv_blocks(model.device), max_batch=max_batch, max_waiting=max_waiting,
                  merge_adapter=merge_adapter)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"--{name} must be positive; got {value}")


# ------------------------------------------------------------------------------------------------ chat
def _chat(args) -> int:
    from phi4mm.sampling import SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed).validate()
    for f in args.image + args.audio:
        if not Path(f).is_file():
            raise UserError(f"{f}: no such file")
    interactive = args.interactive or (args.prompt is None and sys.stdin.isatty())
    if args.prompt is None and not interactive:
        raise UserError("give a prompt, or use --interactive to read the conversation from stdin")
    tools = _read_tools(args.tools) if args.tools is not None else None
    model = _load(args)
    chat = Conversation(_engine(model, max_batch=1), params, args.system, tools)
    for f in args.image:
        chat.attach("image", f)
    for f in args.audio:
        chat.attach("audio", f)
    if args.prompt is not None:
        chat.say(args.prompt, sys.stdout)
    if interactive:
        _repl(chat)
    return 0


def _read_tools(path: Path) -> list[dict]:
    try:
        tools = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--tools {path}: cannot read it as JSON ({e})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UserError(f"--tools {path}: expected a JSON list of function definitions (OpenAI format)")
    return tools


class Conversation:
    """Messages so far plus every image and audio attached (numbered across the whole conversation)."""

    def __init__(self, engine, params, system: str | None = None, tools: list[dict] | None = None):
        self.engine, self.params, self.system, self.tools = engine, params, system, tools
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.images, self.audios, self.pending = [], [], ""

    def attach(self, kind: str, path: str) -> None:
        """Decode now (so a bad file is reported at once) and reference it in the next user message."""
        if kind == "image":
            from phi4mm.inputs.image import load_image
            self.images.append(load_image(Path(path)))
            self.pending += f"<|image_{len(self.images)}|>"
        else:
            from phi4mm.inputs.audio import SAMPLE_RATE, load_audio
            self.audios.append((load_audio(Path(path)), SAMPLE_RATE))
            self.pending += f"<|audio_{len(self.audios)}|>"

    def say(self, text: str, out) -> str:
        """Add a user turn, stream the reply to `out` as it is generated, keep it in the history."""
        refs = "".join(m.group(0) for m in re.finditer(r"<\|(?:image|audio)_\d+\|>", self.pending)
                       if m.group(0) not in text)
        self.messages.append({"role": "user", "content": refs + text})
        try:
            rid = self.engine.add_request(self.messages, images=self.images, audios=self.audios, params=self.params,
                                          tools=self.tools)
        except ValueError:
            self.messages.pop()
            raise
        self.pending, reply = "", ""
        while self.engine.has_work():
            for o in self.engine.step():
                if o.request_id != rid:
                    continue
                out.write(o.text)
                out.flush()
                reply += o.text
                if o.finished and o.finish_reason == "error":
                    raise RuntimeError(o.error)
        out.write("\n")
        if self.tools:
            from phi4mm.inputs.tools import parse_tool_calls
            calls = parse_tool_calls(reply)[1]
            if calls:  # machine-readable, one line: [{"name": ..., "arguments": {...}}]
                out.write(json.dumps([{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]) + "\n")
        out.flush()
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def _repl(chat: Conversation) -> None:
    tty = sys.stdin.isatty()
    if tty:
        print("phi4mm chat: /image PATH, /audio PATH, /reset, /exit", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            return
        line = line.strip()
        if not line:
            continue
        cmd, _, arg = line.partition(" ")
        try:
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                chat.reset()
                print("(conversation cleared)", file=sys.stderr)
            elif cmd in ("/image", "/audio"):
                if not arg.strip():
                    raise UserError(f"{cmd} needs a file path")
                chat.attach(cmd[1:], arg.strip())
                print(f"(attached {arg.strip()} to your next message)", file=sys.stderr)
            elif cmd == "/help":
                print("/image PATH, /audio PATH: attach to the next message; /reset; /exit", file=sys.stderr)
            elif cmd.startswith("/") and cmd[1:].isalpha():
                raise UserError(f"unknown command {cmd}; try /help")
            else:
                chat.say(line, sys.stdout)
        except (ValueError, OSError) as e:  # report and keep the conversation going
            print(f"error: {e}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ transcribe
def expand_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(audio file, path relative to where its name came from) for files, folders (recursive) and globs."""
    out: dict[Path, Path] = {}
    for item in inputs:
        p = Path(item)
        if p.is_file():
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
    return list(out.items())


def _output_paths(files: list[tuple[Path, Path]], out_dir: Path | None, formats: list[str]
                  ) -> list[dict[str, Path | None]]:
    """Per file: format -> where to write it (None = stdout: one file, one format, no --output-dir)."""
    if len(files) == 1 and out_dir is None and len(formats) == 1:
        return [{formats[0]: None}]
    seen: dict[Path, str] = {}
    outs = []
    for f, rel in files:
        outs.append({})
        for fmt in formats:
            p = (out_dir / rel if out_dir else f).with_suffix("." + {"text": "txt", "verbose_json": "json"}.get(fmt, fmt))
            if p in seen:
                raise UserError(f"{seen[p]} and {f} ({fmt}) would both be written to {p}; rename one, pick other "
                                "formats or run them separately")
            seen[p], outs[-1][fmt] = f"{f} ({fmt})", p
    return outs


def _transcribe(args) -> int:
    formats = list(dict.fromkeys(f.strip() for f in args.format.split(",")))
    for fmt in formats:
        if fmt not in TRANSCRIBE_FORMATS:
            raise UserError(f"--format {fmt!r} is not supported; use one of {', '.join(TRANSCRIBE_FORMATS)} "
                            "(or several, comma-separated)")
    for name in ("max_seconds", "max_tokens", "max_batch"):
        _positive(name.replace("_", "-"), getattr(args, name))
    files = expand_inputs(args.inputs)
    outs = _output_paths(files, args.output_dir, formats)
    _check_readable([f for f, _ in files])  # before importing torch and loading the model: fail in a blink
    from phi4mm.tasks.transcribe import transcription_prompt
    transcription_prompt(args.cmd, args.language, args.prompt)  # validate language and prompt up front
    engine = _engine(_load(args), max_batch=args.max_batch, merge_adapter=args.merge_adapter)
    _run_files(engine, args, files, outs)
    return 0


def _check_readable(paths: list[Path]) -> None:
    """Header check of every input with libsndfile: cheap, and a typo'd or corrupt file fails in a second."""
    import soundfile as sf
    for p in paths:
        try:
            sf.info(str(p))
        except Exception as e:  # libsndfile raises several types; all mean the same to the user
            raise UserError(f"audio file {str(p)!r}: could not decode ({e}); supported containers are wav, flac, "
                            "ogg (vorbis/opus), mp3, aiff") from e


def _run_files(engine, args, files, outs) -> None:
    """Feed files' segments to the engine while it has room, so short files batch together; write each
    file's result as soon as its last segment finishes."""
    from tqdm import tqdm

    from phi4mm.tasks.transcribe import Segment, render, transcription_requests
    bar = tqdm(total=0, unit="segment", file=sys.stderr, disable=None, dynamic_ncols=True)
    todo = list(range(len(files)))
    segs: dict[int, list] = {}  # file index -> its Segments, in time order
    owner: dict[str, tuple[int, int]] = {}  # request id -> (file index, piece index)
    left: dict[int, int] = {}  # file index -> pieces still decoding
    while todo or engine.has_work():
        while todo and len(engine.waiting) + len(engine.running) < args.max_batch:
            i = todo.pop(0)
            reqs = transcription_requests(files[i][0], args.cmd, args.language, args.prompt, args.max_seconds,
                                          args.max_tokens)
            segs[i], left[i] = [Segment(a, b, "") for a, b, _ in reqs], len(reqs)
            bar.total += len(reqs)
            bar.set_description(f"file {len(files) - len(todo)}/{len(files)}")
            for k, (_, _, r) in enumerate(reqs):
                owner[engine.add_request(**r)] = (i, k)
        for o in engine.step():
            i, k = owner[o.request_id]
            seg = segs[i][k]
            seg.text += o.text
            if o.token_id is not None:
                seg.tokens.append(o.token_id)
            if not o.finished:
                continue
            if o.finish_reason == "error":
                raise RuntimeError(f"{files[i][0]}: {o.error}")
            seg.text = seg.text.strip()
            left[i] -= 1
            bar.update(1)
            if left[i] == 0:
                done = segs.pop(i)
                for fmt, path in outs[i].items():
                    _write(render(done, fmt, language=args.language, duration=done[-1].end, task=args.cmd), path)
    bar.close()


def _write(text: str, path: Path | None) -> None:
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ serve, bench
def _serve(args) -> int:
    _positive("max-batch", args.max_batch)
    _positive("max-waiting", args.max_waiting)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535; got {args.port}")
    options = _guard_options(args)
    try:
        from phi4mm.serve.app import serve
    except ImportError as e:
        raise UserError(f"the server is not available in this build ({e})") from e
    if args.replicas is not None:
        _positive("replicas", args.replicas)
        from phi4mm.serve.replicas import serve_forever
        serve_forever(args.model, args.replicas, gpus_per_replica=args.gpus_per_replica, host=args.host,
                      port=args.port, device=args.device, dtype=args.dtype, api_key=args.api_key,
                      max_batch=args.max_batch, max_waiting=args.max_waiting,
                      allow_remote_media=args.allow_remote_media, allow_local_files=args.allow_local_files,
                      merge_adapter=args.merge_adapter, ray_address=args.ray_address, options=options)
        return 0
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, device=args.device, dtype=args.dtype,
          max_batch=args.max_batch, max_waiting=args.max_waiting, allow_remote_media=args.allow_remote_media,
          allow_local_files=args.allow_local_files, merge_adapter=args.merge_adapter, options=options)
    return 0


def _guard_options(args) -> ServeOptions:
    """ServeOptions from the `serve` limit flags (args.guard_args), each checked here: exit 2 on a bad one."""
    limits = {name: getattr(args, name) for name in (
        "max_prompt_chars", "max_messages", "max_tools", "max_images", "max_audio_seconds",
        "max_transcription_seconds", "max_media_bytes", "max_sequences", "max_schema_chars")}
    for name, value in limits.items():
        if not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0; got {value}")
    if args.drain_timeout < 0:
        raise UserError(f"--drain-timeout must be >= 0 seconds; got {args.drain_timeout}")
    media_dir = args.allowed_media_dir
    if media_dir is not None and not Path(media_dir).is_dir():
        raise UserError(f"--allowed-media-dir {media_dir} is not a directory")
    if args.allow_local_files and media_dir is None:
        raise UserError("--allow-local-files needs --allowed-media-dir DIR: local media are read only under one "
                        "directory")
    origins = tuple(o.strip().rstrip("/") for o in args.allowed_origins.split(",") if o.strip())
    return ServeOptions(allowed_media_dir=media_dir, allowed_origins=origins,
                        raw_completion_prompts=args.raw_completion_prompts, drain_timeout_s=args.drain_timeout,
                        **limits)


def _batch(args) -> int:
    for name in ("max_tokens", "max_batch", "batch_size") + (("replicas",) if args.replicas is not None else ()):
        _positive(name.replace("_", "-"), getattr(args, name))
    from phi4mm.sampling import SamplingParams
    from phi4mm.tasks.batch import run_batch
    defaults = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    r = run_batch(args.model, args.data, args.out, defaults=defaults, replicas=args.replicas,
                  gpus_per_replica=args.gpus_per_replica, batch_size=args.batch_size, device=args.device,
                  dtype=args.dtype, max_batch=args.max_batch, merge_adapter=args.merge_adapter,
                  ray_address=args.ray_address)
    print(f"{r['lines']} lines, {r['errors']} errors -> {r['out']}")
    return 0


def _eval(args) -> int:
    if args.limit is not None:
        _positive("limit", args.limit)
    _positive("max-tokens", args.max_tokens)
    for d in args.data:
        if not d.is_file():
            raise UserError(f"{d} is not a file; pass JSONL test sets")
    from phi4mm.tasks.evaluate import evaluate, load_model
    model = load_model(args.model, args.device, args.dtype, args.text_adapter)
    results = {}
    for d in args.data:
        r = evaluate(args.model, d, args.metric, max_tokens=args.max_tokens, text_adapter=args.text_adapter,
                     limit=args.limit, model=model, progress=True)
        results[str(d)] = r
        if args.predictions is not None:
            one = len(args.data) == 1 and args.predictions.suffix == ".jsonl"
            path = args.predictions if one else args.predictions / f"{d.stem}.predictions.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in r["predictions"]),
                            encoding="utf-8")
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: {m: v[m] for m in ("metric", "score", "n")} for k, v in results.items()}))
    else:
        for k, v in results.items():
            print(f"{k}\t{v['metric']}\t{v['score']:.4f}\tn={v['n']}")
    return 0


def _bench(args) -> int:
    import torch

    from phi4mm.inputs.prepare import Prepared
    from phi4mm.sampling import SamplingParams
    for name in ("requests", "prompt_tokens", "new_tokens", "max_batch"):
        _positive(name.replace("_", "-"), getattr(args, name))
    model = _load(args)
    engine = _engine(model, max_batch=args.max_batch, merge_adapter=args.merge_adapter)
    vocab = model.config.text.vocab_size
    gen = torch.Generator().manual_seed(0)

    def run(n: int, new: int) -> float:
        params = SamplingParams(max_tokens=new, ignore_eos=True)
        preps = [Prepared(torch.randint(100, vocab - 1, (args.prompt_tokens,), generator=gen).tolist(), None, None,
                          None, "speech") for _ in range(n)]
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        t0 = time.perf_counter()
        for p in preps:
            engine.add_request(p, params=params)
        while engine.has_work():
            engine.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return time.perf_counter() - t0

    run(1, 2)  # warm-up: first-call allocations, kernel selection
    steps0 = engine.stats["steps"]
    wall = run(args.requests, args.new_tokens)  # includes admission (tokenizer stream setup), as a user sees it
    n_gen, n_prompt = args.requests * args.new_tokens, args.requests * args.prompt_tokens
    print(f"model {args.model} on {model.device} ({str(model.dtype).replace('torch.', '')}): {args.requests} "
          f"requests x ({args.prompt_tokens} prompt + {args.new_tokens} new tokens), max batch {args.max_batch}")
    print(f"wall {wall:.3f} s | generated {n_gen / wall:.1f} tok/s | prompt+generated "
          f"{(n_gen + n_prompt) / wall:.1f} tok/s | {engine.stats['steps'] - steps0} steps")
    return 0


def stage_workers(asked: int | None, device: str) -> int:
    """Data workers of one stage. On a GPU the default is a share of the cores: inline preprocessing (the old
    default) made the GPU wait on it, 14 of a one-GPU run's 21 s in bench_ddp on an H200 (speech-lora, full
    size), and two torchrun processes then ran 3.7x faster than one instead of 2x. On a CPU, workers would
    take cores from the training itself."""
    if asked is not None:
        return max(0, asked)
    if not device.startswith("cuda"):
        return 0
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // per_host))


def _train(args) -> int:
    if args.recipe is not None:
        return _recipe(args)
    if args.model is None:
        raise UserError(NO_MODEL)
    if args.data is None or args.out is None or args.stage is None:
        raise UserError("train needs DATA OUT and --stage (or --recipe micro RUN_DIR)")
    from phi4mm.train.trainer import train
    s = train(args.model, args.data, args.stage, args.out, epochs=args.epochs, max_steps=args.max_steps,
              lr=args.lr, batch_tokens=args.batch_tokens, grad_accum=args.grad_accum, seed=args.seed,
              lora_rank=args.lora_rank, device=args.device, dtype=args.dtype, amp=args.amp,
              grad_checkpointing=args.grad_checkpointing, warmup_steps=args.warmup_steps,
              save_every=args.save_every, resume=args.resume, skip_bad=args.skip_bad,
              workers=stage_workers(args.workers, args.device), fsdp=args.fsdp)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns here; one line is enough
        print(f"trained {s['stage']}: {s['steps']} steps, final loss {s['final_loss']:.4f}, "
              f"{len(s['skipped'])} bad lines skipped; wrote {s['out']}")
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():  # torchrun: leave the process group cleanly (NCCL warns)
        dist.destroy_process_group()
    return 0


def _recipe(args) -> int:
    run = args.out or args.data
    if run is None or args.out is not None and args.data is not None:
        raise UserError("--recipe micro takes one folder, the run directory: phi4mm train --recipe micro RUN_DIR")
    from phi4mm.micro.recipe import run_recipe
    s = run_recipe(run, device=args.device, seed=args.seed, scale=args.scale, workers=args.workers,
                   epochs_scale=args.epochs_scale, max_minutes=args.max_minutes, stop_after=args.stop_after)
    if "stopped_before" in s:
        print(f"stopped before stage {s['stopped_before']}; run again without --stop-after to continue")
        return 0
    print(f"trained the micro model in {s['train_seconds']:.0f} s; wrote {Path(run) / 'model'}")
    for task, r in s.get("eval", {}).items():
        goal = "" if r["goal"] is None else f" (goal {r['goal']}: {'met' if r['met'] else 'NOT met'})"
        print(f"  {task:18s} {r['metric']:5s} {r['score']:.3f}{goal}")
    return 0


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "make-checkpoint":
            import torch

            from phi4mm.tasks.make_checkpoint import make_checkpoint
            out = make_checkpoint(args.out, args.size, args.layout, args.seed, getattr(torch, args.dtype),
                                  device=args.device)
            print(f"wrote {args.size} {args.layout} checkpoint to {out}")
            return 0
        if getattr(args, "model", "") is None and args.cmd != "train":
            from phi4mm.micro.recipe import default_model_dir
            args.model = default_model_dir()
        handler = {"chat": _chat, "transcribe": _transcribe, "translate": _transcribe, "serve": _serve,
                   "bench": _bench, "train": _train, "eval": _eval, "batch": _batch}[args.cmd]
        return handler(args)
    except (ValueError, OSError) as e:  # our errors are ValueErrors (AudioError, InputError, ...) that say what to do
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"phi4mm {args.cmd}: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"phi4mm {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
