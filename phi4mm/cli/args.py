"""The `phi4mm` command line's arguments: every subcommand, its flags, help and examples (handlers: main.py),
and the checks that need no model (checks.py).

Nothing here imports torch or the model, so `phi4mm --help` and every argument error answer at once.
Flag names follow vLLM where it has one (`--max-model-len`, `--max-num-seqs`, `--served-model-name`...), so a
vLLM command line works after `phi4mm serve`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from phi4mm import __version__
from phi4mm.options import ServeOptions

EXAMPLES = """examples:
  phi4mm make-checkpoint ./tiny --size tiny --layout official
  phi4mm quantize ./Phi-4-multimodal-instruct ./phi4mm-int4 --method int4 --device cuda
  phi4mm chat --model ./tiny "Describe the image." --image cat.jpg
  phi4mm chat --model ./tiny                       # interactive (on a terminal)
  phi4mm transcribe --model ./tiny talk.flac --format srt
  phi4mm translate --model ./tiny interviews/ --language French --output-dir out/
  phi4mm serve microsoft/Phi-4-multimodal-instruct --port 8000   # from the Hugging Face cache or hub
  phi4mm summarize --model ./tiny meeting.m4a --question "Which dates were agreed?"
  phi4mm eval --model ./tiny asr_test.jsonl --metric wer
  phi4mm batch --model ./tiny prompts.jsonl replies.jsonl
  phi4mm bench --model ./tiny --requests 8
"""
EVAL_EXAMPLES = """examples:
  phi4mm eval --model DIR asr_test.jsonl --metric wer
  phi4mm eval --model DIR vqa_a.jsonl vqa_b.jsonl --metric vqa --predictions preds/
Each line is a conversation whose last assistant message is the reference (or an "answers" list for VQA);
media paths are relative to the JSONL file. Replies are greedy, batched on the engine. Metrics: wer (lower
is better), bleu (sacrebleu), exact (normalised exact match), vqa, tool (valid tool-call JSON, right names).
"""
CHAT_EXAMPLES = """examples:
  phi4mm chat --model DIR "What is the capital of France?"
  phi4mm chat --model DIR "Describe the image." --image cat.jpg
  phi4mm chat --model DIR "<|audio_1|>Transcribe the audio clip into text." --audio speech.wav
  phi4mm chat --model DIR "What happens in this clip?" --video clip.mp4 --video-audio
  arecord -f S16_LE -d 5 -t wav | phi4mm chat --model DIR "Answer the question." --audio -
  phi4mm chat --model DIR --interactive < questions.txt

interactive commands: /image, /audio and /video PATH attach media to your next message, /reset starts over,
/exit (or end of input) quits, /help lists them.
"""
TRANSCRIBE_EXAMPLES = """examples:
  phi4mm {cmd} --model DIR talk.flac                      # text to stdout
  phi4mm {cmd} --model DIR talk.flac --format srt > talk.srt
  phi4mm {cmd} --model DIR recordings/ "more/*.wav" --format vtt --output-dir subs/
  ffmpeg -i talk.mkv -f wav - | phi4mm {cmd} --model DIR - --format srt
inputs: files of any audio container FFmpeg reads (m4a, mp4, webm, ...), folders (searched recursively for
{exts}), glob patterns, or - for stdin. One input in one format with no --output-dir prints to stdout;
otherwise each result is written as <name>.<ext> into --output-dir (default: the current folder, as whisper
does; `-o DIR_OF_THE_INPUTS` to write beside them). The audio is streamed (no length limit) and a
voice-activity detector cuts its speech into timed cues of at most --max-seconds. A file that cannot be read
is reported and the others go on; the exit code is then 2.
"""
SUMMARIZE_EXAMPLES = """examples:
  phi4mm summarize --model DIR meeting.m4a
  phi4mm summarize --model DIR lecture.webm --question "Which books are recommended?" --chunk-minutes 5
