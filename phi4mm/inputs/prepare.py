"""Prompt + media -> token ids with exactly expanded placeholders, tower inputs, and the adapter to use.

`<|image_N|>` / `<|audio_N|>` name the N-th image / audio passed with the request. The original processor
ignores N and matches placeholders in order of appearance; for prompts written in order (every example in
the model card) both agree. phi4mm honours N, and refuses a reference to a missing item or an item nobody
references, instead of silently guessing.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from phi4mm.config import ModelConfig
from phi4mm.inputs.audio import AudioInputs, load_audio, preprocess_audios
from phi4mm.inputs.chat import (
    Segment,
    flatten_content,
    prepare_messages,
    render_segments,
)
from phi4mm.inputs.image import ImageInputs, load_image, preprocess_images
from phi4mm.inputs.tokenizer import Tokenizer
from phi4mm.inputs.video import expand_videos, is_video

PLACEHOLDER = re.compile(r"<\|(image|audio)_(\d+)\|>")


class InputError(ValueError):
    """A request whose text and media do not fit together; the message says what to fix."""


@dataclass
class Prepared:
    input_ids: list[int]
    images: ImageInputs | None
    audios: AudioInputs | None
    adapter: str | None  # "vision" | "speech" | "text" | None: the mixture-of-LoRAs choice for this request
    audio_projector: str  # "speech", or "vision" when the prompt also has images

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


TEXT_ADAPTER = "text"  # a text fine-tune's adapter (`phi4mm train --stage text`, shipped as text-lora/)


def choose_adapter(has_images: bool, has_audio: bool) -> tuple[str | None, str]:
    """text -> no adapter; audio -> speech; image (with or without audio) -> vision (docs/architecture.md)."""
    if has_images:
        return "vision", "vision"
    if has_audio:
        return "speech", "speech"
    return None, "speech"


def prepare(prompt: str | Sequence[dict[str, Any]], tokenizer: Tokenizer, cfg: ModelConfig,
            images: Sequence[Any] | None = None, audios: Sequence[Any] | None = None,
            tools: list[dict] | None = None, max_audio_seconds: float = 1800.0, plain_text: bool = False) -> Prepared:
    """Turn a prompt string in the model-card format, or a list of chat messages, into model inputs.

    Chat messages may carry OpenAI-style content parts (text, image_url, input_audio, ...) instead of
    `images`/`audios` arguments.
    Images: anything `load_image` takes, or a video as {"video": path | bytes | data URL, options...}
    (inputs/video.py; it becomes frames); audios: `(array, sample_rate)` pairs, paths or bytes.
    `plain_text`: what the caller wrote is plain text: `<|end|>`, `<|endoftext10|>` or `<|image_1|>` typed in a
    message (or in a prompt string) are characters, not special tokens or placeholders; only the chat
    template's own tokens and the placeholders of media parts are. Servers use it for untrusted input.
    """
    images, audios = list(images or []), list(audios or [])
    if isinstance(prompt, str):
        segments: list[Segment] = [(prompt, not plain_text)]
    else:
        if plain_text:
            segments = render_segments(list(prompt), tools)
            _, part_images, part_audios = flatten_content(list(prompt))
        else:
            text, part_images, part_audios = prepare_messages(list(prompt), tools=tools, add_generation_prompt=True)
            segments = [(text, True)]
        if (part_images and images) or (part_audios and audios):
            raise InputError("media were given both as message content parts and as arguments; pass each "
                             "image/audio one way (content parts are numbered from 1 in order)")
        images, audios = images or part_images, audios or part_audios
    return prepare_segments(segments, tokenizer, cfg, images, audios, max_audio_seconds)


def prepare_segments(segments: Sequence[Segment], tokenizer: Tokenizer, cfg: ModelConfig,
                     images: Sequence[Any] = (), audios: Sequence[Any] = (), max_audio_seconds: float = 1800.0
                     ) -> Prepared:
    """`prepare` for a prompt already in (text, is_markup) segments (`chat.render_segments`): special tokens
    and `<|image_N|>` / `<|audio_N|>` placeholders count only in markup; other text is encoded as plain text."""
    images, audios = list(images), list(audios)
    if any(is_video(x) for x in images):  # frames (and the sound track) replace each video before numbering
        if cfg.vision is None:
            raise InputError("this checkpoint has no vision tower, so it cannot watch a video; send text or audio")
        # Placeholders live in markup only: renumber them there, one joined string, the plain text left out.
        sep = "\x00"
        if any(sep in t for t, markup in segments if markup):
            raise InputError("the prompt holds a NUL character; remove it")
        joined, images, audios = expand_videos(sep.join(t if markup else "" for t, markup in segments), images,
                                               audios, cfg.dynamic_hd)
        segments = [(new if markup else t, markup) for (t, markup), new in zip(segments, joined.split(sep))]
    if images and cfg.vision is None or audios and cfg.audio is None:
        raise InputError("this checkpoint is text-only (no vision/audio tower); send text only")
    merged: list[list] = []
    for text, markup in segments:  # adjacent pieces of one kind encode as one (BPE merges across them)
        if merged and merged[-1][1] == markup:
            merged[-1][0] += text
        elif text:
            merged.append([text, markup])
    # Read the placeholder order first: tower inputs are built once, already in that order.
    given = {"image": images, "audio": audios}
    refs = [m for text, markup in merged if markup for m in PLACEHOLDER.finditer(text)]
    order: dict[str, list[int]] = {"image": [], "audio": []}
    for m in refs:
        kind, n = m.group(1), int(m.group(2))
        if not 1 <= n <= len(given[kind]):
            raise InputError(f"the prompt names <|{kind}_{n}|> but {len(given[kind])} {kind}(s) were given; "
                             f"number {kind}s from 1 in the order you pass them")
        order[kind].append(n - 1)
    for kind in ("image", "audio"):
        missing = sorted(set(range(len(given[kind]))) - set(order[kind]))
        if missing:
            raise InputError(f"{kind} {missing[0] + 1} was given but the prompt has no <|{kind}_{missing[0] + 1}|> "
                             f"placeholder; put it where the {kind} belongs in the text")
        if len(order[kind]) != len(set(order[kind])):
            raise InputError(f"a <|{kind}_N|> placeholder appears twice; reference each {kind} once "
                             f"(pass the same {kind} twice if it is needed twice)")
    pil = [load_image(images[i]) for i in order["image"]]
    wavs = [load_audio(audios[i], max_seconds=max_audio_seconds) for i in order["audio"]]
    img_in = preprocess_images(pil, dynamic_hd=cfg.dynamic_hd) if pil else None
    aud_in = preprocess_audios(wavs) if wavs else None

    counts = {"image": iter(img_in.num_tokens if img_in else []), "audio": iter(aud_in.num_tokens if aud_in else [])}
    media_ids = {"image": cfg.image_token_id, "audio": cfg.audio_token_id}
    ids: list[int] = []
    after_stripping_token = False
    for text, markup in merged:
        if not markup:
            # The tokenizer's rstrip tokens (<|user|>, <|end|>...) swallow the whitespace after them when the
            # prompt is one string; plain text after one gets the same treatment, so both ways give one encoding.
            ids += tokenizer.encode_plain(text.lstrip() if after_stripping_token else text)
            after_stripping_token = False
            continue
        pos = 0
        for m in PLACEHOLDER.finditer(text):
            kind = m.group(1)
            ids += tokenizer.encode(text[pos:m.start()]) + [media_ids[kind]] * next(counts[kind])
            pos = m.end()
        ids += tokenizer.encode(text[pos:])
        after_stripping_token = text.endswith(tokenizer.rstrip_tokens)
    adapter, projector = choose_adapter(img_in is not None, aud_in is not None)
    if adapter is not None and adapter not in cfg.loras:
        adapter = None  # e.g. a transformers-native directory loaded without its adapter folders
    if adapter is None and img_in is None and aud_in is None and TEXT_ADAPTER in cfg.loras:
        adapter = TEXT_ADAPTER  # a checkpoint with a text fine-tune uses it for text-only prompts
    return Prepared(ids, img_in, aud_in, adapter, projector)
