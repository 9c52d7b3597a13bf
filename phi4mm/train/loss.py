"""The language-model loss of a training step: towers, decoder and the vocabulary projection on target positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phi4mm.model import fused as fused_train
from phi4mm.model.lora import AdapterPlan
from phi4mm.train.data import IGNORE, Batch, audio_batch


class LossModule(nn.Module):
    """(batch) -> summed cross-entropy over its target tokens. One module so DDP can wrap the whole step."""

    def __init__(self, model, grad_checkpointing: bool = False):
        super().__init__()
        self.net = model.net
        self.device, self.dtype = model.device, model.dtype
        self.grad_checkpointing = grad_checkpointing
        towers = [m for m in (self.net.vision, self.net.audio) if m is not None]
        self.towers_train = any(p.requires_grad for m in towers for p in m.parameters())

    def forward(self, batch: Batch) -> torch.Tensor:
        net, dev = self.net, self.device
        # Frozen towers keep no activations for backward (LoRA stages: the decoder alone needs them).
        with torch.set_grad_enabled(self.towers_train and torch.is_grad_enabled()):
            imgs, auds = self._towers([e.prep for e in batch.examples])
        ids = batch.input_ids.to(dev)
        x = net.embed(ids, imgs, auds)  # (B, T, hidden)
        B, T = ids.shape
        positions = torch.arange(T, device=dev)[None].expand(B, T)  # (B, T): right padding, every row from 0
        long = (batch.lengths.to(dev) > net.cfg.text.original_max_position_embeddings)[:, None].expand(B, T)
        # No key mask: batches are right-padded, so under the causal mask a real token never sees a pad, and
        # the loss reads real positions only. Without a mask SDPA can take its causal (flash) kernel.
        plan = AdapterPlan.build([e.adapter for e in batch.examples], dev)
        x = net.hidden(x, positions, plan=plan, key_mask=None, long_rope=long,
                       checkpoint=self.grad_checkpointing and self.training)  # (B, T, hidden)
        # Only target positions reach the vocabulary projection: (N, vocab) instead of (B, T, vocab).
        targets = batch.labels[:, 1:].to(dev)  # (B, T-1): position t predicts token t+1
        keep = targets != IGNORE
        logits = net.head(net.norm(x[:, :-1][keep]))  # (N, vocab)
        if fused_train.enabled(logits):
            return fused_train.cross_entropy_sum(logits, targets[keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")

    def _towers(self, preps: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every image of the batch through SigLIP in one call, every audio per projector in one call;
        the embeddings come back in batch-then-prompt order, the order `embed` fills placeholders in."""
        net, dev, dt = self.net, self.device, self.dtype
        img = aud = None
        ims = [p.images for p in preps if p.images is not None]
        if ims:
            crops = max(i.pixel_values.shape[1] for i in ims)
            # On the device first: padding and concatenating ~40 images of 2 x 3 x 448 x 448 on the host
            # costs two extra copies of ~170 MB a step. Padded crops are zeros with an all-ones mask, exactly
            # how the processor batches several images of one prompt.
            pv = torch.cat([F.pad(i.pixel_values.to(dev, dt, non_blocking=True),
                                  (0, 0, 0, 0, 0, 0, 0, crops - i.pixel_values.shape[1]))
                            for i in ims])  # (N, crops, 3, 448, 448)
            am = torch.cat([F.pad(i.attention_mask.to(dev, non_blocking=True),
                                  (0, 0, 0, 0, 0, crops - i.attention_mask.shape[1]), value=1)
                            for i in ims])  # (N, crops, 32, 32)
            sizes = torch.cat([i.image_sizes for i in ims]).to(dev)  # (N, 2)
            img = torch.cat(net.vision(pv, am, sizes))
        feats: list[tuple[int, list[torch.Tensor]]] = []
        for proj in ("speech", "vision"):  # vision-speech prompts use the other audio projector
            group = [(k, p.audios) for k, p in enumerate(preps) if p.audios is not None and p.audio_projector == proj]
            if not group:
                continue
            f, lens = audio_batch([a for _, a in group], dev, dt)
            out = iter(net.audio(f, lens, projector=proj))
            for k, a in group:
                feats.append((k, [next(out) for _ in range(len(a.num_tokens))]))
        if feats:
            aud = torch.cat([t for _, ts in sorted(feats, key=lambda x: x[0]) for t in ts])
        return img, aud
