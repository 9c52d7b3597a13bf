"""The CTC pre-training stages (`speech-ctc`, `vision-ctc`): an encoder alone learns each sample's transcript
through a throw-away CTC head (the micro model's stand-in for encoders that arrive pre-trained).

`train.train` runs them like any stage; this module holds what is particular to them: the target units, the
loss module, how SigLIP's patches become frames, and the checks and crop cache built before training.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from .tokenizer import ADDED_TOKENS
from .train_data import IGNORE, Batch, DataError, Example, audio_batch

# vision-ctc: the head reads each patch column (or patch) as this many frames, each with its own outputs. At
# 22-30 pt two letters often share a 14-px column; one frame per column (or a repeated copy, whose outputs are
# the same) cannot emit both.
CTC_FRAMES_PER_VISION_FRAME = 2

CTC_UNITS = 96  # CTC target vocabulary: letters plus the commonest pieces, ~2-3 characters a unit


def ctc_units(texts: list[str], vocab_size: int = CTC_UNITS) -> Tokenizer:
    """A small BPE over characters (a word-start mark on each word) trained on the stage's transcripts.

    CTC targets must be units that words share: with the decoder's tokens (whole words in the micro BPE) the
    encoder has to learn each word's sound as a separate class, and a probe on the micro data stayed at WER
    0.89 after 385 steps where these units reached 0.25 (scripts/micro_ctc_probe.py). Characters alone would
    not fit: speech runs ~15 characters a second against 12.5 frames; these units need ~0.55 per frame."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    return tok


def transcript(tokenizer, e: Example) -> str:
    """The sample's trained tokens without special tokens, as text (for ASR data: what is said)."""
    special = {tokenizer.token_id(c) for _, c, _, _ in ADDED_TOKENS if tokenizer.has_token(c)}
    return tokenizer.decode([t for t in e.labels if t != IGNORE and t not in special]).strip()


