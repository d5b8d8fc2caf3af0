"""`tokenfactory bench constrained`: what grammar-constrained decoding costs, measured in one run.

N concurrent requests constrained by a JSON schema, and N constrained to call a required tool,
each against N unconstrained requests with the same prompts and the same output lengths: a
constrained run goes first and its per-request output lengths become the unconstrained run's
fixed lengths (min_tokens = max_tokens, EOS ignored), so both sides compute exactly the same
tokens in the same batches and differ only by the grammar work. Each round runs the pair back to
back, in alternating order; of `--repeats` rounds the one with the median ratio counts. Besides
tokens/s and their ratio the benchmark reports the grammar's time per step: its work on the mask
thread, and the part the step spent waiting for and applying masks. The last line says PASS when
every constrained mode keeps `--target` of the unconstrained tokens/s.

With `--http` the same comparison runs through a live `tokenfactory serve`, as clients see it:
N concurrent chat completions with `response_format` json_schema, and N with a `tool_choice`
naming a function, each against N plain ones with the same messages (the tool mode's plain side
lists the same tool with `tool_choice` "none", so both prompts are the same tokens) and the
constrained side's output lengths (`min_tokens`, `ignore_eos`). Here the cost also holds the
gateway's part: compiling and shipping the grammar, and parsing the calls out of the text. A
warm-up pass puts every prompt in the prefix cache first, so both sides find them there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from tokenfactory.agents.tool_calls import HERMES_OPEN, ToolFormat, parse_tool_calls, tool_call_lark
from tokenfactory.bench.serve_bench import free_port, start_server, wait_healthy
from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.engine.engine import Completion, LLMEngine
from tokenfactory.engine.grammar import json_schema_grammar, lark_grammar
from tokenfactory.engine.request import SamplingParams
from tokenfactory.engine.tiny import ensure_tiny_model
from tokenfactory.engine.tokenizer import Tokenizer

# An agent-like reply: a random-weight model fills each string to its maximum length, so replies
# are long enough for decoding, not the prompt, to dominate.
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3},
    },
    "required": ["city", "days", "notes"],
    "additionalProperties": False,
}


@dataclass
class Run:
    mode: str
    seconds: float
    output_tokens: int
    steps: int
    mask_work_s: float
    mask_wait_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder with tokenizer.json (default: the built-in tiny model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16")
    p.add_argument("--num-requests", type=int, default=32, help="concurrent requests per run")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=160, help="output cap of the constrained requests")
    p.add_argument("--repeats", type=int, default=3, help="rounds of alternating runs; the median counts")
    p.add_argument("--target", type=float, default=0.9, help="PASS when constrained/unconstrained >= this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--http", action="store_true",
                   help="through a live `tokenfactory serve` (chat completions: response_format json_schema, a "
                        "tool_choice naming a function) instead of the engine in this process")


def grammars(tokenizer: Tokenizer) -> dict[str, str]:
    """The constrained modes: a JSON schema, and a required tool in the model's own call format."""
    tool_format = ToolFormat.for_template("".join(tokenizer.chat_templates.values()))
    tags_are_tokens = tokenizer.token_to_id(HERMES_OPEN) is not None
    return {
        "json_schema": json_schema_grammar(WEATHER_PARAMETERS),
        "tool": lark_grammar(tool_call_lark([("get_weather", WEATHER_PARAMETERS)], tool_format, False,
                                            tags_are_tokens)),
    }


def run(engine: LLMEngine, mode: str, prompts: list[list[int]], params: list[SamplingParams]
        ) -> tuple[Run, list[Completion]]:
    engine.core.kv.reset_prefix_cache()  # every run computes its prompts
    masks = engine.core.runner.sampler.grammars
    masks.work_s = masks.wait_s = 0.0
    first_step = len(engine.steps)
    t0 = time.perf_counter()
    done = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    lengths = [len(c.token_ids) for c in done]
    return Run(mode, seconds, sum(lengths), len(engine.steps) - first_step, masks.work_s,
               masks.wait_s), done


