"""Parity of phi4mm.model.audio against transformers' Phi4Multimodal audio tower (tiny random config, fp32,
CPU). HF masks padded batches wrongly (+1 on valid keys instead of -inf on padded ones), so batch
items are compared with HF called on each item alone."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM  # noqa: E402

from phi4mm.config import AudioConfig  # noqa: E402
from phi4mm.model.audio import MAX_WINDOW_FRAMES, AudioEmbedding, num_audio_tokens  # noqa: E402

HF_PREFIX = "model.embed_tokens_extend.audio_embed."
N_MELS = 80
TEXT_HIDDEN = 64
REL_TOL = 1e-4  # max |ours - ref| relative to max |ref|
SHORT_FRAMES = 203  # ~2 s of 10 ms frames; odd, so the conv stages' edge frames matter (26 tokens)
LONG_FRAMES = 4200  # 42 s: 525 subsampled frames = 2 windows, the second one mostly zero tail

# nemo_conv_channels differs from hidden_size on purpose (and keeps the x8 subsampling convs cheap).
TINY_AUDIO = dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_blocks=2,
                  nemo_conv_channels=32, ext_pw_out_channel=64, depthwise_separable_out_channel=64,
                  bias_max_distance=500)


def _hf_config() -> Phi4MultimodalConfig:
    rotary_half = int(TEXT_HIDDEN // 4 * 0.75) // 2  # head_dim 16, partial rotary 0.75 -> 6 factors
    return Phi4MultimodalConfig(
        vocab_size=300, hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=131072,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                             short_factor=[1.0] * rotary_half, long_factor=[1.0] * rotary_half,
                             original_max_position_embeddings=4096, factor=32.0),
        audio_config=TINY_AUDIO,
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, crop_size=28),
    )


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, AudioEmbedding]:
    torch.manual_seed(0)
    hf = Phi4MultimodalForCausalLM(_hf_config()).eval()
    hf_audio = hf.model.embed_tokens_extend.audio_embed
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf_audio.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "bias_values" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))  # large enough to shape attention
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                scale = fan_in ** -0.5 if p.dim() > 1 else 0.1
                p.copy_(scale * torch.randn(p.shape, generator=gen))
        norm = hf_audio.encoder.encoder_embedding
        norm.global_mean.copy_(0.1 * torch.randn(N_MELS, generator=gen))
        norm.global_invstd.copy_(0.5 + torch.rand(N_MELS, generator=gen))  # positive

    ours = AudioEmbedding(AudioConfig(**TINY_AUDIO), TEXT_HIDDEN).eval()
    sd = {k[len(HF_PREFIX):]: v for k, v in hf.state_dict().items() if k.startswith(HF_PREFIX)}
    ours.load_state_dict(sd, strict=True)
    return hf_audio, ours


def _features(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(1, frames, N_MELS, generator=torch.Generator().manual_seed(seed))


_HF_ALONE: dict[tuple[int, int], torch.Tensor] = {}


@torch.no_grad()
def _hf_alone(hf_audio, frames: int, seed: int) -> torch.Tensor:
    """HF encoder on `_features(frames, seed)` alone (no mask): (T', D). Cached: the long clip is the slow part."""
    if (frames, seed) not in _HF_ALONE:
        _HF_ALONE[frames, seed] = hf_audio.encoder(_features(frames, seed), None)[0]
    return _HF_ALONE[frames, seed]


def _hf_project(hf_audio, hidden: torch.Tensor, mode: str) -> torch.Tensor:
    """HF's projector modules applied to HF encoder rows (the path of `_hf_projected` below, minus the encoder)."""
    up = hf_audio.up_proj_for_speech if mode == "speech" else hf_audio.up_proj_for_vision_speech
    down = hf_audio.down_proj_for_speech if mode == "speech" else hf_audio.down_proj_for_vision_speech
    with torch.no_grad():
        return down(torch.nn.functional.gelu(up(hidden)))


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f"max abs diff {err:.3g} vs output scale {scale:.3g}"


@torch.no_grad()
def _hf_projected(hf_audio, features: torch.Tensor, lengths: list[int], mode: str,
                  mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """HF's own path: audio rows written into a zero `inputs_embeds` at audio-token positions."""
    token_id = hf_audio.config.audio_config.audio_token_id
    counts = [num_audio_tokens(n) for n in lengths]
    input_ids = torch.full((1, sum(counts)), token_id)
    embeds = torch.zeros(1, sum(counts), TEXT_HIDDEN)
    out = hf_audio(input_ids, embeds, audio_input_features=features, audio_embed_sizes=torch.tensor(counts),
                   audio_attention_mask=mask, audio_projection_mode=mode)
    return list(out[0].split(counts))


def test_state_dict_keys_equal_checkpoint(models) -> None:
    hf_audio, ours = models
    assert list(ours.state_dict()) == list(hf_audio.state_dict())
    # Buffers derived at run time must not leak into the checkpoint name space.
    assert {n for n, _ in ours.named_buffers()} == {"encoder.encoder_embedding.global_mean",
                                                    "encoder.encoder_embedding.global_invstd"}


@pytest.mark.parametrize("frames", [SHORT_FRAMES, LONG_FRAMES])
def test_encoder_matches_hf_single(models, frames: int) -> None:
    hf_audio, ours = models
    x = _features(frames, seed=frames)
    ref = _hf_alone(hf_audio, frames, seed=frames)[None]
    with torch.no_grad():
        hidden, lengths = ours.encode(x)
    assert lengths.tolist() == [num_audio_tokens(frames)] == [ref.shape[1]]
    _assert_close(hidden, ref)
    # Same result when the full length is given explicitly (the windowed tail is still attended to).
    with torch.no_grad():
        hidden2, _ = ours.encode(x, torch.tensor([frames]))
    _assert_close(hidden2, ref)


def test_long_audio_is_windowed(models) -> None:
    """Frames of different 500-frame windows never interact: the first window equals encoding it alone."""
    _, ours = models
    x = _features(LONG_FRAMES, seed=3)
    first = MAX_WINDOW_FRAMES * 8  # feature frames of the first window
    with torch.no_grad():
        full, _ = ours.encode(x)
        head, _ = ours.encode(x[:, :first])
    _assert_close(full[:, :MAX_WINDOW_FRAMES], head)


@pytest.mark.parametrize("frames,mode", [(SHORT_FRAMES, "speech"), (SHORT_FRAMES, "vision"),
                                         (LONG_FRAMES, "speech")])
def test_projected_matches_hf(models, mode: str, frames: int) -> None:
    hf_audio, ours = models
    x = _features(frames, seed=frames)  # the long clip's HF encoder output is then already cached
    ref = _hf_projected(hf_audio, x, [frames], mode)
    with torch.no_grad():
        out = ours(x, projector=mode)
    assert len(out) == 1
    _assert_close(out[0], ref[0])


def test_projectors_differ(models) -> None:
    _, ours = models
    x = _features(SHORT_FRAMES, seed=8)
    with torch.no_grad():
        speech, vision = ours(x, projector="speech")[0], ours(x, projector="vision")[0]
    assert not torch.allclose(speech, vision)


def _padded_batch(lengths: list[int], seeds: list[int]) -> torch.Tensor:
    items = [_features(n, s)[0] for n, s in zip(lengths, seeds)]
    return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)  # (n, T_max, 80), zero-padded


# Short odd item + long windowed item (its last window's tail, and the short item's empty second window);
# then two short items (no windowing).
@pytest.mark.parametrize("lengths", [[SHORT_FRAMES, LONG_FRAMES], [1601, SHORT_FRAMES]])
def test_batch_matches_hf_alone(models, lengths: list[int]) -> None:
    hf_audio, ours = models
    batch = _padded_batch(lengths, seeds=lengths)  # seeded by length: reuses cached HF results
    with torch.no_grad():
        hidden, tok = ours.encode(batch, torch.tensor(lengths))
        projected = ours(batch, torch.tensor(lengths), projector="vision")
    assert tok.tolist() == [num_audio_tokens(n) for n in lengths]
    for i, n in enumerate(lengths):
        ref = _hf_alone(hf_audio, n, seed=n)
        n_tok = tok[i].item()
        _assert_close(hidden[i, :n_tok], ref)
        assert not hidden[i, n_tok:].any()  # padding rows are zeroed
        _assert_close(projected[i], _hf_project(hf_audio, ref, "vision"))


def test_hf_batch_masking_bug(models) -> None:
    """Documents the HF audio masking bug: HF's batched output for the shorter item differs from its unbatched output
    (padded keys are not masked), while ours equals the unbatched result."""
    hf_audio, ours = models
    lengths = [SHORT_FRAMES, 1601]
    batch = _padded_batch(lengths, seeds=lengths)
    mask = torch.arange(batch.shape[1])[None] < torch.tensor(lengths)[:, None]  # (n, T) as HF's processor
    n_tok = num_audio_tokens(SHORT_FRAMES)
    hf_alone = _hf_alone(hf_audio, SHORT_FRAMES, seed=SHORT_FRAMES)
    with torch.no_grad():
        hf_batched = hf_audio.encoder(batch, mask)[0, :n_tok]
        ours_batched = ours.encode(batch, torch.tensor(lengths))[0][0, :n_tok]
    scale = hf_alone.abs().max().item()
    assert (hf_batched - hf_alone).abs().max().item() > 1e-2 * scale
    _assert_close(ours_batched, hf_alone)


def test_equal_length_batch_without_lengths(models) -> None:
    _, ours = models
    x = torch.cat([_features(SHORT_FRAMES, 31), _features(SHORT_FRAMES, 32)])
    with torch.no_grad():
        both, _ = ours.encode(x)
        second, _ = ours.encode(x[1:])
    _assert_close(both[1:], second)


def test_conv_subsampling_in_slices_equals_one_pass(models, monkeypatch) -> None:
    """Big batches run the conv front end a few clips at a time (memory); the output is the same."""
    import phi4mm.model.audio as audio_mod
    _, ours = models
    lengths = [SHORT_FRAMES, 1601, 417]
    batch, lens = _padded_batch(lengths, seeds=lengths), torch.tensor(lengths)
    with torch.no_grad():
        whole, tok = ours.encode(batch, lens)
        monkeypatch.setattr(audio_mod, "CONV_CHUNK_VALUES", 1)  # one clip a slice
        sliced, tok2 = ours.encode(batch, lens)
    assert torch.equal(tok, tok2)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)


