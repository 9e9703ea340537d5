"""The GGUF container (lmap.gguf) against gguf-py, the llama.cpp project's own reader and writer.

Well-formed files come from ``gguf.GGUFWriter`` and are read back both by
``GGUFFile`` and by ``gguf.GGUFReader``; malformed ones are built byte by byte
(tests/gguf_builders.py) and must fail with a ``GGUFError`` that names the field
and, where there is one, its byte offset. A fuzzer truncates and corrupts a small
file: the loader must load it or raise ``GGUFError``, quickly and without
allocating more than the file could justify.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import resource
import signal
import struct
import time
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize
from gguf_builders import (
    ARRAY,
    BOOL,
    F32,
    GGML_F32,
    GGML_Q8_0,
    I32,
    STRING,
    U8,
    U32,
    U64,
    Meta,
    array,
    build,
    gstr,
    kv,
    kv_scalar,
    kv_string,
    minimal,
    numeric_fields,
    tensor_info,
    write_reference,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmap.errors import GGUFError
from lmap.gguf import GGUFFile
from lmap.quants.formats import FORMATS, FORMATS_BY_NAME
from lmap.string_array import StringArray

VT = gguf.GGUFValueType
QT = GGMLQuantizationType


def _root(a: np.ndarray) -> Any:
    """The object at the end of an array's ``.base`` chain."""
    x: Any = a
    while isinstance(x, np.ndarray) and x.base is not None:
        x = x.base
    return x


def _error(path: Path, **kw: Any) -> str:
    with pytest.raises(GGUFError) as ei:
        GGUFFile(path, **kw)
    return str(ei.value)


# ------------------------------------------------------------------ metadata round trip
_ROUND_TRIP: list[tuple[str, Any, VT, VT | None, str]] = [
    # key, value, type, array element type, lmap's metadata_types name
    ("t.u8", 255, VT.UINT8, None, "uint8"),
    ("t.u8_zero", 0, VT.UINT8, None, "uint8"),
    ("t.i8", -128, VT.INT8, None, "int8"),
    ("t.u16", 65535, VT.UINT16, None, "uint16"),
    ("t.i16", -32768, VT.INT16, None, "int16"),
    ("t.u32", 2**32 - 1, VT.UINT32, None, "uint32"),
    ("t.i32", -(2**31), VT.INT32, None, "int32"),
    ("t.u64", 2**64 - 1, VT.UINT64, None, "uint64"),
    ("t.i64", -(2**63), VT.INT64, None, "int64"),
    ("t.f32", 0.1, VT.FLOAT32, None, "float32"),
    ("t.f32_inf", -math.inf, VT.FLOAT32, None, "float32"),
    ("t.f64", 0.1, VT.FLOAT64, None, "float64"),
    ("t.f64_tiny", 5e-324, VT.FLOAT64, None, "float64"),
    ("t.bool_true", True, VT.BOOL, None, "bool"),
    ("t.bool_false", False, VT.BOOL, None, "bool"),
    ("t.str", "héllo ✓ 🦙 \n\t\x00 end", VT.STRING, None, "string"),
    ("t.str_empty", "", VT.STRING, None, "string"),
    ("t.a_u8", [0, 1, 255], VT.ARRAY, VT.UINT8, "array[uint8]"),
    ("t.a_i8", [-128, 0, 127], VT.ARRAY, VT.INT8, "array[int8]"),
    ("t.a_u16", [0, 65535], VT.ARRAY, VT.UINT16, "array[uint16]"),
    ("t.a_i16", [-32768, 32767], VT.ARRAY, VT.INT16, "array[int16]"),
    ("t.a_u32", [0, 2**32 - 1, 7], VT.ARRAY, VT.UINT32, "array[uint32]"),
    ("t.a_i32", [-(2**31), 2**31 - 1], VT.ARRAY, VT.INT32, "array[int32]"),
    ("t.a_u64", [0, 2**64 - 1], VT.ARRAY, VT.UINT64, "array[uint64]"),
    ("t.a_i64", [-(2**63), 2**63 - 1], VT.ARRAY, VT.INT64, "array[int64]"),
    ("t.a_f32", [0.5, -1.25, 3.4e38, 0.1], VT.ARRAY, VT.FLOAT32, "array[float32]"),
    ("t.a_f64", [0.1, -1e308, 2.5], VT.ARRAY, VT.FLOAT64, "array[float64]"),
    ("t.a_bool", [True, False, True], VT.ARRAY, VT.BOOL, "array[bool]"),
    ("t.a_str", ["a", "", "ünïcode ✓", "x" * 300], VT.ARRAY, VT.STRING, "array[string]"),
    ("t.a_nested_int", [[1, 2], [3], [-4, 5, 6]], VT.ARRAY, VT.ARRAY, "array"),
    ("t.a_nested_str", [["a", "b"], ["c"]], VT.ARRAY, VT.ARRAY, "array"),
    ("t.a_nested_nested", [[[1], [2, 3]], [[4]]], VT.ARRAY, VT.ARRAY, "array"),
]
_NUMPY_OF = {
    VT.UINT8: np.uint8,
    VT.INT8: np.int8,
    VT.UINT16: np.uint16,
    VT.INT16: np.int16,
    VT.UINT32: np.uint32,
    VT.INT32: np.int32,
    VT.UINT64: np.uint64,
    VT.INT64: np.int64,
    VT.FLOAT32: np.float32,
    VT.FLOAT64: np.float64,
    VT.BOOL: np.bool_,
}


def _expected(value: Any, vtype: VT, sub: VT | None) -> Any:
    """What GGUFFile should return for a value written as (vtype, sub)."""
    if vtype == VT.FLOAT32:
        return float(np.float32(value))
    if vtype != VT.ARRAY:
        return value
    if sub in _NUMPY_OF:
        return np.array(value, dtype=_NUMPY_OF[sub])
    if sub == VT.STRING:
        return list(value)
    # GGUFWriter infers nested element types: int -> INT32, str -> STRING, list -> ARRAY
    return [
        _expected(
            v,
            VT.ARRAY,
            VT.STRING if v and isinstance(v[0], str) else VT.ARRAY if v and isinstance(v[0], list) else VT.INT32,
        )
        for v in value
    ]


