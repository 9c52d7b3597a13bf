"""Training data: JSONL conversations -> token ids with assistant-only labels, batched by a token budget.

One conversation per line, OpenAI style:

    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/a.jpg"}},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

Media are file paths relative to the JSONL file, absolute paths, data URLs or base64 (anything the processor
reads). The conversation is rendered with the official chat template (no generation prompt, so it ends in
`<|endoftext|>`), tokenised by the same `prepare` as inference, and the loss counts the assistant tokens only:
everything after each `<|assistant|>` up to and including its `<|end|>`, plus the closing `<|endoftext|>`
after a final assistant turn, as the official fine-tuning scripts do.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from phi4mm.inputs.chat import render_prompt
from phi4mm.inputs.prepare import Prepared
from phi4mm.inputs.records import DataError, Record, read_jsonl  # noqa: F401 (re-exported for training)

IGNORE = -100  # label of tokens the loss skips (F.cross_entropy's ignore_index)
ASSISTANT, END, ENDOFTEXT = "<|assistant|>", "<|end|>", "<|endoftext|>"


@dataclass
class Example:
    """A tokenised record: ids and labels of the same length, and the processor's output (media, adapter)."""

    record: Record
    prep: Prepared
    labels: list[int]
    adapter: str | None  # the adapter this sample trains through (the model's rule, or the stage's override)
    has_image: bool = False
    has_audio: bool = False

    @property
    def length(self) -> int:
        return len(self.prep.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE for t in self.labels)


def assistant_labels(ids: list[int], assistant: int, end: int, endoftext: int) -> list[int]:
    """Labels for `ids`: the token itself inside assistant replies (with their `<|end|>`), IGNORE elsewhere."""
    labels = [IGNORE] * len(ids)
    inside = False
    for i, t in enumerate(ids):
        if inside:
            labels[i] = t
            inside = t != end
        elif t == assistant:
            inside = True
    # The template closes the conversation with <|endoftext|>; after a reply the model learns to stop there.
    if len(ids) >= 2 and ids[-1] == endoftext and labels[-2] == end:
        labels[-1] = endoftext
    return labels


def _prepare(model, rec: Record) -> Prepared:
    """The whole conversation (no generation prompt: it ends in `<|endoftext|>`) through the processor."""
    return model.prepare(render_prompt(rec.messages, rec.tools, add_generation_prompt=False), rec.images, rec.audios)


def encode(model, rec: Record, text_adapter: str | None = None, keep_media: bool = True) -> Example:
    """Tokenise one record with the model's processor. text_adapter: route text-only samples to that adapter.

    keep_media=False drops the tower inputs after counting their tokens (a data set of 10k images would hold
    ~50 GB of pixels); `with_media` rebuilds them when the sample's batch comes up.
    """
    prep = _prepare(model, rec)
    tok = model.tokenizer
    labels = assistant_labels(prep.input_ids, tok.token_id(ASSISTANT), tok.token_id(END), tok.token_id(ENDOFTEXT))
    has_image, has_audio = prep.images is not None, prep.audios is not None
    adapter = prep.adapter
    if adapter is None and not has_image and not has_audio:
        adapter = text_adapter
    if not keep_media:
        prep = replace(prep, images=None, audios=None)
    return Example(rec, prep, labels, adapter, has_image, has_audio)


def with_media(model, e: Example) -> Example:
    """`e` with its tower inputs (re)built; the token ids must come out the same."""
    if not (e.has_image or e.has_audio) or e.prep.images is not None or e.prep.audios is not None:
        return e
    prep = _prepare(model, e.record)
    if prep.input_ids != e.prep.input_ids:
        raise DataError(f"line {e.record.line}: its media changed on disk while training (token count differs)")
    return replace(e, prep=prep)


_POOL_MODEL = None  # the model a forked encoding worker uses (inherited, never pickled)


def _worker_init(*_: Any) -> None:
    # A forked child must not use the parent's OpenMP pool (it hangs once the parent has used it, e.g. in
    # the image transform); one thread per worker, as torch's DataLoader workers do. BLAS pools too (the
    # log-mel's filterbank matmul): 16 workers x 16 BLAS threads each crawled at 70 clips/s on 16 cores.
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)


def _encode_one(args):
    rec, text_adapter = args
    try:
        return encode(_POOL_MODEL, rec, text_adapter, keep_media=False)
    except ValueError as e:
        return e


def encode_all(model, records: list[Record], text_adapter: str | None, workers: int = 0,
               progress: bool = False) -> list[Example | ValueError]:
    """`encode(keep_media=False)` over all records, in order; a bad record gives its ValueError in its place.

    workers > 1 forks processes that share the loaded model (the towers are not run here, only the
    processor), so a big image/audio set is counted in seconds instead of minutes.
    """
    global _POOL_MODEL
    from tqdm import tqdm
    jobs = [(r, text_adapter) for r in records]
    bar = dict(total=len(jobs), disable=not progress, unit="sample", desc="preparing", dynamic_ncols=True,
               mininterval=progress_interval())
    _POOL_MODEL = model
    try:
        if workers <= 1 or len(records) < 64:
            return [_encode_one(j) for j in tqdm(jobs, **bar)]
        import multiprocessing as mp
        out: list[Example | ValueError] = []
        with mp.get_context("fork").Pool(workers, initializer=_worker_init) as pool, tqdm(**bar) as t:
            it = pool.imap(_encode_one, jobs)  # chunksize 1: only then does next() take a timeout
            try:
                for _ in jobs:
                    out.append(it.next(timeout=120))
                    t.update(1)
            except mp.TimeoutError:  # a stuck worker pool must not stall training: finish in this process
                pool.terminate()
                out += [_encode_one(j) for j in jobs[len(out):]]
        return out
    finally:
        _POOL_MODEL = None


