"""The vocabulary as llama.cpp loads it: token attributes, special ids and the end-of-generation set.

Follows ``llama_vocab::impl::load``: defaults per tokenizer model, metadata
overrides, the detection of EOT/EOM/FIM tokens by their text, the "unused"
marking, the EOG set with its model-specific exceptions, and the list of tokens
that are matched literally in text.
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import UnsupportedModelError
from ..string_array import StringArray
from .pretokenize import PreTokenizer, pre_tokenizer_for
from .specials import LSTRIP, PARSE_ONLY, RSTRIP


class TokenType(enum.IntEnum):
    """A token's type as stored in ``tokenizer.ggml.token_type``."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class TokenAttr(enum.IntFlag):
    """llama.cpp's per-token attribute bits (``llama_token_attr``)."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# token type -> attribute, indexed by type clipped to 0..7 (types outside 0..6 become UNDEFINED)
_TYPE_TO_ATTR = np.array([0, 4, 1, 8, 16, 2, 32, 0], dtype=np.uint16)

# Candidate texts, in llama.cpp's order.  llama.cpp takes the first candidate it meets
# while walking a hash map, which has no portable order; lmap takes the first in this
# list, which agrees whenever the vocabulary holds only one of them.
_EOT_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = (
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
)
_FIM_SUF_TEXTS = (
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
)
_FIM_MID_TEXTS = (
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
)
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
# every token with one of these texts ends generation
_EOG_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
)

_K = "tokenizer.ggml."

# The attribute bits as plain ints: an IntFlag operation builds an enum member (~1.5 us), and
# gemma3's vocabulary takes ~40k of them to find its 6 400 special tokens.
_UNKNOWN, _UNUSED, _NORMAL, _CONTROL, _USER_DEFINED, _LSTRIP, _RSTRIP = (
    int(a)
    for a in (
        TokenAttr.UNKNOWN,
        TokenAttr.UNUSED,
        TokenAttr.NORMAL,
        TokenAttr.CONTROL,
        TokenAttr.USER_DEFINED,
        TokenAttr.LSTRIP,
        TokenAttr.RSTRIP,
    )
)


class Vocab:
    """Tokens, their attributes and the special ids of one GGUF vocabulary."""

    def __init__(self, md: Mapping[str, Any]) -> None:
        model = md.get(_K + "model")
        if model is None:
            raise UnsupportedModelError(f"metadata has no {_K}model: this GGUF carries no tokenizer")
        if model not in ("gpt2", "llama"):
            raise UnsupportedModelError(f"{_K}model = {model!r} is not supported (supported: 'gpt2', 'llama')")
        self.model: str = model
        self.is_spm = model == "llama"
        self.pre_name: str = md.get(_K + "pre") or ""

        tokens = md.get(_K + "tokens")
        if not isinstance(tokens, list | StringArray) or not len(tokens):
            raise UnsupportedModelError(f"{_K}tokens is missing or empty")
        n = len(tokens)
        self.n_vocab = n
        self._t2i: dict[str, int] | None = None  # built only for Hugging Face's BPE engine
        # Packed, not a list and a dict: merges run compiled over the texts' bytes, left in the
        # GGUF file's map (gemma3's vocabulary takes 4.4 MiB of anonymous memory, not 50: hash
        # table, offsets and attributes; SmolLM2's is built in ~1 ms, not 8)
        texts = tokens if isinstance(tokens, StringArray) else StringArray.from_strings(tokens)
        if np.any(np.diff(texts.offsets) == texts.gap):  # llama.cpp names empty tokens so that they stay distinct
            texts = StringArray.from_strings([t or f"[EMPTY_{i}]" for i, t in enumerate(texts)])
        self.tokens: StringArray = texts
        tokens = self.tokens
        token_id = self.token_id

        types = md.get(_K + "token_type")
        if types is None:
            type_arr = np.full(n, TokenType.NORMAL, dtype=np.int32)
        else:
            # GGUFFile's arrays are read-only views of its map (file-backed pages): used, not copied
            type_arr = np.asarray(types, dtype=np.int32)
            if type_arr.shape[0] < n:
                raise UnsupportedModelError(f"{_K}token_type has {type_arr.shape[0]} entries for {n} tokens")
            type_arr = type_arr[:n]
        self.types = type_arr
        attr_arr = _TYPE_TO_ATTR[np.clip(type_arr, 0, len(_TYPE_TO_ATTR) - 1)]

        scores = md.get(_K + "scores")
        if scores is not None and len(scores) < n:
            raise UnsupportedModelError(f"{_K}scores has {len(scores)} entries for {n} tokens")
        # float32, as llama.cpp keeps them: the compiled SPM merges compare them
        self.scores: np.ndarray = np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32)[:n]

        # defaults that depend on the tokenizer model, before metadata overrides them
        self.pre: PreTokenizer | None = None
        if self.is_spm:
            bos, eos, unk = 1, 2, 0
            self.add_space_prefix = True
            self.clean_spaces = False
            self.add_bos, self.add_eos = True, False
        else:
            pre = pre_tokenizer_for(self.pre_name)
            self.pre = pre
            bos, eos, unk = 11, 11, None
            self.add_space_prefix = False
            self.clean_spaces = pre.clean_spaces
            self.add_bos = bool(pre.add_bos)
            self.add_eos = False
            if pre.bos_null:
                bos = None
        v = md.get(_K + "add_space_prefix")
        if v is not None:
            self.add_space_prefix = bool(v)

        ids: dict[str, int | None] = {
            "bos": bos,
            "eos": eos,
            "eot": None,
            "eom": None,
            "unknown": unk,
            "seperator": None,
            "padding": None,
            "mask": None,
            "fim_pre": None,
            "fim_suf": None,
            "fim_mid": None,
            "fim_pad": None,
            "fim_rep": None,
            "fim_sep": None,
        }
        for name in ids:
            default = ids[name]
            if default is not None and default >= n:
                ids[name] = default = None
            for key in (name, *{"fim_pre": ("prefix",), "fim_suf": ("suffix",), "fim_mid": ("middle",)}.get(name, ())):
                value = md.get(f"{_K}{key}_token_id")
                if value is not None and 0 <= int(value) < n:
                    ids[name] = int(value)
        for key, attr in (("add_bos_token", "add_bos"), ("add_eos_token", "add_eos")):
            v = md.get(_K + key)
            if v is not None:
                setattr(self, attr, bool(v))

        # 10 bits in C shorts, made without a list of ints: 0.5 MiB for gemma3, not 2 MiB
        attrs = array("H")
        attrs.frombytes(memoryview(attr_arr).cast("B"))
        touched: set[int] = set()  # ids whose attributes differ from their declared type

        def set_attr(tid: int, value: int) -> None:
            attrs[tid] = value
            touched.add(tid)

        for name, texts in (
            ("eot", _EOT_TEXTS),
            ("eom", _EOM_TEXTS),
            ("fim_pre", _FIM_PRE_TEXTS),
            ("fim_suf", _FIM_SUF_TEXTS),
            ("fim_mid", _FIM_MID_TEXTS),
            ("fim_pad", _FIM_PAD_TEXTS),
            ("fim_rep", _FIM_REP_TEXTS),
            ("fim_sep", _FIM_SEP_TEXTS),
        ):
            if ids[name] is None:
                for text in texts:
                    tid = token_id(text)
                    if tid is not None:
                        ids[name] = tid
                        set_attr(tid, attrs[tid] | _CONTROL)
                        break

        # control tokens named "...unused..." are unused (gemma's <unused0> and the like)
        for tid in {*np.flatnonzero(attr_arr & _CONTROL).tolist(), *touched}:
            if attrs[tid] & _CONTROL and "unused" in tokens[tid]:
                set_attr(tid, attrs[tid] | _UNUSED)

        eog: set[int] = {t for t in (ids["fim_pad"], ids["fim_rep"], ids["fim_sep"]) if t is not None}
        for text in _EOG_TEXTS:
            tid = token_id(text)
            if tid is not None:
                eog.add(tid)
                set_attr(tid, attrs[tid] | _CONTROL)
        # gpt-oss: these render even without special=True
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            tid = token_id(text)
            if tid is not None:
                set_attr(tid, _USER_DEFINED)
        for name in ("eos", "eot", "eom"):
            tid = ids[name]
            if tid is not None:
                eog.add(tid)
        eog_texts = {tokens[t]: t for t in eog}
        # o200k_harmony and solar-open: "<|end|>" separates turns there, it does not end generation
        has_call = "<|call|>" in eog_texts or "<|calls|>" in eog_texts
        if "<|end|>" in eog_texts and has_call and ("<|return|>" in eog_texts or "<|flush|>" in eog_texts):
            end_id = eog_texts["<|end|>"]
            eog.discard(end_id)
            set_attr(end_id, _USER_DEFINED)
        # gemma4 and plamo have an ordinary "</s>"
        if "</s>" in eog_texts and ("<|tool_response>" in eog_texts or "<|plamo:eos|>" in eog_texts):
            s_id = eog_texts["</s>"]
            eog.discard(s_id)
            set_attr(s_id, _NORMAL)

        # tokens matched literally in text, longest first (ties by id; llama.cpp's sort leaves them unordered)
        literal = _CONTROL | _USER_DEFINED | _UNKNOWN
        cand = sorted(t for t in {*np.flatnonzero(attr_arr & literal).tolist(), *touched} if attrs[t] & literal)

        # phi-3 strips the whitespace to the right of its special tokens (set after the list above, as llama.cpp)
        general_name = str(md.get("general.name", "")).lower()
        if "phi-3" in general_name or "phi3" in general_name:
            for tid in cand:
                set_attr(tid, attrs[tid] | _RSTRIP)
            for text, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                tid = token_id(text)
                if tid is not None:
                    set_attr(tid, attrs[tid] | _RSTRIP if on else attrs[tid] & ~_RSTRIP)

        # ids and flag bits, not objects (gemma3 has 6 414): see lmap.tokenizer.specials
        cand_ids = np.asarray(cand, dtype=np.int64)
        o = tokens.offsets
        by_length = np.argsort(o[cand_ids] - o[cand_ids + 1], kind="stable")  # longest first, then by id
        self.special_ids = cand_ids[by_length].astype(np.int32)
        self.special_flags = np.array(
            [
                (PARSE_ONLY if a & (_CONTROL | _UNKNOWN) else 0)
                | (LSTRIP if a & _LSTRIP else 0)
                | (RSTRIP if a & _RSTRIP else 0)
                for a in map(attrs.__getitem__, self.special_ids.tolist())
            ],
            dtype=np.uint8,
        )
        self.attrs: Sequence[int] = attrs
        self.ids = ids
        self.eog_ids: frozenset[int] = frozenset(eog)

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled ``text`` (the last such id), None if there is none."""
        tid = self.tokens.find(text)
        return tid if tid >= 0 else None

    @property
    def token_to_id(self) -> dict[str, int]:
        """text -> id as a dict, built on first use (only Hugging Face's BPE engine wants one)."""
        if self._t2i is None:
            self._t2i = dict(zip(self.tokens, range(self.n_vocab), strict=True))
        return self._t2i