def _assert_same(got: Any, want: Any, where: str) -> None:
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), where
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, where
        np.testing.assert_array_equal(got, want, err_msg=where)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{where}[{i}]")
    else:
        assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
        assert got == want or (isinstance(want, float) and math.isnan(want) and math.isnan(got)), where


@pytest.fixture(scope="module")
def round_trip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = [Meta(k, v, t, s) for k, v, t, s, _ in _ROUND_TRIP]
    return write_reference(tmp_path_factory.mktemp("rt") / "meta.gguf", meta)


@pytest.mark.parametrize("use_mmap", [True, False])
def test_every_value_type_round_trips(round_trip_file: Path, use_mmap: bool) -> None:
    g = GGUFFile(round_trip_file, use_mmap=use_mmap)
    assert g.version == 3
    assert g.metadata["general.architecture"] == "test"
    assert set(g.metadata) == {"general.architecture"} | {k for k, *_ in _ROUND_TRIP}
    for key, value, vtype, sub, type_name in _ROUND_TRIP:
        _assert_same(g.metadata[key], _expected(value, vtype, sub), key)
        assert g.metadata_types[key] == type_name, key
        assert g.get(key) is g.metadata[key]
    assert g.get("no.such.key", 7) == 7
    assert g.architecture == "test"


def test_metadata_agrees_with_gguf_reader(round_trip_file: Path) -> None:
    g = GGUFFile(round_trip_file)
    r = gguf.GGUFReader(round_trip_file)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert list(g.metadata) == keys  # file order kept
    for k in keys:
        want = r.fields[k].contents()
        got = g.metadata[k]
        if isinstance(got, list) and got and isinstance(got[0], (list, np.ndarray)):
            got = _flatten(got)  # gguf's reader flattens nested arrays
        elif isinstance(got, np.ndarray):
            got = got.tolist()
        assert got == want, k


def _flatten(x: Any) -> list[Any]:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, list):
        return [v for item in x for v in _flatten(item)]
    return [x]


def test_empty_arrays_and_non_utf8_strings(tmp_path: Path) -> None:
    # GGUFWriter refuses empty arrays, so build these by hand
    bad = b"caf\xe9 \xff"
    kvs = [
        kv("e.u32", ARRAY, array(U32, [])),
        kv("e.str", ARRAY, array(STRING, [])),
        kv("e.nested", ARRAY, array(ARRAY, [])),
        kv("e.nested_empty", ARRAY, array(ARRAY, [array(U8, []), array(STRING, [])])),
        kv("e.bad_utf8", STRING, gstr(bad)),
        kv("e.bad_utf8_array", ARRAY, array(STRING, ["ok", bad])),
        kv("e.bool2", BOOL, b"\x02"),  # any non-zero byte is true
    ]
    g = GGUFFile(build(kvs).write(tmp_path / "e.gguf"))
    m = g.metadata
    _assert_same(m["e.u32"], np.zeros(0, np.uint32), "e.u32")
    assert m["e.str"] == [] and m["e.nested"] == []
    _assert_same(m["e.nested_empty"], [np.zeros(0, np.uint8), []], "e.nested_empty")
    assert g.metadata_types["e.u32"] == "array[uint32]"
    assert g.metadata_types["e.str"] == "array[string]"
    assert g.metadata_types["e.nested"] == "array"
    # undecodable bytes are kept (surrogate-escaped), not an error: llama.cpp keeps them as bytes
    assert m["e.bad_utf8"].encode("utf-8", "surrogateescape") == bad
    assert m["e.bad_utf8_array"][1].encode("utf-8", "surrogateescape") == bad
    assert m["e.bool2"] is True
    assert g.tensors == {} and g.data_offset == build(kvs).data_offset


