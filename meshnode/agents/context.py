"""A held context: a KV state plus the proof of what it holds, a chain of block digests.

Why a chain over token ids *and* KV bytes (DESIGN.md §12): equal tokens computed with different
chunking can differ in their bits, so "I hold these tokens" is no proof that a delta computed on
the sender's bits may be appended to ours. Per block of ``block`` tokens::

    tc_t   = BLAKE3(tc_{t-1} || id_t)                      (token chain, per token; tc_0 = zeros)
    kvh_b  = BLAKE3(K and V bytes of block b, every full-attention layer, in layer order)
    d_b    = BLAKE3(d_{b-1} || tc_{end of block b} || kvh_b)   (d_{-1} = zeros)

Two holders agree on the first j blocks iff their ``d_{j-1}`` are equal. A receiver that got a
state by KV never saw its token ids: the sender ships the token chain at each block end (and at
the end) beside the KV, and the receiver hashes the KV bytes it got itself — so the chain it
builds proves its own bits. Sliding-window layers forget old keys and are not hashed (a model
with no full-attention layer gets no chain: every handoff sends the full state).

Everything here runs in the model's thread (``in_model_thread``): it touches the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import blake3
import torch

from meshnode.runtime import kv
from meshnode.runtime.buffers import tensor_bytes
from meshnode.runtime.loader import LoadedModel

ZERO = bytes(32)


def _h(*parts: bytes) -> bytes:
    h = blake3.blake3()
    for p in parts:
        h.update(p)
    return h.digest()


@dataclass
class Context:
    """One context an agent holds: ``state`` covers positions [0, state.length)."""

    state: kv.State
    block: int
    digests: list[bytes] = field(default_factory=list)  # d_b per complete block
    block_tc: list[bytes] = field(default_factory=list)  # token chain at each block end
    tc: bytes = ZERO  # token chain at state.length

    @classmethod
    def empty(cls, lm: LoadedModel, block: int) -> Context:
        return cls(kv.State(kv.new_cache(lm), 0, None), block)

    @property
    def length(self) -> int:
        return self.state.length

    # -- growing it ---------------------------------------------------------------------------------
    def feed(self, lm: LoadedModel, ids: list[int]) -> None:
        """Prefill ``ids`` as one chunk on top of the state (the next token becomes pending)."""
        logits = kv.forward_tokens(lm, self.state, ids)
        self.state.next_token = int(torch.argmax(logits))
        self.state.first_logits = logits
        self._advance(lm, ids)

    def decode(self, lm: LoadedModel, n: int) -> tuple[list[int], torch.Tensor]:
        """Greedy ``n`` tokens (the first is the pending one); the chain follows what was fed."""
        tokens, logits = kv.continue_greedy(lm, self.state, n)
        self._advance(lm, tokens[:-1])  # the last one stays pending, not in the cache
        return tokens, logits

    def _advance(self, lm: LoadedModel, ids: list[int]) -> None:
        pos = self.state.length - len(ids)
        tc = self.tc
        for tok in ids:
            tc = _h(tc, int(tok).to_bytes(4, "little", signed=True))
            pos += 1
            if pos % self.block == 0:
                self.block_tc.append(tc)
        self.tc = tc
        self.hash_blocks(lm)

    def hash_blocks(self, lm: LoadedModel) -> None:
        """Digest every complete block whose token chain is known and not yet digested."""
        layers = [layer for layer in self.state.cache.layers if not layer.is_sliding]
        if not layers:
            return
        while len(self.digests) < len(self.block_tc):
            b = len(self.digests)
            a, z = b * self.block, (b + 1) * self.block
            h = blake3.blake3()
            for layer in layers:
                for part in (layer.keys, layer.values):
                    h.update(tensor_bytes(part[:, :, a:z].contiguous()))
            prev = self.digests[-1] if self.digests else ZERO
            self.digests.append(_h(prev, self.block_tc[b], h.digest()))

    # -- shipping and taking it ------------------------------------------------------------------
    def common_tokens(self, theirs: list[bytes]) -> int:
        """Tokens at the start that a holder with chain ``theirs`` holds bit for bit as we do."""
        j = 0
        for mine, other in zip(self.digests, theirs, strict=False):
            if mine != other:
                break
            j += 1
        return j * self.block

    def proof_meta(self, start: int) -> dict:
        """What a message shipping [start, length) carries besides the KV: where it starts (and
        the digest there), and the token chain at each block end after it and at the end."""
        first = start // self.block
        return {"block": self.block, "base_tokens": start,
                "base_digest": self.digests[first - 1].hex() if first else "",
                "block_tc": [t.hex() for t in self.block_tc[first:]], "tc_end": self.tc.hex()}

    def base_matches(self, start: int, digest_hex: str) -> str | None:
        """Why a delta that assumes our first ``start`` tokens cannot land here (``None``: it can)."""
        if start == 0:
            return None
        if start % self.block or start > self.length:
            return f"delta starts at {start}; this context holds {self.length} tokens"
        if len(self.digests) < start // self.block or \
                self.digests[start // self.block - 1].hex() != digest_hex:
            return f"this context's first {start} tokens differ from the sender's (block digests)"
        if start < self.length and not self.state.cache.is_croppable:
            return f"cannot cut this context back to {start} tokens (sliding-window layers)"
        return None

    def crop(self, start: int) -> None:
        """Keep only [0, start) (a block boundary): the sender ships the rest."""
        if start < self.length:
            self.state.cache.crop(start - self.length)  # (transformers 5: tokens to drop, negative)
            self.state.length = start
            self.state.next_token, self.state.first_logits = None, None
        keep = start // self.block
        self.digests, self.block_tc = self.digests[:keep], self.block_tc[:keep]
        self.tc = self.block_tc[-1] if keep else ZERO

    def adopt(self, lm: LoadedModel, meta: dict) -> None:
        """After a shipped range was applied: take the sender's token chain, hash our own bytes."""
        self.block_tc += [bytes.fromhex(t) for t in meta.get("block_tc", [])]
        self.tc = bytes.fromhex(meta["tc_end"]) if meta.get("tc_end") else self.tc
        self.hash_blocks(lm)

    def poison(self) -> None:
        """Flip the lowest bit of one cached key (for tests and demos of a mismatched prefix:
        same tokens, different bits); the chain is recomputed from the changed bytes."""
        for layer in self.state.cache.layers:
            if not layer.is_sliding and layer.keys is not None and layer.keys.numel():
                k = layer.keys.clone()
                flat = k.view(-1).view(torch.int32) if k.dtype == torch.float32 else k.view(-1).view(torch.int16)
                flat[0] ^= 1
                layer.keys = k
                break
        self.digests = []

    def fork(self, lm: LoadedModel) -> kv.State:
        """A decoding state that starts here and leaves this context as it is."""
        tensors, meta = kv.capture(lm, self.state)
        return kv.inject(lm, tensors, meta)
