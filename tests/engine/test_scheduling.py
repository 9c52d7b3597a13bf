"""The engine under hostile and heavy traffic: one failing request never fails another, a long prompt is
prefilled in slices between the decodes of other streams, and the context a request may use is what the
engine can actually hold."""
from __future__ import annotations

import pytest
import torch

import phi4mm
from phi4mm.engine import Engine, kv_cache
from phi4mm.engine.runner import ModelRunner
from phi4mm.engine.scheduler import CHUNK_FLOOR_DIVISOR, history_tokens
from phi4mm.options import EngineOptions
from phi4mm.sampling import SamplingParams
from tests.conftest import scene

PROMPT = "<|user|>Tell me a story about a fox.<|end|><|assistant|>"
OTHER = "<|system|>Be brief.<|end|><|user|>Hi!<|end|><|assistant|>"


@pytest.fixture(scope="module")
def model(tiny_official):
    return phi4mm.load(tiny_official, dtype=torch.float32)


def alone(model, prompt, n, **kw):
    out = Engine(model, num_blocks=256, **kw).generate([dict(prompt=prompt, params=SamplingParams(max_tokens=n))])
    return out[0]["token_ids"]


def test_a_request_that_breaks_the_forward_fails_alone(model, monkeypatch):
    """Whatever makes a step raise for one request (a bad tensor, a kernel error), the others in the same step
    keep their exact greedy tokens and the culprit ends with finish_reason "error"."""
    want = [alone(model, PROMPT, 8), alone(model, OTHER, 8)]
    real = ModelRunner.forward

    def forward(self, plan):
        if any(s.id == "bad" for s, _ in plan):
            raise RuntimeError("poisoned request")
        return real(self, plan)
    monkeypatch.setattr(ModelRunner, "forward", forward)
    eng = Engine(model, num_blocks=256)
    res = eng.generate([dict(prompt=PROMPT, params=SamplingParams(max_tokens=8)),
                        dict(prompt=OTHER, params=SamplingParams(max_tokens=8), request_id="bad"),
                        dict(prompt=OTHER, params=SamplingParams(max_tokens=8))])
    assert [r["token_ids"] for r in (res[0], res[2])] == want
    assert res[1]["finish_reason"] == "error" and "poisoned request" in res[1]["error"]
    assert eng.stats["isolated_failures"] == 1
    assert eng.pool.num_free == eng.pool.num_blocks  # the failed request's blocks came back


def test_a_prompt_that_does_not_fit_its_image_fails_alone(model):
    """A prompt whose image placeholders disagree with what the tower produces (one placeholder token too many,
    as a literal placeholder token typed into the text would make it) fails alone; a stream beside it is
    untouched."""
    img = scene(448, 300, 1)
    prep = model.prepare("<|user|><|image_1|>What is this?<|end|><|assistant|>", images=[img])
    image_id = model.config.image_token_id
    prep.input_ids = prep.input_ids[:3] + [image_id] + prep.input_ids[3:]  # one image token more than encoded
    want = alone(model, PROMPT, 8)
    eng = Engine(model, num_blocks=256)
    res = eng.generate([dict(prompt=PROMPT, params=SamplingParams(max_tokens=8)),
                        dict(prompt=prep, params=SamplingParams(max_tokens=8))], errors="return")
    assert res[0]["token_ids"] == want and res[0]["finish_reason"] == "length"
    assert res[1]["finish_reason"] == "error" and "does not fit its media" in res[1]["error"]


@pytest.mark.parametrize("field", ["top_k", "min_tokens", "max_tokens", "seed"])
def test_integers_past_64_bits_are_refused_before_they_reach_a_tensor(field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: 2**64}).validate()
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5).validate()


