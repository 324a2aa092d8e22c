"""Model names: which names a request's `model` may use, which name a reply reports, and the
routes that list them (GET /v1/models, GET /v1/models/{id}).

The server serves one model under one or more names (`--served-name`, repeatable; the first is
the one /v1/models lists first). Lenient (the default, as llama-server's single-model mode): any
name is answered by the one model, so a client's default (LangChain's `gpt-3.5-turbo`) or the
checkpoint's file name works; the reply then reports the first name. Strict
(`--strict-model-name`, as vLLM and OpenAI): a name that is not served is a 404. Names that
select something (`exact`: LoRA adapters, server/adapters.py) always match exactly,
and while there are any, unknown names are refused: a guess would answer with the wrong weights.
`GET /v1/models/{id}` always matches exactly: it describes a model, it does not answer with one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI


class ModelNames:
    def __init__(self, names: list[str] | tuple[str, ...], strict: bool = False, exact: tuple[str, ...] = ()):
        self.names = list(dict.fromkeys(n for n in names if n))  # in order, without repeats
        if not self.names:
            raise ValueError("a server needs at least one model name")
        self.strict, self.exact = strict, tuple(exact)

    @property
    def primary(self) -> str:
        return self.names[0]

    def resolve(self, requested: str | None) -> str | None:
        """The name a reply to `requested` reports, or None when no served model answers to it."""
        if not requested:
            return self.primary
        if requested in self.names or requested in self.exact:
            return requested
        return None if self.strict or self.exact else self.primary


def default_names(model: str | None) -> list[str]:
    """The names a checkpoint is served under when no --served-name is given: a hub model by its
    id (what clients are configured with; with its tag when it has one), then the id without the
    tag and the bare name as aliases; a GGUF file by its stem (`gemma-3-270m-q4_k_m`), with the
    file name as an alias; a directory by its name; the shipped `mini` as unigemma-mini."""
    from ..mini import NAME
    from ..weights.hub import parse

    if not model:
        return ["unigemma-demo"]
    if model == NAME and not Path(model).exists():
        return ["unigemma-mini", NAME]
    ref = parse(model)
    if ref is not None:
        return list(dict.fromkeys([ref.repo_id + (f":{ref.tag}" if ref.tag else ""), ref.repo_id,
                                   ref.repo_id.split("/")[-1]]))
    path = Path(model)
    if path.suffix.lower() == ".gguf":
        return [path.stem, path.name]
    return [path.resolve().name or model]


def register(app: FastAPI) -> None:
    served = app.state.served

    def card(name: str) -> dict:
        # vLLM's fields: a LoRA adapter (server/adapters.py) names the base it runs on as `parent`
        adapter = served.adapters.get(name)
        return {"id": name, "object": "model", "created": served.meter.started, "owned_by": "unigemma",
                "root": adapter if adapter is not None else served.names.primary,
                "parent": served.names.primary if adapter is not None else None,
                "max_model_len": served.scheduler.max_len}

    @app.get("/v1/models", dependencies=[Depends(served.auth)])
    async def models():
        return {"object": "list", "data": [card(n) for n in [*served.names.names, *served.adapters]]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(served.auth)])
    async def model(model_id: str):
        if model_id not in served.names.names and model_id not in served.adapters:
            served.unknown_model(model_id)
        return card(model_id)
