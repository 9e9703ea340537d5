"""SentencePiece-style tokenization (``tokenizer.ggml.model = "llama"``), as llama.cpp's ``llm_tokenizer_spm``.

The text (spaces already turned into U+2581) starts as one symbol per UTF-8
character.  Repeatedly, of all adjacent pairs whose concatenation is a vocabulary
token, the one whose token has the highest score is merged (leftmost on ties).
Symbols that end up outside the vocabulary are emitted as ``<0xXX>`` byte tokens.

The merge loop is compiled (``lmap.kernels.spm``; ``tokenizers`` has no score-driven merge
model) and looks texts up in the vocabulary's :class:`~lmap.string_array.StringArray`.
"""

from __future__ import annotations

import numpy as np

from ..errors import LmapError
from ..string_array import StringArray

SPACE = "\u2581".encode()  # U+2581, which SentencePiece writes for a space
CHUNK = 1 << 16  # bytes of text per compiled call: its work arrays take ~130 bytes per text byte


class SPMSession:
    """Score-driven merges over a vocabulary given as its texts and per-id float32 scores."""

    def __init__(self, texts: StringArray, scores: np.ndarray) -> None:
        self._texts = texts
        # read-only, as GGUFFile's (a view of its map): one compiled specialization for both
        self._scores = scores = scores.view()
        scores.flags.writeable = False
        self._byte_ids: np.ndarray | None = None
        self._glue: frozenset[bytes] | None = None  # characters some token joins to a following U+2581

    def byte_ids(self) -> np.ndarray:
        """int32 [256]: the token of each raw byte (``<0xXX>``, else the byte as text), -1 if none."""
        if self._byte_ids is None:
            from ..kernels.spm import spm_byte_ids

            t = self._texts
            ids = np.empty(256, dtype=np.int32)
            spm_byte_ids(t.data, t.offsets, t.gap, t.table, np.empty(6, dtype=np.uint8), ids)
            self._byte_ids = ids
        return self._byte_ids

    def tokenize(self, text: bytes, out: list[int]) -> None:
        """Append the ids of ``text`` (UTF-8 or not, spaces already U+2581) to ``out``."""
        from ..kernels.spm import spm_tokenize

        t = self._texts
        byte_ids = self.byte_ids()
        for chunk in self._chunks(text):
            m = len(chunk)
            if not m:
                continue
            ids = np.empty(m, dtype=np.int32)
            k = spm_tokenize(
                np.frombuffer(chunk, dtype=np.uint8),
                t.data,
                t.offsets,
                t.gap,
                t.table,
                self._scores,
                byte_ids,
                np.empty(13 * m, dtype=np.int64),
                np.empty(3 * m, dtype=np.float64),
                ids,
            )
            if k < 0:
                raise LmapError(f"vocabulary has no token for byte 0x{-1 - k:02X} (needed for byte fallback)")
            out.extend(ids[:k].tolist())

    def _chunks(self, text: bytes) -> list[bytes]:
        """``text`` cut, where it is long, before U+2581s that no merge can cross.

        A merged symbol is always a vocabulary token, so no merge can cross the point between a
        character ``c`` and U+2581 when no token contains ``c`` + U+2581.  Merges on either side
        of such a point never meet, and their relative order does not change the result: the
        pieces give the same ids as the whole, with bounded work arrays.
        """
        if len(text) <= CHUNK:
            return [text]
        try:
            text.decode("utf-8")  # cut only where characters are plain to see
        except UnicodeDecodeError:
            return [text]
        glue = self._glue
        if glue is None:
            glue = self._glue = _glue_chars(self._texts)
        out: list[bytes] = []
        begin = 0
        j = text.find(SPACE, CHUNK)
        while j > 0:
            c = j - 1
            while c > begin and text[c] & 0xC0 == 0x80:
                c -= 1
            if text[c:j] not in glue:
                out.append(text[begin:j])
                begin = j
                j = text.find(SPACE, j + CHUNK)
            else:
                j = text.find(SPACE, j + 1)
        out.append(text[begin:])
        return out


def _glue_chars(texts: StringArray) -> frozenset[bytes]:
    # Characters that directly precede a U+2581 inside some token (U+2581 itself always counts:
    # tokens hold runs of it).  Cutting before a U+2581 is safe after any other.
    glue = {SPACE}
    d, o = texts.data, texts.offsets
    if d.shape[0] < 3:
        return frozenset(glue)
    at = np.flatnonzero((d[:-2] == SPACE[0]) & (d[1:-1] == SPACE[1]) & (d[2:] == SPACE[2]))
    i = np.searchsorted(o, at, side="right") - 1  # the token each U+2581 starts in ...
    begin = o[i]
    inside = (at > begin) & (at + 3 <= o[i + 1] - texts.gap)  # ... after its first byte, within it
    m = memoryview(d)
    for j, b in zip(at[inside].tolist(), begin[inside].tolist(), strict=True):
        c = j - 1
        while c > b and m[c] & 0xC0 == 0x80:
            c -= 1
        glue.add(bytes(m[c:j]))
    return frozenset(glue)
