"""Sampler chain against a naive full-vocabulary reference of llama.cpp's samplers, plus stop-string matching."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, deque

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmap.errors import InvalidParameterError
from lmap.sampling import (
    Candidates,
    MinP,
    Sampler,
    SamplingParams,
    StopMatcher,
    TopP,
    TypicalP,
    _top_k_unordered,
    log_softmax,
    top_logprobs,
)

# --------------------------------------------------------------------------- reference


def reference_distribution(logits: np.ndarray, history: list[int], p: SamplingParams) -> dict[int, float]:
    """llama.cpp's chain as llama-cpp-python builds it, written out plainly over the whole vocabulary."""
    x = logits.astype(np.float32).copy()
    for tok, b in (p.logit_bias or {}).items():
        x[int(tok)] += np.float32(b)
    enabled = p.penalty_last_n != 0 and not (
        p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
    )
    if enabled:
        window = history if p.penalty_last_n < 0 else history[-p.penalty_last_n :]
        for tok, c in Counter(window).items():
            v = x[tok]
            v = v * np.float32(p.repeat_penalty) if v <= 0 else v / np.float32(p.repeat_penalty)
            x[tok] = v - (np.float32(c) * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty))
    if p.temperature == 0:
        return {int(np.argmax(x)): 1.0}
    ids = np.argsort(-x, kind="stable")
    if 0 < p.top_k < ids.size:
        ids = ids[: p.top_k]
    v = x[ids].astype(np.float64)

    def softmax(a: np.ndarray) -> np.ndarray:
        e = np.exp(a - a.max())
        return e / e.sum()

    if p.typical_p < 1.0 and ids.size > 1:
        order = np.argsort(-v, kind="stable")
        ids, v = ids[order], v[order]
        pr = softmax(v)
        ent = -sum(q * math.log(q) for q in pr if q > 0)
        shifted = np.abs(-np.log(pr) - ent)
        order = np.argsort(shifted, kind="stable")
        cum, last = 0.0, order.size
        for i, j in enumerate(order):
            cum += pr[j]
            if cum > p.typical_p:
                last = i + 1
                break
        ids, v = ids[order[:last]], v[order[:last]]
    if p.top_p < 1.0 and ids.size > 1:
        order = np.argsort(-v, kind="stable")
        ids, v = ids[order], v[order]
        pr = softmax(v)
        cum, last = 0.0, ids.size
        for i in range(ids.size):
            cum += pr[i]
            if cum >= p.top_p:
                last = i + 1
                break
        ids, v = ids[:last], v[:last]
    if p.min_p > 0.0 and ids.size > 1:
        keep = v >= v.max() + math.log(p.min_p)
        ids, v = ids[keep], v[keep]
    v = v / p.temperature
    return dict(zip(ids.tolist(), softmax(v).tolist(), strict=True))


def lmap_distribution(logits: np.ndarray, history: list[int], p: SamplingParams) -> dict[int, float]:
    ids, probs = Sampler(p).distribution(logits, history)
    assert len(set(ids.tolist())) == ids.size, "duplicate candidates"
    return dict(zip(ids.tolist(), probs.tolist(), strict=True))


def assert_same_distribution(a: dict[int, float], b: dict[int, float]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-9)


def random_logits(seed: int, n: int, scale: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * scale).astype(np.float32)


# --------------------------------------------------------------------------- params


def test_defaults_are_llama_cpp_python_create_completion_defaults() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) == (0.8, 40, 0.95, 0.05, 1.0)
    assert (p.repeat_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)
    assert p.penalty_last_n == 64
    assert p.seed is None and p.logit_bias is None
    p.validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 1.5),
        ("top_p", -0.01),
        ("min_p", 1.01),
        ("min_p", -1.0),
        ("typical_p", 2.0),
        ("top_k", -1),
        ("top_k", 4.5),
        ("repeat_penalty", 0.0),
        ("repeat_penalty", -1.0),
        ("frequency_penalty", float("inf")),
        ("presence_penalty", "1"),
        ("penalty_last_n", -2),
        ("seed", -5),
        ("seed", 1.5),
        ("logit_bias", {"x": 1.0}),
        ("logit_bias", {3: float("nan")}),
        ("logit_bias", {-1: 1.0}),
    ],
)
def test_validate_names_the_parameter(field: str, value: object) -> None:
    p = dataclasses.replace(SamplingParams(), **{field: value})
    with pytest.raises(InvalidParameterError, match=field):
        p.validate()
    with pytest.raises(ValueError):  # InvalidParameterError is a ValueError too
        Sampler(p)


