"""`tokenfactory serve | keys create|list|revoke | usage | bench engine|serve|decode|routing|disagg|overhead|transport|fidelity|constrained|twin|power|energy | twin replay|profile | plan`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from tokenfactory.control.disagg import DisaggConfig
from tokenfactory.control.router import ROUTERS, make_router
from tokenfactory.control.tiers import TINY_PATH, ModelSpec
from tokenfactory.engine.config import DTYPES, CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.engine.tiny import ensure_tiny_model
from tokenfactory.control.admission import AdmissionConfig
from tokenfactory.gateway.app import build_app
from tokenfactory.meter import cli as meter_cli
from tokenfactory.meter.db import describe
from tokenfactory.runtime.client import AsyncEngineClient, Worker
from tokenfactory.runtime.pool import ServedModel, WorkerPool


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder in the Hugging Face layout (default: the built-in tiny model)")
    p.add_argument("--served-model-name", help="the name clients send as `model` (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require this bearer key on /v1 routes (repeat for several keys)")
    meter_cli.add_db_argument(p)
    p.add_argument("--no-db", action="store_true", help="keep no ledger and accept only --api-key keys")
    p.add_argument("--admin-key", help="enables /admin/keys for bearers of this key")
    p.add_argument("--max-queued", type=int, default=AdmissionConfig().max_queued,
                   help="shed a sheddable tier's request (503) when this many sequences of its priority or "
                        "higher wait for their first token")
    meter_cli.add_factory_config_argument(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--max-model-len", type=int, default=0, help="context window (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens)
    p.add_argument("--block-size", type=int, default=CacheConfig.block_size)
    p.add_argument("--num-blocks", type=int, help="KV cache blocks (default: sized from a memory budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="engine processes on this machine, one gateway in front")
    p.add_argument("--router", choices=list(ROUTERS), default="kv",
                   help="how the gateway picks a worker when --workers > 1 (default: kv, prefix-cache aware)")
    p.add_argument("--session-affinity", action=argparse.BooleanOptionalAction, default=True,
                   help="keep a session's requests (X-Session-Id header or metadata.session_id) on the worker "
                        "that served its last turn while that worker is not overloaded (default: on)")
    p.add_argument("--prefill-workers", type=int, default=0,
                   help="disaggregated serving: prefill-only engine processes (with --decode-workers; "
                        "replaces --workers)")
    p.add_argument("--decode-workers", type=int, default=0, help="disaggregated serving: decode engine processes")
    p.add_argument("--disagg-min-prompt-tokens", type=int, default=DisaggConfig().min_prompt_tokens,
                   help="shorter prompts are served whole on a decode worker")
    p.add_argument("--transport", choices=("local", "ray"), default="local",
                   help="local: engine processes on this machine; ray: each worker a Ray actor, KV moved through "
                        "the object store (joins the cluster RAY_ADDRESS names, else starts a local Ray)")


MODEL_FLAGS = ("model", "served_model_name", "device", "dtype", "max_model_len", "max_num_seqs",
               "max_num_batched_tokens", "block_size", "num_blocks", "seed", "workers", "router",
               "session_affinity", "prefill_workers", "decode_workers", "disagg_min_prompt_tokens", "transport")
"""`serve`'s flags that describe the one model it serves; a factory config's `models` replaces them."""


def flags_model_spec(args: argparse.Namespace) -> ModelSpec:
    """The factory of one model that `serve`'s flags describe."""
    pool = ({"prefill_workers": args.prefill_workers, "decode_workers": args.decode_workers}
            if args.prefill_workers or args.decode_workers else {"workers": args.workers})
    try:
        return ModelSpec(
            name=args.served_model_name,
            # An absolute path: a folder named like the built-in model is still a folder.
            path=str(Path(args.model).resolve()) if args.model else TINY_PATH,
            router=args.router, session_affinity=args.session_affinity, transport=args.transport,
            disagg_min_prompt_tokens=args.disagg_min_prompt_tokens, device=args.device, dtype=args.dtype,
            seed=args.seed, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
            num_blocks=args.num_blocks, **pool,
        )
    except ValidationError as e:
        raise SystemExit(f"tokenfactory: {validation_problems(e)}") from None


def validation_problems(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'serve'}: {err['msg']}" for err in e.errors())


