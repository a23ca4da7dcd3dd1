"""The HTTP side of ``agd serve``: an OpenAI-compatible FastAPI app over the :class:`Scheduler`.

A request is checked completely here (schema, settings, template, ROI, length) before it reaches
the decoding thread, so bad input costs no model compute and gets a 400 with an OpenAI error object.
Tokens come back from the scheduler thread through ``loop.call_soon_threadsafe`` into a per-request
asyncio queue; streaming responses decode the whole output so far at every token and send the new
suffix, so multi-byte characters split over tokens arrive whole.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..architectures import get_spec
from ..checks import is_int
from ..config import resolve_config
from ..decoding import make_jobs
from ..errors import AgdError
from ..methods import get_method
from ..roi import parse_rois
from ..models import dtype_name
from ..prefix_cache import PrefixCache
from ..trace import GenerationResult
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .scheduler import Request, Scheduler
from .schema import ChatRequest, CompletionRequest, unsupported

__all__ = ["AgdServer", "ApiError", "create_app", "DEFAULT_SETTINGS"]

log = logging.getLogger("agdecode.serve")

# The server's defaults for requests without an ``agd`` object: AGD_e with the paper's threshold.
DEFAULT_SETTINGS = {"method": "agd", "roi": "system", "entropy_threshold": 1.734}


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class AgdServer:
    """What the app serves: one model, its default settings, the limits and the decoding thread.

    ``defaults`` are AGDConfig settings used when a request does not set them (checked here, so a
    server that could not run its own defaults does not start). ``prefix_cache_bytes`` bounds the
    keys and values of prompt prefixes kept for reuse across requests (0: none).

    Example:
        >>> server = AgdServer(model, tok, "smollm2", {"method": "agd", "entropy_threshold": 1.734})
        >>> uvicorn.run(create_app(server), host="127.0.0.1", port=8000)
    """

    def __init__(self, model, tokenizer, name: str, defaults: dict | None = None, max_batch: int = 16,
                 max_tokens: int = 256, api_key: str | None = None, max_body_bytes: int = 1 << 20,
                 strict_roi: bool = False, read_timeout: float = 30.0, prefix_cache_bytes: int = 1 << 30):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.defaults = dict(DEFAULT_SETTINGS if defaults is None else defaults)
        cfg = resolve_config(model, tokenizer, **self.defaults)  # AgdError for bad defaults
        if get_method(cfg.method).guided:
            get_spec(model)
        self.strict_roi, self.read_timeout = strict_roi, read_timeout
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise AgdError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise AgdError(f"max_body_bytes must be an integer >= 1, got {max_body_bytes!r}")
        self.max_tokens, self.api_key, self.max_body_bytes = max_tokens, api_key, max_body_bytes
        self.context = getattr(model.config, "max_position_embeddings", None)
        if not is_int(prefix_cache_bytes) or prefix_cache_bytes < 0:
            raise AgdError(f"prefix_cache_bytes must be an integer >= 0, got {prefix_cache_bytes!r}")
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.scheduler = Scheduler(model, tokenizer, max_batch, self.prefix_cache)
        self.metrics = ServerMetrics(self.scheduler.load, self.prefix_cache)
        self.created = int(time.time())

    def settings(self, req: ChatRequest | CompletionRequest, notes: list[str] | None = None) -> dict:
        """The AGDConfig settings of a request: server defaults, then ``agd``, then the OpenAI fields.

        The method is ``agd.method``, else the server's. A stochastic method (``sample``) takes
        ``temperature``, ``top_p`` (default 1) and ``seed`` (absent: fresh randomness per request,
        as OpenAI). ``temperature > 0`` with a deterministic method named in ``agd.method`` is refused
        (400); with the server's default method it is not applied, and ``notes`` says so (the
        response's ``agd.note``): the server never switches AGD off behind the client's back.
        """
        agd = req.agd.settings() if req.agd is not None else {}
        temperature = req.temperature or 0.0
        method = agd.get("method") or self.defaults.get("method", "agd")
        stochastic = get_method(method).stochastic
        if not stochastic and temperature > 0:
            if "method" in agd:
                raise ApiError(400, f"method {method!r} is deterministic: temperature must be 0 or absent (set "
                                    "agd.method to 'sample' to sample with a temperature)", "temperature")
            if notes is not None:
                notes.append(f"temperature {temperature:g} not applied: this server decodes with method {method!r}, "
                             "which is deterministic (set agd.method to 'sample' to sample)")
        settings = {**self.defaults, **agd, "method": method}
        if req.repetition_penalty is not None:
            if "repetition_penalty" in agd:
                raise ApiError(400, "repetition_penalty is given twice (top level and in 'agd'): give it once",
                               "repetition_penalty")
            settings["repetition_penalty"] = req.repetition_penalty
        if req.min_tokens:
            settings["min_new_tokens"] = req.min_tokens
        if stochastic:
            if req.temperature == 0:
                raise ApiError(400, f"method {method!r} samples: temperature 0 would mean greedy; use a temperature "
                                    "> 0, or agd.method 'greedy'", "temperature")
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            settings.update(temperature=req.temperature or 1.0, top_p=req.top_p or 1.0, seed=seed)
        elif req.top_k not in (None, -1, 0) and notes is not None:
            notes.append(f"top_k {req.top_k} not applied: method {method!r} does not sample")
        if req.stop:
            settings["stop_strings"] = list(req.stop)
        return settings

    def _without_roi_message(self, req: ChatRequest | CompletionRequest, settings: dict, notes: list[str]) -> dict:
        """A guided method whose default ROI names a message the request lacks (a chat without a system
        message; a completion has no messages at all): greedy, with a note; or, under ``--strict-roi``
        or when the request chose the ROI itself, left to the ROI check (a 400 naming the message)."""
        if not get_method(settings["method"]).uses_roi:
            return settings
        conv = req.conversation()
        roles = {m["role"] for m in conv} if isinstance(conv, list) else set()
        named = {t.roi.value[0] for expr in parse_rois(settings.get("roi", "system")) for t in expr
                 if t.roi.kind == "role"}
        missing = sorted(named - roles)
        if not missing or self.strict_roi or (req.agd is not None and "roi" in req.agd.settings()):
            return settings
        where = "a completion prompt has no messages" if isinstance(conv, str) else f"no {'/'.join(missing)} message"
        notes.append(f"{where}: decoded without guidance (greedy); set agd.roi (e.g. "
                     f"{'chars:0-40' if isinstance(conv, str) else 'user'}) to guide it")
        kept = ("stop_strings", "max_new_tokens", "min_new_tokens", "repetition_penalty")  # every method's settings
        return {k: v for k, v in settings.items() if k in kept} | {"method": "greedy"}

    def prepare(self, req: ChatRequest | CompletionRequest) -> tuple[Request, bool]:
        """Check a request completely and make its job; ``(request, trace?)``. Raises :class:`ApiError`."""
        if req.model != self.name:
            raise ApiError(404, f"The model {req.model!r} does not exist; this server serves {self.name!r}.",
                           "model", "model_not_found")
        bad = unsupported(req)
        if bad is not None:
            raise ApiError(400, bad[1], bad[0])
        max_tokens = req.max_new_tokens()
        notes: list[str] = []
        try:
            settings = self._without_roi_message(req, self.settings(req, notes), notes)
            cfg = resolve_config(self.model, self.tokenizer, **settings, max_new_tokens=max_tokens or 1)
            if get_method(cfg.method).guided:
                get_spec(self.model)  # an architecture AttnLRP does not cover: refuse before any compute
            docs = None if req.documents is None else [d.model_dump() for d in req.documents]
            template = req.template_kwargs()
            job = make_jobs(self.model, self.tokenizer, cfg, [req.conversation()], [docs], names=False,
                            chat_template_kwargs=template)[0]
        except ValueError as e:  # AgdError, and the library's other input errors
            raise ApiError(400, str(e)) from None
        if max_tokens is None:  # the server's default, within the context
            room = self.context - len(job.row.input_ids) if self.context else self.max_tokens
            job.max_new_tokens = min(self.max_tokens, room)
            cfg = replace(cfg, max_new_tokens=job.max_new_tokens)
        if req.ignore_eos:  # vLLM's ignore_eos: end-of-sequence does not stop before the token budget
            cfg = replace(cfg, min_new_tokens=job.max_new_tokens)
        # Its own budget, stop strings and sampling settings (Sample seeds its generator from them),
        # whichever decoder it shares: requests with other seeds share a batch.
        job.config = cfg
        heads = any(r.heads is not None for r in job.rois)
        rid = f"{'chatcmpl' if isinstance(req, ChatRequest) else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        return Request(rid, job, cfg, done=_ignore, heads=heads, notes=notes), req.agd is not None and req.agd.trace


    def observed(self, req: Request, done):
        """``done`` that also counts the finished request in /metrics (called in the scheduler thread)."""
        def wrapped(result, error):
            m, method = self.metrics, req.config.method
            outcome = "error" if error is not None else "cancelled" if result is None else "ok"
            m.requests.labels(method=method, outcome=outcome).inc()
            m.latency.labels(method=method).observe(time.perf_counter() - req.submitted)
            if req.prefill_s:
                m.prefill.labels(method=method).observe(req.prefill_s)
            if result is not None:
                m.prompt_tokens.labels(method=method).inc(len(result.prompt_ids))
                m.tokens.labels(method=method).inc(len(result.token_ids))
                m.guided.labels(method=method).inc(result.guided_steps)
            done(result, error)
        return wrapped

    def first_token(self, req: Request, on_token):
        """A token callback that records the time to the first token, then calls ``on_token`` (if any)."""
        seen = []

        def wrapped(token: int) -> None:
            if not seen:
                seen.append(True)
                self.metrics.ttft.labels(method=req.config.method).observe(time.perf_counter() - req.submitted)
            if on_token is not None:
                on_token(token)
        return wrapped


def parse_body(body: bytes, schema: type = ChatRequest) -> ChatRequest | CompletionRequest:
    """A request body as a checked ``schema`` instance; :class:`ApiError` (400) naming the problem."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5,000-digit number, deep nesting
        raise ApiError(400, f"The request body is not valid JSON: {type(e).__name__}: {str(e)[:200]}",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(map(str, err["loc"])) or None
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None


def _ignore(result, error) -> None:
    pass


def first_stop(text: str, stops: list[str] | None) -> int:
    """Where the first stop string starts in ``text`` (``len(text)`` if none)."""
    found = [i for i in (text.find(s) for s in stops or []) if i >= 0]
    return min(found, default=len(text))


def final_text(result: GenerationResult, stops: list[str] | None) -> str:
    """The completion as OpenAI returns it: up to, not including, the first stop string."""
    return result.text[: first_stop(result.text, stops)]


def safe_text(text: str, stops: list[str] | None) -> str:
    """The part of a partial output that can be streamed now: no half character (U+FFFD at the end is a
    multi-byte character still being decoded), nothing from a stop string on, nor a tail that may
    begin one."""
    text = text.rstrip("\ufffd")
    if stops:
        text = text[: first_stop(text, stops)]
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[: len(text) - hold]
    return text


def _finish_reason(result: GenerationResult, text: str) -> str:
    return "stop" if len(text) < len(result.text) else result.extra.get("finish_reason", "stop")


def _agd_info(result: GenerationResult, req: Request, trace: bool) -> dict:
    cfg = req.config.to_dict()
    info = {"method": cfg["method"], "roi": cfg["roi"], "guided_steps": result.guided_steps,
            "overrides": result.overrides}
    if req.notes:
        info["note"] = "; ".join(req.notes)
    if trace:
        info["trace"] = {**result.to_dict(), "config": cfg}
    return info


def _error_status(error: BaseException) -> ApiError:
    """A configuration the model cannot run is the request's problem (400); anything else is ours (500)."""
    if isinstance(error, ValueError):
        return ApiError(400, str(error))
    return ApiError(500, f"decoding failed: {error}", type="server_error")


def create_app(server: AgdServer, replica: str | None = None):
    """The FastAPI app serving ``server``: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
    ``/health``, ``/metrics``.

    The app's lifespan starts the decoding thread and, on shutdown (SIGTERM: uvicorn first waits for
    the requests in flight), drains it. ``replica`` names this copy in an ``x-agd-replica`` header.

    Example:
        >>> uvicorn.run(create_app(AgdServer(model, tok, "smollm2")), host="127.0.0.1", port=8000)
    """
    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        log.info("serving %s in %s (max batch %d)", server.name, dtype_name(server.model.dtype),
                 server.scheduler.max_batch)
        yield
        log.info("shutting down: draining %d request(s)", server.scheduler.pending())
        await asyncio.to_thread(server.scheduler.close)

    app = FastAPI(title="agdecode", lifespan=lifespan, docs_url=None, redoc_url=None)
    headers = {"x-agd-replica": replica} if replica else {}

    def error_response(e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        server.metrics.rejected.labels(status=str(e.status)).inc()
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), code=None,
                                       type="invalid_request_error" if e.status_code < 500 else "server_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error_response(ApiError(400, str(e.errors())))

    def authorize(request: HttpRequest) -> None:
        if server.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), server.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided." if token else
                           "Missing API key: send it as 'Authorization: Bearer KEY'.", code="invalid_api_key")

    async def read_body(request: HttpRequest, schema: type = ChatRequest) -> ChatRequest | CompletionRequest:
        limit = server.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = ApiError(400, f"The request body is larger than this server's limit of {limit} bytes.",
                           code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise too_big
        try:  # a client that sends its body slowly must not hold a connection (and a task) forever
            await asyncio.wait_for(read(), server.read_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {server.read_timeout:g} s.",
                           code="request_timeout") from None
        return await asyncio.to_thread(parse_body, bytes(body), schema)  # big bodies parse off the event loop

    async def watch_disconnect(request: HttpRequest, req: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)
        req.job.cancelled = True
        log.info("client of %s disconnected", req.id)

    @app.get("/health")
    async def health():
        if not server.scheduler.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503, headers=headers)
        return JSONResponse({"status": "ok", "pending": server.scheduler.pending(),
                             "max_batch_seen": server.scheduler.max_rows_seen}, headers=headers)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST, headers=headers)

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": server.name, "object": "model", "created": server.created, "owned_by": "agdecode"}]},
            headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        return await complete(request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await complete(request, CompletionRequest)

    async def complete(request: HttpRequest, schema: type):
        authorize(request)
        body = await read_body(request, schema)
        # Tokenising and resolving a large prompt takes a while: off the event loop, so /health and
        # the token streams of running requests never wait for it.
        req, trace = await asyncio.to_thread(server.prepare, body)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def put(item) -> None:  # called in the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone (a forced shutdown): nobody is listening
                pass

        req.done = server.observed(req, lambda result, error: put(("done", (result, error))))
        req.job.on_token = server.first_token(req, (lambda t: put(("token", t))) if body.stream else None)
        try:
            server.scheduler.submit(req)
        except RuntimeError:
            raise ApiError(503, "The server is shutting down.", type="server_error") from None
        watcher = asyncio.create_task(watch_disconnect(request, req))
        try:
            first = await events.get()
        finally:
            watcher.cancel()
        if first[0] == "done":
            result, error = first[1]
            if error is not None:
                raise _error_status(error)
            if result is None:  # cancelled: the client has gone
                return Response(status_code=499)
        created = int(time.time())
        if not body.stream:
            return JSONResponse(_completion(req, result, trace, server.name, created, body), headers=headers)
        return StreamingResponse(_stream(req, first, events, trace, server, created, body),
                                 media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})

    return app


