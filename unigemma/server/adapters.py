"""LoRA adapters served per request, in vLLM's shapes.

    unigemma serve --model M --lora support=DIR --lora sql=DIR2          (repeatable)
    {"model": "support", ...}   a request runs under adapter "support"; the base name, the base

Adapters are applied unmerged per batch row (generate/scheduler.py), so requests for different
adapters and the base share one decode batch. `/v1/models` lists each adapter with `parent` (the
base's name) and `root`, as vLLM does (names.py). With `--enable-lora-loading` (off by default):

    POST /v1/load_lora_adapter    {"lora_name": "x", "lora_path": "x-adapter"}
    POST /v1/unload_lora_adapter  {"lora_name": "x"}

The path comes from a client, so it is hostile: only directories under the operator's
`--lora-dir` load (relative to it, or absolute inside it, after symlinks are resolved), files
are size-capped before they are read, and a bad file is a 400 naming the problem (never a 500,
never the server's own paths). Without the flag both routes answer 404 saying how to enable
them. Files are read on a worker thread; the modules change between two decode steps
(`Scheduler.call`), and an adapter in use by a request cannot be unloaded (409).
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ..errors import CheckpointError
from ..lora import apply_adapter, read_adapter, remove_adapter
from ..lora.peft import CONFIG_FILE, WEIGHTS_FILE
from .schema import ApiError, Strict

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
MAX_ADAPTER_BYTES = 2 << 30  # a rank-64 adapter on every projection of the 12B is ~0.5 GiB


class LoadRequest(Strict):
    lora_name: str = Field(max_length=128)
    lora_path: str = Field(max_length=4096)
    load_inplace: bool = False  # vLLM's: replace an adapter of that name


class UnloadRequest(Strict):
    lora_name: str = Field(max_length=128)
    lora_int_id: int | None = None  # vLLM's clients may send it; names identify adapters here


def parse_flag(text: str) -> tuple[str, str]:
    """--lora NAME=DIR → (name, dir), the name checked."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError(f"--lora takes NAME=DIR (the name requests select it by), got {text!r}")
    check_name(name)
    return name, path


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"adapter name {name!r}: 1-128 characters, letters, digits and ._:/@+- "
                         "(starting with a letter or digit)")
    return name


def resolve_path(root: Path, given: str) -> Path:
    """A client's lora_path → a directory under `root` (realpath: symlinks cannot leave it)."""
    if "\x00" in given or not given.strip():
        raise ApiError(400, "lora_path: empty or not a path", param="lora_path")
    p = Path(given)
    path = Path(os.path.realpath(p if p.is_absolute() else root / p))
    if path != root and root not in path.parents:
        raise ApiError(400, "lora_path: outside the adapter directory this server loads from (--lora-dir); "
                            "give a path relative to it", param="lora_path", code="lora_path_not_allowed")
    return path


def register(app: FastAPI) -> None:
    served = app.state.served
    config = served.config

    def refuse_unless_enabled():
        if not config.lora_loading:
            raise ApiError(404, "loading LoRA adapters at run time is off on this server (start it with "
                                "--enable-lora-loading --lora-dir DIR)", "not_found_error",
                           code="lora_loading_disabled")

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(served.auth)])
    async def load(body: LoadRequest):
        refuse_unless_enabled()
        try:
            name = check_name(body.lora_name)
        except ValueError as e:
            raise ApiError(400, str(e), param="lora_name") from None
        if name in served.names.names:
            raise ApiError(400, f"lora_name {name!r} is the base model's name", param="lora_name")
        if name in served.adapters and not body.load_inplace:
            raise ApiError(400, f"an adapter named {name!r} is already loaded (unload it first)",
                           param="lora_name", code="lora_already_loaded")
        if name not in served.adapters and len(served.adapters) >= config.max_loras:
            raise ApiError(400, f"{len(served.adapters)} adapters are loaded, this server's limit "
                                "(--max-loras); unload one first", param="lora_name", code="too_many_loras")
        root = Path(os.path.realpath(config.lora_dir))
        path = resolve_path(root, body.lora_path)
        shown = body.lora_path  # messages name the client's own path, never the server's root
        try:
            config_, tensors = await run_in_threadpool(_read, path, shown)
        except CheckpointError as e:
            raise ApiError(400, str(e), param="lora_path", code="invalid_lora_adapter") from None

        def put_in_place():
            if name in served.adapters:  # load_inplace
                if served.scheduler.adapter_in_use(name):
                    raise ApiError(409, f"adapter {name!r} is in use by running requests; retry when they are done",
                                   code="lora_in_use")
                remove_adapter(served.gemma.model, name)
            apply_adapter(served.gemma.model, config_, tensors, name, f"{shown}/{WEIGHTS_FILE}", activate=False)

        try:
            await asyncio.wrap_future(served.scheduler.call(put_in_place))
        except (CheckpointError, ValueError) as e:  # ValueError: a concurrent load of the same name
            raise ApiError(400, str(e), param="lora_path", code="invalid_lora_adapter") from None
        served.add_adapter(name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")  # vLLM's reply

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(served.auth)])
    async def unload(body: UnloadRequest):
        refuse_unless_enabled()
        name = body.lora_name
        if name not in served.adapters:
            raise ApiError(404, f"no LoRA adapter named {name!r} is loaded", "not_found_error",
                           param="lora_name", code="lora_not_found")

        def take_out():
            if served.scheduler.adapter_in_use(name):
                raise ApiError(409, f"adapter {name!r} is in use by running requests; retry when they are done",
                               code="lora_in_use")
            remove_adapter(served.gemma.model, name)

        await asyncio.wrap_future(served.scheduler.call(take_out))
        served.remove_adapter(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _read(path: Path, shown: str):
    """The adapter's files, size-capped and checked (errors name the client's path)."""
    if not path.is_dir():
        raise CheckpointError(f"{shown}: not an adapter directory")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if (path / f).is_file() and (path / f).stat().st_size > MAX_ADAPTER_BYTES:
            raise CheckpointError(f"{shown}/{f}: larger than this server loads ({MAX_ADAPTER_BYTES >> 20} MiB)")
    try:
        return read_adapter(path)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace(str(path), shown)) from None
