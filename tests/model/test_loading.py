"""Checkpoint directories: what make-checkpoint writes, what the strict loader accepts and refuses."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import phi4mm
from phi4mm.config import ConfigError, ModelConfig
from phi4mm.model.weights import CheckpointError


def _copy(src, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_official_layout_has_the_published_files(tiny_official):
    names = {p.name for p in tiny_official.iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
            "tokenizer_config.json", "model.safetensors.index.json", "vision-lora", "speech-lora"} <= names
    index = json.loads((tiny_official / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.endswith("self_attn.qkv_proj.base_layer.weight") for k in index)
    assert any(k.endswith("qkv_proj.lora_A.vision.weight") for k in index)
    assert any(k.endswith("audio_projection.vision.2.weight") for k in index)
    assert not any(k.startswith("lm_head") for k in index)  # tied
    with safe_open(str(tiny_official / "speech-lora" / "adapter_model.safetensors"), "pt") as f:
        assert all(k.startswith("base_model.model.model.layers.") for k in f.keys())


def test_transformers_reads_our_hf_layout_without_complaint(tiny_hf):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, info = transformers.Phi4MultimodalForCausalLM.from_pretrained(
            tiny_hf, dtype=torch.float32, output_loading_info=True)
        proc = transformers.AutoProcessor.from_pretrained(tiny_hf)
        ref.load_adapter(str(tiny_hf / "speech-lora"), adapter_name="speech")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert proc.tokenizer.convert_tokens_to_ids("<|endoftext10|>") == 200010
    ours = phi4mm.load(tiny_hf, dtype=torch.float32)
    torch.testing.assert_close(ours.net.embed_tokens.weight, ref.model.embed_tokens.weight, rtol=0, atol=0)


def test_same_seed_same_weights_both_layouts_and_other_seed_differs(tiny_official, tiny_hf, tmp_path):
    from phi4mm.tasks.make_checkpoint import make_checkpoint
    a = phi4mm.load(tiny_official, dtype=torch.float32).net.state_dict()
    b = phi4mm.load(tiny_hf, dtype=torch.float32).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = make_checkpoint(tmp_path / "s1", "tiny", "hf", seed=1)
    c = phi4mm.load(other, dtype=torch.float32).net.state_dict()
    assert not torch.equal(a["layers.0.self_attn.qkv_proj.weight"], c["layers.0.self_attn.qkv_proj.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtypes(tiny_official, dtype):
    m = phi4mm.load(tiny_official, dtype=dtype)
    assert all(p.dtype == dtype for p in m.net.parameters())
    logits = m.logits("<|user|>hi<|end|><|assistant|>")
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_text_only_load_of_multimodal_checkpoint(tiny_official):
    m = phi4mm.load(tiny_official, dtype=torch.float32, adapters=False)
    assert m.net.adapters == []
    full = phi4mm.load(tiny_official, dtype=torch.float32)
    p = "<|user|>hi<|end|><|assistant|>"
    assert torch.equal(m.logits(p), full.logits(p))  # text requests use no adapter either way


def test_phi4_mini_text_layout(tiny_hf, tmp_path):
    """A Phi-4-mini-instruct style directory: model_type phi3, text weights only."""
    d = tmp_path / "mini"
    d.mkdir()
    cfg = json.loads((tiny_hf / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    mini = {k: v for k, v in cfg.items() if k not in ("vision_config", "audio_config")}
    mini.update(model_type="phi3", architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.75,
                rope_theta=10000.0, rope_scaling={"type": "longrope", "short_factor": rope["short_factor"],
                                                  "long_factor": rope["long_factor"]})
    (d / "config.json").write_text(json.dumps(mini))
    tensors = {}
    for f in tiny_hf.glob("model-*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys() if "embed_tokens_extend" not in k})
    save_file(tensors, str(d / "model.safetensors"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_hf / f, d / f)
    mini_model = phi4mm.load(d, dtype=torch.float32)
    assert mini_model.net.vision is None and mini_model.net.audio is None
    full = phi4mm.load(tiny_hf, dtype=torch.float32)
    p = "<|user|>Say something.<|end|><|assistant|>"
    assert torch.equal(mini_model.logits(p), full.logits(p))
    with pytest.raises(ValueError, match="text-only"):
        mini_model.logits("<|user|><|image_1|><|end|><|assistant|>", images=[__import__("PIL.Image").Image.new("RGB", (32, 32))])


# ---- bad input: one sentence naming the file or key, nothing half-loaded ----

def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        phi4mm.load(tmp_path)
    with pytest.raises(ConfigError, match="is not a folder, nor a Hugging Face model id"):
        phi4mm.load(tmp_path / "nope")


def test_unknown_model_type(tiny_official, tmp_path):
    d = _copy(tiny_official, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        phi4mm.load(d)


def test_missing_shard(tiny_official, tmp_path):
    d = _copy(tiny_official, tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        phi4mm.load(d)


def test_truncated_shard(tiny_official, tmp_path):
    d = _copy(tiny_official, tmp_path)
    f = d / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        phi4mm.load(d)


def test_wrong_shape(tiny_official, tmp_path):
    d = _copy(tiny_official, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the stored gate_up/down no longer fit
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape .* but config.json implies"):
        phi4mm.load(d)


def _edit_shard(ckpt, tmp_path, edit):
    """A copy of the checkpoint whose second shard's tensor dict went through `edit`."""
    d = _copy(ckpt, tmp_path)
    f = d / "model-00002-of-00002.safetensors"
    with safe_open(str(f), "pt") as sf:
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    edit(tensors)
    save_file(tensors, str(f))
    return d


def test_missing_tensor(tiny_official, tmp_path):
    d = _edit_shard(tiny_official, tmp_path, lambda t: t.pop(sorted(t)[0]))
    with pytest.raises(CheckpointError, match="is missing from the shards"):
        phi4mm.load(d)


def test_unexpected_tensor(tiny_official, tmp_path):
    d = _edit_shard(tiny_official, tmp_path, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mystery.weight'"):
        phi4mm.load(d)


def test_missing_adapter_folder_hf_layout(tiny_hf, tmp_path):
    d = _copy(tiny_hf, tmp_path)
    shutil.rmtree(d / "speech-lora")
    with pytest.raises(CheckpointError, match="speech-lora.*missing.*adapters=False"):
        phi4mm.load(d)
    assert phi4mm.load(d, adapters=False).net.adapters == []


def test_cli_bad_checkpoint_exits_2_with_one_sentence(tmp_path):
    r = subprocess.run([sys.executable, "-m", "phi4mm.cli.main", "chat", "--model", str(tmp_path), "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "no config.json" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_config_from_hf_ignores_wrong_transformers_defaults():
    """Official config.json: 24 heads, tied, bias distance 500 (HF defaults would say 32, untied, 1000)."""
    from phi4mm.model.checkpoint import official_config
    cfg = ModelConfig.from_hf(official_config("full"))
    assert cfg.text.num_attention_heads == 24 and cfg.text.tie_word_embeddings
    assert cfg.audio.bias_max_distance == 500 and cfg.audio.hidden_size == 1024
    assert cfg.text.rotary_dim == 96 and abs(cfg.text.rope_scaling_factor - 1.1902380714238083) < 1e-12
    assert cfg.loras["vision"].r == 256 and cfg.loras["speech"].scale == 2.0
    assert cfg.vision.num_layers_run == 26