def check_replies(mode: str, done: list[Completion], tokenizer: Tokenizer) -> int:
    """Every constrained reply that ended by itself must be what its grammar promises (a run
    whose constraints did nothing would otherwise pass); -> how many ended by themselves."""
    complete = [c for c in done if c.finish_reason == "stop"]
    for c in complete:
        text = tokenizer.decode([t for t in c.token_ids if t not in tokenizer.eos_token_ids],
                                skip_special_tokens=False)
        if mode == "tool":
            _, calls = parse_tool_calls(text)
            reply = json.loads(calls[0].arguments) if len(calls) == 1 and calls[0].name == "get_weather" else None
        else:
            reply = json.loads(text)
        if not isinstance(reply, dict) or set(reply) != set(WEATHER_PARAMETERS["required"]):
            raise RuntimeError(f"a {mode} reply does not follow its grammar: {text!r}")
    return len(complete)


def main(args: argparse.Namespace) -> int:
    if args.http:
        return http_main(args)
    model_dir = args.model or str(ensure_tiny_model())
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    n = args.num_requests
    config = EngineConfig.from_pretrained(
        model_dir, device=args.device, dtype=dtype, seed=args.seed,
        scheduler=SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=max(2048, n * args.prompt_len)),
        cache=CacheConfig(memory_bytes=256 * 2**20 if args.device == "cpu" else 8 * 2**30),
    )
    tokenizer = Tokenizer.from_pretrained(model_dir)
    engine = LLMEngine(config, detokenize=False)
    rng = random.Random(args.seed)
    added = set(tokenizer.backend.get_added_tokens_decoder())
    ordinary = [t for t in range(tokenizer.vocab_size) if t not in added]
    prompts = [[rng.choice(ordinary) for _ in range(args.prompt_len)] for _ in range(n)]
    print(f"workload: {n} concurrent requests, prompts {args.prompt_len} tokens, constrained outputs up to "
          f"{args.max_tokens} tokens; model {config.name} on {args.device} {dtype}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)

    def sampled(i: int, **kw) -> SamplingParams:
        return SamplingParams(temperature=1.0, seed=args.seed + i, **kw)

    modes = grammars(tokenizer)
    engine.generate([prompts[0]], sampled(0, max_tokens=4, grammar=modes["tool"]))  # warm-up
    results: dict[str, dict] = {}
    for mode, grammar in modes.items():
        constrained = [sampled(i, max_tokens=args.max_tokens, grammar=grammar) for i in range(n)]
        pairs: list[tuple[Run, Run]] = []  # (constrained, unconstrained), run back to back
        lengths: list[int] | None = None
        for r in range(args.repeats):
            if r % 2:  # every other round the unconstrained side goes first: no order favours either
                free_run = run(engine, "unconstrained", prompts, free)[0]
            result, done = run(engine, mode, prompts, constrained)
            got = [len(c.token_ids) for c in done]
            if lengths is None:
                print(f"{mode:>12}: {check_replies(mode, done, tokenizer)}/{n} replies ended by themselves and "
                      f"parse; the others reached {args.max_tokens} tokens", flush=True)
            elif got != lengths:
                raise RuntimeError("seeded constrained requests changed their output lengths")
            lengths = got
            free = [sampled(i, max_tokens=k, min_tokens=k, ignore_eos=True) for i, k in enumerate(lengths)]
            if r % 2 == 0:
                free_run = run(engine, "unconstrained", prompts, free)[0]
            pairs.append((result, free_run))
        results[mode] = _report(mode, pairs, args.target)
    return _verdict(results, args)


def _verdict(results: dict[str, dict], args: argparse.Namespace) -> int:
    passed = all(r["ratio"] >= args.target for r in results.values())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    ratios = ", ".join(f"{mode} {r['ratio']:.2f}x" for mode, r in results.items())
    where = " over HTTP" if args.http else ""
    print(f"{'PASS' if passed else 'MISS'}: constrained / unconstrained output tokens/s{where}: {ratios} "
          f"(target >= {args.target:.2f}x)")
    return 0


def _report(mode: str, pairs: list[tuple[Run, Run]], target: float) -> dict:
    """The median pair by ratio: each pair ran back to back, under the same load."""
    c, f = sorted(pairs, key=lambda p: p[0].tokens_per_s / p[1].tokens_per_s)[len(pairs) // 2]
    constrained = [p[0] for p in pairs]
    ratio = c.tokens_per_s / f.tokens_per_s
    work_ms = statistics.fmean(1e3 * r.mask_work_s / r.steps for r in constrained)
    wait_ms = statistics.fmean(1e3 * r.mask_wait_s / r.steps for r in constrained)
    step_ms = statistics.fmean(1e3 * r.seconds / r.steps for r in constrained)
    print(f"{mode:>12}: {c.output_tokens} output tokens, {c.tokens_per_s:,.0f} tokens/s against "
          f"{f.tokens_per_s:,.0f} unconstrained = {ratio:.2f}x ({'PASS' if ratio >= target else 'MISS'}); "
          f"grammar work {work_ms:.2f} ms per {step_ms:.2f} ms step on the mask thread, and "
          f"{wait_ms:.2f} ms in the step (waiting for masks, applying them)", flush=True)
    return {"output_tokens": c.output_tokens, "tokens_per_s": c.tokens_per_s,
            "unconstrained_tokens_per_s": f.tokens_per_s, "ratio": ratio, "grammar_ms_per_step": work_ms,
            "grammar_wait_ms_per_step": wait_ms, "step_ms": step_ms, "runs": len(constrained)}


# --- through a live server ----------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city, with notes.",
    "parameters": WEATHER_PARAMETERS}}
