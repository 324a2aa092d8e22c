"""The HTTP app: OpenAI-compatible routes over the continuous-batching scheduler.

    app = create_app(gemma, ServerConfig(api_key="k"))   # uvicorn.run(app, host="127.0.0.1")

Routes: POST /v1/chat/completions, POST /v1/completions (completions.py), GET /v1/models and
GET /v1/models/{id} (names.py), POST /tokenize and /detokenize (tokens.py), GET /health, GET
/metrics (Prometheus text, or JSON with ?format=json: metrics.py), GET / (the chat page, `page.py`),
GET /server_info, /model_info and /get_load (what a router asks its replicas: worker_info.py).
With `cors_origins`, browsers on those origins may call it (CORS, preflight included). Every
generation is a `Scheduler.submit`; a client that goes away cancels its requests (the
scheduler frees their rows at its next step). Errors are OpenAI's error object: 400 for bad
JSON, fields, media, a Host name the server does not answer to, or a prompt longer than the
context, 401 for a missing or wrong key, 413 for a body over the limit, 429 when the queue or
the media pool is full, 503 while shutting down; a 500 is a bug (the log has the traceback,
the client only its type). Requests with media are converted on a small pool of their own
(`pool.py`), so they cannot starve plain ones. Response bodies are built in `respond.py`;
request conversion in `convert.py` and `chat_plan.py`; `serve.py` runs it with a bounded shutdown.
What routes share (auth, the model name, planning, submitting) is one `Served`, at
`app.state.served`, so an endpoint in its own file registers itself with `register(app)`.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from ..errors import ContextTooLong, InputError, NoChatTemplate, QueueFull
from ..generate.grammar import Grammars
from ..generate.scheduler import Scheduler
from ..inputs import ModelInputs
from . import (adapters, completions, convert, metrics, names, page, respond, responses, tokens, transcribe,
               worker_info)
from .chat_plan import chat_plan, has_media
from .guard import LOOPBACK_NAMES, HostCheck
from .limits import BodyLimit, Closing, Meter
from .names import ModelNames
from .pool import MediaPool
from .schema import ApiError, ChatRequest, CompletionRequest, error_body

log = logging.getLogger("unigemma.server")


@dataclass
class ServerConfig:
    model_name: str = "unigemma"
    aliases: tuple[str, ...] = ()  # more names the model answers to (names.py)
    strict_model_name: bool = False  # True: a name not served is a 404; False: the one model answers any
    api_key: str | None = None
    max_seqs: int = 8
    # tokens per sequence (prompt + reply): each of max_seqs rows holds this much KV from the start,
    # so the model's whole context (262,144 for the 12B) would not fit; None: the model's context
    max_len: int | None = 8192
    max_queue: int = 64
    # automatic prefix caching (cache/prefix.py): MiB of K/V kept from earlier requests; 0: off
    prefix_cache_mb: float = 1024
    max_body_bytes: int = 32 << 20
    max_tokens_default: int = 1024  # a request that sets no max_tokens gets at most this many
    limits: convert.Limits = field(default_factory=convert.Limits)
    # Host names answered (DNS rebinding); "*" answers any; see guard.allowed_hosts for a bind address
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
    allow_ip_hosts: bool = False  # any IP literal as Host too (a server other machines reach)
    media_workers: int = 2  # threads converting requests with media; media_queue more may wait, then 429
    media_queue: int = 8
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*": any); none: no CORS headers
    # KV storage (cache/kv.py): "auto" | "bf16" | "fp16" | "fp32" | "int8" on "all" | "full" | "sliding"
    # layers; None: as the model was loaded (unigemma.load's kv_cache_dtype / kv_quant_layers)
    kv_cache_dtype: str | None = None
    kv_quant_layers: str | None = None
    # LoRA adapters (adapters.py): name → directory, loaded at start; a request's `model` selects one
    adapters: dict[str, str] = field(default_factory=dict)
    lora_loading: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    lora_dir: str | None = None  # the only directory clients may load adapters from
    max_loras: int = 16  # adapters loaded at once


class Served:
    """What every route shares: the model, the scheduler, the grammars, the meter, the media
    pool, and the steps each generation goes through (auth, the model name, planning, submit).
    Routes in other files take it from `app.state.served`."""

    def __init__(self, gemma, config: ServerConfig, scheduler: Scheduler, grammars: Grammars, meter: Meter,
                 media: MediaPool):
        self.gemma, self.config, self.scheduler, self.grammars = gemma, config, scheduler, grammars
        self.meter, self.media = meter, media
        self.names = ModelNames([config.model_name, *config.aliases], config.strict_model_name)
        self.adapters: dict[str, str] = {}  # LoRA adapter name → its path as given (adapters.py)
        self._processors: dict[int, object] = {}

    def add_adapter(self, name: str, path: str) -> None:
        self.adapters[name] = path
        self.names.exact = tuple(self.adapters)  # adapter names select weights: matched exactly

    def remove_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
        self.names.exact = tuple(self.adapters)

    def auth(self, request: Request) -> None:
        """A FastAPI dependency: the bearer key, when the server has one."""
        key_wanted = self.config.api_key
        if key_wanted is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), key_wanted.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    def processor(self, budget: int | None = None):
        budget = budget or self.gemma.image_budget  # none asked: the model's own
        if budget not in self._processors:
            self._processors[budget] = self.gemma.processor(budget, max_len=self.scheduler.max_len)
        return self._processors[budget]

    def check_model(self, name) -> str:
        """The model name a reply reports for the request's `model` (names.py); 404 when no
        served model answers to it."""
        reported = self.names.resolve(name)
        if reported is None:
            self.unknown_model(name)
        return reported

    def unknown_model(self, name):
        served = ", ".join(repr(n) for n in [*self.names.names, *self.adapters])
        raise ApiError(404, f"model {name!r} is not served here (this server serves {served})",
                       "not_found_error", param="model", code="model_not_found")

    async def plan(self, body: ChatRequest) -> tuple[ModelInputs, list]:
        """A chat request's model inputs and constraints; media (decoding, URL fetches) on its
        own bounded pool, plain text on the shared one."""
        plan = (body, self.config.limits, self.grammars, self.processor)
        return await (self.media.run(chat_plan, *plan) if has_media(body) else run_in_threadpool(chat_plan, *plan))

    def submit(self, inputs: dict, params: list, constraints: list, model: str | None = None) -> list:
        """One scheduler request per choice: all of them or none. model: the name the request
        resolved to (`check_model`); an adapter's name runs it under that adapter."""
        # only an adapter's name selects one; otherwise the scheduler's default (the base here)
        adapter = {"adapter": model} if model in self.adapters else {}
        if self.meter.closing:
            raise Closing("the server is shutting down; try again later")
        n, max_len = inputs["input_ids"].shape[1], self.scheduler.max_len
        if n >= max_len:
            raise ApiError(400, f"the prompt is {n} tokens; this server's context holds {max_len} "
                                "(prompt + reply)", param="messages", code="context_length_exceeded")
        requests = []
        try:
            for p, c in zip(params, constraints):
                requests.append(self.scheduler.submit(inputs, p, constraint=c, **adapter))
        except Exception:
            for r in requests:
                r.cancel()
            raise
        return requests