@settings(max_examples=40, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,8}(\.[a-z0-9_]{1,8}){0,2}", fullmatch=True).filter(
            lambda k: k != "general.architecture"
        ),
        st.one_of(
            st.tuples(st.just(VT.UINT8), st.integers(0, 255)),
            st.tuples(st.just(VT.INT16), st.integers(-(2**15), 2**15 - 1)),
            st.tuples(st.just(VT.UINT64), st.integers(0, 2**64 - 1)),
            st.tuples(st.just(VT.INT64), st.integers(-(2**63), 2**63 - 1)),
            st.tuples(st.just(VT.FLOAT32), st.floats(width=32, allow_nan=False)),
            st.tuples(st.just(VT.FLOAT64), st.floats(allow_nan=False)),
            st.tuples(st.just(VT.BOOL), st.booleans()),
            st.tuples(st.just(VT.STRING), st.text(max_size=40)),
            st.tuples(st.just(VT.STRING), st.lists(st.text(max_size=10), min_size=1, max_size=20)),
            st.tuples(st.just(VT.INT32), st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=20)),
            st.tuples(st.just(VT.FLOAT32), st.lists(st.floats(width=32), min_size=1, max_size=20)),
        ),
        max_size=8,
    )
)
def test_random_metadata_round_trips(
    items: dict[str, tuple[VT, Any]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    meta = [Meta(k, v, VT.ARRAY, t) if isinstance(v, list) else Meta(k, v, t) for k, (t, v) in items.items()]
    path = write_reference(tmp_path_factory.mktemp("hyp", numbered=True) / "m.gguf", meta)
    g = GGUFFile(path)
    assert set(g.metadata) == {"general.architecture", *items}
    for m in meta:
        _assert_same(g.metadata[m.key], _expected(m.value, m.vtype, m.sub_type), m.key)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strings=st.lists(
        st.one_of(st.text(max_size=12), st.binary(max_size=12), st.binary(min_size=120, max_size=300)),
        min_size=1,
        max_size=12,
    ),
    n=st.integers(1024, 3000),
)
def test_long_string_arrays_read_as_the_checked_loop_reads_them(
    strings: list[str | bytes], n: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # arrays of >= 1024 strings (a vocabulary) take the compiled scan; texts with NULs, bytes
    # that are not UTF-8 and lengths >= 128 (a length prefix that is not ASCII) included
    items = [strings[i % len(strings)] for i in range(n)]
    path = build([kv("v.tokens", ARRAY, array(STRING, items)), kv_string("v.after", "end")]).write(
        tmp_path_factory.mktemp("strs", numbered=True) / "s.gguf"
    )
    got = GGUFFile(path).metadata
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lmap.gguf._SCAN_MIN", 1 << 62)
        want = GGUFFile(path).metadata
    assert got["v.tokens"] == want["v.tokens"] and got["v.after"] == want["v.after"] == "end"
    assert [t.encode("utf-8", "surrogateescape") for t in got["v.tokens"]] == [
        t if isinstance(t, bytes) else t.encode("utf-8", "surrogatepass") for t in items
    ]


def test_compiled_string_scan_indexes_in_place_and_reports() -> None:
    from lmap.kernels.strings import pack_strings, string_offsets

    records = b"".join(struct.pack("<Q", len(x)) + x for x in (b"ab", b"", b"\xc3\xa9"))
    buf = np.frombuffer(b"xx" + records, np.uint8)
    offsets = np.empty(4, np.int32)
    assert string_offsets(buf, 2, 3, offsets, 2**31 - 1) == len(buf)
    assert offsets.tolist() == [0, 10, 18, 28]  # record offsets from pos: string i at data[o[i] : o[i + 1] - 8]
    a = StringArray(buf[10:], offsets, gap=8)
    assert [a.raw(i) for i in range(3)] == [b"ab", b"", b"\xc3\xa9"] and a.tolist() == ["ab", "", "é"]
    out = np.empty(6, np.uint8)
    assert pack_strings(a.data, offsets, 8, out) and out.tobytes() == b"ab\0\0\xc3\xa9"
    assert string_offsets(buf[:-1], 2, 3, offsets, 2**31 - 1) == -3  # the third string runs past the end
    assert string_offsets(buf[:12], 2, 3, offsets, 2**31 - 1) == -2  # the second's length prefix is cut
    assert string_offsets(buf, 2, 3, offsets, 17) == -2 - 3  # an offset past what the dtype holds
    holds_nul = np.frombuffer(struct.pack("<Q", 1) + b"\0", np.uint8)
    assert not pack_strings(holds_nul[8:], np.array([0, 9]), 8, np.empty(1, np.uint8))


def test_offsets_past_the_int32_limit_become_int64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmap.gguf as gguf_module

    items = [f"tok{i:030d}" for i in range(1500)]  # 62 kB of records
    path = build([kv("v.tokens", ARRAY, array(STRING, items))]).write(tmp_path / "s.gguf")
    assert GGUFFile(path).metadata["v.tokens"].offsets.dtype == np.int32
    monkeypatch.setattr(gguf_module, "offset_dtype", lambda end: np.int16)  # which cannot hold them
    strings = GGUFFile(path).metadata["v.tokens"]
    assert strings.offsets.dtype == np.int64 and strings == items


@pytest.mark.parametrize("use_mmap", [True, False])
def test_long_string_and_numeric_arrays_are_views_of_the_file(tmp_path: Path, use_mmap: bool) -> None:
    items = [f"t{i}" for i in range(1100)]
    kvs = [
        kv("v.tokens", ARRAY, array(STRING, items)),
        kv("v.f32", ARRAY, array(F32, [0.5 * i for i in range(1100)])),  # unaligned: after odd-length strings
        kv("v.i32", ARRAY, array(I32, list(range(-5, 1095)))),
        kv("v.u8", ARRAY, array(U8, [1, 2, 3])),
        kv("v.bool", ARRAY, array(BOOL, [True, False, True])),
    ]
    g = GGUFFile(build(kvs).write(tmp_path / "v.gguf"), use_mmap=use_mmap)
    md = g.metadata
    tokens = md["v.tokens"]
    assert isinstance(tokens, StringArray) and tokens.gap == 8 and tokens == items
    assert np.shares_memory(tokens.data, g.data) and not tokens.data.flags.writeable
    assert tokens.nbytes < tokens.data.nbytes + tokens.offsets.nbytes + 1  # no table until a lookup wants one
    for key, want in (("v.f32", np.arange(1100) * 0.5), ("v.i32", np.arange(-5, 1095)), ("v.u8", [1, 2, 3])):
        arr = md[key]
        assert np.shares_memory(arr, g.data), key  # a view, not a copy ...
        assert not arr.flags.writeable, key  # ... that nobody can write through (not even without mmap)
        np.testing.assert_array_equal(arr, want)
    assert not md["v.f32"].flags.aligned and md["v.i32"].flags.aligned  # GGUF does not pad metadata
    assert md["v.bool"].dtype == np.bool_ and md["v.bool"].tolist() == [True, False, True]
    assert not np.shares_memory(md["v.bool"], g.data)  # bool: a copy (the file's bytes need not be 0/1)
    with pytest.raises(ValueError, match="read-only"):
        md["v.i32"][0] = 1


def test_a_long_string_array_is_a_string_array(tmp_path: Path) -> None:
    items = [f"tok{i}" for i in range(2000)]
    path = build([kv("v.tokens", ARRAY, array(STRING, items)), kv("v.short", ARRAY, array(STRING, ["a"]))]).write(
        tmp_path / "s.gguf"
    )
    md = GGUFFile(path).metadata
    assert isinstance(md["v.tokens"], StringArray) and isinstance(md["v.short"], list)
    assert md["v.tokens"] == items and md["v.tokens"][-1] == "tok1999" and md["v.tokens"][3:5] == ["tok3", "tok4"]
    assert md["v.tokens"].find("tok1234") == 1234 and "tok2000" not in md["v.tokens"]


def test_a_long_string_array_cut_short_names_the_string(tmp_path: Path) -> None:
    payload = array(STRING, [f"tok{i}" for i in range(2000)])
    full = build([kv("v.tokens", ARRAY, payload)])
    data = full.write(tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: data.index(b"tok1500")])
    with pytest.raises(GGUFError, match=r"'v.tokens': (truncated string #1500|string #1500 length)"):
        GGUFFile(cut)


# ------------------------------------------------------------------ tensors
def _tensor_set() -> list[tuple[str, np.ndarray, QT | None, np.ndarray]]:
    """(name, array to write, raw_dtype, expected view contents); sizes chosen to need padding."""
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f16 = rng.standard_normal((2, 3, 7)).astype(np.float16)
    f32_4d = rng.standard_normal((2, 1, 3, 2)).astype(np.float32)
    w8 = rng.standard_normal((5, 64)).astype(np.float32)
    q8 = quantize(w8, QT.Q8_0)
    w41 = rng.standard_normal((2, 3, 96)).astype(np.float32)
    q41 = quantize(w41, QT.Q4_1)
    i32 = np.arange(-3, 8, dtype=np.int32)
    return [
        ("f32", f32, None, f32),
        ("f16", f16, None, f16),
        ("f32_4d", f32_4d, None, f32_4d),
        ("blk.0.q8_0", q8, QT.Q8_0, q8.reshape(5, 68)),
        ("blk.0.q4_1", q41, QT.Q4_1, q41.reshape(6, 60)),
        ("i32", i32, None, i32),
    ]


@pytest.fixture(scope="module", params=[None, 64, 1], ids=["align_default", "align_64", "align_1"])
def tensor_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    tensors = [(n, a, q) for n, a, q, _ in _tensor_set()]
    path = tmp_path_factory.mktemp("tensors") / "t.gguf"
    write_reference(path, [Meta("t.note", "tensors", VT.STRING)], tensors, alignment=request.param)
    return path, request.param or 32


@pytest.mark.parametrize("use_mmap", [True, False])
def test_tensors_match_gguf_reader(tensor_file: tuple[Path, int], use_mmap: bool) -> None:
    path, align = tensor_file
    g = GGUFFile(path, use_mmap=use_mmap)
    r = gguf.GGUFReader(path)
    assert g.alignment == align and g.data_offset == r.data_offset and g.data_offset % align == 0
    assert [t.name for t in r.tensors] == list(g.tensors)
    expected = {n: e for n, _, _, e in _tensor_set()}
    for rt in r.tensors:
        info = g.tensors[rt.name]
        assert info.name == rt.name
        assert info.shape == tuple(int(d) for d in rt.shape)
        assert info.format.type_id == int(rt.tensor_type) and info.format.name == rt.tensor_type.name
        assert info.offset == rt.data_offset and (info.offset - g.data_offset) % align == 0
        assert info.nbytes == rt.n_bytes and info.n_elements == rt.n_elements
        assert info.n_rows * info.shape[0] == info.n_elements
        view = g.tensor(rt.name)
        assert view.nbytes == info.nbytes
        if info.format.block_size == 1:  # element formats: same dtype and shape as gguf's reader
            assert view.dtype == rt.data.dtype and view.shape == rt.data.shape
            np.testing.assert_array_equal(view, rt.data)
        else:  # block formats: rows of raw blocks
            assert view.dtype == np.uint8 and view.shape == (info.n_rows, info.format.row_bytes(info.shape[0]))
            np.testing.assert_array_equal(view, rt.data.reshape(view.shape))
        np.testing.assert_array_equal(view, expected[rt.name])
        # zero-copy: a view of the file's bytes, not a copy
        root = _root(view)
        if use_mmap:
            assert isinstance(root, memoryview) and isinstance(root.obj, mmap.mmap)
            assert not view.flags.writeable
        else:
            assert isinstance(root, np.ndarray) and root.nbytes == path.stat().st_size
        assert np.shares_memory(view, g.tensor(rt.name))
        # ... and it starts exactly info.offset bytes into the file's buffer
        assert view.ctypes.data - np.frombuffer(root, np.uint8).ctypes.data == info.offset


def test_mmap_and_read_give_equal_tensors(tensor_file: tuple[Path, int]) -> None:
    path, _ = tensor_file
    a, b = GGUFFile(path), GGUFFile(path, use_mmap=False)
    assert a.metadata.keys() == b.metadata.keys() and a.tensors == b.tensors
    for name in a.tensors:
        va, vb = a.tensor(name), b.tensor(name)
        assert va.dtype == vb.dtype and va.shape == vb.shape
        assert va.tobytes() == vb.tobytes()
        assert not np.shares_memory(va, vb)


def test_views_outlive_close(tensor_file: tuple[Path, int]) -> None:
    path, _ = tensor_file
    with GGUFFile(path) as g:
        v = g.tensor("f32")
        want = v.copy()
        assert "GGUFFile(" in repr(g)
    np.testing.assert_array_equal(v, want)  # the mapping stays while a view holds it
    with pytest.raises(GGUFError, match="no tensor named 'nope'"):
        GGUFFile(path).tensor("nope")


def test_v2_header_reads_like_v3(tensor_file: tuple[Path, int], tmp_path: Path) -> None:
    path, _ = tensor_file
    raw = bytearray(path.read_bytes())
    assert raw[4:8] == struct.pack("<I", 3)
    raw[4:8] = struct.pack("<I", 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(raw))
    g2, g3 = GGUFFile(v2), GGUFFile(path)
    assert (g2.version, g3.version) == (2, 3)
    assert g2.tensors == g3.tensors
    assert g2.data_offset == g3.data_offset and g2.alignment == g3.alignment
    assert g2.metadata == g3.metadata
    for name in g3.tensors:
        assert g2.tensor(name).tobytes() == g3.tensor(name).tobytes()


def test_custom_alignment_offsets(tmp_path: Path) -> None:
    # by hand: alignment 64 with tensors whose sizes are not multiples of it
    a = np.arange(8, dtype="<f4").tobytes()  # 32 bytes
    b = np.arange(32, dtype="<f4").tobytes()  # 128 bytes
    infos = [tensor_info("a", (8,), GGML_F32, 0), tensor_info("b", (32,), GGML_F32, 64)]
    kvs = [kv_scalar("general.alignment", U32, 64)]
    built = build(kvs, infos, a + bytes(32) + b, alignment=64)
    g = GGUFFile(built.write(tmp_path / "a64.gguf"))
    assert g.alignment == 64 and g.data_offset == built.data_offset and g.data_offset % 64 == 0
    assert g.tensors["a"].offset == g.data_offset and g.tensors["b"].offset == g.data_offset + 64
    np.testing.assert_array_equal(g.tensor("b"), np.arange(32, dtype=np.float32))
    assert gguf.GGUFReader(tmp_path / "a64.gguf").data_offset == g.data_offset


# ------------------------------------------------------------------ the block-format table
def test_formats_table_matches_gguf() -> None:
    both = [t for t in GGML_QUANT_SIZES if int(t) in FORMATS]
    assert len(both) >= 30
    for t in both:
        f = FORMATS[int(t)]
        assert (f.name, f.block_size, f.type_size) == (t.name, *GGML_QUANT_SIZES[t]), t.name
    for type_id, f in FORMATS.items():
        assert GGMLQuantizationType(type_id).name == f.name  # every id lmap knows, gguf knows by that name
        assert FORMATS_BY_NAME[f.name] is f and f.type_id == type_id
        assert f.row_bytes(f.block_size * 3) == 3 * f.type_size


def test_formats_unknown_to_lmap_are_rejected_cleanly(tmp_path: Path) -> None:
    unknown = [t for t in GGML_QUANT_SIZES if int(t) not in FORMATS]
    for t in unknown:
        bs = GGML_QUANT_SIZES[t][0]
        built = build([], [tensor_info("w", (bs,), int(t), 0)], bytes(GGML_QUANT_SIZES[t][1]))
        msg = _error(built.write(tmp_path / f"{t.name}.gguf"))
        assert f"unknown ggml type id {int(t)}" in msg and "offset" in msg


# ------------------------------------------------------------------ malformed files
def _nested(levels: int) -> bytes:
    """An array nested ``levels`` deep whose innermost array holds one u8."""
    payload = array(U8, [1])
    for _ in range(levels - 1):
        payload = array(ARRAY, [payload])
    return payload


def _cases() -> list[Any]:
    """(bytes, substrings the message must hold, byte offset it must name or None)."""
    m = minimal()
    one_kv = [kv_string("general.architecture", "test")]
    c: list[Any] = []

    def case(id_: str, data: bytes, subs: list[str], offset: int | None) -> None:
        c.append(pytest.param(data, subs, offset, id=id_))

    case("magic", minimal(magic=b"GGML").data, ["magic", "b'GGML'"], 0)
    case("magic_zero", bytes(64), ["magic"], 0)
    case("empty", b"", ["0 bytes", "header"], None)
    case("shorter_than_header", m.data[:23], ["23 bytes", "header"], None)
    case("just_magic", b"GGUF", ["4 bytes"], None)
    for v in (0, 1, 4, 2**32 - 1):
        case(f"version_{v}", minimal(version=v).data, [f"version {v}"], 4)
    be = build([kv_string("general.architecture", "test", e=">")], e=">")
    case("big_endian", be.data, ["big-endian"], 4)
    case("kv_count_huge", minimal(n_kv=2**40).data, ["kv_count 1099511627776"], 16)
    case("kv_count_max", minimal(n_kv=2**64 - 1).data, ["kv_count"], 16)
    case("tensor_count_huge", minimal(n_tensors=2**40).data, ["tensor_count 1099511627776"], 8)
    case("tensor_count_max", minimal(n_tensors=2**64 - 1).data, ["tensor_count"], 8)

    b = build([*one_kv, struct.pack("<Q", 2**62) + b"abc"])
    case("key_length_past_eof", b.data, ["metadata key #1", "string length 4611686018427387904"], b.kv_at[1])
    b = build([*one_kv, struct.pack("<Q", 5) + b"ab"], pad=False)
    case("key_bytes_past_eof", b.data, ["metadata key #1", "string length 5"], b.kv_at[1])
    b = build([*one_kv, b"\x01\x00\x00"], pad=False)
    case("key_length_cut", b.data, ["metadata key #1 length", "truncated"], b.kv_at[1])
    b = build([*one_kv, gstr("k")], pad=False)
    case("value_type_cut", b.data, ["type of 'k'", "truncated"], b.kv_at[1] + 9)
    b = build([*one_kv, kv("k", U64, b"\x01\x02")], pad=False)
    case("scalar_value_cut", b.data, ["value of 'k'", "truncated"], b.kv_at[1] + 13)
    b = build([*one_kv, kv("k", STRING, struct.pack("<Q", 1000) + b"xx")])
    case("string_length_past_eof", b.data, ["value of 'k'", "string length 1000"], b.kv_at[1] + 13)
    b = build([*one_kv, kv("k", ARRAY, struct.pack("<IQ", U32, 2**61))])
    case("array_length_past_eof", b.data, ["'k'", "array of 2305843009213693952 uint32"], b.kv_at[1] + 9)
    b = build([*one_kv, kv("k", ARRAY, struct.pack("<IQ", U32, 3) + bytes(8))], pad=False)
    case("array_data_cut", b.data, ["'k'", "array of 3 uint32"], b.kv_at[1] + 9)
    b = build([*one_kv, kv("k", ARRAY, struct.pack("<IQ", STRING, 2**60))])
    case("string_array_length_past_eof", b.data, ["'k'", "array of 1152921504606846976 strings"], b.kv_at[1] + 9)
    b = build([*one_kv, kv("k", ARRAY, struct.pack("<IQ", STRING, 2) + gstr("ab") + struct.pack("<Q", 10**6) + b"x")])
    case("string_in_array_past_eof", b.data, ["'k'", "string #1 length 1000000"], b.kv_at[1] + 35)
    b = build([*one_kv, kv("k", ARRAY, struct.pack("<IQ", STRING, 3) + gstr("ab") + gstr("cd") + bytes(5))], pad=False)
    case("string_in_array_cut", b.data, ["'k'", "truncated string #2"], b.kv_at[1] + 45)
    b = build([*one_kv, kv("k", ARRAY, struct.pack("<IQ", ARRAY, 2**59))])
    case("nested_array_length_past_eof", b.data, ["'k'", "array of 576460752303423488 arrays"], b.kv_at[1] + 9)
    for vt in (13, 2**32 - 1):
        b = build([*one_kv, kv("k", vt, bytes(16))])
        case(f"unknown_value_type_{vt}", b.data, ["'k'", f"unknown value type {vt}"], b.kv_at[1] + 9)
    b = build([*one_kv, kv("k", ARRAY, struct.pack("<IQ", 13, 1) + bytes(16))])
    case("unknown_array_element_type", b.data, ["'k'", "unknown array element type 13"], b.kv_at[1] + 9)
    b = build([*one_kv, kv("k", ARRAY, _nested(10))])
    case("arrays_nested_too_deep", b.data, ["'k'", "nested deeper"], b.kv_at[1] + 9)
    b = build([*one_kv, kv_scalar("k", U8, 1), kv_scalar("k", U8, 2)])
    case("duplicate_key", b.data, ["duplicate metadata key 'k'"], b.kv_at[2])

    data = bytes(512)
    b = build(one_kv, [tensor_info("t", (32, 2), GGML_F32, 0), tensor_info("t", (32, 2), GGML_F32, 256)], data)
    case("duplicate_tensor", b.data, ["duplicate tensor name 't'"], b.info_at[1])
    b = build(one_kv, [tensor_info("t", (), GGML_F32, 0)], data)
    case("n_dims_0", b.data, ["tensor 't'", "n_dims 0"], b.info_at[0] + 9)
    b = build(one_kv, [tensor_info("t", (32, 1, 1, 1, 1), GGML_F32, 0)], data)
    case("n_dims_5", b.data, ["tensor 't'", "n_dims 5"], b.info_at[0] + 9)
    b = build(one_kv, [tensor_info("t", (32,), GGML_F32, 0, n_dims=2**32 - 1)], data)
    case("n_dims_huge", b.data, ["tensor 't'", "n_dims 4294967295"], b.info_at[0] + 9)
    for tid in (4, 5, 31, 1000, 2**32 - 1):
        b = build(one_kv, [tensor_info("t", (32, 2), tid, 0)], data)
        case(f"unknown_ggml_type_{tid}", b.data, ["tensor 't'", f"unknown ggml type id {tid}"], b.info_at[0] + 29)
    b = build(one_kv, [tensor_info("t", (33, 2), GGML_Q8_0, 0)], data)
    case("row_not_multiple_of_block", b.data, ["tensor 't'", "row length 33", "Q8_0 block size 32"], b.info_at[0] + 13)
    b = build(one_kv, [tensor_info("t", (2**63, 1), GGML_F32, 0)], data)
    case("dimension_absurd", b.data, ["tensor 't'", "dimension 9223372036854775808"], b.info_at[0] + 13)
    b = build(one_kv, [tensor_info("t", (2**32, 2**31), GGML_F32, 0)], data)
    case("elements_absurd", b.data, ["tensor 't'", "elements"], b.info_at[0] + 13)
    b = build(one_kv, [tensor_info("t", (32, 2), GGML_F32, 4)], data)
    case("offset_not_aligned", b.data, ["tensor 't'", "offset 4", "alignment 32"], b.info_at[0] + 33)
    b = build(one_kv, [tensor_info("t", (32, 2), GGML_F32, 0)], bytes(255))
    case("tensor_data_past_eof", b.data, ["tensor 't'", "past the end"], b.data_offset)
    b = build(one_kv, [tensor_info("t", (32, 2), GGML_F32, 2**63)], data)
    case("tensor_offset_huge", b.data, ["tensor 't'", "past the end"], b.data_offset + 2**63)
    b = build(one_kv, [tensor_info("t", (32, 2), GGML_F32, 0)], pad=False)
    case("data_section_past_eof", b.data, ["data section starts", "past the end"], len(b.data))
    case("kv_count_one_too_many", minimal(n_kv=3).data, ["tensor"], None)
    case("tensor_count_one_too_many", minimal(n_tensors=2).data, ["n_dims 0"], None)

    for align in (0, 3, 48, 2**32 - 1):
        b = build([kv_scalar("general.alignment", U32, align)], [tensor_info("t", (32,), GGML_F32, 0)], bytes(128))
        case(f"alignment_{align}", b.data, ["general.alignment", "power of two"], b.kv_at[0] + 25)
    b = build([kv_string("general.alignment", "64")])
    case("alignment_string", b.data, ["general.alignment", "power of two"], b.kv_at[0] + 25)
    b = build([kv_scalar("general.alignment", BOOL, True)])
    case("alignment_bool", b.data, ["general.alignment", "power of two"], b.kv_at[0] + 25)
    b = build([kv_scalar("general.alignment", U64, 2**63)], [tensor_info("t", (32,), GGML_F32, 0)], bytes(128))
    case("alignment_2_63", b.data, ["data section starts"], None)
    return c


@pytest.mark.parametrize(("data", "subs", "offset"), _cases())
@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "read"])
def test_malformed_file_raises_gguf_error(
    tmp_path: Path, data: bytes, subs: list[str], offset: int | None, use_mmap: bool
) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    msg = _error(path, use_mmap=use_mmap)
    assert str(path) in msg
    for s in subs:
        assert s in msg, f"{s!r} not in {msg!r}"
    if offset is not None:
        assert f"byte offset {offset})" in msg, msg


