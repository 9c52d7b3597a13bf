"""The GPU paths against the CPU reference: the engine on CUDA, with CUDA graphs and eagerly, in fp32 and bf16.

The reference is `Model.generate_ids` on CPU in fp32 (itself proven against transformers). On the GPU the decoder
runs the Triton kernels and, with static decode, replays captured CUDA graphs. Greedy tokens must equal the
reference's; where they part, the two best candidates at that step must be closer than the logits' own numeric
error between the devices (measured on the prompts, and itself bounded), i.e. a near-tie, not a wrong path.
Skipped without CUDA; `pytest -m gpu` selects this set.
"""
from __future__ import annotations

import pytest
import torch

import phi4mm
from phi4mm.engine.engine import Engine
from phi4mm.sampling import MAX_LOGPROBS, SamplingParams
from tests.conftest import scene, tone

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N_NEW = 6
TOP = MAX_LOGPROBS  # alternatives reported per step, to find the reference's token at a near-tie
REQUESTS = [
    dict(prompt="<|user|>Tell me a story about a fox.<|end|><|assistant|>"),
    # ~140 tokens: the decode attention splits each row's keys over several partitions (and a merge kernel)
    dict(prompt="<|user|>Tell me a story about a fox." + " Then another one." * 30 + "<|end|><|assistant|>"),
    dict(prompt="<|user|><|image_1|>What is this?<|end|><|assistant|>", images=[scene(448, 300, 1)]),
    dict(prompt="<|user|><|audio_1|>Transcribe the audio to text.<|end|><|assistant|>", audios=[tone(1.7, seed=2)]),
    dict(prompt="<|user|><|image_1|><|audio_1|>Answer the question.<|end|><|assistant|>",
         images=[scene(640, 480, 3)], audios=[tone(2.3, seed=4)]),
]
# The largest gap between a GPU model's prompt logits and the CPU fp32 ones that each dtype may show: fp32 differs
# only by summation order (~1e-6 here); bf16 rounds every product and sum to 8 bits (~2^-8 relative, through two
# layers and a 64-wide head: a few 1e-2 on logits of magnitude ~1.5).
MAX_LOGIT_ERROR = {torch.float32: 1e-4, torch.bfloat16: 0.15}


