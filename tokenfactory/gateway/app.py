"""The HTTP app: OpenAI routes, health, auth, tiers, the ledger and errors around the served models.

A factory serves one model or several, each from its own worker or pool (`runtime.pool.ServedModel`);
a request goes to the pool of the model it names, an unknown model gets the OpenAI 404. The tiers,
the ledger, the metrics and the power governor span every model.

`build_app` wires it; the worker and the ledger writer start with the app (lifespan) and stop with
it, so uvicorn's own Ctrl-C/SIGTERM handling shuts the engine process down cleanly and commits
every queued ledger entry. With a database (`db_path`), keys come from it and usage goes to it;
`/admin/keys` manages keys when an admin key is set. The power governor runs as a task of the app
(`gateway/admission.py`: load and power shedding, `/admin/grid-events`); `/dashboard` shows it live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import Field
from starlette.types import Receive, Scope, Send

from tokenfactory import __version__
from tokenfactory.control.tiers import FactoryConfig, builtin_config
from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.tokenizer import Tokenizer
from tokenfactory.gateway.admission import Admission, AdmissionConfig, add_grid_event_routes
from tokenfactory.gateway.auth import AdminAuth, APIKeyAuth
from tokenfactory.gateway.dashboard import add_dashboard_routes
from tokenfactory.gateway.errors import (
    APIError,
    ClientDisconnected,
    bad_request,
    handled_error_response,
    install_error_handlers,
    model_not_found,
    read_body,
)
from tokenfactory.gateway.metering import Metering
from tokenfactory.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    RequestModel,
    SamplingFields,
    now_s,
)
from tokenfactory.gateway.serving import OpenAIServing
from tokenfactory.meter.keys import KeyRecord, KeyStore
from tokenfactory.meter.ledger import Ledger
from tokenfactory.meter.metrics import FactoryMetrics, WorkerSample
from tokenfactory.runtime.client import AsyncEngineClient, Worker, cancel_and_wait
from tokenfactory.runtime.pool import ModelPools, ServedModel, WorkerPool
from tokenfactory.runtime.wire import EngineLoad


logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


class Gateway(FastAPI):
    """FastAPI, with the two generation routes served straight from the ASGI call.

    FastAPI's per-request stack (its telemetry check, the body-limit, exception and exit-stack
    middlewares, the router's matching and the route's request wrapper) sits on every request's
    path to its first token; the generation routes need none of it: their handlers read and
    validate their own bodies, and their errors are the same few (`handled_error_response`).
    Every other path, these paths with any other method, and every request once a middleware
    has been added to the app, go through FastAPI as usual."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.generation_routes: dict[str, Handler] = {}

    def add_generation_route(self, path: str, handler: Handler) -> None:
        """Serve POST `path` directly; it is also added as an ordinary route (for its 405 on other
        methods; `document_generation_routes` documents it)."""
        self.generation_routes[path] = handler
        self.add_route(path, handler, methods=["POST"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.generation_routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST" or self.user_middleware:
            await super().__call__(scope, receive, send)
            return
        if self.root_path:
            scope["root_path"] = self.root_path
        scope["app"] = self
        try:
            response = await handler(Request(scope, receive, send))
        except (APIError, ClientDisconnected) as e:
            response = handled_error_response(e)
        except Exception:  # a bug, not the caller's: still an OpenAI error, and logged
            logger.exception("unexpected error serving %s", scope["path"])
            response = APIError(500, "Internal server error.", type="server_error").response()
        await response(scope, receive, send)


class CreateKeyRequest(RequestModel):
    tenant: str = Field(min_length=1)
    tiers: list[str] | None = Field(default=None, description="tiers the key may ask for (default: all)")
    default_tier: str | None = Field(default=None, description="the tier of `auto` (default: the factory's)")
    name: str = ""


def build_app(
    models: EngineConfig | Sequence[ServedModel],
    api_keys: Sequence[str] = (),
    worker: Worker | None = None,
    tiers: FactoryConfig | None = None,
    db_path: str | Path | None = None,
    admin_key: str | None = None,
    clock: Callable[[], float] | None = None,
    admission: AdmissionConfig | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving `models`: one engine config, served through `worker`
    (default: a local engine process), or several `ServedModel`s, each request going to its
    model's pool. It sells `tiers` (default: the built-in flex / default / priority). Plain
    `api_keys` and the keys in the database at `db_path` are accepted; with any of them, a key is
    required on every /v1 route. With `db_path`, every request's usage goes to its ledger.
    `admission` tunes load shedding; the power governor runs with the app, over every model's
    workers."""
    if isinstance(models, EngineConfig):
        models = [ServedModel(models, worker if worker is not None else AsyncEngineClient(models))]
    elif worker is not None:
        raise ValueError("pass `worker` with one engine config; served models bring their own")
    pools = ModelPools(models)
    configs = [m.config for m in pools.models.values()]
    tiers = tiers if tiers is not None else builtin_config()
    store = KeyStore(db_path) if db_path is not None else None
    metering = Metering(tiers, clock=clock or time.time, metrics=FactoryMetrics(), energy=pools.energy)
    # One governor for the whole fleet: every model's engines, each on its own model's device and
    # step budget (the device and budget passed here serve only a plain worker).
    metering.admission = Admission(tiers, pools, configs[0].device,
                                   max(c.scheduler.max_num_batched_tokens for c in configs),
                                   admission, clock=clock or time.time, registry=metering.metrics.registry)
    created = now_s()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tokenizers = {m.name: Tokenizer.from_pretrained(m.config.model_path) for m in pools.models.values()}
        if db_path is not None:
            metering.attach_ledger(Ledger(db_path))
        await pools.start()
        app.state.serving = {name: OpenAIServing(m.worker, tokenizers[name], name, m.worker.info.context_len)
                             for name, m in pools.models.items()}
        governor = asyncio.create_task(metering.admission.run(), name="power-governor")
        try:
            yield
        finally:
            await cancel_and_wait(governor)
            await pools.shutdown()
            if metering.ledger is not None:
                metering.ledger.close()  # commits whatever is still queued

    app = Gateway(title="tokenfactory", version=__version__, lifespan=lifespan)
    app.state.pools = pools
    app.state.metering = metering
    install_error_handlers(app)
    auth = APIKeyAuth(tiers, api_keys, store)

    def serving_for(request: Request, model: str) -> OpenAIServing:
        """The handlers of the model a request names; resolved before metering, so a request for
        a model the factory does not serve counts against no limit and leaves no ledger row."""
        serving = request.app.state.serving.get(model)
        if serving is None:
            raise model_not_found(model)
        return serving

    # The two generation routes skip FastAPI (`Gateway`): its dependency solving (a JSON parse
    # and then a validation of the parsed dict) and its middleware stack are on each request's
    # way to its first token; here the caller is identified first (a bad key is a 401 whatever
    # the body) and the raw body is validated by pydantic in one pass.
    def generation(body_model: type[SamplingFields], method: str) -> Handler:
        async def route(request: Request) -> Response:
            caller = await auth(request)
            body = await read_body(request, body_model)
            session = session_id(request, body)
            serving = serving_for(request, body.model)
            account = metering.open(caller, body.service_tier, body.model)
            return await getattr(serving, method)(body, account, request.is_disconnected, session)

        return route

    for path, body_model, method, _ in GENERATION_ROUTES:
        app.add_generation_route(path, generation(body_model, method))
    document_generation_routes(app)

    add_admin_routes(app, AdminAuth(admin_key), store, tiers)
    add_grid_event_routes(app, AdminAuth(admin_key), metering.admission)
    add_dashboard_routes(app, metering.admission, ", ".join(pools.models), metering.metrics.electricity_usd_per_kwh)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=c.name, created=created, max_model_len=c.context_len) for c in configs])

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness plus load (running, waiting, free KV blocks) summed over live engines, and each
        model's own: for a pool, each worker's load and the router's counters. A factory of one
        model also shows that model's fields at the top. 200 while every model serves, 200
        `degraded` while some do, 503 when none does."""
        served = [model_health(m) for m in pools.models.values()]
        alive = sum(m.worker.is_alive for m in pools.models.values())
        status = "ok" if alive == len(served) else "degraded" if alive else "unavailable"
        live_loads = (s["engine"] for s in served if s["status"] == "ok")
        body = {"status": status, "engine": sum_json(live_loads), "models": served}
        if len(served) == 1:
            body.update(served[0])
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text: requests, tokens, latency, revenue and energy by model and tier; per
        model's worker queue depths, KV usage and power."""
        return Response(metering.metrics.render(worker_samples(pools)), media_type=CONTENT_TYPE_LATEST)

    return app


GENERATION_ROUTES = (("/v1/chat/completions", ChatCompletionRequest, "chat", "Create a chat completion"),
                     ("/v1/completions", CompletionRequest, "completions", "Create a completion"))
"""Path, request body, `OpenAIServing` method, summary."""


def document_generation_routes(app: FastAPI) -> None:
    """Put the two plain Starlette generation routes back into `/openapi.json` (FastAPI documents only
    its own routes): their request bodies are the same pydantic models `read_body` validates with."""
    make_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = make_schema()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model, _, summary in GENERATION_ROUTES:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            schema["paths"][path] = {"post": {
                "summary": summary,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
                "responses": {"200": {"description": "The completion, or with `stream` an SSE stream of chunks"},
                              "400": {"description": "Invalid request (OpenAI error format)"},
                              "401": {"description": "Missing or unknown API key"},
                              "404": {"description": "Unknown model"},
                              "429": {"description": "Over a rate limit or quota"},
                              "503": {"description": "Shed by load or power"}}}}
        return schema

    app.openapi = openapi


def model_health(model: ServedModel) -> dict:
    """One model's part of /health."""
    worker = model.worker
    body = {"model": model.name, "status": "ok" if worker.is_alive else "unavailable",
            "engine": load_json(worker.load)}
    if isinstance(worker, WorkerPool):
        body["workers"] = [
            {"worker_id": h.worker_id, "alive": h.alive, "dead_reason": h.dead_reason,
             "num_routed": h.num_routed, "num_cached_blocks": h.num_cached_blocks, **load_json(h.load)}
            for h in worker.worker_health()
        ]
        metrics = worker.router.metrics
        body["router"] = {"policy": type(worker.router).__name__, "mode": metrics.mode,
                          "decisions": metrics.decisions,
                          "mean_predicted_overlap_tokens": round(metrics.mean_predicted_overlap_tokens, 3),
                          "forgone_overlap_tokens": metrics.forgone_overlap_tokens,
                          "affinity_hits": metrics.affinity_hits}
    return body


def sum_json(loads: Iterable[dict[str, int | float]]) -> dict[str, int | float]:
    """`load_json` bodies added field by field."""
    total: dict[str, int | float] = {}
    for load in loads:
        for key, value in load.items():
            total[key] = total.get(key, 0) + value
    return total


SESSION_HEADER = "X-Session-Id"
MAX_SESSION_ID_CHARS = 256


def session_id(request: Request, body: SamplingFields) -> str | None:
    """The session a request belongs to: the X-Session-Id header, else the body's
    `metadata.session_id` (for SDKs that cannot set headers per request). `user` is not one: an
    end user may run many independent sessions at once."""
    session = request.headers.get(SESSION_HEADER) or body.session_id
    if session is not None and len(session) > MAX_SESSION_ID_CHARS:
        raise bad_request(f"A session id may be at most {MAX_SESSION_ID_CHARS} characters, got {len(session)}.",
                          param="metadata.session_id")
    return session


def worker_samples(pools: ModelPools) -> list[WorkerSample]:
    """Each engine's last load, labelled by its model and its worker id within the model's pool."""
    return [WorkerSample(name, str(worker_id), engine.load)
            for name, model in pools.models.items() for worker_id, engine in enumerate(model.engines)]


def add_admin_routes(app: FastAPI, admin: AdminAuth, store: KeyStore | None, tiers: FactoryConfig) -> None:
    """`/admin/keys`: create (the plaintext key is in this one response only), list, revoke."""
    guard = [Depends(admin)]

    def keys() -> KeyStore:
        if store is None:
            raise APIError(404, "No key database: start the server with --db.", code="admin_disabled")
        return store

    @app.post("/admin/keys", dependencies=guard)
    def create_key(body: CreateKeyRequest) -> JSONResponse:
        allowed = body.tiers if body.tiers is not None else sorted(tiers.tiers)
        default = body.default_tier or (tiers.default_tier if tiers.default_tier in allowed else allowed[0])
        unknown = sorted(set(allowed) - set(tiers.tiers))
        if unknown or not allowed:
            raise bad_request(f"Unknown tiers {unknown}; the factory sells {sorted(tiers.tiers)}.", param="tiers")
        try:
            record, plaintext = keys().create(body.tenant, allowed, default, body.name)
        except ValueError as e:
            raise bad_request(str(e), param="default_tier") from None
        return JSONResponse({**key_json(record), "key": plaintext})

    @app.get("/admin/keys", dependencies=guard)
    def list_keys(tenant: str | None = None) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [key_json(r) for r in keys().list(tenant)]})

    @app.delete("/admin/keys/{key_id}", dependencies=guard)
    def revoke_key(key_id: str) -> JSONResponse:
        if not keys().revoke(key_id):
            raise APIError(404, f"No live key `{key_id}`.", param="key_id", code="key_not_found")
        return JSONResponse({"id": key_id, "object": "api_key", "revoked": True})


def key_json(record: KeyRecord) -> dict:
    return {"id": record.key_id, "object": "api_key", "tenant": record.tenant, "name": record.name,
            "default_tier": record.default_tier, "allowed_tiers": list(record.allowed_tiers),
            "created_at": record.created_at, "revoked_at": record.revoked_at}


def load_json(load: EngineLoad) -> dict[str, int | float]:
    return {
        "num_running": load.num_running,
        "num_waiting": load.num_waiting,
        "num_free_blocks": load.num_free_blocks,
        "num_total_blocks": load.num_total_blocks,
        "num_steps": load.num_steps,
        "step_seconds": round(load.step_seconds, 6),
    }
