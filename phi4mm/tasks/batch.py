"""`phi4mm batch`: offline generation over a JSONL file of conversations, on this machine or on a Ray cluster.

Each input line is `{"messages": [...]}` as in training and evaluation sets (media paths relative to the JSONL
file, data URLs or base64), with optional `"tools"`, `"id"` and `"sampling"` (SamplingParams fields that
override the job's defaults for that line). A trailing assistant message, as in an evaluation set, is the
reference: it is not part of the prompt and is copied to the output. Each output line is

    {"line": 3, "id": ..., "text": "...", "tool_calls": [...], "finish_reason": "stop",
     "usage": {"prompt_tokens": 812, "completion_tokens": 41}, "error": null, "reference": ...}

in input order. A line the model cannot take (a prompt over the context, an undecodable image) gets its
`"error"` and the job goes on; malformed JSON or a missing media file stops the job before any work, naming
the line.

On Ray (`replicas=N`): Ray Data spreads the lines over N actors, each holding one model and one engine (on
`gpus_per_replica` GPUs each), and the driver writes the rows back in order. phi4mm adds no cluster layer of
its own: the cluster, its nodes and its scheduling are Ray's (`ray start`, `address=`). Every node must see the
model directory and the media files at the same paths (a shared file system), as with any Ray Data job that
reads files by path.
"""
from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable

from phi4mm.inputs.records import DataError, Record, read_jsonl
from phi4mm.sampling import SamplingParams

SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


def read_prompts(path: str | Path, defaults: SamplingParams) -> list[dict]:
    """Parse and check the whole file; one row per line: the prompt's parts and its sampling, as JSON-safe
    values (Ray Data ships rows as Arrow tables: nested message lists travel as one JSON string)."""
    records, _ = read_jsonl(path, need_answer=False)
    return [_row(rec, defaults, path) for rec in records]


def _row(rec: Record, defaults: SamplingParams, path: str | Path) -> dict:
    messages, reference = rec.messages, None
    if len(messages) > 1 and messages[-1]["role"] == "assistant":
        messages, reference = messages[:-1], messages[-1]["content"]
    over = rec.sampling or {}
    if not isinstance(over, dict) or set(over) - SAMPLING_FIELDS:
        unknown = sorted(set(over) - SAMPLING_FIELDS) if isinstance(over, dict) else over
        raise DataError(f"{path}:{rec.line}: 'sampling' must be an object of SamplingParams fields; "
                        f"{unknown!r} is not one ({', '.join(sorted(SAMPLING_FIELDS))})")
    params = {**{f: getattr(defaults, f) for f in SAMPLING_FIELDS}, **over}
    try:
        SamplingParams(**params).validate()
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}:{rec.line}: {e}") from None
    return {"line": rec.line, "id": json.dumps(rec.id), "messages": json.dumps(messages),
            "images": json.dumps(rec.images), "audios": json.dumps(rec.audios), "tools": json.dumps(rec.tools),
            "sampling": json.dumps(params), "reference": json.dumps(reference)}


def generate_rows(model: Any, engine: Any, rows: list[dict], progress: bool = False) -> list[dict]:
    """Prompts through one engine; a row whose prompt the model refuses gets an error, the others go on."""
    from phi4mm.inputs.tools import parse_tool_calls, tool_names
    out: list[dict | None] = [None] * len(rows)
    requests, owners = [], []  # owners: (row index, its tools, its prompt's token count)
    for i, r in enumerate(rows):
        tools = json.loads(r["tools"])
        try:
            prep = model.prepare(json.loads(r["messages"]), json.loads(r["images"]), json.loads(r["audios"]), tools)
        except ValueError as e:
            out[i] = _result(r, error=" ".join(str(e).split()))
            continue
        requests.append({"prompt": prep, "params": SamplingParams(**json.loads(r["sampling"]))})
        owners.append((i, tools, prep.num_tokens))
    results = engine.generate(requests, progress=progress, desc="batch", errors="return")
    for (i, tools, n_prompt), res in zip(owners, results):
        if res["finish_reason"] == "error":
            out[i] = _result(rows[i], error=res.get("error") or "generation failed")
            continue
        text, calls, reason = res["text"], [], res["finish_reason"]
        if tools:  # only calls to the line's own tools are calls; a reply that makes one ends "tool_calls"
            text, parsed = parse_tool_calls(text, id_prefix=f"call_{rows[i]['line']}_",
                                            offered=set(tool_names(tools)))
            calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                     for c in parsed]
            reason = "tool_calls" if calls and reason == "stop" else reason
        out[i] = _result(rows[i], text=text, tool_calls=calls, finish_reason=reason,
                         prompt_tokens=n_prompt, completion_tokens=len(res["token_ids"]))
    return out  # type: ignore[return-value]


