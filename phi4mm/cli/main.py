"""The `phi4mm` command line. Errors a user can fix end with one sentence on stderr and exit code 2.

Subcommands: chat (one-shot or interactive: repl.py), transcribe / translate (files, folders, globs ->
txt/srt/vtt/json), serve (the OpenAI-compatible server with vLLM's flags: serving.py, or Ray Serve replicas),
batch (a JSONL file of prompts, here or on Ray Data replicas), eval (scores on JSONL sets), bench (offline engine
throughput), train (a recipe stage), make-checkpoint (random weights), quantize (an fp8/int4 copy). The arguments are in args.py and every
check that needs no model in checks.py: both run before torch is imported, so a mistake is answered at once.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from phi4mm.cli.args import parser as _parser
from phi4mm.cli.checks import UserError, check
from phi4mm.cli.common import engine_options, load_model, make_engine
from phi4mm.cli.media import (
    check_chat_files,
    summarize_command,
    transcribe_command,
    video_options,
)

MICRO_NAME = "phi4mm-micro"  # the embedded model's name when served
NO_MODEL = "train needs --model, the checkpoint to fine-tune (or --recipe micro to train the micro model)"


# ------------------------------------------------------------------------------------------------ helpers
# ------------------------------------------------------------------------------------------------ chat
def _chat(args: Any) -> int:
    from phi4mm.cli.repl import Conversation, repl
    check_chat_files(args)
    interactive = args.interactive or (args.prompt is None and sys.stdin.isatty())
    if args.prompt is None and not interactive:
        raise UserError("give a prompt, or use --interactive to read the conversation from stdin")
    model = load_model(args)
    params = model.sampling_params(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                   seed=args.seed).validate()
    chat = Conversation(make_engine(model, engine_options(args)), params, args.system, args.tool_list,
                        args.tool_choice, video_options(args))
    for f in args.video:
        chat.attach("video", f)
    for f in args.image:
        chat.attach("image", f)
    for f in args.audio:
        chat.attach("audio", f)
    if args.prompt is not None:
        chat.say(args.prompt, sys.stdout)
    if interactive:
        repl(chat, UserError)
    return 0


# ------------------------------------------------------------------------------------------------ serve, batch, eval
def _serve(args: Any) -> int:
    from phi4mm.cli.serving import serve
    return serve(args, engine_options(args, max_waiting=args.max_waiting,
                                      static_decode=False if args.enforce_eager else None))


def _batch(args: Any) -> int:
    from phi4mm.sampling import SamplingParams, generation_defaults
    from phi4mm.tasks.batch import run_batch
    given = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    # The checkpoint's generation_config.json, then the flags: the same defaults as the server and the API.
    defaults = SamplingParams(**{**generation_defaults(args.model), **{k: v for k, v in given.items()
                                                                       if v is not None}})
    r = run_batch(args.model, args.data, args.out, defaults=defaults, replicas=args.replicas,
                  gpus_per_replica=args.gpus_per_replica, batch_size=args.batch_size, device=args.device,
                  dtype=args.dtype, max_batch=args.max_batch, merge_adapter=args.merge_adapter,
                  ray_address=args.ray_address, quantization=args.quantization, quantize_head=args.quantize_head)
    print(f"{r['lines']} lines, {r['errors']} errors -> {r['out']}")
    return 0


def _eval(args: Any) -> int:
    from phi4mm.tasks.evaluate import evaluate
    from phi4mm.tasks.evaluate import load_model as load_eval_model
    model = load_eval_model(args.model, args.device, args.dtype, args.text_adapter, args.quantization,
                            args.quantize_head)
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
    model = load_model(args)
    engine = make_engine(model, engine_options(args))
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
    if not str(device).startswith("cuda"):
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
    from phi4mm.train.distributed import finish_distributed
    finish_distributed()  # torchrun: every rank leaves the process group together
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
HANDLERS = {"chat": _chat, "transcribe": transcribe_command, "translate": transcribe_command,
            "summarize": summarize_command, "serve": _serve, "bench": _bench,
            "train": _train, "eval": _eval, "batch": _batch}


def _resolve(args: Any) -> None:
    """--model: the embedded micro model when absent, a Hugging Face id resolved to its cached (or downloaded)
    folder; --device auto: the device found here."""
    from phi4mm.api import pick_device, resolve_model
    if getattr(args, "replicas", None) is not None and args.device == "auto":
        args.device = "cuda" if args.gpus_per_replica > 0 else "cpu"  # the replicas', not this machine's
    else:
        args.device = str(pick_device(args.device))
    if args.cmd == "train" and args.model is None:
        return
    args.model_name = MICRO_NAME if args.model is None else str(args.model)  # as given: the server's model name
    if args.model is None:
        from phi4mm.micro.recipe import default_model_dir
        args.model = default_model_dir()
    args.model = resolve_model(args.model)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        check(args)  # everything that needs no model: answered before torch is imported
        if args.cmd == "make-checkpoint":
            import torch

            from phi4mm.tasks.make_checkpoint import make_checkpoint
            out = make_checkpoint(args.out, args.size, args.layout, args.seed, getattr(torch, args.dtype),
                                  device=args.device)
            print(f"wrote {args.size} {args.layout} checkpoint to {out}")
            return 0
        if args.cmd == "quantize":
            from phi4mm.tasks.quantize import quantize_checkpoint
            r = quantize_checkpoint(args.src, args.out, args.method, args.device, head=args.quantize_head)
            what = f"{r['quantized'] - 1} linears and the embedding/head" if r["head"] else f"{r['quantized']} linears"
            print(f"quantized {what} to {r['method']} in {r['seconds']:.1f} s: "
                  f"{r['bytes_before'] / 2**30:.2f} -> {r['bytes_after'] / 2**30:.2f} GiB of shards; wrote {r['out']}")
            return 0
        _resolve(args)
        return HANDLERS[args.cmd](args)
    except (ValueError, OSError) as e:  # our errors are ValueErrors (AudioError, InputError, ...) that say what to do
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"phi4mm {args.cmd}: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"phi4mm {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