def test_nesting_limit_boundary(tmp_path: Path) -> None:
    """Nine levels load (a list of lists ... of one u8 array); ten are refused above."""
    g = GGUFFile(build([kv("k", ARRAY, _nested(9))]).write(tmp_path / "n9.gguf"))
    v = g.metadata["k"]
    for _ in range(8):
        assert isinstance(v, list) and len(v) == 1
        v = v[0]
    _assert_same(v, np.array([1], np.uint8), "innermost")


def test_valid_hand_built_files_load(tmp_path: Path) -> None:
    """The builder's baseline files are valid (so the cases above fail for the stated reason)."""
    for i, b in enumerate(
        [
            minimal(),
            minimal(version=2),
            build(
                [kv_scalar("general.alignment", U32, 1)],
                [tensor_info("t", (3,), GGML_F32, 0)],
                np.ones(3, "<f4").tobytes(),
                alignment=1,
            ),
        ]
    ):
        g = GGUFFile(b.write(tmp_path / f"ok{i}.gguf"))
        assert g.data_offset == b.data_offset
        assert gguf.GGUFReader(tmp_path / f"ok{i}.gguf").data_offset == b.data_offset
    np.testing.assert_array_equal(
        GGUFFile(tmp_path / "ok0.gguf").tensor("t"), np.arange(64, dtype=np.float32).reshape(2, 32)
    )


