"""One request's state inside the engine, and what a step reports for it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from phi4mm.inputs.prepare import Prepared
from phi4mm.sampling import SamplingParams


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    token_id: int | None
    text: str  # newly completed text (stop strings and partial UTF-8 held back)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_generated: int = 0


@dataclass(eq=False)  # identity: `seq in running` must not compare every field (it did, O(batch^2) a step)
class Sequence:
    id: str
    prep: Prepared
    params: SamplingParams  # max_tokens resolved: never None here
    prompt_embeds: torch.Tensor | None  # (P, hidden): text and media embeddings (None: media not encoded yet)
    media_key: bytes  # content hash of the media, folded into prefix-cache hashes
    arrival: float
    max_len: int  # context this sequence may reach (the engine's max_model_len)
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are in `blocks`
    long_rope: bool = False
    decoder: Any = None  # the tokenizer's streaming decoder
    text: str = ""
    emitted: int = 0  # chars of `text` already streamed
    cancelled: bool = False
    hasher: Any = None  # running prefix-hash chain over this sequence's full blocks...
    hashed: int = 0  # ...covering this many blocks (registered in the pool)
    sampling_seed: int | None = None  # an unseeded request's seed, drawn when its first row is written

    @property
    def tokens(self) -> list[int]:
        return self.prep.input_ids + self.generated

    def token_at(self, i: int) -> int:
        p = self.prep.input_ids
        return p[i] if i < len(p) else self.generated[i - len(p)]

    @property
    def length(self) -> int:
        return len(self.prep.input_ids) + len(self.generated)

    @property
    def prefilling(self) -> bool:
        # Every token but the newest sampled one must be in the cache before we can decode.
        return self.num_cached < self.length - (1 if self.generated else 0)

    def advance(self, tok: int, eos: set[int], lp: float | None = None, top: Any = None
                ) -> tuple[StepOutput, str | None]:
        """Append a sampled token: update the streamed text, check stop tokens, stop strings and length.
        -> (the step's output, the finish reason or None)."""
        p = self.params
        self.generated.append(tok)
        reason = None
        stop_tok = (tok in eos and not p.ignore_eos) or tok in p.stop_token_ids
        if stop_tok:
            reason = "stop"
        else:
            self.text += self.decoder.push(tok)
        for s in p.stop:
            i = self.text.find(s, max(0, self.emitted - len(s)))
            if i >= 0:
                self.text, reason = self.text[:i], "stop"
        if reason is None and (len(self.generated) >= p.max_tokens or self.length >= self.max_len):
            reason = "length"
            self.text += self.decoder.flush()
        # Hold back a tail that could still become a stop string.
        hold = 0 if reason else max((len(s) - 1 for s in p.stop), default=0)
        delta = self.text[self.emitted:len(self.text) - hold] if len(self.text) - hold > self.emitted else ""
        self.emitted += len(delta)
        out = StepOutput(self.id, tok, delta, logprob=lp, top_logprobs=top and list(zip(*top)),
                         num_prompt_tokens=self.prep.num_tokens, num_generated=len(self.generated))
        return out, reason

    def final(self, reason: str, error: str | None = None) -> StepOutput:
        """The closing output: what text is left (none for a cancelled request) and the reason."""
        rest = self.text[self.emitted:] if reason != "cancelled" else ""
        self.emitted = len(self.text)
        return StepOutput(self.id, None, rest, True, reason, error=error, num_prompt_tokens=self.prep.num_tokens,
                          num_generated=len(self.generated))
