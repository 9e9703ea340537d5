"""The OpenAI-compatible HTTP app (FastAPI): routes, request checks, response shapes, errors.

Every error leaves as OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx
status for anything the client can fix (malformed JSON, a field of the wrong type, a value out of
range, a prompt longer than the context, an unknown model, a missing or wrong API key, an oversized
body). Kernels never run here: requests become :class:`~lmap.server.engine.Job` objects for the
engine's worker thread, and streamed answers are Server-Sent Events (``data: {...}`` lines, then
``data: [DONE]``). A client that disconnects cancels its job, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextOverflowError, LmapError
from ..grammar import Grammar, TokenVocab
from ..sampling import SamplingParams
from .engine import Engine, GenParams, Job, TokenLogprob
from .schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    ValidationError,
    describe,
)

log = logging.getLogger("lmap")

STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = {"/", "/health", "/v1/health", "/index.html"}


@dataclass
class ServerConfig:
    """What the app needs besides the engine."""

    model_id: str
    aliases: set[str] = field(default_factory=set)
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    max_n: int = 16
    disconnect_poll_s: float = 0.25


class APIError(Exception):
    """An error for the client: HTTP status plus OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _piece(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


class Handlers:
    """The routes' logic, bound to one engine and config."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.cfg = config
        self.llama = engine.llama
        self.vocab = TokenVocab.from_tokenizer(engine.tokenizer)  # built once, before requests arrive
        self.created = int(time.time())

    # ------------------------------------------------------------------ request reading
    async def body(self, request: Request) -> dict[str, Any]:
        limit = self.cfg.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body is {int(length)} bytes; the limit is {limit}", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
        return data

    @staticmethod
    def validate(cls: Any, data: dict[str, Any]) -> Any:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            msg, param = describe(e)
            raise APIError(400, msg, param=param) from None

    def check_model(self, name: str | None) -> None:
        if name is None or name == self.cfg.model_id or name in self.cfg.aliases:
            return
        raise APIError(
            404,
            f"model {name!r} does not exist; this server serves {self.cfg.model_id!r}",
            param="model",
            code="model_not_found",
        )

    def check_tokens(self, toks: list[int], param: str) -> None:
        n_vocab = self.engine.n_vocab
        for t in toks:
            if not 0 <= t < n_vocab:
                raise APIError(400, f"{param}: token id {t} is outside the vocabulary [0, {n_vocab})", param=param)

    def check_prompt(self, toks: list[int], param: str) -> None:
        n_ctx = self.engine.n_ctx
        if len(toks) >= n_ctx:
            raise APIError(
                400,
                f"{param} is {len(toks)} tokens; the context holds {n_ctx} (each slot's -c); shorten it",
                param=param,
                code="context_length_exceeded",
            )

    def gen_params(self, r: Any, max_tokens: int | None, logprobs: int | None) -> GenParams:
        if r.n > self.cfg.max_n:
            raise APIError(400, f"n must be <= {self.cfg.max_n}, got {r.n}", param="n")
        bias: dict[int, float] | None = None
        if r.logit_bias:
            bias = {int(k): v for k, v in r.logit_bias.items()}
            self.check_tokens(list(bias), "logit_bias")
        sp = SamplingParams(
            temperature=r.temperature,
            top_k=r.top_k,
            top_p=r.top_p,
            min_p=r.min_p,
            typical_p=r.typical_p,
            repeat_penalty=r.repeat_penalty,
            frequency_penalty=r.frequency_penalty,
            presence_penalty=r.presence_penalty,
            penalty_last_n=r.penalty_last_n,
            seed=r.seed if r.seed is None or r.seed >= 0 else None,
            logit_bias=bias,
        )
        try:
            sp.validate()
        except LmapError as e:
            raise APIError(400, str(e)) from None
        stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        return GenParams(
            sampling=sp,
            max_tokens=max_tokens,
            stop=stop,
            logprobs=logprobs,
            matchers=self.matchers(r),
            cache_prompt=r.cache_prompt,
        )

    def matchers(self, r: Any) -> list[Any] | None:
        try:
            if r.grammar is not None:
                param = "grammar"
                g = Grammar.from_gbnf(r.grammar)
            else:
                param = "response_format"
                g = Grammar.from_response_format(r.response_format)
            if g is None:
                return None
            # a fresh grammar per request: its memo tables are then only ever touched by the worker
            return [g.matcher(self.vocab) for _ in range(r.n)]
        except LmapError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    # ------------------------------------------------------------------ running a job
    async def next_event(self, job: Job, request: Request) -> tuple[Any, ...]:
        """The job's next event; cancels the job (and raises) if the client goes away meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), self.cfg.disconnect_poll_s)
            except TimeoutError:
                if await request.is_disconnected():
                    self.engine.cancel(job)
                    raise APIError(499, "client closed the request", code="client_closed") from None

    def submit(self, prompt: Any, params: GenParams | None, n: int, embed: bool = False) -> Job:
        job = Job(prompt, params, n, embed=embed, loop=asyncio.get_running_loop())
        self.engine.submit(job)
        return job

    @staticmethod
    def raise_error(ev: tuple[Any, ...]) -> None:
        e = ev[1]
        if isinstance(e, ContextOverflowError):
            raise APIError(400, str(e), code="context_length_exceeded")
        if isinstance(e, LmapError):
            raise APIError(400, str(e))
        raise APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    async def events(self, job: Job, request: Request, first: tuple[Any, ...] | None) -> AsyncIterator[tuple]:
        """Every event of ``job`` until all choices are done; cancels the job if the consumer stops."""
        try:
            n_done = 0
            ev = first
            while True:
                if ev is None:
                    ev = await self.next_event(job, request)
                if ev[0] == "error":
                    self.raise_error(ev)
                yield ev
                if ev[0] == "done":
                    n_done += 1
                    if n_done >= job.n:
                        return
                ev = None
        finally:
            if not job.finished:
                self.engine.cancel(job)

    # ------------------------------------------------------------------ completions
    async def completions(self, request: Request) -> Response:
        r: CompletionRequest = self.validate(CompletionRequest, await self.body(request))
        self.check_model(r.model)
        if r.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        prompt = r.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request is supported (use n for several choices)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            toks = self.llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        else:
            toks = list(prompt)  # type: ignore[arg-type]
            self.check_tokens(toks, "prompt")
        if not toks:
            bos = self.llama.token_bos()
            if bos < 0:
                raise APIError(400, "prompt is empty and the model has no BOS token", param="prompt")
            toks = [bos]
        self.check_prompt(toks, "prompt")
        params = self.gen_params(r, r.max_tokens, r.logprobs)
        return await self.run(request, r, toks, params, chat=False)

    async def chat(self, request: Request) -> Response:
        r: ChatRequest = self.validate(ChatRequest, await self.body(request))
        self.check_model(r.model)
        messages = [m.model_dump(exclude_none=True) for m in r.messages]
        try:
            toks = self.llama.apply_chat_template(messages)
        except LmapError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        self.check_prompt(toks, "messages")
        max_tokens = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
        k = (r.top_logprobs or 0) if r.logprobs else None
        if r.top_logprobs and not r.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = self.gen_params(r, max_tokens, k)
        return await self.run(request, r, toks, params, chat=True)

    async def run(self, request: Request, r: Any, toks: list[int], params: GenParams, *, chat: bool) -> Response:
        job = self.submit(toks, params, r.n)
        # wait for the first event before answering, so that a failure becomes a proper error status
        try:
            first = await self.next_event(job, request)
        except BaseException:
            self.engine.cancel(job)
            raise
        if first[0] == "error":
            self.raise_error(first)
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        model = r.model or self.cfg.model_id
        events = self.events(job, request, first)
        if r.stream:
            include_usage = bool(r.stream_options and r.stream_options.include_usage)
            fmt = self.chat_stream if chat else self.completion_stream
            return StreamingResponse(
                self.sse(fmt(events, cid, created, model, len(toks), r.n, include_usage, r)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts = [""] * r.n
        lps: list[list[TokenLogprob]] = [[] for _ in range(r.n)]
        finish: list[str | None] = [None] * r.n
        n_completion = 0
        async for ev in events:
            if ev[0] == "text":
                texts[ev[1]] += ev[2]
                if ev[3]:
                    lps[ev[1]].extend(ev[3])
            elif ev[0] == "done":
                finish[ev[1]] = ev[2]
                n_completion += ev[3]
        usage = {
            "prompt_tokens": len(toks),
            "completion_tokens": n_completion,
            "total_tokens": len(toks) + n_completion,
        }
        if chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": {"content": [self.chat_logprob(e) for e in lps[i]]}
                    if params.logprobs is not None
                    else None,
                    "finish_reason": finish[i],
                }
                for i in range(r.n)
            ]
            obj = "chat.completion"
        else:
            prefix = self.llama.detokenize(toks).decode("utf-8", errors="replace") if r.echo else ""
            choices = [
                {
                    "index": i,
                    "text": prefix + texts[i],
                    "logprobs": self.completion_logprobs(lps[i], len(prefix)) if params.logprobs is not None else None,
                    "finish_reason": finish[i],
                }
                for i in range(r.n)
            ]
            obj = "text_completion"
        return JSONResponse(
            {"id": cid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage}
        )

    @staticmethod
    async def sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
        try:
            async for c in chunks:
                yield b"data: " + json.dumps(c, ensure_ascii=False).encode("utf-8") + b"\n\n"
        except APIError as e:  # headers are sent: report in-band, as llama-server does
            err = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
            yield b"data: " + json.dumps(err).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    @staticmethod
    def chat_logprob(e: TokenLogprob) -> dict[str, Any]:
        return {
            "token": _piece(e.piece),
            "logprob": e.logprob,
            "bytes": list(e.piece),
            "top_logprobs": [{"token": _piece(b), "logprob": lp, "bytes": list(b)} for _, b, lp in e.top],
        }

    @staticmethod
    def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(_piece(e.piece))
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append({_piece(b): lp for _, b, lp in e.top})
            out["text_offset"].append(offset)
            offset += len(_piece(e.piece))
        return out

    async def chat_stream(
        self,
        events: AsyncIterator[tuple],
        cid: str,
        created: int,
        model: str,
        n_prompt: int,
        n: int,
        include_usage: bool,
        r: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        logprobs = bool(r.logprobs)

        def chunk(i: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}],
            }
            if include_usage:
                c["usage"] = None
            return c

        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        n_completion = 0
        async for ev in events:
            if ev[0] == "text":
                lp = {"content": [self.chat_logprob(e) for e in ev[3]]} if logprobs and ev[3] else None
                yield chunk(ev[1], {"content": ev[2]}, None, lp)
            elif ev[0] == "done":
                n_completion += ev[3]
                yield chunk(ev[1], {}, ev[2])
        if include_usage:
            yield {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": n_completion,
                    "total_tokens": n_prompt + n_completion,
                },
            }

    async def completion_stream(
        self,
        events: AsyncIterator[tuple],
        cid: str,
        created: int,
        model: str,
        n_prompt: int,
        n: int,
        include_usage: bool,
        r: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        def chunk(i: int, text: str, finish: str | None = None, lp: Any = None) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}],
            }
            if include_usage:
                c["usage"] = None
            return c

        offsets = [0] * n
        n_completion = 0
        async for ev in events:
            if ev[0] == "text":
                i = ev[1]
                lp = self.completion_logprobs(ev[3], offsets[i]) if ev[3] and r.logprobs is not None else None
                offsets[i] += len(ev[2])
                yield chunk(i, ev[2], None, lp)
            elif ev[0] == "done":
                n_completion += ev[3]
                yield chunk(ev[1], "", ev[2])
        if include_usage:
            yield {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": n_completion,
                    "total_tokens": n_prompt + n_completion,
                },
            }

    # ------------------------------------------------------------------ the rest
    async def embeddings(self, request: Request) -> Response:
        r: EmbeddingRequest = self.validate(EmbeddingRequest, await self.body(request))
        self.check_model(r.model)
        inp = r.input
        items: list[Any] = [inp] if isinstance(inp, str) or (inp and isinstance(inp[0], int)) else list(inp)
        if not items:
            raise APIError(400, "input must not be empty", param="input")
        inputs: list[list[int]] = []
        for x in items:
            toks = self.llama.tokenize(x.encode("utf-8"), add_bos=True) if isinstance(x, str) else list(x)
            if not toks:
                raise APIError(400, "input holds an empty text", param="input")
            self.check_tokens(toks, "input")
            if len(toks) > self.engine.n_ctx:
                raise APIError(
                    400,
                    f"input is {len(toks)} tokens; the context holds {self.engine.n_ctx}",
                    param="input",
                    code="context_length_exceeded",
                )
            inputs.append(toks)
        if r.dimensions is not None and r.dimensions != self.engine.model.hp.n_embd:
            raise APIError(
                400, f"dimensions: this model's embeddings have {self.engine.model.hp.n_embd}", param="dimensions"
            )
        job = self.submit(inputs, None, 1, embed=True)
        try:
            ev = await self.next_event(job, request)
        except BaseException:
            self.engine.cancel(job)
            raise
        if ev[0] == "error":
            self.raise_error(ev)
        vectors, n_tokens = ev[1], ev[2]
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": i,
                        # base64: the little-endian float32 bytes (what the openai client asks for by default)
                        "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                        if r.encoding_format == "base64"
                        else v.tolist(),
                    }
                    for i, v in enumerate(vectors)
                ],
                "model": r.model or self.cfg.model_id,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            }
        )

    async def tokenize(self, request: Request) -> Response:
        r: TokenizeRequest = self.validate(TokenizeRequest, await self.body(request))
        toks = self.llama.tokenize(r.content.encode("utf-8"), add_bos=r.add_special, special=True)
        if r.with_pieces:
            pieces = [{"id": t, "piece": _piece(self.engine.tokenizer.token_to_piece(t))} for t in toks]
            return JSONResponse({"tokens": pieces})
        return JSONResponse({"tokens": toks})

    async def detokenize(self, request: Request) -> Response:
        r: DetokenizeRequest = self.validate(DetokenizeRequest, await self.body(request))
        self.check_tokens(r.tokens, "tokens")
        return JSONResponse({"content": _piece(self.llama.detokenize(r.tokens))})

    def models(self) -> dict[str, Any]:
        hp = self.engine.model.hp
        return {
            "object": "list",
            "data": [
                {
                    "id": self.cfg.model_id,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "lmap",
                    "meta": {
                        "n_ctx": self.engine.n_ctx,
                        "n_vocab": hp.n_vocab,
                        "n_embd": hp.n_embd,
                        "n_params": None,
                        "arch": hp.arch,
                        "slots": self.engine.n_slots,
                    },
                }
            ],
        }

    def health(self) -> dict[str, Any]:
        e = self.engine
        return {
            "status": "ok",
            "slots_idle": e.n_slots - e.n_busy,
            "slots_processing": e.n_busy,
            "requests_queued": e.n_queued,
        }


