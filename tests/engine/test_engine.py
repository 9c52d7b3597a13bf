"""The engine equals the reference loop (`Model.generate_ids`, itself proven against transformers), token for
token, in every configuration: batched, chunked, preempted, prefix-cached, mixed adapters, past 4096 tokens."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

import phi4mm
from phi4mm.engine.engine import Engine, EngineBusy
from phi4mm.inputs.prepare import Prepared
from phi4mm.model.lora import LoraLinear, unmerge_adapters
from phi4mm.sampling import SamplingParams
from tests.conftest import scene, tone

N_NEW = 6


@pytest.fixture(scope="module")
def model(tiny_official):
    return phi4mm.load(tiny_official, dtype=torch.float32)


@pytest.fixture(scope="module")
def requests():
    """Text, image, audio and image+audio requests: all three adapters and both audio projectors."""
    return [
        dict(prompt="<|user|>Tell me a story about a fox.<|end|><|assistant|>"),
        dict(prompt="<|user|><|image_1|>What is this?<|end|><|assistant|>", images=[scene(448, 300, 1)]),
        dict(prompt="<|user|><|audio_1|>Transcribe the audio to text.<|end|><|assistant|>", audios=[tone(1.7, seed=2)]),
        dict(prompt="<|system|>Be brief.<|end|><|user|>Hi!<|end|><|assistant|>"),
        dict(prompt="<|user|><|image_1|><|audio_1|>Answer the question.<|end|><|assistant|>",
             images=[scene(640, 480, 3)], audios=[tone(2.3, seed=4)]),
    ]


@pytest.fixture(scope="module")
def expected(model, requests):
    return [model.generate_ids(r["prompt"], r.get("images"), r.get("audios"), max_new_tokens=N_NEW)
            for r in requests]


def _run(engine: Engine, requests, params=None) -> list[list[int]]:
    params = params or SamplingParams(max_tokens=N_NEW)
    out = engine.generate([dict(r, params=params) for r in requests])
    assert all(o["finish_reason"] in ("stop", "length") for o in out)
    scratch = 1 if engine.graphs is not None else 0  # the static decode path reserves one scratch block
    assert engine.pool.num_free == engine.pool.num_blocks - scratch  # every block back in the pool
    return [o["token_ids"] for o in out]


def test_batched_equals_reference(model, requests, expected):
    assert _run(Engine(model, num_blocks=512), requests) == expected


def test_one_at_a_time_equals_reference(model, requests, expected):
    eng = Engine(model, num_blocks=512)
    assert [_run(eng, [r])[0] for r in requests] == expected


def test_chunked_prefill_equals_reference(model, requests, expected):
    """A 61-token budget: long prompts are prefilled in many chunks between other requests' decodes."""
    assert _run(Engine(model, num_blocks=512, max_tokens_per_step=61), requests) == expected


