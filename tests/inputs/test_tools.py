"""Tool-call parsing: formats Phi-4 actually writes, malformed output, and streaming == whole-text parsing."""
from __future__ import annotations

import json
import random

import pytest

from phi4mm.inputs.tools import (
    ContentDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamParser,
    collect,
    parse_tool_calls,
)

NESTED = {"query": {"filters": [{"field": "tag", "in": ["a", "b"]}, {"range": [1, 2.5, None]}], "deep": {"x": {}}},
          "text": "brackets } ] { [ and \"quotes\" and <|tool_call|> inside a string", "emoji": "😀"}

CASES = {
    "list_closed": 'Sure. <|tool_call|>[{"name": "f", "arguments": {"a": 1}}]<|/tool_call|>',
    "object_unclosed": '<|tool_call|>{"name": "f", "arguments": {"a": [1, 2]}}',
    "parameters_key": '<|tool_call|>[{"name": "g", "parameters": {"city": "Paris"}}]<|/tool_call|>',
    "string_arguments": '<|tool_call|>[{"name": "g", "arguments": "{\\"city\\": \\"Rome\\"}"}]<|/tool_call|>',
    "nested": f'<|tool_call|>[{{"name": "search", "arguments": {json.dumps(NESTED)}}}]<|/tool_call|> done',
    "parallel_list": '<|tool_call|>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": [[]]}}]',
    "parallel_objects": '<|tool_call|>{"name": "a", "arguments": {}},\n{"name": "b", "arguments": {}}<|/tool_call|>',
    "several_blocks": ('First <|tool_call|>[{"name": "a", "arguments": {}}]<|/tool_call|> then '
                       '<|tool_call|>{"name": "b", "arguments": {"k": "v"}}<|/tool_call|> end'),
    "unclosed_then_text": '<|tool_call|>[{"name": "a", "arguments": {}}]\nAnything else?',
    "no_arguments": '<|tool_call|>{"name": "ping"}<|/tool_call|>',
    "with_id": '<|tool_call|>{"id": "xyz", "name": "ping"}<|/tool_call|>',
    "malformed_json": 'Hmm <|tool_call|>{"name": "f", "arguments": {oops}}<|/tool_call|> sorry',
    "no_name": '<|tool_call|>[{"arguments": {}}]<|/tool_call|>',
    "truncated": 'Calling <|tool_call|>[{"name": "f", "arguments": {"a": ',
    "tag_only": "text <|tool_call|>",
    "not_json_after_tag": "<|tool_call|>get_weather(city='Paris')<|/tool_call|>",
    "malformed_then_good": '<|tool_call|>{bad}<|tool_call|>{"name": "ok", "arguments": {"n": 1}}',
    "plain": "Just an answer with < and <| and <|tool but no call. 中文 😀",
    "bad_second_value": '<|tool_call|>{"name": "a"}, {"nope": 1} trailing',
    "empty_list": "<|tool_call|>[]<|/tool_call|>",
}

EXPECTED = {
    "list_closed": ("Sure. ", [("f", {"a": 1})]),
    "object_unclosed": ("", [("f", {"a": [1, 2]})]),
    "parameters_key": ("", [("g", {"city": "Paris"})]),
    "string_arguments": ("", [("g", {"city": "Rome"})]),
    "nested": (" done", [("search", NESTED)]),
    "parallel_list": ("", [("a", {}), ("b", {"x": [[]]})]),
    "parallel_objects": ("", [("a", {}), ("b", {})]),
    "several_blocks": ("First  then  end", [("a", {}), ("b", {"k": "v"})]),
    "unclosed_then_text": ("\nAnything else?", [("a", {})]),
    "no_arguments": ("", [("ping", {})]),
    "with_id": ("", [("ping", {})]),
    "malformed_json": (CASES["malformed_json"], []),
    "no_name": (CASES["no_name"], []),
    "truncated": (CASES["truncated"], []),
    "tag_only": (CASES["tag_only"], []),
    "not_json_after_tag": (CASES["not_json_after_tag"], []),
    "malformed_then_good": ("<|tool_call|>{bad}", [("ok", {"n": 1})]),
    "plain": (CASES["plain"], []),
    "bad_second_value": (', {"nope": 1} trailing', [("a", {})]),
    "empty_list": (CASES["empty_list"], []),
}