class APIKeyCheck:
    """Requests to anything but the public paths must carry the key (``Authorization: Bearer KEY``).

    A plain ASGI middleware: ``@app.middleware("http")`` (Starlette's BaseHTTPMiddleware) relays
    every chunk of a streamed response through an extra task and memory stream, and with 16
    streaming clients that relay was a fifth of the event loop's time, taken from the two cores
    the kernels run on.
    """

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
            headers = Headers(scope=scope)
            got = headers.get("authorization", "")
            token = got[7:].strip() if got[:7].lower() == "bearer " else headers.get("x-api-key", "")
            err = None
            if not token:
                err = APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
            elif token != self.key:
                err = APIError(401, "invalid API key", code="invalid_api_key")
            if err is not None:
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app over a started (or about to be started) :class:`Engine`."""
    h = Handlers(engine, config)
    app = FastAPI(title="lmap", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.handlers = h

    if config.api_key:
        app.add_middleware(APIKeyCheck, key=config.api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return APIError(e.status_code, msg, type=kind).response()

    @app.exception_handler(LmapError)
    async def lmap_error(request: Request, e: LmapError) -> Response:
        return APIError(400, str(e)).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> Response:
        log.exception("request failed")
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return h.health()

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> dict[str, Any]:
        return h.models()

    app.add_api_route("/v1/completions", h.completions, methods=["POST"])
    app.add_api_route("/completions", h.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", h.chat, methods=["POST"])
    app.add_api_route("/chat/completions", h.chat, methods=["POST"])
    app.add_api_route("/v1/embeddings", h.embeddings, methods=["POST"])
    app.add_api_route("/embeddings", h.embeddings, methods=["POST"])
    app.add_api_route("/tokenize", h.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", h.detokenize, methods=["POST"])
    return app
