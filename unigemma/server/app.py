"""The HTTP app: OpenAI-compatible routes over the continuous-batching scheduler.

    app = create_app(gemma, ServerConfig(api_key="k"))   # uvicorn.run(app, host="127.0.0.1")

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (queue depth, running rows, KV use, tokens/s), GET / (the chat page). Every
generation is a `Scheduler.submit`; a client that goes away cancels its requests (the
scheduler frees their rows at its next step). Errors are OpenAI's error object: 400 for bad
JSON, fields, media or a prompt longer than the context, 401 for a missing or wrong key, 413
for a body over the limit, 429 when the queue is full. Response bodies are built in
`respond.py`; request conversion in `convert.py`.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import InputError, QueueFull
from ..generate.grammar import Grammars
from ..generate.scheduler import Scheduler
from . import convert, respond
from .limits import BodyLimit, Meter
from .schema import ChatRequest, CompletionRequest, error_body

PAGE = Path(__file__).with_name("static") / "index.html"


@dataclass
class ServerConfig:
    model_name: str = "unigemma"
    api_key: str | None = None
    max_seqs: int = 8
    # tokens per sequence (prompt + reply): each of max_seqs rows holds this much KV from the start,
    # so the model's whole context (262,144 for the 12B) would not fit; None: the model's context
    max_len: int | None = 8192
    max_queue: int = 64
    max_body_bytes: int = 32 << 20
    max_tokens_default: int = 1024  # a request that sets no max_tokens gets at most this many
    limits: convert.Limits = field(default_factory=convert.Limits)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, param, code)


def create_app(gemma, config: ServerConfig | None = None, scheduler: Scheduler | None = None) -> FastAPI:
    """An app serving `gemma` (a `unigemma.load` result); starts its scheduler thread."""
    config = config or ServerConfig()
    engine = gemma.engine
    scheduler = scheduler or Scheduler(engine, max_seqs=config.max_seqs, max_len=config.max_len,
                                       max_queue=config.max_queue)
    scheduler.start()
    grammars = Grammars(gemma.tokenizer, engine.base_stop_ids, gemma.config.text.vocab_size)
    meter = Meter(scheduler)
    processors: dict[int, object] = {}
    app = FastAPI(title="unigemma", version="0.1.0",
                  description="OpenAI-compatible API for Gemma 4 unified models (unigemma).")
    app.state.scheduler, app.state.grammars = scheduler, grammars
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    # -- errors: always OpenAI's error object -------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):  # FastAPI's 422 -> OpenAI's 400
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('msg', '')}",
                                           code="invalid_json"), status_code=400)
        where = ".".join(loc) or "body"
        return JSONResponse(error_body(f"{where}: {first.get('msg', 'invalid')}", param=where or None),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(InputError)
    async def _input(_, e: InputError):
        return JSONResponse(error_body(str(e)), status_code=400)

    @app.exception_handler(QueueFull)
    async def _full(_, e: QueueFull):
        return JSONResponse(error_body(str(e), "rate_limit_error", code="queue_full"), status_code=429,
                            headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):  # a bug: still an error object, never a bare traceback
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    def auth(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    def processor(budget: int):
        if budget not in processors:
            processors[budget] = gemma.processor(budget)
        return processors[budget]

    def submit(inputs: dict, params: list, constraints: list) -> list:
        n = inputs["input_ids"].shape[1]
        if n >= scheduler.max_len:
            raise ApiError(400, f"the prompt is {n} tokens; this server's context holds {scheduler.max_len} "
                                "(prompt + reply)", param="messages", code="context_length_exceeded")
        requests = []
        try:
            for p, c in zip(params, constraints):
                requests.append(scheduler.submit(inputs, p, constraint=c))
        except Exception:
            for r in requests:  # all n choices or none
                r.cancel()
            raise
        return requests

    def check_model(name):
        if name not in (None, "", config.model_name):
            raise ApiError(404, f"model {name!r} is not served here (this server serves {config.model_name!r})",
                           "not_found_error", param="model", code="model_not_found")

    # -- routes -------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        inputs, constraints = await run_in_threadpool(_chat_plan, body, config, grammars, processor)
        params = [convert.params(body, gemma.default_params, i, config.max_tokens_default) for i in range(body.n)]
        requests = submit(inputs, params, constraints)
        return await respond.chat(request, requests, body, config.model_name, gemma.tokenizer, meter)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) * body.n > 16:
            raise ApiError(400, "prompt: 1 to 16 prompts × n", param="prompt")
        requests = []
        try:
            for prompt in prompts:
                ids = await run_in_threadpool(gemma.tokenizer.encode, prompt)
                inputs = {"input_ids": _tensor(ids)}
                params = [convert.params(body, gemma.default_params, i, config.max_tokens_default)
                          for i in range(body.n)]
                requests += submit(inputs, params, [None] * body.n)
        except Exception:
            for r in requests:
                r.cancel()
            raise
        return await respond.completion(request, requests, body, config.model_name, gemma.tokenizer, meter)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": meter.started,
                                            "owned_by": "unigemma", "max_model_len": scheduler.max_len}]}

    @app.get("/health")
    async def health():
        alive = scheduler._thread is not None and scheduler._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "scheduler stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics", dependencies=[Depends(auth)])
    async def metrics():
        return meter.snapshot()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app


def _tensor(ids: list[int]):
    import torch

    return torch.tensor([ids], dtype=torch.long)


def _chat_plan(body: ChatRequest, config: ServerConfig, grammars: Grammars, processor) -> tuple[dict, list]:
    """Messages -> model inputs, and one grammar per choice (each keeps its own state) or Nones.
    Runs in a worker thread: media decoding and grammar compilation take a while."""
    messages = convert.messages(body, config.limits)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice
    make = None
    if tools and choice == "none":
        tools = None
    elif tools and choice is not None and choice != "auto":
        forced = tools if choice == "required" else [t for t in tools if t["function"]["name"] == choice.function.name]
        if not forced:
            raise InputError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        make = lambda: grammars.tool_call(forced)  # noqa: E731
    elif choice not in (None, "auto", "none") and not tools:
        raise InputError("tool_choice needs tools")
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        if make is not None:
            raise InputError("response_format and a forced tool_choice cannot both constrain the reply")
        if fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InputError("response_format json_schema needs a json_schema object")
            schema = fmt.json_schema.schema_
            make = lambda: grammars.json_schema(schema)  # noqa: E731
        else:
            make = grammars.json_object
    constraints = [make() if make else None for _ in range(body.n)]
    # a constrained reply starts at once: thinking would put free text before it
    enable_thinking = convert.thinking(body) and make is None
    inputs = processor(body.image_budget or 280)(messages, tools=tools, enable_thinking=enable_thinking)
    inputs.pop("num_frames_per_video", None)
    return inputs, constraints
