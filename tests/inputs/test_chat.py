"""Chat prompts: plain-Python rendering equals the official Jinja template (jinja2 and transformers)."""
from __future__ import annotations

import json

import pytest

from phi4mm.inputs.chat import (
    ChatError,
    flatten_content,
    prepare_messages,
    render_prompt,
)
from phi4mm.inputs.tokenizer import CHAT_TEMPLATE

TOOLS = [{"name": "get_weather", "description": "Weather for a city, ünïcode ok",
          "parameters": {"city": {"type": "str", "description": "City", "default": "London"}}}]

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "multi_turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello\nthere"},
        {"role": "assistant", "content": "Hi! 😀"},
        {"role": "user", "content": "中文？"},
    ],
    "tool_result": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "content": '{"temp": 21}'},
    ],
    "empty_content": [{"role": "user", "content": ""}],
}


def jinja_render(messages, add_generation_prompt: bool) -> str:
    jinja2 = pytest.importorskip("jinja2")
    # transformers renders chat templates with these options; the template has no whitespace to trim anyway.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HF
    from tokenizers.models import BPE
    # The template does not depend on the vocabulary: a one-token tokenizer keeps this test fast.
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=HF(BPE(vocab={"a": 0}, merges=[])),
                                               eos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def references(messages, add_generation_prompt, hf_tokenizer) -> tuple[str, str]:
    a = jinja_render(messages, add_generation_prompt)
    b = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return a, b


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_matches_official_template(name, gen, hf_tokenizer):
    msgs = CONVERSATIONS[name]
    ours = render_prompt(msgs, add_generation_prompt=gen)
    assert (ours, ours) == references(msgs, gen, hf_tokenizer)
    assert ours.endswith("<|assistant|>" if gen else "<|end|><|endoftext|>")


def test_tools_in_existing_system_message(hf_tokenizer):
    msgs = [{"role": "system", "content": "You have tools."}, {"role": "user", "content": "Weather in Paris?"}]
    ours = render_prompt(msgs, tools=TOOLS)
    ref_msgs = [{**msgs[0], "tools": json.dumps(TOOLS, ensure_ascii=False)}, msgs[1]]
    assert (ours, ours) == references(ref_msgs, True, hf_tokenizer)
    assert ours.startswith('<|system|>You have tools.<|tool|>[{"name": "get_weather"')
    assert "ünïcode" in ours


def test_tools_without_system_adds_empty_one(hf_tokenizer):
    msgs = [{"role": "user", "content": "Weather?"}]
    ours = render_prompt(msgs, tools=TOOLS)
    ref = [{"role": "system", "content": "", "tools": json.dumps(TOOLS, ensure_ascii=False)}, *msgs]
    assert (ours, ours) == references(ref, True, hf_tokenizer)
    assert ours.startswith("<|system|><|tool|>[")


def test_openai_tool_wrappers_are_unwrapped():
    wrapped = [{"type": "function", "function": TOOLS[0]}]
    msgs = [{"role": "user", "content": "x"}]
    assert render_prompt(msgs, tools=wrapped) == render_prompt(msgs, tools=TOOLS)


def test_tools_already_in_system_message(hf_tokenizer):
    spec = json.dumps(TOOLS)
    msgs = [{"role": "system", "content": "S", "tools": spec}, {"role": "user", "content": "U"}]
    assert (render_prompt(msgs),) * 2 == references(msgs, True, hf_tokenizer)
    # A list instead of the template's string is serialised the same way as tools=...
    as_list = [{"role": "system", "content": "S", "tools": TOOLS}, {"role": "user", "content": "U"}]
    assert render_prompt(as_list) == render_prompt([{"role": "system", "content": "S"}, msgs[1]], tools=TOOLS)
    with pytest.raises(ChatError, match="pass them once"):
        render_prompt(msgs, tools=TOOLS)


def test_assistant_tool_calls_rendered(hf_tokenizer):
    msgs = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        ]},
        {"role": "tool", "tool_call_id": "c0", "content": "18C"},
        {"role": "tool", "tool_call_id": "c1", "content": "24C"},
    ]
    ours = render_prompt(msgs)
    call_text = ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                 '{"name": "get_weather", "arguments": {"city": "Rome"}}]<|/tool_call|>')
    ref = [msgs[0], {"role": "assistant", "content": call_text}, *msgs[2:]]
    assert (ours, ours) == references(ref, True, hf_tokenizer)
    assert "<|tool|>18C<|end|><|tool|>24C<|end|><|assistant|>" in ours


def test_images_and_audio(hf_tokenizer):
    msgs = [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
            {"type": "image", "image": "PIL-object"},
            {"type": "text", "text": "Compare these."},
        ]},
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "text", "text": "Transcribe, then describe "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
            {"type": "audio", "audio": ("array", 16000)},
        ]},
    ]
    prompt, images, audios = prepare_messages(msgs)
    assert prompt == ("<|user|><|image_1|><|image_2|>Compare these.<|end|><|assistant|>Two cats.<|end|>"
                      "<|user|><|audio_1|>Transcribe, then describe <|image_3|><|audio_2|><|end|><|assistant|>")
    assert images == ["https://x/a.png", "PIL-object", "data:image/png;base64,AAA"]
    assert audios == [{"data": "UklGRg==", "format": "wav"}, ("array", 16000)]
    flat, _, _ = flatten_content(msgs)
    assert (prompt, prompt) == references(flat, True, hf_tokenizer)
    assert render_prompt(msgs) == prompt
    assert isinstance(msgs[0]["content"], list), "the caller's messages must not be modified"


def test_transformers_style_media_parts():
    msgs = [{"role": "user", "content": [{"type": "image", "url": "u.png"}, {"type": "audio", "path": "a.wav"},
                                         "plain str part"]}]
    flat, images, audios = flatten_content(msgs)
    assert flat[0]["content"] == "<|image_1|><|audio_1|>plain str part"
    assert (images, audios) == (["u.png"], ["a.wav"])


@pytest.mark.parametrize("messages, match", [
    ("not a list", "must be a list"),
    (["not a dict"], r"messages\[0\] must be a dict"),
    ([{"role": "wizard", "content": "x"}], "role 'wizard'"),
    ([{"role": "system", "content": "x", "tools": 5}], "tools must be a list"),
    ([{"content": "x"}], "role None"),
    ([{"role": "user", "content": 42}], "must be a str or a list of parts"),
    ([{"role": "user", "content": None}], "has no content"),
    ([{"role": "user", "content": [{"type": "hologram", "hologram": "h.obj"}]}], "unknown type 'hologram'"),
    ([{"role": "user", "content": [{"text": "no type"}]}], "'type' field"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "str 'text' field"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"uri": "x"}}]}], "needs a 'url'"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "needs a 'input_audio' field"),
])
def test_bad_messages(messages, match):
    with pytest.raises(ChatError, match=match):
        render_prompt(messages)


def test_bad_tools_and_calls():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatError, match="tools must be a list"):
        render_prompt(msgs, tools={"name": "f"})  # type: ignore[arg-type]
    with pytest.raises(ChatError, match=r"tools\[0\] must be a dict"):
        render_prompt(msgs, tools=["f"])  # type: ignore[list-item]
    with pytest.raises(ChatError, match="needs a function name"):
        render_prompt([*msgs, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}])
    with pytest.raises(ChatError, match="tool_calls must be a list"):
        render_prompt([*msgs, {"role": "assistant", "content": "", "tool_calls": {"name": "f"}}])


def test_developer_role_renders_as_system():
    assert render_prompt([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == \
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"