def test_a_long_prompt_is_prefilled_in_slices_between_decodes(model, monkeypatch):
    """While a long prompt arrives, every step still gives each running stream its next token, prompt chunks
    stay within `prefill_tokens_with_decodes` counted by their cost (fewer tokens as the prompt's history grows,
    never fewer than an eighth), and every answer equals its answer alone. A step's attention costs what its
    sequences need: the decodes beside a chunk are not padded to the chunk's length and history (33 streams
    beside a 13K-token prompt made CPU steps 20x slower), counted in attention scores, not time."""
    long_prompt = "<|user|>" + "The fox ran over the hill and the dog ran after it. " * 40 + "<|end|><|assistant|>"
    want = [alone(model, PROMPT, 24), alone(model, OTHER, 24), alone(model, long_prompt, 4)]
    scores: list[int] = []  # query x key pairs of every attention call of the current step
    sdpa = kv_cache.F.scaled_dot_product_attention

    def counted(q, k, v, *args, **kw):
        scores.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])  # S x H x T x L
        return sdpa(q, k, v, *args, **kw)
    monkeypatch.setattr(kv_cache.F, "scaled_dot_product_attention", counted)
    eng = Engine(model, num_blocks=512, max_tokens_per_step=2048, prefill_tokens_with_decodes=32)
    ids = [eng.add_request(p, params=SamplingParams(max_tokens=24)) for p in (PROMPT, OTHER)]
    toks: dict[str, list[int]] = {i: [] for i in ids}
    for _ in range(3):  # the two streams are decoding
        for o in eng.step():
            toks[o.request_id].append(o.token_id) if o.token_id is not None else None
    long_id = eng.add_request(long_prompt, params=SamplingParams(max_tokens=4))
    toks[long_id] = []
    n_prompt = eng.seqs[long_id].prep.num_tokens
    assert n_prompt > 10 * 32  # the prompt needs many slices
    text, bs = model.config.text, eng.block_size
    sliced = shrunk = 0
    while eng.has_work():
        before = eng.seqs[long_id].num_cached if long_id in eng.seqs else None
        streams_running = [i for i in ids if i in eng.seqs]
        # a stream's blocks this step: those it holds, or one more if its new token starts a block
        stream_blocks = max((len(eng.seqs[i].blocks) + 1 for i in streams_running), default=0)
        scores.clear()
        outs = eng.step()
        got = {o.request_id for o in outs if o.token_id is not None}
        if before is not None and long_id in eng.seqs and eng.seqs[long_id].prefilling:
            sliced += 1
            chunk = eng.seqs[long_id].num_cached - before
            assert chunk <= max(int(32 / (1 + before / history_tokens(text))), 32 // CHUNK_FLOOR_DIVISOR)
            shrunk += chunk < 32
            assert set(streams_running) <= got  # no stream waited on the prompt
            # What the step needs: the chunk over the prompt's blocks, each decode over the longest stream's.
            need = chunk * len(eng.seqs[long_id].blocks) * bs + len(streams_running) * stream_blocks * bs
            assert sum(scores) <= text.num_hidden_layers * text.num_attention_heads * need
        for o in outs:
            if o.token_id is not None:
                toks[o.request_id].append(o.token_id)
    assert sliced >= 10 and shrunk >= sliced // 2
    assert [toks[i] for i in ids + [long_id]] == want


def test_many_short_prompts_fill_the_step_while_streams_decode(model):
    """The slice is per prompt: with a stream decoding, several new prompts are prefilled in the same step
    (together past one slice), and every answer equals its answer alone."""
    shorts = [f"<|user|>Count to {k} and name a colour.<|end|><|assistant|>" for k in range(5)]
    want = [alone(model, PROMPT, 12)] + [alone(model, q, 3) for q in shorts]
    eng = Engine(model, num_blocks=512, max_tokens_per_step=2048, prefill_tokens_with_decodes=16)
    first = eng.add_request(PROMPT, params=SamplingParams(max_tokens=12))
    toks: dict[str, list[int]] = {first: []}
    for o in eng.step():  # the stream is decoding
        toks[o.request_id].append(o.token_id)
    ids = [eng.add_request(q, params=SamplingParams(max_tokens=3)) for q in shorts]
    toks.update({i: [] for i in ids})
    assert all(eng.seqs[i].prep.num_tokens <= 16 for i in ids) and sum(eng.seqs[i].prep.num_tokens for i in ids) > 16
    outs = eng.step()  # one step: the stream's token and every short prompt whole (one slice each)
    assert {o.request_id for o in outs if o.token_id is not None} == {first, *ids}
    for o in outs:
        toks[o.request_id].append(o.token_id)
    while eng.has_work():
        for o in eng.step():
            if o.token_id is not None:
                toks[o.request_id].append(o.token_id)
    assert [toks[i] for i in [first, *ids]] == want


def test_max_tokens_left_out_means_the_rest_of_the_context(model):
    eng = Engine(model, options=EngineOptions(num_blocks=64, max_model_len=40))
    prep = model.prepare(PROMPT)
    out = eng.generate([dict(prompt=prep, params=SamplingParams(max_tokens=None, ignore_eos=True))])[0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 40 - prep.num_tokens
    with pytest.raises(ValueError, match="--max-model-len"):
        eng.add_request(PROMPT, params=SamplingParams(max_tokens=40))


def test_max_model_len_is_lowered_to_what_the_pool_holds(model):
    eng = Engine(model, num_blocks=8, block_size=16)
    assert eng.max_model_len == 7 * 16 and "lowered" in eng.context_note
    assert Engine(model, num_blocks=1024, max_model_len=300).max_model_len == 300
    with pytest.raises(TypeError, match="unknown option"):
        Engine(model, num_blocks=8, max_batches=3)