The recording is cut into chunks of at most --chunk-minutes of speech; each is summarized (or asked the
question) on its own, then the parts' answers are merged into one (map-reduce). Any length, any container.
"""
SERVE_EXAMPLES = """examples:
  phi4mm serve microsoft/Phi-4-multimodal-instruct
  phi4mm serve --model DIR --max-model-len 32768 --gpu-memory-utilization 0.8
  phi4mm serve --model DIR --host 0.0.0.0 --port 8080 --api-key secret --allow-remote-media
  phi4mm serve --model DIR --replicas 8 --gpus-per-replica 1 --host 0.0.0.0   # Ray Serve, one port
  phi4mm serve --model DIR --dtype auto --trust-remote-code --max-model-len 131072 --enable-lora \\
      --max-lora-rank 320 --lora-extra-vocab-size 0 --limit-mm-per-prompt audio=3,image=3 --max-loras 2 \\
      --lora-modules speech=DIR/speech-lora vision=DIR/vision-lora      # the model card's vLLM flags
vLLM's flags are accepted: the ones that mean something here are honoured, the others are named at start-up
with the reason they change nothing. A client naming an adapter (speech, vision, or a --lora-modules name) as
the model gets that adapter on every request.
"""
BATCH_EXAMPLES = """examples:
  phi4mm batch --model DIR prompts.jsonl replies.jsonl --max-tokens 512
  phi4mm batch --model DIR prompts.jsonl replies.jsonl --replicas 8 --gpus-per-replica 1   # Ray Data
Each line: {"messages": [...], "tools": [...], "id": ..., "sampling": {"temperature": 0.7, ...}} (all but
"messages" optional; media paths relative to the file). Each output line, in input order: {"line", "id", "text",
"tool_calls", "finish_reason", "usage", "error", "reference"}. On Ray, every node must see the model and the
media at the same paths; `--ray-address` names a cluster started with `ray start`.
"""
BENCH_EXAMPLES = """examples:
  phi4mm bench --model DIR --device cuda --requests 64 --prompt-tokens 512 --new-tokens 128