@pytest.fixture(scope="module", autouse=True)
def exact_fp32():
    """fp32 on the GPU means fp32: no TF32 in matmuls or in the towers' convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cpu_model(tiny_official):
    return phi4mm.load(tiny_official, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(cpu_model):
    return [cpu_model.generate_ids(r["prompt"], r.get("images"), r.get("audios"), max_new_tokens=N_NEW)
            for r in REQUESTS]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def gpu_model(request, tiny_official):
    return phi4mm.load(tiny_official, device="cuda", dtype=request.param)


def _prompt_logits(gpu_model, cpu_model):
    for r in REQUESTS:
        args = (r["prompt"], r.get("images"), r.get("audios"))
        yield gpu_model.logits(*args).cpu(), cpu_model.logits(*args)


@pytest.fixture(scope="module")
def logit_error(gpu_model, cpu_model):
    """The largest |GPU - CPU fp32| prompt logit over the requests (within the dtype's bound)."""
    worst = max((got - want).abs().max().item() for got, want in _prompt_logits(gpu_model, cpu_model))
    assert worst <= MAX_LOGIT_ERROR[gpu_model.dtype], worst
    return worst


def _stream(eng: Engine) -> list[list]:
    """Each request's StepOutputs that carry a token (with its TOP best log-probabilities)."""
    ids = [eng.add_request(r["prompt"], r.get("images"), r.get("audios"),
                           params=SamplingParams(max_tokens=N_NEW, logprobs=TOP)) for r in REQUESTS]
    steps: dict[str, list] = {i: [] for i in ids}
    for o in eng.stream():
        if o.token_id is not None:
            steps[o.request_id].append(o)
    assert not eng.has_work() and eng.pool.num_free == eng.pool.num_blocks - (eng.graphs is not None)
    return [steps[i] for i in ids]


def _assert_greedy_matches(steps: list[list], reference: list[list[int]], tol: float) -> None:
    for r, (outs, want) in enumerate(zip(steps, reference)):
        got = [o.token_id for o in outs]
        if got == want:
            continue
        i = next(i for i, (a, b) in enumerate(zip(got + [None], want + [None])) if a != b)
        assert i < len(got) and i < len(want), f"request {r}: {got} vs {want}"
        tops = dict(outs[i].top_logprobs)
        # A near-tie: the reference's choice scores within the logits' numeric error of ours. Where it is past
        # the reported alternatives, all of those must lie within that error (the random tiny model's top
        # candidates sit ~1e-2 apart, so in bf16 the window can be that narrow).
        worst = tops[want[i]] if want[i] in tops else min(tops.values())
        assert tops[got[i]] - worst <= 2 * tol, \
            f"request {r} step {i}: {got} vs {want}; top log-probs {tops}, tolerance {2 * tol:.2e}"


def test_gpu_logits_match_the_cpu_reference(gpu_model, cpu_model):
    assert gpu_model.net.embed_tokens.weight.dtype == gpu_model.dtype  # bf16 really runs in bf16
    for got, want in _prompt_logits(gpu_model, cpu_model):
        torch.testing.assert_close(got, want, atol=MAX_LOGIT_ERROR[gpu_model.dtype], rtol=0)


@pytest.mark.parametrize("block_size", [4, 16])
def test_engine_with_cuda_graphs_matches_the_cpu_reference(gpu_model, reference, logit_error, block_size):
    eng = Engine(gpu_model, num_blocks=512, block_size=block_size, static_decode=True)
    _assert_greedy_matches(_stream(eng), reference, logit_error)
    captured = [g for g in eng.graphs.graphs.values() if g.graph is not None]
    assert captured and eng.graphs.steps >= N_NEW - 1  # the decode steps replayed captured CUDA graphs


def test_engine_eager_equals_the_engine_with_cuda_graphs(gpu_model, reference, logit_error):
    """The same requests, without static shapes: the eager batched forward and the graph replay agree."""
    eager = _stream(Engine(gpu_model, num_blocks=512, static_decode=False))
    graphs = _stream(Engine(gpu_model, num_blocks=512, static_decode=True))
    _assert_greedy_matches(eager, reference, logit_error)
    _assert_greedy_matches(graphs, [[o.token_id for o in outs] for outs in eager], logit_error)


def test_static_prefill_graph_one_request_at_a_time(gpu_model, reference, logit_error):
    """A prompt alone in its step runs the captured prefill graph (no prefix cache to shorten it)."""
    eng = Engine(gpu_model, num_blocks=512, static_decode=True, prefix_caching=False)
    steps = []
    for r in REQUESTS:
        rid = eng.add_request(r["prompt"], r.get("images"), r.get("audios"),
                              params=SamplingParams(max_tokens=N_NEW, logprobs=TOP))
        steps.append([o for o in eng.stream() if o.request_id == rid and o.token_id is not None])
    assert eng.prefill_graphs.steps == len(REQUESTS)
    _assert_greedy_matches(steps, reference, logit_error)


def test_graphs_captured_at_warm_up_match_the_cpu_reference(gpu_model, reference, logit_error):
    """warmup() captures every batch bucket ahead of traffic (all writing one shared logits buffer); the
    requests then replay those graphs and still give the reference tokens."""
    eng = Engine(gpu_model, num_blocks=512, max_batch=8, static_decode=True, graph_warmup_seconds=60)
    eng.warmup()
    decode, prompts = eng.graphs_ready
    assert decode == len(eng.graphs.warm_keys(2048)) and prompts > 0
    before = set(eng.graphs.graphs)
    _assert_greedy_matches(_stream(eng), reference, logit_error)
    assert {k for k in eng.graphs.graphs if k[1] <= 128} <= before  # no short-context bucket captured in traffic
