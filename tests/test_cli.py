"""The ``lmap`` command as a user meets it: real subprocesses, real files, exit codes and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest


def lmap(*args: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "lmap", *args], capture_output=True, text=True, timeout=timeout, input=stdin, env=env
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    # the one-off notice of a first run's kernel compilation is not part of the error
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "compiled kernels" not in ln]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("lmap: error: ")
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def write_tiny_gguf(path: Path, arch: str = "llama", tensor_type: str = "F32") -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    qt = gguf.GGMLQuantizationType[tensor_type]
    data = np.ones((8, 32), np.float32)
    raw = gguf.quants.quantize(data, qt) if tensor_type != "F32" else data
    w.add_tensor("token_embd.weight", raw, raw_shape=(8, 32), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_missing_model_path(tmp_path: Path) -> None:
    r = lmap("run", "-m", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert_one_line_error(r, "nope.gguf")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"this is not a model at all, just text" * 10)
    before = f.read_bytes()
    r = lmap("run", "-m", str(f), "-p", "hi")
    assert_one_line_error(r, "model.gguf", "magic")
    assert f.read_bytes() == before  # nothing the user had is touched


def test_truncated_gguf(tmp_path: Path, smollm2_path: Path) -> None:
    f = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        f.write_bytes(src.read(5_000_000))
    r = lmap("info", str(f))
    assert_one_line_error(r, "cut.gguf", "past the end")


def test_unsupported_architecture(tmp_path: Path) -> None:
    f = tmp_path / "weird.gguf"
    write_tiny_gguf(f, arch="notanarch")
    r = lmap("run", "-m", str(f), "-p", "hi")
    assert_one_line_error(r, "notanarch", "not supported")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-n", "-5"], "-n"),
        (["--top-p", "1.5"], "--top-p"),
        (["--temp", "-1"], "--temp"),
        (["--top-k", "-3"], "--top-k"),
        (["--min-p", "2"], "--min-p"),
        (["-t", "0"], "--threads"),
    ],
)
def test_invalid_parameters(tmp_path: Path, args: list[str], needle: str) -> None:
    r = lmap("run", "-m", str(tmp_path / "unused.gguf"), "-p", "hi", *args)
    assert_one_line_error(r, needle)


@pytest.mark.slow
def test_prompt_longer_than_context(smollm2_path: Path) -> None:
    r = lmap("run", "-m", str(smollm2_path), "-c", "32", "--raw", "-p", "word " * 100, "-n", "4")
    assert_one_line_error(r, "context")


@pytest.mark.slow
def test_info_describes_smollm2(smollm2_path: Path) -> None:
    r = lmap("info", str(smollm2_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in (
        "architecture:    llama",
        "context length:  8192",
        "49152 tokens, tokenizer gpt2",
        "chat template:   yes",
        "Q4_1",
        "Q8_0",
        "tensors:         272",
        "heads:           9 (kv 3",
    ):
        assert needle in out, out
    # total parameters: SmolLM2-135M has 134.5 M (tied embeddings counted once)
    total = next(ln for ln in out.splitlines() if ln.strip().startswith("total"))
    assert "134,515,008" in total, total


@pytest.mark.slow
def test_run_streams_greedy_answer(smollm2_path: Path) -> None:
    r = lmap("run", "-m", str(smollm2_path), "--raw", "-p", "The capital of France is", "-n", "8", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris"), r.stdout
    assert "decode:" in r.stderr and "tok/s" in r.stderr and "peak RSS" in r.stderr


@pytest.mark.slow
def test_chat_keeps_cache_between_turns(smollm2_path: Path) -> None:
    r = lmap(
        "chat",
        "-m",
        str(smollm2_path),
        "--temp",
        "0",
        "-n",
        "24",
        stdin="What is the tallest mountain in the world?\nAnd the longest river?\n",
    )
    assert r.returncode == 0, r.stderr
    evaluated = [int(ln.split("evaluated: ")[1].split(",")[0]) for ln in r.stderr.splitlines() if "evaluated:" in ln]
    reused = [int(ln.split("reused: ")[1].rstrip("]")) for ln in r.stderr.splitlines() if "reused:" in ln]
    assert len(evaluated) == 2, r.stderr
    assert reused[1] > evaluated[1], r.stderr  # the second turn re-uses the first turn's cache
    assert "Everest" in r.stdout


def test_quick_exit_flushes_all_output(smollm2_path: Path) -> None:
    # the command ends with os._exit: everything written before must still arrive, pipes included
    r = lmap("info", str(smollm2_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().splitlines()[-1].strip(), r.stdout
    head = subprocess.run(
        f"{sys.executable} -m lmap info {smollm2_path} | head -1", shell=True, capture_output=True, text=True
    )
    assert head.returncode == 0 and len(head.stdout.splitlines()) == 1
    assert "Traceback" not in head.stderr and "BrokenPipe" not in head.stderr, head.stderr


def test_startup_leaves_scipy_importable() -> None:
    pytest.importorskip("scipy")
    code = (
        "import sys, lmap.__main__ as m; m._numba_without_scipy(); "
        "from numba.core.registry import cpu_target; cpu_target.target_context.refresh(); "
        "assert 'scipy' not in sys.modules and 'numba.np.linalg' in sys.modules; "
        "import scipy.linalg.cython_blas; print('ok')"
    )
    assert _python(code) == "ok"


def test_numba_entry_points_load_only_when_a_compile_needs_them() -> None:
    # numba.core.entrypoints imports importlib.metadata (12-14 ms) for init_all(), which only a
    # compile calls: the CLI finds it as a lazy module, whose code runs on first use
    code = (
        "import sys, importlib.util, lmap.__main__ as m; before = 'importlib.metadata' in sys.modules; "
        "m._numba_entry_points_lazily(); import numba; from numba.core import entrypoints as ep; "
        "assert isinstance(ep, importlib.util._LazyModule); "
        "assert before or 'importlib.metadata' not in sys.modules; "
        "ep.init_all(); assert ep._already_initialized and 'importlib.metadata' in sys.modules; "
        "from numba import njit; print(njit(lambda x: x + 1)(1))"
    )
    assert _python(code) == "2"


def _python(code: str) -> str:
    """Run ``python -c code`` in a fresh interpreter; its stdout, stripped (its stderr on failure)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_placeholder_commands_match_their_parsers() -> None:
    # a command line naming `run` builds placeholders for the commands whose parsers live in other
    # modules: `lmap --help` and `lmap run ...` must not tell them apart
    from lmap.cli import _LAZY_COMMANDS, build_parser

    full, lean = build_parser(["--help"]), build_parser(["run", "-p", "x"])
    assert full.format_help() == lean.format_help()
    for name in _LAZY_COMMANDS:
        assert build_parser([name]).format_help() == full.format_help()


def test_collector_back_on_after_startup(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `lmap` starts with the collector off (lmap.__main__); every command turns it back on
    import gc

    from lmap.cli import main

    gc.disable()
    try:
        assert main(["info", str(smollm2_path)]) == 0
        assert gc.isenabled()
    finally:
        gc.enable()
    assert "llama" in capsys.readouterr().out
