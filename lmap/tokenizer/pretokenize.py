"""llama.cpp's BPE pre-tokenizers, by ``tokenizer.ggml.pre`` name, for two regex engines.

llama.cpp splits text with a list of regexes applied one after another: each regex
cuts every current piece into its matches and the gaps between them (what
``tokenizers`` calls the "isolated" split behaviour).  The regex strings below are
llama.cpp's, character for character (``llm_tokenizer_bpe`` in ``llama-vocab.cpp``);
for the common ones llama.cpp runs a hand-written scanner instead of the regex,
and those scanners were checked to give the regex's splits.

Two things make a textbook regex engine disagree with llama.cpp, and both are
handled when a pattern is translated for an engine:

* ``\\s`` -- llama.cpp's whitespace set is Unicode White_Space, which is also what
  Oniguruma (inside ``tokenizers``) and the ``regex`` module use, so ``\\s`` stays.
* ``\\p{L}``, ``\\p{N}``, ``\\p{P}`` -- llama.cpp's category table is Unicode 15.1,
  while Oniguruma ships 16.0 and ``regex`` 17.0.  Every code point whose category
  differs between them is one that was unassigned in 15.1 (checked exhaustively
  against llama.cpp's table), so subtracting :data:`ASSIGNED_AFTER_UNICODE_15_1`
  from those classes reproduces llama.cpp exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from ..errors import UnsupportedModelError

# Letters, numbers and punctuation first assigned in Unicode 16.0 or 17.0 (ranges
# are inclusive and contain no code point assigned in 15.1).  llama.cpp files them
# as "undefined", so they must not count as \p{L}/\p{N}/\p{P} here either.  If
# llama.cpp regenerates its tables for a newer Unicode, shrink this list.
ASSIGNED_AFTER_UNICODE_15_1: tuple[tuple[int, int], ...] = (
    (0x0088F, 0x0088F),
    (0x00C5C, 0x00C5C),
    (0x00CDC, 0x00CDC),
    (0x01B4E, 0x01B4F),
    (0x01B7F, 0x01B7F),
    (0x01C89, 0x01C8A),
    (0x0A7CB, 0x0A7CF),
    (0x0A7D2, 0x0A7D2),
    (0x0A7D4, 0x0A7D4),
    (0x0A7DA, 0x0A7F1),
    (0x105C0, 0x105F3),
    (0x10940, 0x10959),
    (0x10D40, 0x10D85),
    (0x10EC2, 0x10ED0),
    (0x11380, 0x113D8),
    (0x116D0, 0x116E3),
    (0x11BC0, 0x11BF9),
    (0x11DB0, 0x11DE9),
    (0x13460, 0x143FA),
    (0x16100, 0x16139),
    (0x16D40, 0x16D79),
    (0x16EA0, 0x16ED3),
    (0x16FF2, 0x16FF6),
    (0x187F8, 0x187FF),
    (0x18CFF, 0x18CFF),
    (0x18D09, 0x18DF2),
    (0x1CCF0, 0x1CCF9),
    (0x1E5D0, 0x1E6FF),
    (0x2B73A, 0x2B73F),
    (0x2CEA2, 0x2CEAD),
    (0x323B0, 0x33479),
)

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp pre-tokenizer type -> its regex list
_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "starcoder": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
}


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp pre-tokenizes and detokenizes for one ``tokenizer.ggml.pre`` value."""

    name: str  # the value of tokenizer.ggml.pre ("" when absent)
    kind: str  # key of _REGEXES
    clean_spaces: bool = True
    ignore_merges: bool = False
    add_bos: bool | None = None  # default for add_bos before tokenizer.ggml.add_bos_token overrides it
    bos_null: bool = False  # llama.cpp clears the default BOS id for this type

    @property
    def regexes(self) -> tuple[str, ...]:
        """llama.cpp's regexes, applied in order."""
        return _REGEXES[self.kind]


def _table() -> dict[str, PreTokenizer]:
    # (names, kind, options) in the order of llama_vocab::impl::load; only the types
    # whose regexes are above are listed.
    rows: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
        (("default",), "default", {}),
        (
            ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
            "llama3",
            {"ignore_merges": True, "add_bos": True},
        ),
        (("mpt", "olmo", "jais", "exaone4"), "gpt2", {}),
        (
            (
                "gpt-2",
                "phi-2",
                "jina-es",
                "jina-de",
                "gigachat",
                "jina-v2-es",
                "jina-v2-de",
                "a.x-4.0",
                "mellum",
                "modern-bert",
                "jina-v1-en",
                "jina-v2-code",
                "roberta-bpe",
            ),
            "gpt2",
            {},
        ),
        (("trillion", "granite-docling"), "gpt2", {"clean_spaces": False}),
        (("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"), "starcoder", {}),
        (("command-r", "smollm"), "starcoder", {"clean_spaces": False}),
        (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open"), "qwen2", {"clean_spaces": False}),
        (("stablelm2", "megrez"), "qwen2", {}),
        (("dbrx", "smaug-bpe"), "llama3", {}),
        (("chatglm-bpe",), "llama3", {"bos_null": True}),
        (("glm4", "glm5"), "llama3", {"bos_null": True, "ignore_merges": True}),
    ]
    return {name: PreTokenizer(name, kind, **opts) for names, kind, opts in rows for name in names}