Random prompt tokens, ignore_eos: every request generates exactly --new-tokens tokens. Reports wall time,
generated tokens/s (all requests together) and prompt tokens/s; one warm-up request runs first.
"""
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".caf",
                    ".m4a", ".aac", ".mp4", ".mov", ".webm", ".mka", ".mkv", ".amr", ".wma", ".3gp")
TRANSCRIBE_FORMATS = ("txt", "text", "srt", "vtt", "json", "verbose_json")


DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32", "half", "float")
MODEL_HELP = ("a checkpoint folder or a Hugging Face id such as microsoft/Phi-4-multimodal-instruct (from the "
              "local cache, else downloaded); default: the embedded micro model, a ~12M-parameter Phi-4-multimodal "
              "that phi4mm trained itself")


class Parser(argparse.ArgumentParser):
    """An unknown flag is reported with the usage of the subcommand it was given to, not the top level's."""

    def parse_args(self, args=None, namespace=None):  # noqa: D102 (argparse's own signature)
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            sub = self.subcommands.get(getattr(ns, "cmd", None), self) if hasattr(self, "subcommands") else self
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def parser() -> Parser:
    raw = argparse.RawDescriptionHelpFormatter
    p = Parser(prog="phi4mm", description="Run Phi-4-multimodal-instruct: text, image and audio in, text out.",
               epilog=EXAMPLES, formatter_class=raw)
    p.add_argument("--version", action="version", version=f"phi4mm {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=argparse.ArgumentParser)
    p.subcommands = sub.choices

    def model_args(sp: argparse.ArgumentParser, engine: bool = True, max_num_seqs: int | None = None) -> None:
        sp.add_argument("--model", default=None, help=MODEL_HELP)
        sp.add_argument("--device", default="auto", help="auto (default: CUDA, else Apple MPS, else CPU), cpu, "
                        "cuda, cuda:1, mps")
        sp.add_argument("--dtype", default="auto", help="auto (default: bfloat16 on a GPU, float32 on a CPU), "
                        "bfloat16, float16 or float32")
        sp.add_argument("--quantization", choices=["fp8", "int4"], default=None, help="quantize the decoder's "
                        "linears while loading: less memory, faster decoding on a GPU (docs/quantization.md)")
        sp.add_argument("--quantize-head", action="store_true", help="with --quantization, also quantize the tied "
                        "embedding/output head: 0.57 GiB (fp8) or 0.85 GiB (int4) less on the full model")
        if not engine:
            return
        sp.add_argument("--max-model-len", type=int, default=None, help="context per sequence, prompt and reply "
                        "(default: the model's, lowered at start-up to what the KV cache holds)")
        sp.add_argument("--gpu-memory-utilization", type=float, default=0.90, help="share of the GPU's memory this "
                        "process may fill, weights and KV cache together (default 0.9)")
        sp.add_argument("--max-num-seqs", "--max-batch", dest="max_batch", type=int, default=max_num_seqs,
                        help="sequences decoded together (default " + (str(max_num_seqs) if max_num_seqs else
                                                                         "256 on a GPU, 64 on a CPU") + ")")

    def ray_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--replicas", type=int, default=None, help="run N model replicas on Ray (pip install "
                        "'phi4mm[ray]'); default: one engine in this process")
        sp.add_argument("--gpus-per-replica", type=float, default=0.0, help="--replicas: GPUs each (default 0)")
        sp.add_argument("--ray-address", default=None, help="--replicas: the Ray cluster (default: the one "
                        "`ray start` made here, else a new local one)")

    def merge_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--merge-adapter", choices=["vision", "speech"], default=None,
                        help="merge this LoRA adapter into a copy of the decoder weights: batches that all use it "
                        "(e.g. transcription: speech) run faster, for ~6.4 GB more GPU memory on the full model")

    def sampling_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--max-tokens", type=int, default=None, help="per reply (default: what remains of the "
                        "context)")
        sp.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the checkpoint's "
                        "generation_config.json; greedy when it asks for no sampling)")
        sp.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: the checkpoint's)")
        sp.add_argument("--seed", type=int, default=None)

    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint laid out like the official one",
                        description="Write a random-weight checkpoint (for tests and trying the tools).")
    mk.add_argument("out", type=Path)
    mk.add_argument("--size", choices=["tiny", "full"], default="tiny")
    mk.add_argument("--layout", choices=["official", "hf"], default="official")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    mk.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda: seconds at full size)")

    qz = sub.add_parser("quantize", help="write a pre-quantized (fp8/int4) copy of a checkpoint",
                        description="Quantize the decoder's linears (and with --quantize-head the embedding/head) of checkpoint IN into OUT, in compressed-tensors' "
                        "format (phi4mm, vLLM and transformers load it); everything else is copied.")
    qz.add_argument("src", type=Path, metavar="IN")
    qz.add_argument("out", type=Path, metavar="OUT")
    qz.add_argument("--method", choices=["fp8", "int4"], required=True)
    qz.add_argument("--quantize-head", action="store_true", help="also quantize the tied embedding/output head "
                    "(one 200064 x 3072 matrix) with --method: 0.57 GiB (fp8) or 0.85 GiB (int4) less on the full "
                    "model; OUT's config records it, and OUT then loads that way")
    qz.add_argument("--device", default="cpu", help="where the arithmetic runs (cuda: seconds at full size)")

    ch = sub.add_parser("chat", help="chat: one-shot with a prompt, interactive without one",
                        description="Chat with the model. With a prompt: answer it and exit. Without one on a "
                        "terminal, or with --interactive: a conversation (line editing and history on a "
                        "terminal; Ctrl-C stops an answer, Ctrl-D ends the session).",
                        epilog=CHAT_EXAMPLES, formatter_class=raw)
    ch.add_argument("prompt", nargs="?", help="the user message; refer to media as <|image_1|>, <|audio_1|> "
                    "(added at the start when absent)")
    model_args(ch, max_num_seqs=1)
    ch.add_argument("--image", action="append", default=[], help="image file for the first message (repeatable)")
    ch.add_argument("--audio", action="append", default=[], help="audio file for the first message (repeatable; "
                    "- reads stdin)")
    ch.add_argument("--video", action="append", default=[], help="video file for the first message (repeatable): "
                    "frames sampled by time become images")
    ch.add_argument("--video-fps", type=float, default=1.0, help="--video: frames per second sampled (default 1)")
    ch.add_argument("--video-max-frames", type=int, default=32, help="--video: most frames per video, spread "
                    "over the whole clip when it is longer (default 32)")
    ch.add_argument("--video-max-tokens", type=int, default=16384, help="--video: image tokens for all its "
                    "frames; frames are shrunk (fewer crops) to fit, then thinned (default 16384)")
    ch.add_argument("--video-audio", action="store_true", help="--video: also give the model the sound track")
    ch.add_argument("--system", default=None, help="a system message")
    ch.add_argument("--tools", type=Path, default=None, help="a JSON file with the functions the model may call "
                    "(OpenAI format, a list); a call is printed as one JSON line instead of the reply")
    ch.add_argument("--tool-choice", default="auto", help="auto (default), none, required, or a function's name")
    ch.add_argument("--interactive", "-i", action="store_true", help="converse on stdin even when it is not a "
                    "terminal (the prompt, if given, is the first message)")
    sampling_args(ch)

    for cmd, what in (("transcribe", "speech to text in the spoken language"),
                      ("translate", "speech to text in another language (English by default)")):
        tr = sub.add_parser(cmd, help=what, description=f"{cmd.capitalize()} audio: {what}.",
                            epilog=TRANSCRIBE_EXAMPLES.format(cmd=cmd, exts=" ".join(AUDIO_EXTENSIONS)),
                            formatter_class=raw)
        tr.add_argument("inputs", nargs="+", help="audio files, folders, glob patterns, or - for stdin")
        model_args(tr, max_num_seqs=32)
        tr.add_argument("--format", "-f", default="txt", help=f"one of {', '.join(TRANSCRIBE_FORMATS)} "
                        "(default txt); several comma-separated (e.g. srt,vtt) write one file each")
        tr.add_argument("--language", default=None, help="spoken language hint (transcribe) or target language "
                        "(translate): any language name, or one of the model card's ISO codes, e.g. French or fr")
        if cmd == "transcribe":
            tr.add_argument("--then-translate", default=None, metavar="LANG", help="also translate each cue into "
                            "LANG (the model card's transcript <sep> translation prompt)")
        tr.add_argument("--prompt", default=None, help="context for names and spelling, added to the instruction")
        tr.add_argument("--output-dir", "-o", type=Path, default=None, help="write <name>.<ext> files here "
                        "(default: the current folder)")
        tr.add_argument("--max-seconds", type=float, default=15.0, help="longest cue (default 15, at least 2)")
        tr.add_argument("--max-tokens", type=int, default=448, help="per segment (default 448)")
        merge_arg(tr)

    sm = sub.add_parser("summarize", help="summarize a recording of any length, or ask it a question",
                        description="Summarize a recording, or answer a question about it, by map-reduce over "
                        "chunks of its speech.", epilog=SUMMARIZE_EXAMPLES, formatter_class=raw)
    sm.add_argument("input", help="an audio or video file (any container FFmpeg reads), or - for stdin")
    model_args(sm, max_num_seqs=8)
    sm.add_argument("--question", default=None, help="ask this instead of summarizing")
    sm.add_argument("--chunk-minutes", type=float, default=10.0, help="speech per map prompt (default 10)")
    sm.add_argument("--max-tokens", type=int, default=256, help="per part and for the final answer (default 256)")
    sm.add_argument("--json", action="store_true", help="print {text, duration, parts: [{start, end, text}]}")

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (vLLM's flags work)", epilog=SERVE_EXAMPLES,
                        formatter_class=raw, description="Serve the model over an OpenAI-compatible HTTP API "
                        "(pip install 'phi4mm[serve]').")
    sv.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="the model, as `vllm serve MODEL` "
                    "takes it (the same as --model)")
    model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: no auth)")
    sv.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME", help="the names clients send "
                    "as \"model\" (default: --model as given); the Hugging Face id and the adapters' names are "
                    "accepted too")
    sv.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429 "
                    "(default 256)")
    sv.add_argument("--max-body-bytes", type=int, default=64 << 20, help="largest request body (default 64 MiB)")
    sv.add_argument("--graph-warmup-seconds", type=float, default=None, metavar="S", help="most seconds spent at "
                    "start capturing the CUDA graphs traffic meets first (default 120; 0: on first use only)")
    ray_args(sv)
    sv.add_argument("--allow-remote-media", action="store_true", help="let requests name http(s) image/audio URLs")
    sv.add_argument("--allow-local-files", action="store_true", help="let requests name files on this machine; "
                    "needs --allowed-media-dir")
    sv.add_argument("--no-ui", dest="ui", action="store_false", help="do not serve the web page for chat and "
                    "transcription at / (the API only)")
    merge_arg(sv)
    guard_args(sv)
    vl = sv.add_argument_group("vLLM's flags", "honoured where they mean something here; the others are "
                               "accepted with a start-up line saying why they change nothing")
    vl.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=DIR", help="PEFT adapter folders to "
                    "load as adapters NAME (speech=DIR and vision=DIR replace the checkpoint's own)")
    vl.add_argument("--limit-mm-per-prompt", default=None, metavar="image=N,audio=N", help="most images / audio "
                    "clips one request may carry (a 400 above it); also JSON, {\"image\": 3}")
    vl.add_argument("--max-lora-rank", type=int, default=None, help="refuse to start when an adapter's rank is "
                    "above this")
    vl.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="1 only: one model per GPU here "
                    "(use --replicas for more GPUs)")
    vl.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (slower decode)")
    vl.add_argument("--trust-remote-code", action="store_true", help=argparse.SUPPRESS)
    vl.add_argument("--enable-lora", action="store_true", help=argparse.SUPPRESS)
    vl.add_argument("--max-loras", type=int, default=None, help=argparse.SUPPRESS)
    vl.add_argument("--lora-extra-vocab-size", type=int, default=None, help=argparse.SUPPRESS)
    vl.add_argument("--max-seq-len-to-capture", type=int, default=None, help=argparse.SUPPRESS)
    vl.add_argument("--disable-log-requests", action="store_true", help=argparse.SUPPRESS)

    ba = sub.add_parser("batch", help="replies to every conversation of a JSONL file, here or on Ray replicas",
                        epilog=BATCH_EXAMPLES, formatter_class=raw, description="Offline generation over a JSONL "
                        "file of conversations; one result line per input line.")
    model_args(ba)
    ba.add_argument("data", type=Path, help="JSONL prompts")
    ba.add_argument("out", type=Path, help="JSONL results (written in input order)")
    sampling_args(ba)
    merge_arg(ba)
    ray_args(ba)
    ba.add_argument("--batch-size", type=int, default=64, help="--replicas: lines sent to a replica at a time")
    ev = sub.add_parser("eval", help="score the model on JSONL test sets: WER, BLEU, exact match, VQA, tool calls",
                        epilog=EVAL_EXAMPLES, formatter_class=raw, description="Greedy replies to each "
                        "conversation, scored against its reference answer; one line of results per file.")
    model_args(ev)
    ev.add_argument("data", type=Path, nargs="+", help="JSONL test sets")
    # evaluate.METRICS, written out so `--help` needs no torch import (a test keeps the two equal).
    ev.add_argument("--metric", required=True, choices=["wer", "bleu", "exact", "vqa", "tool"])
    ev.add_argument("--max-tokens", type=int, default=256, help="per reply (default 256)")
    ev.add_argument("--limit", type=int, default=None, help="score only the first N lines of each file")
    ev.add_argument("--text-adapter", default=None, help="route text-only prompts through this LoRA "
                    "(DIR/<name>-lora/, e.g. one `phi4mm train --stage text` wrote)")
    ev.add_argument("--predictions", type=Path, default=None, help="write each line's reply and references as "
                    "JSONL: this file for one data set, or <name>.predictions.jsonl files in this folder")
    ev.add_argument("--json", action="store_true", help="print the results as one JSON object")
    be = sub.add_parser("bench", help="quick offline engine throughput", epilog=BENCH_EXAMPLES,
                        formatter_class=raw, description="Offline throughput of the engine on this model.")
    model_args(be)
    be.add_argument("--requests", type=int, default=8, help="number of requests (default 8)")
    be.add_argument("--prompt-tokens", type=int, default=128, help="per request (default 128)")
    be.add_argument("--new-tokens", type=int, default=64, help="per request (default 64)")
    merge_arg(be)
    tn = sub.add_parser("train", help="fine-tune one stage of the recipe on JSONL chats; writes a loadable checkpoint",
                        description="Fine-tune a stage (adapter / encoder / projector); OUT is a checkpoint "
                        "directory that phi4mm and transformers+peft load.")
    tn.add_argument("data", type=Path, nargs="?",
                    help='JSONL, one {"messages": [...]} per line; media paths relative to it')
    tn.add_argument("out", type=Path, nargs="?", help="output checkpoint directory (with --recipe: the run folder)")
    tn.add_argument("--model", default=None, help="the base checkpoint: a folder or a Hugging Face id")
    # train.stages.STAGES' names, written out so `--help` needs no torch import (a test keeps the two equal).
    tn.add_argument("--stage", choices=["vision-projector", "vision-encoder", "vision-lora", "speech-encoder",
                                        "speech-lora", "vision-speech", "text", "decoder", "speech-ctc",
                                        "vision-ctc"])
    tn.add_argument("--recipe", choices=["micro"], help="run a whole recipe instead of one stage: 'micro' "
                    "generates data and trains the embedded micro model from scratch (phi4mm train --recipe "
                    "micro RUN_DIR --device cuda)")
    tn.add_argument("--scale", type=float, default=1.0, help="--recipe: data set size factor (default 1)")
    tn.add_argument("--epochs-scale", type=float, default=1.0, help="--recipe: epochs factor (default 1)")
    tn.add_argument("--workers", type=int, default=None, help="processes preparing media (default: all cores "
                    "for --recipe; for one stage on a GPU, this host's cores shared by its torchrun processes, up to "
                    "8 each; 0 on a CPU: inline)")
    tn.add_argument("--max-minutes", type=float, default=None, help="--recipe: wall-clock budget for data + "
                    "training, shared between the stages by planned work (each ends early when its share is spent)")
    tn.add_argument("--stop-after", default=None, help="--recipe: stop after this stage; run again to continue")
    for flag, kind, default in (("--epochs", int, 1), ("--max-steps", int, None), ("--lr", float, 1e-4),
                                ("--batch-tokens", int, 16384), ("--grad-accum", int, 1), ("--lora-rank", int, None),
                                ("--seed", int, 0), ("--warmup-steps", int, 0), ("--save-every", int, 500)):
        tn.add_argument(flag, type=kind, default=default)
    tn.add_argument("--device", default="cpu")
    tn.add_argument("--dtype", default="float32", help="frozen weights' dtype (trained parameters stay fp32)")
    tn.add_argument("--amp", action="store_true", help="bf16 autocast")
    tn.add_argument("--grad-checkpointing", action="store_true")
    tn.add_argument("--resume", action="store_true", help="continue from the latest OUT/checkpoint-*")
    tn.add_argument("--overwrite", action="store_true", help="write into OUT even when it is not empty")
    tn.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed lines instead of stopping")
    tn.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer "
                    "state over the processes (FSDP2) instead of copying them to each (DDP), for stages that train "
                    "large parts; its checkpoints are sharded (each rank writes its part)")
    return p


