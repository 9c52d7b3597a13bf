"""The HD canvas's 448-px global view, resized by integer bicubic arithmetic (exact, and far less work than
torch's bicubic over the whole normalised float canvas): which source rows and columns it reads, and the two
resampling passes over them."""
from __future__ import annotations

import functools

import torch

# Defined here, the lower of the two image modules, and imported by image.py (which cannot be imported here).
CROP_SIZE = 448  # SigLIP input side and the global view's side, pixels
PIXEL_MEAN = 0.5 * 255.0  # mean = std = 0.5 on [0, 1]: (x - 127.5) / 127.5
PIXEL_STD = 0.5 * 255.0


def global_taps(scale: int) -> torch.Tensor | None:
    """Source rows (or columns) the 448-px bicubic global view actually reads along an axis whose HD size is
    `scale` * 448; None when it reads them all.

    With align_corners=False and an integer scale s, output i samples source position s*i + (s-1)/2:
    - s odd: the position is a pixel centre, so the cubic weights are exactly (0, 1, 0, 0) and only that
      pixel matters. Gathering it gives a 448-long axis that bicubic maps 1:1 with the same weights.
    - s even >= 4: the position is halfway between pixels (weights -3/32, 19/32, 19/32, -3/32 on 4 taps).
      Gathering those 4 taps per output gives a 1792-long axis that bicubic at scale 4 reads with the
      same taps and weights: resizing it equals resizing the whole canvas (global_view does both passes).
    - s in (1, 2): every pixel is a tap; nothing to save.
    """
    if scale <= 2:
        return None
    out = torch.arange(CROP_SIZE)
    if scale % 2:
        return out * scale + (scale - 1) // 2                                # (448,)
    first = out * scale + scale // 2 - 2                                     # (448,) leftmost tap
    return (first[:, None] + torch.arange(4)).reshape(-1)                    # (448*4,)


# Bicubic (a = -0.75, align_corners=False) at an even integer scale samples halfway between two pixels: taps
# 2i-1 .. 2i+2 (scale 2, clamped at the edges) with weights (-3, 19, 19, -3) / 32. On uint8 pixels the sums
# with the integer weights are exact (rows in int16, columns in float32 below 2**24); one division and the
# normalisation follow, instead of torch's bicubic over the whole normalised float canvas.
BICUBIC_FAR, BICUBIC_NEAR, BICUBIC_DEN = -3, 19, 32
_BAND_OUT = 16                                   # outputs per block of the column pass's banded product (16: MKL's
                                                 # fastest shape here, 0.9 ms against 1.1 for 32 and 2.4 for 64)


@functools.lru_cache(maxsize=1)
def _band() -> torch.Tensor:
    """(2B, B), B = _BAND_OUT: the integer scale-2 weights of B outputs from their block's 2B inputs (taps
    outside the block are added separately: the first output also reads the previous block's last input, the
    last output the next block's first)."""
    band = torch.zeros(2 * _BAND_OUT, _BAND_OUT)
    for j in range(_BAND_OUT):
        for k, w in enumerate((BICUBIC_FAR, BICUBIC_NEAR, BICUBIC_NEAR, BICUBIC_FAR)):
            if 0 <= 2 * j - 1 + k < 2 * _BAND_OUT:
                band[2 * j - 1 + k, j] = w
    return band


def _rows_pass(u: torch.Tensor) -> torch.Tensor:
    """(3, h, W) uint8, h = 448 | 896 | 1792 gathered -> (3, 448, W) int16 holding 32x (or 1x) the value.

    19 (t1 + t2) - 3 (t0 + t3) accumulated in place into one int16 tensor (|sum| <= 9,690): temporaries of a few
    MB each cost more in page faults than their arithmetic."""
    h = u.shape[1]
    if h == CROP_SIZE:
        return u.to(torch.int16)
    n = CROP_SIZE
    if h == 4 * CROP_SIZE:                                                   # gathered: 4 taps per output
        g = u.unflatten(1, (n, 4))                                           # (3, 448, 4, W)
        x = g[:, :, 1].to(torch.int16).add_(g[:, :, 2]).mul_(BICUBIC_NEAR)
        return x.add_(g[:, :, 0], alpha=BICUBIC_FAR).add_(g[:, :, 3], alpha=BICUBIC_FAR)
    # Scale 2: rows 2i-1 .. 2i+2 as whole-row strided slices (contiguous inner loops), clamped at both ends.
    x = u[:, 0::2].to(torch.int16).add_(u[:, 1::2]).mul_(BICUBIC_NEAR)     # taps 2i, 2i+1
    x[:, 1:].add_(u[:, 1:2 * n - 2:2], alpha=BICUBIC_FAR)                    # tap 2i-1 ...
    x[:, 0].add_(u[:, 0], alpha=BICUBIC_FAR)                                 # ... row -1 clamps to row 0
    x[:, :-1].add_(u[:, 2:2 * n:2], alpha=BICUBIC_FAR)                       # tap 2i+2 ...
    x[:, -1].add_(u[:, 2 * n - 1], alpha=BICUBIC_FAR)                        # ... row 2n clamps to row 2n-1
    return x


def _cols_pass(x: torch.Tensor, out: torch.Tensor) -> None:
    """(R, w) float, w = 448 | 896 | 1792 gathered -> out (R, 448): 32x (or 1x) the column bicubic."""
    rows, w = x.shape
    if w == CROP_SIZE:
        out.copy_(x)
    elif w == 4 * CROP_SIZE:
        g = x.view(rows, CROP_SIZE, 4)
        torch.add(g[:, :, 1], g[:, :, 2], out=out).mul_(BICUBIC_NEAR)
        out.add_(g[:, :, 0], alpha=BICUBIC_FAR).add_(g[:, :, 3], alpha=BICUBIC_FAR)
    else:
        # Scale 2: a banded product per 2B columns (strided column slices would leave torch's vectorised
        # loops), plus the two taps of each block that fall in its neighbours.
        xv = x.view(rows, -1, 2 * _BAND_OUT)                                 # (R, blocks, 2B)
        o = out.view(rows, -1, _BAND_OUT)                                    # (R, blocks, B)
        torch.matmul(xv, _band(), out=o)
        o[:, 1:, 0].add_(xv[:, :-1, -1], alpha=BICUBIC_FAR)                  # tap 2i-1 from the previous block
        o[:, 0, 0].add_(xv[:, 0, 0], alpha=BICUBIC_FAR)                      # ... clamped at the left edge
        o[:, :-1, -1].add_(xv[:, 1:, 0], alpha=BICUBIC_FAR)                  # tap 2i+2 from the next block
        o[:, -1, -1].add_(xv[:, -1, -1], alpha=BICUBIC_FAR)                  # ... clamped at the right edge


def global_view(taps: torch.Tensor, out: torch.Tensor) -> None:
    """(3, h, w) uint8 canvas taps (h, w in 448, 896 or 1792 gathered; see global_taps) -> out (3, 448, 448):
    the normalised bicubic global view, within 2.4e-7 of torch's bicubic over the normalised canvas."""
    h, w = taps.shape[-2:]
    rows = _rows_pass(taps)                                                  # (3, 448, w) int16
    _cols_pass(rows.view(-1, w).to(torch.float32), out.view(-1, CROP_SIZE))  # (3*448, w) -> (3*448, 448)
    scale = (BICUBIC_DEN if h != CROP_SIZE else 1) * (BICUBIC_DEN if w != CROP_SIZE else 1)
    out.div_(scale).sub_(PIXEL_MEAN).div_(PIXEL_STD)
