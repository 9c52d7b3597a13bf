"""The sampling state of the running sequences, kept on the device from step to step (vLLM's InputBatch idea).

Each sequence that needs a sampled token gets a row (a slot) in a set of device tables: its parameters, seed,
noise counter, prompt mask and output counts. A row is written when its sequence first needs a token, and
again only when it comes back after leaving; the rows of sequences that left the running set are dropped and
the last rows move into the holes, so the live rows are always slots [0, n). A step then costs the count and
counter update of the tokens it drew, not a rebuild of (rows, vocab) tables from Python lists.

The rows stay in step with the sequences: before each use, a row whose recorded token count differs from its
sequence's (a token drawn on the runner's greedy fast path, or a step that failed after drawing) is written
again from the sequence's tokens. Plain greedy rows are exempt: nothing in their row can change their token.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor

from phi4mm.engine.sequence import Sequence
from phi4mm.sampling import SamplingBatch, SamplingParams

MIN_ROWS = 8  # the first allocation; the tables double when more rows are live at once
SEED_BOUND = 1 << 62  # an unseeded request's seed is drawn below this, as SamplingBatch.build draws one


def plain_greedy(p: SamplingParams) -> bool:
    """The token is the argmax of the raw logits: no penalty, no logprobs, nothing held back, no constraint."""
    return (p.temperature == 0 and p.repetition_penalty == 1 and p.presence_penalty == 0
            and p.frequency_penalty == 0 and p.logprobs is None and p.min_tokens == 0 and p.constraint is None)


@dataclass
class Rows:
    """One step's sampling rows: row i of `batch` is the step's sequence number order[i], in slot slots[i]."""

    batch: SamplingBatch
    order: list[int]
    slots: list[int]
    index: Tensor  # `slots` on the device


class PersistentBatch:
    """Sampling rows of the running sequences on `device`, written on membership changes only."""

    def __init__(self, device: torch.device | str, vocab_size: int):
        self.device, self.vocab_size = torch.device(device), vocab_size
        self.seqs: list[Sequence] = []  # slot -> sequence; the live rows are slots [0, len(seqs))
        self.slot: dict[Sequence, int] = {}
        self.counted: list[int] = []  # slot -> tokens its counts and noise counter hold
        self.tables: dict[str, Tensor] = {}  # SamplingBatch.row_fields() -> (capacity, ...) tensor
        self.live: tuple[SamplingBatch, Tensor] | None = None  # views of the live rows, and arange(n)

    def __len__(self) -> int:
        return len(self.seqs)

    def rows(self, seqs: list[Sequence], running: Collection[Sequence]) -> Rows:
        """The rows of `seqs` (a step's sequences that need a token, all in `running`), ordered by slot. Rows of
        sequences no longer running are dropped first, then missing or stale rows written."""
        alive = running if isinstance(running, (set, frozenset)) else set(running)
        gone = [s for s in self.seqs if s not in alive]
        if gone:
            self.drop(gone)
        todo = [s for s in seqs if s not in self.slot
                or (self.counted[self.slot[s]] != len(s.generated) and not plain_greedy(s.params))]
        if todo:
            self.write(todo)
        order = sorted(range(len(seqs)), key=lambda i: self.slot[seqs[i]])
        slots = [self.slot[seqs[i]] for i in order]
        if self.live is None:
            self.live = (self.view(), torch.arange(len(self.seqs), device=self.device))
        full, every = self.live
        if len(slots) == len(self.seqs):  # distinct and sorted: every live row, so the views themselves
            return Rows(full, order, slots, every)
        return Rows(full.select(slots), order, slots, torch.tensor(slots, dtype=torch.long, device=self.device))

    def drop(self, gone: list[Sequence]) -> None:
        """Free the rows of `gone`; the last live rows move into the holes, so the live rows stay [0, n)."""
        for s in gone:
            del self.slot[s]
        n = len(self.seqs) - len(gone)
        holes = [i for i in range(n) if self.seqs[i] not in self.slot]
        movers = [i for i in range(n, len(self.seqs)) if self.seqs[i] in self.slot]
        if holes:
            dst = torch.tensor(holes, dtype=torch.long, device=self.device)
            src = torch.tensor(movers, dtype=torch.long, device=self.device)
            for t in self.tables.values():
                t[dst] = t[src]
            for h, m in zip(holes, movers):
                self.seqs[h], self.counted[h] = self.seqs[m], self.counted[m]
                self.slot[self.seqs[h]] = h
        del self.seqs[n:], self.counted[n:]
        self.live = None

    def write(self, seqs: list[Sequence]) -> None:
        """(Re)write the rows of `seqs` from their parameters and tokens; new rows go after the live ones."""
        for s in seqs:
            if s.params.seed is None and s.sampling_seed is None:  # drawn once: kept across preemption
                s.sampling_seed = int(torch.randint(0, SEED_BOUND, ()))
            if s not in self.slot:
                self.slot[s] = len(self.seqs)
                self.seqs.append(s)
                self.counted.append(0)
        fresh = SamplingBatch.build([s.params for s in seqs], self.device, self.vocab_size,
                                    [s.prep.input_ids for s in seqs], [s.generated for s in seqs],
                                    seeds=[s.sampling_seed if s.params.seed is None else s.params.seed
                                           for s in seqs])
        self.reserve(fresh, len(self.seqs))
        index = torch.tensor([self.slot[s] for s in seqs], dtype=torch.long, device=self.device)
        for name, t in self.tables.items():
            new = getattr(fresh, name)
            if name == "stop_token_ids":  # narrower than the kept table: pad with -1 (no id)
                new = torch.nn.functional.pad(new, (0, t.shape[1] - new.shape[1]), value=-1)
            t[index] = new
        for s in seqs:
            self.counted[self.slot[s]] = len(s.generated)
        self.live = None

    def reserve(self, like: SamplingBatch, rows: int) -> None:
        """Tables of `like`'s dtypes holding `rows` rows (doubling) and its stop ids; kept rows move over."""
        have = len(next(iter(self.tables.values()))) if self.tables else 0
        width = self.tables["stop_token_ids"].shape[1] if self.tables else 0
        want = like.stop_token_ids.shape[1]
        if rows <= have and want <= width:
            return
        cap = max(rows, MIN_ROWS, 2 * have) if rows > have else have
        grown = {}
        for name in SamplingBatch.row_fields():
            proto = getattr(like, name)
            if name == "stop_token_ids":
                t = torch.full((cap, max(want, width)), -1, dtype=proto.dtype, device=self.device)
            else:
                t = torch.zeros((cap, *proto.shape[1:]), dtype=proto.dtype, device=self.device)
            if have:  # the kept rows (and stop ids) into the new table's leading corner
                old = self.tables[name]
                t[tuple(slice(0, d) for d in old.shape)].copy_(old)
            grown[name] = t
        self.tables = grown
        self.live = None

    def view(self) -> SamplingBatch:
        """A SamplingBatch of the live rows whose tensors are views of the tables."""
        n = len(self.seqs)
        return SamplingBatch(params=[s.params for s in self.seqs], vocab_size=self.vocab_size,
                             **{k: t[:n] for k, t in self.tables.items()})

    def record(self, rows: Rows, tokens: Tensor) -> None:
        """Count the tokens (one per row of `rows`, in its order) just drawn, and advance their noise counters."""
        counts, steps = self.tables["output_counts"], self.tables["steps"]
        counts.index_put_((rows.index, tokens.long()), torch.ones_like(rows.index, dtype=counts.dtype),
                          accumulate=True)
        steps.index_add_(0, rows.index, torch.ones_like(rows.index))
        for slot in rows.slots:
            self.counted[slot] += 1
