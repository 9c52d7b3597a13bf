"""Quantized decoder weights (phi4mm/model/quant.py): the numbers, the layer, the Triton kernels (under the
interpreter, in a child process), the compressed-tensors checkpoint written by `phi4mm quantize`, loading,
generation and the errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import phi4mm
from phi4mm.cli import main as cli
from phi4mm.config import LoraConfig
from phi4mm.model import quant
from phi4mm.model.lora import AdapterPlan, LoraLinear
from phi4mm.model.weights import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "<|user|>Hello there, how are you today? Tell me a story about the sea.<|end|><|assistant|>"


def _weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 512, generator=g)
    w[3] = 0.0  # an all-zero row and group must not divide by zero
    w[5, :7] *= 40  # outliers
    return w


@pytest.mark.parametrize("method", quant.METHODS)
def test_requantizing_a_dequantized_weight_is_exact(method):
    w = _weights()
    first = quant.quantize_weight(method, w, torch.float32)
    if method == "fp8":
        dense = quant.dequantize_fp8(first["weight"], first["weight_scale"], torch.float32)
    else:
        dense = quant.dequantize_int4(first["weight_packed"], first["weight_scale"], torch.float32)
    again = quant.quantize_weight(method, dense, torch.float32)
    for leaf, t in first.items():
        a, b = (t.view(torch.uint8), again[leaf].view(torch.uint8)) if t.dtype == quant.FP8_DTYPE else (t, again[leaf])
        assert torch.equal(a, b), leaf


def test_int4_error_bound_and_compressed_tensors_packing():
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )
    w = _weights()
    packed, scale = quant.quantize_int4(w)
    q = quant.unpack_int4(packed)
    assert q.min() >= quant.INT4_QMIN and q.max() <= quant.INT4_QMAX
    # Their packing and ours give the same int32 words, both ways.
    assert torch.equal(pack_to_int32(q, 4), packed)
    assert torch.equal(unpack_from_int32(packed, 4, w.shape), q)
    err = (quant.dequantize_int4(packed, scale, torch.float32) - w).abs().view(24, 4, 128)
    # Rounding to the nearest step: half a step, plus the bf16 rounding of the scale (2^-9 relative) on 7 steps.
    assert (err <= scale[..., None] * (0.5 + 7 * 2 ** -8)).all()
    assert err.max() > 0.3 * scale.max()  # the bound is not vacuous


def test_fp8_error_bound():
    w = _weights()
    q, scale = quant.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (24, 1)
    err = (quant.dequantize_fp8(q, scale, torch.float32) - w).abs()
    # e4m3: 3 mantissa bits -> half an ulp is 2^-4 of the value; subnormals: 2^-10 of the scale.
    assert (err <= torch.maximum(w.abs() * 2 ** -4, scale * 2 ** -10) * 1.01).all()


@pytest.mark.parametrize("method", quant.METHODS)
def test_quantized_linear_matches_the_dequantized_reference(method):
    loras = {"a": LoraConfig(r=4, lora_alpha=8, dropout=0.0), "b": LoraConfig(r=2, lora_alpha=2, dropout=0.0)}
    dense = LoraLinear(512, 24, loras)
    torch.nn.init.normal_(dense.weight)
    for p in list(dense.lora_A.values()) + list(dense.lora_B.values()):
        torch.nn.init.normal_(p, std=0.1)
    net = torch.nn.Sequential(dense).eval()
    saved = quant.quantize_model(net, method)
    lin = net[0]
    assert isinstance(lin, quant.QuantLoraLinear) and saved > 0
    assert lin.lora_A["a"] is dense.lora_A["a"]  # adapters are shared, not copied
    x = torch.randn(3, 5, 512)
    plan = AdapterPlan.build(["a", None, "b"])
    ref = LoraLinear(512, 24, loras)
    ref.load_state_dict({**dense.state_dict(), "weight": lin.dense_weight()})
    with torch.no_grad():
        assert torch.allclose(lin(x, plan), ref(x, plan), atol=1e-5)
        # Against the unquantized layer: the weight error's bound, carried through the product.
        rel = (lin(x, plan) - dense(x, plan)).norm() / dense(x, plan).norm()
    assert rel < {"fp8": 0.05, "int4": 0.2}[method]
    assert lin.merge("a") > 0  # a merged copy is dense, in the model dtype
    assert torch.allclose(lin(x, AdapterPlan.build("a")), ref(x, AdapterPlan.build("a")), atol=1e-4)


def test_triton_kernels_match_torch_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "tests/model/quant_check.py"), "cpu"], env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "FAIL" not in r.stdout and r.stdout.count("ok ") == 17


@pytest.fixture(scope="module")
def quantized_dirs(tiny_official, tmp_path_factory):
    out = {}
    for method in quant.METHODS:
        d = tmp_path_factory.mktemp(f"tiny_{method}")
        shutil.rmtree(d)
        assert cli.main(["quantize", str(tiny_official), str(d), "--method", method]) == 0
        out[method] = d
    return out


@pytest.fixture(scope="module")
def models(tiny_official, quantized_dirs):
    """fp32, quantized at load, and loaded pre-quantized: each loaded once for the module."""
    out = {"fp32": phi4mm.load(tiny_official)}
    for method in quant.METHODS:
        out[method] = phi4mm.load(tiny_official, quantization=method)
        out["pre_" + method] = phi4mm.load(quantized_dirs[method])
    return out


@pytest.mark.parametrize("method", quant.METHODS)
def test_prequantized_checkpoint_loads_the_same_tensors(quantized_dirs, models, method):
    from compressed_tensors.quantization import QuantizationConfig
    d = quantized_dirs[method]
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert QuantizationConfig.model_validate(qc).quant_method == "compressed-tensors"
    stored = {k: v for f in d.glob("model-*.safetensors") for k, v in load_file(str(f)).items()}
    leaves = {k.rsplit(".", 1)[1] for k in stored if ".layers.0.mlp.down_proj.base_layer." in k}
    assert leaves == ({"weight", "weight_scale"} if method == "fp8" else {"weight_packed", "weight_scale", "weight_shape"})
    pre, at_load = models["pre_" + method], models[method]
    assert pre.quantization == at_load.quantization == method
    a, b = pre.net.state_dict(), at_load.net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if x.dtype == quant.FP8_DTYPE:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert x.dtype == y.dtype and torch.equal(x, y), k


def test_asking_a_quantized_checkpoint_for_another_method_is_refused(quantized_dirs):
    with pytest.raises(quant.QuantizationError, match="already quantized to int4"):
        phi4mm.load(quantized_dirs["int4"], quantization="fp8")


@pytest.mark.parametrize("method", quant.METHODS)
def test_quantized_logits_stay_close_to_fp32(models, method):
    ref, model = models["fp32"], models[method]
    ref_logits = ref.logits(PROMPT).double()
    p = ref_logits.log_softmax(-1)
    q = model.logits(PROMPT).double().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    # A relative weight error e moves each layer's output by about e of its size; through two layers and the
    # head the logits move by a few e * std(logits), and KL ~ E[dlogit^2] / 2 for small moves. Bound:
    # (4 e std)^2 / 2, with e measured on this model's own weights (fp8 ~0.03, int4 ~0.12).
    w = ref.net.layers[0].mlp.gate_up_proj.weight
    e = ((model.net.layers[0].mlp.gate_up_proj.dense_weight() - w).norm() / w.norm()).item()
    bound = (4 * e * ref_logits.std().item()) ** 2 / 2
    assert 0 < kl < bound, (kl, bound)
    # Greedy generation runs end to end through the quantized layers.
    assert isinstance(model.generate(PROMPT, max_new_tokens=4), str)


def test_cli_quantization_flag_and_errors(tiny_official, quantized_dirs, tmp_path, capsys):
    assert cli.main(["chat", "--model", str(tiny_official), "--quantization", "int4", "Hi", "--max-tokens", "3"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["chat", "--model", str(tiny_official), "--quantization", "int3", "Hi"])
    assert e.value.code == 2
    # Quantizing a quantized checkpoint, or into a non-empty folder: one sentence, exit code 2.
    assert cli.main(["quantize", str(quantized_dirs["int4"]), str(tmp_path / "x"), "--method", "fp8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert cli.main(["quantize", str(tiny_official), str(tmp_path / "full"), "--method", "int4"]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(quant.QuantizationError, match="int4"):
        phi4mm.load(tiny_official, quantization="int5")


def test_device_errors_and_notes():
    assert "weight-only" in quant.device_note("fp8", "cuda", (8, 0))
    assert quant.device_note("fp8", "cuda", (9, 0)) is None and quant.device_note("int4", "cuda", (8, 0)) is None
    assert "CPU" in quant.device_note("int4", "cpu")
    with pytest.raises(quant.QuantizationError, match="cuda or cpu"):
        quant.device_note("int4", "mps")
    with pytest.raises(quant.QuantizationError, match="divisible by 16"):
        quant.int4_group(72)


def test_strict_loading_names_file_and_tensor(quantized_dirs, tmp_path):
    d = shutil.copytree(quantized_dirs["int4"], tmp_path / "bad")
    name = "model.layers.1.self_attn.o_proj.base_layer.weight_scale"
    victim = next(f for f in d.glob("model-*.safetensors") if name in load_file(str(f)))
    tensors = load_file(str(victim))
    scale = tensors.pop(name)
    save_file(tensors, str(victim))
    with pytest.raises(CheckpointError, match=r"weight_scale.*missing"):
        phi4mm.load(d)
    tensors[name] = scale
    tensors[name.replace("weight_scale", "weight_shape")] = torch.tensor([7, 7])
    save_file(tensors, str(victim))
    with pytest.raises(CheckpointError, match=r"weight_shape.*says the weight is \[7, 7\]"):
        phi4mm.load(d)


def test_schemes_phi4mm_does_not_run_are_refused_by_name(quantized_dirs):
    from phi4mm.model.quant_format import read_plan
    cfg = json.loads((quantized_dirs["int4"] / "config.json").read_text())
    modules = {"layers.0.mlp.down_proj": "model.layers.0.mlp.down_proj.base_layer"}
    assert read_plan(cfg, modules, "config.json").modules == {"layers.0.mlp.down_proj": quant.Spec("int4", 128)}
    weights = cfg["quantization_config"]["config_groups"]["group_1"]["weights"]
    for change, message in (({"symmetric": False}, "asymmetric"), ({"actorder": "group"}, "actorder"),
                            ({"num_bits": 8}, "int4 weights must be")):
        bad = json.loads(json.dumps(cfg))
        bad["quantization_config"]["config_groups"]["group_1"]["weights"] = {**weights, **change}
        with pytest.raises(quant.QuantizationError, match=message):
            read_plan(bad, modules, "config.json")
    bad = {"quantization_config": {"quant_method": "gptq"}}
    with pytest.raises(quant.QuantizationError, match="'gptq' is not supported"):
        read_plan(bad, modules, "config.json")


# ------------------------------------------------------------------------------------------ the quantized head
def _stored_bytes(net: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


@pytest.fixture(scope="module")
def head_dir(tiny_official, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_int4_head")
    shutil.rmtree(d)
    assert cli.main(["quantize", str(tiny_official), str(d), "--method", "int4", "--quantize-head"]) == 0
    return d


@pytest.fixture(scope="module")
def head_models(tiny_official, head_dir, models):
    out = {m: phi4mm.load(tiny_official, quantization=m, quantize_head=True) for m in quant.METHODS}
    out["pre_int4"] = phi4mm.load(head_dir)
    for m in out.values():  # the same tokenizer: its id -> bytes table (~2 s to build) is shared
        m.decodable = models["fp32"].decodable
    return out


@pytest.mark.parametrize("method", quant.METHODS)
def test_embedding_rows_are_the_dequantized_rows(head_models, models, method):
    emb = head_models[method].net.embed_tokens
    assert isinstance(emb, quant.QuantEmbedding) and head_models[method].quantized_head
    assert not models[method].quantized_head  # the flag is off by default
    dense = emb.dense_weight()  # (vocab, hidden)
    ids = torch.tensor([[0, 5, 200063], [17, 17, 199999]])
    rows = emb(ids)
    assert rows.shape == (2, 3, dense.shape[1]) and rows.dtype == dense.dtype
    assert torch.equal(rows, dense[ids])  # bit for bit
    ref = models["fp32"].net.embed_tokens.weight
    assert not torch.equal(rows, ref[ids])  # the rows really are quantized


@pytest.mark.parametrize("method", quant.METHODS)
def test_head_logits_match_the_dequantized_reference_within_the_format_bound(head_models, models, method):
    q = head_models[method]
    ids = q.prepare(PROMPT).input_ids
    # The same decoder with a dense head holding the dequantized matrix: equal up to summation order.
    ref = models[method]
    saved = ref.net.embed_tokens.weight.data
    try:
        ref.net.embed_tokens.weight.data = q.net.embed_tokens.dense_weight()
        want = ref.logits(PROMPT)
    finally:
        ref.net.embed_tokens.weight.data = saved
    got = q.logits(PROMPT)
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item()), (got - want).abs().max()
    # Against the unquantized head, on the same final states: |dlogit_v| <= |h| |dw_v| (Cauchy-Schwarz), with
    # |dw_v| bounded element by element by the format (the bounds of the error tests above).
    net = q.net
    with torch.no_grad():
        pos = torch.arange(len(ids))[None]
        h = net.norm(net.hidden(net.embed(torch.tensor([ids])), pos))[0]  # (T, hidden)
        w = models["fp32"].net.embed_tokens.weight  # (vocab, hidden)
        err = (net.head(h) - h @ w.T).abs()  # (T, vocab)
        s = net.embed_tokens.weight_scale.float()
        if method == "fp8":
            per = torch.maximum(w.abs() * 2 ** -4, s * 2 ** -10) * 1.01
        else:
            per = (s * (0.5 + 7 * 2 ** -8)).repeat_interleave(net.embed_tokens.group, dim=1)
        bound = h.norm(dim=1)[:, None] * per.norm(dim=1)[None, :]  # (T, vocab)
    assert (err <= bound * 1.001 + 1e-6).all()
    assert err.max() > 0.05 * bound.max()  # the bound is not vacuous


def test_quantized_head_saves_the_expected_bytes(head_models, models):
    vocab, hidden = models["fp32"].net.embed_tokens.weight.shape
    scale = 4  # fp32 scales in this fp32 model (bf16 ones, 2 bytes, on a GPU)
    for method in quant.METHODS:
        group = quant.int4_group(hidden)
        quantized = (vocab * hidden + vocab * scale if method == "fp8"
                     else vocab * hidden // 2 + vocab * (hidden // group) * scale + 2 * 8)
        saved = _stored_bytes(models[method].net) - _stored_bytes(head_models[method].net)
        assert saved == vocab * hidden * 4 - quantized, method
    # In place on a loaded module: the same saving, and a separate (untied) lm_head is refused by name.
    net = torch.nn.Module()
    net.embed_tokens, net.lm_head = torch.nn.Embedding(64, 32), None
    assert quant.quantize_model(net, "fp8", head=True) == 64 * 32 * 4 - (64 * 32 + 64 * 4)
    net.lm_head = torch.nn.Linear(32, 64)
    with pytest.raises(quant.QuantizationError, match="separate lm_head"):
        quant.Plan.decoder(net, "int4", head=True)


def test_prequantized_head_checkpoint_reloads_the_same_tensors(head_dir, head_models, quantized_dirs):
    from compressed_tensors.quantization import QuantizationConfig
    qc = json.loads((head_dir / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)
    assert any("model.embed_tokens" in g["targets"] for g in qc["config_groups"].values())
    stored = {k for f in head_dir.glob("model-*.safetensors") for k in load_file(str(f))}
    assert {"model.embed_tokens.weight_packed", "model.embed_tokens.weight_scale"} <= stored
    assert "model.embed_tokens.weight" not in stored
    pre, at_load = head_models["pre_int4"], head_models["int4"]
    assert pre.quantized_head and pre.quantization == "int4"  # no flag: the config says so
    a, b = pre.net.state_dict(), at_load.net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # A checkpoint written without the head cannot grow one at load.
    with pytest.raises(quant.QuantizationError, match="cannot be added"):
        phi4mm.load(quantized_dirs["int4"], quantize_head=True)


def test_head_checkpoint_is_strict(head_dir, tmp_path):
    d = shutil.copytree(head_dir, tmp_path / "bad")
    cfg = json.loads((d / "config.json").read_text())
    for g in cfg["quantization_config"]["config_groups"].values():
        g["targets"] = [t for t in g["targets"] if t != "model.embed_tokens"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"embed_tokens\.weight_(packed|scale).*not a decoder linear"):
        phi4mm.load(d)


def test_static_decode_path_runs_the_quantized_head(head_models):
    from phi4mm.engine.engine import Engine
    from phi4mm.sampling import SamplingParams
    m = head_models["fp8"]  # the graph code is the same for both methods; the kernels are checked above
    want = m.generate_ids(PROMPT, max_new_tokens=3)
    eng = Engine(m, num_blocks=64, static_decode=True)
    out = eng.generate([{"prompt": PROMPT, "params": SamplingParams(max_tokens=3)}])
    assert out[0]["token_ids"] == want and eng.graphs.steps > 0


def test_cli_quantize_head_flag_and_errors(tiny_official, head_models, tmp_path, capsys, monkeypatch):
    from phi4mm.cli.args import parser
    subs = parser().subcommands
    with_method = [n for n, sp in subs.items() if "--quantization" in sp._option_string_actions]
    assert {"chat", "serve", "batch", "eval", "bench", "transcribe", "translate"} <= set(with_method)
    for name in [*with_method, "quantize"]:
        assert "--quantize-head" in subs[name]._option_string_actions, name
    # The flag reaches phi4mm.load (the model it would load is the fixture's: loading is tested above).
    asked = {}

    def fake_load(path, **kw):
        asked.update(kw)
        return head_models[kw["quantization"]]
    monkeypatch.setattr(phi4mm, "load", fake_load)
    assert cli.main(["chat", "--model", str(tiny_official), "--quantization", "fp8", "--quantize-head", "Hi",
                     "--max-tokens", "2"]) == 0
    assert asked["quantization"] == "fp8" and asked["quantize_head"] is True
    monkeypatch.undo()
    capsys.readouterr()
    # Without a method: one sentence naming the flag, exit code 2, before anything loads.
    assert cli.main(["chat", "--model", str(tiny_official), "--quantize-head", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "--quantize-head" in err and "--quantization" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(quant.QuantizationError, match="quantize_head"):
        phi4mm.load(tiny_official, quantize_head=True)
    with pytest.raises(quant.QuantizationError, match="True or False"):
        phi4mm.load(tiny_official, quantization="int4", quantize_head="yes")
    # A model whose head is not tied to its embedding is refused by name.
    untied = tmp_path / "untied"
    untied.mkdir()
    (untied / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert cli.main(["quantize", str(untied), str(tmp_path / "o"), "--method", "int4", "--quantize-head"]) == 2
    assert "--quantize-head" in capsys.readouterr().err and not (tmp_path / "o").exists()