def test_valid_edge_values() -> None:
    SamplingParams(temperature=0, top_p=0, top_k=0, min_p=1, typical_p=0, penalty_last_n=-1, seed=-1).validate()
    SamplingParams(logit_bias={"5": -math.inf, 7: 2}).validate()


# --------------------------------------------------------------------------- top-k selection


@pytest.mark.parametrize("n", [10, 1000, 5000, 49152, 100003, 262144])
@pytest.mark.parametrize("k", [1, 2, 40, 500])
def test_top_k_unordered_matches_sort(n: int, k: int) -> None:
    x = random_logits(n + k, n)
    got = _top_k_unordered(x, k)
    assert got.size == min(k, n) and len(set(got.tolist())) == got.size
    assert np.sort(x[got])[::-1].tolist() == np.sort(x)[::-1][: min(k, n)].tolist()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 20000),
    k=st.integers(1, 300),
    levels=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
    clustered=st.booleans(),
)
def test_top_k_unordered_with_ties_and_clusters(n: int, k: int, levels: int, seed: int, clustered: bool) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, n).astype(np.float32)  # many exact ties
    if clustered:  # all the large values in one stretch, the worst case for the group maxima
        start = int(rng.integers(0, n))
        x[start : start + k] += levels
    got = _top_k_unordered(x, k)
    kk = min(k, n)
    assert got.size == kk and len(set(got.tolist())) == kk
    assert np.sort(x[got]).tolist() == np.sort(x)[n - kk :].tolist()


# --------------------------------------------------------------------------- chain vs reference

CASES = [
    SamplingParams(),
    SamplingParams(top_k=5, top_p=0.5),
    SamplingParams(top_k=100, top_p=0.99, min_p=0.0, temperature=1.3),
    SamplingParams(top_k=40, typical_p=0.7, top_p=1.0, min_p=0.1),
    SamplingParams(top_k=40, typical_p=0.3, top_p=0.8, min_p=0.02, temperature=0.5),
    SamplingParams(top_k=1),
    SamplingParams(top_p=0.0),
    SamplingParams(min_p=1.0),
    SamplingParams(top_k=0, top_p=0.9, min_p=0.0),
    SamplingParams(top_k=0, top_p=1.0, min_p=0.2),
    SamplingParams(top_k=0, typical_p=0.5, top_p=0.7),
    SamplingParams(repeat_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.6),
    SamplingParams(repeat_penalty=0.7, penalty_last_n=-1),
    SamplingParams(repeat_penalty=2.0, penalty_last_n=0),
    SamplingParams(logit_bias={3: 5.0, 10: -math.inf, "17": -2.5}),
    SamplingParams(logit_bias={3: 5.0, 11: -3.0}, repeat_penalty=1.5, frequency_penalty=0.5),
    SamplingParams(top_k=0, logit_bias={3: 5.0}, repeat_penalty=1.5),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: repr(p)[15:90])
@pytest.mark.parametrize("n", [64, 3000, 49152])
def test_distribution_matches_reference(params: SamplingParams, n: int) -> None:
    for seed in range(3):
        logits = random_logits(seed * 1000 + n, n, scale=2.0 if params.top_k == 0 else 3.0)
        rng = np.random.default_rng(seed)
        # history biased towards the likely tokens, so the penalties actually reshuffle the top
        top = np.argsort(-logits)[:30]
        history = [int(t) for t in rng.choice(top, 50)] + [int(t) for t in rng.integers(0, n, 50)]
        assert_same_distribution(
            lmap_distribution(logits, history, params), reference_distribution(logits, history, params)
        )


