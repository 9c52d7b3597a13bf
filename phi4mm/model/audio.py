"""Speech tower of Phi-4-multimodal: a Conformer encoder and two audio projectors (docs/architecture.md).

    log-mel features (n, T, 80), 100 frames/s
      -> global mean/invstd normalisation (checkpoint buffers)
      -> depthwise-striding conv subsampling x8            (n, T', D), T' = ceil(T/8), 80 ms per frame
      -> 24 Conformer blocks with a T5 relative position bias, in independent windows of 500 frames (40 s)
      -> up_proj -> GELU -> down_proj                      one (N_a, text_hidden) matrix per audio

Module and parameter names follow the transformers-native checkpoint (prefix
`model.embed_tokens_extend.audio_embed.` removed) so that a name table can load it 1:1.

Padding semantics (a deliberate definition; docs/architecture.md#reference-quirks, items 2 and 9):
every item of a padded batch is encoded *exactly as if it were encoded alone* (the original's single-audio
call, which is also what vLLM and HF do for one audio):
  - padded feature frames and padded frames between the conv stages are zeroed, which is what the convs'
    own zero padding sees for an audio encoded alone (the original leaks one padded, normalised frame into the
    last valid frame of odd-length items);
  - attention masks padded keys with -inf (HF adds +1 to valid keys instead, i.e. does not mask at all);
  - an item longer than 500 subsampled frames attends to the zero tail of its own last window, as a single
    audio does in every implementation. The original masks that tail when a prompt holds several audios;
    we do not, so that batching never changes an item's embedding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi4mm.config import AudioConfig

MAX_WINDOW_FRAMES = 500  # subsampled frames per independent attention window: 500 x 80 ms = 40 s
FF_RESIDUAL_SCALE = 0.5  # Macaron-style half-step feed-forward modules
SUBSAMPLING_KERNEL = 3  # every conv of the subsampling stack: kernel 3, stride 2, padding 1
SUBSAMPLING_STRIDE = 2

CONV_CHUNK_VALUES = 1 << 30  # first-stage conv outputs per slice of clips (2 GB in bf16; 16 clips of 30 s)
PROJECTORS = ("speech", "vision")  # "vision" = the projector for prompts that also hold images


def _activation(name: str) -> nn.Module:
    # The checkpoint's config names: "swish" for the Conformer, "relu" for the subsampling stack.
    table = {"swish": nn.SiLU, "silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}
    if name not in table:
        raise ValueError(f"audio activation {name!r} is not supported; expected one of {sorted(table)}")
    return table[name]()


def _halve_ceil(n: Tensor | int) -> Tensor | int:
    """Output length of a kernel-3, stride-2, padding-1 convolution: ceil(n / 2)."""
    return (n + 1) // SUBSAMPLING_STRIDE


def num_audio_tokens(num_frames: int, time_reduction: int = 8) -> int:
    """Audio tokens for `num_frames` feature frames: ceil-halving log2(time_reduction) times = ceil(T / 8)."""
    for _ in range(int(math.log2(time_reduction))):
        num_frames = _halve_ceil(num_frames)
    return num_frames


def _frames_before(lengths: Tensor, total: int) -> Tensor:
    """(n,) lengths -> (n, total) bool, True for the frames t < length."""
    return torch.arange(total, device=lengths.device) < lengths[:, None]


class MeanVarianceNorm(nn.Module):
    """`(x - global_mean) * global_invstd`, with per-mel-bin statistics stored in the checkpoint."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.register_buffer("global_mean", torch.zeros(input_size))  # persistent: loaded from the checkpoint
        self.register_buffer("global_invstd", torch.ones(input_size))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.global_mean) * self.global_invstd