def make_batches(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches: sorted by length, cut so that (longest in batch) x (rows) <= batch_tokens.

    Ties are broken randomly and the batch order is shuffled, both from (seed, epoch): a run and its resumed
    copy see the same batches. A sample longer than the budget is a batch of its own.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lengths.__getitem__)  # stable: equal lengths keep the random order
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        if cur and max(longest, lengths[i]) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, lengths[i])
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long, right-padded
    labels: torch.Tensor  # (B, T) long, IGNORE on prompt and padding
    key_mask: torch.Tensor | None  # (B, T) bool, True on real tokens; None when nothing is padded
    lengths: torch.Tensor  # (B,) real tokens per row
    examples: list[Example]

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors the step moves to the GPU (DataLoader(pin_memory=True) calls this),
        so the host-to-device copies run asynchronously."""
        examples = []
        for e in self.examples:
            im, au = e.prep.images, e.prep.audios
            if im is not None:
                im = replace(im, pixel_values=im.pixel_values.pin_memory(), attention_mask=im.attention_mask.pin_memory())
            if au is not None:
                au = replace(au, features=au.features.pin_memory())
            examples.append(replace(e, prep=replace(e.prep, images=im, audios=au)))
        return Batch(self.input_ids.pin_memory(), self.labels.pin_memory(),
                     None if self.key_mask is None else self.key_mask.pin_memory(), self.lengths, examples)

    @property
    def num_targets(self) -> int:
        # Label t is predicted from position t-1: the first column is never a target.
        return int((self.labels[:, 1:] != IGNORE).sum())


def collate(examples: list[Example], pad_id: int) -> Batch:
    lengths = [e.length for e in examples]
    T = max(lengths)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)  # (B, T)
    for row, e in enumerate(examples):
        ids[row, :e.length] = torch.tensor(e.prep.input_ids)
        labels[row, :e.length] = torch.tensor(e.labels)
    lens = torch.tensor(lengths)
    key_mask = None if min(lengths) == T else torch.arange(T)[None] < lens[:, None]  # (B, T)
    return Batch(ids, labels, key_mask, lens, examples)


def audio_batch(auds: list, dev: torch.device, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every clip of `auds` (AudioInputs) as one right-padded feature batch on the device, and its lengths."""
    frames = max(a.features.shape[1] for a in auds)
    f = torch.cat([F.pad(a.features.to(dev, dt, non_blocking=True), (0, 0, 0, frames - a.features.shape[1]))
                   for a in auds])  # (N, T, 80)
    return f, torch.cat([a.frame_lengths for a in auds]).to(dev)  # (N,)


def progress_interval() -> float:
    """Seconds between progress-bar updates: live on a terminal, every 15 s into a log file."""
    import sys
    return 0.1 if sys.stderr.isatty() else 15.0


class BatchSource(torch.utils.data.Dataset):
    """Window k -> its micro-batches, collated, with media rebuilt (a DataLoader runs this in workers)."""

    def __init__(self, model, examples: list[Example], windows: list[list[list[int]]], pad_id: int,
                 media: bool = True):
        self.model, self.examples, self.windows, self.pad_id, self.media = model, examples, windows, pad_id, media

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, k: int) -> list[Batch]:
        get = (lambda i: _compact(with_media(self.model, self.examples[i]), self.model.dtype)) if self.media else \
            self.examples.__getitem__
        return [collate([get(i) for i in idx], self.pad_id) for idx in self.windows[k]]


def _compact(e: Example, dtype: torch.dtype) -> Example:
    """Pixels in the dtype the tower casts them to anyway (bf16 on a GPU): the same values, half the bytes to
    move from the worker to the GPU (~140 MB -> ~70 MB per 16k-token image batch)."""
    im = e.prep.images
    if im is None or im.pixel_values.dtype == dtype:
        return e
    return replace(e, prep=replace(e.prep, images=replace(im, pixel_values=im.pixel_values.to(dtype))))


def batch_loader(model, examples: list[Example], windows: list[list[list[int]]], pad_id: int, workers: int,
                 media: bool = True):
    """Iterate the windows in order; workers > 0 preprocess media ahead of the GPU in forked processes.
    media=False: batches carry no tower inputs (a stage that keeps its own, like vision-ctc's crop cache)."""
    src = BatchSource(model, examples, windows, pad_id, media)
    if not media or workers <= 0:
        return (src[k] for k in range(len(src)))
    return iter(torch.utils.data.DataLoader(src, batch_size=None, shuffle=False, num_workers=workers,
                                            prefetch_factor=4, multiprocessing_context="fork",
                                            worker_init_fn=_worker_init,
                                            pin_memory=model.device.type == "cuda"))  # async H2D copies
