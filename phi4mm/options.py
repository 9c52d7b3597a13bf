"""Runtime options: one frozen dataclass for the engine and one for the server, instead of loose keyword
arguments threaded through the CLI, the server, batch jobs and Ray replicas.

Field names follow vLLM's flags where one exists (`max_num_seqs` is `--max-num-seqs`), so a command line
pasted from vLLM maps one to one. Model-architecture settings live in `config.py` (the HF `config.json`
fields); these are choices about how to run a loaded model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs a loaded model (see `engine.Engine`)."""

    num_blocks: int | None = None  # KV blocks; None: sized from free memory (GPU) or CPU_KV_TOKENS (CPU)
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int | None = None  # sequences decoded together (vLLM's --max-num-seqs); None: 256 GPU, 64 CPU
    max_waiting: int = 1024  # queued requests before new ones are refused (HTTP 429)
    max_tokens_per_step: int = 2048  # packed prompt + decode tokens per forward: long prompts go in chunks
    # prompt tokens one prompt may add in a step while decodes are running: a long prompt is prefilled in slices
    # between decode steps, so other streams keep their pace (a smaller slice: smoother streams, a slower first
    # token); several prompts together still fill max_tokens_per_step
    prefill_tokens_with_decodes: int = 512
    max_model_len: int | None = None  # context per sequence; None: the model's, lowered to what the KV pool holds
    gpu_memory_utilization: float = 0.90  # share of the GPU's total memory the process may fill (vLLM's meaning)
    prefix_caching: bool = True  # reuse cached KV blocks of identical prompt heads
    media_cache_items: int = 64  # encoded images/audio kept for repeated media...
    # ...and the most bytes they may hold together (at full size one 36-crop image encodes to 59 MB in bf16,
    # so the item count alone would let the cache pin 3.7 GB)
    media_cache_bytes: int = 256 << 20
    static_decode: bool | None = None  # CUDA graphs for decode; None: on for CUDA
    merge_adapter: str | None = None  # "speech"/"vision": a merged weight copy for single-adapter batches
    # Seconds warmup() may spend capturing the CUDA graphs traffic meets first (every batch bucket, contexts up
    # to WARM_CONTEXT_TOKENS, each adapter kind; lone prompts up to the prefill graphs' limit). A bucket first
    # met in traffic is captured there instead, stalling that step ~0.1-1 s. 0: capture on first use only.
    graph_warmup_seconds: float = 120.0

    def but(self, **changes) -> EngineOptions:
        """A copy with some fields changed."""
        return replace(self, **changes)


@dataclass(frozen=True)
class ServeOptions:
    """How `phi4mm serve` exposes an engine over HTTP."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_names: tuple[str, ...] = ()  # names clients may send as "model" (vLLM's --served-model-name)
    allow_remote_media: bool = False  # fetch http(s) image/audio URLs
    allow_local_files: bool = False  # read file:// and plain paths
    max_body_bytes: int = 64 << 20
    default_max_tokens: int | None = None  # None: what remains of the context
    transcription_max_tokens: int = 448
    segment_seconds: float = 30.0
    ui: bool = True  # the web page for chat and transcription at `/` (`--no-ui` turns it off)
    # Per-request caps, checked from cheap measures (characters, counts, bytes) before any tokenizing or
    # decoding, so one request cannot hold the tokenizer or the towers for minutes. Each refusal is a 400.
    max_prompt_chars: int = 400_000  # text of all messages / prompts, tools and schema together
    max_messages: int = 512
    max_images: int = 8  # images per request
    max_audio_seconds: float = 600.0  # all audio clips of one chat request together
    max_transcription_seconds: float = 1800.0  # one upload to /v1/audio/*, split into segments
    max_media_bytes: int = 20 << 20  # one image or audio payload (inline, fetched or read)
    max_sequences: int = 64  # n x prompts of one request
    max_schema_chars: int = 32_000  # response_format json_schema, as JSON text
    max_tools: int = 128
    raw_completion_prompts: bool = False  # /v1/completions reads <|user|>, <|end|>... as special tokens
    allowed_media_dir: str | None = None  # local media files are read only under this directory
    remote_media_timeout_s: float = 15.0  # total deadline of one remote fetch, redirects included
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (Origin header)
    drain_timeout_s: float = 30.0  # on SIGTERM: time given to open requests before they end with an error
    timeout_keep_alive_s: int = 5  # idle keep-alive connections are closed after this
    read_timeout_s: float = 30.0  # the headers, then the body, of a request must each arrive within this
    # when the engine is idle and the process grew by this much since the last time: collect garbage and give
    # malloc's free pages back (engine/memory.py; 0: never)
    reclaim_growth_bytes: int = 64 << 20

    def but(self, **changes) -> ServeOptions:
        return replace(self, **changes)
