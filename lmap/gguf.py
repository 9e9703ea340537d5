"""The GGUF container, read straight from a memory map.

Layout (little-endian; v2 and v3 share it):

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x  (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32)
    tensor data: each tensor at data_offset + offset

Written by hand rather than on ``gguf.GGUFReader`` because that reader builds a
NumPy object per metadata item (about 3 s for a 262 144-token vocabulary here)
and does not check sizes against the file, which a hostile file can exploit.
Every length read from the file is checked against the bytes that remain
before anything is allocated, so a corrupt file gives a ``GGUFError`` naming
the field and its byte offset, never a crash, hang or huge allocation.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GGUFError, LmapError
from .quants.formats import FORMATS, BlockFormat
from .string_array import StringArray, offset_dtype

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# value type id -> (name, struct code or None for string/array)
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("uint8", "<B"),
    1: ("int8", "<b"),
    2: ("uint16", "<H"),
    3: ("int16", "<h"),
    4: ("uint32", "<I"),
    5: ("int32", "<i"),
    6: ("float32", "<f"),
    7: ("bool", "<?"),
    10: ("uint64", "<Q"),
    11: ("int64", "<q"),
    12: ("float64", "<d"),
}
_STRING = 8
_ARRAY = 9
_NUMPY_DTYPES = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}

# dtype of the zero-copy view for element (non-block) formats
_ELEMENT_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry. ``shape`` is in GGUF order: ``shape[0]`` is the row length."""

    name: str
    shape: tuple[int, ...]
    format: BlockFormat
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.shape[0] if self.shape[0] else 0


class _Cursor:
    """Bounds-checked little-endian reads over the mapped bytes."""

    __slots__ = ("buf", "pos", "size", "path")

    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def fail(self, what: str, offset: int | None = None) -> GGUFError:
        off = self.pos if offset is None else offset
        return GGUFError(f"{self.path}: {what} (at byte offset {off})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated file: {what} needs {n} bytes, only {self.size - self.pos} remain")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        start = self.pos
        n = self.unpack("<Q", f"{what} length")
        if n > self.size - self.pos:
            raise self.fail(
                f"{what}: string length {n} runs past end of file ({self.size - self.pos} bytes remain)", start
            )
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # llama.cpp keeps such strings as bytes; keep them readable instead of failing the load.
            return raw.decode("utf-8", errors="surrogateescape")


_SCAN_MIN = 1024  # strings in an array kept as a StringArray (a vocabulary, its merges)


def _scan_string_array(c: _Cursor, buf: np.ndarray, n: int) -> StringArray | None:
    """A string array left where it is in ``buf`` (the file's bytes, read-only), indexed by one
    compiled pass; None if a string runs past the end (the checked Python loop then names it)."""
    from .kernels.strings import string_offsets

    pos = c.pos
    dtype = offset_dtype(c.size - pos)
    offsets = np.empty(n + 1, dtype=dtype)
    end = string_offsets(buf, pos, n, offsets, np.iinfo(dtype).max)
    if end == -2 - n:  # past 2 GiB of strings: int64 offsets
        offsets = np.empty(n + 1, dtype=np.int64)
        end = string_offsets(buf, pos, n, offsets, np.iinfo(np.int64).max)
    if end < 0:
        return None
    c.pos = end
    return StringArray(buf[pos + 8 : end], offsets, gap=8)


