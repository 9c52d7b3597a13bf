"""Checks of the command line that need no model and no torch, run before anything heavy is imported, so a
mistake is answered at once (one sentence, exit code 2).
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from phi4mm.cli.args import DTYPE_CHOICES

DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as api.resolve_model takes it
MAX_TEMPERATURE = 100.0
MM_KINDS = ("image", "audio")
# The extra that provides each optional module, for the message when it is missing.
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "prometheus_client": "serve",
          "ray": "ray", "sacrebleu": "eval", "av": "video"}


class UserError(ValueError):
    """A mistake on the command line; printed as one sentence, exit code 2."""


def need_extra(*modules: str, what: str) -> None:
    """UserError naming the pip extra when one of `modules` is not installed."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            extra = EXTRAS.get(m, m)
            raise UserError(f"{what} needs {m}, which is not installed; pip install 'phi4mm[{extra}]'")


def positive(flag: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise UserError(f"--{flag} must be positive; got {value}")


def check_common(args: Any) -> None:
    """Flags every model command shares: --model, --device, --dtype, and the engine's."""
    device = getattr(args, "device", None)
    if device is not None and not DEVICE.fullmatch(str(device)):
        raise UserError(f"--device {device} is not a device; use auto (the default), cpu, cuda, cuda:N or mps")
    dtype = getattr(args, "dtype", None)
    if args.cmd != "make-checkpoint" and dtype is not None and dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype {dtype} is not supported; use auto, bfloat16, float16 or float32")
    model = getattr(args, "model", None)
    if model is not None:
        p = Path(model).expanduser()
        if p.is_file():
            raise UserError(f"--model {model} is a file; pass the checkpoint folder (the one holding config.json)")
        if not p.exists() and not HUB_ID.fullmatch(str(model)):
            raise UserError(f"--model {model} is not a directory, nor a Hugging Face model id (owner/name, e.g. "
                            "microsoft/Phi-4-multimodal-instruct)")
    for flag in ("max_model_len", "max_batch", "max_tokens", "max_seconds", "max_waiting", "max_body_bytes",
                 "batch_size", "limit", "requests", "prompt_tokens", "new_tokens", "max_lora_rank"):
        if hasattr(args, flag):
            positive(flag.replace("_", "-"), getattr(args, flag))
    if getattr(args, "replicas", None) is not None:
        positive("replicas", args.replicas)
    util = getattr(args, "gpu_memory_utilization", None)
    if util is not None and not 0 < util <= 1:
        raise UserError(f"--gpu-memory-utilization is a share of the GPU's memory, in (0, 1]; got {util}")
    temp = getattr(args, "temperature", None)
    if temp is not None and not 0 <= temp <= MAX_TEMPERATURE:
        raise UserError(f"--temperature must be 0 (greedy) up to {MAX_TEMPERATURE:g}; got {temp}")
    top_p = getattr(args, "top_p", None)
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1]; got {top_p}")


def read_tools(path: Path) -> list[dict]:
    try:
        tools = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"--tools {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"--tools {path}: not valid JSON ({e})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UserError(f"--tools {path}: expected a JSON list of function definitions (OpenAI format)")
    return tools


def tool_choice(value: str, tools: list[dict] | None) -> str | dict | None:
    """--tool-choice as OpenAI's tool_choice: auto / none / required, or a function's name."""
    if tools is None:
        if value != "auto":
            raise UserError(f"--tool-choice {value} needs --tools, the functions to choose from")
        return None
    if value in ("auto", "none", "required"):
        return value
    names = [(t.get("function") or t).get("name") for t in tools]
    if value not in names:
        raise UserError(f"--tool-choice {value} is not auto, none, required or one of the tools' names "
                        f"({', '.join(str(n) for n in names)})")
    return {"type": "function", "function": {"name": value}}