def _result(row: dict, text: str = "", tool_calls: list | None = None, finish_reason: str | None = "error",
            prompt_tokens: int = 0, completion_tokens: int = 0, error: str | None = None) -> dict:
    return {"line": row["line"], "id": json.loads(row["id"]), "text": text, "tool_calls": tool_calls or [],
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            "error": error, "reference": json.loads(row["reference"])}


class BatchReplica:
    """One model and one engine: a Ray Data actor (`map_batches`), or the whole job on one machine."""

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str | None = None, max_batch: int = 64,
                 merge_adapter: str | None = None, quantization: str | None = None, quantize_head: bool = False):
        import phi4mm
        from phi4mm.engine.engine import Engine, cpu_kv_blocks
        self.model = phi4mm.load(model_dir, device=device, dtype=dtype, quantization=quantization,
                                 quantize_head=quantize_head)
        self.engine = Engine(self.model, num_blocks=cpu_kv_blocks(self.model.device), max_batch=max_batch,
                             merge_adapter=merge_adapter)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Ray Data's column batch in, the result columns out (nested values as JSON strings)."""
        import torch
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        for r in rows:
            r["line"] = int(r["line"])
        with torch.inference_mode():
            res = generate_rows(self.model, self.engine, rows)
        return {"line": [r["line"] for r in res], "result": [json.dumps(r, ensure_ascii=False) for r in res]}


def run_batch(model_dir: str | Path, data: str | Path, out: str | Path, *, defaults: SamplingParams | None = None,
              replicas: int | None = None, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
              batch_size: int = 64,
              device: str = "cpu", dtype: str | None = None, max_batch: int = 64,
              merge_adapter: str | None = None, ray_address: str | None = None,
              progress: bool = True, quantization: str | None = None, quantize_head: bool = False) -> dict:
    """Generate a reply for every line of `data` and write them to `out` (JSONL, input order).

    replicas=None runs here on one engine; replicas=N runs on a Ray cluster (`ray_address`, default: the one
    `ray start` made on this machine, else a local one) with N model replicas of `gpus_per_replica` GPUs and
    `cpus_per_replica` CPUs each, fed `batch_size` lines at a time. Returns {"lines", "errors", "out"}.
    """
    defaults = (defaults or SamplingParams()).validate()
    rows = read_prompts(data, defaults)
    out = Path(out)
    if out.resolve() == Path(data).resolve():
        raise ValueError(f"out {out} is the input file; write the results to a new file")
    if replicas is None:
        import torch
        rep = BatchReplica(str(model_dir), device, dtype, max_batch, merge_adapter, quantization, quantize_head)
        with torch.inference_mode():
            results = generate_rows(rep.model, rep.engine, rows, progress=progress)
    else:
        results = _on_ray(str(model_dir), rows, replicas, gpus_per_replica, cpus_per_replica, batch_size, device,
                          dtype, max_batch, merge_adapter, ray_address, quantization, quantize_head)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out, results)
    return {"lines": len(results), "errors": sum(r["error"] is not None for r in results), "out": str(out)}


def _on_ray(model_dir: str, rows: list[dict], replicas: int, gpus: float, cpus: float, batch_size: int, device: str,
            dtype: str | None, max_batch: int, merge_adapter: str | None, address: str | None,
            quantization: str | None = None, quantize_head: bool = False) -> list[dict]:
    from phi4mm.tasks.cluster import connect
    if replicas < 1 or batch_size < 1:
        raise ValueError(f"replicas and batch_size must be >= 1; got {replicas} and {batch_size}")
    ray, started, device = connect(address, "a batch on replicas", device, gpus)
    try:
        ds = ray.data.from_items(rows).map_batches(
            BatchReplica, fn_constructor_kwargs=dict(model_dir=model_dir, device=device, dtype=dtype,
                                                     max_batch=max_batch, merge_adapter=merge_adapter,
                                                     quantization=quantization, quantize_head=quantize_head),
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=replicas), num_gpus=gpus or None,
            num_cpus=cpus, batch_format="numpy")
        results = [json.loads(r["result"]) for r in ds.iter_rows()]
    finally:
        if started:
            ray.shutdown()
    return sorted(results, key=lambda r: r["line"])


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".part")  # a crash leaves no half-written result file under the real name
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr)
