"""Prompt + media -> ids: exact placeholder expansion, adapter choice, chat messages, bad input."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf
import torch

import phi4mm
from phi4mm.inputs.image import num_image_tokens
from phi4mm.inputs.prepare import InputError
from tests.conftest import scene, tone


@pytest.fixture(scope="module")
def model(tiny_official):
    return phi4mm.load(tiny_official, dtype=torch.float32)


def _count(ids, tok):
    return sum(1 for i in ids if i == tok)


def test_placeholders_expand_to_exact_tower_counts(model):
    img, aud = scene(1000, 700), tone(1.0)
    prep = model.prepare("<|user|><|image_1|><|audio_1|>What?<|end|><|assistant|>", images=[img], audios=[aud])
    assert _count(prep.input_ids, 200010) == num_image_tokens(1000, 700) == 1777
    assert _count(prep.input_ids, 200011) == 13  # 1 s -> 98 frames -> 13 tokens
    img_emb = model.net.vision(prep.images.pixel_values, prep.images.attention_mask, prep.images.image_sizes)
    aud_emb = model.net.audio(prep.audios.features, prep.audios.frame_lengths)
    assert [e.shape[0] for e in img_emb] == [1777] and [e.shape[0] for e in aud_emb] == [13]
    # The text around the placeholders tokenises exactly as the model card's prompt does.
    tok = model.tokenizer
    assert prep.input_ids[:1] == tok.encode("<|user|>") and prep.input_ids[-4:] == tok.encode("What?<|end|><|assistant|>")


@pytest.mark.parametrize("media,adapter,projector", [
    ({}, None, "speech"), ({"audios": [tone(1.0)]}, "speech", "speech"),
    ({"images": [scene(64, 64)]}, "vision", "vision"),
    ({"images": [scene(64, 64)], "audios": [tone(1.0)]}, "vision", "vision")])
def test_adapter_choice(model, media, adapter, projector):
    refs = "".join(f"<|image_{i + 1}|>" for i in range(len(media.get("images", []))))
    refs += "".join(f"<|audio_{i + 1}|>" for i in range(len(media.get("audios", []))))
    prep = model.prepare(f"<|user|>{refs}Hi<|end|><|assistant|>", **media)
    assert (prep.adapter, prep.audio_projector) == (adapter, projector)


def test_numbered_references_pick_their_image(model):
    a, b = scene(448, 448, 1), scene(896, 448, 2)
    swapped = model.prepare("<|user|><|image_2|>and<|image_1|><|end|><|assistant|>", images=[a, b])
    in_order = model.prepare("<|user|><|image_1|>and<|image_2|><|end|><|assistant|>", images=[b, a])
    assert swapped.input_ids == in_order.input_ids
    assert torch.equal(swapped.images.pixel_values, in_order.images.pixel_values)


def test_chat_messages_with_openai_parts(model):
    png = io.BytesIO()
    scene(300, 200).save(png, format="PNG")
    wav = io.BytesIO()
    sf.write(wav, tone(1.5, rate=48000)[0], 48000, format="WAV")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.getvalue()).decode(), "format": "wav"}},
        ]}]
    prep = model.prepare(messages)
    direct = model.prepare("<|system|>Be brief.<|end|><|user|>Look:<|image_1|><|audio_1|><|end|><|assistant|>",
                           images=[scene(300, 200)], audios=[(tone(1.5, rate=48000)[0], 48000)])
    assert prep.input_ids == direct.input_ids
    assert prep.adapter == "vision" and prep.audios.num_tokens == [19]
    # Generating from the messages answers as generating from the equivalent prompt, and the text reply is the
    # decoding of those ids.
    ids = model.generate_ids(direct, max_new_tokens=3)
    assert 1 <= len(ids) <= 3 and model.generate_ids(messages, max_new_tokens=3) == ids
    assert model.generate(messages, max_new_tokens=3) == model.tokenizer.decode(ids, skip_special_tokens=True)


def test_tools_in_system_turn(model):
    tools = [{"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}]
    prep = model.prepare([{"role": "user", "content": "Weather in Paris?"}], tools=tools)
    text = model.tokenizer.decode(prep.input_ids)
    assert text.startswith('<|system|><|tool|>[{"name": "get_weather"') and text.endswith("<|assistant|>")


# ---- bad input ----

def test_reference_to_missing_image(model):
    with pytest.raises(InputError, match=r"<\|image_2\|> but 1 image"):
        model.prepare("<|user|><|image_2|>?<|end|><|assistant|>", images=[scene(64, 64)])


def test_unreferenced_media(model):
    with pytest.raises(InputError, match=r"image 2 was given but the prompt has no <\|image_2\|>"):
        model.prepare("<|user|><|image_1|>?<|end|><|assistant|>", images=[scene(64, 64), scene(64, 64)])
    with pytest.raises(InputError, match=r"audio 1 was given"):
        model.prepare("<|user|>?<|end|><|assistant|>", audios=[tone(1.0)])


def test_duplicate_reference(model):
    with pytest.raises(InputError, match="appears twice"):
        model.prepare("<|user|><|image_1|><|image_1|><|end|><|assistant|>", images=[scene(64, 64)])


def test_media_both_ways(model):
    with pytest.raises(InputError, match="both as message content parts and as arguments"):
        model.prepare([{"role": "user", "content": [{"type": "image", "image": scene(64, 64)}]}],
                      images=[scene(64, 64)])


def test_bad_media_errors_name_the_problem(model):
    from phi4mm.inputs.audio import AudioError
    from phi4mm.inputs.image import ImageError
    with pytest.raises(ImageError):
        model.prepare("<|user|><|image_1|><|end|><|assistant|>", images=[b"not an image"])
    with pytest.raises(AudioError, match="NaN|nan"):
        model.prepare("<|user|><|audio_1|><|end|><|assistant|>", audios=[(np.full(16000, np.nan, np.float32), 16000)])
    with pytest.raises(AudioError):
        model.prepare("<|user|><|audio_1|><|end|><|assistant|>", audios=[(np.zeros(0, np.float32), 16000)])
    with pytest.raises(AudioError, match="input_audio"):
        model.prepare("<|user|><|audio_1|><|end|><|assistant|>", audios=[{"format": "wav"}])
