"""Chat templates: render a GGUF ``tokenizer.chat_template`` exactly as transformers' ``apply_chat_template``.

Templates come from model files, i.e. from strangers, so they run in Jinja2's immutable sandbox. The
environment matches the one transformers builds (trim_blocks, lstrip_blocks, loop controls, a ``tojson``
that does not HTML-escape, ``raise_exception`` and ``strftime_now``), so a template renders here byte for
byte as it does there.
"""

from __future__ import annotations

import json
import logging
import types
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidParameterError, LmapError

log = logging.getLogger("lmap")

__all__ = ["ChatTemplate", "ChatTemplateError", "CHATML_TEMPLATE"]

# The ChatML layout (Qwen, SmolLM, many fine-tunes) that llama-cpp-python's "chatml" format also produces;
# used when a model carries no template. List-of-parts content (OpenAI style) is joined from its text parts.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is iterable %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(LmapError):
    """A chat template failed to compile or render (or called ``raise_exception``)."""


def _raise_exception(message: str) -> None:
    # The template's own message, unchanged: templates use it to tell the user what they did wrong
    raise ChatTemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes <, >, & and ' and takes only indent; templates are written
    # against transformers' version, which is plain json.dumps with these options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, so templates cannot reach Python internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Namespace's own signature trick: `self` travels in args so `namespace(self=...)` still works
        self, rest = args[0], args[1:]
        for name in dict(*rest, **kwargs):
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed (leading underscore)")


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without handing them the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict[Any, Any]:
        return dict.fromkeys(keys, value)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    env.globals["dict"] = _Dict()
    return env


def _template_line(exc: BaseException, source: str) -> tuple[int | None, str]:
    """The template line an error happened on (from Jinja's rewritten traceback) and its text."""
    lineno = getattr(exc, "lineno", None)
    if not isinstance(exc, jinja2.TemplateSyntaxError):
        lineno = None
        tb: types.TracebackType | None = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<template>":
                lineno = tb.tb_lineno
            tb = tb.tb_next
    lines = source.splitlines()
    text = lines[lineno - 1].strip() if lineno and 0 < lineno <= len(lines) else ""
    if len(text) > 100:
        text = text[:97] + "..."
    return lineno, text


class ChatTemplate:
    """A compiled chat template (``template=None``: ChatML, with a warning).

    ``bos_token`` and ``eos_token`` are the token strings the template may insert (transformers passes
    them, with the other special tokens, as template variables).
    """

    def __init__(self, template: str | None, *, bos_token: str, eos_token: str) -> None:
        if template is None:
            log.warning("model has no chat template (tokenizer.chat_template); falling back to ChatML")
            template = CHATML_TEMPLATE
        if not isinstance(template, str):
            raise InvalidParameterError(f"template must be a string (Jinja2 source), got {type(template).__name__}")
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            lineno, text = _template_line(exc, template)
            raise ChatTemplateError(f"chat template syntax error at line {lineno}: {exc.message} (in: {text})") from exc

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], *, name: str | None = None) -> ChatTemplate:
        """The template of a GGUF file's metadata (``name``: a named variant, ``tokenizer.chat_template.NAME``).

        BOS/EOS strings come from ``tokenizer.ggml.tokens``; a missing template falls back to ChatML.
        """
        key = "tokenizer.chat_template" if name is None else f"tokenizer.chat_template.{name}"
        template = metadata.get(key)
        if name is not None and template is None:
            raise InvalidParameterError(f"chat template {name!r} not found: the model has no metadata key {key!r}")
        tokens = metadata.get("tokenizer.ggml.tokens") or []

        def token(id_key: str) -> str:
            i = metadata.get(id_key)
            return str(tokens[i]) if isinstance(i, int) and 0 <= i < len(tokens) else ""

        return cls(
            template, bos_token=token("tokenizer.ggml.bos_token_id"), eos_token=token("tokenizer.ggml.eos_token_id")
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for ``messages`` (dicts with a ``role``), as ``apply_chat_template(tokenize=False)``.

        Extra keyword arguments become template variables (``documents``, ``enable_thinking``, ...) and
        override ``bos_token``/``eos_token``.
        """
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
            raise InvalidParameterError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m:
                raise InvalidParameterError(f"messages[{i}] must be a dict with a 'role' key, got {m!r}")
        if tools is not None:
            for i, t in enumerate(tools):
                if not isinstance(t, Mapping):
                    raise InvalidParameterError(f"tools[{i}] must be a dict (a JSON schema), got {t!r}")
        variables: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "documents": None,
            **kwargs,
        }
        try:
            return self._template.render(
                messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt, **variables
            )
        except ChatTemplateError:
            raise
        except Exception as exc:
            lineno, text = _template_line(exc, self.source)
            where = f" at line {lineno}" if lineno else ""
            raise ChatTemplateError(
                f"chat template failed{where}: {type(exc).__name__}: {exc}" + (f" (in: {text})" if text else "")
            ) from exc
