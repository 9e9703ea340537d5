"""A streaming GGUF v3 writer: header first, then tensor data one tensor at a time.

Every tensor's type and shape is declared before the header is written, so the
offsets are known up front and the data can follow in one forward pass: a model
is written without ever holding more than one slab of one tensor in memory.

Written here rather than on ``gguf.GGUFWriter`` for three reasons: lmap keeps no
runtime dependency on the ``gguf`` package; metadata is re-encoded from the exact
value types :class:`lmap.gguf.GGUFFile` read (``metadata_types``), so a copied key
keeps its width and signedness; and the layout (32-byte default alignment, each
tensor padded to it, padding bytes zero) is the one llama.cpp's ``gguf`` writes,
so the same tensors and keys give the same bytes as ``llama-quantize``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from .errors import LmapError
from .quants.formats import BlockFormat

GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

_SCALAR_IDS = {
    "uint8": (0, "<B", "<u1"),
    "int8": (1, "<b", "<i1"),
    "uint16": (2, "<H", "<u2"),
    "int16": (3, "<h", "<i2"),
    "uint32": (4, "<I", "<u4"),
    "int32": (5, "<i", "<i4"),
    "float32": (6, "<f", "<f4"),
    "bool": (7, "<?", "<u1"),
    "uint64": (10, "<Q", "<u8"),
    "int64": (11, "<q", "<i8"),
    "float64": (12, "<d", "<f8"),
}
_STRING = 8
_ARRAY = 9
_DTYPE_TO_TYPE = {
    np.dtype("<u1"): "uint8",
    np.dtype("<i1"): "int8",
    np.dtype("<u2"): "uint16",
    np.dtype("<i2"): "int16",
    np.dtype("<u4"): "uint32",
    np.dtype("<i4"): "int32",
    np.dtype("<f4"): "float32",
    np.dtype("bool"): "bool",
    np.dtype("<u8"): "uint64",
    np.dtype("<i8"): "int64",
    np.dtype("<f8"): "float64",
}


class GGUFWriteError(LmapError):
    """The writer was used out of order or given data that does not match what was declared."""


def _string(s: str) -> bytes:
    # surrogateescape: GGUFFile decodes invalid UTF-8 that way, so such strings round-trip byte for byte
    raw = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def _string_array(items: Iterable[str]) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    pack = struct.Struct("<Q").pack
    for s in items:
        raw = s.encode("utf-8", errors="surrogateescape")
        append(pack(len(raw)))
        append(raw)
    return b"".join(parts)


def _array_payload(key: str, etype: str, value: Any) -> bytes:
    """Element type id, count and elements of an array whose element type is ``etype``."""
    if etype == "string":
        items = list(value)
        if not all(isinstance(s, str) for s in items):
            raise GGUFWriteError(f"metadata key {key!r}: array[string] holds a non-string")
        return struct.pack("<IQ", _STRING, len(items)) + _string_array(items)
    if etype in _SCALAR_IDS:
        tid, _, dt = _SCALAR_IDS[etype]
        arr = np.asarray(value)
        arr = arr.astype(bool).astype("<u1") if etype == "bool" else arr.astype(dt, copy=False)
        return struct.pack("<IQ", tid, arr.size) + np.ascontiguousarray(arr).reshape(-1).tobytes()
    if etype == "array":
        items = list(value)
        return struct.pack("<IQ", _ARRAY, len(items)) + b"".join(_nested(key, v) for v in items)
    raise GGUFWriteError(f"metadata key {key!r}: unknown array element type {etype!r}")


def _nested(key: str, v: Any) -> bytes:
    """One element of an array of arrays, its element type taken from how GGUFFile returned it."""
    if isinstance(v, np.ndarray):
        et = _DTYPE_TO_TYPE.get(v.dtype.newbyteorder("<") if v.dtype.byteorder == ">" else v.dtype)
        if et is None:
            raise GGUFWriteError(f"metadata key {key!r}: nested array of dtype {v.dtype} has no GGUF type")
        return _array_payload(key, et, v)
    if isinstance(v, list | tuple):
        if v and all(isinstance(s, str) for s in v):
            return _array_payload(key, "string", v)
        if v and all(isinstance(s, np.ndarray | list | tuple) for s in v):
            return _array_payload(key, "array", v)
        if not v:
            return _array_payload(key, "string", v)
    raise GGUFWriteError(f"metadata key {key!r}: cannot encode nested array element {type(v).__name__}")


def encode_value(key: str, vtype: str, value: Any) -> bytes:
    """``u32 value_type`` + value, for a type name as in ``GGUFFile.metadata_types``."""
    if vtype in _SCALAR_IDS:
        tid, code, _ = _SCALAR_IDS[vtype]
        try:
            return struct.pack("<I", tid) + struct.pack(code, value)
        except struct.error as e:
            raise GGUFWriteError(f"metadata key {key!r}: {value!r} does not fit {vtype} ({e})") from None
    if vtype == "string":
        if not isinstance(value, str):
            raise GGUFWriteError(f"metadata key {key!r}: expected a string, got {type(value).__name__}")
        return struct.pack("<I", _STRING) + _string(value)
    if vtype.startswith("array[") and vtype.endswith("]"):
        return struct.pack("<I", _ARRAY) + _array_payload(key, vtype[6:-1], value)
    if vtype == "array":
        return struct.pack("<I", _ARRAY) + _array_payload(key, "array", value)
    raise GGUFWriteError(f"metadata key {key!r}: unknown value type {vtype!r}")


@dataclass(frozen=True)
class TensorSlot:
    """A declared tensor: ``shape`` in GGUF order (``shape[0]`` is the row length)."""

    name: str
    shape: tuple[int, ...]
    format: BlockFormat
    offset: int  # relative to the start of the data section
    nbytes: int


class GGUFWriter:
    """Write a GGUF v3 file to an open binary stream in one forward pass.

    Usage: ``add_kv`` and ``add_tensor`` for everything, then ``write_header``, then
    ``write_tensor`` once per tensor in the order they were added, then ``finish``.
    """

    def __init__(self, fh: BinaryIO, *, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFWriteError(f"alignment must be a power of two, got {alignment}")
        self.fh = fh
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}
        self.tensors: list[TensorSlot] = []
        self._names: set[str] = set()
        self._data_size = 0
        self._next = 0  # index of the next tensor to write; -1 before the header
        self._header_written = False

    # ------------------------------------------------------------------ declaration
    def add_kv(self, key: str, vtype: str, value: Any) -> None:
        """Add (or replace, keeping its place) a metadata key with its GGUF value type name."""
        if self._header_written:
            raise GGUFWriteError(f"metadata key {key!r} added after the header was written")
        if key == "general.alignment" and value != self.alignment:
            raise GGUFWriteError(f"general.alignment {value!r} differs from the writer's alignment {self.alignment}")
        self._kv[key] = encode_value(key, vtype, value)

    def remove_kv(self, key: str) -> None:
        self._kv.pop(key, None)

    def add_tensor(self, name: str, shape: tuple[int, ...], fmt: BlockFormat) -> TensorSlot:
        """Declare a tensor; its data must later come through :meth:`write_tensor` in this order."""
        if self._header_written:
            raise GGUFWriteError(f"tensor {name!r} added after the header was written")
        if name in self._names:
            raise GGUFWriteError(f"duplicate tensor name {name!r}")
        if not 1 <= len(shape) <= 4 or any(d < 0 for d in shape):
            raise GGUFWriteError(f"tensor {name!r}: bad shape {shape}")
        if shape[0] % fmt.block_size:
            raise GGUFWriteError(
                f"tensor {name!r}: row length {shape[0]} is not a multiple of the {fmt.name} block size "
                f"{fmt.block_size}"
            )
        n = 1
        for d in shape:
            n *= d
        nbytes = n // fmt.block_size * fmt.type_size
        slot = TensorSlot(name, tuple(int(d) for d in shape), fmt, self._data_size, nbytes)
        self._data_size += self._pad(nbytes)
        self.tensors.append(slot)
        self._names.add(name)
        return slot

    def _pad(self, n: int) -> int:
        return (n + self.alignment - 1) // self.alignment * self.alignment

    # ------------------------------------------------------------------ output
    def header_bytes(self) -> bytes:
        """Header, key-values, tensor infos and the padding up to the data section."""
        out = bytearray(b"GGUF")
        out += struct.pack("<IQQ", GGUF_VERSION, len(self.tensors), len(self._kv))
        for key, payload in self._kv.items():
            out += _string(key)
            out += payload
        for t in self.tensors:
            out += _string(t.name)
            out += struct.pack("<I", len(t.shape))
            out += struct.pack(f"<{len(t.shape)}Q", *t.shape)
            out += struct.pack("<IQ", t.format.type_id, t.offset)
        out += bytes(self._pad(len(out)) - len(out))
        return bytes(out)

    @property
    def total_size(self) -> int:
        """Bytes the finished file will have."""
        return len(self.header_bytes()) + self._data_size

    def write_header(self) -> None:
        if self._header_written:
            raise GGUFWriteError("header written twice")
        self.fh.write(self.header_bytes())
        self._header_written = True

    def write_tensor(self, name: str, chunks: Iterable[np.ndarray | bytes]) -> int:
        """Write the next tensor's bytes, given in one or more consecutive chunks; returns its size."""
        if not self._header_written:
            raise GGUFWriteError(f"tensor {name!r} written before the header")
        if self._next >= len(self.tensors):
            raise GGUFWriteError(f"tensor {name!r} was never declared (all declared tensors are written)")
        slot = self.tensors[self._next]
        if slot.name != name:
            raise GGUFWriteError(f"tensor {name!r} written out of order: expected {slot.name!r} next")
        n = 0
        for c in chunks:
            buf = memoryview(np.ascontiguousarray(c)).cast("B") if isinstance(c, np.ndarray) else memoryview(c)
            n += buf.nbytes
            if n > slot.nbytes:
                raise GGUFWriteError(f"tensor {name!r}: more than the declared {slot.nbytes} bytes of data")
            self.fh.write(buf)
        if n != slot.nbytes:
            raise GGUFWriteError(f"tensor {name!r}: got {n} bytes of data, declared {slot.nbytes}")
        self.fh.write(bytes(self._pad(n) - n))
        self._next += 1
        return n

    def finish(self) -> None:
        """Check that every declared tensor was written."""
        if not self._header_written:
            raise GGUFWriteError("finish() before the header was written")
        if self._next != len(self.tensors):
            missing = self.tensors[self._next].name
            raise GGUFWriteError(
                f"{len(self.tensors) - self._next} declared tensors never written (first: {missing!r})"
            )
