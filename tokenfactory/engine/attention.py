"""Paged attention in plain PyTorch (CPU and CUDA alike).

The KV cache of one layer is two tensors `[num_blocks, block_size, num_kv_heads, head_dim]`;
a token's slot is `block_id * block_size + offset`. A step's flat batch holds the decode rows
(one query token each) first, then the prefill chunks (several tokens of one request, maybe after
a prefix already in the cache). Every index and mask tensor is built once per step by the runner
into `AttentionMetadata`, so each layer only writes, gathers and calls SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    """Several consecutive query tokens of one request, at rows [row_start, row_end)."""

    row_start: int
    row_end: int
    block_table: torch.Tensor | None
    """[num_context_blocks] long; None when the chunk is the whole context (no cached prefix),
    so attention runs causally on the fresh K/V without reading the cache."""
    mask: torch.Tensor | None
    """[num_queries, num_context_blocks * block_size] bool, True where a query may attend."""


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens go in the KV cache and what each one attends to."""

    slot_mapping: torch.Tensor
    """[num_tokens] long: the cache slot that receives each token's K/V."""
    num_decode_tokens: int
    """Rows [0, num_decode_tokens) are decodes: one query token per request."""
    decode_shared_blocks: torch.Tensor | None
    """[num_shared] long: leading blocks every decode row has in common (a shared prompt
    prefix), read once for the whole batch instead of once per row; None if there are none."""
    decode_block_tables: torch.Tensor | None
    """[num_decodes, max_blocks] long: each row's blocks after the shared ones, padded with
    block 0 (masked out)."""
    decode_mask: torch.Tensor | None
    """[num_decodes, 1, 1, max_blocks * block_size] additive float mask: 0 inside the
    request's context, -inf outside."""
    prefills: list[PrefillChunk] = field(default_factory=list)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store each token's K and V ([num_tokens, kv_heads, head_dim]) in its cache slot."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, kv, d] indexed by [..., n] -> [..., kv, n * block_size, d]."""
    blocks = cache.index_select(0, block_table.reshape(-1))  # [prod(...) * n, block_size, kv, d]
    kv_heads, head_dim = cache.shape[2], cache.shape[3]
    flat = blocks.view(*block_table.shape[:-1], -1, kv_heads, head_dim)  # [..., n * block_size, kv, d]
    return flat.transpose(-3, -2)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [num_tokens, heads, d], k/v [num_tokens, kv_heads, d] -> [num_tokens, heads * d].

    Writes k/v into the cache first, so every query sees its own token.
    """
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    out = torch.empty_like(q)
    n_dec = meta.num_decode_tokens
    if n_dec:
        out[:n_dec] = _decode(q[:n_dec], k_cache, v_cache, meta, kv_heads, scale)
    for chunk in meta.prefills:
        rows = slice(chunk.row_start, chunk.row_end)
        out[rows] = _prefill(q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale)
    return out.view(num_tokens, num_heads * head_dim)


def _decode(q, k_cache, v_cache, meta: AttentionMetadata, kv_heads: int, scale: float) -> torch.Tensor:
    """One query per request; the query heads sharing a KV head are folded into the query
    length so GQA needs neither a K/V copy per head nor a special kernel."""
    n, num_heads, d = q.shape
    group = num_heads // kv_heads
    qg = q.view(n, kv_heads, group, d)  # [n, kv, group, d]
    keys = _gather(k_cache, meta.decode_block_tables)  # [n, kv, ctx, d]
    values = _gather(v_cache, meta.decode_block_tables)
    if meta.decode_shared_blocks is not None:
        out = _decode_with_shared_prefix(qg, keys, values, k_cache, v_cache, meta, scale)
    else:
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=meta.decode_mask, scale=scale)
    return out.reshape(n, num_heads, d)


def _decode_with_shared_prefix(qg, keys, values, k_cache, v_cache, meta: AttentionMetadata, scale):
    """Attention over [shared prefix | own blocks]: the prefix is gathered once and multiplied
    by all rows' queries in one matmul, then one softmax spans both parts of each row."""
    n, kv_heads, group, d = qg.shape
    shared_k = _gather(k_cache, meta.decode_shared_blocks)  # [kv, prefix, d]
    shared_v = _gather(v_cache, meta.decode_shared_blocks)
    prefix = shared_k.shape[1]
    q_rows = qg.transpose(0, 1).reshape(kv_heads, n * group, d)  # [kv, n * group, d]
    prefix_scores = torch.matmul(q_rows, shared_k.transpose(-1, -2))  # [kv, n * group, prefix]
    prefix_scores = prefix_scores.view(kv_heads, n, group, prefix).transpose(0, 1)
    own_scores = torch.matmul(qg, keys.transpose(-1, -2)) + meta.decode_mask  # [n, kv, group, own]
    scores = torch.cat((prefix_scores, own_scores), dim=-1) * scale
    probs = scores.float().softmax(dim=-1).to(qg.dtype)  # [n, kv, group, prefix + own]
    prefix_probs = probs[..., :prefix].transpose(0, 1).reshape(kv_heads, n * group, prefix)
    prefix_out = torch.matmul(prefix_probs, shared_v)  # [kv, n * group, d]
    own_out = torch.matmul(probs[..., prefix:], values)  # [n, kv, group, d]
    return own_out + prefix_out.view(kv_heads, n, group, d).transpose(0, 1)


def _prefill(q, k, v, k_cache, v_cache, chunk: PrefillChunk, scale: float) -> torch.Tensor:
    """Queries of one request attend causally, offset by the tokens already in the cache."""
    num_heads = q.shape[1]
    qh = q.transpose(0, 1)  # [heads, n, d]
    if chunk.block_table is None:
        keys, values, mask = k.transpose(0, 1), v.transpose(0, 1), None  # [kv, n, d]
    else:
        keys = _gather(k_cache, chunk.block_table)  # [kv, ctx, d]
        values = _gather(v_cache, chunk.block_table)
        mask = chunk.mask
    out = F.scaled_dot_product_attention(
        qh,
        keys,
        values,
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=keys.shape[0] != num_heads,
    )
    return out.transpose(0, 1)  # [n, heads, d]
