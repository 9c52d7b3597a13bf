"""The CTC pre-training stages (`speech-ctc`, `vision-ctc`): an encoder alone learns each sample's transcript
through a throw-away CTC head (the micro model's stand-in for encoders that arrive pre-trained). `vision-ctc`
also learns each image's caption labels (its answer's words and word pairs) through a throw-away label head:
the micro stand-in for SigLIP's image-text pre-training, and the only signal it has for images that are not a
line of text.

`train.train` runs them like any stage; this module holds what is particular to them: the target units, the
loss module, how SigLIP's patches become frames, and the checks and crop cache built before training.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from phi4mm.inputs.records import DataError
from phi4mm.inputs.tokenizer import ADDED_TOKENS
from phi4mm.train.data import IGNORE, Batch, Example, audio_batch

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


def caption_labels(text: str) -> list[str]:
    """An image's labels: the words of its caption and the pairs of neighbouring words within each phrase
    (phrases end at punctuation). "green triangle, blue square" -> blue, blue square, green, green triangle,
    square, triangle: the pairs bind a colour to its shape, which words alone would not."""
    out = set()
    for phrase in re.split(r"[,.;:!?]", text.lower()):
        w = phrase.split()
        out.update(w)
        out.update(f"{a} {b}" for a, b in pairwise(w))
    return sorted(out)


class LabelHead(nn.Module):
    """SigLIP's merged tokens (the ones the projector feeds the decoder) -> one logit per label (N, L).

    Each token scores every label; an image's score is the log-mean-exp over its valid tokens, a soft maximum:
    a label is there if some tokens say so. So the evidence for "green triangle" must sit in the tokens where the
    triangle is, which is where the decoder will look for it (a mean-pooled head would let it spread thin).
    Trained with a sigmoid loss per label, as SigLIP's image-text loss is.
    """

    def __init__(self, width: int, labels: list[str], device: torch.device):
        super().__init__()
        self.labels, self.index = labels, {x: i for i, x in enumerate(labels)}
        self.proj = nn.Linear(width, len(labels), device=device)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (N, T, C), mask (N, T) bool (a token with any valid patch) -> logits (N, L)."""
        s = self.proj(tokens).float().masked_fill(~mask[..., None], float("-inf"))  # (N, T, L)
        return torch.logsumexp(s, 1) - mask.sum(1, keepdim=True).clamp(min=1).log()  # (N, L)

    def targets(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """(N, L) 0/1: each text's caption labels (labels unknown to the head are ignored)."""
        y = torch.zeros(len(texts), len(self.labels), device=device)
        for i, t in enumerate(texts):
            y[i, [self.index[x] for x in caption_labels(t) if x in self.index]] = 1.0
        return y

    def loss(self, tokens: torch.Tensor, mask: torch.Tensor, texts: list[str],
             rows: torch.Tensor | None = None) -> torch.Tensor:
        """Summed over labels and images (only the images where `rows` (N,) bool is True, if given)."""
        logits = self(tokens, mask)
        bce = F.binary_cross_entropy_with_logits(logits, self.targets(texts, logits.device), reduction="none")
        return (bce.sum(1) if rows is None else bce.sum(1) * rows).sum()


def merged_tokens(vision, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP patch features (N, 1024, C) and patch mask (N, 32, 32) -> the 2x2-merged tokens (N, 256, C) and a
    mask (N, 256) of those with any valid patch."""
    merged = F.max_pool2d(mask[:, None].float(), vision.patches_per_side // vision.tokens_per_side)  # (N, 1, 16, 16)
    return vision.pool(features), merged.flatten(1).bool()  # (N, 256, C), (N, 256)


class CTCLossModule(nn.Module):
    """(batch) -> summed CTC loss of an encoder's frames against each sample's transcript in CTC units.

    The transcript is the sample's trained tokens without special tokens, decoded (ASR data: the text heard;
    OCR data: the word). Frames: the audio encoder's 80 ms frames (one audio per sample), or with a crop cache
    SigLIP's patches of one crop (one image per sample, `vision_frames`). `units` (ctc_units) splits the
    transcript into targets; a linear head maps each frame to the units plus a blank (the last class).

    With `labels` (vision only), CTC reads only the images that are lines of text, and a `LabelHead` learns the
    caption labels of the others (summed label loss). Probes (scripts/micro_vision_probe.py, one H200):
    read in raster order by CTC, scene lists mixed into OCR batches stopped OCR learning any word, and labels
    learnt scenes far better (held-out exact label sets 0.76 at 1,650 steps, against 0.14 for raster CTC at
    1,500); labels on the words themselves slowed CTC's reading (loss 3.3 against 1.3 per letter at 1,500
    steps). The heads and units are thrown away after the stage.
    """

    def __init__(self, model, units: Tokenizer, crops: CropCache | None = None, labels: list[str] | None = None):
        super().__init__()
        self.net, self.device, self.dtype = model.net, model.device, model.dtype
        self.tokenizer, self.units, self.crops = model.tokenizer, units, crops  # crops: the vision stage
        vision = crops is not None
        self.blank = units.get_vocab_size()
        self.per_frame = CTC_FRAMES_PER_VISION_FRAME if vision else 1
        width = (model.config.vision if vision else model.config.audio).hidden_size
        self.head = nn.Linear(width, self.per_frame * (self.blank + 1), device=self.device)
        self.label_head = LabelHead(width, labels, self.device) if vision and labels else None

    def text(self, e: Example) -> str:
        return transcript(self.tokenizer, e)

    def forward(self, batch: Batch) -> torch.Tensor:
        texts = [self.text(e) for e in batch.examples]
        if self.label_head is None:
            return self._ctc(*self._log_probs(batch), texts)
        # Lines of text train CTC, the other images their labels: each image's features feed one loss only, so
        # CTC runs over the lines alone (a scene would add its 1,024 raster frames to every line's padding).
        pv, mask = self.crops.batch(batch.examples, self.dtype)  # (N, 3, 448, 448), (N, 32, 32)
        f = self.net.vision.encode_crops(pv, mask)  # (N, 1024, C)
        lines = [i for i, e in enumerate(batch.examples) if self.crops.is_line(e)]  # known on the host: no sync
        others = torch.ones(len(texts), dtype=torch.bool, device=self.device)
        others[lines] = False  # (N,)
        loss = self.label_head.loss(*merged_tokens(self.net.vision, f, mask), texts, others)
        if lines:
            idx = torch.tensor(lines, device=self.device)  # (N_lines,)
            loss = loss + self._ctc(*self._vision_log_probs(f[idx], mask[idx]), [texts[i] for i in lines])
        return loss

    def _ctc(self, logp: torch.Tensor, token_lengths: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Summed CTC loss of log-probabilities (N, T', V + 1) against the texts in CTC units."""
        tgt = [self.units.encode(t).ids for t in texts]
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
        """Every sample's CTC log-probabilities (N, T', V + 1) and their lengths (N,)."""
        if self.crops is not None:
            pv, mask = self.crops.batch(batch.examples, self.dtype)  # (N, 3, 448, 448), (N, 32, 32)
            return self._vision_log_probs(self.net.vision.encode_crops(pv, mask), mask)
        f, lens = audio_batch([e.prep.audios for e in batch.examples], self.device, self.dtype)
        hidden, lengths = self.net.audio.encode(f, lens)  # (N, T', D), (N,)
        return ctc_log_probs(self.head(hidden), lengths, self.per_frame)

    def _vision_log_probs(self, f: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SigLIP features (N, 1024, C) and patch masks (N, 32, 32) -> CTC log-probabilities and lengths."""
        hidden, lengths, line = vision_frames(f, mask)
        return ctc_log_probs(self.head(hidden), lengths, self.per_frame, line)


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


def is_line(mask: torch.Tensor) -> torch.Tensor:
    """Patch masks (..., rows, cols) -> whether each image is a line of text (...,) bool: valid rows at most half
    its valid columns (a 448x112 word has 8 of 32)."""
    return mask.any(-1).sum(-1) * 2 <= mask.any(-2).sum(-1)


def vision_frames(f: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SigLIP patch features (N, side*side, C) of one crop per image and its valid-patch mask (N, side, side) ->
    CTC frames (N, T, C), their lengths (N,), and which images were read as lines (N,) bool.

    A line of text (`is_line`) is read left to right: each frame is the mean of one patch column over its valid
    rows (the head reads each as CTC_FRAMES_PER_VISION_FRAME frames: `ctc_log_probs`). Any other image is read in raster order, one frame per
    patch of its valid rows, so a transcript that names objects in the order a row-by-row scan meets them (the
    micro scenes: "red circle, blue square") can be emitted where each object first appears.
    """
    n, side = mask.shape[:2]
    f = f.view(n, side, side, -1)  # (N, 1024, C) -> (N, rows, cols, C)
    rows_valid = mask.any(2).sum(1)  # (N,)
    cols_valid = mask.any(1).sum(1)  # (N,)
    line = is_line(mask)  # (N,)
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
    of its 120 s spent waiting on one H200, where a loop over uint8 pixels already on the GPU made ~29. The
    normalised crop is exactly (canvas - 127.5) / 127.5, the processor's own arithmetic (a test checks).
    """

    def __init__(self, crops: dict[int, tuple[torch.Tensor, torch.Tensor]], lines: dict[int, bool],
                 device: torch.device):
        self.crops, self.device = crops, device  # sample's data line -> (uint8 (3, h, 448), bool mask (32, 32))
        self.lines = lines  # sample's data line -> its image is a line of text (`is_line`, decided on the host)

    def is_line(self, e: Example) -> bool:
        return self.lines[e.record.line]

    def batch(self, examples: list[Example], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples' crops, normalised, (N, 3, 448, 448) in `dtype`, and their patch masks (N, 32, 32) bool."""
        from phi4mm.inputs.image import CROP_SIZE, PAD_VALUE, PIXEL_MEAN, PIXEL_STD
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
    from phi4mm.inputs.image import crop_patch_mask, hd_canvas, load_image, plan_hd
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

    def crop(e: Example) -> tuple[torch.Tensor, torch.Tensor, bool]:
        img = load_image(e.record.images[0])
        plan = plan_hd(img.width, img.height, dynamic_hd)
        if plan.rows * plan.cols != 1:
            raise DataError(f"{data}:{e.record.line}: stage vision-ctc reads one 448-px crop, but this "
                            f"{img.width}x{img.height} image takes {plan.rows}x{plan.cols} crops; use images up to "
                            "448 px on the long side")
        canvas = hd_canvas(img, plan)  # (3, 448, 448) uint8
        mask = crop_patch_mask(plan)[0].bool()  # (32, 32)
        return canvas[:, :plan.new_h].clone().to(device), mask.to(device), bool(is_line(mask))

    # Threads: decoding and the canvas release the GIL. map keeps the order, so the first bad line is named.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        done = dict(zip((e.record.line for e in examples), pool.map(crop, examples)))
    return CropCache({k: (p, m) for k, (p, m, _) in done.items()}, {k: line for k, (_, _, line) in done.items()},
                     device)
