"""Parity of phi4mm's vision tower with transformers 5.17 on a tiny random config (float32, CPU).

The oracle is `Phi4MultimodalForCausalLM`'s image embedding with the vision tower on *eager* attention: its
SDPA path runs causal attention when no crop is padded (an HF bug), which one test below documents.
Inputs come from transformers' own `Phi4MultimodalImageProcessor`, so the padded/partial crops and masks are
exactly what the reference sees.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # the HF image processor needs it
from PIL import Image, ImageDraw  # noqa: E402
from transformers import (  # noqa: E402
    Phi4MultimodalConfig,
    Phi4MultimodalForCausalLM,
    Phi4MultimodalImageProcessor,
)

from phi4mm.config import IMAGE_TOKEN_ID, ModelConfig, VisionConfig  # noqa: E402
from phi4mm.model.vision import ImageEmbedding  # noqa: E402

PREFIX = "model.embed_tokens_extend.image_embed."
TEXT_HIDDEN = 64
VISION_LAYERS = 3  # only 2 run: feature layer -2
ATOL_EMBED = 1e-4  # full image embedding (encoder + assembly + projector)
ATOL_ENCODER = 1e-5  # layer -2 features against eager fp32


# ---- fixtures -----------------------------------------------------------------------------------------------

def _tiny_hf_config() -> Phi4MultimodalConfig:
    head_dim = TEXT_HIDDEN // 4
    n_rot = int(head_dim * 0.75) // 2  # LongRoPE factor lists must match the rotary half-dimension
    rope = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                short_factor=[1.0] * n_rot, long_factor=[1.0 + 0.1 * i for i in range(n_rot)])
    return Phi4MultimodalConfig(
        vocab_size=200064, hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=rope,
        # image_size / patch_size stay 448 / 14: the preprocessor's crops are 448 px.
        vision_config=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                           num_hidden_layers=VISION_LAYERS),
        audio_config=dict(hidden_size=32, intermediate_size=48, num_blocks=1, num_attention_heads=2,
                          nemo_conv_channels=32, ext_pw_out_channel=32, depthwise_separable_out_channel=32))


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Fresh noise in every parameter (HF zero-inits biases and separators), scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.dim() >= 2 and "position_embedding" not in name and "extensor" not in name:
                p.copy_(noise / math.sqrt(p[0].numel()))  # 1/sqrt(fan_in)
            else:
                p.copy_(noise)  # position table, separators, probe


def _unused_keys(n_layers: int) -> tuple[str, ...]:
    """Checkpoint keys our tower does not build (never reach layer -2)."""
    return (f"img_processor.encoder.layers.{n_layers - 1}.", "img_processor.post_layernorm.", "img_processor.head.")


@pytest.fixture(scope="module")
def hf_model() -> Phi4MultimodalForCausalLM:
    torch.manual_seed(0)
    model = Phi4MultimodalForCausalLM(_tiny_hf_config()).eval()
    image_embed = model.model.embed_tokens_extend.image_embed
    _randomise(image_embed, seed=1)
    image_embed.img_processor.set_attn_implementation("eager")  # the correct, bidirectional oracle
    return model


@pytest.fixture(scope="module")
def ours(hf_model: Phi4MultimodalForCausalLM) -> ImageEmbedding:
    cfg = ModelConfig.from_hf(hf_model.config.to_dict())
    assert cfg.vision.num_hidden_layers == VISION_LAYERS and cfg.vision.num_layers_run == VISION_LAYERS - 1
    model = ImageEmbedding(cfg.vision, cfg.text.hidden_size).eval()
    unused = _unused_keys(cfg.vision.num_hidden_layers)
    sd = {k[len(PREFIX):]: v for k, v in hf_model.state_dict().items() if k.startswith(PREFIX)}
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith(unused)}, strict=True)
    return model


@pytest.fixture(scope="module")
def processor() -> Phi4MultimodalImageProcessor:
    return Phi4MultimodalImageProcessor()


def _image(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like test card: smooth colour gradients, shapes, text and a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / (17 + seed)), 128 + 100 * np.cos(yy / 23.0),
                     255 * (xx + yy) / (width + height)], axis=-1)
    base += rng.normal(0, 12, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for k in range(8):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse([x0, y0, x0 + width // 5 + 3, y0 + height // 5 + 3], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw.text((x0, y0), f"phi4mm {k}", fill=(0, 0, 0))
    return img


def _hf_image_tokens(hf_model: Phi4MultimodalForCausalLM, batch) -> list[torch.Tensor]:
    """Run HF's image embedding on a prompt made only of image placeholders and cut out each image's rows."""
    counts = [int(n) for n in batch["num_img_tokens"]]
    ids = torch.full((1, sum(counts)), IMAGE_TOKEN_ID)
    embeds = torch.zeros(1, sum(counts), TEXT_HIDDEN)
    with torch.no_grad():
        out = hf_model.model.embed_tokens_extend.image_embed(
            ids, embeds, image_pixel_values=batch["image_pixel_values"], image_sizes=batch["image_sizes"],
            image_attention_mask=batch["image_attention_mask"])
    return list(out[0].split(counts))


def _hf_layer_minus_2(hf_model: Phi4MultimodalForCausalLM, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = hf_model.model.embed_tokens_extend.image_embed.img_processor(
            pixels, patch_attention_mask=mask.bool(), output_hidden_states=True)
    return out.hidden_states[-2]


def _compare_embedding(hf_model, ours, processor, images: list[Image.Image]) -> list[torch.Tensor]:
    batch = processor(images, return_tensors="pt")
    expected = _hf_image_tokens(hf_model, batch)
    with torch.no_grad():
        got = ours(batch["image_pixel_values"], batch["image_attention_mask"], batch["image_sizes"])
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        assert e.abs().max() > 0.1  # the oracle output is not degenerate
        torch.testing.assert_close(g, e, atol=ATOL_EMBED, rtol=0)
    return got


# ---- weights ------------------------------------------------------------------------------------------------

def test_state_dict_keys_are_hf_keys_minus_unused(hf_model, ours):
    hf_keys = {k[len(PREFIX):] for k in hf_model.state_dict() if k.startswith(PREFIX)}
    unused = {k for k in hf_keys if k.startswith(_unused_keys(VISION_LAYERS))}
    assert unused and set(ours.state_dict()) == hf_keys - unused
    assert all(k in hf_keys for k in ours.state_dict())


# ---- encoder ------------------------------------------------------------------------------------------------

def test_encode_crops_matches_hf_eager_with_and_without_padding(hf_model, ours, processor):
    # 200 x 3000: 7 HD crops whose last 17 patch columns are padding (odd valid width), plus an unpadded global.
    batch = processor([_image(200, 3000, seed=3)], return_tensors="pt")
    pixels, mask = batch["image_pixel_values"][0], batch["image_attention_mask"][0].bool()
    assert mask.all(dim=(1, 2))[0] and not mask.all()
    for sel in (slice(1, 2), slice(0, 2)):  # padded alone; unpadded + padded (unpadded alone: next test)
        with torch.no_grad():
            got = ours.encode_crops(pixels[sel], mask[sel])
        torch.testing.assert_close(got, _hf_layer_minus_2(hf_model, pixels[sel], mask[sel]),
                                   atol=ATOL_ENCODER, rtol=0)


def test_hf_sdpa_runs_causal_without_padding(hf_model, ours, processor):
    """Documents the HF vision bug: HF under SDPA attends causally when no crop is padded; we stay bidirectional."""
    batch = processor([_image(448, 448, seed=4)], return_tensors="pt")
    pixels, mask = batch["image_pixel_values"][0], batch["image_attention_mask"][0].bool()
    assert mask.all()
    with torch.no_grad():
        got = ours.encode_crops(pixels, mask)
    eager = _hf_layer_minus_2(hf_model, pixels, mask)
    tower = hf_model.model.embed_tokens_extend.image_embed.img_processor
    tower.set_attn_implementation("sdpa")
    try:
        sdpa = _hf_layer_minus_2(hf_model, pixels, mask)
    finally:
        tower.set_attn_implementation("eager")
    torch.testing.assert_close(got, eager, atol=ATOL_ENCODER, rtol=0)
    assert (sdpa - eager).abs().max() > 1e-2  # the bug: causal attention


def test_position_ids_match_float_bucketize():
    """Our integer NaViT buckets equal the reference's float32 bucketize for every valid extent."""
    p = 32
    emb = ImageEmbedding(VisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                                      num_attention_heads=2), 8).img_processor.embeddings
    boundaries = torch.arange(1 / p, 1.0, 1 / p)
    for nb_h in range(1, p + 1):
        for nb_w in (1, 15, nb_h, p):
            mask = torch.zeros(1, p, p, dtype=torch.bool)
            mask[:, :nb_h, :nb_w] = True
            frac = lambda nb: (torch.arange(p, dtype=torch.float32) * (1.0 / nb)).clamp(max=1 - 1e-6)  # noqa: E731
            ref = (torch.bucketize(frac(nb_h), boundaries, right=True)[:, None] * p
                   + torch.bucketize(frac(nb_w), boundaries, right=True)[None, :])
            ref = torch.where(mask[0], ref, 0).flatten()
            assert torch.equal(emb.position_ids(mask)[0], ref), (nb_h, nb_w)