class CTCLossModule(nn.Module):
    """(batch) -> summed CTC loss of an encoder's frames against each sample's transcript in CTC units.

    The transcript is the sample's trained tokens without special tokens, decoded (ASR data: the text heard;
    OCR data: the word). Frames: the audio encoder's 80 ms frames (one audio per sample), or with vision=True
    SigLIP's patches of one crop (one image per sample, `vision_frames`). `units` (ctc_units) splits the
    transcript into targets; a linear head maps each frame to the units plus a blank (the last class). The
    head and units are thrown away after the stage.
    """

    def __init__(self, model, units: Tokenizer, crops: CropCache | None = None):
        super().__init__()
        self.net, self.device, self.dtype = model.net, model.device, model.dtype
        self.tokenizer, self.units, self.crops = model.tokenizer, units, crops  # crops: the vision stage
        vision = crops is not None
        self.blank = units.get_vocab_size()
        self.per_frame = CTC_FRAMES_PER_VISION_FRAME if vision else 1
        width = (model.config.vision if vision else model.config.audio).hidden_size
        self.head = nn.Linear(width, self.per_frame * (self.blank + 1), device=self.device)

    def text(self, e: Example) -> str:
        return transcript(self.tokenizer, e)

    def targets(self, e: Example) -> list[int]:
        return self.units.encode(self.text(e)).ids

    def forward(self, batch: Batch) -> torch.Tensor:
        logp, token_lengths = self._log_probs(batch)
        tgt = [self.targets(e) for e in batch.examples]
        dev = self.device
        flat = torch.tensor([t for ts in tgt for t in ts], dtype=torch.long, device=dev)  # (sum L,)
        tlens = torch.tensor([len(ts) for ts in tgt], dtype=torch.long, device=dev)  # (N,)
        # zero_infinity: a sample whose transcript outruns its frames adds nothing rather than inf.
        return F.ctc_loss(logp.transpose(0, 1), flat, token_lengths, tlens, blank=self.blank,  # (T', N, V + 1)
                          reduction="sum", zero_infinity=True)

    @torch.no_grad()
    def greedy(self, batch: Batch) -> list[list[int]]:
        """Best-path decoding (argmax per frame, repeats merged, blanks dropped): what the head hears."""
        logp, token_lengths = self._log_probs(batch)
        out = []
        for row, n in zip(logp.argmax(-1).tolist(), token_lengths.tolist()):
            row = row[:n]
            out.append([t for j, t in enumerate(row) if t != self.blank and (j == 0 or t != row[j - 1])])
        return out

    def _log_probs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.crops is not None:
            hidden, lengths, line = self._vision_frames(batch)
            return ctc_log_probs(self.head(hidden), lengths, self.per_frame, line)
        f, lens = audio_batch([e.prep.audios for e in batch.examples], self.device, self.dtype)
        hidden, lengths = self.net.audio.encode(f, lens)  # (N, T', D), (N,)
        return ctc_log_probs(self.head(hidden), lengths, self.per_frame)

    def _vision_frames(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each image's one 448-px crop (from the crop cache) through SigLIP, as CTC frames (`vision_frames`)."""
        pv, mask = self.crops.batch(batch.examples, self.dtype)  # (N, 3, 448, 448), (N, 32, 32)
        return vision_frames(self.net.vision.encode_crops(pv, mask), mask)


def ctc_log_probs(logits: torch.Tensor, lengths: torch.Tensor, per_frame: int,
                  split: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A CTC head's output (N, T, per_frame * (V + 1)) -> log-probabilities (N, T * per_frame, V + 1) and the
    lengths to match: per_frame frames for each input frame, or with `split` (N,) bool only for the rows where
    it is True, the other rows reading each frame's first output once (padding after).

    Lines of text take two outputs per patch column (two narrow letters can share one); raster-read images
    take one per patch: a probe with two learnt scene lists far worse (0.02 exact against 0.155 at ~2,500 steps).
    """
    n, t = logits.shape[:2]
    many = logits.reshape(n, t * per_frame, -1)  # (N, T, r*(V+1)) -> (N, T*r, V+1): frame j's r outputs in order
    if split is None or per_frame == 1:
        return F.log_softmax(many.float(), dim=-1), lengths * per_frame
    one = F.pad(logits[..., :many.shape[-1]], (0, 0, 0, t * (per_frame - 1)))  # (N, T, V+1) -> (N, T*r, V+1)
    out = torch.where(split[:, None, None], many, one)  # (N, T*r, V+1)
    return F.log_softmax(out.float(), dim=-1), torch.where(split, lengths * per_frame, lengths)


def vision_frames(f: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SigLIP patch features (N, side*side, C) of one crop per image and its valid-patch mask (N, side, side) ->
    CTC frames (N, T, C), their lengths (N,), and which images were read as lines (N,) bool.

    A line of text (valid rows at most half its valid columns: a 448x112 word has 8 of 32) is read left to
    right: each frame is the mean of one patch column over its valid rows (the head reads each as
    CTC_FRAMES_PER_VISION_FRAME frames: `ctc_log_probs`). Any other image is read in raster order, one frame per
    patch of its valid rows, so a transcript that names objects in the order a row-by-row scan meets them (the
    micro scenes: "red circle, blue square") can be emitted where each object first appears.
    """
    n, side = mask.shape[:2]
    f = f.view(n, side, side, -1)  # (N, 1024, C) -> (N, rows, cols, C)
    rows_valid = mask.any(2).sum(1)  # (N,)
    cols_valid = mask.any(1).sum(1)  # (N,)
    line = rows_valid * 2 <= cols_valid  # (N,)
    rows = mask.sum(1, keepdim=True).clamp(min=1)[..., None]  # (N, 1, cols, 1): valid rows per column
    cols = (f * mask[..., None]).sum(1, keepdim=True).div(rows).squeeze(1)  # (N, cols, C)
    raster = f.flatten(1, 2)  # (N, rows*cols, C): row-major, each valid row whole (padding is right and below)
    cols = F.pad(cols, (0, 0, 0, raster.shape[1] - cols.shape[1]))  # (N, cols, C) -> (N, rows*cols, C)
    frames = torch.where(line[:, None, None], cols, raster)  # (N, T, C)
    lengths = torch.where(line, cols_valid, rows_valid * side)  # (N,)
    return frames[:, :int(lengths.max())], lengths, line  # a batch of lines only needs its 32 frames, not 1024


class CropCache:
    """vision-ctc's pixels: each sample's one 448-px crop as uint8, decoded once before training and kept on the
    training device (the rows that hold image content only; padding is white, as the processor pads).

    The image stages rebuild each sample's global view and crops every step in forked workers (~15 ms an
    image on one core) and ship them as 2.4 MB of bf16. That bound the recipe's vision-ctc to ~7 steps/s, 90
    of its 120 s spent waiting (session 9), where a loop over uint8 pixels already on the GPU made ~29. The
    normalised crop is exactly (canvas - 127.5) / 127.5, the processor's own arithmetic (a test checks).
    """

    def __init__(self, crops: dict[int, tuple[torch.Tensor, torch.Tensor]], device: torch.device):
        self.crops, self.device = crops, device  # sample's data line -> (uint8 (3, h, 448), bool mask (32, 32))

    def batch(self, examples: list[Example], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples' crops, normalised, (N, 3, 448, 448) in `dtype`, and their patch masks (N, 32, 32) bool."""
        from .image_processing import CROP_SIZE, PAD_VALUE, PIXEL_MEAN, PIXEL_STD
        n = len(examples)
        x = torch.full((n, 3, CROP_SIZE, CROP_SIZE), PAD_VALUE, dtype=torch.uint8, device=self.device)
        crops = [self.crops[e.record.line] for e in examples]
        for i, (p, _) in enumerate(crops):
            x[i, :, :p.shape[1]] = p  # (3, h, 448): the rows with content
        mask = torch.stack([m for _, m in crops])  # (N, 32, 32)
        return x.to(torch.float32).sub_(PIXEL_MEAN).div_(PIXEL_STD).to(dtype), mask


def check_ctc(examples: list[Example], data: Path, stage: str, dynamic_hd: int, device: torch.device,
              workers: int = 8) -> CropCache | None:
    """speech-ctc needs exactly one audio and no image per sample; vision-ctc exactly one image, no audio, that
    fits one 448-px crop (`vision_frames` says how it is read). For vision-ctc, returns the crop cache (each
    image is decoded once here anyway, to check its size)."""
    from .image_processing import _patch_mask, hd_canvas, load_image, plan_hd
    if stage == "speech-ctc":
        for e in examples:
            n = len(e.record.audios)
            if n != 1 or e.has_image:
                raise DataError(f"{data}:{e.record.line}: stage speech-ctc takes samples with exactly one audio and "
                                f"no image (this one has {n} audio(s)); give it speech recognition data")
        return None
    for e in examples:
        n = len(e.record.images)
        if n != 1 or e.has_audio:
            raise DataError(f"{data}:{e.record.line}: stage vision-ctc takes samples with exactly one image and no "
                            f"audio (this one has {n} image(s)); give it text-reading (OCR) or scene-listing data")

    def crop(e: Example) -> tuple[torch.Tensor, torch.Tensor]:
        img = load_image(e.record.images[0])
        plan = plan_hd(img.width, img.height, dynamic_hd)
        if plan.rows * plan.cols != 1:
            raise DataError(f"{data}:{e.record.line}: stage vision-ctc reads one 448-px crop, but this "
                            f"{img.width}x{img.height} image takes {plan.rows}x{plan.cols} crops; use images up to "
                            "448 px on the long side")
        canvas = hd_canvas(img, plan)  # (3, 448, 448) uint8
        return canvas[:, :plan.new_h].clone().to(device), _patch_mask(plan)[0].bool().to(device)

    # Threads: decoding and the canvas release the GIL. map keeps the order, so the first bad line is named.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return CropCache(dict(zip((e.record.line for e in examples), pool.map(crop, examples))), device)
