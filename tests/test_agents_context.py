"""Held contexts and their digest chain (in-process, a tiny seeded model): equal computations
agree, equal tokens computed otherwise do not, a shipped range rebuilds the same chain at the
receiver, and a receiver checks a delta's base before anything changes. The prefix answer decoder
is bounded and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.streamio import FrameError, pack
from meshnode.agents.context import Context
from meshnode.agents.prefix import MAX_BLOCKS, parse_answer
from meshnode.runtime import kv
from tests.helpers.runtime_models import tiny

IDS = list(range(10, 60))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny("llama", tmp_path_factory.mktemp("ctx-cache"))


def _ctx(lm, chunks: list[list[int]], block: int = 4) -> Context:
    c = Context.empty(lm, block)
    for ids in chunks:
        c.feed(lm, ids)
    return c


def test_the_same_computation_gives_the_same_chain(lm):
    a, b = _ctx(lm, [IDS[:20], IDS[20:]]), _ctx(lm, [IDS[:20], IDS[20:]])
    assert a.digests == b.digests and len(a.digests) == len(IDS) // 4
    assert a.common_tokens(b.digests) == len(IDS) // 4 * 4


def test_the_chain_follows_the_bits_not_only_the_tokens(lm):
    one, two = _ctx(lm, [IDS]), _ctx(lm, [IDS[:20], IDS[20:]])
    assert one.block_tc == two.block_tc  # the same tokens
    same_bits = all(a.keys.equal(b.keys) and a.values.equal(b.values)
                    for a, b in zip(one.state.cache.layers, two.state.cache.layers, strict=True))
    assert (one.digests == two.digests) == same_bits  # (other chunking changes them here)
    spoiled = _ctx(lm, [IDS])
    spoiled.poison()
    spoiled.hash_blocks(lm)
    assert spoiled.block_tc == one.block_tc and spoiled.digests[0] != one.digests[0]


def test_a_shipped_suffix_rebuilds_the_senders_chain_at_the_receiver(lm):
    sender = _ctx(lm, [IDS[:20], IDS[20:]])
    receiver = _ctx(lm, [IDS[:20]])  # holds the first chunk, bit for bit as the sender
    start = receiver.common_tokens(sender.digests)
    assert start == 20
    tensors, meta = kv.capture(lm, sender.state, tokens=(start, sender.length))
    meta.update(sender.proof_meta(start))
    assert receiver.base_matches(start, meta["base_digest"]) is None
    receiver.crop(start)
    kv.apply_delta(lm, receiver.state, tensors, meta)
    receiver.adopt(lm, meta)
    assert receiver.digests == sender.digests and receiver.tc == sender.tc
    a, b = kv.continue_greedy(lm, receiver.fork(lm), 5), kv.continue_greedy(lm, sender.fork(lm), 5)
    assert a[0] == b[0] and a[1].equal(b[1])


def test_a_delta_on_another_base_is_refused_before_anything_changes(lm):
    sender = _ctx(lm, [IDS[:20], IDS[20:]])
    receiver = _ctx(lm, [IDS[:20]])
    receiver.poison()
    receiver.hash_blocks(lm)
    before = list(receiver.digests)
    why = receiver.base_matches(20, sender.digests[4].hex())
    assert why is not None and "differ" in why
    assert receiver.digests == before and receiver.length == 20
    assert receiver.common_tokens(sender.digests) == 0  # so the sender sends the full state
    assert receiver.base_matches(21, sender.digests[4].hex())  # not a block boundary
    assert receiver.base_matches(64, sender.digests[4].hex())  # beyond what it holds


def test_prefix_answers_are_checked():
    ok = parse_answer(pack({"block": 4, "length": 8, "chain": [b"a" * 32, b"b" * 32]}), 4)
    assert ok == (4, 8, [b"a" * 32, b"b" * 32])
    for bad in ({"block": 8, "length": 8, "chain": []}, {"block": 4, "length": "8", "chain": []},
                {"block": 4, "length": 8, "chain": [b"short"]}, [1, 2]):
        with pytest.raises(FrameError):
            parse_answer(pack(bad), 4)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_prefix_answer_decoder_rejects_garbage_with_its_own_error(data):
    try:
        _, length, chain = parse_answer(data, 4)
    except FrameError:
        return
    assert isinstance(length, int) and len(chain) <= MAX_BLOCKS