def test_penalties_follow_llama_cpp() -> None:
    logits = np.array([2.0, -2.0, 1.0, 0.5, 3.0], dtype=np.float32)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=2.0, frequency_penalty=0.25,
                       presence_penalty=0.5, penalty_last_n=3)  # fmt: skip
    # window = last 3 tokens = [1, 0, 0]; token 4 is outside it
    ids, probs = Sampler(p).distribution(logits, [4, 4, 1, 0, 0])
    got = dict(zip(ids.tolist(), np.log(probs).tolist(), strict=True))
    expected = np.array([2.0 / 2 - (2 * 0.25 + 0.5), -2.0 * 2 - (0.25 + 0.5), 1.0, 0.5, 3.0])
    expected = expected - np.log(np.exp(expected).sum())
    for t in range(5):
        assert got[t] == pytest.approx(expected[t], abs=1e-5)


def test_logit_bias_applies_before_penalties() -> None:
    # bias turns token 0's logit negative, so the repeat penalty must multiply it (not divide)
    logits = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=2.0, logit_bias={0: -3.0})
    ids, probs = Sampler(p).distribution(logits, [0])
    lp = dict(zip(ids.tolist(), np.log(probs).tolist(), strict=True))
    assert lp[0] - lp[1] == pytest.approx(-4.0, abs=1e-5)


def test_greedy_is_argmax_of_penalized_logits() -> None:
    logits = random_logits(7, 49152)
    best = int(np.argmax(logits))
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == best
    # the winner repeated under a strong penalty loses to the runner-up
    second = int(np.argsort(-logits)[1])
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=100.0))
    assert s.sample(logits, [best]) == second
    # logit bias wins
    assert Sampler(SamplingParams(temperature=0, logit_bias={5: 100.0})).sample(logits, [best]) == 5
    # banning the winner
    assert Sampler(SamplingParams(temperature=0, logit_bias={best: -math.inf})).sample(logits) == second


def test_greedy_breaks_ties_by_lowest_id() -> None:
    logits = np.zeros(10000, dtype=np.float32)
    logits[[700, 300, 9000]] = 5.0
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == 300
    assert Sampler(SamplingParams(temperature=0, logit_bias={9000: 0.0, 300: -1.0})).sample(logits) == 700


def test_sampling_leaves_inputs_alone() -> None:
    logits = random_logits(3, 49152)
    logits.flags.writeable = False  # any write raises
    history = np.array([1, 2, 3, 2, 1], dtype=np.intc)
    before = logits.copy()
    for params in CASES:
        Sampler(params).sample(logits, history)
    assert np.array_equal(logits, before)


def test_same_seed_same_tokens_and_reset() -> None:
    logits = random_logits(11, 49152, scale=1.0)
    a, b = Sampler(SamplingParams(seed=42)), Sampler(SamplingParams(seed=42))
    ta = [a.sample(logits) for _ in range(50)]
    assert ta == [b.sample(logits) for _ in range(50)]
    assert len(set(ta)) > 5  # it really samples
    a.reset()
    assert [a.sample(logits) for _ in range(50)] == ta
    a.reseed(43)
    assert [a.sample(logits) for _ in range(50)] != ta
    assert a.seed == 43
    r = Sampler(SamplingParams(seed=None))
    assert 0 <= r.seed < 2**32


def test_draws_follow_the_distribution() -> None:
    logits = random_logits(5, 3000, scale=1.5)
    s = Sampler(SamplingParams(seed=0, top_k=10, top_p=1.0, min_p=0.0, temperature=0.7))
    ids, probs = s.distribution(logits)
    n = 20000
    counts = Counter(s.sample(logits) for _ in range(n))
    assert set(counts) <= set(ids.tolist())
    for i, pr in zip(ids.tolist(), probs.tolist(), strict=True):
        sd = math.sqrt(n * pr * (1 - pr))
        assert abs(counts[i] - n * pr) < 5 * sd + 1


