"""End to end parity with the reference (transformers' Phi4MultimodalForCausalLM + peft adapters).

Tiny random checkpoints (same structure as the published model, few layers) in float32 on CPU, loaded by
*our production loader*. Reference quirks (docs/architecture.md#reference-quirks) are avoided: the vision tower runs
with eager attention (its SDPA path is causal when no crop is padded, a bug), and audio goes one clip per
call (its batched audio mask adds +1 instead of masking, a bug).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import phi4mm
from phi4mm.inputs.prepare import Prepared
from phi4mm.model.lora import AdapterPlan
from tests.conftest import scene, tone

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
TOL = 1e-4


@pytest.fixture(scope="module")
def ours(tiny_hf):
    return phi4mm.load(tiny_hf, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tiny_hf):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.Phi4MultimodalForCausalLM.from_pretrained(
            tiny_hf, dtype=torch.float32, attn_implementation="eager")
        ref.load_adapter(str(tiny_hf / "speech-lora"), adapter_name="speech")
        ref.load_adapter(str(tiny_hf / "vision-lora"), adapter_name="vision")
    return ref.eval()


def _ref_logits(ref, prep, last: int = 0) -> torch.Tensor:
    kw = {"input_ids": torch.tensor([prep.input_ids]), "logits_to_keep": last}  # 0: every position
    if prep.images is not None:
        kw.update(image_pixel_values=prep.images.pixel_values, image_sizes=prep.images.image_sizes,
                  image_attention_mask=prep.images.attention_mask)
    if prep.audios is not None:
        kw.update(audio_input_features=prep.audios.features,
                  audio_embed_sizes=torch.tensor(prep.audios.num_tokens))
    with torch.no_grad():
        if prep.adapter is None:
            ref.disable_adapters()
        else:
            ref.enable_adapters()
            ref.set_adapter(prep.adapter)
        return ref(**kw).logits[0].float()


def _check(ours, reference, prompt, images=None, audios=None, adapter=None, last=None):
    """Our logits against the reference's; `last`: only the last positions' (every earlier position reaches
    them through attention), for prompts whose full logits would take gigabytes."""
    prep = ours.prepare(prompt, images, audios)
    assert prep.adapter == adapter
    got = ours.logits(prompt, images, audios, last=last)
    want = _ref_logits(reference, prep, last or 0)
    assert got.shape == want.shape == (last or len(prep.input_ids), ours.config.text.vocab_size)
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < TOL, f"relative max error {err:.2e}"
    return prep


def test_text(ours, reference):
    prep = _check(ours, reference, "<|system|>You are terse.<|end|><|user|>Name three colours.<|end|><|assistant|>")
    assert prep.images is None and prep.audios is None


def test_one_image(ours, reference):
    prep = _check(ours, reference, "<|user|><|image_1|>What is shown?<|end|><|assistant|>", images=[scene(448, 448)],
                  adapter="vision")
    assert prep.images.num_tokens == [545]


def test_extreme_aspect_many_crops(ours, reference):
    prep = _check(ours, reference, "<|user|><|image_1|>Read the strip.<|end|><|assistant|>",
                  images=[scene(3000, 400, seed=1)], adapter="vision", last=64)
    assert prep.images.num_tokens == [1968]


def test_two_images(ours, reference):
    _check(ours, reference, "<|user|><|image_1|><|image_2|>Compare.<|end|><|assistant|>",
           images=[scene(640, 480, 2), scene(300, 500, 3)], adapter="vision", last=64)


def test_short_audio(ours, reference):
    prep = _check(ours, reference, "<|user|><|audio_1|>Transcribe the audio to text.<|end|><|assistant|>",
                  audios=[tone(2.0)], adapter="speech")
    assert prep.audios.num_tokens == [25]


def test_audio_over_40s(ours, reference):
    prep = _check(ours, reference, "<|user|><|audio_1|>Summarize.<|end|><|assistant|>", audios=[tone(47.3, seed=4)],
                  adapter="speech")
    assert prep.audios.num_tokens[0] > 500  # several independent 500-token windows


def test_image_and_audio_use_vision_adapter_and_projector(ours, reference):
    prep = _check(ours, reference, "<|user|><|image_1|><|audio_1|><|end|><|assistant|>",
                  images=[scene(448, 448, 5)], audios=[tone(3.0, seed=5)], adapter="vision")
    assert prep.audio_projector == "vision"


def test_official_layout_loads_to_identical_logits(ours, tiny_official):
    """The same seed in the official layout (base_layer / lora_A.vision names, original tower names)."""
    official = phi4mm.load(tiny_official, dtype=torch.float32)
    for sd_a, sd_b in ((official.net.state_dict(), ours.net.state_dict()),):
        assert sd_a.keys() == sd_b.keys()
        for k in sd_a:
            assert torch.equal(sd_a[k], sd_b[k]), k
    prompt = "<|user|><|image_1|><|audio_1|>Hi<|end|><|assistant|>"
    media = dict(images=[scene(500, 300)], audios=[tone(1.5)])
    assert torch.equal(official.logits(prompt, **media), ours.logits(prompt, **media))


def test_last_keeps_the_last_positions_and_refuses_a_bad_count(ours):
    prompt = "<|user|>Hello there, how are you?<|end|><|assistant|>"
    full = ours.logits(prompt)
    # The head's GEMM over 3 rows may round differently from the same rows among all of them.
    assert torch.allclose(ours.logits(prompt, last=3), full[-3:], atol=1e-5, rtol=0)
    assert ours.logits(prompt, last=10_000).shape == full.shape  # more than the prompt: every position
    for bad in (0, -1):
        with pytest.raises(ValueError, match="last must be a positive number of positions"):
            ours.logits(prompt, last=bad)


def test_mixed_adapter_batch_equals_one_at_a_time(ours):
    """One batch holding rows with no adapter, vision and speech equals each row alone."""
    net = ours.net
    torch.manual_seed(0)
    ids = torch.randint(0, 199000, (3, 9))
    embeds = net.embed(ids)
    pos = torch.arange(9)[None].expand(3, 9)
    rows = [None, "vision", "speech"]
    batched = net(embeds, pos, plan=AdapterPlan.build(rows))
    for i, a in enumerate(rows):
        alone = net(embeds[i:i + 1], pos[i:i + 1], plan=AdapterPlan.build(a))
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    # ...and the adapters really change the output (they are not silently skipped).
    assert not torch.allclose(batched[0], batched[1]) and not torch.allclose(batched[1], batched[2])


def test_base_weights_never_change(ours):
    before = {k: v.clone() for k, v in ours.net.state_dict().items()}
    ours.logits("<|user|><|image_1|>x<|end|><|assistant|>", images=[scene(448, 448)])
    ours.logits("<|user|><|audio_1|>x<|end|><|assistant|>", audios=[tone(1.0)])
    for k, v in ours.net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_long_prompt_uses_long_rope_factors(ours, reference):
    """Past 4096 tokens both switch to the long factors for the whole sequence."""
    torch.manual_seed(1)
    ids = torch.randint(0, 199000, (1, 4200))
    with torch.no_grad():
        reference.disable_adapters()
        want = reference(input_ids=ids, logits_to_keep=50).logits[0].float()
        tail = torch.arange(4150, 4200)  # only these positions' logits (the full (4200, V) is 3.4 GB)
        got = ours.net(ours.net.embed(ids), torch.arange(4200)[None], last_only=tail)[:, 0].float()
        short = ours.net(ours.net.embed(ids), torch.arange(4200)[None], long_rope=False, last_only=tail)[:, 0].float()
    err = (got - want).abs().max() / want.abs().max()
    assert err < TOL
    assert (short - want).abs().max() / want.abs().max() > 100 * TOL  # the choice matters


def test_greedy_generation_across_the_4096_switch_matches_reference(ours, reference):
    """Crossing 4096 tokens, every key is recomputed with the long factors (MS/HF re-prefill at 4097).

    The correct reference is HF's full forward at each step. HF 5.17's own `generate` is wrong here: it drops
    the cache at 4097 tokens but still slices the input by cache_position, so the model sees only the newest
    token (its scores equal a one-token forward with no context exactly); asserted below as documentation.
    """
    torch.manual_seed(2)
    text_ids = torch.randint(0, 199000, (4090,)).tolist()
    prompt_ids = ours.tokenizer.encode("<|user|>") + text_ids + ours.tokenizer.encode("<|end|><|assistant|>")
    n = len(prompt_ids)
    steps = 6
    assert n < 4096 < n + steps
    reference.disable_adapters()
    want, seq = [], list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            want.append(int(reference(input_ids=torch.tensor([seq]), logits_to_keep=1).logits[0, -1].argmax()))
            seq.append(want[-1])
    got = ours.generate_ids(Prepared(prompt_ids, None, None, None, "speech"), max_new_tokens=steps)
    assert got == want[: len(got)] and len(got) >= 5

    with torch.no_grad():  # the reference generate bug, for the record
        out = reference.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=5, min_new_tokens=5,
                                 do_sample=False, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
        first_long = 4097 - n  # index of the token predicted from 4097 tokens
        last = out.sequences[:, n + first_long - 1:n + first_long]
        alone = reference(input_ids=last, position_ids=torch.tensor([[4096]])).logits[0, -1]
    torch.testing.assert_close(out.scores[first_long][0], alone, rtol=1e-5, atol=1e-5)
