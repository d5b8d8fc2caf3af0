"""The only part of the engine that touches tensors: a step's chunks in, sampled tokens out.

Each step the runner lays the scheduled chunks out as one flat batch (decode rows first, then
prefill chunks), builds the attention metadata once for all layers, runs the model, and samples
the rows whose chunk reaches the end of its request's known tokens.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass

import torch

from tokenfactory.engine.attention import AttentionMetadata, PrefillChunk
from tokenfactory.engine.config import ConfigError, EngineConfig, ModelConfig
from tokenfactory.engine.grammar import GrammarMasks, build_ll_tokenizer
from tokenfactory.engine.model import ARCHITECTURES, CausalLM, KVCache
from tokenfactory.engine.outputs import (
    ModelRunnerOutput,
    ScheduledChunk,
    SchedulerOutput,
    prefill_gather_blocks,
    shared_decode_blocks,
)
from tokenfactory.engine.request import Request
from tokenfactory.engine.sampler import Sampler
from tokenfactory.engine.tokenizer import Tokenizer
from tokenfactory.engine.weights import load_checkpoint, load_dummy


@dataclass(slots=True)
class StepBatch:
    """One step's flat batch, ready for the model."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling_rows]: each sampling chunk's last row
    sampling_requests: list[Request]


def build_model(config: EngineConfig) -> CausalLM:
    """Construct the model on the target device and dtype and fill its weights."""
    device = torch.device(config.device)
    model_cls = ARCHITECTURES[config.model.architecture]
    # Build on the meta device so no memory is spent on an initialisation we overwrite.
    with torch.device("meta"):
        model = model_cls(config.model, config.context_len, device)
    model.to_empty(device=device)
    model.to(config.torch_dtype)
    model.tie_weights()
    if config.load_format == "dummy":
        load_dummy(model, config.seed)
    else:
        load_checkpoint(model, config.model_path)
    return model.eval()


def kv_bytes_per_block(config: EngineConfig) -> int:
    """K and V of one block across all layers, in the engine dtype."""
    m = config.model
    per_token = 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim
    return per_token * config.cache.block_size * config.torch_dtype.itemsize


SMALL_HIDDEN_SIZE = 512
"""Below this width a matmul is too small for intra-op threads to pay for their handoff."""


def _choose_cpu_threads(model: ModelConfig) -> None:
    if "OMP_NUM_THREADS" in os.environ:
        return  # the user chose; torch already follows it
    # torch counts the host's cores, but a container or taskset may allow fewer, and
    # oversubscribed threads make every small op wait on the others (100x on a busy machine).
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = 1 if model.hidden_size <= SMALL_HIDDEN_SIZE else min(torch.get_num_threads(), allowed or 1)
    torch.set_num_threads(threads)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's `mallopt` parameters (malloc.h)."""


def _keep_freed_memory() -> None:
    """Ask glibc to keep the memory one step frees for the next. By default it hands large freed
    blocks back to the kernel (unmapping them, trimming the heap), and the next large step faults
    every page back in: on a busy 2-core machine a 256-token prefill after a stretch of decodes
    took up to twice its usual time, most of it in the kernel (4,000 page faults a step). A
    no-op where malloc is not glibc's."""
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(M_TRIM_THRESHOLD, 1 << 30)  # free memory at the heap's top stays mapped
        mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: below it, blocks come from the heap


