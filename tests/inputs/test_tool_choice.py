"""tool_choice as OpenAI defines it, enforced by constraining decoding: the pure constraint (sampling), its
construction from tools (inputs.tools), and real decoding with the micro model through the Python API and the
engine."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phi4mm.inputs.tools import (
    OPEN,
    ToolChoiceError,
    call_prefix,
    parse_tool_calls,
    tool_constraint,
    tool_names,
)
from phi4mm.sampling import SamplingParams, TokenConstraint, apply_constraints

TOOLS = json.loads((Path(__file__).parents[2] / "examples" / "tools.json").read_text())
COLDPLAY = [{"role": "user", "content": "I want to listen to Coldplay."}]


@pytest.fixture(scope="module")
def micro():
    import phi4mm
    from phi4mm.micro.recipe import default_model_dir
    return phi4mm.load(default_model_dir(), device="cpu")


def test_constraint_follows_the_prefixes_then_lets_go():
    c = TokenConstraint(prefixes=((5, 6, 7), (5, 8)))
    assert c.allowed_next([]) == {5}
    assert c.allowed_next([5]) == {6, 8}
    assert c.allowed_next([5, 6]) == {7}
    assert c.allowed_next([5, 8]) is None and c.allowed_next([5, 6, 7, 1]) is None  # past a whole prefix: free
    assert TokenConstraint(banned=frozenset({3})).allowed_next([]) is None


def test_apply_constraints_masks_only_constrained_rows():
    logits = torch.zeros(3, 10)
    params = [SamplingParams(constraint=TokenConstraint(prefixes=((4, 2),))), SamplingParams(),
              SamplingParams(constraint=TokenConstraint(banned=frozenset({0, 9})))]
    out = apply_constraints(logits, params, [[4], [], [1, 2]])
    assert out[0].argmax() == 2 and torch.isinf(out[0]).sum() == 9
    assert torch.equal(out[1], torch.zeros(10))
    assert torch.isinf(out[2][[0, 9]]).all() and torch.isfinite(out[2][1:9]).all()


def test_tool_constraint_builds_openai_semantics(micro):
    tok = micro.tokenizer
    assert tool_constraint(TOOLS, "auto", tok) == (TOOLS, None)
    assert tool_constraint(TOOLS, None, tok) == (TOOLS, None)
    tools, none = tool_constraint(TOOLS, "none", tok)
    assert tools == TOOLS and none.banned == {tok.token_id(OPEN)}
    _, req = tool_constraint(TOOLS, "required", tok)
    assert sorted(req.prefixes) == sorted(call_prefix(n, tok) for n in tool_names(TOOLS)) and len(req.prefixes) > 1
    picked, named = tool_constraint(TOOLS, {"type": "function", "function": {"name": "play_music"}}, tok)
    assert [t["function"]["name"] for t in picked] == ["play_music"]
    assert named.prefixes == (call_prefix("play_music", tok),)
    # The forced tokens decode to the call's opening and agree with how the tokenizer splits a whole call.
    prefix = call_prefix("play_music", tok)
    assert tok.decode(prefix) == '<|tool_call|>[{"name": "play_music", "arguments":'
    whole = tok.encode('<|tool_call|>[{"name": "play_music", "arguments": {"artist": "x"}}]<|/tool_call|>')
    assert tuple(whole[:len(prefix)]) == prefix
    with pytest.raises(ToolChoiceError, match="no tools"):
        tool_constraint(None, "required", tok)
    with pytest.raises(ToolChoiceError, match=", ".join(tool_names(TOOLS))):
        tool_constraint(TOOLS, {"type": "function", "function": {"name": "nope"}}, tok)
    with pytest.raises(ToolChoiceError, match="tool_choice"):
        tool_constraint(TOOLS, "sometimes", tok)


def test_calls_to_tools_not_offered_stay_content():
    text = '<|tool_call|>[{"name": "send_message", "arguments": {"to": "Carol"}}]<|/tool_call|>'
    content, calls = parse_tool_calls(text, offered={"search_web", "play_music"})
    assert calls == [] and "send_message" in content
    assert [c.name for c in parse_tool_calls(text)[1]] == ["send_message"]  # no list given: any name


def test_api_generate_honours_tool_choice(micro):
    def call(tool_choice, messages=COLDPLAY):
        return parse_tool_calls(micro.generate(messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=60))

    assert [c.name for c in call("auto")[1]] == ["play_music"]
    assert [c.name for c in call({"type": "function", "function": {"name": "search_web"}})[1]] == ["search_web"]
    content, calls = call("none")
    assert calls == [] and OPEN not in content and content
    # A question the micro model answers in words gets a call anyway when one is required.
    capital = [{"role": "user", "content": "Name a colour."}]
    assert parse_tool_calls(micro.generate(capital, max_tokens=30))[1] == []
    assert [c.name for c in call("required", capital)[1]][:1] in [[n] for n in tool_names(TOOLS)]


def test_engine_applies_the_same_constraint(micro):
    from phi4mm.engine.engine import Engine
    tools, named = tool_constraint(TOOLS, {"type": "function", "function": {"name": "search_web"}}, micro.tokenizer)
    params = SamplingParams(max_tokens=60, constraint=named)
    got = Engine(micro, num_blocks=256).generate([{"prompt": COLDPLAY, "tools": tools, "params": params}])[0]
    want = micro.generate_ids(COLDPLAY, tools=TOOLS, max_tokens=60,
                              tool_choice={"type": "function", "function": {"name": "search_web"}})
    assert got["token_ids"] == want
    assert [c.name for c in parse_tool_calls(got["text"])[1]] == ["search_web"]
