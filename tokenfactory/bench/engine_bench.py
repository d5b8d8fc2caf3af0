"""`tokenfactory bench engine`: our engine against Hugging Face `transformers` generate, same run.

The workload is a shared-prefix chat burst: N requests share one system prompt, each adds its own
question, output lengths vary, and all arrive at once. Both sides run the same model and weights
with greedy decoding and the same output lengths (EOS ignored); the baseline is `transformers`
batched `generate` over the whole burst (static batching: the batch runs until its longest output).
The last line printed is the ratio of output tokens per second, ours over theirs.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tokenfactory.bench.shapes import SHAPES, write_shape
from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.engine.engine import LLMEngine
from tokenfactory.engine.request import SamplingParams
from tokenfactory.engine.tiny import ensure_tiny_model


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass
class RunResult:
    name: str
    seconds: float
    output_tokens: int
    extra: dict

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def shared_prefix_workload(
    vocab_size: int, num_requests: int, prefix_len: int, question: tuple[int, int],
    output: tuple[int, int], seed: int, special_ids: set[int],
) -> Workload:
    """Random token ids (no special tokens) for a system prompt, questions and output lengths."""
    rng = random.Random(seed)
    ordinary = [t for t in range(vocab_size) if t not in special_ids]
    prefix = [rng.choice(ordinary) for _ in range(prefix_len)]
    prompts, outs = [], []
    for _ in range(num_requests):
        q = [rng.choice(ordinary) for _ in range(rng.randint(*question))]
        prompts.append(prefix + q)
        outs.append(rng.randint(*output))
    return Workload(prompts, outs)


def run_engine(config: EngineConfig, work: Workload, threads: int) -> tuple[RunResult, list[list[int]], LLMEngine]:
    # Token ids in and out on both sides: neither detokenizes.
    engine = LLMEngine(config, detokenize=False)
    torch.set_num_threads(threads)  # the runner picks its own; both sides get the same here
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in work.output_lens]
    engine.generate([work.prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    engine.core.kv.reset_prefix_cache()
    engine.steps.clear()
    t0 = time.perf_counter()
    done = engine.generate(work.prompts, params)
    seconds = time.perf_counter() - t0
    out_tokens = sum(len(c.token_ids) for c in done)
    prompt_tokens = sum(len(p) for p in work.prompts)
    cached = sum(c.num_cached_tokens for c in done)
    batch_sizes = [s.num_requests for s in engine.steps]
    extra = {
        "steps": len(engine.steps),
        "mean_batch_size": round(statistics.fmean(batch_sizes), 2) if batch_sizes else 0.0,
        "prefix_hit_rate": round(cached / prompt_tokens, 4),
        "num_blocks": engine.core.runner.num_blocks,
    }
    return RunResult("tokenfactory", seconds, out_tokens, extra), [c.token_ids for c in done], engine


def load_reference(model_dir: str, dtype: torch.dtype, device: str, weights: dict | None):
    """The `transformers` model: from the checkpoint, or (dummy weights) from the config with
    our engine's weights copied in, so both sides run the very same numbers."""
    # transformers is a dev/bench dependency, not a runtime one: imported only here.
    from transformers import AutoConfig, AutoModelForCausalLM

    if weights is None:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    missing, _ = model.load_state_dict(weights, strict=False)
    if missing:
        raise RuntimeError(f"the reference model lacks weights for {missing[:3]}...")
    return model.eval()


def run_transformers(model, device: str, work: Workload, pad_id: int) -> tuple[RunResult, list[list[int]]]:
    longest = max(len(p) for p in work.prompts)
    # Left padding, so every row's last prompt token sits in the last column.
    ids = torch.full((len(work.prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(work.prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    with torch.inference_mode():
        model.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2, **gen)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max(work.output_lens),
                             min_new_tokens=max(work.output_lens), **gen)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    tokens = [out[i, longest:longest + n].tolist() for i, n in enumerate(work.output_lens)]
    return RunResult("transformers", seconds, work.num_output_tokens, {"batch": len(work.prompts)}), tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder (default: the built-in tiny model)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="a known model shape with dummy weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--question-len", type=int, nargs=2, default=(32, 128))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 256))
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baseline", action="store_true", help="measure only our engine")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads for both sides (default: all this process may use)")
    p.add_argument("--json", type=Path, help="also write the results to this file")


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(write_shape(args.shape, Path(tmp))) if args.shape else args.model or str(ensure_tiny_model())
        return _run(args, model_dir, "dummy" if args.shape else args.load_format)


def _run(args: argparse.Namespace, model_dir: str, load_format: str) -> int:
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    config = EngineConfig.from_pretrained(
        model_dir, device=args.device, dtype=dtype, load_format=load_format, seed=args.seed,
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=max(args.num_requests, 1)),
        cache=CacheConfig(memory_bytes=256 * 2**20 if args.device == "cpu" else 16 * 2**30),
    )
    tokenizer_specials = set(config.model.eos_token_ids)
    work = shared_prefix_workload(
        config.model.vocab_size, args.num_requests, args.prefix_len, tuple(args.question_len),
        tuple(args.output_len), args.seed, tokenizer_specials | _special_ids(model_dir),
    )
    print(f"workload: {args.num_requests} requests, shared prefix {args.prefix_len} tokens, "
          f"questions {args.question_len[0]}-{args.question_len[1]}, outputs "
          f"{args.output_len[0]}-{args.output_len[1]} ({work.num_output_tokens} output tokens); "
          f"model {config.name} on {args.device} {dtype}, {args.threads} CPU threads", flush=True)
    ours, our_tokens, engine = run_engine(config, work, args.threads)
    _report(ours)
    results = {"ours": asdict(ours) | {"tokens_per_s": ours.tokens_per_s}}
    if not args.skip_baseline:
        gc.collect()
        pad = min(_special_ids(model_dir) or {0})
        weights = engine.core.runner.model.state_dict() if load_format == "dummy" else None
        reference = load_reference(model_dir, config.torch_dtype, args.device, weights)
        del engine, weights
        base, base_tokens = run_transformers(reference, args.device, work, pad)
        _report(base)
        same = sum(a == b for a, b in zip(our_tokens, base_tokens))
        print(f"greedy outputs identical for {same}/{len(work.prompts)} requests")
        results["transformers"] = asdict(base) | {"tokens_per_s": base.tokens_per_s}
        results["ratio"] = ours.tokens_per_s / base.tokens_per_s
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.skip_baseline:
        print(f"ratio (tokenfactory / transformers output tokens/s): {results['ratio']:.2f}x")
    return 0


def _special_ids(model_dir: str) -> set[int]:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return set()
    added = json.loads(path.read_text()).get("added_tokens", [])
    return {t["id"] for t in added if t.get("special")}


def _report(r: RunResult) -> None:
    extra = ", ".join(f"{k} {v}" for k, v in r.extra.items())
    print(f"{r.name:>13}: {r.output_tokens} output tokens in {r.seconds:.2f} s = "
          f"{r.tokens_per_s:,.0f} tokens/s ({extra})", flush=True)
