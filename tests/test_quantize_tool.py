"""``lmap quantize``: per-tensor type choice as llama-quantize makes it, the streaming writer, and safety.

References nobody here wrote: ``gguf.GGUFWriter`` makes the synthetic inputs, ``gguf.GGUFReader``
and ``gguf.quants.quantize`` check the outputs, and tests/fixtures/quantize_types_*.json hold
what llama.cpp's llama-quantize wrote for the real models (scripts/make_quantize_type_fixture.py):
each tensor's type per preset and each output's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf_builders import (
    ARRAY,
    BOOL,
    GGML_F32,
    I32,
    STRING,
    U8,
    U32,
    Meta,
    array,
    build,
    kv,
    kv_scalar,
    kv_string,
    tensor_info,
    write_reference,
)

from lmap.cli import main
from lmap.errors import InvalidParameterError, LmapError, UnsupportedModelError
from lmap.gguf import GGUFFile
from lmap.gguf_writer import GGUFWriteError, GGUFWriter
from lmap.quantize import (
    PRESETS,
    allows_quantization,
    llama_order,
    load_imatrix,
    plan_types,
    quantize_model,
    resolve_type,
    tensor_category,
)
from lmap.quants.formats import FORMATS_BY_NAME
from lmap.quants.quantize import SUPPORTED, quantize_rows

FIXTURES = Path(__file__).parent / "fixtures"
CHANGED_KEYS = {"general.file_type", "general.quantization_version"}


# ---------------------------------------------------------------------- helpers
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if "lmap-tmp" in p.name]


def one_line_error(capsys: pytest.CaptureFixture[str], rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "compiled kernels" not in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("lmap: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


RNG = np.random.default_rng(7)
N_EMBD, N_FF, N_VOCAB = 256, 512, 64


def tiny_llama_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 2-layer llama-shaped set of weights (NumPy shapes: [rows, cols])."""
    t: dict[str, np.ndarray] = {"token_embd.weight": rng.standard_normal((N_VOCAB, N_EMBD), np.float32)}
    for i in range(2):
        for n, shape in (
            ("attn_q", (N_EMBD, N_EMBD)),
            ("attn_k", (N_EMBD // 2, N_EMBD)),
            ("attn_v", (N_EMBD // 2, N_EMBD)),
            ("attn_output", (N_EMBD, N_EMBD)),
            ("ffn_gate", (N_FF, N_EMBD)),
            ("ffn_up", (N_FF, N_EMBD)),
            ("ffn_down", (N_EMBD, N_FF)),
        ):
            t[f"blk.{i}.{n}.weight"] = (rng.standard_normal(shape, np.float32) * 0.05).astype(np.float32)
        t[f"blk.{i}.attn_norm.weight"] = rng.standard_normal(N_EMBD, np.float32)
        t[f"blk.{i}.ffn_norm.weight"] = rng.standard_normal(N_EMBD, np.float32)
    t["output_norm.weight"] = np.ones(N_EMBD, np.float32)
    return t


def write_tiny(
    path: Path, tensors: dict[str, np.ndarray], qtype: str = "F32", extra_meta: list[Meta] | None = None
) -> Path:
    """The tensors written by gguf.GGUFWriter; 2-D ones in ``qtype`` (1-D stay F32)."""
    GT = gguf.GGUFValueType
    meta = [
        Meta("llama.block_count", 2, GT.UINT32),
        Meta("llama.embedding_length", N_EMBD, GT.UINT32),
        Meta("llama.feed_forward_length", N_FF, GT.UINT32),
        Meta("llama.attention.head_count", 4, GT.UINT32),
        Meta("llama.attention.head_count_kv", 2, GT.UINT32),
        Meta("llama.rope.freq_base", 10000.0, GT.FLOAT32),
        Meta("general.name", "tiny \u00e9\u4e2d", GT.STRING),
        Meta("test.bools", [True, False, True], GT.ARRAY, GT.BOOL),
        Meta("test.i16s", [-3, 7], GT.ARRAY, GT.INT16),
        Meta("test.f64", 2.5, GT.FLOAT64),
        Meta("test.i64", -(2**40), GT.INT64),
        Meta("test.strings", ["a", "", "\u00fc\u00df"], GT.ARRAY, GT.STRING),
        Meta("general.file_type", 0, GT.UINT32),
        *(extra_meta or []),
    ]
    qt = gguf.GGMLQuantizationType[qtype]
    items: list[tuple[str, np.ndarray, Any]] = []
    for name, arr in tensors.items():
        if arr.ndim == 1 or qtype == "F32":
            items.append((name, arr, None))
        elif qtype == "F16":
            items.append((name, arr.astype(np.float16), None))
        else:
            items.append((name, gguf.quants.quantize(arr, qt), qt))
    return write_reference(path, meta, items, arch="llama")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    tensors = tiny_llama_tensors(np.random.default_rng(1))
    return write_tiny(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf", tensors), tensors


# ---------------------------------------------------------------------- type names and choice
def test_resolve_type_names_aliases_and_numbers() -> None:
    assert resolve_type("q4_k_m") == ("Q4_K_M", 15)
    assert resolve_type("Q4_K") == ("Q4_K_M", 15)
    assert resolve_type("q5_k") == ("Q5_K_M", 17)
    assert resolve_type("Q3_K") == ("Q3_K_M", 12)
    assert resolve_type("bf16") == ("BF16", 32)
    assert resolve_type("7") == ("Q8_0", 7)
    assert resolve_type("0") == ("F32", 0)
    with pytest.raises(InvalidParameterError, match=r"unknown quantization type 'Q4_K_X'.*Q4_K_M"):
        resolve_type("Q4_K_X")
    with pytest.raises(InvalidParameterError):
        resolve_type("99")


def test_llama_order_is_by_layer_number_then_name() -> None:
    names = ["blk.10.attn_q.weight", "blk.2.ffn_up.weight", "token_embd.weight", "blk.2.attn_q.weight", "output.weight"]
    assert llama_order(names) == [
        "output.weight",
        "token_embd.weight",
        "blk.2.attn_q.weight",
        "blk.2.ffn_up.weight",
        "blk.10.attn_q.weight",
    ]


def test_which_tensors_may_be_quantized() -> None:
    assert allows_quantization("blk.0.attn_q.weight", (576, 576), "llama")
    assert allows_quantization("blk.0.ffn_down_exps.weight", (64, 32, 8), "llama")
    assert not allows_quantization("blk.0.attn_norm.weight", (576,), "llama")
    assert not allows_quantization("blk.0.attn_q_norm.weight", (64, 1), "llama")  # 1-D once trailing 1s go
    assert not allows_quantization("blk.0.ffn_gate_inp.weight", (576, 8), "llama")
    assert not allows_quantization("blk.0.attn_q.bias", (576, 2), "llama")
    assert not allows_quantization("position_embd.weight", (576, 512), "gpt2")
    assert tensor_category("blk.3.attn_v.weight") == "v"
    assert tensor_category("blk.3.ffn_down_exps.weight") == "down"
    assert tensor_category("per_layer_token_embd.weight") == "token_embd"


def test_plan_for_a_256_multiple_model(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    """Q4_K_M on rows of 256: tied token_embd -> Q6_K; attn_v and ffn_down of 'more bits' layers -> Q6_K."""
    path, _ = tiny
    with GGUFFile(path) as g:
        plan = {p.name: p.dst for p in plan_types(g, "Q4_K_M")}
        q2 = {p.name: p.dst for p in plan_types(g, "Q2_K")}
        q8 = {p.name: p.dst for p in plan_types(g, "Q8_0", token_embedding_type="F16")}
    assert plan["token_embd.weight"] == "Q6_K"  # no output.weight: it is the output matrix too
    # use_more_bits(i, 2): i >= 7*2//8 == 1, so layer 1 only
    assert plan["blk.0.attn_v.weight"] == "Q4_K" and plan["blk.1.attn_v.weight"] == "Q6_K"
    assert plan["blk.0.ffn_down.weight"] == "Q4_K" and plan["blk.1.ffn_down.weight"] == "Q6_K"
    assert plan["blk.0.attn_q.weight"] == "Q4_K" and plan["blk.1.ffn_up.weight"] == "Q4_K"
    assert plan["blk.0.attn_norm.weight"] == "F32"
    # Q2_K: attn_v Q3_K (n_gqa 2 < 4), ffn_down Q3_K, attn_output Q3_K
    assert q2["blk.0.attn_v.weight"] == "Q3_K" and q2["blk.1.ffn_down.weight"] == "Q3_K"
    assert q2["blk.0.attn_output.weight"] == "Q3_K" and q2["blk.0.attn_q.weight"] == "Q2_K"
    assert q8["token_embd.weight"] == "F16" and q8["blk.0.attn_q.weight"] == "Q8_0"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_types_match_llama_quantize(model: str, smollm2_path: Path, gemma3_path: Path) -> None:
    """Every preset and option variant recorded from llama-quantize: same tensors, order and types."""
    fx = json.loads((FIXTURES / f"quantize_types_{model}.json").read_text())
    path = smollm2_path if model == "smollm2" else gemma3_path
    with GGUFFile(path) as g:
        for label, rec in fx["presets"].items():
            preset, *opts = label.split()
            kw = {opts[i].lstrip("-").replace("-", "_"): opts[i + 1] for i in range(0, len(opts), 2)}
            kw = {k: v.upper() for k, v in kw.items()}
            plans = plan_types(g, preset, **kw)
            assert [p.name for p in plans] == fx["tensors"], label
            got = [p.dst for p in plans]
            want = rec["types"].split()
            diff = [(p.name, a, b) for p, a, b in zip(plans, got, want, strict=True) if a != b]
            assert not diff, f"{label}: {diff[:5]}"
            assert resolve_type(preset)[1] == rec["file_type"], label
    assert set(PRESETS) <= {k.split()[0] for k in fx["presets"]}


# ---------------------------------------------------------------------- writer
def test_writer_copies_every_metadata_type(tiny: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    src, _ = tiny
    out = tmp_path / "copy.gguf"
    with GGUFFile(src) as g, open(out, "wb") as f:
        w = GGUFWriter(f, alignment=g.alignment)
        for k, v in g.metadata.items():
            w.add_kv(k, g.metadata_types[k], v)
        for t in g.tensors.values():
            w.add_tensor(t.name, t.shape, t.format)
        w.write_header()
        for t in g.tensors.values():
            w.write_tensor(t.name, [g.tensor(t.name)])
        w.finish()
    # the same file gguf.GGUFWriter wrote, byte for byte (same layout rules as llama.cpp's gguf)
    assert out.read_bytes() == src.read_bytes()


def test_writer_nested_arrays_and_odd_strings(tmp_path: Path) -> None:
    """Hand-built keys gguf-py cannot write: an array of arrays, invalid UTF-8; copied byte for byte."""
    nested = array(ARRAY, [array(I32, [1, -2]), array(STRING, ["x", "yz"]), array(BOOL, [True])])
    built = build(
        [
            kv_string("general.architecture", "test"),
            kv_string("test.bad_utf8", b"ok\xff\xfe"),
            kv_scalar("test.u8", U8, 200),
            kv("test.nested", ARRAY, nested),
            kv("test.empty", ARRAY, array(STRING, [])),
        ],
        [tensor_info("t", (32, 1), GGML_F32, 0)],
        np.arange(32, dtype="<f4").tobytes(),
    )
    src = built.write(tmp_path / "nested.gguf")
    out = tmp_path / "nested-copy.gguf"
    with GGUFFile(src) as g, open(out, "wb") as f:
        w = GGUFWriter(f)
        for k, v in g.metadata.items():
            w.add_kv(k, g.metadata_types[k], v)
        w.add_tensor("t", (32, 1), FORMATS_BY_NAME["F32"])
        w.write_header()
        w.write_tensor("t", [g.tensor("t")])
        w.finish()
    assert out.read_bytes() == src.read_bytes()


def test_writer_refuses_misuse(tmp_path: Path) -> None:
    f32 = FORMATS_BY_NAME["F32"]
    with open(tmp_path / "x.gguf", "wb") as f:
        w = GGUFWriter(f)
        w.add_tensor("a", (32,), f32)
        w.add_tensor("b", (32,), f32)
        with pytest.raises(GGUFWriteError, match="duplicate"):
            w.add_tensor("a", (32,), f32)
        with pytest.raises(GGUFWriteError, match="block size"):
            w.add_tensor("c", (33,), FORMATS_BY_NAME["Q8_0"])
        with pytest.raises(GGUFWriteError, match="before the header"):
            w.write_tensor("a", [np.zeros(32, np.float32)])
        w.write_header()
        with pytest.raises(GGUFWriteError, match="out of order"):
            w.write_tensor("b", [np.zeros(32, np.float32)])
        with pytest.raises(GGUFWriteError, match="got 64 bytes"):
            w.write_tensor("a", [np.zeros(16, np.float32)])
        with pytest.raises(GGUFWriteError, match="never written"):
            w.finish()


# ---------------------------------------------------------------------- quantizing synthetic models
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16"])
def test_blocks_equal_gguf_quants(tiny: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, fmt: str) -> None:
    """From an F32 source every converted tensor is gguf.quants.quantize's bytes; 1-D ones are copied.

    (The tied token_embd would be Q6_K in the Q4/Q5 presets: --token-embedding-type keeps it in ``fmt``.)
    """
    src, tensors = tiny
    out = tmp_path / f"tiny-{fmt}.gguf"
    r = quantize_model(src, out, fmt, token_embedding_type=fmt)
    assert out.exists() and r.file_size == out.stat().st_size
    reader = gguf.GGUFReader(out)
    assert {t.name for t in reader.tensors} == set(tensors)
    qt = gguf.GGMLQuantizationType[fmt]
    for t in reader.tensors:
        arr = tensors[t.name]
        if arr.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(t.data), arr)
            continue
        assert t.tensor_type == qt, t.name
        want = gguf.quants.quantize(arr, qt)
        assert np.asarray(t.data).tobytes() == want.tobytes(), t.name
    with GGUFFile(src) as a, GGUFFile(out) as b:
        assert b.metadata["general.file_type"] == PRESETS[fmt][0]
        assert b.metadata["general.quantization_version"] == 2
        for k, v in a.metadata.items():
            if k not in CHANGED_KEYS:
                assert a.metadata_types[k] == b.metadata_types[k], k
                assert np.array_equal(v, b.metadata[k]) if isinstance(v, np.ndarray) else v == b.metadata[k], k
        assert set(b.metadata) == set(a.metadata) | CHANGED_KEYS
        assert b.data_offset % b.alignment == 0
        assert all(t.offset % b.alignment == 0 for t in b.tensors.values())


def test_requantize_needs_the_flag_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = tiny_llama_tensors(np.random.default_rng(2))
    src = write_tiny(tmp_path / "q4.gguf", tensors, "Q4_0")
    before = snapshot(src)
    out = tmp_path / "q8.gguf"
    rc = main(["quantize", str(src), str(out), "Q8_0", "-q"])
    one_line_error(capsys, rc, "already quantized (Q4_0)", "--allow-requantize", "token_embd.weight")
    assert not out.exists() and not leftovers(tmp_path) and snapshot(src) == before
    with caplog.at_level("WARNING", logger="lmap"):
        r = quantize_model(src, out, "Q8_0", allow_requantize=True)
    assert r.requantized
    assert [m for m in caplog.messages if "requantizing" in m], caplog.messages
    # the requantized weights are the dequantized Q4_0 values quantized again
    with GGUFFile(out) as g:
        got = g.tensor("blk.1.ffn_down.weight")
    deq = gguf.quants.dequantize(
        gguf.quants.quantize(tensors["blk.1.ffn_down.weight"], gguf.GGMLQuantizationType.Q4_0),
        gguf.GGMLQuantizationType.Q4_0,
    )
    assert got.tobytes() == gguf.quants.quantize(deq, gguf.GGMLQuantizationType.Q8_0).tobytes()
    # same type in and out: the bytes are copied, no flag needed
    same = tmp_path / "same.gguf"
    quantize_model(src, same, "Q4_0", token_embedding_type="Q4_0")
    with GGUFFile(src) as a, GGUFFile(same) as b:
        assert all(a.tensor(n).tobytes() == b.tensor(n).tobytes() for n in a.tensors)


def test_three_d_expert_tensor_with_imatrix(tmp_path: Path) -> None:
    """Stacked expert matrices are quantized row-slab by row-slab, each expert with its own imatrix slice."""
    rng = np.random.default_rng(3)
    exps = rng.standard_normal((4, 64, 256), np.float32)  # [n_expert, rows, cols]
    src = write_reference(
        tmp_path / "moe.gguf",
        [Meta("llama.block_count", 1, gguf.GGUFValueType.UINT32)],
        [("blk.0.ffn_up_exps.weight", exps, None)],
        arch="llama",
    )
    imat = rng.uniform(0.1, 3.0, (4, 256)).astype(np.float32)
    counts = np.array([[10.0, 20.0, 0.0, 5.0]], np.float32)
    imf = write_reference(
        tmp_path / "imatrix.gguf",
        [
            Meta("imatrix.datasets", ["wiki.train"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
            Meta("imatrix.chunk_count", 7, gguf.GGUFValueType.UINT32),
            Meta("imatrix.chunk_size", 512, gguf.GGUFValueType.UINT32),
        ],
        [
            ("blk.0.ffn_up_exps.weight.in_sum2", imat * counts.reshape(4, 1), None),
            ("blk.0.ffn_up_exps.weight.counts", counts, None),
        ],
        arch="imatrix",
    )
    data, keys = load_imatrix(imf)
    v = data["blk.0.ffn_up_exps.weight"].reshape(4, 256)
    np.testing.assert_allclose(v[[0, 1, 3]], imat[[0, 1, 3]], rtol=1e-6)
    assert (v[2] == 1).all()  # an expert never routed to: ones
    assert keys["quantize.imatrix.chunks_count"] == ("uint32", 7)
    out = tmp_path / "moe-q4_0.gguf"
    quantize_model(src, out, "Q4_0", imatrix=imf)
    with GGUFFile(out) as g:
        assert g.metadata["quantize.imatrix.dataset"] == "wiki.train"
        assert g.metadata["quantize.imatrix.entries_count"] == 1
        got = g.tensor("blk.0.ffn_up_exps.weight")
    for e in range(4):
        want = quantize_rows("Q4_0", exps[e], v[e])
        assert got[e * 64 : (e + 1) * 64].tobytes() == want.tobytes(), e
    assert got.tobytes() != gguf.quants.quantize(exps, gguf.GGMLQuantizationType.Q4_0).tobytes()


def test_legacy_imatrix_and_wrong_sizes(tiny: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    src, tensors = tiny
    vals = np.linspace(0.5, 2.0, N_EMBD, dtype=np.float32)
    name = b"blk.0.attn_q.weight"
    raw = np.int32(1).tobytes() + np.int32(len(name)).tobytes() + name
    raw += np.int32(4).tobytes() + np.int32(N_EMBD).tobytes() + (vals * 4).tobytes()  # stored as mean * ncall
    raw += np.int32(3).tobytes() + np.int32(4).tobytes() + b"wiki"
    dat = tmp_path / "imatrix.dat"
    dat.write_bytes(raw)
    data, keys = load_imatrix(dat)
    np.testing.assert_allclose(data["blk.0.attn_q.weight"], vals, rtol=1e-6)
    assert keys["quantize.imatrix.dataset"] == ("string", "wiki")
    out = tmp_path / "tiny-q5_1.gguf"
    quantize_model(src, out, "Q5_1", imatrix=dat)
    with GGUFFile(out) as g:
        got = g.tensor("blk.0.attn_q.weight")
        other = g.tensor("blk.1.attn_q.weight")
    assert got.tobytes() == quantize_rows("Q5_1", tensors["blk.0.attn_q.weight"], vals).tobytes()
    assert other.tobytes() == quantize_rows("Q5_1", tensors["blk.1.attn_q.weight"]).tobytes()
    bad = tmp_path / "bad.dat"
    bad.write_bytes(raw.replace(np.int32(N_EMBD).tobytes(), np.int32(N_EMBD // 2).tobytes(), 1)[: -8 - 4 * N_EMBD // 2])
    with pytest.raises(InvalidParameterError, match="imatrix"):
        quantize_model(src, tmp_path / "never.gguf", "Q5_1", imatrix=bad)
    assert not (tmp_path / "never.gguf").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------------- bad input, safety
def test_bad_type_names(
    tiny: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = tiny
    before = snapshot(src)
    out = tmp_path / "o.gguf"
    line = one_line_error(capsys, main(["quantize", str(src), str(out), "Q4_K_X"]), "Q4_K_X", "valid types")
    assert "Q4_K_M" in line and "IQ4_XS" in line
    one_line_error(capsys, main(["quantize", str(src), str(out), "Q8_0", "--output-tensor-type", "Q9"]), "Q9")
    one_line_error(capsys, main(["quantize", str(src), str(out), "Q8_0", "-t", "0"]), "--threads")
    assert not out.exists() and not leftovers(tmp_path) and snapshot(src) == before


def test_existing_output_and_output_is_input(
    tiny: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = tiny
    work = tmp_path / "in.gguf"
    work.write_bytes(src.read_bytes())
    before = snapshot(work)
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"precious")
    one_line_error(capsys, main(["quantize", str(work), str(out), "Q8_0"]), "exists", "--force")
    assert out.read_bytes() == b"precious"
    for target in (work, tmp_path / "link.gguf", tmp_path / "hard.gguf", tmp_path / "." / "in.gguf"):
        if target.name == "link.gguf":
            target.symlink_to(work)
        elif target.name == "hard.gguf":
            os.link(work, target)
        for force in ([], ["--force"]):
            rc = main(["quantize", str(work), str(target), "Q8_0", *force])
            one_line_error(capsys, rc, "is the input", "refusing")
    assert snapshot(work) == before and not leftovers(tmp_path)
    # --force replaces another file, atomically
    assert main(["quantize", str(work), str(out), "Q8_0", "--force", "-q"]) == 0
    capsys.readouterr()
    with GGUFFile(out) as g:
        assert g.metadata["general.file_type"] == 7
    assert snapshot(work) == before and not leftovers(tmp_path)
    one_line_error(capsys, main(["quantize", str(work), str(tmp_path / "no" / "dir.gguf"), "Q8_0"]), "does not exist")
    one_line_error(capsys, main(["quantize", str(work), str(tmp_path), "Q8_0", "--force"]), "directory")


def test_unsupported_source_type_names_the_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # IQ2_XXS (type 16): lmap cannot dequantize it, so it cannot become Q8_0
    built = build(
        [kv_string("general.architecture", "llama"), kv_scalar("llama.block_count", U32, 1)],
        [
            tensor_info("blk.0.attn_q.weight", (256, 2), 16, 0),
            tensor_info("blk.0.attn_norm.weight", (256,), GGML_F32, 160),
        ],
        bytes(2 * 66) + bytes(160 - 132) + np.ones(256, "<f4").tobytes(),
    )
    src = built.write(tmp_path / "iq2.gguf")
    before = snapshot(src)
    out = tmp_path / "o.gguf"
    rc = main(["quantize", str(src), str(out), "Q8_0", "--allow-requantize"])
    one_line_error(capsys, rc, "blk.0.attn_q.weight", "IQ2_XXS", "cannot dequantize")
    with pytest.raises(UnsupportedModelError):
        quantize_model(src, out, "Q8_0", allow_requantize=True)
    assert not out.exists() and not leftovers(tmp_path) and snapshot(src) == before


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing", "directory"])
def test_broken_input(
    tiny: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    src, _ = tiny
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        bad.write_bytes(src.read_bytes()[: src.stat().st_size - 1000])
    elif damage == "garbage":
        bad.write_bytes(RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "directory":
        bad.mkdir()
    before = snapshot(bad) if bad.is_file() else None
    out = tmp_path / "o.gguf"
    one_line_error(capsys, main(["quantize", str(bad), str(out), "Q8_0"]), "bad.gguf")
    assert not out.exists() and not leftovers(tmp_path)
    if before is not None:
        assert snapshot(bad) == before


def test_failure_midway_leaves_nothing(tiny: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    """A NaN in the last tensor, and a Ctrl-C after the first: no temp file, the old output intact."""
    _, tensors = tiny
    t = dict(tensors)
    t["blk.1.ffn_up.weight"] = t["blk.1.ffn_up.weight"].copy()
    t["blk.1.ffn_up.weight"][5, 3] = np.nan
    src = write_tiny(tmp_path / "nan.gguf", t)
    out = tmp_path / "o.gguf"
    with pytest.raises(LmapError, match=r"blk\.1\.ffn_up\.weight.*NaN.*row 5"):
        quantize_model(src, out, "Q8_0")
    assert not out.exists() and not leftovers(tmp_path)

    good, _ = tiny
    out.write_bytes(b"old")

    def interrupt(i: int, n: int, p: Any, s: float) -> None:
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(good, out, "Q8_0", force=True, progress=interrupt)
    assert out.read_bytes() == b"old" and not leftovers(tmp_path)
    polls: list[int] = []

    def stop() -> bool:  # what the CLI's signal handlers do: a flag polled between slabs
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(KeyboardInterrupt):
        quantize_model(good, out, "Q8_0", force=True, stop=stop)
    assert out.read_bytes() == b"old" and not leftovers(tmp_path)


def test_no_space_is_reported_before_writing(
    tiny: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    src, _ = tiny
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(LmapError, match="MiB are free"):
        quantize_model(src, tmp_path / "o.gguf", "Q8_0")
    assert not (tmp_path / "o.gguf").exists() and not leftovers(tmp_path)


def test_user_type_that_does_not_fit_the_rows(tmp_path: Path) -> None:
    tensors = {"token_embd.weight": np.ones((8, 96), np.float32), "output.weight": np.ones((8, 96), np.float32)}
    src = write_tiny(tmp_path / "odd.gguf", tensors)
    with pytest.raises(InvalidParameterError, match="row length 96.*Q4_K"):
        quantize_model(src, tmp_path / "o.gguf", "Q8_0", output_tensor_type="Q4_K")
    assert not leftovers(tmp_path)


# ---------------------------------------------------------------------- the real models
@pytest.fixture(scope="module")
def smollm2_f16(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "smollm2-f16.gguf"
    quantize_model(smollm2_path, out, "F16", allow_requantize=True)
    return out


def _greedy(path: Path, n: int = 16) -> list[int]:
    from lmap import Llama

    llm = Llama(str(path), n_ctx=128, verbose=False)
    toks = llm.tokenize(b"The capital of France is")
    out = []
    for t in llm.generate(toks, temp=0.0):
        out.append(t)
        if len(out) == n:
            break
    return out


@pytest.mark.slow
def test_smollm2_f16_source_is_llama_quantizes(smollm2_f16: Path) -> None:
    fx = json.loads((FIXTURES / "quantize_types_smollm2.json").read_text())
    assert fx["source_equals_llama_quantize_f16"]
    assert sha256(smollm2_f16) == fx["source_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["Q8_0", "Q4_K_M", "Q5_K_M", "Q3_K_M", "Q6_K", "Q4_0", "Q5_1", "IQ4_XS"])
def test_smollm2_presets(smollm2_f16: Path, tmp_path: Path, preset: str) -> None:
    """Byte-identical to llama-quantize's output (types, metadata order, blocks); loads in lmap and gguf."""
    fx = json.loads((FIXTURES / "quantize_types_smollm2.json").read_text())
    rec = fx["presets"][preset]
    needed = set(rec["types"].split()) - {"F32"}
    if not needed <= SUPPORTED:
        pytest.skip(f"lmap.quants.quantize cannot make {sorted(needed - SUPPORTED)} yet")
    out = tmp_path / f"smollm2-{preset}.gguf"
    before = snapshot(smollm2_f16)
    r = quantize_model(smollm2_f16, out, preset)
    assert snapshot(smollm2_f16) == before
    with GGUFFile(out) as g, GGUFFile(smollm2_f16) as s:
        assert list(g.tensors) == fx["tensors"]
        assert [t.format.name for t in g.tensors.values()] == rec["types"].split()
        assert list(g.metadata) == fx["keys"]
        assert g.metadata["general.file_type"] == rec["file_type"]
        for k, v in s.metadata.items():
            if k not in CHANGED_KEYS:
                same = np.array_equal(v, g.metadata[k]) if isinstance(v, np.ndarray) else v == g.metadata[k]
                assert same and s.metadata_types[k] == g.metadata_types[k], k
    reader = gguf.GGUFReader(out)
    assert len(reader.tensors) == len(fx["tensors"])
    assert out.stat().st_size == rec["size"] == r.file_size
    assert sha256(out) == rec["sha256"], "differs from llama-quantize's file"
    toks = _greedy(out)
    assert len(toks) == 16


@pytest.mark.slow
def test_smollm2_q8_0_blocks_and_greedy(smollm2_f16: Path, tmp_path: Path) -> None:
    """Q8_0 tensors are gguf.quants.quantize of the F16 source; greedy decoding starts like the F16 model's."""
    out = tmp_path / "q8.gguf"
    main(["quantize", str(smollm2_f16), str(out), "q8_0", "-q", "-t", "2"])
    with GGUFFile(smollm2_f16) as s, GGUFFile(out) as g:
        for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
            x = s.tensor(name).astype(np.float32)
            assert g.tensor(name).tobytes() == gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).tobytes()
    a, b = _greedy(smollm2_f16, 4), _greedy(out, 4)
    assert a[0] == b[0], (a, b)


@pytest.mark.slow
def test_smollm2_memory_stays_bounded(smollm2_f16: Path, tmp_path: Path) -> None:
    """Python-side allocations while quantizing a 258 MiB model stay around one slab (16 MiB of floats)."""
    quantize_model(smollm2_f16, tmp_path / "warm.gguf", "Q8_0")  # compile first: numba's own allocations
    tracemalloc.start()
    try:
        quantize_model(smollm2_f16, tmp_path / "q8.gguf", "Q8_0")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_killed_cli_leaves_nothing(smollm2_f16: Path, tmp_path: Path, sig: int) -> None:
    """A signal mid-run removes the temporary file, writes no output and exits 130, without a traceback."""
    out = tmp_path / "out.gguf"
    # Q4_K_M (a few seconds) rather than Q4_0, which a fast CI host finished inside the old fixed
    # 0.3 s wait: the signal then met the default SIGTERM handler after the run. Waiting for a
    # progress line instead ties the signal to the work, not to the clock.
    p = subprocess.Popen(
        [sys.executable, "-m", "lmap", "quantize", str(smollm2_f16), str(out), "Q4_K_M", "-t", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stderr is not None
    seen = []
    for line in p.stderr:
        seen.append(line)
        if line.startswith("[  20/"):
            break
    assert leftovers(tmp_path), "the temporary file never appeared: " + "".join(seen[-5:])
    p.send_signal(sig)
    _, rest = p.communicate(timeout=120)
    err = "".join(seen) + rest
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["Q8_0", "Q4_K_M"])
def test_gemma3_presets(gemma3_path: Path, tmp_path: Path, preset: str) -> None:
    fx = json.loads((FIXTURES / "quantize_types_gemma3.json").read_text())
    rec = fx["presets"][preset]
    needed = set(rec["types"].split()) - {"F32"}
    if not needed <= SUPPORTED:
        pytest.skip(f"lmap.quants.quantize cannot make {sorted(needed - SUPPORTED)} yet")
    src = tmp_path / "gemma3-f16.gguf"
    quantize_model(gemma3_path, src, "F16", allow_requantize=True)
    assert sha256(src) == fx["source_sha256"]
    out = tmp_path / f"gemma3-{preset}.gguf"
    quantize_model(src, out, preset)
    src.unlink()
    with GGUFFile(out) as g:
        assert [t.format.name for t in g.tensors.values()] == rec["types"].split()
        assert list(g.metadata) == fx["keys"]
    assert sha256(out) == rec["sha256"], "differs from llama-quantize's file"
    assert len(_greedy(out)) == 16