def parse_mm_limits(text: str | None) -> dict[str, int]:
    """--limit-mm-per-prompt: vLLM's `image=3,audio=3` or its JSON form `{"image": 3}` -> {kind: most}."""
    if text is None:
        return {}
    try:
        raw = json.loads(text) if text.lstrip().startswith("{") else dict(
            part.split("=", 1) for part in text.split(",") if part.strip())
    except ValueError:
        raw = None
    if not isinstance(raw, dict):
        raise UserError(f"--limit-mm-per-prompt {text}: write it as image=N,audio=N (or JSON, {{\"image\": N}})")
    out = {}
    for kind, n in raw.items():
        kind = str(kind).strip()
        if kind not in MM_KINDS:
            raise UserError(f"--limit-mm-per-prompt names {kind}; this model takes {' and '.join(MM_KINDS)}")
        try:
            out[kind] = int(n)
        except (TypeError, ValueError):
            raise UserError(f"--limit-mm-per-prompt {kind}={n}: the limit must be a whole number") from None
        if out[kind] < 0:
            raise UserError(f"--limit-mm-per-prompt {kind}={n}: the limit must be 0 or more")
    return out


def parse_lora_modules(items: list[str]) -> dict[str, Path]:
    """--lora-modules NAME=DIR ... (or vLLM's JSON form {"name": ..., "path": ...}) -> {name: folder}."""
    out: dict[str, Path] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                d = json.loads(item)
                name, path = d["name"], d["path"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"--lora-modules {item}: JSON entries need \"name\" and \"path\"") from None
        elif "=" in item:
            name, path = item.split("=", 1)
        else:
            raise UserError(f"--lora-modules {item}: write NAME=DIR, e.g. speech=./speech-lora")
        folder = Path(path).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise UserError(f"--lora-modules {name}={path}: no adapter_config.json there; pass a PEFT adapter "
                            "folder")
        out[str(name)] = folder
    return out


def check_serve(args: Any) -> None:
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise UserError(f"the model is given twice ({args.model_tag} and --model {args.model}); give it once")
        args.model = args.model_tag
        check_common(args)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535; got {args.port}")
    if args.graph_warmup_seconds is not None and not 0 <= args.graph_warmup_seconds < float("inf"):
        raise UserError(f"--graph-warmup-seconds must be 0 or more; got {args.graph_warmup_seconds}")
    if args.tensor_parallel_size != 1:
        raise UserError(f"--tensor-parallel-size {args.tensor_parallel_size}: phi4mm runs one model per GPU; use "
                        "--replicas N --gpus-per-replica 1 to serve on several GPUs")
    args.mm_limits = parse_mm_limits(args.limit_mm_per_prompt)
    args.lora_folders = parse_lora_modules(args.lora_modules)
    need_extra("fastapi", "uvicorn", "multipart", "prometheus_client", what="phi4mm serve")
    if args.replicas is not None:
        need_extra("ray", what="phi4mm serve --replicas")


def check_train(args: Any) -> None:
    # A recipe's run folder is meant to be reused: a second run continues where the first stopped.
    out = args.out if args.recipe is None else None
    if out is None or args.resume or args.overwrite:
        return
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; pass --resume to continue the run in it, --overwrite to write over "
                        "it, or name a new folder")


def check(args: Any) -> None:
    """Every check that needs no model, for args.cmd."""
    check_common(args)
    if args.cmd == "serve":
        check_serve(args)
    elif args.cmd == "train":
        check_train(args)
    elif args.cmd == "eval":
        for d in args.data:
            if not d.is_file():
                raise UserError(f"{d} is not a file; pass JSONL test sets")
        if args.metric == "bleu":
            need_extra("sacrebleu", what="eval --metric bleu")
    elif args.cmd == "batch":
        if not args.data.is_file():
            raise UserError(f"{args.data} is not a file; pass a JSONL file of conversations")
        if args.replicas is not None:
            need_extra("ray", what="phi4mm batch --replicas")
    elif args.cmd == "chat":
        for f in args.image + args.video + [a for a in args.audio if a != "-"]:  # "-": stdin
            if not Path(f).is_file():
                raise UserError(f"{f}: no such file")
        args.tool_list = read_tools(args.tools) if args.tools is not None else None
        args.tool_choice = tool_choice(args.tool_choice, args.tool_list)
