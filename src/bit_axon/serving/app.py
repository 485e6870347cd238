"""The HTTP side of ``bit-axon serve``: OpenAI's API over the engine, the web page, the runs API.

Handlers only parse, check and translate; all generation happens on the engine's worker thread,
whose events reach each request through its own asyncio queue. A client that goes away cancels
its request, which frees its batch row at the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

from bit_axon.serving import runs
from bit_axon.serving.engine import Delta, Engine, Event, Finished, GenerationRequest, Job
from bit_axon.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
    usage,
)

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

STATIC = resources.files("bit_axon.serving") / "static"
DISCONNECT_POLL_SECONDS = 0.5


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """One line naming each bad field of the body, as the user would fix it."""
    parts, param = [], None
    for item in error.errors():
        location = [str(p) for p in item.get("loc", ()) if p != "body"]
        if item.get("type") == "json_invalid":
            return f"The request body is not valid JSON ({item.get('msg')}); send a JSON object.", None
        field = ".".join(location) or "body"
        param = param or field
        message = item.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{field}: {message}")
    return "Invalid request: " + "; ".join(parts), param


def create_app(engine: Engine, runs_dir: Path | None = None, api_key: str | None = None,
               default_max_tokens: int = 512) -> FastAPI:
    """The ASGI app serving ``engine``'s models, and the training runs under ``runs_dir`` if given.

    With ``api_key``, the ``/v1`` routes want ``Authorization: Bearer <api_key>``.
    """
    app = FastAPI(title="bit-axon serve", docs_url="/docs", redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return APIError(error.status_code, str(error.detail), code=code).response()

    @app.middleware("http")
    async def _check_key(request: Request, call_next):  # noqa: ANN001, ANN202  (Starlette's signature)
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>' "
                                "with the key given to bit-axon serve --api-key.", kind="authentication_error",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict:
        created = now()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "bit-axon"} for name in engine.models]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        served = _served(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in body.messages]
        prompt = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return await _generate(request, body, prompt, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        served = _served(body.model)
        return await _generate(request, body, served.tokenizer.encode(body.text()), chat=False)

    def _served(name: str):  # noqa: ANN202
        if name not in engine.models:
            known = ", ".join(repr(m) for m in engine.models)
            raise APIError(404, f"The model {name!r} is not served here; use one of {known} (GET /v1/models).",
                           param="model", code="model_not_found")
        return engine.models[name]

    async def _generate(request: Request, body, prompt: list[int], chat: bool) -> Response:  # noqa: ANN001
        served = engine.models[body.model]
        room = served.context_length - len(prompt)
        if room < 1:
            raise APIError(400, f"The prompt is {len(prompt)} tokens, and model {body.model!r} reads at most "
                           f"{served.context_length} tokens (prompt and reply together): shorten the prompt.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        limit = body.token_limit() or default_max_tokens
        generation = GenerationRequest(model=body.model, prompt_ids=prompt, max_tokens=min(limit, room),
                                       temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                       stop=body.stops())
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            job = engine.submit(generation, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except ValueError as error:
            raise APIError(400, str(error)) from error
        ident = new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            return StreamingResponse(_stream(job, events, ident, body, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(request, job, events, ident, body, chat)

    async def _complete(request: Request, job: Job, events: asyncio.Queue[Event], ident: str, body,  # noqa: ANN001
                        chat: bool) -> Response:
        parts: list[str] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return Response(status_code=499)
                    continue
                if isinstance(event, Delta):
                    parts.append(event.text)
                    continue
                break
        except asyncio.CancelledError:
            job.cancel()
            raise
        if event.reason == "error":
            raise APIError(500, event.message, kind="server_error", code="generation_failed")
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text})
        choice |= {"finish_reason": event.reason, "logprobs": None}
        return JSONResponse({
            "id": ident, "object": "chat.completion" if chat else "text_completion", "created": now(),
            "model": body.model, "choices": [choice], "usage": usage(event.prompt_tokens, event.completion_tokens)})

    async def _stream(job: Job, events: asyncio.Queue[Event], ident: str, body, chat: bool) -> AsyncIterator[str]:  # noqa: ANN001
        created = now()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(content: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if content is None else {"content": content})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}
            return _sse({"id": ident, "object": kind, "created": created, "model": body.model, "choices": [choice]})

        try:
            if chat:
                yield chunk(None, role=True)
            while True:
                event = await events.get()
                if isinstance(event, Delta):
                    yield chunk(event.text)
                    continue
                assert isinstance(event, Finished)
                if event.reason == "error":
                    yield _sse(error_body(event.message, "server_error", code="generation_failed"))
                else:
                    yield chunk(None, event.reason)
                    if body.include_usage():
                        yield _sse({"id": ident, "object": kind, "created": created, "model": body.model,
                                    "choices": [], "usage": usage(event.prompt_tokens, event.completion_tokens)})
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancel()  # the client went away (or the stream ended: then this changes nothing)

    # --- the web page and the training runs ------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/api/runs")
    async def list_runs() -> dict:
        return {"root": str(runs_dir) if runs_dir else None, "runs": runs.list_runs(runs_dir) if runs_dir else []}

    @app.get("/api/metrics")
    async def run_metrics(run: str, offset: int = 0) -> dict:
        """The records of run ``run`` after byte ``offset`` (``reset``: the file is shorter than
        ``offset``, rewritten since, so its records start again from the top)."""
        path = _run(run)
        metrics = path / runs.METRICS_FILE
        reset = offset > metrics.stat().st_size
        records, end = runs.read_new_records(metrics, 0 if reset else max(offset, 0))
        return {"run": run, "records": records, "offset": end, "reset": reset, **runs.run_summary(path)}

    def _run(name: str) -> Path:
        if runs_dir is None:
            raise APIError(404, "No runs directory: start the server with --runs DIR to watch training runs.",
                           code="not_found")
        try:
            return runs.run_directory(runs_dir, name)
        except ValueError as error:
            raise APIError(404, str(error), param="name", code="not_found") from error

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
