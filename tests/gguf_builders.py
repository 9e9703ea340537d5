"""GGUF files for tests/test_gguf.py, two ways.

* :func:`write_reference` writes with ``gguf.GGUFWriter`` (the llama.cpp project's
  writer), so well-formed files come from an implementation that is not ours.
* :func:`build` assembles bytes by hand with ``struct`` so that any field can be
  made wrong (counts, lengths, types, offsets, alignment, byte order).

Layout (GGUF v2/v3, little-endian)::

    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv:     string key | u32 value_type | value
    info:   string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset
    padding to the alignment, then the tensor data
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# GGUF value type ids
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_CODES = {
    U8: "B",
    I8: "b",
    U16: "H",
    I16: "h",
    U32: "I",
    I32: "i",
    F32: "f",
    BOOL: "?",
    U64: "Q",
    I64: "q",
    F64: "d",
}

# ggml type ids used here
GGML_F32, GGML_F16, GGML_Q4_1, GGML_Q8_0 = 0, 1, 3, 8


# ------------------------------------------------------------------ hand-built files
def gstr(s: str | bytes, e: str = "<") -> bytes:
    """A GGUF string: u64 length, then the bytes (no terminator)."""
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack(e + "Q", len(raw)) + raw


def scalar(vtype: int, value: Any, e: str = "<") -> bytes:
    return struct.pack(e + SCALAR_CODES[vtype], value)


def array(etype: int, items: Sequence[Any], e: str = "<", n: int | None = None) -> bytes:
    """An array value (element type, count, elements). ``items`` are Python values for
    scalar/string elements, or already-encoded array payloads for nested arrays.
    ``n`` overrides the count written (to lie about it)."""
    if etype in SCALAR_CODES:
        body = b"".join(scalar(etype, v, e) for v in items)
    elif etype == STRING:
        body = b"".join(gstr(v, e) for v in items)
    else:
        body = b"".join(items)
    return struct.pack(e + "IQ", etype, len(items) if n is None else n) + body


def kv(key: str | bytes, vtype: int, payload: bytes, e: str = "<") -> bytes:
    """A key-value entry with an already-encoded value payload."""
    return gstr(key, e) + struct.pack(e + "I", vtype) + payload


def kv_scalar(key: str, vtype: int, value: Any, e: str = "<") -> bytes:
    return kv(key, vtype, scalar(vtype, value, e), e)


def kv_string(key: str, value: str | bytes, e: str = "<") -> bytes:
    return kv(key, STRING, gstr(value, e), e)


def tensor_info(
    name: str | bytes, shape: Sequence[int], ggml_type: int, offset: int, e: str = "<", n_dims: int | None = None
) -> bytes:
    """A tensor info; ``n_dims`` overrides the count written (``shape`` is still written in full)."""
    nd = len(shape) if n_dims is None else n_dims
    return (
        gstr(name, e)
        + struct.pack(e + "I", nd)
        + struct.pack(f"{e}{len(shape)}Q", *shape)
        + struct.pack(e + "IQ", ggml_type, offset)
    )


def pad_to(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass
class Built:
    """A hand-built file and where its parts start (absolute byte offsets)."""

    data: bytes
    kv_at: list[int]  # start of each key-value entry
    info_at: list[int]  # start of each tensor info
    data_offset: int  # start of the tensor data section

    def write(self, path: Path) -> Path:
        path.write_bytes(self.data)
        return path


def build(
    kvs: Sequence[bytes] = (),
    infos: Sequence[bytes] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
    magic: bytes = b"GGUF",
    e: str = "<",
    pad: bool = True,
) -> Built:
    """Header + key-values + tensor infos + padding + data. The counts default to the real ones."""
    out = bytearray(magic + struct.pack(e + "I", version))
    out += struct.pack(e + "QQ", len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    kv_at, info_at = [], []
    for item in kvs:
        kv_at.append(len(out))
        out += item
    for item in infos:
        info_at.append(len(out))
        out += item
    if pad:
        out += bytes(pad_to(len(out), alignment) - len(out))
    data_offset = len(out)
    out += data
    return Built(bytes(out), kv_at, info_at, data_offset)


def minimal(*, extra_kvs: Sequence[bytes] = (), **kw: Any) -> Built:
    """A small valid file: two keys and one 32x2 F32 tensor (256 bytes of data)."""
    kvs = [kv_string("general.architecture", "test"), kv_scalar("test.answer", U32, 42), *extra_kvs]
    data = np.arange(64, dtype="<f4").tobytes()
    return build(kvs, [tensor_info("t", (32, 2), GGML_F32, 0)], data, **kw)


# ------------------------------------------------------------------ files written by gguf.GGUFWriter
@dataclass
class Meta:
    """One metadata item for :func:`write_reference`."""

    key: str
    value: Any
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


def write_reference(
    path: Path,
    meta: Sequence[Meta] = (),
    tensors: Sequence[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]] = (),
    *,
    alignment: int | None = None,
    arch: str = "test",
) -> Path:
    """Write a GGUF with ``gguf.GGUFWriter``. Tensors are ``(name, array, raw_dtype)``; for a block
    format pass the bytes from ``gguf.quants.quantize`` and its type as ``raw_dtype``."""
    w = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for m in meta:
        w.add_key_value(m.key, m.value, m.vtype, sub_type=m.sub_type)
    for name, arr, raw_dtype in tensors:
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def numeric_fields(reader: gguf.GGUFReader) -> list[tuple[int, int]]:
    """``(offset, size)`` of every 4- or 8-byte integer field of a file (counts, lengths, types,
    dims, tensor offsets), from gguf's own reader: the places a fuzzer should aim at."""
    out = []
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    for f in fields:
        pos = f.offset
        for part in f.parts:
            if part.dtype.kind in "iu" and part.dtype.itemsize in (4, 8) and part.size == 1:
                out.append((pos, part.dtype.itemsize))
            pos += part.nbytes
    return sorted(set(out))