PROMPT_WORDS = ("forecast", "rain", "wind", "harbour", "north", "coast", "week", "trip", "market", "bridge",
                "snow", "valley", "morning", "evening", "ferry", "festival")


def http_modes() -> dict[str, tuple[dict, dict]]:
    """Per constrained mode: its request fields, and the plain side's (the same prompt, no constraint)."""
    schema = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_PARAMETERS, "strict": True}}
    named = {"type": "function", "function": {"name": "get_weather"}}
    return {
        "json_schema": ({"response_format": schema}, {}),
        "tool": ({"tools": [WEATHER_TOOL], "tool_choice": named, "parallel_tool_calls": False},
                 {"tools": [WEATHER_TOOL], "tool_choice": "none"}),
    }


def chat_prompts(n: int, num_words: int, seed: int) -> list[str]:
    """N distinct user messages of about `num_words` words."""
    rng = random.Random(seed)
    return [f"Request {i}: " + " ".join(rng.choice(PROMPT_WORDS) for _ in range(num_words)) for i in range(n)]


@dataclass
class HttpRun:
    seconds: float
    output_tokens: list[int]
    steps: int
    """Engine steps the run took (from /health)."""

    @property
    def tokens_per_s(self) -> float:
        return sum(self.output_tokens) / self.seconds


async def http_run(client: httpx.AsyncClient, bodies: list[dict]) -> tuple[HttpRun, list[dict]]:
    """All `bodies` at once -> the run and the replies in order."""
    before = (await client.get("/health")).json()["engine"]["num_steps"]
    t0 = time.perf_counter()
    responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
    seconds = time.perf_counter() - t0
    after = (await client.get("/health")).json()["engine"]["num_steps"]
    for r in responses:
        if r.status_code != 200:
            raise RuntimeError(f"the server answered HTTP {r.status_code}: {r.text[:300]}")
    replies = [r.json() for r in responses]
    return HttpRun(seconds, [r["usage"]["completion_tokens"] for r in replies], after - before), replies


def check_http_replies(mode: str, replies: list[dict]) -> int:
    """Every constrained reply that ended by itself parses and has the schema's keys; -> how many did."""
    complete = 0
    for reply in replies:
        choice = reply["choices"][0]
        if choice["finish_reason"] == "length":
            continue
        complete += 1
        message = choice["message"]
        if mode == "tool":
            calls = message.get("tool_calls") or []
            ok = len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
            parsed = json.loads(calls[0]["function"]["arguments"]) if ok else None
        else:
            parsed = json.loads(message["content"])
        if not isinstance(parsed, dict) or set(parsed) != set(WEATHER_PARAMETERS["required"]):
            raise RuntimeError(f"a {mode} reply does not follow its grammar: {message!r}")
    return complete