def _summary(calls: list[ToolCall]) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse(name):
    content, calls = parse_tool_calls(CASES[name])
    want_content, want_calls = EXPECTED[name]
    assert content == want_content
    assert _summary(calls) == want_calls
    assert [c.id for c in calls] == (["xyz"] if name == "with_id" else [f"call_{i}" for i in range(len(calls))])


def test_arguments_are_json_strings_that_round_trip():
    _, calls = parse_tool_calls(CASES["nested"])
    assert isinstance(calls[0].arguments, str) and json.loads(calls[0].arguments) == NESTED
    assert "😀" in calls[0].arguments  # not \\u-escaped


def _stream(text: str, chunks: list[int]) -> list:
    parser = ToolCallStreamParser()
    events, at = [], 0
    for size in chunks:
        events += parser.feed(text[at:at + size])
        at += size
    assert at >= len(text)
    return events + parser.finish()


@pytest.mark.parametrize("name", sorted(CASES))
def test_stream_one_char_at_a_time(name):
    text = CASES[name]
    assert collect(_stream(text, [1] * len(text))) == parse_tool_calls(text)


@pytest.mark.parametrize("name", sorted(CASES))
def test_stream_random_chunks(name):
    text = CASES[name]
    rng = random.Random(name)
    for _ in range(20):
        sizes = [rng.randint(1, 9) for _ in range(len(text))]
        assert collect(_stream(text, sizes)) == parse_tool_calls(text)


@pytest.fixture(scope="module")
def tok():
    from phi4mm.inputs.tokenizer import Tokenizer
    return Tokenizer.build()


@pytest.mark.parametrize("name", ["list_closed", "nested", "several_blocks", "unclosed_then_text", "malformed_json",
                                  "parallel_objects", "plain"])
def test_stream_one_token_at_a_time(tok, name):
    # Real decoding: tokens of the model's output, each turned into text by the streaming detokenizer.
    # (Compare with the decoded text: the rstrip tool tags swallow a following space when encoding.)
    ids = tok.encode(CASES[name])
    dec, parser, events = tok.stream_decoder(), ToolCallStreamParser(), []
    for tid in ids:
        events += parser.feed(dec.push(tid))
    events += parser.feed(dec.flush()) + parser.finish()
    assert collect(events) == parse_tool_calls(tok.decode(ids))
    assert [c.name for c in collect(events)[1]] == [n for n, _ in EXPECTED[name][1]]


def test_stream_releases_content_early_and_calls_when_complete():
    parser = ToolCallStreamParser()
    assert parser.feed("Hello <") == [ContentDelta("Hello ")]  # "<" might start the tag: held back
    assert parser.feed("b") == [ContentDelta("<b")]
    assert parser.feed(" <|tool_call|>{\"name\": \"f\", \"arguments\": {\"a\"") == [ContentDelta(" ")]
    assert parser.feed(": 1}}") == [ToolCallDelta(0, "call_0", "f", '{"a": 1}')]  # object closed: emitted
    # A list is read when it closes (its calls stand or fall together, as in the whole-text parse).
    assert parser.feed(", [{\"name\": \"g\"}") == []
    assert parser.feed("]<|/tool_call|>ok") == [ToolCallDelta(1, "call_1", "g", "{}"), ContentDelta("ok")]
    assert parser.finish() == []
    assert parser.finish() == []
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("x")


def test_id_prefix():
    _, calls = parse_tool_calls(CASES["parallel_list"], id_prefix="call_req7_")
    assert [c.id for c in calls] == ["call_req7_0", "call_req7_1"]


def test_bad_input_type():
    with pytest.raises(TypeError, match="decoded output text"):
        parse_tool_calls(b"<|tool_call|>")  # type: ignore[arg-type]


def test_stream_equals_whole_on_random_fragments():
    # Property check: glue fragments that stress every state (tags, partial tags, brackets, commas).
    frags = ["<|tool_call|>", "<|/tool_call|>", '{"name": "f", "arguments": {"a": [1]}}', '{"name": "g"}', "[",
             "]", ",", " ", "\n", "text", "<", "<|", "{bad", '"str}"', "}", "😀", "<|tool"]
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(frags) for _ in range(rng.randint(1, 12)))
        whole = parse_tool_calls(text)
        assert collect(_stream(text, [1] * len(text))) == whole, text
        assert collect(_stream(text, [rng.randint(1, 6) for _ in text])) == whole, text