def test_missing_path_and_directory(tmp_path: Path) -> None:
    msg = _error(tmp_path / "nope.gguf")
    assert "nope.gguf" in msg and "no such file" in msg
    msg = _error(tmp_path)
    assert str(tmp_path) in msg and "directory" in msg


# ------------------------------------------------------------------ truncated real file
def _smollm2_cuts(path: Path) -> list[tuple[str, int, list[str]]]:
    g = GGUFFile(path)  # only to find where to cut; the assertions are about the cut copies
    with open(path, "rb") as f:
        head = f.read(g.data_offset)
    vocab = head.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 12
    infos = head.index(b"token_embd.weight")
    return [
        ("header_12", 12, ["12 bytes"]),
        ("header_24", 24, ["kv_count"]),
        ("vocab_start", vocab + 100_000, ["'tokenizer.ggml.tokens'"]),
        ("vocab_middle", vocab + 500_000, ["'tokenizer.ggml.tokens'"]),
        ("tensor_infos_name", infos + 5, ["tensor"]),
        ("tensor_infos_end", g.data_offset - 200, ["tensor"]),
        ("data_start", g.data_offset, ["past the end"]),
        ("data_early", g.data_offset + 4096, ["past the end"]),
        ("data_last_byte", g.size - 1, ["past the end"]),
    ]


