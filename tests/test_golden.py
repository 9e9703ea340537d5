"""Greedy decisions against references nobody here wrote.

1. llama.cpp (built from the llama-cpp-python 0.3.36 sdist; fixtures from scripts/make_fixtures.py):
   teacher-force llama.cpp's own 64-token greedy continuation and require lmap's argmax to equal
   llama.cpp's at (nearly) every step where llama.cpp's top-2 margin is >= 0.15 logits (smaller
   margins flip even between llama.cpp's batched and one-by-one runs; see MIN_AGREEMENT).
2. Hugging Face transformers loading the same GGUF in float32: argmax equal at every step whose
   margin is >= 0.01, and the largest logit difference reported (lmap with an f32 KV cache, so
   both compute the same float function).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA_CPP_MARGIN = 0.15
FLOAT_MARGIN = 0.01
# Share of llama.cpp's confident steps (margin >= 0.15) lmap's argmax must match, per model.
# Not 1.0: activations are rounded to Q8 blocks before every quantized product (as llama.cpp
# does), so a 1e-6 relative change anywhere can move a value across a rounding boundary and
# grow into logit changes of ~1. Measured on smollm2's 366 confident steps: multiplying lmap's
# attention output by (1 + 1e-6 * noise) gave 364, 365 and 365 agreeing steps for three seeds.
MIN_AGREEMENT = {"smollm2": 0.99, "gemma3": 0.98}

pytestmark = pytest.mark.slow


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


MODELS = {"smollm2": "greedy_smollm2.json", "gemma3": "greedy_gemma3.json"}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_name(request) -> str:  # type: ignore[no-untyped-def]
    return request.param


@pytest.fixture(scope="module")
def model_path(model_name: str, request) -> Path:  # type: ignore[no-untyped-def]
    return request.getfixturevalue(f"{model_name}_path")


@pytest.fixture(scope="module")
def fixture(model_name: str) -> dict:
    return load_fixture(MODELS[model_name])


@pytest.fixture(scope="module")
def llm(model_path: Path):  # type: ignore[no-untyped-def]
    from lmap import Llama

    return Llama(str(model_path), n_ctx=2048, n_batch=512, logits_all=True, verbose=False)


def teacher_forced_scores(llm, case: dict) -> np.ndarray:  # type: ignore[no-untyped-def]
    """lmap's logits at the positions that predict each of llama.cpp's generated tokens: [64, vocab]."""
    ids = case["prompt_ids"] + case["generated_ids"]
    llm.reset()
    llm.eval(ids)
    start = len(case["prompt_ids"]) - 1
    return llm.scores[start : start + len(case["generated_ids"])]


def test_prompt_tokens_match_llama_cpp(llm, fixture) -> None:  # type: ignore[no-untyped-def]
    for case in fixture["prompts"]:
        ids = llm.tokenize(case["text"].encode(), add_bos=case["add_special"], special=case["parse_special"])
        assert ids == case["prompt_ids"], case["name"]


def test_greedy_agrees_with_llama_cpp_batched(llm, fixture, model_name: str) -> None:  # type: ignore[no-untyped-def]
    """Apples to apples: llama.cpp also evaluated prompt + continuation in one batch (``batched``).

    SmolLM2 must agree at every confident step. Gemma 3 (issue 3's bound) at >= 98 % of them:
    llama.cpp's own batched and one-by-one runs agree on 99.2 % of gemma's confident steps.
    """
    total = agree = 0
    misses = []
    for case in fixture["prompts"]:
        scores = teacher_forced_scores(llm, case)
        for i, ref in enumerate(case["batched"]):
            if ref["margin"] < LLAMA_CPP_MARGIN:
                continue
            total += 1
            ours = int(np.argmax(scores[i]))
            if ours == ref["id"]:
                agree += 1
            else:
                misses.append(
                    f"{case['name']} step {i}: lmap {ours}, llama.cpp {ref['id']} (margin {ref['margin']:.3f})"
                )
    print(f"\n{model_name} vs llama.cpp batched: {agree}/{total} confident steps agree; misses: {misses}")
    assert total >= 300
    assert agree / total >= MIN_AGREEMENT[model_name], misses


def test_greedy_agrees_with_llama_cpp_generation(llm, fixture, model_name: str) -> None:  # type: ignore[no-untyped-def]
    """Against llama.cpp's one-token-at-a-time run that produced the continuation.

    Misses where llama.cpp's own batched evaluation of the same sequence is not confident (< 0.15)
    or disagrees are excused: there the sequential margin is an artifact of llama.cpp's arithmetic,
    not a property of the model (the float32 transformers reference agrees with lmap at those
    steps; see test_logits_match_transformers_float32). The rest must stay within MIN_AGREEMENT.
    """
    total = agree = excused = 0
    worst = 0.0
    unexcused = []
    for case in fixture["prompts"]:
        scores = teacher_forced_scores(llm, case)
        for i, step in enumerate(case["steps"]):
            top8 = np.array(step["top8"])
            worst = max(worst, float(np.abs(scores[i, top8[:, 0].astype(int)] - top8[:, 1]).max()))
            if step["margin"] < LLAMA_CPP_MARGIN:
                continue
            total += 1
            ours = int(np.argmax(scores[i]))
            if ours == step["id"]:
                agree += 1
                continue
            batched = case["batched"][i]
            if batched["margin"] < LLAMA_CPP_MARGIN or batched["id"] != step["id"]:
                excused += 1
            else:
                unexcused.append(
                    f"{case['name']} step {i}: lmap {ours}, llama.cpp {step['id']} (margin {step['margin']:.3f}, "
                    f"batched margin {batched['margin']:.3f})"
                )
    print(
        f"\n{model_name} vs llama.cpp generation: {agree}/{total} confident steps agree ({excused} where llama.cpp's "
        f"batched run is itself unsure); max |logit diff| on llama.cpp's top-8: {worst:.3f}; misses: {unexcused}"
    )
    assert total >= 300
    assert (total - len(unexcused)) / total >= MIN_AGREEMENT[model_name], unexcused


@pytest.fixture(scope="module")
def hf_model(model_path: Path):  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    model.eval()
    return model


def test_logits_match_transformers_float32(model_path: Path, fixture, hf_model) -> None:  # type: ignore[no-untyped-def]
    import torch

    from lmap import Llama

    llm = Llama(
        str(model_path), n_ctx=2048, logits_all=True, type_k="f32", type_v="f32", activations="f32", verbose=False
    )
    worst = 0.0
    checked = 0
    for case in fixture["prompts"]:
        ids = case["prompt_ids"] + case["generated_ids"]
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].float().numpy()
        llm.reset()
        llm.eval(ids)
        ours = llm.scores[: len(ids)]
        worst = max(worst, float(np.abs(ours - ref).max()))
        start = len(case["prompt_ids"]) - 1
        for pos in range(start, len(ids)):
            top2 = np.sort(ref[pos])[-2:]
            if top2[1] - top2[0] < FLOAT_MARGIN:
                continue
            checked += 1
            assert int(np.argmax(ours[pos])) == int(np.argmax(ref[pos])), f"{case['name']} position {pos}"
    print(f"\ntransformers float32: argmax equal at {checked} steps; max |logit diff| over all positions: {worst:.2e}")
    assert checked >= 300
    assert worst < 1e-2  # same weights, same float function: only summation order differs
