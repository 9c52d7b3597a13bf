"""`phi4mm eval`: generate over a JSONL set through the engine and score the replies.

Each line is a training-style conversation; its last assistant message is the reference and everything before
it is the prompt. An optional `"answers": [...]` field lists several references (VQA: ten annotators).

    evaluate("out/", "test.jsonl", metric="wer")  ->  {"metric": "wer", "score": 0.12, "n": 500, ...}

Metrics: "wer" (word error rate, lower is better), "bleu" (sacrebleu corpus BLEU), "exact" (normalised exact
match), "vqa" (VQA accuracy: min(#matching answers / 3, 1)), "tool" (over samples whose reference is a tool
call: the share of replies that parse as valid tool-call JSON naming the same functions).
"""
from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

import torch

from phi4mm.inputs.records import read_jsonl
from phi4mm.sampling import SamplingParams

METRICS = ("wer", "bleu", "exact", "vqa", "tool")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Simple English normaliser: lowercase, punctuation removed (apostrophes too), spaces collapsed.

    Numbers stay as written ("3" and "three" differ), as in plain WER scoring."""
    return " ".join(_PUNCT.sub(" ", text.lower().replace("'", "")).split())


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance between word lists (substitutions, insertions, deletions cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER: total word edits / total reference words, after `normalize`."""
    edits = words = 0
    for r, h in zip(refs, hyps):
        rw, hw = normalize(r).split(), normalize(h).split()
        edits += edit_distance(rw, hw)
        words += len(rw)
    return edits / max(words, 1)


def bleu(refs: list[str], hyps: list[str]) -> float:
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("metric 'bleu' needs sacrebleu: pip install sacrebleu") from None
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


def vqa_accuracy(answers: list[list[str]], hyps: list[str]) -> float:
    """VQA accuracy: a reply scores min(#annotators who gave it / 3, 1); articles and punctuation ignored."""
    def norm(s: str) -> str:
        return " ".join(_ARTICLES.sub(" ", normalize(s)).split())
    return sum(min(sum(norm(a) == norm(h) for a in ans) / 3, 1.0) for ans, h in zip(answers, hyps)) / len(hyps)


def tool_accuracy(refs: list[str], hyps: list[str]) -> float:
    """Share of tool-call references whose reply holds valid call JSON with the same function names."""
    from phi4mm.inputs.tools import parse_tool_calls
    hits = total = 0
    for r, h in zip(refs, hyps):
        want = [c.name for c in parse_tool_calls(r)[1]]
        if want:
            total += 1
            hits += [c.name for c in parse_tool_calls(h)[1]] == want
    return hits / max(total, 1)


def score(metric: str, answers: list[list[str]], hyps: list[str]) -> float:
    if metric == "wer":
        return wer([a[0] for a in answers], hyps)
    if metric == "bleu":
        return bleu([a[0] for a in answers], hyps)
    if metric == "exact":
        return sum(normalize(h) in {normalize(a) for a in ans} for ans, h in zip(answers, hyps)) / len(hyps)
    if metric == "vqa":
        return vqa_accuracy(answers, hyps)
    if metric == "tool":
        return tool_accuracy([a[0] for a in answers], hyps)
    raise ValueError(f"metric {metric!r} is not known; use one of {', '.join(METRICS)}")


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str | None = None,
               text_adapter: str | None = None, quantization: str | None = None, quantize_head: bool = False) -> Any:
    """The model to evaluate, with `text_adapter` loaded from `model_dir/<name>-lora/` when it did not load
    by itself (a `text-lora/` folder does)."""
    from phi4mm import api
    from phi4mm.model.adapters import load_adapter
    model = api.load(model_dir, device, dtype, quantization=quantization, quantize_head=quantize_head)
    if text_adapter is not None and text_adapter not in model.config.loras:
        load_adapter(model, Path(model_dir) / f"{text_adapter}-lora", text_adapter)
    return model


def evaluate(model_dir: str | Path, data: str | Path, metric: str = "wer", *, max_tokens: int = 256,
             device: str = "cpu", dtype: str | None = None, text_adapter: str | None = None,
             limit: int | None = None, model: Any = None, progress: bool = False, engine: Any = None) -> dict:
    """Greedy replies for every conversation of `data`, scored against its last assistant message.

    text_adapter: route text-only prompts through this adapter (loaded from `model_dir/<name>-lora/`).
    model: an already loaded `phi4mm.Model` to use instead of loading model_dir. progress: a bar on stderr.
    engine: an Engine on that model to generate with (the command line's, built from its engine flags).
    Returns {"metric", "score", "n", "predictions": [{"line", "prediction", "references"}]}.
    """
    from phi4mm.engine.engine import Engine
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not known; use one of {', '.join(METRICS)}")
    if metric == "bleu":
        bleu(["x"], ["x"])  # fail on a missing sacrebleu before generating anything
    records, _ = read_jsonl(data)
    records = records[:limit] if limit else records
    if model is None:
        model = load_model(model_dir, device, dtype, text_adapter)
    requests, answers = [], []
    for rec in records:
        last = rec.messages[-1]
        if last["role"] != "assistant":
            raise ValueError(f"{data}:{rec.line}: the last message must be the assistant's reference answer")
        prep = model.prepare(rec.messages[:-1], rec.images, rec.audios, rec.tools)
        if prep.adapter is None and prep.images is None and prep.audios is None:
            prep.adapter = text_adapter
        requests.append({"prompt": prep, "params": SamplingParams(max_tokens=max_tokens)})
        answers.append(list(rec.answers or []) or [last["content"] or ""])
    with torch.inference_mode():
        results = (engine or Engine(model)).generate(requests, progress=progress, desc=Path(data).name)
    hyps = [r["text"].strip() for r in results]
    preds = [{"line": rec.line, "prediction": h, "references": a} for rec, h, a in zip(records, hyps, answers)]
    return {"metric": metric, "score": score(metric, answers, hyps), "n": len(hyps), "predictions": preds}
