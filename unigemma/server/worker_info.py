"""What a router in front of several replicas asks each one: GET /server_info, /model_info, /get_load.

SGLang Model Gateway (`sglang-router`; README "Scaling out") reads /server_info and /model_info
when it registers a worker, to learn the model's name (else it files the worker under
"unknown"), and polls /get_load for its power-of-two policy (load = KV tokens in use). Health is
the app's own GET /health. The names and fields are SGLang's; only those the router reads are
filled. No `model_path`: from one the router would try to load a tokenizer (a hub download) it
does not need to route. Behind the API key like /metrics.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI


def register(app: FastAPI) -> None:
    served = app.state.served

    @app.get("/server_info", dependencies=[Depends(served.auth)])
    async def server_info():
        s = served.scheduler.stats()
        return {"served_model_name": served.names.primary, "max_running_requests": s["max_seqs"],
                "max_total_tokens": s["kv_tokens_total"], "dp_size": 1}

    @app.get("/model_info", dependencies=[Depends(served.auth)])
    async def model_info():
        return {"is_generation": True, "model_type": served.gemma.config.model_type}

    @app.get("/get_load", dependencies=[Depends(served.auth)])
    async def get_load():
        # one entry per data-parallel rank; a replica is one
        s = served.scheduler.stats()
        return [{"dp_rank": 0, "num_reqs": s["running"] + s["prefilling"], "num_waiting_reqs": s["waiting"],
                 "num_tokens": s["kv_tokens_used"]}]