class ModelRunner:
    """Owns the model, its paged KV cache and the sampler of one worker."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.block_size = config.cache.block_size
        if self.device.type == "cpu":
            _choose_cpu_threads(config.model)
            _keep_freed_memory()
        self.model = build_model(config)
        block_bytes = kv_bytes_per_block(config)
        self.num_blocks = config.cache.num_blocks or config.cache.memory_bytes // block_bytes
        if self.num_blocks < 1:
            raise ConfigError(
                f"cache.memory_bytes ({config.cache.memory_bytes}) is smaller than one KV block "
                f"({block_bytes} bytes)"
            )
        self.kv_cache = self._allocate_kv_cache()
        # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches: KVCache = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(len(self.kv_cache))]
        grammars = GrammarMasks(
            lambda: build_ll_tokenizer(Tokenizer.from_pretrained(config.model_path), config.model.vocab_size),
            config.model.vocab_size,
        )
        self.sampler = Sampler(self.device, config.seed, grammars)

    def _allocate_kv_cache(self) -> torch.Tensor:
        m = self.config.model
        # Zeros, not empty: padded block-table entries are read (then masked), and garbage NaNs
        # would leak through the masked softmax.
        return torch.zeros(
            (m.num_hidden_layers, 2, self.num_blocks, self.block_size, m.num_key_value_heads,
             m.head_dim),
            dtype=self.config.torch_dtype,
            device=self.device,
        )

    def kv_block_shape(self, num_blocks: int) -> list[int]:
        """The shape of `num_blocks` blocks' K and V as `read_blocks` lays them out: block-major,
        so any run of whole blocks is one contiguous byte range (a transport can skip a prefix)."""
        num_layers, _, _, block_size, num_kv_heads, head_dim = self.kv_cache.shape
        return [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]

    @torch.inference_mode()
    def read_blocks(self, block_ids: list[int]) -> bytes:
        """Copy these blocks' K and V, all layers, to host bytes laid out as `kv_block_shape`."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        blocks = self.kv_cache.index_select(2, index)  # [layers, 2, n, block_size, kv_heads, head_dim]
        blocks = blocks.permute(2, 0, 1, 3, 4, 5)  # [n, layers, 2, block_size, kv_heads, head_dim]
        return blocks.cpu().contiguous().view(torch.uint8).numpy().tobytes()

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], data: bytes) -> None:
        """Fill these blocks with K and V from `read_blocks` bytes of another worker."""
        shape = self.kv_block_shape(len(block_ids))
        expected = math.prod(shape) * self.kv_cache.dtype.itemsize
        if len(data) != expected:
            raise ValueError(f"KV data has {len(data)} bytes; {len(block_ids)} blocks need {expected}")
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        blocks = raw.view(self.kv_cache.dtype).view(shape).to(self.device)  # [n, layers, 2, ...]
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv_cache.index_copy_(2, index, blocks.permute(1, 2, 0, 3, 4, 5))

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Compute every scheduled chunk's tokens; sample for the chunks that end their request."""
        self.sampler.forget(sched.finished_ids)
        output = ModelRunnerOutput()
        if sched.is_empty:
            return output
        logits, sampling_requests = self.compute_logits(sched.chunks)
        if not sampling_requests:
            return output
        tokens, logprobs = self.sampler.sample(logits, sampling_requests)
        for req, token, lp in zip(sampling_requests, tokens, logprobs, strict=True):
            output.sampled_token_ids[req.request_id] = token
            if lp is not None:
                output.logprobs[req.request_id] = lp
        return output

    @torch.inference_mode()
    def compute_logits(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, list[Request]]:
        """Run the model on the chunks (writing their KV) -> float32 logits [num_sampling, vocab]
        for the requests whose chunk samples, in the returned order."""
        batch = self._prepare(chunks)
        logits = self.model(
            batch.input_ids, batch.positions, self.kv_caches, batch.meta, batch.logits_indices
        )
        return logits, batch.sampling_requests

    def _prepare(self, chunks: list[ScheduledChunk]) -> StepBatch:
        """Lay the chunks out as one flat batch and build all index and mask tensors once."""
        decodes = [c for c in chunks if c.num_tokens == 1]
        prefills = [c for c in chunks if c.num_tokens > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampling: list[Request] = []
        bs = self.block_size
        for chunk in decodes + prefills:
            start, end, block_ids = chunk.start, chunk.end, chunk.block_ids
            input_ids.extend(chunk.request.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(block_ids[p // bs] * bs + p % bs for p in range(start, end))
            if chunk.samples:
                logits_rows.append(len(input_ids) - 1)
                sampling.append(chunk.request)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decode_tokens=len(decodes),
            decode_shared_blocks=None,
            decode_block_tables=None,
            decode_mask=None,
            prefills=self._prefill_chunks(prefills, first_row=len(decodes)),
        )
        if decodes:
            tables = self._decode_tables(decodes)
            meta.decode_shared_blocks, meta.decode_block_tables, meta.decode_mask = tables
        return StepBatch(
            input_ids=self._tensor(input_ids),
            positions=self._tensor(positions),
            meta=meta,
            logits_indices=self._tensor(logits_rows),
            sampling_requests=sampling,
        )

    def _decode_tables(
        self, decodes: list[ScheduledChunk]
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """-> the blocks all rows share (or None), each row's remaining blocks padded
        [num_decodes, max_blocks], and their additive context mask
        [num_decodes, 1, 1, max_blocks * block_size]."""
        bs = self.block_size
        num_shared = shared_decode_blocks(decodes, bs)
        shared = self._tensor(decodes[0].block_ids[:num_shared]) if num_shared else None
        own_blocks = [math.ceil(c.end / bs) - num_shared for c in decodes]
        width = max(own_blocks)
        tables = [
            c.block_ids[num_shared : num_shared + n] + [0] * (width - n)
            for c, n in zip(decodes, own_blocks)
        ]
        own_lens = self._tensor([c.end - num_shared * bs for c in decodes])
        keys = torch.arange(width * bs, device=self.device)
        outside = (keys >= own_lens.unsqueeze(1)).view(len(decodes), 1, 1, -1)
        mask = torch.zeros(outside.shape, dtype=self.config.torch_dtype, device=self.device)
        return shared, self._tensor(tables), mask.masked_fill_(outside, float("-inf"))

    def _prefill_chunks(self, prefills: list[ScheduledChunk], first_row: int) -> list[PrefillChunk]:
        """Per chunk: its rows, and (after a cached prefix) its blocks and offset causal mask."""
        result = []
        row = first_row
        for chunk in prefills:
            n = chunk.num_tokens
            num_blocks = prefill_gather_blocks(chunk, self.block_size)
            if not num_blocks:
                result.append(PrefillChunk(row, row + n, None, None))
            else:
                keys = torch.arange(num_blocks * self.block_size, device=self.device)
                query_pos = torch.arange(chunk.start, chunk.end, device=self.device)
                mask = keys.unsqueeze(0) <= query_pos.unsqueeze(1)  # [n, num_blocks * block_size]
                table = self._tensor(chunk.block_ids[:num_blocks])
                result.append(PrefillChunk(row, row + n, table, mask))
            row += n
        return result

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