def model_engine_config(spec: ModelSpec, base_dir: Path | None = None) -> EngineConfig:
    """The engine config of one served model; a relative checkpoint path is relative to `base_dir`."""
    model_dir = ensure_tiny_model() if spec.path == TINY_PATH else Path(spec.path).expanduser()
    if base_dir is not None and not model_dir.is_absolute():
        model_dir = base_dir / model_dir
    return EngineConfig.from_pretrained(
        model_dir,
        served_model_name=spec.served_name,
        device=spec.device,
        dtype=spec.dtype or ("float32" if spec.device == "cpu" else "bfloat16"),
        seed=spec.seed,
        max_model_len=spec.max_model_len,
        cache=CacheConfig(block_size=spec.block_size, num_blocks=spec.num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens),
    )


def model_worker(spec: ModelSpec, config: EngineConfig) -> Worker:
    """The model's own workers: one engine process (no routing, no hashing of prompts), or a pool
    behind its router, aggregated or split into prefill and decode workers."""
    router = make_router(spec.router, session_affinity=spec.session_affinity)
    make_worker = ray_worker_class() if spec.transport == "ray" else AsyncEngineClient
    if spec.prefill_workers:
        return WorkerPool.local_disaggregated(config, spec.prefill_workers, spec.decode_workers, router=router,
                                              restart_interval_s=1.0, make_worker=make_worker,
                                              disagg=DisaggConfig(min_prompt_tokens=spec.disagg_min_prompt_tokens))
    if spec.workers > 1:
        return WorkerPool.local(config, spec.workers, router=router, restart_interval_s=1.0, make_worker=make_worker)
    return make_worker(config)


def ray_worker_class() -> type[AsyncEngineClient]:
    """`RayEngineClient`, with Ray initialised. Imported here: Ray is an optional extra, and slow to import."""
    try:
        from tokenfactory.runtime.ray_worker import RayEngineClient, ensure_ray
    except ImportError as e:
        raise SystemExit(f"tokenfactory: the ray transport needs Ray ({e}): pip install 'tokenfactory[ray]'") from None
    ensure_ray()
    return RayEngineClient


def serve_config(args: argparse.Namespace) -> EngineConfig:
    """The engine config `serve`'s flags describe."""
    return model_engine_config(flags_model_spec(args))


def served_model_specs(args: argparse.Namespace, models: list[ModelSpec]) -> tuple[list[ModelSpec], Path | None]:
    """The models to serve and the folder their relative paths start from: the factory config's
    `models` (then no per-model flag may be given: it would be silently ignored), else the flags'."""
    if not models:
        return [flags_model_spec(args)], None
    defaults = argparse.ArgumentParser()
    add_serve_arguments(defaults)
    given = [f for f in MODEL_FLAGS if getattr(args, f) != getattr(defaults.parse_args([]), f)]
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise SystemExit(f"tokenfactory: {args.factory_config} lists the models to serve; {flags} would describe "
                         f"another: set it in the config's `models` instead")
    return models, args.factory_config.parent


def serve(args: argparse.Namespace) -> int:
    if args.max_queued < 1:
        raise SystemExit(f"--max-queued must be >= 1, got {args.max_queued}")
    tiers = meter_cli.load_factory_config(args.factory_config)
    specs, base_dir = served_model_specs(args, tiers.models)
    try:
        tiers.check_priced_models([spec.served_name for spec in specs])
        configs = [model_engine_config(spec, base_dir) for spec in specs]
    except ValueError as e:  # a checkpoint that is not there, a price for a model not served
        raise SystemExit(f"tokenfactory: {e}") from None
    models = [ServedModel(config, model_worker(spec, config)) for spec, config in zip(specs, configs, strict=True)]
    db = None if args.no_db else meter_cli.db_path(args)
    app = build_app(models, api_keys=args.api_key, tiers=tiers, db_path=db, admin_key=args.admin_key,
                    admission=AdmissionConfig(max_queued=args.max_queued))
    served = "; ".join(
        f"{c.name!r} from {c.model_path} on {c.device}"
        + (f" with {spec.num_workers} workers ({spec.router} router)" if spec.num_workers > 1 else "")
        for spec, c in zip(specs, configs, strict=True))
    print(f"tokenfactory: serving {served} at http://{args.host}:{args.port}/v1; tiers {', '.join(tiers.tiers)}; "
          f"ledger {describe(db) if db else 'off'}", flush=True)
    # uvicorn turns Ctrl-C/SIGTERM into a graceful exit, whose lifespan shutdown stops the engine.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0


