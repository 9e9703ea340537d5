"""Chat templates: byte-for-byte parity with transformers' apply_chat_template, sandboxing and error reporting."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from lmap.chat import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from lmap.errors import InvalidParameterError, LmapError

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?\nTwo lines, <b>tags</b> & ünïcödé 🙂"},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four"},
    ],
    [{"role": "user", "content": ""}],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather at a place <now> & later, in °C",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

# Small templates that lean on what real templates use: whitespace control, tojson's options, namespace,
# loop controls, raise_exception, tools, strftime_now, bos/eos, the {% generation %} tag
FEATURE_TEMPLATES = {
    "whitespace": """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        <<SYS>> {{ message['content'] }} <</SYS>>
    {% else %}
        [{{ message['role'] | upper }}] {{ message['content'] | trim }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}""",
    "tojson": """{{ messages | tojson }}
{{ messages | tojson(indent=2) }}
{{ messages | tojson(sort_keys=true, separators=(',', ':')) }}
{{ tools | tojson(indent=4, ensure_ascii=true) }}
{{ "<b>é</b> & 'q'" | tojson }}""",
    "namespace": """{% set ns = namespace(n=0, last='') %}
{% for m in messages %}
{% if m.role == 'system' %}{% continue %}{% endif %}
{% set ns.n = ns.n + 1 %}{% set ns.last = m.role %}
{{ loop.index }}:{{ m.role }}:{{ m.content }}
{% if ns.n >= 3 %}{% break %}{% endif %}
{% endfor %}
count={{ ns.n }} last={{ ns.last }}{{ eos_token }}""",
    "tools": """{%- if tools %}
{{- '<tools>' }}
{%- for tool in tools %}
{{- '\\n' }}{{- tool | tojson }}
{%- endfor %}
{{- '\\n</tools>\\n' }}
{%- endif %}
{%- for message in messages %}
{{- '<|' + message.role + '|>' + message.content + '<|end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}""",
    "date": "Today is {{ strftime_now('%d %B %Y') }}.{% for m in messages %}{{ m.content }}{% endfor %}",
    "generation": """{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}A:{{ m.content }}
{% endgeneration %}{% else %}U:{{ m.content }}
{% endif %}{% endfor %}""",
    "dict": "{% set d = dict(a=1, b=[2, 3]) %}{{ d | tojson }}{{ d.a }}{{ messages | length }}",
}


def hf_render(template: str, messages: list[dict[str, Any]], *, bos: str, eos: str, **kwargs: Any) -> str:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, bos: 1, eos: 2} if bos != eos else {"<unk>": 0, bos: 1}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        bos_token=bos,
        eos_token=eos,
        chat_template=template,
    )
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


# --------------------------------------------------------------------------- parity with transformers


@pytest.mark.slow
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(smollm2_path: Path, conv: int, add_generation_prompt: bool) -> None:
    from lmap.gguf import GGUFFile

    md = GGUFFile(smollm2_path).metadata
    template = md["tokenizer.chat_template"]
    ct = ChatTemplate.from_metadata(md)
    assert (ct.bos_token, ct.eos_token) == ("<|im_start|>", "<|im_end|>")
    messages = CONVERSATIONS[conv]
    ours = ct.render(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_render(
        template, messages, bos=ct.bos_token, eos=ct.eos_token, add_generation_prompt=add_generation_prompt
    )
    assert ours.encode() == theirs.encode()


@pytest.mark.slow
def test_gemma3_gguf_has_no_template_and_falls_back_to_chatml(
    gemma3_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The Gemma 3 GGUF carries no tokenizer.chat_template, and no installed package ships the official
    # Gemma 3 template text, so there is nothing to compare byte for byte; check the fallback instead.
    from lmap.gguf import GGUFFile

    md = GGUFFile(gemma3_path).metadata
    assert "tokenizer.chat_template" not in md
    with caplog.at_level(logging.WARNING, logger="lmap"):
        ct = ChatTemplate.from_metadata(md)
    assert "ChatML" in caplog.text
    assert (ct.bos_token, ct.eos_token) == ("<bos>", "<eos>")
    assert ct.source == CHATML_TEMPLATE


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FEATURE_TEMPLATES))
@pytest.mark.parametrize("conv", [1, 2, 3])
def test_feature_templates_match_transformers(name: str, conv: int) -> None:
    template = FEATURE_TEMPLATES[name]
    messages = CONVERSATIONS[conv]
    for agp in (True, False):
        tools = TOOLS if name in ("tools", "tojson") else None
        ours = ChatTemplate(template, bos_token="<s>", eos_token="</s>").render(
            messages, add_generation_prompt=agp, tools=tools
        )
        theirs = hf_render(template, messages, bos="<s>", eos="</s>", add_generation_prompt=agp, tools=tools)
        assert ours.encode() == theirs.encode(), name


