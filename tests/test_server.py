"""The OpenAI-compatible server, driven by the real ``openai`` client against a real uvicorn process.

One server (SmolLM2, 2 slots, 512-token context, an API key) is started per module in a subprocess on
a free localhost port; every test talks to it over HTTP exactly as a user's client would.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

KEY = "test-key-123"
N_CTX = 512


def request(url: str, method: str, path: str, body: object = None, headers: dict[str, str] | None = None) -> tuple:
    """(status, parsed JSON body) over plain http.client: no client library between the test and the server."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m lmap.server`` in a subprocess; stopped (and its output shown on failure) at teardown."""

    def __init__(self, model: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lmap.server", "-m", str(model), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.output))
            try:
                if request(self.url, "GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not come up:\n" + "".join(self.output))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(smollm2_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(smollm2_path, "--parallel", "2", "-c", str(N_CTX), "--api-key", KEY, "--max-n", "4")
    yield srv
    srv.stop()
    assert srv.proc.returncode is not None


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


CHAT = [{"role": "user", "content": "Name three colors."}]


# ------------------------------------------------------------------ basics


def test_models_and_health(server: ServerProcess, client: openai.OpenAI, model_id: str) -> None:
    assert model_id == "SmolLM2-135M-Instruct.Q4_1"
    h = request(server.url, "GET", "/health")[1]  # no key needed
    assert h["status"] == "ok" and h["slots_idle"] + h["slots_processing"] == 2


def test_chat_non_streaming(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=8, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion"
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_usage_in_final_chunk(client: openai.OpenAI, model_id: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model_id,
            messages=CHAT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert finishes == ["length"] and last.usage.completion_tokens == 10
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    full = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=10, temperature=0)
    assert text == full.choices[0].message.content


def test_completions_both_ways(client: openai.OpenAI, model_id: str) -> None:
    r = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    s = list(
        client.completions.create(
            model=model_id, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text
    assert s[-1].choices[0].finish_reason == "length"


def test_greedy_equals_llama_create_completion(client: openai.OpenAI, model_id: str, smollm2_path: Path) -> None:
    from lmap import Llama

    prompt = "Once upon a time, in a small village by the sea,"
    llm = Llama(str(smollm2_path), n_ctx=N_CTX, verbose=False)
    ref = llm.create_completion(prompt, max_tokens=24, temperature=0)
    r = client.completions.create(
        model=model_id, prompt=prompt, max_tokens=24, temperature=0, extra_body={"cache_prompt": False}
    )
    assert r.choices[0].text == ref["choices"][0]["text"]
    # the same while another request decodes in the same batch
    other: list[str] = []
    t = threading.Thread(
        target=lambda: other.append(
            client.completions.create(model=model_id, prompt="1, 2, 3,", max_tokens=40, temperature=0).choices[0].text
        )
    )
    t.start()
    time.sleep(0.3)
    r2 = client.completions.create(
        model=model_id, prompt=prompt, max_tokens=24, temperature=0, extra_body={"cache_prompt": False}
    )
    t.join()
    assert r2.choices[0].text == ref["choices"][0]["text"]
    assert other and other[0]


def test_n_choices(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=12, temperature=1.0, n=3, seed=7, stream=False
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1  # different seeds per choice
    s = list(
        client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=5, temperature=0, n=2, stream=True)
    )
    done = sorted(c.choices[0].index for c in s if c.choices and c.choices[0].finish_reason)
    assert done == [0, 1]


def test_seed_reproducible(client: openai.OpenAI, model_id: str) -> None:
    kw = {"model": model_id, "messages": CHAT, "max_tokens": 12, "temperature": 1.0, "seed": 42}
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_chat_logprobs_shape(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        # greedy: the chosen token is the most likely one
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    s = list(
        client.chat.completions.create(
            model=model_id, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=1, stream=True
        )
    )
    streamed = [e for c in s if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content[:4]]


def test_completion_logprobs_shape(client: openai.OpenAI, model_id: str) -> None:
    r = client.completions.create(model=model_id, prompt="Hello, my name", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_stop_strings_never_leak(client: openai.OpenAI, model_id: str) -> None:
    prompt = "Count: 1, 2, 3, 4, 5, 6, 7,"
    full = client.completions.create(model=model_id, prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    assert " 9" in full, full  # the model counts on; stop on a string inside its continuation
    stop = full[full.index(" 9") - 1 : full.index(" 9") + 2]  # e.g. ", 9": spans several tokens
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    s = list(
        client.completions.create(model=model_id, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True)
    )
    pieces = [c.choices[0].text for c in s]
    assert "".join(pieces) == full[: full.index(stop)]
    assert not any(stop[:2] in p for p in pieces if p)


def test_json_schema_output_validates(client: openai.OpenAI, model_id: str) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Invent a person. Reply in JSON."}],
        max_tokens=80,
        temperature=0.8,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Say yes or no."}],
        max_tokens=10,
        extra_body={"grammar": 'root ::= "yes" | "no"'},
    )
    assert r.choices[0].message.content in ("yes", "no")


def test_embeddings(client: openai.OpenAI, model_id: str) -> None:
    r = client.embeddings.create(model=model_id, input=["a cat sat on the mat", "a cat sat on the mat", "stocks"])
    v = [d.embedding for d in r.data]
    assert len(v) == 3 and len(v[0]) == 576
    assert v[0] == v[1]
    assert abs(sum(x * x for x in v[0]) - 1.0) < 1e-4  # L2-normalized
    assert r.usage.prompt_tokens > 0


def test_tokenize_detokenize(server: ServerProcess) -> None:
    t = request(server.url, "POST", "/tokenize", {"content": "Hello world"}, auth())[1]["tokens"]
    assert t and all(isinstance(x, int) for x in t)
    d = request(server.url, "POST", "/detokenize", {"tokens": t}, auth())[1]
    assert d["content"] == "Hello world"


def test_parallel_requests(client: openai.OpenAI, model_id: str) -> None:
    # more requests than slots: they queue, decode two at a time, and all finish
    results: dict[int, str] = {}

    def one(i: int) -> None:
        r = client.completions.create(model=model_id, prompt=f"Item {i}:", max_tokens=8, temperature=0)
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(5))
    for i in range(5):  # batched answers equal the answer alone
        alone = client.completions.create(model=model_id, prompt=f"Item {i}:", max_tokens=8, temperature=0)
        assert alone.choices[0].text == results[i]


def test_disconnect_frees_the_slot(server: ServerProcess, client: openai.OpenAI, model_id: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"prompt": "Write a long story:", "max_tokens": 400, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json", **auth()})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")  # one event, then hang up
    assert request(server.url, "GET", "/health")[1]["slots_processing"] == 1
    conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if request(server.url, "GET", "/health")[1]["slots_processing"] == 0:
            break
        time.sleep(0.1)
    assert request(server.url, "GET", "/health")[1]["slots_processing"] == 0


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "x", "n": 99}, 400, "n must be <= 4"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
        ({"prompt": "word " * 600}, 400, "context"),
        ({"prompt": [1, 2, 999999]}, 400, "999999"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
        ({"prompt": "x", "grammar": "root ::= undefined"}, 400, "grammar"),
        ({"prompt": "x", "response_format": {"type": "xml"}}, 400, "response_format"),
        ({}, 400, "prompt"),
    ],
)
def test_bad_completion_requests(server: ServerProcess, body: object, status: int, needle: str) -> None:
    code, resp = request(server.url, "POST", "/v1/completions", body, auth())
    assert code == status, resp
    err = resp["error"]
    assert needle in err["message"] and err["type"]


def test_bad_chat_requests(server: ServerProcess) -> None:
    for body, needle in [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ]:
        code, resp = request(server.url, "POST", "/v1/chat/completions", body, auth())
        assert code == 400, resp
        assert needle in resp["error"]["message"]


def test_oversized_body(server: ServerProcess) -> None:
    code, resp = request(server.url, "POST", "/v1/completions", b"x" * (9 << 20), auth())
    assert code == 413 and "limit" in resp["error"]["message"]


def test_api_key_required(server: ServerProcess, model_id: str) -> None:
    code, resp = request(server.url, "GET", "/v1/models")
    assert code == 401 and resp["error"]["code"] == "invalid_api_key"
    code, resp = request(server.url, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert code == 401 and "invalid" in resp["error"]["message"]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=model_id, messages=CHAT, max_tokens=2)


def test_server_keeps_serving_after_errors(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_id, prompt="x", max_tokens=-5)
    r = client.completions.create(model=model_id, prompt="Hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_cli_registers_serve() -> None:
    from lmap.cli import build_parser

    args = build_parser().parse_args(["serve", "-m", "x.gguf", "--parallel", "3", "--api-key", "k"])
    assert args.parallel == 3 and args.api_key == "k" and args.port == 8080 and args.host == "127.0.0.1"


def test_llama_api_grammar_and_response_format(smollm2_path: Path) -> None:
    from lmap import Llama

    llm = Llama(str(smollm2_path), n_ctx=N_CTX, verbose=False)
    r = llm.create_completion("Is the sky blue? Answer:", max_tokens=8, grammar='root ::= " yes" | " no"')
    assert r["choices"][0]["text"] in (" yes", " no") and r["choices"][0]["finish_reason"] == "stop"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    c = llm.create_chat_completion(
        [{"role": "user", "content": "Pick a number, reply in JSON."}],
        max_tokens=40,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"schema": schema}},
    )
    jsonschema.validate(json.loads(c["choices"][0]["message"]["content"]), schema)
    chunks = list(
        llm.create_chat_completion(
            [{"role": "user", "content": "Reply in JSON."}],
            max_tokens=40,
            seed=2,
            stream=True,
            response_format={"type": "json_object"},
        )
    )
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    if chunks[-1]["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still a prefix of a JSON object
        from lmap.grammar import Grammar

        assert Grammar.json_object().matcher([b"x"]).accept_bytes(text), text


def test_engine_scratch_decides_the_weight_tile_as_llama(smollm2_path: Path) -> None:
    """The server's scratch has a dequantized weight tile (and float-sized activations) only where
    Llama's has: none where every prompt product is an integer panel GEMM (4-16 MiB)."""
    from lmap import Llama
    from lmap.server.engine import Engine

    llm = Llama(str(smollm2_path), n_ctx=256, verbose=False)
    e = Engine(llm, 2, warm_up=False)
    assert e.s.tile.size == llm._scratch.tile.size
    assert e.s.xq is not None and llm._scratch.xq is not None
    assert e.s.xq.f32.size == llm._scratch.xq.f32.size
