"""The towers run on prepared inputs: image and audio embeddings in prompt order, alone or batched across prompts.

`prep` arguments are `inputs.prepare.Prepared` records (token ids, image and audio tower inputs, the adapter);
only their tower inputs are read here, so the network layer needs nothing from the input layer.
"""
from __future__ import annotations

from typing import Any

import torch


def encode_media(net, prep: Any, device: torch.device | str, dtype: torch.dtype
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run the towers: (image embeddings, audio embeddings), each (N, hidden) in prompt order, or None."""
    img = aud = None
    if prep.images is not None:
        i = prep.images
        feats = net.vision(i.pixel_values.to(device, dtype), i.attention_mask.to(device), i.image_sizes.to(device))
        img = torch.cat(feats)
    if prep.audios is not None:
        aud = encode_audio_batch(net, [prep], device, dtype)[0]
    return img, aud


def encode_image_batch(net, preps: list[Any], device: torch.device | str,
                       dtype: torch.dtype) -> list[torch.Tensor]:
    """The images of several image-only prompts through one SigLIP forward -> each prompt's (N_i, hidden)
    embeddings (its images in prompt order). Crops are encoded independently and batch-padding crops never are
    (model.vision.ImageEmbedding.forward), so this equals encoding each prompt alone up to float rounding."""
    ims = [p.images for p in preps]
    most = max(i.pixel_values.shape[1] for i in ims)  # crops per image, the largest of the batch

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:  # pad dim 1 (crops) of (n, crops, ...) to `most`
        return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, most - t.shape[1]), value=value)
    pixels = torch.cat([pad(i.pixel_values, 0) for i in ims])  # (sum n_i, most, 3, 448, 448)
    masks = torch.cat([pad(i.attention_mask, 1) for i in ims])  # (sum n_i, most, 32, 32); padding is all ones
    sizes = torch.cat([i.image_sizes for i in ims])  # (sum n_i, 2)
    feats = net.vision(pixels.to(device, dtype), masks.to(device), sizes.to(device))  # one per image
    res, k = [], 0
    for i in ims:
        n = i.pixel_values.shape[0]
        res.append(torch.cat(feats[k:k + n]))  # this prompt's images, in prompt order
        k += n
    return res


def encode_audio_batch(net, preps: list[Any], device: torch.device | str,
                       dtype: torch.dtype) -> list[torch.Tensor]:
    """The audio of several audio-only prompts (one projector) through one conformer forward -> each prompt's
    (N_i, hidden) embeddings. Equal to encoding each alone: padded frames are masked (tests/test_audio_encoder)."""
    feats = [p.audios.features for p in preps]  # each (n_i, T_i, 80)
    longest = max(f.shape[1] for f in feats)
    batch = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, longest - f.shape[1])) for f in feats])  # (sum n_i, T, 80)
    lengths = torch.cat([p.audios.frame_lengths for p in preps])  # (sum n_i,)
    out = net.audio(batch.to(device, dtype), lengths.to(device), projector=preps[0].audio_projector)  # one per clip
    res, i = [], 0
    for f in feats:
        res.append(torch.cat(out[i:i + f.shape[0]]))  # this prompt's clips, in prompt order
        i += f.shape[0]
    return res