def http_main(args: argparse.Namespace) -> int:
    model_dir = args.model or str(ensure_tiny_model())
    name = "constrained-bench"
    n = args.num_requests
    port = free_port()
    # The engine gets the CPU threads; the gateway's work is part of what is measured.
    server = start_server(model_dir, name, port, n, max(2048, n * args.prompt_len))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, timeout_s=300)
        prompts = chat_prompts(n, max(1, args.prompt_len // 2), args.seed)
        print(f"workload over HTTP: {n} concurrent chat completions, user messages of about {args.prompt_len} "
              f"tokens, constrained outputs up to {args.max_tokens} tokens; {Path(model_dir).name} behind "
              f"`tokenfactory serve` at {url}", flush=True)
        results = asyncio.run(_http_rounds(url, name, prompts, args))
    finally:
        server.terminate()
        server.wait(60)
    return _verdict(results, args)


async def _http_rounds(url: str, model: str, prompts: list[str], args: argparse.Namespace) -> dict[str, dict]:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    results: dict[str, dict] = {}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        def bodies(fields: dict, lengths: list[int] | None = None) -> list[dict]:
            out = []
            for i, prompt in enumerate(prompts):
                body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 1.0,
                        "seed": args.seed + i, "max_tokens": args.max_tokens, **fields}
                if lengths is not None:  # the constrained side's lengths, exactly
                    body.update(max_tokens=lengths[i], min_tokens=lengths[i], ignore_eos=True)
                out.append(body)
            return out

        for mode, (constrained_fields, plain_fields) in http_modes().items():
            # Warm-up: the grammar compiled, every prompt of both sides in the prefix cache.
            await http_run(client, [{**b, "max_tokens": 1} for b in bodies(plain_fields)])
            await http_run(client, bodies(constrained_fields)[:1])
            pairs: list[tuple[HttpRun, HttpRun]] = []
            lengths: list[int] | None = None
            for r in range(args.repeats):
                if r % 2 and lengths is not None:  # alternate the order, as in the engine bench
                    plain = (await http_run(client, bodies(plain_fields, lengths)))[0]
                constrained, replies = await http_run(client, bodies(constrained_fields))
                if lengths is None:
                    print(f"{mode:>12}: {check_http_replies(mode, replies)}/{len(replies)} replies ended by "
                          f"themselves and parse; the others reached {args.max_tokens} tokens", flush=True)
                elif constrained.output_tokens != lengths:
                    raise RuntimeError("seeded constrained requests changed their output lengths")
                lengths = constrained.output_tokens
                if r % 2 == 0:
                    plain = (await http_run(client, bodies(plain_fields, lengths)))[0]
                if plain.output_tokens != lengths:
                    raise RuntimeError("the plain side did not produce the constrained side's lengths")
                pairs.append((constrained, plain))
            results[mode] = _http_report(mode, pairs, args.target)
    return results


def _http_report(mode: str, pairs: list[tuple[HttpRun, HttpRun]], target: float) -> dict:
    """The median pair by ratio, as `_report`."""
    c, f = sorted(pairs, key=lambda p: p[0].tokens_per_s / p[1].tokens_per_s)[len(pairs) // 2]
    ratio = c.tokens_per_s / f.tokens_per_s
    print(f"{mode:>12}: {sum(c.output_tokens)} output tokens, {c.tokens_per_s:,.0f} tokens/s against "
          f"{f.tokens_per_s:,.0f} plain = {ratio:.2f}x ({'PASS' if ratio >= target else 'MISS'}); "
          f"{1e3 * c.seconds / max(c.steps, 1):.1f} ms per engine step against {1e3 * f.seconds / max(f.steps, 1):.1f}",
          flush=True)
    return {"output_tokens": sum(c.output_tokens), "tokens_per_s": c.tokens_per_s,
            "unconstrained_tokens_per_s": f.tokens_per_s, "ratio": ratio, "steps": c.steps,
            "unconstrained_steps": f.steps, "runs": len(pairs)}