@pytest.mark.parametrize("block_size", [1, 16])
def test_preemption_under_memory_pressure_equals_reference(model, requests, expected, block_size):
    """The pool holds every prompt but not every answer: decodes run out of blocks, the newest requests are
    preempted and later recomputed from their tokens."""
    lens = [model.prepare(r["prompt"], r.get("images"), r.get("audios")).num_tokens for r in requests]
    blocks = sum(-(-n // block_size) for n in lens) + 1
    eng = Engine(model, num_blocks=blocks, block_size=block_size, max_tokens_per_step=8192)
    assert _run(eng, requests) == expected
    assert eng.stats["preemptions"] > 0


def test_prefix_cache_hit_equals_miss(model, requests, expected):
    eng = Engine(model, num_blocks=512, block_size=4)
    first = _run(eng, requests[1:2])
    hits = eng.stats["prefix_hit_tokens"]
    second = _run(eng, requests[1:2])  # the same image asked again: its blocks are reused
    assert first == second == expected[1:2]
    assert eng.stats["prefix_hit_tokens"] > hits
    other = _run(eng, [dict(requests[1], images=[scene(448, 300, 9)])])  # a different image: no false hit
    assert other == [model.generate_ids(requests[1]["prompt"], [scene(448, 300, 9)], max_new_tokens=N_NEW)]


def test_media_key_comes_from_the_image_canvas_and_tells_images_apart(model, requests):
    import dataclasses

    from phi4mm.engine.runner import media_key
    prep = model.prepare(requests[1]["prompt"], requests[1]["images"])
    again = model.prepare(requests[1]["prompt"], requests[1]["images"])
    assert prep.images.digest and media_key(prep) == media_key(again)
    img = requests[1]["images"][0].copy()
    img.putpixel((3, 4), tuple(255 - v for v in img.getpixel((3, 4))))  # one pixel of one image
    assert media_key(model.prepare(requests[1]["prompt"], [img])) != media_key(prep)
    # Inputs built without a digest are keyed by their pixels, and still tell images apart.
    bare = dataclasses.replace(prep, images=dataclasses.replace(prep.images, digest=b""))
    other = model.prepare(requests[1]["prompt"], [img])
    bare_other = dataclasses.replace(other, images=dataclasses.replace(other.images, digest=b""))
    assert media_key(bare) not in (media_key(bare_other), media_key(prep))


def test_crossing_the_longrope_switch_equals_reference(model):
    torch.manual_seed(5)
    ids = model.tokenizer.encode("<|user|>") + torch.randint(0, 199000, (4088,)).tolist() + \
        model.tokenizer.encode("<|end|><|assistant|>")
    prep = Prepared(ids, None, None, None, "speech")
    want = model.generate_ids(prep, max_new_tokens=8)
    eng = Engine(model, num_blocks=600, max_tokens_per_step=1024)
    got = _run(eng, [dict(prompt=prep)], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert got[:len(want)] == want


def test_seeded_sampling_is_reproducible_across_batches(model, requests):
    p = SamplingParams(max_tokens=N_NEW, temperature=0.8, top_p=0.9, seed=11)
    alone = _run(Engine(model, num_blocks=512), requests[:1], p)
    together = _run(Engine(model, num_blocks=512), requests[:3], p)
    assert alone[0] == together[0]


def test_stress_random_requests_cancellations_and_preemption(model, requests, expected):
    rng = random.Random(0)
    eng = Engine(model, num_blocks=160, block_size=8, max_batch=6, max_tokens_per_step=64)
    ids, cancelled = {}, set()
    for k in range(14):
        i = rng.randrange(len(requests))
        ids[eng.add_request(**requests[i], params=SamplingParams(max_tokens=N_NEW))] = i
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    finished = set()
    steps = 0
    while eng.has_work():
        for out in eng.step():
            if out.token_id is not None:
                got[out.request_id].append(out.token_id)
            if out.finished:
                finished.add(out.request_id)
        steps += 1
        if steps in (3, 9):
            victim = rng.choice([r for r in ids if r not in finished and r not in cancelled])
            assert eng.cancel(victim)
            cancelled.add(victim)
    for rid, i in ids.items():
        if rid not in cancelled:
            assert got[rid] == expected[i], rid
    assert finished >= set(ids) - cancelled
    assert eng.pool.num_free == eng.pool.num_blocks and not eng.seqs


def test_stop_strings_and_stream_text(model, requests, expected):
    tok = model.tokenizer
    full = tok.decode(expected[0], skip_special_tokens=True)
    eng = Engine(model, num_blocks=256)
    out = eng.generate([dict(requests[0], params=SamplingParams(max_tokens=N_NEW))])[0]
    assert out["text"] == full
    if len(full) > 3:
        stop = full[2:4]
        cut = eng.generate([dict(requests[0], params=SamplingParams(max_tokens=N_NEW, stop=[stop]))])[0]
        assert cut["text"] == full[:full.find(stop)] and cut["finish_reason"] == "stop"


def test_bad_input(model, requests):
    eng = Engine(model, num_blocks=64, max_waiting=2)
    with pytest.raises(ValueError, match="holds 1008 tokens per request.*--max-model-len"):
        eng.add_request(Prepared([1] * 131072, None, None, None, "speech"))
    with pytest.raises(ValueError, match="max_tokens=5000 does not fit.*--max-model-len"):
        eng.add_request(requests[0]["prompt"], params=SamplingParams(max_tokens=5000))
    with pytest.raises(ValueError):
        eng.add_request(requests[0]["prompt"], params=SamplingParams(temperature=-1))
    eng.add_request(requests[0]["prompt"])
    eng.add_request(requests[0]["prompt"])
    with pytest.raises(EngineBusy, match="retry"):
        eng.add_request(requests[0]["prompt"])
    rid = next(iter(eng.seqs))
    assert eng.cancel(rid) and not eng.cancel("nope")
    list(eng.stream())
    assert eng.pool.num_free == eng.pool.num_blocks


def test_sampling_features_through_the_engine(model, requests):
    """min_tokens holds EOS back; logprobs come with each token; penalties run through the general path."""
    eng = Engine(model, num_blocks=256)
    rid = eng.add_request(requests[0]["prompt"], params=SamplingParams(max_tokens=4, logprobs=3, min_tokens=4,
                                                                        repetition_penalty=1.3))
    outs = [o for o in eng.stream() if o.request_id == rid and o.token_id is not None]
    assert len(outs) == 4 and all(o.token_id not in eng.eos for o in outs)
    assert all(o.logprob is not None and len(o.top_logprobs) == 3 for o in outs)
    greedy = model.generate_ids(requests[0]["prompt"], max_new_tokens=4)
    plain = Engine(model, num_blocks=256).generate([dict(requests[0], params=SamplingParams(max_tokens=4, logprobs=0))])
    assert plain[0]["token_ids"] == greedy  # the general path at temperature 0 is greedy too


@pytest.mark.parametrize("block_size", [4, 16])
def test_static_decode_path_equals_reference(model, requests, expected, block_size):
    """The CUDA-graph decode path (static buckets, masked adapters, scratch padding rows), run eagerly here."""
    eng = Engine(model, num_blocks=400, block_size=block_size, static_decode=True)
    assert _run(eng, requests) == expected
    assert eng.graphs.steps >= N_NEW - 1 and eng.graphs.graphs  # the decode steps went through the static path
    # One request at a time: each prompt alone in its step takes the padded static prefill (no prefix cache:
    # a hit would leave less than the whole prompt to compute).
    eng = Engine(model, num_blocks=400, block_size=block_size, static_decode=True, prefix_caching=False)
    assert [_run(eng, [r])[0] for r in requests] == expected
    assert eng.prefill_graphs.steps == len(requests) and eng.prefill_graphs.graphs
    # Alone, the audio and image requests decoded on one adapter each: its unmasked bucket, the same tokens.
    assert {k[2] for k in eng.graphs.graphs if k[3]} == {("speech",), ("vision",)}


def test_prefill_buckets_grow_linearly_past_256():
    from phi4mm.engine.graphs import prefill_bucket
    got = [prefill_bucket(n, 64) for n in (1, 64, 65, 200, 300, 512, 513, 1334, 2048)]
    assert got == [64, 64, 128, 256, 384, 512, 640, 1408, 2048]  # an image prompt of 1,334 pads to 1,408


def test_static_prefill_of_a_long_prompt_equals_eager(model):
    """A 700-token prompt takes the 768-token static bucket; its greedy answer equals the eager engine's."""
    ids = torch.randint(100, 1000, (700,), generator=torch.Generator().manual_seed(5)).tolist()
    req = [dict(prompt=Prepared(ids, None, None, None, "speech"))]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    eager = _run(Engine(model, num_blocks=400, max_tokens_per_step=1024), req, params)
    eng = Engine(model, num_blocks=400, max_tokens_per_step=1024, static_decode=True, prefix_caching=False)
    assert _run(eng, req, params) == eager
    assert [k[0] for k in eng.prefill_graphs.graphs] == [768]


@pytest.mark.parametrize("budget", [64, 8192])
def test_static_decode_under_preemption_and_chunking(model, requests, expected, budget):
    lens = [model.prepare(r["prompt"], r.get("images"), r.get("audios")).num_tokens for r in requests]
    eng = Engine(model, num_blocks=sum(-(-n // 8) for n in lens) + 2, block_size=8, max_tokens_per_step=budget,
                 static_decode=True)  # +2: one scratch block, one spare
    assert _run(eng, requests) == expected
    assert eng.graphs.steps > 0 and (budget == 64 or eng.stats["preemptions"] > 0)


def test_cancel_alone_still_reports(model, requests):
    eng = Engine(model, num_blocks=128)
    rid = eng.add_request(requests[0]["prompt"])
    eng.step()
    assert eng.cancel(rid) and eng.has_work()
    outs = list(eng.stream())
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "cancelled")]
    assert not eng.has_work() and eng.pool.num_free == eng.pool.num_blocks


def test_seeded_sampling_matches_the_reference_loop(model, requests):
    """Model.generate and the engine share one sampler: the same seed gives the same tokens."""
    p = SamplingParams(max_tokens=N_NEW, temperature=0.8, top_p=0.9, seed=11)
    want = model.generate_ids(requests[2]["prompt"], audios=requests[2]["audios"], max_new_tokens=N_NEW,
                              temperature=0.8, top_p=0.9, seed=11)
    assert _run(Engine(model, num_blocks=512), requests[:3], p)[2] == want
    assert model.generate_ids(requests[0]["prompt"], max_new_tokens=0) == []


AUDIO_PROMPT = "<|user|><|audio_1|>Transcribe the audio to text.<|end|><|assistant|>"


def test_audio_prompts_are_encoded_together(model, monkeypatch):
    """Waiting audio-only prompts share one conformer forward (clips of different lengths, padded and masked),
    and each still gets the reference loop's tokens."""
    import phi4mm.engine.runner as engine_mod
    reqs = [dict(prompt=AUDIO_PROMPT, audios=[tone(d, seed=i)]) for i, d in enumerate((1.1, 2.3, 0.7))]
    want = [model.generate_ids(r["prompt"], audios=r["audios"], max_new_tokens=N_NEW) for r in reqs]
    sizes, real = [], engine_mod.encode_audio_batch
    monkeypatch.setattr(engine_mod, "encode_audio_batch", lambda net, preps, *a: sizes.append(len(preps)) or
                        real(net, preps, *a))
    assert _run(Engine(model, num_blocks=512), reqs) == want
    assert sizes == [3]


def test_audio_encoder_failure_fails_only_its_requests(model, requests, monkeypatch):
    import phi4mm.engine.runner as engine_mod

    def boom(*a):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(engine_mod, "encode_audio_batch", boom)
    eng = Engine(model, num_blocks=512)
    out = eng.generate([dict(prompt=AUDIO_PROMPT, audios=[tone(1.0)], params=SamplingParams(max_tokens=3)),
                        dict(requests[0], params=SamplingParams(max_tokens=3))])
    assert out[0]["finish_reason"] == "error" and "audio encoder failed" in out[0]["error"]
    assert out[1]["finish_reason"] == "length" and len(out[1]["token_ids"]) == 3
    assert eng.pool.num_free == eng.pool.num_blocks and not eng.has_work()


def test_audio_encoder_out_of_memory_splits_the_batch(model, monkeypatch):
    """A batch of clips too big for the encoder's memory is encoded in halves; every request is answered."""
    import phi4mm.engine.runner as engine_mod
    reqs = [dict(prompt=AUDIO_PROMPT, audios=[tone(d, seed=i)]) for i, d in enumerate((1.1, 2.3, 0.7, 1.5, 0.9))]
    want = [model.generate_ids(r["prompt"], audios=r["audios"], max_new_tokens=N_NEW) for r in reqs]
    sizes = []
    monkeypatch.setattr(engine_mod, "encode_audio_batch", _oom_above(engine_mod.encode_audio_batch, 2, sizes))
    assert _run(Engine(model, num_blocks=512), reqs) == want
    assert sizes == [5, 2, 3, 1, 2]  # 5 fails, then 2 + (3 fails, then 1 + 2)


def _oom_above(real, most: int, sizes: list):
    """A stand-in for a batched encoder that runs out of memory on more than `most` prompts; records sizes."""
    def encode(net, preps, *a):
        sizes.append(len(preps))
        if len(preps) > most:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(net, preps, *a)
    return encode


IMAGE_PROMPT = "<|user|><|image_1|>What is this?<|end|><|assistant|>"


def test_image_prompts_are_encoded_together(model, monkeypatch):
    """Waiting image-only prompts share one SigLIP forward (images of different crop counts, padded), a repeated
    image is encoded once, a crop budget splits the batch, and each request gets the reference loop's tokens."""
    import phi4mm.engine.runner as engine_mod
    same = scene(448, 300, 1)
    reqs = [dict(prompt=IMAGE_PROMPT, images=[im]) for im in (same, scene(900, 600, 2), scene(640, 480, 3), same)]
    reqs.insert(2, dict(prompt="<|user|>Tell me a story about a fox.<|end|><|assistant|>"))
    want = [model.generate_ids(r["prompt"], r.get("images"), max_new_tokens=N_NEW) for r in reqs]
    sizes, real = [], engine_mod.encode_image_batch
    monkeypatch.setattr(engine_mod, "encode_image_batch", lambda net, preps, *a: sizes.append(len(preps)) or
                        real(net, preps, *a))
    assert _run(Engine(model, num_blocks=512), reqs) == want
    assert sizes == [3]  # three distinct images in one forward; the fourth request reused the first's
    crops = [model.prepare(IMAGE_PROMPT, images=[r["images"][0]]).images.pixel_values.shape[1] for r in reqs[:2]]
    sizes.clear()
    monkeypatch.setattr(engine_mod, "IMAGE_BATCH_CROPS", sum(crops))  # room for the first two images only
    assert _run(Engine(model, num_blocks=512), reqs) == want
    assert sizes == [2, 1]


def test_image_encoder_failure_and_out_of_memory(model, requests, monkeypatch):
    """A failing SigLIP batch fails its requests only; out of memory splits the batch in halves."""
    import phi4mm.engine.runner as engine_mod
    real = engine_mod.encode_image_batch

    def boom(*a):
        raise RuntimeError("the tower broke (simulated)")
    monkeypatch.setattr(engine_mod, "encode_image_batch", boom)
    eng = Engine(model, num_blocks=512)
    out = eng.generate([dict(prompt=IMAGE_PROMPT, images=[scene(300, 200, 9)], params=SamplingParams(max_tokens=3)),
                        dict(requests[0], params=SamplingParams(max_tokens=3))])
    assert out[0]["finish_reason"] == "error" and "image encoder failed" in out[0]["error"]
    assert out[1]["finish_reason"] == "length" and len(out[1]["token_ids"]) == 3
    assert eng.pool.num_free == eng.pool.num_blocks and not eng.has_work()
    reqs = [dict(prompt=IMAGE_PROMPT, images=[scene(300 + 50 * i, 200, 10 + i)]) for i in range(3)]
    want = [model.generate_ids(r["prompt"], r["images"], max_new_tokens=N_NEW) for r in reqs]
    sizes = []
    monkeypatch.setattr(engine_mod, "encode_image_batch", _oom_above(real, 1, sizes))
    assert _run(Engine(model, num_blocks=512), reqs) == want
    assert sizes == [3, 1, 2, 1, 1]  # 3 fails, then 1 + (2 fails, then 1 + 1)


def test_warmup_leaves_the_engine_clean(model, requests, expected):
    eng = Engine(model, num_blocks=256, static_decode=True)
    seconds = eng.warmup()
    assert isinstance(seconds, float) and seconds > 0
    assert eng.prefill_graphs.steps >= 1  # the lone prompt went through the static prefill
    assert {rows for rows, *_ in eng.graphs.graphs} == {1, 2}  # decode at batch 1 and batch 2 was prepared
    assert not eng.has_work() and not eng.seqs and all(v == 0 for v in eng.stats.values())
    assert eng.pool.num_free == eng.pool.num_blocks - 1  # all but the scratch block
    assert _run(eng, requests) == expected


def test_prepared_buckets_cover_every_batch_and_give_the_same_tokens(model, requests, expected):
    """warm_graphs() builds its buckets ahead of traffic (on a GPU: captures them); the steps that then use
    them give the tokens of the eager path, and no decode bucket is built during the run."""
    import time
    eng = Engine(model, num_blocks=256, max_batch=8, static_decode=True)
    keys = eng.graphs.warm_keys(512)
    assert {rows for rows, *_ in keys} == {1, 2, 4, 8}  # every batch bucket up to max_num_seqs
    assert {blocks for _, blocks, *_ in keys} == {16, 32}  # contexts up to 512 tokens in 16-token blocks
    # no adapter, the adapter slots (any mix), each adapter alone (no row masks)
    assert {(names, uniform) for _, _, names, uniform in keys} == \
        {((), False), (eng.graphs.adapter_names, False)} | {((a,), True) for a in eng.graphs.adapter_names}
    assert eng.graphs.warm(keys, time.monotonic() + 60) == len(keys)
    prompts = eng.prefill_graphs.warm_keys([None, "speech"])
    assert [t for t, a, _ in prompts if a is None] == [64, 128, 256, 384, 512, 640, 768, 896, 1024, 1152, 1280,
                                                       1408, 1536, 1664, 1792, 1920, 2048]
    assert eng.prefill_graphs.warm(prompts, time.monotonic() - 1) == 0  # a passed deadline builds nothing
    built = set(eng.graphs.graphs)
    assert _run(eng, requests) == expected
    assert {k for k in eng.graphs.graphs if k[1] <= 32} <= built
    assert eng.warm_graphs(time.monotonic() + 60) == (0, 0)  # off a GPU warm-up captures nothing


# ------------------------------------------------------------------------------------------------ merged LoRA
@pytest.fixture
def unmerged(model):
    """The module's model, with any merged adapter dropped afterwards (the copies live on its layers)."""
    yield model
    unmerge_adapters(model.net)


def _merged_uses(monkeypatch, eng: Engine) -> Counter:
    """Count linear calls on the engine's merged weights, by path: "eager" (the packed forward), "prefill" (the
    static prefill) and "decode" (the static decode step)."""
    merged, uses, where = {id(t) for t in eng._merged}, Counter(), ["eager"]
    real = torch.nn.functional.linear

    def linear(x, w, *a):
        uses[where[0]] += id(w) in merged
        return real(x, w, *a)
    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    for path, graphs in (("decode", eng.graphs), ("prefill", eng.prefill_graphs)):
        if graphs is not None:
            def forward(*a, _real=graphs._forward, _path=path):
                where[0] = _path
                try:
                    return _real(*a)
                finally:
                    where[0] = "eager"
            monkeypatch.setattr(graphs, "_forward", forward)
    return uses


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("adapter", ["speech", "vision"])
def test_merged_adapter_equals_reference(unmerged, requests, expected, monkeypatch, adapter, static):
    """A batch all on the merged adapter takes the merged weights in every path (packed eager forward, static
    prefill, static decode) and keeps the reference loop's tokens; a mixed batch (text, image, audio) takes
    base + LoRA and keeps them too."""
    model = unmerged
    if adapter == "speech":
        reqs = [{"prompt": AUDIO_PROMPT, "audios": [tone(d, seed=i)]} for i, d in enumerate((1.1, 2.3, 0.7))]
    else:
        reqs = [requests[1], requests[4], dict(requests[1], images=[scene(320, 200, 7)])]
    want = [model.generate_ids(r["prompt"], r.get("images"), r.get("audios"), max_new_tokens=N_NEW) for r in reqs]
    eng = Engine(model, num_blocks=512, static_decode=static, prefix_caching=False, merge_adapter=adapter)
    assert eng.merged_bytes == sum(t.numel() * 4 for t in eng._merged) > 0  # fp32 copies
    uses = _merged_uses(monkeypatch, eng)
    assert _run(eng, reqs) == want
    assert uses["eager"] > 0 and (uses["decode"] > 0) == static  # three prompts packed, then decodes
    if static:
        uses.clear()
        assert [_run(eng, [r])[0] for r in reqs] == want
        assert uses["prefill"] > 0 and uses["decode"] > 0  # each prompt alone: the static prefill
    uses.clear()
    assert _run(eng, requests) == expected
    # Every answer runs N_NEW tokens, so every step of the mixed batch mixes adapters: no merged weight used.
    assert all(len(e) == N_NEW for e in expected) and not uses.total()


def test_merge_adapter_unknown_name(model):
    with pytest.raises(ValueError, match=r"'nope'.*loaded: \['speech', 'vision'\]"):
        Engine(model, num_blocks=64, merge_adapter="nope")
    assert not any(m.merged for m in model.net.modules() if isinstance(m, LoraLinear))
