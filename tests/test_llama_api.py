"""The public ``lmap.Llama`` API on the real SmolLM2 file, shaped like llama-cpp-python's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmap import ContextOverflowError, InvalidParameterError, LmapError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(smollm2_path: Path):  # type: ignore[no-untyped-def]
    from lmap import Llama

    return Llama(model_path=str(smollm2_path), n_ctx=512, n_batch=64, verbose=False)


def test_basic_properties(llm) -> None:  # type: ignore[no-untyped-def]
    assert llm.n_ctx() == 512
    assert llm.n_vocab() == 49152
    assert llm.token_bos() == 1
    assert llm.token_eos() == 2


def test_default_context_is_4096_clipped(smollm2_path: Path) -> None:
    from lmap import Llama

    assert Llama(str(smollm2_path), verbose=False).n_ctx() == 4096
    assert Llama(str(smollm2_path), n_ctx=0, verbose=False).n_ctx() == 8192  # the model's training context
    assert Llama(str(smollm2_path), n_ctx=100_000, verbose=False).n_ctx() == 8192


def test_tokenize_detokenize_roundtrip(llm) -> None:  # type: ignore[no-untyped-def]
    text = "Hello, world! Ça va? 日本語 🙂\n\tdef f(x): return x**2"
    ids = llm.tokenize(text.encode())
    assert ids[0] != llm.token_bos()  # SmolLM2's metadata says add_bos = false
    assert llm.detokenize(ids) == text.encode()
    assert llm.tokenize(b"<|im_start|>", special=True) == [1]
    assert llm.tokenize(b"<|im_start|>", special=False) != [1]


def test_eval_and_scores_logits_all(smollm2_path: Path) -> None:
    from lmap import Llama

    llm = Llama(str(smollm2_path), n_ctx=256, n_batch=4, logits_all=True, verbose=False)
    ids = llm.tokenize(b"The quick brown fox jumps over the lazy dog")
    llm.eval(ids)  # several batches of 4
    assert llm.n_tokens == len(ids)
    scores = llm._scores
    assert scores.shape == (len(ids), 49152)
    # one batch or several, one token at a time: the same logits (same kernels, same rounding)
    llm.reset()
    for t in ids:
        llm.eval([t])
    np.testing.assert_allclose(llm._scores, scores, atol=2e-3)
    assert np.array_equal(llm.last_logits, llm.scores[len(ids) - 1])
    # without logits_all the last logits are the scratch's one row, not a copy: the same values
    one = Llama(str(smollm2_path), n_ctx=256, n_batch=4, verbose=False)
    one.eval(ids)
    assert np.shares_memory(one.last_logits, one._scratch.logits)
    np.testing.assert_allclose(one.last_logits, llm.last_logits, atol=2e-3)


def test_greedy_completion_dict(llm) -> None:  # type: ignore[no-untyped-def]
    out = llm("The capital of France is", max_tokens=4, temperature=0)
    assert out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-")
    choice = out["choices"][0]
    assert choice["text"].startswith(" Paris")
    assert choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


def test_stream_equals_non_stream_and_seed_reproduces(llm) -> None:  # type: ignore[no-untyped-def]
    kw = dict(max_tokens=24, temperature=0.9, seed=1234)
    a = llm.create_completion("Once upon a time", **kw)["choices"][0]["text"]
    b = "".join(c["choices"][0]["text"] for c in llm.create_completion("Once upon a time", stream=True, **kw))
    c = llm.create_completion("Once upon a time", **{**kw, "seed": 1234})["choices"][0]["text"]
    d = llm.create_completion("Once upon a time", **{**kw, "seed": 99})["choices"][0]["text"]
    assert a == b == c
    assert a != d


def test_stop_strings_never_leak(llm) -> None:  # type: ignore[no-untyped-def]
    full = llm("1, 2, 3, 4,", max_tokens=20, temperature=0)["choices"][0]["text"]
    assert " 7" in full
    out = llm("1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    text = out["choices"][0]["text"]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert text == full[: full.index(" 7")]
    streamed = "".join(
        c["choices"][0]["text"] for c in llm("1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"], stream=True)
    )
    assert streamed == text


def test_chat_completion_stops_at_end_of_turn(llm) -> None:  # type: ignore[no-untyped-def]
    out = llm.create_chat_completion(
        [{"role": "user", "content": "What is the tallest mountain in the world?"}], temperature=0, max_tokens=64
    )
    assert out["object"] == "chat.completion"
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert "Everest" in msg["content"]
    assert "<|im_end|>" not in msg["content"]
    assert out["choices"][0]["finish_reason"] == "stop"
    chunks = list(
        llm.create_chat_completion(
            [{"role": "user", "content": "What is the tallest mountain in the world?"}],
            temperature=0,
            max_tokens=64,
            stream=True,
        )
    )
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"]


def test_prefix_reuse_evaluates_only_the_new_part(llm) -> None:  # type: ignore[no-untyped-def]
    llm("The history of the Roman Empire began", max_tokens=2, temperature=0)
    llm("The history of the Roman Empire began when", max_tokens=2, temperature=0)
    assert llm.timings["reused_tokens"] >= 7
    assert llm.timings["prompt_tokens"] <= 2


def test_logprobs(llm) -> None:  # type: ignore[no-untyped-def]
    out = llm("The capital of France is", max_tokens=3, temperature=0, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert all(v <= 0 for v in lp["token_logprobs"])
    assert len(lp["top_logprobs"][0]) == 3
    assert lp["tokens"][0] in lp["top_logprobs"][0]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 3}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
    ],
)
def test_invalid_sampling_parameters(llm, kwargs, name) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidParameterError, match=name):
        llm("hi", max_tokens=2, **kwargs)


def test_prompt_longer_than_context(llm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ContextOverflowError, match="512"):
        llm("word " * 600, max_tokens=2)
    with pytest.raises(ContextOverflowError):
        llm.reset()
        llm.eval(list(range(100, 700)))


def test_bad_constructor_arguments(smollm2_path: Path, tmp_path: Path) -> None:
    from lmap import Llama

    with pytest.raises(InvalidParameterError, match="n_batch"):
        Llama(str(smollm2_path), n_batch=0)
    with pytest.raises(InvalidParameterError, match="unknown argument"):
        Llama(str(smollm2_path), n_ctxx=5)
    with pytest.raises(LmapError, match="nope.gguf"):
        Llama(str(tmp_path / "nope.gguf"))
    with pytest.raises(InvalidParameterError, match="type_k"):
        Llama(str(smollm2_path), type_k="q3")


@pytest.mark.slow
def test_warm_up_runs_the_layers_that_hold_every_kind(smollm2_path: Path, gemma3_path: Path) -> None:
    from lmap.gguf import GGUFFile
    from lmap.models import load_model

    # SmolLM2's 30 layers are alike; gemma3's last (global attention, Q8_0 values, Q6_K down) is
    # the only one of its kind
    assert load_model(GGUFFile(smollm2_path)).warm_up_layers() == 1
    assert load_model(GGUFFile(gemma3_path)).warm_up_layers() == 18