def test_truncated_smollm2(smollm2_path: Path, tmp_path: Path) -> None:
    cuts = _smollm2_cuts(smollm2_path)
    with open(smollm2_path, "rb") as f:
        for label, at, subs in cuts:
            f.seek(0)
            path = tmp_path / f"{label}.gguf"
            path.write_bytes(f.read(at))
            msg = _error(path)
            for s in subs:
                assert s in msg, (label, msg)
            assert at <= 24 or "offset" in msg, (label, msg)
            path.unlink()


# ------------------------------------------------------------------ the real models against gguf's reader
def _reference_reader(path: Path) -> gguf.GGUFReader:
    """``gguf.GGUFReader`` over a plain array on an mmap instead of ``np.memmap``: the same parsing, but
    without memmap's per-slice overhead (gemma's 262k-token vocabulary: ~5 s instead of ~19 s)."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    plain = np.frombuffer(m, np.uint8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf.gguf_reader.np, "memmap", lambda *args, **kwargs: plain)
        return gguf.GGUFReader(path)


def _compare_with_reader(path: Path) -> GGUFFile:
    g = GGUFFile(path)
    r = _reference_reader(path)
    assert g.version == int(r.fields["GGUF.version"].contents())
    assert g.alignment == r.alignment and g.data_offset == r.data_offset
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert list(g.metadata) == keys
    for k in keys:
        f = r.fields[k]
        got, want = g.metadata[k], f.contents()
        if f.types[0] == VT.ARRAY:
            assert g.metadata_types[k] == f"array[{f.types[-1].name.lower()}]", k
            if isinstance(got, np.ndarray):
                assert got.dtype == _NUMPY_OF[f.types[-1]], k
                np.testing.assert_array_equal(got, np.array(want, dtype=got.dtype), err_msg=k)
            else:
                assert got == want, k
        else:
            assert g.metadata_types[k] == f.types[0].name.lower(), k
            assert type(got) is type(want) and got == want, k
    assert [t.name for t in r.tensors] == list(g.tensors)
    for rt in r.tensors:
        info = g.tensors[rt.name]
        assert info.shape == tuple(int(d) for d in rt.shape), rt.name
        assert info.format.type_id == int(rt.tensor_type) and info.format.name == rt.tensor_type.name, rt.name
        assert info.offset == rt.data_offset and info.nbytes == rt.n_bytes, rt.name
        view = g.tensor(rt.name)
        assert np.array_equal(view.reshape(-1).view(np.uint8), rt.data.reshape(-1).view(np.uint8)), rt.name
    return g


@pytest.mark.slow
def test_smollm2_matches_gguf_reader(smollm2_path: Path) -> None:
    g = _compare_with_reader(smollm2_path)
    assert g.architecture == "llama" and len(g.metadata["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.slow
def test_gemma3_matches_gguf_reader(gemma3_path: Path) -> None:
    g = _compare_with_reader(gemma3_path)
    assert g.architecture == "gemma3"


def test_gemma3_parse_time(gemma3_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Measured and printed, never asserted: timing belongs to benchmarks, not tests."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        g = GGUFFile(gemma3_path)
        times.append(time.perf_counter() - t0)
        g.close()
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 262144 and len(g.tensors) == 236
    with capsys.disabled():
        print(
            f"\n[test_gguf] GGUFFile({gemma3_path.name}): parse {min(times) * 1e3:.0f} ms best of 3 "
            f"(first {times[0] * 1e3:.0f} ms), 262144-token vocabulary, {len(g.tensors)} tensors"
        )


# ------------------------------------------------------------------ fuzzing
@contextlib.contextmanager
def _bounded(seconds: float, max_bytes: int) -> Iterator[None]:
    """Fail (not hang) after ``seconds``; fail if Python/NumPy allocated more than ``max_bytes`` at peak."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"GGUFFile did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1]
        if not was_tracing:
            tracemalloc.stop()
    assert peak < max_bytes, f"peak allocation {peak} bytes"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 256 * 1024, "max RSS grew by > 256 MiB"


