"""`phi4mm serve`: load the model and its adapters, build the engine and the app, print a banner, serve.

vLLM's flags that mean something here are honoured (--lora-modules, --max-lora-rank, --limit-mm-per-prompt,
--max-model-len, --gpu-memory-utilization, --max-num-seqs, --served-model-name, --dtype auto,
--enforce-eager); the ones that change nothing are accepted with one start-up line each saying why
(`IGNORED`), so a command line pasted from vLLM's docs or the model card runs as written.
"""
from __future__ import annotations

import sys
from typing import Any

from phi4mm.cli.checks import UserError

# vLLM flag -> (its argparse dest, why it changes nothing here).
IGNORED = {
    "--trust-remote-code": ("trust_remote_code", "phi4mm runs its own implementation; no code from the "
                            "checkpoint is executed"),
    "--enable-lora": ("enable_lora", "adapters are always enabled"),
    "--max-loras": ("max_loras", "every loaded adapter stays resident; requests of different adapters share "
                    "batches"),
    "--lora-extra-vocab-size": ("lora_extra_vocab_size", "the adapters add no tokens"),
    "--max-seq-len-to-capture": ("max_seq_len_to_capture", "decode graphs are captured for every length"),
    "--disable-log-requests": ("disable_log_requests", "requests are not logged"),
}


def _say(line: str) -> None:
    print(f"phi4mm serve: {line}", file=sys.stderr, flush=True)


def ignored_flags(args: Any) -> list[str]:
    """One line per vLLM flag given that changes nothing here."""
    lines = []
    for flag, (dest, why) in IGNORED.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False:  # 0 counts: `--lora-extra-vocab-size 0` was given
            lines.append(f"{flag} accepted; {why}")
    return lines


def load_adapters(model: Any, folders: dict, max_rank: int | None) -> list[str]:
    """--lora-modules: each PEFT folder becomes adapter NAME (replacing the checkpoint's own of that name);
    --max-lora-rank: refuse an adapter of a higher rank. -> the adapters' names."""
    from pathlib import Path

    from phi4mm.model.adapters import load_adapter
    base = Path(model.path) if model.path is not None else None
    for name, folder in folders.items():
        if base is not None and name in model.config.loras and Path(folder).resolve() == (base / f"{name}-lora").resolve():
            continue  # the checkpoint's own adapter, loaded already
        load_adapter(model, folder, name)
    if max_rank is not None:
        for name, lc in model.config.loras.items():
            if lc.r > max_rank:
                raise ValueError(f"adapter {name} has rank {lc.r}, above --max-lora-rank {max_rank}; raise the "
                                 "limit or leave the flag out")
    return sorted(model.config.loras)


def banner(model: Any, engine: Any, names: list[str], url: str) -> list[str]:
    """The start-up lines: model, device, dtype, adapters, KV capacity, context, names, URL."""
    cfg = model.config.text
    kv_tokens = engine.pool.num_blocks * engine.block_size
    max_len = getattr(engine, "max_model_len", None) or cfg.max_position_embeddings
    dtype = str(model.dtype).replace("torch.", "")
    adapters = ", ".join(sorted(model.config.loras)) or "none"
    return [f"model {model.path} on {model.device} ({dtype}), adapters: {adapters}",
            f"KV cache {kv_tokens} tokens, max model len {max_len}, up to {engine.max_batch} sequences at once",
            f"model names: {', '.join(names)}",
            f"serving at {url} (OpenAI API under /v1; Ctrl-C stops)"]


def guard_options(args: Any) -> Any:
    """ServeOptions from the `serve` limit and safety flags (args.guard_args), each checked: exit 2 on a bad one."""
    from pathlib import Path

    from phi4mm.options import ServeOptions
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
    return ServeOptions(host=args.host, port=args.port, api_key=args.api_key, allowed_media_dir=media_dir,
                        allowed_origins=origins, raw_completion_prompts=args.raw_completion_prompts,
                        drain_timeout_s=args.drain_timeout, allow_remote_media=args.allow_remote_media,
                        max_body_bytes=args.max_body_bytes, ui=args.ui, **limits)


def serve(args: Any, options: Any) -> int:
    from phi4mm.cli.common import load_model, make_engine
    from phi4mm.engine.memory import limit_malloc_arenas
    serve_options = guard_options(args)
    for line in ignored_flags(args):
        _say(line)
    if args.replicas is not None:
        if args.quantization or args.quantize_head:
            flag = "--quantization" if args.quantization else "--quantize-head"
            raise UserError(f"{flag} does not reach Ray replicas yet; write a quantized checkpoint with "
                            "`phi4mm quantize` (--quantize-head for the head) and serve that")
        from phi4mm.serve.replicas import serve_forever
        serve_forever(args.model, args.replicas, gpus_per_replica=args.gpus_per_replica, host=args.host,
                      port=args.port, device=args.device, dtype=args.dtype, api_key=args.api_key,
                      max_batch=args.max_batch, max_waiting=args.max_waiting,
                      allow_remote_media=args.allow_remote_media, allow_local_files=args.allow_local_files,
                      merge_adapter=args.merge_adapter, ray_address=args.ray_address, options=serve_options)
        return 0
    from phi4mm.serve.app import create_app, run_server
    limit_malloc_arenas()  # a server process, before loading starts threads: engine/memory.py says why
    model = load_model(args)
    load_adapters(model, args.lora_folders, args.max_lora_rank)
    engine = make_engine(model, options)
    if model.device.type == "cuda":
        # Compile the kernels and capture the graphs traffic meets first now, not on users' requests.
        seconds = engine.warmup()
        decode, prefill = engine.graphs_ready
        _say(f"engine warm-up: {seconds:.1f} s ({decode} decode and {prefill} prompt CUDA graphs captured)")
    names = list(args.served_model_name or [args.model_name])
    app = create_app(model, engine, model_name=names[0], aliases=(*names[1:], "phi4mm"), api_key=args.api_key,
                     max_waiting=args.max_waiting, allow_remote_media=args.allow_remote_media,
                     allow_local_files=args.allow_local_files, max_body_bytes=args.max_body_bytes,
                     mm_limits=args.mm_limits, ui=args.ui, options=serve_options)
    host = f"[{args.host}]" if ":" in args.host else args.host
    for line in banner(model, engine, app.state.server.names, f"http://{host}:{args.port}"):
        _say(line)
    run_server(app, serve_options)
    return 0