LAZY_COMMANDS: tuple[tuple[tuple[str, ...], str, str, str, str], ...] = (
    # (command path, module, its add-arguments function, its entry point, help)
    (("agents",), "tokenfactory.agents.cli", "add_arguments", "main",
     "a swarm of tool-calling agents against an OpenAI-compatible endpoint"),
    (("bench", "engine"), "tokenfactory.bench.engine_bench", "add_arguments", "main",
     "our engine against transformers generate, same run"),
    (("bench", "serve"), "tokenfactory.bench.serve_bench", "add_arguments", "main",
     "N concurrent HTTP streams against the engine alone, same run"),
    (("bench", "decode"), "tokenfactory.bench.decode_bench", "add_arguments", "main",
     "decode tokens/s as a fraction of the memory-bandwidth bound"),
    (("bench", "routing"), "tokenfactory.bench.routing_bench", "add_arguments", "main",
     "routers on a trace in the twin, against a shared-cache bound"),
    (("bench", "disagg"), "tokenfactory.bench.disagg_bench", "add_arguments", "main",
     "aggregated vs every prefill:decode split in the twin, same GPUs"),
    (("bench", "overhead"), "tokenfactory.bench.overhead_bench", "add_arguments", "main",
     "what the gateway, the router and KV transfer add per request"),
    (("bench", "transport"), "tokenfactory.bench.transport_bench", "add_arguments", "main",
     "workers over ZMQ against workers as Ray actors: latency, tokens/s and KV hand-off, same run"),
    (("bench", "constrained"), "tokenfactory.bench.constrained_bench", "add_arguments", "main",
     "grammar-constrained against free decoding, same run"),
    (("bench", "agents"), "tokenfactory.bench.agents_bench", "add_arguments", "main",
     "an agent swarm on 4 live workers: kv + session affinity against round robin, prefix-cache hits"),
    (("bench", "twin"), "tokenfactory.bench.twin_bench", "add_arguments", "main",
     "the twin's speed (Mooncake trace, --day) and --calibration vs real GPUs"),
    (("bench", "fidelity"), "tokenfactory.bench.fidelity_bench", "add_arguments", "main",
     "the twin, calibrated by a profile, against the live engine"),
    (("bench", "power"), "tokenfactory.bench.power_bench", "add_arguments", "main",
     "tiers and the power governor under a grid cut in the twin"),
    (("bench", "energy"), "tokenfactory.bench.power_bench", "add_energy_arguments", "main_energy",
     "energy-aware clock levels vs always-maximum in the twin"),
    (("twin", "replay"), "tokenfactory.twin.cli", "add_replay_arguments", "replay_main",
     "replay a trace on simulated hardware with the real scheduler"),
    (("twin", "profile"), "tokenfactory.twin.profile", "add_arguments", "main",
     "measure this machine's engine step times and fit the twin's cost model"),
    (("plan",), "tokenfactory.twin.plan", "add_arguments", "main",
     "search factory configurations in the twin under SLOs and a budget"),
)
"""Commands whose modules load only when chosen: a benchmark pulls in torch, the engine and the
grammar library, which `serve`'s gateway process and `keys` never need (seconds at every start)."""

GROUP_HELP = {"bench": "benchmarks", "twin": "the digital twin"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command tree; of the lazy commands only the one `argv` names is imported."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tokenfactory", description="An open token factory.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve a model over an OpenAI-compatible API")
    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(func=serve)
    keys = commands.add_parser("keys", help="API keys of tenants").add_subparsers(dest="keys", required=True)
    meter_cli.add_keys_commands(keys)
    usage = commands.add_parser("usage", help="tokens, requests and cost from the ledger")
    meter_cli.add_usage_arguments(usage)
    usage.set_defaults(func=meter_cli.usage_main)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, add_arguments, entry, help_text in LAZY_COMMANDS:
        parent = commands
        if len(path) == 2:
            if path[0] not in groups:
                groups[path[0]] = commands.add_parser(path[0], help=GROUP_HELP[path[0]]).add_subparsers(
                    dest=path[0], required=True)
            parent = groups[path[0]]
        sub = parent.add_parser(path[-1], help=help_text)
        if tuple(argv[:len(path)]) == path:
            loaded = importlib.import_module(module)
            getattr(loaded, add_arguments)(sub)
            sub.set_defaults(func=getattr(loaded, entry))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