# ---- full image embedding ------------------------------------------------------------------------------------

def test_single_square_image(hf_model, ours, processor):
    (tokens,) = _compare_embedding(hf_model, ours, processor, [_image(448, 448, seed=5)])
    assert tokens.shape == (545, TEXT_HIDDEN)  # 448x448: 256 + 16 + 1 + 16*16 + 16


def test_extreme_aspect_many_partial_crops(hf_model, ours, processor):
    # 3000 x 400: 7 x 1 HD crops with the bottom 2 patch rows padded.
    (tokens,) = _compare_embedding(hf_model, ours, processor, [_image(3000, 400, seed=6)])
    assert tokens.shape == (1968, TEXT_HIDDEN)


def test_two_images_of_different_sizes_in_one_batch(hf_model, ours, processor):
    # 640 x 480 (5 crops, padded rows) and 200 x 3000 (8 crops, 17 padded columns): the first gets 3 padding crops.
    images = [_image(640, 480, seed=7), _image(200, 3000, seed=8)]
    batched = _compare_embedding(hf_model, ours, processor, images)
    assert [t.shape[0] for t in batched] == [1065, 1281]
    # Batched and single-image calls agree (padding crops are skipped, crops are independent). The first
    # image is the one that carries batch-padding crops.
    b = processor(images[:1], return_tensors="pt")
    with torch.no_grad():
        (single,) = ours(b["image_pixel_values"], b["image_attention_mask"], b["image_sizes"])
    torch.testing.assert_close(single, batched[0], atol=1e-5, rtol=0)