def _load_or_gguf_error(path: Path, use_mmap: bool) -> GGUFFile | None:
    """Load, or raise GGUFError: anything else fails the test. Loaded tensors must be viewable."""
    with _bounded(5.0, 8 << 20):
        try:
            g = GGUFFile(path, use_mmap=use_mmap)
        except GGUFError as e:
            assert str(e).startswith(str(path))
            return None
        size = path.stat().st_size
        assert g.data_offset % g.alignment == 0
        for name, info in g.tensors.items():
            assert g.data_offset <= info.offset and info.offset + info.nbytes <= size
            assert g.tensor(name).nbytes == info.nbytes
        repr(g)
        g.close()
        return g


@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[tuple[int, int]], Path]:
    """A small valid GGUF (scalars, string arrays, a nested array, 2 tensors) and its integer fields."""
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(1)
    meta = [
        Meta("test.n", 7, VT.UINT32),
        Meta("test.eps", 1e-5, VT.FLOAT32),
        Meta("test.flag", True, VT.BOOL),
        Meta("tokenizer.ggml.tokens", ["<s>", "a", "bc", "déf", ""], VT.ARRAY, VT.STRING),
        Meta("tokenizer.ggml.scores", [0.0, -1.0, -2.5, 3.0, 1.0], VT.ARRAY, VT.FLOAT32),
        Meta("test.nested", [["x", "y"], ["z"]], VT.ARRAY, VT.ARRAY),
    ]
    tensors = [
        ("w.f32", rng.standard_normal((2, 8)).astype(np.float32), None),
        ("w.q8", quantize(rng.standard_normal((2, 32)).astype(np.float32), QT.Q8_0), QT.Q8_0),
    ]
    path = write_reference(d / "seed.gguf", meta, tensors)
    fields = numeric_fields(gguf.GGUFReader(path))
    assert len(fields) > 20
    return path.read_bytes(), fields, d