class ConvSubsampling(nn.Module):
    """NeMo `dw_striding` subsampling: a full 3x3 conv, then (depthwise 3x3 + pointwise 1x1) stages, each
    halving time and frequency, then a Linear over (channels x remaining frequency bins)."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        n_stages = int(math.log2(cfg.time_reduction))
        if cfg.time_reduction < 2 or 2 ** n_stages != cfg.time_reduction:
            raise ValueError(f"audio time_reduction must be a power of two >= 2, got {cfg.time_reduction}")
        ch = cfg.nemo_conv_channels
        conv = dict(kernel_size=SUBSAMPLING_KERNEL, stride=SUBSAMPLING_STRIDE, padding=1)
        # One flat Sequential so that the indices (0, 2, 3, 5, 6; activations at 1, 4, 7) match the checkpoint.
        layers: list[nn.Module] = [nn.Conv2d(1, ch, **conv), _activation(cfg.nemo_activation)]
        for _ in range(n_stages - 1):
            layers += [nn.Conv2d(ch, ch, groups=ch, **conv), nn.Conv2d(ch, ch, kernel_size=1),
                       _activation(cfg.nemo_activation)]
        self.conv = nn.Sequential(*layers)
        self._stage_ends = frozenset(len(layers) - 1 - 3 * i for i in range(n_stages))  # the activations
        freq = cfg.input_size
        for _ in range(n_stages):
            freq = _halve_ceil(freq)  # 80 -> 40 -> 20 -> 10
        self.out = nn.Linear(ch * freq, cfg.hidden_size)

    def forward(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x (n, T, F) normalised features -> (n, T', D) and the (n,) subsampled lengths (None if `lengths`
        is None). With lengths, frames past each stage's valid length are zeroed, so the next conv sees the
        zeros it would see at the edge of an audio encoded alone."""
        x = x.unsqueeze(1)  # (n, 1, T, F): a one-channel image, time x mel
        # The first stage's output is n x channels x T/2 x F/2 (64 clips of 30 s: 3.9 G values, 7.9 GB in bf16,
        # and each later op makes another): clips are independent here, so big batches go through in slices.
        per_clip = self.conv[0].out_channels * _halve_ceil(x.shape[2]) * _halve_ceil(x.shape[3])
        step = max(1, CONV_CHUNK_VALUES // per_clip)
        if x.shape[0] > step:
            parts = [self._convs(x[i:i + step], None if lengths is None else lengths[i:i + step])
                     for i in range(0, x.shape[0], step)]
            x = torch.cat([p for p, _ in parts])
            lengths = None if lengths is None else torch.cat([l for _, l in parts])
        else:
            x, lengths = self._convs(x, lengths)
        n, ch, t, freq = x.shape
        x = x.transpose(1, 2).reshape(n, t, ch * freq)  # (n, C, T', F') -> (n, T', C, F') -> (n, T', C*F')
        return self.out(x), lengths

    def _convs(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(n, 1, T, F) -> (n, C, T', F') and the subsampled lengths."""
        for i, layer in enumerate(self.conv):
            x = layer(x)
            if i in self._stage_ends and lengths is not None:
                lengths = _halve_ceil(lengths)
                x = x.masked_fill(~_frames_before(lengths, x.shape[2])[:, None, :, None], 0.0)
        return x, lengths


class RelativeAttentionBias(nn.Module):
    """T5-style bias without log buckets: one learned value per head and clipped distance `key - query`."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.max_distance = cfg.bias_max_distance
        self.symmetric = cfg.bias_symmetric
        # Asymmetric: distances [-max, max-1] -> 2*max buckets; symmetric: |distance| -> max buckets.
        n_buckets = self.max_distance if self.symmetric else 2 * self.max_distance
        self.bias_values = nn.Embedding(n_buckets, cfg.num_attention_heads)

    def forward(self, length: int) -> Tensor:
        """-> (1, H, length, length) bias, added to the attention logits of every block."""
        pos = torch.arange(length, device=self.bias_values.weight.device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance - 1)  # (L, L)
        idx = rel.abs().clamp(max=self.max_distance - 1) if self.symmetric else rel + self.max_distance
        return self.bias_values(idx).permute(2, 0, 1).unsqueeze(0)  # (L, L, H) -> (H, L, L) -> (1, H, L, L)


class FeedForward(nn.Module):
    """Pre-LN GLU feed-forward. Note the order `value * swish(gate)`, with the value in the FIRST half (the
    reverse of the text decoder's MLP)."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _activation(cfg.activation)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.gate_up_proj(self.layer_norm(x)).chunk(2, dim=-1)
        return self.down_proj(value * self.act(gate))


class SelfAttention(nn.Module):
    """Multi-head self-attention; the float mask carries the relative bias and -inf for padded keys."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """x (B, L, D); attn_mask (B or 1, H, L, L) additive, in x's dtype."""
        b, l, d = x.shape
        q = self.q_proj(x).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        v = self.v_proj(x).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        # SDPA computes softmax(q k^T / sqrt(hd) + mask) v: the original's scores, softmax and -inf masking
        # (a -inf logit gets probability exactly 0), with the fused kernels where the device has them.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, l, d))  # (B, L, H, hd) -> (B, L, D)


class GluPointwiseConv(nn.Module):
    """1x1 conv to 2C channels, then `(value + b1) * swish(gate + b2)`; channels-first (B, C, L)."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.out_channels = cfg.ext_pw_out_channel
        self.ext_pw_conv_1d = nn.Conv1d(cfg.hidden_size, 2 * cfg.ext_pw_out_channel, kernel_size=1)
        self.b1 = nn.Parameter(torch.zeros(1, cfg.ext_pw_out_channel, 1))
        self.b2 = nn.Parameter(torch.zeros(1, cfg.ext_pw_out_channel, 1))
        self.act = _activation(cfg.conv_glu_type)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.ext_pw_conv_1d(x).split(self.out_channels, dim=1)  # 2 x (B, C, L)
        return (value + self.b1) * self.act(gate + self.b2)


class DepthwiseSeparableConv1d(nn.Module):
    """Depthwise conv over time (padded k-1 on both sides; the caller drops the last k-1 outputs, which
    makes it causal), then a pointwise conv."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        d, k = cfg.hidden_size, cfg.kernel_size
        self.dw_conv = nn.Conv1d(d, d * cfg.depthwise_multiplier, k, padding=k - 1, groups=d)
        self.pw_conv = nn.Conv1d(d * cfg.depthwise_multiplier, cfg.depthwise_separable_out_channel, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pw_conv(self.dw_conv(x))


class ConvModule(nn.Module):
    """LN -> GLU pointwise -> causal depthwise -> pointwise -> swish -> pointwise (no batch norm)."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.causal_trim = cfg.kernel_size - 1
        self.layer_norm = nn.LayerNorm(cfg.hidden_size)
        self.glu = GluPointwiseConv(cfg)
        self.dw_sep_conv_1d = DepthwiseSeparableConv1d(cfg)
        self.act = _activation(cfg.conv_activation)
        self.ext_pw_conv_1d = nn.Conv1d(cfg.hidden_size, cfg.ext_pw_out_channel, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D). Causal in time: padded frames at the end never reach valid ones."""
        h = self.glu(self.layer_norm(x).transpose(1, 2))  # (B, L, D) -> (B, D, L)
        h = self.dw_sep_conv_1d(h)  # (B, D, L + k - 1)
        if self.causal_trim:
            h = h[:, :, : -self.causal_trim]  # (B, D, L): output t sees inputs t-k+1 .. t
        h = self.ext_pw_conv_1d(self.act(h))
        return h.transpose(1, 2)  # (B, D, L) -> (B, L, D)


class ConformerBlock(nn.Module):
    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.feed_forward_in = FeedForward(cfg)
        self.self_attn = SelfAttention(cfg)
        self.conv = ConvModule(cfg)
        self.feed_forward_out = FeedForward(cfg)
        self.layer_norm_att = nn.LayerNorm(cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        x = x + FF_RESIDUAL_SCALE * self.feed_forward_in(x)
        x = x + self.self_attn(self.layer_norm_att(x), attn_mask)
        x = x + self.conv(x)
        x = x + FF_RESIDUAL_SCALE * self.feed_forward_out(x)
        return self.layer_norm(x)


class ConformerEncoder(nn.Module):
    """Features -> Conformer hidden states, windowed every MAX_WINDOW_FRAMES subsampled frames."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        _check_widths(cfg)
        self.cfg = cfg
        self.encoder_embedding = MeanVarianceNorm(cfg.input_size)
        self.embed = ConvSubsampling(cfg)
        self.relative_attention_bias_layer = RelativeAttentionBias(cfg)
        self.encoders = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_blocks))

    def forward(self, features: Tensor, frame_lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """features (n, T, input_size), frame_lengths (n,) or None (every item T frames long)
        -> hidden (n, T', D) with T' = ceil(T / 8), and token_lengths (n,) = ceil(frame_lengths / 8).
        With frame_lengths, rows at or past token_lengths[i] are zero."""
        n, t = features.shape[:2]
        # The original casts to the model dtype (bf16 in production) BEFORE normalising.
        x = self.encoder_embedding(features.to(self.embed.out.weight.dtype))
        if frame_lengths is not None:
            x = x.masked_fill(~_frames_before(frame_lengths, t)[..., None], 0.0)
        x, token_lengths = self.embed(x, frame_lengths)  # (n, T', D)
        t_sub, d = x.shape[1:]

        # Audio longer than one window is cut into independent windows; the last is zero-padded.
        win = min(t_sub, MAX_WINDOW_FRAMES)
        n_win = -(-t_sub // win)
        x = F.pad(x, (0, 0, 0, n_win * win - t_sub))  # (n, W*win, D)
        bias = self.relative_attention_bias_layer(win).to(x.dtype)  # (1, H, win, win)
        if token_lengths is None:
            token_lengths = torch.full((n,), t_sub, dtype=torch.long, device=x.device)
            mask = bias  # no padding: every key of every window, the tail of the last one included
        else:
            x = x.masked_fill(~_frames_before(token_lengths, n_win * win)[..., None], 0.0)
            mask = bias.masked_fill(~self._attended_keys(token_lengths, n_win, win), float("-inf"))
        x = x.reshape(n * n_win, win, d)  # (n*W, win, D): window-major within each item

        for block in self.encoders:
            x = block(x, mask)

        x = x.reshape(n, n_win * win, d)[:, :t_sub]  # (n, W*win, D) -> (n, T', D)
        if frame_lengths is not None:
            x = x.masked_fill(~_frames_before(token_lengths, t_sub)[..., None], 0.0)
        return x, token_lengths

    @staticmethod
    def _attended_keys(token_lengths: Tensor, n_win: int, win: int) -> Tensor:
        """-> (n*W, 1, 1, win) bool: the keys each window attends to, as for the item encoded alone.

        An item of T'_i <= 500 frames attends to its T'_i frames; a longer one to whole windows, the zero tail
        of its last one included (that is what happens to a single audio). Windows holding no frame of the item
        keep every key unmasked: an all -inf row would give NaN, and their outputs are discarded anyway."""
        windowed = token_lengths > MAX_WINDOW_FRAMES
        limit = torch.where(windowed, -(-token_lengths // win) * win, token_lengths)  # (n,)
        keys = _frames_before(limit, n_win * win).view(-1, n_win, win)  # (n, W, win)
        keys = keys | ~keys.any(dim=-1, keepdim=True)
        return keys.view(-1, 1, 1, win)  # (n*W, 1, 1, win): broadcast over heads and queries


def _check_widths(cfg: AudioConfig) -> None:
    """The conv module's channel counts must all equal hidden_size (they do in the checkpoint: 1024)."""
    widths = {"ext_pw_out_channel": cfg.ext_pw_out_channel,
              "depthwise_separable_out_channel": cfg.depthwise_separable_out_channel}
    for name, value in widths.items():
        if value != cfg.hidden_size:
            raise ValueError(f"audio {name} = {value} but hidden_size = {cfg.hidden_size}; the Conformer conv "
                             "module adds its output to the residual, so both must be equal")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"audio hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                         f"{cfg.num_attention_heads}")
    if cfg.downsample_rate != 1:
        raise ValueError(f"audio downsample_rate {cfg.downsample_rate} is not supported (the checkpoint uses 1: "
                         "no frame stacking before the projector)")
    if cfg.chunk_size > 0:
        raise ValueError(f"audio chunk_size {cfg.chunk_size}: streaming (chunked) attention is not supported; "
                         "the checkpoint uses -1 (full attention)")


class AudioEmbedding(nn.Module):
    """Conformer encoder + the two projectors into the text embedding space.

    Parameter names equal the transformers-native checkpoint's with `model.embed_tokens_extend.audio_embed.`
    removed. The `speech` projector is used for audio-only prompts, the `vision` one (`*_for_vision_speech`)
    for prompts that also hold images (docs/architecture.md#adapter-rule)."""

    def __init__(self, cfg: AudioConfig, text_hidden_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ConformerEncoder(cfg)
        d = cfg.hidden_size * cfg.downsample_rate
        self.up_proj_for_speech = nn.Linear(d, text_hidden_size)
        self.down_proj_for_speech = nn.Linear(text_hidden_size, text_hidden_size)
        self.up_proj_for_vision_speech = nn.Linear(d, text_hidden_size)
        self.down_proj_for_vision_speech = nn.Linear(text_hidden_size, text_hidden_size)

    def encode(self, features: Tensor, frame_lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encoder only.

        features: (n, T, 80) float log-mel frames, right-padded; cast to the module dtype.
        frame_lengths: (n,) int, valid frames per item in [1, T]; None means all T frames are valid.
        Returns hidden (n, T', D) with T' = ceil(T / 8), and token_lengths (n,) long = ceil(frame_lengths / 8).
        Each item's valid rows equal what encoding that item alone gives (see the module docstring)."""
        self._check_inputs(features, frame_lengths)
        if frame_lengths is not None:
            frame_lengths = frame_lengths.to(device=features.device, dtype=torch.long)
        return self.encoder(features, frame_lengths)

    def forward(self, features: Tensor, frame_lengths: Tensor | None = None,
                projector: str = "speech") -> list[Tensor]:
        """-> one (N_a_i, text_hidden) tensor per audio, N_a_i = ceil(frame_lengths[i] / 8).

        projector: "speech" (audio-only prompts) or "vision" (prompts that also hold images)."""
        if projector not in PROJECTORS:
            raise ValueError(f"projector {projector!r} is unknown; use 'speech' (audio-only prompt) or 'vision' "
                             "(prompt with images and audio)")
        hidden, token_lengths = self.encode(features, frame_lengths)
        counts = token_lengths.tolist()  # one host sync per batch: the split sizes
        rows = torch.cat([hidden[i, :c] for i, c in enumerate(counts)])  # (sum N_a, D): padding rows dropped
        if projector == "speech":
            up, down = self.up_proj_for_speech, self.down_proj_for_speech
        else:
            up, down = self.up_proj_for_vision_speech, self.down_proj_for_vision_speech
        out = down(F.gelu(up(rows.to(up.weight.dtype))))  # exact (erf) GELU
        return list(out.split(counts))

    def _check_inputs(self, features: Tensor, frame_lengths: Tensor | None) -> None:
        n_mels = self.cfg.input_size
        if features.dim() != 3 or features.shape[-1] != n_mels or features.shape[1] < 1:
            raise ValueError(f"audio features must be (n_audio, n_frames >= 1, {n_mels}) log-mel frames, got shape "
                             f"{tuple(features.shape)}; add a batch dimension for a single audio")
        if not features.is_floating_point():
            raise ValueError(f"audio features must be floating point, got {features.dtype}")
        if frame_lengths is None:
            return
        n, t = features.shape[:2]
        if frame_lengths.shape != (n,) or frame_lengths.is_floating_point():
            raise ValueError(f"frame_lengths must be an integer tensor of shape ({n},), got "
                             f"{frame_lengths.dtype} {tuple(frame_lengths.shape)}")
        if bool((frame_lengths < 1).any()) or bool((frame_lengths > t).any()):
            raise ValueError(f"frame_lengths must lie in [1, {t}] (the padded feature length), got "
                             f"{frame_lengths.tolist()}")
