"""The micro model from scratch: its sizes, a byte-level BPE trained on the recipe's data with Phi's special
tokens, the official-layout config, and the initial weights (deterministic per parameter name)."""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from phi4mm.inputs.tokenizer import ADDED_TOKENS, CHAT_TEMPLATE, EOS_TOKEN, Tokenizer
from phi4mm.model.checkpoint import scaled_config

BPE_VOCAB = 2048  # the corpus has a few hundred distinct words: whole words become single tokens
# Sizes: the published structure (fused qkv/gate_up, GQA 2:1, partial rotary 0.75, SigLIP NaViT with the
# feature layer -2, a conv-subsampled conformer with T5 bias), scaled to ~12 M parameters (~24 MB bf16).
TEXT = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 4}  # head_dim 32 -> rotary 24 -> 12 LongRoPE factors
VISION = {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4}
AUDIO = {"attention_dim": 192, "attention_heads": 4, "linear_units": 512, "num_blocks": 4,
         "nemo_conv_settings": {"conv_channels": 192}, "ext_pw_out_channel": 192,
         "depthwise_seperable_out_channel": 192}
LORA = {"vision": (32, 64), "speech": (32, 64)}  # (r, alpha): alpha = 2r, the published ratio
INIT_STD = 0.02  # GPT-style initialisation of the decoder's matrices; LoRA B starts at zero (the adapter is a no-op)
# SigLIP's learned position table: 0.02 would be ~2% of a patch embedding's scale (~1 for [-1, 1] pixels and
# 1/sqrt(fan_in) weights), so the tower would start out blind to where a patch is; OCR needs letter order.
VISION_POS_STD = 0.2
# The last matrix of every residual branch in the towers starts at zero, so each block starts as the identity
# (the usual "zero the branch output" init of deep residual nets). With 1/sqrt(fan_in) there too, the branch
# outputs of the conformer were near-constant over time (ReLU/swish means feeding the next projection) and
# drowned the subsampled speech: the encoder output varied 0.2% frame to frame, and neither the LM loss nor
# CTC moved it in 2,000 GPU steps (weights stayed at their initial norms).
ZERO_INIT = (".feed_forward_in.down_proj.weight", ".feed_forward_out.down_proj.weight", ".self_attn.o_proj.weight",
             ".conv.ext_pw_conv_1d.weight", ".self_attn.out_proj.weight", ".mlp.fc2.weight")
MEL_STATS_CLIPS = 256  # training clips that set the encoder's input normalisation (global mean / invstd)


def train_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int = BPE_VOCAB) -> Tokenizer:
    """A byte-level BPE on `texts` with Phi's added tokens (same names and flags, new ids); files -> out."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = [content for _, content, _, _ in ADDED_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=names, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # Re-add with the published flags (special / rstrip); each name keeps the id the trainer gave it.
    tok.add_tokens([AddedToken(c, special=sp, rstrip=rs, lstrip=False, normalized=False, single_word=False)
                    for _, c, sp, rs in ADDED_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(c)): {"content": c, "lstrip": False, "normalized": False, "rstrip": rs,
                                       "single_word": False, "special": sp} for _, c, sp, rs in ADDED_TOKENS}
    conf = {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added, "bos_token": EOS_TOKEN,
            "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": EOS_TOKEN,
            "model_max_length": 131072, "pad_token": EOS_TOKEN, "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": EOS_TOKEN}
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: EOS_TOKEN for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, indent=2) + "\n")
    return Tokenizer.from_dir(out)


def micro_config(tok: Tokenizer) -> dict[str, Any]:
    """The official-layout config.json of the micro model, ids taken from its tokenizer by name."""
    d = scaled_config(TEXT, VISION, AUDIO, LORA)
    d["vocab_size"] = math.ceil(tok.vocab_size / 64) * 64  # embedding rows padded like the published 200064
    eot = tok.token_id(EOS_TOKEN)
    d.update(bos_token_id=eot, pad_token_id=eot, eos_token_id=[tok.token_id("<|end|>"), eot])
    return d


def initializer(mel_mean: torch.Tensor, mel_invstd: torch.Tensor,
                seed: int) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """name, shape -> a from-scratch initial value (deterministic per name)."""
    import zlib

    def init(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("global_mean"):
            return mel_mean.clone()
        if name.endswith("global_invstd"):
            return mel_invstd.clone()
        leaf = name.rsplit(".", 1)[-1]
        if ".lora_B." in name or leaf in ("bias", "b1", "b2") or \
                (name.startswith(("vision.", "audio.")) and name.endswith(ZERO_INIT)):
            return torch.zeros(shape)
        if len(shape) == 1:  # norm gains
            return torch.ones(shape)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        std = VISION_POS_STD if name.startswith("vision.") and name.endswith("position_embedding.weight") \
            else INIT_STD
        if name.startswith(("vision.", "audio.")) and len(shape) >= 2 and "lora_" not in name \
                and not name.endswith(("position_embedding.weight", "_extensor")) and "attention_bias" not in name:
            # Tower matrices and convs: 1/sqrt(fan_in) keeps the signal's scale layer to layer. A flat 0.02
            # shrank it ~1e-6 through the conformer's five small-fan-in subsampling convs (depthwise 3x3:
            # fan-in 9), so its output did not depend on the audio and speech training could not start.
            std = math.prod(shape[1:]) ** -0.5
        return std * torch.randn(shape, generator=g)
    return init


def _corpus(data_dir: Path) -> Iterable[str]:
    """Every training conversation rendered with the chat template (the BPE learns the prompt format too)."""
    from phi4mm.inputs.chat import render_prompt
    from phi4mm.inputs.records import read_jsonl
    for f in sorted(data_dir.glob("*.jsonl")):
        if f.name.startswith("stage-"):
            continue
        for rec in read_jsonl(f)[0]:
            yield render_prompt(rec.messages, rec.tools, add_generation_prompt=False)


def _mel_stats(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin mean and 1/std of the log-mel over the first training clips (the encoder's input norm)."""
    from phi4mm.inputs.audio import load_audio, log_mel
    from phi4mm.inputs.records import read_jsonl
    recs = read_jsonl(data_dir / "asr.jsonl")[0][:MEL_STATS_CLIPS]
    feats = torch.cat([torch.from_numpy(log_mel(load_audio(r.audios[0]))) for r in recs])  # (frames, 80)
    return feats.mean(0).float(), (1.0 / feats.std(0).clamp_min(1e-3)).float()


def init_checkpoint(out: str | Path, data_dir: str | Path, seed: int = 0) -> Path:
    """Tokenizer trained on the training data + a from-scratch checkpoint in the official layout."""
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    out, data_dir = Path(out), Path(data_dir)
    tok_dir = out.parent / (out.name + "-tokenizer")
    tok = train_tokenizer(_corpus(data_dir), tok_dir)
    mean, invstd = _mel_stats(data_dir)
    make_checkpoint(out, config=micro_config(tok), init=initializer(mean, invstd, seed), tokenizer_dir=tok_dir,
                    dtype=torch.float32)
    shutil.rmtree(tok_dir)
    return out
