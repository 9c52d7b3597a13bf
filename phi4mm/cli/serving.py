"""`phi4mm serve`: load the model and its adapters, build the engine and the app, print a banner, serve.

vLLM's flags that mean something here are honoured (--lora-modules, --max-lora-rank, --limit-mm-per-prompt,
--max-model-len, --gpu-memory-utilization, --max-num-seqs, --served-model-name, --dtype auto,
--enforce-eager); the ones that change nothing are accepted with one start-up line each saying why
(`IGNORED`), so a command line pasted from vLLM's docs or the model card runs as written.
"""
from __future__ import annotations

import sys
from typing import Any

# vLLM flag -> (its argparse dest, why it changes nothing here).
IGNORED = {
    "--trust-remote-code": ("trust_remote_code", ("phi4mm runs its own implementation; no code from the "
                                                  "checkpoint is executed")),
    "--enable-lora": ("enable_lora", "adapters are always enabled"),
    "--max-loras": ("max_loras", ("every loaded adapter stays resident; requests of different adapters share "
                                  "batches")),
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
        own = base is not None and Path(folder).resolve() == (base / f"{name}-lora").resolve()
        if own and name in model.config.loras:
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


def serve(args: Any, options: Any) -> int:
    from phi4mm.cli.common import load_model, make_engine
    for line in ignored_flags(args):
        _say(line)
    if args.replicas is not None:
        from phi4mm.serve.replicas import serve_forever
        serve_forever(args.model, args.replicas, gpus_per_replica=args.gpus_per_replica, host=args.host,
                      port=args.port, device=args.device, dtype=args.dtype, api_key=args.api_key,
                      max_batch=args.max_batch, max_waiting=args.max_waiting,
                      allow_remote_media=args.allow_remote_media, allow_local_files=args.allow_local_files,
                      merge_adapter=args.merge_adapter, ray_address=args.ray_address)
        return 0
    import uvicorn

    from phi4mm.serve.app import create_app
    model = load_model(args)
    load_adapters(model, args.lora_folders, args.max_lora_rank)
    engine = make_engine(model, options)
    if model.device.type == "cuda":
        # Compile the kernels and capture the first graphs now, not on the first user's request.
        _say(f"engine warm-up: {engine.warmup():.1f} s")
    names = list(args.served_model_name or [args.model_name])
    app = create_app(model, engine, model_name=names[0], aliases=(*names[1:], "phi4mm"), api_key=args.api_key,
                     max_waiting=args.max_waiting, allow_remote_media=args.allow_remote_media,
                     allow_local_files=args.allow_local_files, max_body_bytes=args.max_body_bytes,
                     mm_limits=args.mm_limits)
    host = f"[{args.host}]" if ":" in args.host else args.host
    for line in banner(model, engine, app.state.server.names, f"http://{host}:{args.port}"):
        _say(line)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