def create_app(gemma, config: ServerConfig | None = None, scheduler: Scheduler | None = None) -> FastAPI:
    """An app serving `gemma` (a `unigemma.load` result); starts its scheduler thread."""
    config = config or ServerConfig()
    engine = gemma.engine
    if config.kv_cache_dtype is not None or config.kv_quant_layers is not None:
        engine.set_kv_cache(config.kv_cache_dtype or engine.kv_cache_dtype,
                            config.kv_quant_layers or engine.kv_quant_layers)
    scheduler = scheduler or Scheduler(engine, max_seqs=config.max_seqs, max_len=config.max_len,
                                       max_queue=config.max_queue, prefix_cache_mb=config.prefix_cache_mb)
    scheduler.start()
    grammars = Grammars(gemma.tokenizer, engine.base_stop_ids, gemma.config.text.vocab_size)
    meter = Meter(scheduler)
    media = MediaPool(config.media_workers, config.media_queue)
    app = FastAPI(title="unigemma", version="0.1.0",
                  description="OpenAI-compatible API for Gemma 4 unified models (unigemma).")
    app.state.scheduler, app.state.grammars, app.state.meter = scheduler, grammars, meter
    served = app.state.served = Served(gemma, config, scheduler, grammars, meter, media)
    if config.lora_loading and not config.lora_dir:
        raise ValueError("loading LoRA adapters at run time needs the directory clients may load from (lora_dir)")
    for name, path in config.adapters.items():  # before the scheduler runs anything: here, directly
        if name in served.names.names:
            raise ValueError(f"LoRA adapter name {name!r} is also the base model's name")
        gemma.load_adapter(path, name, activate=False)
        served.add_adapter(name, path)
    auth, submit, check_model = served.auth, served.submit, served.check_model
    refused = lambda: meter.count("rejected")  # noqa: E731
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, on_refuse=refused)
    app.add_middleware(HostCheck, names=config.allowed_hosts, any_ip=config.allow_ip_hosts, on_refuse=refused)
    if config.cors_origins:  # outermost: refusals (413, a bad Host) carry the headers too, so a page can read them
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])  # "*": Authorization and the SDKs' own x-stainless-* headers

    # -- errors: always OpenAI's error object; each refusal counted once in /metrics ------------
    def refuse(status: int, body: dict, headers=None) -> JSONResponse:
        meter.count_status(status)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return refuse(e.status, e.body)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):  # FastAPI's 422 -> OpenAI's 400
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return refuse(400, error_body(f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json"))
        if first.get("type") == "unsound_body":  # schema._sound_text names the field in its message
            return refuse(400, error_body(first["msg"], param=first["ctx"]["where"], code="invalid_text"))
        if first.get("type") == "unsupported_field":  # schema.Strict
            return refuse(400, error_body(first["msg"], param=first["ctx"]["where"], code="unsupported_field"))
        where = ".".join(loc) or "body"
        return refuse(400, error_body(f"{where}: {first.get('msg', 'invalid')}", param=where))

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return refuse(e.status_code, error_body(str(e.detail), kind))

    @app.exception_handler(InputError)
    async def _input(_, e: InputError):
        code = "context_length_exceeded" if isinstance(e, ContextTooLong) else None
        return refuse(400, error_body(str(e), param=_param(str(e)), code=code))

    @app.exception_handler(NoChatTemplate)
    async def _no_template(_, e: NoChatTemplate):
        # the server's setup, not the request, is at fault; still a 4xx: retrying cannot help
        return refuse(400, error_body(f"the served model ({config.model_name}) has no chat template, so it cannot "
                                      "chat: start the server with --chat-template FILE (a Jinja chat template); "
                                      "/v1/completions continues plain text without one",
                                      "server_configuration_error", code="chat_template_missing"))

    @app.exception_handler(QueueFull)
    async def _full(_, e: QueueFull):
        return refuse(429, error_body(str(e), "rate_limit_error", code="queue_full"), {"Retry-After": "1"})

    @app.exception_handler(Closing)
    async def _closing(_, e: Closing):
        meter.count("cancelled")
        return JSONResponse(error_body(str(e), "server_error", code="server_shutting_down"), status_code=503)

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):
        # a bug: an error object with the type only (Starlette re-raises it, so uvicorn logs the
        # traceback); the message could carry paths or internals
        return refuse(500, error_body(f"internal error ({type(e).__name__}); the server log has the details",
                                      "server_error"))

    # -- routes -------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatRequest, request: Request):
        model = check_model(body.model)
        inputs, constraints = await served.plan(body)
        params = [convert.params(body, gemma.default_params, i, config.max_tokens_default) for i in range(body.n)]
        requests = submit(inputs, params, constraints, model)
        return await respond.chat(request, requests, body, model, gemma.tokenizer, meter)

    @app.get("/health")
    async def health():
        alive = scheduler.is_alive
        return JSONResponse({"status": "ok" if alive else "scheduler stopped"}, status_code=200 if alive else 503)

    for endpoint in (page, completions, names, tokens, metrics, transcribe, responses, adapters, worker_info):
        endpoint.register(app)
    return app


_FIELDS = (set(ChatRequest.model_fields) | set(CompletionRequest.model_fields)
           | set(tokens.TokenizeRequest.model_fields) | set(tokens.DetokenizeRequest.model_fields))


def _param(message: str) -> str | None:
    """The field an InputError's message starts with ('messages[0].content[1]: ...'), if any."""
    head = message.split(":", 1)[0].split(" ", 1)[0]
    return head if head.split("[", 1)[0].split(".", 1)[0] in _FIELDS else None