def test_history_and_logits_errors() -> None:
    s = Sampler(SamplingParams(repeat_penalty=1.1))
    with pytest.raises(InvalidParameterError, match="history"):
        s.sample(np.zeros(10, np.float32), [3, 99])
    with pytest.raises(InvalidParameterError, match="logits"):
        s.sample(np.zeros((2, 5), np.float32))
    with pytest.raises(InvalidParameterError, match="logit_bias"):
        Sampler(SamplingParams(logit_bias={10: 1.0})).sample(np.zeros(10, np.float32))


def test_float64_and_list_history_accepted() -> None:
    logits = random_logits(1, 500).astype(np.float64)
    s = Sampler(SamplingParams(seed=1, repeat_penalty=1.2))
    assert 0 <= s.sample(logits, [1, 2, 3]) < 500
    assert 0 <= s.sample(logits, deque([4, 5, 4])) < 500
    assert 0 <= s.sample(logits, np.array([], dtype=np.int64)) < 500


def test_single_candidate_consumes_randomness() -> None:
    # the random stream advances once per token whatever the filters leave (llama.cpp's dist sampler)
    logits = random_logits(2, 1000, scale=1.0)
    a = Sampler(SamplingParams(seed=9, top_k=1))
    b = Sampler(SamplingParams(seed=9))
    a.sample(logits)
    b.sample(logits)
    c = Sampler(SamplingParams(seed=9))
    c._rng.random()  # one draw, as `a` took
    assert b._rng.random() == c._rng.random()


def test_stages_compose_on_candidates() -> None:
    c = Candidates(np.arange(5), np.array([0.0, 3.0, 1.0, 2.0, -1.0]))
    TopP(0.9).apply(c)
    assert c.sorted and c.ids.tolist() == [1, 3, 2]  # mass 0.64, 0.87, 0.96
    MinP(0.3).apply(c)
    assert c.ids.tolist() == [1, 3]  # relative probabilities 1, 0.37, 0.14
    c = Candidates(np.arange(3), np.array([0.0, 0.0, 0.0]))
    TypicalP(0.5).apply(c)
    assert len(c) == 2  # uniform: every token equally typical, mass 1/3 then 2/3 > 0.5


# --------------------------------------------------------------------------- logprobs


def test_log_softmax_and_top_logprobs() -> None:
    x = random_logits(4, 49152, scale=4.0)
    ref = x.astype(np.float64) - np.log(np.sum(np.exp(x.astype(np.float64) - x.max()))) - x.max()
    ls = log_softmax(x)
    assert ls.dtype == np.float32
    np.testing.assert_allclose(ls, ref, atol=2e-5)
    ids, lps = top_logprobs(x, 5)
    assert ids.tolist() == np.argsort(-ref)[:5].tolist()
    np.testing.assert_allclose(lps, ref[ids], atol=1e-9)
    assert top_logprobs(x, 0)[0].size == 0
    assert top_logprobs(x[:3], 10)[0].size == 3
    banned = x.copy()
    banned[0] = -np.inf
    assert log_softmax(banned)[0] == -np.inf


# --------------------------------------------------------------------------- stop strings


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[str, bool, list[str]]:
    m = StopMatcher(stops)
    out: list[str] = []
    matched = False
    for piece in pieces:
        emit, matched = m.feed(piece)
        out.append(emit)
        if matched:
            break
    if not matched:
        out.append(m.flush())
    return "".join(out), matched, out