def _usage(result: GenerationResult) -> dict:
    n, m = len(result.prompt_ids), len(result.token_ids)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def _completion(req: Request, result: GenerationResult, trace: bool, model: str, created: int, body) -> dict:
    text = final_text(result, body.stop)
    chat = isinstance(body, ChatRequest)
    choice = {"index": 0, **({"message": {"role": "assistant", "content": text}} if chat else {"text": text}),
              "logprobs": None, "finish_reason": _finish_reason(result, text)}
    return {"id": req.id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": _usage(result), "agd": _agd_info(result, req, trace)}


async def _stream(req: Request, event, events: asyncio.Queue, trace: bool, server: AgdServer, created: int, body):
    """Server-sent events in the OpenAI chunk format; a client that goes away cancels the job."""
    stops, ids, sent, finished = body.stop, [], "", False
    chat = isinstance(body, ChatRequest)
    object_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        # chat: {"delta": {...}}; completions: the text itself ({"text": ...}).
        body_part = {"delta": delta} if chat else {"text": delta.get("content", "")}
        c = {"id": req.id, "object": object_name, "created": created, "model": server.name,
             "choices": [{"index": 0, **body_part, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, payload = event
            if kind == "token":
                ids.append(payload)
                text = safe_text(server.tokenizer.decode(ids, skip_special_tokens=True), stops)
                if len(text) > len(sent) and text.startswith(sent):
                    yield chunk({"content": text[len(sent):]})
                    sent = text
            else:
                result, error = payload
                if error is not None:
                    yield f"data: {json.dumps(_error_status(error).body())}\n\n"
                    finished = True
                    return
                text = final_text(result, stops)
                if not text.startswith(sent):  # never expected: decoding more tokens rewrote earlier text
                    log.warning("%s: streamed text is not a prefix of the final text", req.id)
                if len(text) > len(sent):
                    yield chunk({"content": text[len(sent):]})
                yield chunk({}, _finish_reason(result, text), agd=_agd_info(result, req, trace))
                if body.stream_options is not None and body.stream_options.include_usage:
                    c = {"id": req.id, "object": object_name, "created": created, "model": server.name,
                         "choices": [], "usage": _usage(result)}
                    yield f"data: {json.dumps(c)}\n\n"
                yield "data: [DONE]\n\n"
                finished = True
                return
            event = await events.get()
    finally:
        if not finished:  # the client went away: free the row at the next step
            req.job.cancelled = True
            log.info("client of %s disconnected mid-stream", req.id)
