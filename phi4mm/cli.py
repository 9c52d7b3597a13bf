"""The `phi4mm` command line. Errors a user can fix end with one sentence and exit code 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  phi4mm make-checkpoint ./tiny --size tiny --layout official
  phi4mm chat --model ./tiny "Describe the image <|image_1|>" --image cat.jpg
  phi4mm chat --model ./tiny "Transcribe the audio to text. <|audio_1|>" --audio speech.wav
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phi4mm", description="Run Phi-4-multimodal-instruct: text, image and "
                                "audio in, text out.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint laid out like the official one")
    mk.add_argument("out", type=Path)
    mk.add_argument("--size", choices=["tiny", "full"], default="tiny")
    mk.add_argument("--layout", choices=["official", "hf"], default="official")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    mk.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda: seconds at full size)")
    ch = sub.add_parser("chat", help="one-shot chat: a prompt with optional images and audio files")
    ch.add_argument("prompt", help="the user message; refer to media as <|image_1|>, <|audio_1|> (added at the "
                    "start when absent)")
    ch.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    ch.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    ch.add_argument("--audio", action="append", default=[], help="audio file (repeatable)")
    ch.add_argument("--max-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0)
    ch.add_argument("--device", default="cpu")
    ch.add_argument("--dtype", default=None)
    return p


def _chat(args) -> int:
    import phi4mm
    model = phi4mm.load(args.model, device=args.device, dtype=args.dtype)
    refs = "".join(f"<|image_{i + 1}|>" for i in range(len(args.image)) if f"<|image_{i + 1}|>" not in args.prompt)
    refs += "".join(f"<|audio_{i + 1}|>" for i in range(len(args.audio)) if f"<|audio_{i + 1}|>" not in args.prompt)
    messages = [{"role": "user", "content": refs + args.prompt}]
    audios = [Path(a) for a in args.audio]
    print(model.generate(messages, images=[Path(i) for i in args.image], audios=audios,
                         max_new_tokens=args.max_tokens, temperature=args.temperature))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "make-checkpoint":
            import torch
            from .checkpoint import make_checkpoint
            out = make_checkpoint(args.out, args.size, args.layout, args.seed, getattr(torch, args.dtype),
                                  device=args.device)
            print(f"wrote {args.size} {args.layout} checkpoint to {out}")
            return 0
        if args.cmd == "chat":
            return _chat(args)
    except (ValueError, FileNotFoundError, OSError) as e:  # our errors are ValueErrors that say what to do
        print(f"phi4mm {args.cmd}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
