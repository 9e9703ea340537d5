"""The public tokenizer: llama.cpp's ``llama_tokenize`` / ``llama_token_to_piece`` / ``llama_detokenize``."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidParameterError, LmapError, UnsupportedModelError
from ..string_array import StringArray
from .bpe import HFBackend, PyBackend, check_engine, split_merges
from .pretokenize import BYTE_DECODE_TABLE, UNICODE_TO_BYTE
from .specials import SpecialMatcher, partition
from .spm import SPACE, SPMSession
from .vocab import TokenAttr, TokenType, Vocab

_SPECIAL_ATTRS = int(TokenAttr.UNKNOWN | TokenAttr.CONTROL)  # ints: an IntFlag operation costs ~1.5 us
_HEX_PREFIX = re.compile(r"[0-9A-Fa-f]+")
_TEXT_ATTRS = int(TokenAttr.UNKNOWN | TokenAttr.CONTROL | TokenAttr.USER_DEFINED)


def _llama_decode_utf8(data: bytes) -> str:
    """Decode like llama.cpp's ``unicode_cpts_from_utf8``: no validation beyond continuation bits.

    Each byte that does not start a well-formed sequence becomes U+FFFD; overlong
    forms and surrogates decode to their code point (Python keeps lone surrogates).
    """
    out: list[str] = []
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            out.append(chr(b))
            i += 1
            continue
        if b & 0xE0 == 0xC0:
            k, cp = 1, b & 0x1F
        elif b & 0xF0 == 0xE0:
            k, cp = 2, b & 0x0F
        elif b & 0xF8 == 0xF0:
            k, cp = 3, b & 0x07
        else:
            out.append("\ufffd")
            i += 1
            continue
        if i + k >= n:
            out.append("\ufffd")
            i += 1
            continue
        tail = data[i + 1 : i + 1 + k]
        if any(c & 0xC0 != 0x80 for c in tail):
            out.append("\ufffd")
            i += 1
            continue
        for c in tail:
            cp = (cp << 6) | (c & 0x3F)
        # llama.cpp would throw re-encoding a code point past U+10FFFF; lmap substitutes U+FFFD
        out.append(chr(cp) if cp <= 0x10FFFF else "\ufffd")
        i += 1 + k
    return "".join(out)


class Tokenizer:
    """A GGUF vocabulary that tokenizes and detokenizes exactly as llama.cpp does.

    Build it with :meth:`from_metadata`.  ``tokenizer.ggml.model = "gpt2"`` is
    byte-level BPE with llama.cpp's pre-tokenizer for ``tokenizer.ggml.pre``;
    ``"llama"`` is SentencePiece-style with scores and byte fallback.
    """

    def __init__(self, vocab: Vocab, merges: Sequence[str] | None = None, *, engine: str = "auto") -> None:
        self._v = vocab
        self._matcher = SpecialMatcher(vocab.tokens, vocab.special_ids, vocab.special_flags)
        self._pieces: dict[int, bytes] = {}  # a dict, not a list: gemma3 has 262 144 ids
        check_engine(engine)
        self._engine = engine
        self._merges = merges if isinstance(merges, StringArray) else StringArray.from_strings(merges or [])
        self._hf: HFBackend | None = None  # "hf"
        self._py_bpe: PyBackend | None = None  # "python", "auto"; "hf" for what Rust cannot carry
        self._spm: SPMSession | None = None
        if vocab.is_spm:
            self._spm = SPMSession(vocab.tokens, np.ascontiguousarray(vocab.scores))
        elif engine == "hf":
            assert vocab.pre is not None
            self._hf = HFBackend(vocab.token_to_id, split_merges(self._merges), vocab.pre)
        else:
            self._py_bpe = self._python_bpe()

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], *, engine: str = "auto") -> Tokenizer:
        """Build from GGUF metadata (``GGUFFile(path).metadata``).

        ``engine`` picks the BPE implementation: ``"auto"`` or ``"python"`` (lmap's
        own: llama.cpp's merge loop, compiled) or ``"hf"`` (Hugging Face
        ``tokenizers``); both give llama.cpp's ids (``lmap.tokenizer.bpe``).  Raises
        ``UnsupportedModelError`` naming the key and value for tokenizer models or
        pre-tokenizers lmap does not implement.
        """
        vocab = Vocab(md)
        merges = md.get("tokenizer.ggml.merges")
        if not vocab.is_spm and not isinstance(merges, list | StringArray):
            raise UnsupportedModelError("tokenizer.ggml.model = 'gpt2' needs tokenizer.ggml.merges, which is missing")
        return cls(vocab, merges, engine=engine)

    # --- properties -------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        """Number of tokens."""
        return self._v.n_vocab

    @property
    def tokens(self) -> Sequence[str]:
        """Token texts by id (the vocabulary's own sequence: a list, or a ``StringArray`` for SPM)."""
        return self._v.tokens

    @property
    def model(self) -> str:
        """``tokenizer.ggml.model``: ``"gpt2"`` or ``"llama"``."""
        return self._v.model

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id (None if the vocabulary has none)."""
        return self._v.ids["bos"]

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id."""
        return self._v.ids["eos"]

    @property
    def eot_id(self) -> int | None:
        """End-of-turn id: ``tokenizer.ggml.eot_token_id``, else found by its text (``<|im_end|>``, ...).

        When a vocabulary holds several candidates (SmolLM2 has ``<|endoftext|>`` and
        ``<|im_end|>``), llama.cpp keeps whichever its hash map yields first, an
        accident of the C++ library; lmap keeps the first in llama.cpp's candidate
        list.  To stop generation use :attr:`eog_ids`, which matches llama.cpp exactly.
        """
        return self._v.ids["eot"]

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id."""
        return self._v.ids["unknown"]

    @property
    def pad_id(self) -> int | None:
        """Padding id."""
        return self._v.ids["padding"]

    @property
    def eog_ids(self) -> frozenset[int]:
        """Every id that ends generation, as llama.cpp's ``llama_vocab_is_eog``."""
        return self._v.eog_ids

    @property
    def add_bos(self) -> bool:
        """Whether ``encode(add_special=True)`` prepends BOS."""
        return self._v.add_bos

    @property
    def add_eos(self) -> bool:
        """Whether ``encode(add_special=True)`` appends EOS."""
        return self._v.add_eos

    @property
    def add_space_prefix(self) -> bool:
        """SPM: a space is prepended to text after BOS/special tokens (and stripped again on decode)."""
        return self._v.add_space_prefix

    def is_eog(self, token_id: int) -> bool:
        """Whether ``token_id`` ends generation."""
        return token_id in self._v.eog_ids

    def token_type(self, token_id: int) -> TokenType:
        """The token's type as declared in the file (``tokenizer.ggml.token_type``)."""
        t = int(self._v.types[self._check(token_id)])
        return TokenType(t) if 0 <= t <= 6 else TokenType.UNDEFINED

    def token_attr(self, token_id: int) -> TokenAttr:
        """llama.cpp's attributes for the token, after its corrections by token text."""
        return TokenAttr(self._v.attrs[self._check(token_id)])

    def is_control(self, token_id: int) -> bool:
        """Whether llama.cpp treats the token as a control token (hidden unless ``special=True``)."""
        return bool(self._v.attrs[self._check(token_id)] & TokenAttr.CONTROL)

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self._v.n_vocab:
            raise InvalidParameterError(f"token id {token_id} is outside the vocabulary [0, {self._v.n_vocab})")
        return token_id

    # --- encoding ---------------------------------------------------------------

    def encode(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids for ``text``, as ``llama_tokenize(vocab, text, add_special, parse_special)``.

        ``add_special`` adds BOS/EOS only where the vocabulary asks for them
        (``add_bos``/``add_eos``).  With ``parse_special`` control tokens written in
        the text (``<|im_start|>``) become their ids; without it they are tokenized
        as text.  User-defined tokens are always matched.  ``bytes`` need not be
        valid UTF-8: invalid bytes are handled as llama.cpp handles them.
        """
        v = self._v
        if isinstance(text, str):
            try:
                text.encode("utf-8")
                data: str | bytes = text
            except UnicodeEncodeError:  # lone surrogates: hand llama.cpp's view, the raw bytes
                data = text.encode("utf-8", "surrogatepass")
        elif isinstance(text, bytes | bytearray | memoryview):
            raw = bytes(text)
            try:
                data = raw.decode("utf-8")
            except UnicodeDecodeError:
                data = raw
        else:
            raise InvalidParameterError(f"text must be str or bytes, not {type(text).__name__}")

        out: list[int] = []
        if add_special and v.add_bos:
            out.append(self._required("bos"))
        fragments = partition(data, self._matcher.present(data, parse_special), parse_special)
        if self._spm is not None:
            self._encode_spm(fragments, out)
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                elif isinstance(frag, str):
                    self._bpe_tokenize(frag, out)
                else:
                    self._encode_bpe_bytes(frag, out)
        if add_special and v.add_eos:
            out.append(self._required("eos"))
        return out

    def _required(self, name: str) -> int:
        tid = self._v.ids[name]
        if tid is None:
            raise LmapError(f"the vocabulary asks for a {name.upper()} token but defines none")
        return tid

    def _encode_bpe_bytes(self, frag: bytes, out: list[int]) -> None:
        text = _llama_decode_utf8(frag)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # surrogates decoded from the bytes: only the Python engine can carry them
            self._python_bpe().tokenize(text, out)
            return
        self._bpe_tokenize(text, out)

    def _bpe_tokenize(self, text: str, out: list[int]) -> None:
        (self._hf or self._python_bpe()).tokenize(text, out)

    def _python_bpe(self) -> PyBackend:
        if self._py_bpe is None:
            assert self._v.pre is not None
            self._py_bpe = PyBackend(self._v.tokens, self._merges, self._v.pre)
        return self._py_bpe

    def _encode_spm(self, fragments: list[str | bytes | int], out: list[int]) -> None:
        assert self._spm is not None
        prefix = self._v.add_space_prefix
        is_prev_special = True  # the first fragment gets the space prefix
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                is_prev_special = True
                continue
            data = frag.encode() if isinstance(frag, str) else frag  # str fragments hold no lone surrogates
            if prefix and is_prev_special:
                data = b" " + data
            self._spm.tokenize(data.replace(b" ", SPACE), out)
            is_prev_special = False

    # --- decoding ---------------------------------------------------------------

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """The bytes of one token, as ``llama_token_to_piece(..., lstrip=0, special)``.

        Control and unknown tokens give ``b""`` unless ``special`` is true.  A piece
        may be part of a UTF-8 character; see :meth:`incremental_decoder`.
        """
        attr = self._v.attrs[self._check(token_id)]
        if not special and attr & _SPECIAL_ATTRS:
            return b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._make_piece(token_id, attr)
        return piece

    def _make_piece(self, token_id: int, attr: int) -> bytes:
        text = self._v.tokens[token_id]
        if attr & _TEXT_ATTRS:
            return text.encode("utf-8", "surrogateescape")
        if attr & TokenAttr.NORMAL:
            if self._spm is not None:
                return text.replace("\u2581", " ").encode("utf-8", "surrogateescape")
            try:
                return text.translate(BYTE_DECODE_TABLE).encode("latin-1")
            except UnicodeEncodeError:
                return _bpe_decode_slow(text)
        if attr & TokenAttr.BYTE:
            # llama.cpp: strtol(text.substr(3, 2), 16), i.e. the leading hex digits, else 0
            m = _HEX_PREFIX.match(text, 3, 5)
            return bytes((int(m.group(), 16) if m else 0,))
        return b""

    def decode(self, ids: Iterable[int], special: bool = False, *, remove_special: bool = False) -> bytes:
        """The bytes of ``ids``, as ``llama_detokenize(vocab, ids, remove_special, unparse_special=special)``.

        Strips the space SentencePiece put in front of the first word (when the
        vocabulary adds one) and applies llama.cpp's space clean-up for vocabularies
        that ask for it.  ``remove_special`` drops a leading BOS / trailing EOS that
        the vocabulary itself would add.  Decode the result with ``errors="replace"``
        if it may end inside a character.
        """
        v = self._v
        toks = list(ids)
        remove_space = v.add_space_prefix
        if remove_special and v.add_bos and toks and toks[0] == v.ids["bos"]:
            remove_space = False
            toks = toks[1:]
        if remove_special and v.add_eos and toks and toks[-1] == v.ids["eos"]:
            toks = toks[:-1]
        parts: list[bytes] = []
        for i, tid in enumerate(toks):
            piece = self.token_to_piece(tid, special)
            if i == 0 and remove_space and piece.startswith(b" "):
                piece = piece[1:]
            parts.append(piece)
        text = b"".join(parts)
        return _clean_spaces(text) if v.clean_spaces else text

    def incremental_decoder(self, special: bool = False) -> IncrementalDecoder:
        """A decoder for streaming: feed ids one at a time, get only whole characters back."""
        return IncrementalDecoder(self, special)

    def __repr__(self) -> str:
        v = self._v
        engine = "SPMSession" if self._spm is not None else "HFBackend" if self._engine == "hf" else "PyBackend"
        return f"Tokenizer(model={v.model!r}, pre={v.pre_name!r}, n_vocab={v.n_vocab}, engine={engine})"


class IncrementalDecoder:
    """Turns a stream of token ids into text without ever showing part of a character.

    ``feed`` returns the complete UTF-8 characters available so far and holds back a
    trailing partial sequence; ``flush`` returns what is left (a held-back partial
    sequence comes out as U+FFFD).  The concatenated output equals
    ``tok.decode(ids, special).decode("utf-8", "replace")`` for vocabularies without
    llama.cpp's space clean-up; like llama.cpp's streaming, that clean-up (only some
    BPE pre-tokenizers use it) is not applied here.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True

    def feed(self, token_id: int) -> str:
        """Add one token; return the characters it completes (possibly ``""``)."""
        piece = self._tok.token_to_piece(token_id, self._special)
        if self._first:
            self._first = False
            if self._tok.add_space_prefix and piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """End the stream: return anything still held back."""
        return self._utf8.decode(b"", final=True)


def _bpe_decode_slow(text: str) -> bytes:
    # llama_decode_text: characters outside the byte alphabet become a marker that
    # quotes their UTF-8 in hex followed by the whole token text.
    out = bytearray()
    for ch in text:
        b = UNICODE_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            raw = ch.encode("utf-8", "surrogatepass")
            out += b"[UNK_BYTE_0x" + raw.hex().encode() + text.encode("utf-8", "surrogateescape") + b"]"
    return bytes(out)


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp's ``clean_spaces`` passes over detokenized text (``clean_up_tokenization_spaces``)."""
    if not text:
        return text
    # " ?", " !", " .", " ," lose their space
    t = bytearray(text[:1])
    for i in range(1, len(text)):
        x = text[i]
        if text[i - 1] == 0x20 and x in b"?!.,":
            t.pop()
        t.append(x)
    # a lone apostrophe between spaces loses both spaces: " ' " -> "'"; llama.cpp blanks the
    # skipped space in place, so it no longer counts as a space for the next character
    src, t = bytearray(t), bytearray(t[:1])
    i = 1
    while i < len(src):
        x = src[i]
        if x == 0x27 and i + 1 < len(src) and src[i - 1] == 0x20 and src[i + 1] == 0x20:
            t.pop()
            src[i + 1] = 0
            i += 1
        t.append(x)
        i += 1
    # " 's", " 'm", " 're", " 've" lose their space
    src, t = bytes(t), bytearray(t[:1])
    n = len(src)
    for i in range(1, n):
        x = src[i]
        if src[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = src[i + 1]
            if x1 in b"sm" or (i + 2 < n and src[i + 1 : i + 3] in (b"re", b"ve")):
                t.pop()
        t.append(x)
    return bytes(t)