def test_bad_inputs(models) -> None:
    _, ours = models
    x = _features(SHORT_FRAMES, 41)
    with pytest.raises(ValueError, match="log-mel"):
        ours.encode(x[0])  # no batch dimension
    with pytest.raises(ValueError, match="log-mel"):
        ours.encode(x[..., :40])
    with pytest.raises(ValueError, match="floating point"):
        ours.encode(x.long())
    with pytest.raises(ValueError, match=r"lie in \[1,"):
        ours.encode(x, torch.tensor([SHORT_FRAMES + 1]))
    with pytest.raises(ValueError, match="shape"):
        ours.encode(x, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="projector"):
        ours(x, projector="image")
    with pytest.raises(ValueError, match="ext_pw_out_channel"):
        AudioEmbedding(AudioConfig(**{**TINY_AUDIO, "ext_pw_out_channel": 32}), TEXT_HIDDEN)


def test_bf16_runs(models) -> None:
    """bf16 weights: fp32 features are cast to bf16 (before normalisation) and the result stays close to fp32."""
    hf_audio, ours = models
    x = _features(SHORT_FRAMES // 2, 51)
    ours_bf16 = AudioEmbedding(AudioConfig(**TINY_AUDIO), TEXT_HIDDEN)
    ours_bf16.load_state_dict(ours.state_dict())
    ours_bf16 = ours_bf16.to(torch.bfloat16).eval()
    with torch.no_grad():
        hidden, _ = ours_bf16.encode(x)
        ref, _ = ours.encode(x)
    assert hidden.dtype == torch.bfloat16
    _assert_close(hidden.float(), ref, tol=0.1)