@pytest.mark.slow
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chatml_fallback_matches_transformers(conv: int) -> None:
    messages = CONVERSATIONS[conv]
    ours = ChatTemplate(None, bos_token="", eos_token="").render(messages)
    assert ours == hf_render(CHATML_TEMPLATE, messages, bos="<s>", eos="</s>", add_generation_prompt=True)


@pytest.mark.slow
def test_raise_exception_matches_transformers_message() -> None:
    import jinja2

    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    )
    messages = [{"role": "assistant", "content": "x"}]
    with pytest.raises(jinja2.TemplateError, match="^Conversation must start with user$"):
        hf_render(template, messages, bos="<s>", eos="</s>")
    with pytest.raises(ChatTemplateError, match="^Conversation must start with user$"):
        ChatTemplate(template, bos_token="<s>", eos_token="</s>").render(messages)


# --------------------------------------------------------------------------- behaviour


def test_chatml_fallback_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lmap"):
        ct = ChatTemplate(None, bos_token="", eos_token="")
    assert "no chat template" in caplog.text
    out = ct.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert out == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    parts = [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "b"},
    ]
    assert ct.render([{"role": "user", "content": parts}], add_generation_prompt=False) == (
        "<|im_start|>user\nab<|im_end|>\n"
    )


def test_syntax_error_names_the_line() -> None:
    src = "{% for m in messages %}\n{{ m.content }}\n{% if m.role %}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"line 4") as ei:
        ChatTemplate(src, bos_token="", eos_token="")
    assert isinstance(ei.value, LmapError)


def test_render_error_names_the_line() -> None:
    src = "{% for m in messages %}\n{{ m.content }}\n{{ m.content.nope() }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"line 3.*nope"):
        ChatTemplate(src, bos_token="", eos_token="").render([{"role": "user", "content": "x"}])


def test_sandbox_blocks_python_internals() -> None:
    for src in (
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__base__.__subclasses__() }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ messages.append(1) }}",
    ):
        try:
            out = ChatTemplate(src, bos_token="", eos_token="").render([{"role": "user", "content": "x"}])
        except ChatTemplateError:
            continue
        assert "class" not in out and "object" not in out


def test_messages_are_validated() -> None:
    ct = ChatTemplate("{{ messages | length }}", bos_token="", eos_token="")
    with pytest.raises(InvalidParameterError, match=r"messages\[1\]"):
        ct.render([{"role": "user", "content": "a"}, {"content": "no role"}])
    with pytest.raises(InvalidParameterError, match="messages"):
        ct.render("hello")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match=r"tools\[0\]"):
        ct.render([], tools=["get_weather"])  # type: ignore[list-item]


def test_kwargs_become_variables_and_override_specials() -> None:
    ct = ChatTemplate(
        "{{ bos_token }}|{{ eos_token }}|{{ enable_thinking }}|{{ documents }}|{{ add_generation_prompt }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert ct.render([]) == "<s>|</s>||None|True"
    assert ct.render([], enable_thinking=False, bos_token="B", add_generation_prompt=False) == "B|</s>|False|None|False"


def test_strftime_now() -> None:
    out = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}", bos_token="", eos_token="").render([])
    assert out == datetime.now().strftime("%Y-%m-%d")


def test_from_metadata_named_template_and_tokens() -> None:
    md = {
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{{ bos_token }}default",
        "tokenizer.chat_template.tool_use": "{{ eos_token }}tools",
    }
    assert ChatTemplate.from_metadata(md).render([]) == "<s>default"
    assert ChatTemplate.from_metadata(md, name="tool_use").render([]) == "</s>tools"
    with pytest.raises(InvalidParameterError, match="rag"):
        ChatTemplate.from_metadata(md, name="rag")