def test_stop_matcher_basic() -> None:
    text, matched, out = run_matcher(["</s>", "\n\n"], ["Hello", " wor", "ld<", "/", "s>", "more"])
    assert (text, matched) == ("Hello world", True)
    assert out == ["Hello", " wor", "ld", "", ""]  # "<" and "/" held back, then dropped with the stop
    text, matched, _ = run_matcher(["</s>"], ["a<", "b"])
    assert (text, matched) == ("a<b", False)
    text, matched, _ = run_matcher([], ["a", "b"])
    assert (text, matched) == ("ab", False)
    m = StopMatcher("STOP")
    assert m.feed("xxSTOPyy") == ("xx", True)
    assert m.matched == "STOP"
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_stop_matcher_earliest_stop_wins_and_holds_overlaps() -> None:
    assert run_matcher(["world", "lo w"], ["hello world"])[:2] == ("hel", True)
    # "ababc": after "abab" the tail "ab" may still start "abc"
    m = StopMatcher(["abc"])
    assert m.feed("abab") == ("ab", False)
    assert m.held == "ab"
    assert m.feed("c") == ("", True)


def test_stop_matcher_rejects_non_strings() -> None:
    with pytest.raises(InvalidParameterError, match="stop"):
        StopMatcher(["ok", 3])  # type: ignore[list-item]


@settings(max_examples=300, deadline=None)
@example(text="><<", stops=["<", "><<"], cuts=[2])  # found by hypothesis in a CI run
@given(
    text=st.text(alphabet="ab<>/ \n", max_size=40),
    stops=st.lists(st.text(alphabet="ab<>/ \n", min_size=0, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stop_matcher_never_leaks(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    # Generation stops at the first piece after which some stop string is complete, cut at the
    # earliest one then present; a longer stop that began earlier but is not complete yet never
    # will be (text='><<', stops=['<', '><<'], pieces ['><', '<'] gives '>', as llama-server does).
    positions: list[tuple[int, str]] = []
    for end in bounds[1:]:
        positions = [(text[:end].find(s), s) for s in stops if s and s in text[:end]]
        if positions:
            break
    expected = text[: min(positions)[0]] if positions else text
    got, matched, out = run_matcher(stops, pieces)
    assert got == expected
    assert matched == bool(positions)
    # every emission extends a prefix of the final text: nothing shown is ever taken back
    shown = ""
    for piece in out:
        shown += piece
        assert expected.startswith(shown)


@settings(max_examples=60, deadline=None)
@given(
    n=st.sampled_from([2, 7, 63, 64, 65, 1000, 49152, 262144]),
    k=st.integers(1, 120),
    top_p=st.floats(0.01, 0.999),
    min_p=st.sampled_from([0.0, 0.01, 0.05, 0.3, 1.0]),
    temperature=st.sampled_from([0.1, 0.7, 1.0, 1.8]),
    peaked=st.booleans(),
    banned=st.sampled_from([0.0, 0.5, 0.999]),
    seed=st.integers(0, 2**16),
)
def test_compiled_chain_draws_what_the_stages_draw(
    n: int, k: int, top_p: float, min_p: float, temperature: float, peaked: bool, banned: float, seed: int
) -> None:
    """Sampler.sample's one-pass kernel (no edits, top_k > 0, top_p < 1) picks the token the stage chain picks.

    ``banned``: the share of logits set to -inf, as a grammar's mask leaves them.
    """
    rng = np.random.default_rng(seed)
    x = (rng.permutation(n) * (20.0 / n) - 10.0).astype(np.float32)  # distinct: top-k ties may go either way
    if peaked:  # + 15 and half a grid step: a peak never lands on another logit's value
        x[rng.choice(n, size=min(n, 5), replace=False)] += np.float32(15.0 + 10.0 / n)
    if banned:  # (with every token banned, which one comes back is a tie: either may)
        keep = int(rng.integers(n))
        kept = x[keep]
        x[rng.random(n) < banned] = -np.inf
        x[keep] = kept  # at least one token stays allowed, its logit still distinct
    p = SamplingParams(top_k=k, top_p=top_p, min_p=min_p, temperature=temperature, seed=seed)
    fast, chain = Sampler(p), Sampler(p)
    chain._fast = False
    assert fast._fast
    for _ in range(20):
        assert fast.sample(x) == chain.sample(x)
