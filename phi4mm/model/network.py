"""The whole Phi-4-multimodal network: token embeddings merged with image/audio embeddings, the decoder, logits.

`Phi4MM.forward(embeds, positions, cache, plan) -> logits` is a pure function of its inputs; sampling,
stopping and cache ownership belong to the caller (the reference loop in `api.py`, or the engine).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from phi4mm.config import LEGACY_AUDIO_MAX, LEGACY_IMAGE_RANGE, ModelConfig
from phi4mm.model.decoder import (
    AttentionBackend,
    DecoderLayer,
    DenseAttention,
    KVCache,
    LongRope,
    RMSNorm,
    attention_mask,
)
from phi4mm.model.lora import NO_ADAPTER, AdapterPlan
from phi4mm.model.quant import QuantEmbedding


class Phi4MM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.text
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t, cfg.loras) for _ in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        # Tied embeddings (the published model): logits reuse embed_tokens.weight.
        self.lm_head = None if t.tie_word_embeddings else nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.vision = self.audio = None
        if cfg.vision is not None:
            from phi4mm.model.vision import ImageEmbedding
            self.vision = ImageEmbedding(cfg.vision, t.hidden_size)
        if cfg.audio is not None:
            from phi4mm.model.audio import AudioEmbedding
            self.audio = AudioEmbedding(cfg.audio, t.hidden_size)
        self.rope = LongRope(t)

    @property
    def adapters(self) -> list[str]:
        return sorted(self.cfg.loras)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              audio_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> (B, T, hidden), placeholder rows replaced in order by the media embeddings.

        image_embeds / audio_embeds: (N, hidden), all media of the batch concatenated in prompt order.
        """
        img_id, aud_id = self.cfg.image_token_id, self.cfg.audio_token_id
        # The original processor may emit negative placeholder ids; map them onto the real ones.
        ids = torch.where((input_ids >= LEGACY_IMAGE_RANGE[0]) & (input_ids <= LEGACY_IMAGE_RANGE[1]),
                          img_id, input_ids)
        ids = torch.where(ids <= LEGACY_AUDIO_MAX, aud_id, ids)
        x = self.embed_tokens(ids)
        for tok, feats, what in ((img_id, image_embeds, "image"), (aud_id, audio_embeds, "audio")):
            slots = ids == tok
            n_slots = int(slots.sum())
            n_feats = 0 if feats is None else feats.shape[0]
            if n_slots != n_feats:
                raise ValueError(f"the prompt has {n_slots} {what} placeholder tokens but the {what} encoder "
                                 f"produced {n_feats} embeddings; expand each placeholder with the processor")
            if n_feats:
                x = x.masked_scatter(slots[..., None], feats.to(x.dtype))
        return x

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype (activations, norms); the embedding may be stored in another (quantized)."""
        return self.norm.weight.dtype

    @property
    def output_weight(self) -> torch.Tensor:
        """The vocabulary projection (vocab, hidden): embed_tokens.weight when tied (the published model).
        A quantized head is dequantized whole here (a full bf16 copy): the model's own paths use `head`."""
        if isinstance(self.embed_tokens, QuantEmbedding) and self.lm_head is None:
            return self.embed_tokens.dense_weight()
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def head(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of final-norm states: h (..., hidden) -> (..., vocab), written into `out` when given (a buffer
        of h's dtype and the output's shape). A quantized tied head runs the decoder linears' kernels on its
        stored weight."""
        if isinstance(self.embed_tokens, QuantEmbedding) and self.lm_head is None:
            return self.embed_tokens.project(h, out)
        if out is None:
            return F.linear(h, self.output_weight)
        return torch.matmul(h, self.output_weight.t(), out=out)  # F.linear's product, into the caller's buffer

    def hidden(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
               plan: AdapterPlan = NO_ADAPTER, key_mask: torch.Tensor | None = None,
               long_rope: bool | torch.Tensor | None = None, attn: AttentionBackend | None = None,
               checkpoint: bool = False) -> torch.Tensor:
        """The decoder stack: (B, T, hidden) embeddings -> (B, T, hidden) last-layer states, before the final
        norm (callers keep only the rows they need first). Arguments as in `forward`; checkpoint recomputes
        each layer in backward instead of storing its activations (training)."""
        T = embeds.shape[1]
        past = 0 if cache is None else cache.length
        if long_rope is None:
            long_rope = self.rope.use_long(int(positions.max()) + 1)
        cos, sin = self.rope.cos_sin(positions, long_rope, embeds.dtype)
        if attn is None:
            attn = DenseAttention(attention_mask(key_mask, T, past, embeds.dtype, embeds.device), cache)
        x = embeds
        for i, layer in enumerate(self.layers):
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, plan, attn, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, plan, attn, i)
        return x

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                plan: AdapterPlan = NO_ADAPTER, key_mask: torch.Tensor | None = None,
                long_rope: bool | torch.Tensor | None = None, last_only: bool | torch.Tensor = False,
                attn: AttentionBackend | None = None) -> torch.Tensor:
        """embeds (B, T, hidden), positions (B, T) -> logits (B, T|1, vocab) in the model dtype.

        cache: keys/values of earlier tokens are read from and these tokens' written to it (slots
        [cache.length, cache.length+T)); the caller advances it. key_mask (B, S) marks real (non-padding)
        tokens over all slots. long_rope: LongRoPE factor choice; default by the sequence length (> 4096: long).
        last_only: True keeps the last position's logits; a (B,) index tensor keeps one given position per
        row (packed prefill). attn: an attention backend (the engine's paged cache); it replaces cache/key_mask.
        """
        x = self.hidden(embeds, positions, cache, plan, key_mask, long_rope, attn)
        if isinstance(last_only, torch.Tensor):
            x = x[0, last_only][:, None]  # (N, 1, hidden): the chosen rows of a packed (1, T) batch
        elif last_only:
            x = x[:, -1:]
        return self.head(self.norm(x))