def test_fuzz_seed_is_valid(fuzz_seed: tuple[bytes, list[tuple[int, int]], Path]) -> None:
    data, _, d = fuzz_seed
    (d / "ok.gguf").write_bytes(data)
    g = _load_or_gguf_error(d / "ok.gguf", True)
    assert g is not None and len(g.tensors) == 2 and g.metadata["test.nested"] == [["x", "y"], ["z"]]


def test_every_truncation(fuzz_seed: tuple[bytes, list[tuple[int, int]], Path]) -> None:
    """Every prefix of the seed is refused with a GGUFError, unless it keeps all of the tensor data
    (GGUFWriter pads after the last tensor): exhaustive, not sampled."""
    data, _, d = fuzz_seed
    path = d / "cut.gguf"
    path.write_bytes(data)
    end = max(i.offset + i.nbytes for i in GGUFFile(path).tensors.values())
    for n in range(len(data)):
        path.write_bytes(data[:n])
        loaded = _load_or_gguf_error(path, use_mmap=n % 2 == 0)
        assert (loaded is not None) == (n >= end), n


_HUGE_U64 = [0, 1, 2, 0xFF, 2**31, 2**32 - 1, 2**32, 2**48, 2**60, 2**62, 2**63, 2**64 - 2, 2**64 - 1]
_HUGE_U32 = [0, 1, 2, 4, 5, 8, 9, 12, 13, 31, 255, 2**16, 2**31, 2**32 - 1]


@settings(max_examples=200, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_corrupted_seed(fuzz_seed: tuple[bytes, list[tuple[int, int]], Path], data: st.DataObject) -> None:
    seed, fields, d = fuzz_seed
    raw = bytearray(seed)
    n_edits = data.draw(st.integers(1, 4), label="edits")
    for _ in range(n_edits):
        kind = data.draw(st.sampled_from(["field", "field", "byte", "truncate"]), label="kind")
        if kind == "field":  # a count, length, type id, dim or offset: set to something extreme or random
            at, size = data.draw(st.sampled_from(fields), label="field")
            if at + size > len(raw):
                continue
            old = int.from_bytes(raw[at : at + size], "little")
            bits = 8 * size
            value = data.draw(
                st.one_of(
                    st.sampled_from(_HUGE_U64 if size == 8 else _HUGE_U32),
                    st.integers(0, 2**bits - 1),
                    st.integers(-3, 3).map(lambda k, o=old, b=bits: (o + k) % 2**b),
                ),
                label="value",
            )
            raw[at : at + size] = value.to_bytes(size, "little")
        elif kind == "byte" and raw:
            at = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[at] = data.draw(st.integers(0, 255), label="byte")
        elif kind == "truncate":
            del raw[data.draw(st.integers(0, len(raw)), label="cut") :]
    path = d / "fuzz.gguf"
    path.write_bytes(bytes(raw))
    _load_or_gguf_error(path, use_mmap=data.draw(st.booleans(), label="use_mmap"))
