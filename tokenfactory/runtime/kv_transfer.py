"""How a prefilled request's KV (`outputs.KVTransfer`) travels from a prefill engine to a decode one.

A `KVTransport` splits the move in two so that only a small handle has to go through the control
path (prefill engine -> pool -> decode engine, in `wire.OutputBatch.kv_ready` and `wire.ImportKV`):

- `send(transfer) -> handle`, on the prefill side: make the KV reachable and say where;
- `receive(handle) -> transfer`, on the decode side: fetch it.

`InlineTransport` (today, local engine processes) makes the handle the encoded transfer itself, so
the KV rides the existing ZMQ sockets through the pool's process: no extra setup, two copies.
Other transports fit the same two calls:

- shared memory: `send` writes the bytes into a named segment, the handle is its name and size;
  `receive` maps it and unlinks it (one copy, nothing through the pool);
- RDMA / NIXL: `send` registers the prefill engine's KV blocks (or a staging buffer) and returns the
  agent's serialized metadata plus the block addresses; `receive` issues an RDMA read into blocks
  the decode engine allocated (the decode side then hands its destination to the transport
  instead of taking bytes back, the one change this interface would grow);
- a Ray object store (`ray_worker.RayObjectTransport`): `send` is `ray.put` and the handle the object's
  id, while the reference itself travels beside the messages (a pickled reference would pin the
  object for good), so Ray frees it once imported; `receive` takes what the actor fetched with `ray.get`.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from tokenfactory.engine.outputs import KVTransfer


class KVTransport(Protocol):
    """Moves `KVTransfer`s between engines, addressed by opaque handles."""

    def send(self, transfer: KVTransfer) -> bytes:
        """Make `transfer` available to one `receive`; the handle to pass to the receiver."""

    def receive(self, handle: bytes) -> KVTransfer:
        """The transfer a `send` made available under `handle`; ValueError if it is unusable."""


class InlineTransport:
    """The handle is the transfer, msgpack-encoded: it travels wherever the handle does."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(KVTransfer)

    def send(self, transfer: KVTransfer) -> bytes:
        return self._encoder.encode(transfer)

    def receive(self, handle: bytes) -> KVTransfer:
        try:
            return self._decoder.decode(handle)
        except msgspec.DecodeError as e:
            raise ValueError(f"not a KV transfer handle: {e}") from None
