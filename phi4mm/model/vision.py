"""Vision tower: SigLIP-so400m with NaViT position ids, HD-crop feature assembly and the image projector.

Pipeline for one image (docs/architecture.md#vision-tower-and-hd-crops):

    crops [1 + h*w, 3, 448, 448]  (global view first, then an h x w grid of HD crops, row-major)
      -> SigLIP, 26 of 27 layers (feature layer -2)        [crops, 32*32, 1152]
      -> 2x2 average pool                                  [crops, 16*16, 1152]
      -> "sub_glb" token order with learned separators     [N_img, 1152]
      -> Linear -> GELU(erf) -> Linear                     [N_img, 3072]

State-dict keys equal the transformers-native checkpoint's (prefix `model.embed_tokens_extend.image_embed.`
removed), minus the weights that never influence the output: the last SigLIP layer, `post_layernorm`
and the attention-pooling `head`. The loader drops those on purpose.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phi4mm.config import VisionConfig

# Geometry of the published model; the code derives everything from VisionConfig and checks it against these.
CROP_PX = 448  # every crop (global view and HD tiles) is 448 x 448 pixels
PATCH_PX = 14  # SigLIP patch size
PATCHES_PER_SIDE = CROP_PX // PATCH_PX  # 32 -> 1024 patches per crop
POOL = 2  # AvgPool2d(kernel 2, stride 2) on the patch grid ("avg_pool_2d" compression)
TOKENS_PER_SIDE = PATCHES_PER_SIDE // POOL  # 16 -> 256 tokens per crop
GLOBAL_TOKENS = TOKENS_PER_SIDE * (TOKENS_PER_SIDE + 1)  # 16 rows of 16 tokens + 1 separator = 272


class VisionEmbeddings(nn.Module):
    """Patch embedding plus NaViT-bucketised absolute position embedding (a partial crop spans all 32x32)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patches_per_side = cfg.patches_per_side
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(self.patches_per_side ** 2, cfg.hidden_size)

    def position_ids(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """NaViT position ids for (N, P, P) boolean masks whose valid patches form a top-left rectangle.

        A crop with nb_h x nb_w valid patches gets its rows and columns stretched over the full P x P table:
        row i maps to bucket floor(i * P / nb_h). HF and idefics2 compute this as
        `bucketize(i * (1/nb_h), arange(1/P, 1, 1/P), right=True)` in float32, which equals the exact integer
        form used here for every nb in 1..32 (checked). HF casts the fractions to the pixel dtype first,
        which in bf16 shifts one bucket for nb_h in {17, 19, 21, 27, 29, 31}; the integer form avoids that.
        Invalid patches get position 0, as in the reference.
        """
        n, p, _ = patch_mask.shape
        nb_h = patch_mask[:, :, 0].sum(dim=1).clamp(min=1)  # (N,) valid rows, read from the first column
        nb_w = patch_mask[:, 0, :].sum(dim=1).clamp(min=1)  # (N,) valid columns, read from the first row
        idx = torch.arange(p, device=patch_mask.device)
        bucket_h = idx[None, :] * p // nb_h[:, None]  # (N, P)
        bucket_w = idx[None, :] * p // nb_w[:, None]  # (N, P)
        pos = bucket_h[:, :, None] * p + bucket_w[:, None, :]  # (N, P, P)
        return torch.where(patch_mask, pos, 0).view(n, p * p)  # (N, P*P)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 3, 448, 448), patch_mask (N, 32, 32) bool -> (N, 1024, C)."""
        x = self.patch_embedding(pixel_values)  # (N, C, 32, 32)
        x = x.flatten(2).transpose(1, 2)  # (N, 1024, C), patches row-major
        return x + self.position_embedding(self.position_ids(patch_mask))


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased projections.

    HF 5.17 marks this layer `is_causal=True`, so its SDPA/flash paths run *causal* attention whenever no crop
    in the batch is padded (docs/architecture.md#reference-quirks). SigLIP is bidirectional; we never pass is_causal.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"vision hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                             f"{cfg.num_attention_heads}; fix vision_config in config.json")
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads  # 1152 / 16 = 72
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x (N, L, C); key_mask (N, 1, 1, L) bool, True = attend, or None when every patch is valid."""
        n, seq, c = x.shape
        q = self.q_proj(x).view(n, seq, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, L, D)
        k = self.k_proj(x).view(n, seq, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, L, D)
        v = self.v_proj(x).view(n, seq, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, L, D)
        # Padded patches still act as queries (their outputs can leak through 2x2 pooling when the valid
        # extent is odd, exactly as in the eager reference); they are only removed as keys.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (N, H, L, D), scale D^-0.5
        return self.out_proj(out.transpose(1, 2).reshape(n, seq, c))  # (N, L, H*D)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's gelu_pytorch_tanh


class VisionEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(LN1(x)), then + mlp(LN2(.))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """The first `num_layers` SigLIP layers; this module exists so the keys read `encoder.layers.{j}`."""

    def __init__(self, cfg: VisionConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


class SiglipNaViT(nn.Module):
    """SigLIP truncated at the feature layer: no post-LayerNorm and no pooling head (both unused)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg, cfg.num_layers_run)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 3, 448, 448), patch_mask (N, 32, 32) bool -> features (N, 1024, C)."""
        n = patch_mask.shape[0]
        x = self.embeddings(pixel_values, patch_mask)
        # No mask when nothing is padded lets SDPA pick its fastest kernel; the host sync is one per batch.
        key_mask = None if bool(patch_mask.all()) else patch_mask.view(n, 1, 1, -1)  # (N, 1, 1, L)
        return self.encoder(x, key_mask)


class ImageEmbedding(nn.Module):
    """Encode preprocessed HD crops and project them to decoder-width image tokens (docs/architecture.md)."""

    def __init__(self, cfg: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        if cfg.image_size != cfg.crop_size or cfg.image_size % cfg.patch_size:
            raise ValueError(f"vision image_size {cfg.image_size} must equal crop_size {cfg.crop_size} and be a "
                             f"multiple of patch_size {cfg.patch_size} (published: {CROP_PX}/{PATCH_PX})")
        if cfg.patches_per_side % POOL:
            raise ValueError(f"{cfg.patches_per_side} patches per side is odd; the published model has "
                             f"{PATCHES_PER_SIDE} and phi4mm does not implement the reflection pad odd grids need")
        if cfg.num_layers_run < 1:
            raise ValueError(f"feature_layer {cfg.feature_layer} with {cfg.num_hidden_layers} layers runs "
                             f"{cfg.num_layers_run} layers; the published values are -2 and 27")
        self.cfg = cfg
        self.crop_px = cfg.crop_size
        self.patches_per_side = cfg.patches_per_side
        self.tokens_per_side = self.patches_per_side // POOL
        c = cfg.hidden_size
        self.img_processor = SiglipNaViT(cfg)
        # The learned separators: `glb_GN` sits between the sub-crop tokens and the global view, `sub_GN`
        # ends every row of both grids so the decoder can tell where a 2-D row wraps.
        self.global_img_feature_extensor = nn.Parameter(torch.zeros(1, 1, c))
        self.sub_img_feature_extensor = nn.Parameter(torch.zeros(1, 1, 1, c))
        self.img_projection_up = nn.Linear(c, text_hidden_size)
        self.img_projection_down = nn.Linear(text_hidden_size, text_hidden_size)

    # ---- encoder ----------------------------------------------------------------------------------------

    def encode_crops(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """Layer -2 SigLIP features of independent crops.

        pixel_values (N, 3, 448, 448), patch_mask (N, 32, 32) (bool or 0/1) -> (N, 1024, C) in the tower dtype.
        """
        p = self.patches_per_side
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (self.cfg.num_channels, self.crop_px, self.crop_px):
            raise ValueError(f"encode_crops expects pixel_values (N, {self.cfg.num_channels}, {self.crop_px}, "
                             f"{self.crop_px}); got {tuple(pixel_values.shape)}")
        if patch_mask.shape != (pixel_values.shape[0], p, p):
            raise ValueError(f"encode_crops expects patch_mask ({pixel_values.shape[0]}, {p}, {p}) to match "
                             f"the crops; got {tuple(patch_mask.shape)}")
        dtype = self.img_processor.embeddings.patch_embedding.weight.dtype
        return self.img_processor(pixel_values.to(dtype), patch_mask.bool())

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """2x2 average pooling of the patch grid: (N, 1024, C) -> (N, 256, C)."""
        n, _, c = features.shape
        p, t = self.patches_per_side, self.tokens_per_side
        grid = features.view(n, p, p, c).permute(0, 3, 1, 2)  # (N, C, 32, 32)
        pooled = F.avg_pool2d(grid, kernel_size=POOL, stride=POOL)  # (N, C, 16, 16)
        return pooled.permute(0, 2, 3, 1).reshape(n, t * t, c)  # (N, 256, C), tokens row-major

    # ---- assembly ---------------------------------------------------------------------------------------

    def _image_token_index(self, offset: int, grid_h: int, grid_w: int, useful_h: int, useful_w: int,
                           sub_row: int, glb_row: int) -> torch.Tensor:
        """Row indices into the token table for one image, in "sub_glb" order.

        The table holds every pooled token of the batch ((crop * 256 + y * 16 + x) for crop-local y, x),
        then the `sub_GN` row and the `glb_GN` row. The image's global crop is `offset`, its HD crops follow.
        Sub part: the h x w crops tiled into a (16h, 16w) grid, cut to (useful_h, useful_w), sub_GN after each
        row. Then glb_GN, then the 16 x 16 global grid with sub_GN after each row.
        """
        t = self.tokens_per_side
        y = torch.arange(useful_h)[:, None]  # (uh, 1) row in the tiled grid
        x = torch.arange(useful_w)[None, :]  # (1, uw) column in the tiled grid
        crop = offset + 1 + (y // t) * grid_w + x // t  # (uh, uw) which HD crop holds the token
        sub = crop * t * t + (y % t) * t + x % t  # (uh, uw)
        sub = torch.cat([sub, torch.full((useful_h, 1), sub_row)], dim=1)  # (uh, uw + 1)
        glb = offset * t * t + torch.arange(t * t).view(t, t)  # (16, 16)
        glb = torch.cat([glb, torch.full((t, 1), sub_row)], dim=1)  # (16, 17)
        return torch.cat([sub.flatten(), torch.tensor([glb_row]), glb.flatten()])  # (N_img,)

    def forward(self, pixel_values: torch.Tensor, attention_mask: torch.Tensor,
                image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Image tokens for a batch of preprocessed images.

        pixel_values   (n, max_crops, 3, 448, 448): per image [global, h*w HD crops, zero batch padding]
        attention_mask (n, max_crops, 32, 32): patch validity per crop (0/1 or bool)
        image_sizes    (n, 2): padded HD (height, width) in pixels, multiples of 448
        Returns one (N_img_i, text_hidden) tensor per image, in the projector dtype;
        N_img = 256 + 16 + 1 + ceil(Vw/2) * ceil(Vh/2) + ceil(Vh/2) (Vw, Vh: valid patch columns, rows).
        """
        p, t = self.patches_per_side, self.tokens_per_side
        if pixel_values.dim() != 5 or attention_mask.shape != (*pixel_values.shape[:2], p, p):
            raise ValueError(f"expected pixel_values (n, max_crops, 3, {self.crop_px}, {self.crop_px}) and "
                             f"attention_mask (n, max_crops, {p}, {p}); got {tuple(pixel_values.shape)} and "
                             f"{tuple(attention_mask.shape)}")
        n, max_crops = pixel_values.shape[:2]
        if image_sizes.numel() != 2 * n:
            raise ValueError(f"image_sizes must be ({n}, 2) (padded HD height, width); got "
                             f"{tuple(image_sizes.shape)}")
        # Output lengths depend on the sizes, so they are needed on the host: one small transfer per batch.
        sizes = image_sizes.reshape(n, 2).tolist()
        grids: list[tuple[int, int]] = []
        for i, (h_px, w_px) in enumerate(sizes):
            if h_px <= 0 or w_px <= 0 or h_px % self.crop_px or w_px % self.crop_px:
                raise ValueError(f"image_sizes[{i}] = {(h_px, w_px)} is not a positive multiple of "
                                 f"{self.crop_px}; pass the padded HD size the preprocessor returns")
            grid = (int(h_px) // self.crop_px, int(w_px) // self.crop_px)
            if 1 + grid[0] * grid[1] > max_crops:
                raise ValueError(f"image {i} of HD size {(h_px, w_px)} needs {1 + grid[0] * grid[1]} crops but "
                                 f"pixel_values holds {max_crops} per image")
            grids.append(grid)

        # Gather only the real crops of every image: batch-padding crops are never encoded.
        counts = [1 + gh * gw for gh, gw in grids]
        crop_index = torch.cat([torch.arange(c) + i * max_crops for i, c in enumerate(counts)])
        crop_index = crop_index.to(pixel_values.device)
        crops = pixel_values.flatten(0, 1).index_select(0, crop_index)  # (N_real, 3, 448, 448)
        masks = attention_mask.flatten(0, 1).index_select(0, crop_index.to(attention_mask.device)).bool()
        masks = masks.to(pixel_values.device)  # (N_real, 32, 32)

        # Valid token rows / columns of each HD crop after the 2x2 pool. The reference reads them from the
        # stride-2 subsampled mask (not a ceil of the pooled mask); for top-left rectangles these agree.
        ds = masks[:, 0::POOL, 0::POOL]  # (N_real, 16, 16)
        valid_rows, valid_cols = torch.stack([ds[:, :, 0].sum(-1), ds[:, 0, :].sum(-1)]).tolist()

        pooled = self.pool(self.encode_crops(crops, masks))  # (N_real, 256, C)
        n_real, _, c = pooled.shape
        proj_dtype = self.img_projection_up.weight.dtype
        table = torch.cat([pooled.reshape(n_real * t * t, c),  # (N_real*256, C)
                           self.sub_img_feature_extensor.reshape(1, c).to(pooled.dtype),
                           self.global_img_feature_extensor.reshape(1, c).to(pooled.dtype)]).to(proj_dtype)
        sub_row, glb_row = n_real * t * t, n_real * t * t + 1

        index, lengths, offset = [], [], 0
        for (gh, gw), count in zip(grids, counts):
            hd = range(offset + 1, offset + count)  # this image's HD crops, row-major
            useful_h = sum(valid_rows[k] for k in hd[::gw])  # down the first crop column
            useful_w = sum(valid_cols[k] for k in hd[:gw])  # along the first crop row
            idx = self._image_token_index(offset, gh, gw, useful_h, useful_w, sub_row, glb_row)
            index.append(idx)
            lengths.append(idx.numel())
            offset += count
        tokens = table.index_select(0, torch.cat(index).to(table.device))  # (sum N_img, C)

        # The projector is per token, so all images share one call.
        out = self.img_projection_down(F.gelu(self.img_projection_up(tokens)))  # exact (erf) GELU
        return list(out.split(lengths))