# ---- devices ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(ours, processor):
    """CUDA SDPA (masked and unmasked crops) equals the CPU result in fp32, and bf16 stays close."""
    batch = processor([_image(640, 480, seed=7), _image(200, 3000, seed=8)], return_tensors="pt")
    args = (batch["image_pixel_values"], batch["image_attention_mask"], batch["image_sizes"])
    gpu = copy.deepcopy(ours).cuda()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the patch conv would otherwise run in TF32
    try:
        with torch.no_grad():
            expected = ours(*args)
            got = gpu(*(a.cuda() for a in args))
            got_bf16 = gpu.to(torch.bfloat16)(*(a.cuda() for a in args))
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    for g, g16, e in zip(got, got_bf16, expected):
        torch.testing.assert_close(g.cpu(), e, atol=1e-4, rtol=0)
        assert g16.dtype == torch.bfloat16
        rel = (g16.float().cpu() - e).norm() / e.norm()
        assert rel < 3e-2, rel


# ---- bad input -----------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(ours):
    pix = torch.zeros(1, 2, 3, 448, 448)
    mask = torch.ones(1, 2, 32, 32)
    with pytest.raises(ValueError, match="attention_mask"):
        ours(pix, torch.ones(1, 2, 16, 16), torch.tensor([[448, 448]]))
    with pytest.raises(ValueError, match="multiple of 448"):
        ours(pix, mask, torch.tensor([[448, 500]]))
    with pytest.raises(ValueError, match="needs 3 crops"):
        ours(pix, mask, torch.tensor([[448, 896]]))
    with pytest.raises(ValueError, match="image_sizes must be"):
        ours(pix, mask, torch.tensor([[448, 448], [448, 448]]))
    with pytest.raises(ValueError, match="encode_crops expects pixel_values"):
        ours.encode_crops(torch.zeros(1, 3, 224, 224), torch.ones(1, 16, 16))