class GGUFFile:
    """A GGUF file mapped read-only. ``metadata`` is a dict; ``tensor(name)`` a zero-copy view.

    Metadata values are Python scalars and strings, read-only NumPy arrays for numeric arrays,
    lists for short string arrays and a read-only :class:`~lmap.string_array.StringArray` (a
    ``Sequence[str]``) for arrays of 1 024 strings and more, such as the vocabulary. Numeric
    arrays (but bool ones) and long string arrays are views of the file's bytes, not copies:
    they stay in the map as file-backed pages (gemma3's vocabulary: 2.5 MiB of texts, 2 MiB of
    scores and types), and keep the map alive after :meth:`close` while they are referenced.
    A numeric view may be unaligned (``flags.aligned`` false: GGUF packs metadata without
    padding); NumPy and Numba read such arrays as any other.

    ``use_mmap=False`` reads the whole file into anonymous memory instead (same views,
    same results), for file systems where mapping is slow or to avoid page-ins later.
    """

    def __init__(self, path: str | os.PathLike[str], *, use_mmap: bool = True) -> None:
        self.path = str(path)
        p = Path(path)
        if not p.exists():
            raise GGUFError(f"{self.path}: no such file")
        if p.is_dir():
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file")
        size = p.stat().st_size
        if size < 24:
            raise GGUFError(f"{self.path}: not a GGUF file ({size} bytes, a GGUF header alone is 24)")
        with open(p, "rb") as f:
            if use_mmap:
                self._map: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._bytes = np.frombuffer(self._map, dtype=np.uint8)
            else:
                self._map = None
                self._bytes = np.empty(size, dtype=np.uint8)
                f.readinto(memoryview(self._bytes))  # type: ignore[arg-type]
        self.size = size
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    # ------------------------------------------------------------------ parsing
    def _parse(self) -> None:
        c = _Cursor(memoryview(self._bytes), self.path)  # type: ignore[arg-type]
        magic = bytes(c.buf[0:4])
        if magic != GGUF_MAGIC:
            raise c.fail(f"not a GGUF file: magic is {magic!r}, expected b'GGUF'", 0)
        c.pos = 4
        version = c.unpack("<I", "version")
        if version not in (2, 3):
            if struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
                raise c.fail("big-endian GGUF files are not supported", 4)
            raise c.fail(f"unsupported GGUF version {version} (supported: 2, 3)", 4)
        self.version = version
        n_tensors = c.unpack("<Q", "tensor_count")
        n_kv = c.unpack("<Q", "kv_count")
        # A key-value pair takes at least 8+1+4+1 bytes, a tensor info at least 8+1+4+8+4+8.
        if n_kv * 14 > c.size - c.pos:
            raise c.fail(f"kv_count {n_kv} cannot fit in a {c.size}-byte file", 16)
        if n_tensors * 33 > c.size - c.pos:
            raise c.fail(f"tensor_count {n_tensors} cannot fit in a {c.size}-byte file", 8)

        align_at = 16
        for i in range(n_kv):
            key_at = c.pos
            key = c.string(f"metadata key #{i}")
            if key in self.metadata:
                raise c.fail(f"duplicate metadata key {key!r}", key_at)
            vt_at = c.pos
            vtype = c.unpack("<I", f"type of {key!r}")
            self.metadata[key] = self._value(c, vtype, key, vt_at, depth=0)
            # an array's element type follows its value type (read back once _value has checked it is there)
            etype = struct.unpack_from("<I", c.buf, vt_at + 4)[0] if vtype == _ARRAY else None
            self.metadata_types[key] = self._type_name(vtype, etype)
            if key == "general.alignment":
                align_at = vt_at

        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise c.fail(f"general.alignment must be a power of two, got {align!r}", align_at)
        self.alignment = align

        infos: list[tuple[str, tuple[int, ...], BlockFormat, int, int]] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            at = c.pos
            name = c.string(f"tensor #{i} name")
            if name in seen:
                raise c.fail(f"duplicate tensor name {name!r}", at)
            n_dims = c.unpack("<I", f"n_dims of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.fail(f"tensor {name!r}: n_dims {n_dims} out of range 1..{MAX_DIMS}", c.pos - 4)
            c.need(8 * n_dims, f"dims of tensor {name!r}")
            shape = struct.unpack_from(f"<{n_dims}Q", c.buf, c.pos)
            c.pos += 8 * n_dims
            tt_at = c.pos
            ttype = c.unpack("<I", f"type of tensor {name!r}")
            fmt = FORMATS.get(ttype)
            if fmt is None:
                raise c.fail(f"tensor {name!r}: unknown ggml type id {ttype}", tt_at)
            rel = c.unpack("<Q", f"offset of tensor {name!r}")
            n_el = 1
            for d in shape:
                if d >= 1 << 62:
                    raise c.fail(f"tensor {name!r}: dimension {d} is absurd", tt_at - 8 * n_dims)
                n_el *= d
            if n_el >= 1 << 62:
                raise c.fail(f"tensor {name!r}: {n_el} elements is absurd", tt_at - 8 * n_dims)
            if shape[0] % fmt.block_size:
                raise c.fail(
                    f"tensor {name!r}: row length {shape[0]} is not a multiple of the "
                    f"{fmt.name} block size {fmt.block_size}",
                    tt_at - 8 * n_dims,
                )
            if rel % align:
                raise c.fail(f"tensor {name!r}: offset {rel} is not a multiple of general.alignment {align}", c.pos - 8)
            nbytes = n_el // fmt.block_size * fmt.type_size
            infos.append((name, tuple(int(d) for d in shape), fmt, rel, nbytes))
            seen.add(name)

        self.data_offset = (c.pos + align - 1) // align * align
        if self.data_offset > c.size and infos:
            raise c.fail(f"tensor data section starts at {self.data_offset}, past the end of the file")
        for name, shape, fmt, rel, nbytes in infos:
            start = self.data_offset + rel
            if start + nbytes > self.size:
                raise c.fail(
                    f"tensor {name!r} data [{start}, {start + nbytes}) runs past the end of the file "
                    f"({self.size} bytes): truncated or corrupt file",
                    start,
                )
            self.tensors[name] = TensorInfo(name, shape, fmt, start, nbytes)

    def _value(self, c: _Cursor, vtype: int, key: str, at: int, depth: int) -> Any:
        if vtype in _SCALARS:
            v = c.unpack(_SCALARS[vtype][1], f"value of {key!r}")
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return c.string(f"value of {key!r}")
        if vtype == _ARRAY:
            if depth > 8:
                raise c.fail(f"{key!r}: arrays nested deeper than 8 levels", at)
            etype = c.unpack("<I", f"array element type of {key!r}")
            n = c.unpack("<Q", f"array length of {key!r}")
            if etype in _SCALARS:
                itemsize = struct.calcsize(_SCALARS[etype][1])
                if n * itemsize > c.size - c.pos:
                    raise c.fail(f"{key!r}: array of {n} {_SCALARS[etype][0]} runs past end of file", at)
                arr = self._view(c.pos, n * itemsize).view(_NUMPY_DTYPES[etype])
                c.pos += n * itemsize
                return arr.astype(bool) if etype == 7 else arr
            if etype == _STRING:
                if n * 8 > c.size - c.pos:
                    raise c.fail(f"{key!r}: array of {n} strings runs past end of file", at)
                return self._string_array(c, n, key, self._view(0, self.size))
            if etype == _ARRAY:
                if n * 12 > c.size - c.pos:
                    raise c.fail(f"{key!r}: array of {n} arrays runs past end of file", at)
                return [self._value(c, _ARRAY, key, at, depth + 1) for _ in range(n)]
            raise c.fail(f"{key!r}: unknown array element type {etype}", at)
        raise c.fail(f"metadata key {key!r}: unknown value type {vtype}", at)

    def _view(self, start: int, nbytes: int) -> np.ndarray:
        """A read-only view of the file's bytes (also without mmap, where the buffer itself is writable)."""
        v = self._bytes[start : start + nbytes]
        v.flags.writeable = False
        return v

    @staticmethod
    def _string_array(c: _Cursor, n: int, key: str, buf: np.ndarray) -> list[str] | StringArray:
        if n >= _SCAN_MIN:
            strings = _scan_string_array(c, buf, n)
            if strings is not None:
                return strings
        # What the compiled scan leaves: short arrays, and any array with a string to report
        # (decoded one by one, keeping bytes that are not UTF-8 as surrogates).
        size, base = c.size, c.pos
        raw = c.buf[base:]
        out: list[str] = []
        append = out.append
        unpack = struct.Struct("<Q").unpack_from
        p = 0
        end = size - base
        for i in range(n):
            if p + 8 > end:
                c.pos = base + p
                raise c.fail(f"{key!r}: truncated string #{i}")
            (ln,) = unpack(raw, p)
            p += 8
            if ln > end - p:
                c.pos = base + p - 8
                raise c.fail(f"{key!r}: string #{i} length {ln} runs past end of file")
            s = raw[p : p + ln]
            p += ln
            try:
                append(str(s, "utf-8"))
            except UnicodeDecodeError:
                append(str(s, "utf-8", errors="surrogateescape"))
        c.pos = base + p
        return out

    @staticmethod
    def _type_name(vtype: int, etype: int | None) -> str:
        if vtype in _SCALARS:
            return _SCALARS[vtype][0]
        if vtype == _STRING:
            return "string"
        if etype in _SCALARS:
            return f"array[{_SCALARS[etype][0]}]"
        if etype == _STRING:
            return "array[string]"
        return "array"

    # ------------------------------------------------------------------ access
    @property
    def data(self) -> np.ndarray:
        """The whole file as ``uint8``: a view of the read-only mapping (without mmap, the copy read)."""
        return self._bytes

    def tensor(self, name: str) -> np.ndarray:
        """Zero-copy view of a tensor's bytes.

        Element formats (F32, F16, BF16 as uint16, I*) come as arrays of shape
        ``reversed(shape)`` (NumPy row-major); block formats as ``uint8[n_rows, row_bytes]``.
        """
        try:
            info = self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None
        raw = self._bytes[info.offset : info.offset + info.nbytes]
        rows_shape = tuple(reversed(info.shape))
        dt = _ELEMENT_DTYPES.get(info.format.name)
        if dt is not None:
            return raw.view(dt).reshape(rows_shape)
        return raw.reshape(info.n_rows, info.format.row_bytes(info.shape[0]))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: missing metadata key 'general.architecture'")
        return arch

    def lock(self) -> None:
        """Pin the whole file in RAM (``mlock``), failing with advice when the limit is too low."""
        import ctypes
        import ctypes.util
        import resource

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        addr, n = self._bytes.ctypes.data, self._bytes.nbytes
        if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(n)) != 0:
            err = ctypes.get_errno()
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
            raise LmapError(
                f"{self.path}: cannot mlock {n / 2**20:.0f} MiB ({os.strerror(err)}); the locked-memory limit is "
                f"{limit}: raise it with `ulimit -l unlimited` (or in /etc/security/limits.conf), or drop --mlock"
            )
        self.locked = True

    def close(self) -> None:
        self._bytes = np.empty(0, dtype=np.uint8)
        if self._map is not None:
            with contextlib.suppress(BufferError):  # views still alive: the mapping goes when they do
                self._map.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"
