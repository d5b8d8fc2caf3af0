"""The HTTP app: OpenAI routes, health, auth and errors around one worker serving one model.

`build_app` wires it; the worker starts with the app (lifespan) and stops with it, so uvicorn's
own Ctrl-C/SIGTERM handling shuts the engine process down cleanly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenfactory import __version__
from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.tokenizer import Tokenizer
from tokenfactory.gateway.auth import APIKeyAuth
from tokenfactory.gateway.errors import install_error_handlers
from tokenfactory.gateway.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, now_s
from tokenfactory.gateway.serving import OpenAIServing
from tokenfactory.runtime.client import AsyncEngineClient, Worker
from tokenfactory.runtime.pool import WorkerPool
from tokenfactory.runtime.wire import EngineLoad


def build_app(
    config: EngineConfig,
    api_keys: Sequence[str] = (),
    worker: Worker | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving `config`'s model through `worker` (default: a local
    engine process). API keys, when given, are required on every /v1 route."""
    worker = worker if worker is not None else AsyncEngineClient(config)
    created = now_s()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tokenizer = Tokenizer.from_pretrained(config.model_path)
        await worker.start()
        app.state.serving = OpenAIServing(worker, tokenizer, config.name, worker.info.context_len)
        try:
            yield
        finally:
            await worker.shutdown()

    app = FastAPI(title="tokenfactory", version=__version__, lifespan=lifespan)
    app.state.worker = worker
    install_error_handlers(app)
    auth = [Depends(APIKeyAuth(api_keys))]

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await request.app.state.serving.chat(body, request.is_disconnected)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await request.app.state.serving.completions(body, request.is_disconnected)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.name, created=created, max_model_len=config.context_len)])

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness plus the engine's load (running, waiting, free KV blocks); for a pool, the
        load summed over live workers, then each worker's own and the router's counters."""
        body = {
            "status": "ok" if worker.is_alive else "unavailable",
            "model": config.name,
            "engine": load_json(worker.load),
        }
        if isinstance(worker, WorkerPool):
            body["workers"] = [
                {"worker_id": h.worker_id, "alive": h.alive, "dead_reason": h.dead_reason,
                 "num_routed": h.num_routed, "num_cached_blocks": h.num_cached_blocks, **load_json(h.load)}
                for h in worker.worker_health()
            ]
            metrics = worker.router.metrics
            body["router"] = {"policy": type(worker.router).__name__, "mode": metrics.mode,
                              "decisions": metrics.decisions,
                              "mean_predicted_overlap_tokens": round(metrics.mean_predicted_overlap_tokens, 3)}
        return JSONResponse(body, status_code=200 if worker.is_alive else 503)

    return app


def load_json(load: EngineLoad) -> dict[str, int | float]:
    return {
        "num_running": load.num_running,
        "num_waiting": load.num_waiting,
        "num_free_blocks": load.num_free_blocks,
        "num_total_blocks": load.num_total_blocks,
        "num_steps": load.num_steps,
        "step_seconds": round(load.step_seconds, 6),
    }