def guard_args(sv: argparse.ArgumentParser) -> None:
    """`serve` limits for hostile or heavy traffic (ServeOptions; each refusal is an HTTP 400 naming the flag)."""
    d = ServeOptions()
    g = sv.add_argument_group("request limits and safety")
    g.add_argument("--allowed-media-dir", default=None, metavar="DIR", help="read local image/audio files named "
                   "in requests only under DIR (default: no local files)")
    g.add_argument("--allowed-origins", default="", metavar="ORIGINS", help="comma-separated web origins allowed "
                   "to call the API from a browser, e.g. https://app.example.com ('*': any; default: none)")
    g.add_argument("--raw-completion-prompts", action="store_true", help="read <|user|>, <|end|>... in "
                   "/v1/completions prompts as special tokens (trusted clients; default: plain text)")
    for flag, kind, default, what in (
            ("--max-prompt-chars", int, d.max_prompt_chars, "characters of text per request"),
            ("--max-messages", int, d.max_messages, "messages per chat request"),
            ("--max-tools", int, d.max_tools, "tools per chat request"),
            ("--max-images", int, d.max_images, "images per request"),
            ("--max-audio-seconds", float, d.max_audio_seconds, "seconds of audio per chat request"),
            ("--max-transcription-seconds", float, d.max_transcription_seconds, "seconds per audio upload"),
            ("--max-media-bytes", int, d.max_media_bytes, "bytes per image or audio item"),
            ("--max-sequences", int, d.max_sequences, "n x prompts per request"),
            ("--max-schema-chars", int, d.max_schema_chars, "characters of a response_format json_schema"),
            ("--drain-timeout", float, d.drain_timeout_s, "seconds open requests get after SIGTERM")):
        g.add_argument(flag, type=kind, default=default, metavar="N", help=f"{what} (default {default})")
