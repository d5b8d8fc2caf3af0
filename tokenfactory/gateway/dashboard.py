"""The operator's dashboard: GET /dashboard, a page that polls GET /dashboard/data every second.

The page is plain HTML, CSS and JavaScript shipped in `gateway/static/` (no CDN, no build step:
factories run offline); its charts are inline SVG. The data is the live governor's and the tiers'
traffic as of now: tokens per second by tier, TTFT p50, fleet power against the budget, joules
and dollars per million tokens over the last minute, each worker's token budget, and the grid
events near now. Open like /metrics: put both behind the operator's network, not the public one.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tokenfactory.gateway.admission import WINDOW_S, Admission, Ended, EventView, event_json, median
from tokenfactory.meter.metrics import JOULES_PER_KWH

STATIC = files("tokenfactory.gateway") / "static"
HISTORY_POINTS = 300
"""The charts show the last five minutes of one-second rounds."""


def per_token(ended: list[Ended], electricity_usd_per_kwh: float) -> dict[str, float | None]:
    """Joules per computed token, and revenue and energy cost per million billed tokens."""
    tokens = sum(e.tokens for e in ended)
    metered = [e for e in ended if e.energy_j is not None]
    computed = sum(e.computed_tokens for e in metered)
    joules = sum(e.energy_j for e in metered)
    billed_metered = sum(e.tokens for e in metered)
    return {
        "joules_per_token": joules / computed if computed else None,
        "usd_per_mtok": sum(e.cost_usd for e in ended) / tokens * 1e6 if tokens else None,
        "energy_usd_per_mtok": (joules / JOULES_PER_KWH * electricity_usd_per_kwh / billed_metered * 1e6
                                if billed_metered else None),
    }


def dashboard_data(admission: Admission, model: str, electricity_usd_per_kwh: float) -> dict:
    governor, traffic = admission.governor, admission.traffic
    now = governor.clock()
    decision = governor.decision
    ttfts, ended = traffic.recent()
    history = list(governor.history)[-HISTORY_POINTS:]
    last_rates = history[-1].tokens_per_s if history else {}
    tiers = []
    for name, spec in sorted(admission.tiers.tiers.items(), key=lambda item: -item[1].priority):
        counts = traffic.counts[name]
        tiers.append({
            "name": name, "priority": spec.priority, "sheddable": spec.sheddable,
            "admitted": decision is None or name not in decision.shed_tiers,
            "queued": counts.queued, "running": counts.running,
            "shed": sum(1 for e in ended if e.tier == name and e.outcome == "shed"),
            "tokens_per_s": last_rates.get(name, 0.0),
            "ttft_p50_s": median([s for tier, s in ttfts if tier == name]),
            **per_token([e for e in ended if e.tier == name], electricity_usd_per_kwh),
        })
    return {
        "model": model,
        "now": now,
        "window_s": WINDOW_S,
        "power": {
            "watts": governor.power_w, "source": governor.power_source,
            "budget_w": decision.budget_w if decision is not None else None,
            "static_cap_w": governor.cap_w,
        },
        "totals": {
            "tokens_per_s": sum(last_rates.values()),
            "ttft_p50_s": median([s for _, s in ttfts]),
            "requests": len(ended),
            "shed": sum(1 for e in ended if e.outcome == "shed"),
            **per_token(ended, electricity_usd_per_kwh),
        },
        "tiers": tiers,
        # Workers named as /metrics names them: the model and the worker's number within its pool.
        "workers": [{"worker_id": w.worker_id, "model": governor.fleet[w.worker_id].model,
                     "worker": governor.fleet[w.worker_id].index, "power_share_w": w.power_w,
                     "token_budget": governor.applied_budget(w), "pace_w": w.pace_w}
                    for w in (decision.workers if decision is not None else ())],
        "events": [event_json(v, now) for v in governor.events() if _recent(v, now)],
        "history": {
            "t": [s.at for s in history],
            "budget_w": [s.budget_w for s in history],
            "power_w": [s.power_w for s in history],
            "tokens_per_s": {name: [s.tokens_per_s.get(name, 0.0) for s in history] for name in admission.tiers.tiers},
        },
    }


def _recent(view: EventView, now: float) -> bool:
    """Events that ended within the day or start within it."""
    e = view.event
    return e.start_s - 86400 <= now <= e.end_s + e.ramp_s + 86400


def add_dashboard_routes(app: FastAPI, admission: Admission, model: str, electricity_usd_per_kwh: float) -> None:
    page = (STATIC / "dashboard.html").read_text()
    script = (STATIC / "dashboard.js").read_text()
    style = (STATIC / "dashboard.css").read_text()

    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/dashboard/dashboard.js")
    async def dashboard_script() -> Response:
        return Response(script, media_type="text/javascript")

    @app.get("/dashboard/dashboard.css")
    async def dashboard_style() -> Response:
        return Response(style, media_type="text/css")

    @app.get("/dashboard/data")
    async def data() -> JSONResponse:
        return JSONResponse(dashboard_data(admission, model, electricity_usd_per_kwh))