PRE_TOKENIZERS: dict[str, PreTokenizer] = _table()


def pre_tokenizer_for(pre: str | None) -> PreTokenizer:
    """The pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre`` (absent means "default")."""
    if not pre:
        return PreTokenizer("", "default")
    try:
        return PRE_TOKENIZERS[pre]
    except KeyError:
        raise UnsupportedModelError(
            f"tokenizer.ggml.pre = {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        ) from None


# --- translating llama.cpp's regexes for an engine ---------------------------------

_CATEGORY = re.compile(r"\\p\{(\w+)\}")


def _translate(pattern: str, restricted: Callable[[str], str], union: Callable[[str, str], str], excluded: str) -> str:
    r"""Rewrite ``\p{L}``/``\p{N}``/``\p{P}`` in ``pattern`` so they exclude post-15.1 code points.

    ``restricted(cat)`` is the engine's spelling of "category ``cat`` minus the
    excluded ranges"; ``union(cls, ranges)`` the spelling of "class plus ranges".
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            m = _CATEGORY.match(pattern, i)
            if m:
                out.append(restricted(_category(m.group(1))))
                i = m.end()
            else:
                out.append(pattern[i : i + 2])
                i += 2
        elif c == "[":
            j = i + 1
            while pattern[j] != "]":  # llama.cpp's classes never nest; escapes skip a character
                j += 2 if pattern[j] == "\\" else 1
            body = pattern[i + 1 : j]
            cats = [_category(m.group(1)) for m in _CATEGORY.finditer(body)]
            if not cats:
                out.append(pattern[i : j + 1])
            elif body.startswith("^"):
                # [^... \p{X}] must also match the post-15.1 code points llama.cpp calls undefined
                out.append(union(pattern[i : j + 1], excluded))
            else:
                rest = _CATEGORY.sub("", body)
                out.append("[" + rest + "".join(restricted(cat) for cat in cats) + "]")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _category(name: str) -> str:
    if name not in ("L", "N", "P"):
        raise UnsupportedModelError(f"pre-tokenizer regex uses \\p{{{name}}}, which lmap does not translate")
    return name


@cache
def onig_pattern(pattern: str) -> str:
    """``pattern`` for Oniguruma (the engine behind ``tokenizers.Regex``)."""
    ranges = "".join(f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ASSIGNED_AFTER_UNICODE_15_1)
    return _translate(
        pattern,
        lambda cat: f"[\\p{{{cat}}}&&[^{ranges}]]",
        lambda cls, r: f"[{cls}{r}]",
        ranges,
    )


@cache
def regex_module_pattern(pattern: str) -> str:
    """``pattern`` for the ``regex`` module (compile with ``regex.V1`` for nested sets)."""
    ranges = "".join(f"\\U{a:08X}-\\U{b:08X}" for a, b in ASSIGNED_AFTER_UNICODE_15_1)
    return _translate(
        pattern,
        lambda cat: f"[\\p{{{cat}}}--[{ranges}]]",
        lambda cls, r: f"[{cls}{r}]",
        ranges,
    )


# --- GPT-2 byte-level alphabet ------------------------------------------------------


def _byte_to_unicode() -> list[str]:
    # printable Latin-1 bytes stand for themselves; the rest are shifted past U+00FF
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    for b in keep:
        table[b] = chr(b)
    n = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE: list[str] = _byte_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {ch: b for b, ch in enumerate(BYTE_TO_UNICODE)}
# str.translate table from byte-level characters to the Latin-1 character of their byte;
# other Latin-1 characters map to U+FFFF so that encoding the result as Latin-1 fails
# and the caller knows the text held a character outside the alphabet.
BYTE_DECODE_TABLE: dict[int, int] = {
    **{c: 0xFFFF for c in range(256)},
    **{ord(ch): b for ch, b in UNICODE_TO_BYTE.items()},
}
# bytes.translate-free encoder: Latin-1 character of a byte -> byte-level character
BYTE_ENCODE_TABLE: dict[int, str] = dict(enumerate(BYTE_TO_UNICODE))
