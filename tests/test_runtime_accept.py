"""What the runtime accepts from a peer (``runtime/accept.py``, ``runtime/dtypes.py``).

A hostile-but-compatible peer must never crash a receiver: every legal wire dtype other than the
model's, every malformed ``next_token`` and any other meta value is refused with ``KVMismatch``
by ``check_header`` (header only, before the payload moves) *and* by the apply functions, and
nothing is applied. A correct message still passes and continues bitwise like the sender.

Messages travel through :func:`_over_wire`: one contiguous buffer, tensors viewed over it with
``tensors_from_buffer`` and a header of (name, dtype, shape, byte_length) — the transport's shape.
In-process, tiny seeded models only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.runtime import accept, hidden, kv, prefix, residual
from meshnode.runtime.accept import KVMismatch, Spec, check_header
from meshnode.runtime.buffers import TensorSlice, tensor_bytes, tensors_from_buffer
from meshnode.runtime.dtypes import COMPUTE_DTYPES, LOGITS_DTYPE, TORCH_DTYPES
from meshnode.runtime.loader import AcceptTerms, LoadedModel
from tensor_rpc.envelope import DTYPES as WIRE_DTYPES
from tensor_rpc.envelope import (
    ApplyMode,
    Envelope,
    EnvelopeBounds,
    Kind,
    TensorSpec,
    decode_envelope,
    encode_envelope,
)
from tests.helpers.runtime_models import TINY_PROMPT, TINY_TURN2, tiny

N = 16
BAD_NEXT_TOKENS = ["7", float("nan"), 3.0, True, -1, "VOCAB", 2**70]  # "VOCAB": the vocab size


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("accept-cache")


_tiny = tiny


@pytest.fixture(scope="module")
def llama(cache_dir: Path) -> LoadedModel:
    return _tiny("llama", cache_dir)


@pytest.fixture(scope="module")
def gemma(cache_dir: Path) -> LoadedModel:
    return _tiny("gemma3", cache_dir)


@pytest.fixture(scope="module")
def models(cache_dir: Path) -> dict[str, LoadedModel]:
    """Receivers by dtype: foreign-dtype refusals are checked against an fp32 and a bf16 model."""
    return {"float32": _tiny("llama", cache_dir), "bfloat16": _tiny("llama", cache_dir, "bfloat16")}


def _over_wire(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[Spec]]:
    """Pack like the transport (one buffer), receive like it (zero-copy views + header specs)."""
    buf, slices = bytearray(), []
    for name, t in tensors.items():
        raw = tensor_bytes(t.contiguous())
        slices.append(TensorSlice(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), len(buf),
                                  raw.nbytes))
        buf += raw
    specs = [(s.name, s.dtype, s.shape, s.nbytes) for s in slices]
    return tensors_from_buffer(buf, slices), specs


def _vocab(lm: LoadedModel) -> int:
    return lm.model.config.get_text_config().vocab_size


def _refused(lm: LoadedModel, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
             match: str, state: kv.State | None = None) -> None:
    """Refused both at header time and by the applier, with the same named reason."""
    rx, specs = _over_wire(tensors)
    kind = kv.KIND_FULL if state is None else kv.KIND_DELTA
    cache_length = None if state is None else state.length
    with pytest.raises(KVMismatch, match=match):
        check_header(lm, kind, specs, meta, cache_length=cache_length)
    with pytest.raises(KVMismatch, match=match):
        if state is None:
            kv.inject(lm, rx, meta)
        else:
            kv.apply_delta(lm, state, rx, meta)


# -- the one dtype table ---------------------------------------------------------------------------
def test_dtype_table_is_the_wire_table() -> None:
    assert list(TORCH_DTYPES) == list(WIRE_DTYPES)
    for name, size in WIRE_DTYPES.items():
        assert torch.empty(0, dtype=TORCH_DTYPES[name]).element_size() == size
    assert set(COMPUTE_DTYPES) == {"float32", "bfloat16", "float16"}
    assert all(TORCH_DTYPES[n] is dt for n, dt in COMPUTE_DTYPES.items())


@pytest.mark.parametrize("name", list(WIRE_DTYPES))
def test_every_wire_dtype_crosses_the_buffer(name: str) -> None:
    t = (torch.arange(24, dtype=torch.float64) - 7).reshape(2, 3, 4).to(TORCH_DTYPES[name])
    rx, specs = _over_wire({"x": t})
    assert rx["x"].dtype == t.dtype and torch.equal(rx["x"], t)
    assert specs == [("x", name, (2, 3, 4), 24 * WIRE_DTYPES[name])]


def test_unsupported_buffer_dtype_is_a_clear_error() -> None:
    buf = bytearray(16)
    with pytest.raises(KVMismatch, match="complex64"):
        tensors_from_buffer(buf, [TensorSlice("x", "complex64", (2,), 0, 16)])
    with pytest.raises(KVMismatch, match="x"):
        tensors_from_buffer(buf, [TensorSlice("x", "float32", (-1, 4), 0, 16)])


def test_accept_terms_cover_what_capture_produces(models: dict[str, LoadedModel]) -> None:
    """The handshake terms list every dtype our own capture functions put on the wire."""
    for dt, lm in models.items():
        terms = lm.accepts
        assert terms == AcceptTerms(dt, 1, frozenset({dt, LOGITS_DTYPE}))
        t, m, state = kv.prefill_and_capture(lm, TINY_PROMPT)
        d, _ = kv.append_turn(lm, state, TINY_TURN2)
        h, _, _ = hidden.capture_hidden(lm, TINY_PROMPT, 1)
        p, _ = prefix.capture_prefix(lm, TINY_PROMPT)
        r, _ = residual.make_patch(1, [0, 1], residual.capture_residual(lm, TINY_PROMPT, 1)[:2], 1.0)
        for x in (*t.values(), *d.values(), *h.values(), *p.values(), *r.values()):
            assert str(x.dtype).removeprefix("torch.") in terms.wire_dtypes
        assert m["dtype"] == terms.kv_dtype and m["threads"] == terms.threads


# -- hostile input is refused, at the header and by the applier -----------------------------------
@pytest.mark.parametrize(("model_dtype", "foreign"), [(m, f) for m in ("float32", "bfloat16")
                                                       for f in WIRE_DTYPES if f != m])
def test_foreign_kv_dtype_refused(model_dtype: str, foreign: str, models: dict[str, LoadedModel]) -> None:
    """Every wire dtype but the model's own: legal on the wire, refused by name here."""
    lm = models[model_dtype]
    tensors, meta, _ = kv.prefill_and_capture(lm, TINY_PROMPT)
    cast = {k: (v if k == "logits" else v.to(TORCH_DTYPES[foreign])) for k, v in tensors.items()}
    word = rf"\b{foreign}\b"
    _refused(lm, cast, {**meta, "dtype": foreign}, word)  # declared honestly
    _refused(lm, cast, meta, word)  # meta claims the model dtype, the tensors say otherwise


@pytest.mark.parametrize("bad", BAD_NEXT_TOKENS, ids=repr)
def test_bad_next_token_refused(bad: Any, gemma: LoadedModel) -> None:
    bad = _vocab(gemma) if bad == "VOCAB" else bad
    tensors, meta, state = kv.prefill_and_capture(gemma, TINY_PROMPT)
    _refused(gemma, tensors, {**meta, "next_token": bad}, "next_token")
    delta, dmeta = kv.append_turn(gemma, state, TINY_TURN2)
    rx = kv.inject(gemma, tensors, meta)
    before = [(layer.keys, layer.get_seq_length()) for layer in rx.cache.layers]
    _refused(gemma, delta, {**dmeta, "next_token": bad}, "next_token", state=rx)
    assert rx.length == len(TINY_PROMPT) and rx.next_token == meta["next_token"]
    assert [(layer.keys, layer.get_seq_length()) for layer in rx.cache.layers] == before


def _kv_cases(lm: LoadedModel) -> list[tuple[str, dict[str, Any], str]]:
    """(what, meta override, reason the error must name) for one snapshot of ``lm``."""
    n = lm.model.config.num_hidden_layers
    return [
        ("partial layers", {"layer_end": n - 1}, "layer"),
        ("layers as floats", {"layer_start": 0.0}, "layer_start"),
        ("not at token 0", {"token_start": 1}, "token"),
        ("token_end a string", {"token_end": "13"}, "token_end"),
        ("token_end negative", {"token_end": -13}, "token_end"),
        ("token_end huge", {"token_end": 2**70}, "token_end"),
        ("other threads", {"threads": 2}, "threads"),
        ("threads as bool", {"threads": True}, "threads"),
        ("no threads", {"threads": None}, "threads"),
        ("batch slot 1", {"batch": 1}, "batch"),
        ("wrong apply", {"apply": "APPEND"}, "apply"),
        ("dtype not a wire name", {"dtype": "complex64"}, "complex64"),
        ("dtype bytes", {"dtype": b"float32"}, "dtype"),
        ("meta kind differs", {"kind": kv.KIND_DELTA}, "kind"),
        ("cumulative_length missing", {"cumulative_length": None}, "cumulative_length"),
        ("cumulative_length short", {"cumulative_length": [None]}, "cumulative_length"),
    ]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_header_refusals_name_the_field(family: str, cache_dir: Path) -> None:
    lm = _tiny(family, cache_dir)
    tensors, meta, _ = kv.prefill_and_capture(lm, TINY_PROMPT)
    for what, override, reason in _kv_cases(lm):
        try:
            _refused(lm, tensors, {**meta, **override}, reason)
        except AssertionError as exc:  # pragma: no cover - names the case that failed
            raise AssertionError(f"{family}: {what}") from exc
    last = lm.model.config.num_hidden_layers - 1
    _refused(lm, {k: v for k, v in tensors.items() if k != f"L{last}.v"}, meta, f"L{last}.v")
    _refused(lm, {**tensors, "extra": torch.zeros(3)}, meta, "extra")
    _refused(lm, {**tensors, "L0.k": tensors["L0.k"][:, :, :2]}, meta, "L0.k")
    _refused(lm, {**tensors, "logits": tensors["logits"][:5]}, meta, "logits")


def test_sliding_lengths_checked_at_header(gemma: LoadedModel) -> None:
    tensors, meta, _ = kv.prefill_and_capture(gemma, TINY_PROMPT)
    cum = list(meta["cumulative_length"])
    sliding = next(i for i, c in enumerate(cum) if c is not None)
    full = next(i for i, c in enumerate(cum) if c is None)
    for bad in ({sliding: cum[sliding] - 1}, {sliding: float(cum[sliding])}, {sliding: None},
                {full: len(TINY_PROMPT)}):
        patched = [bad.get(i, c) for i, c in enumerate(cum)]
        _refused(gemma, tensors, {**meta, "cumulative_length": patched}, "cumulative_length")


def test_delta_position_checked_at_header(llama: LoadedModel) -> None:
    tensors, meta, state = kv.prefill_and_capture(llama, TINY_PROMPT)
    delta, dmeta = kv.append_turn(llama, state, TINY_TURN2)
    _, specs = _over_wire(delta)
    with pytest.raises(KVMismatch, match="cache ends at 12"):
        check_header(llama, kv.KIND_DELTA, specs, dmeta, cache_length=12)
    check_header(llama, kv.KIND_DELTA, specs, dmeta, cache_length=len(TINY_PROMPT))
    envelope_specs = [TensorSpec(*s) for s in specs]  # what a received header lists, as it is
    check_header(llama, kv.KIND_DELTA, envelope_specs, dmeta, cache_length=len(TINY_PROMPT))
    with pytest.raises(KVMismatch, match="L0.k"):
        check_header(llama, kv.KIND_DELTA, [TensorSpec("L0.k", "int8", (1,), 1), *envelope_specs[1:]],
                     dmeta)


ENVELOPE_FIELDS = ("kind", "apply", "gain", "layer_start", "layer_end", "token_start", "token_end", "batch")


def _through_envelope(specs: list[Spec], meta: dict[str, Any]) -> tuple[Envelope, dict[str, Any]]:
    """Encode a real header, decode it with the wire's own checks, rebuild the runtime meta the way
    ``meshnode.handoff.received_to_runtime`` does (envelope fields win over the meta map)."""
    env = Envelope(b"\0" * 16, 1, Kind(meta["kind"]), (meta["layer_start"], meta["layer_end"]),
                   (meta["token_start"], meta["token_end"]), meta["batch"], ApplyMode(meta["apply"]),
                   tuple(TensorSpec(*s) for s in specs), None,
                   {k: v for k, v in meta.items() if k not in ENVELOPE_FIELDS})
    h = decode_envelope(encode_envelope(env), EnvelopeBounds(1 << 30, 1 << 20, 64, 1.0))
    rebuilt = {**h.meta, "kind": h.kind.value, "apply": h.apply.value, "layer_start": h.layers[0],
               "layer_end": h.layers[1], "token_start": h.tokens[0], "token_end": h.tokens[1],
               "batch": h.batch_slot}
    return h, rebuilt


def test_wire_legal_headers_are_judged_before_the_payload(gemma: LoadedModel) -> None:
    """What the envelope decoder lets through (any wire dtype, any scalar meta) this one refuses."""
    tensors, meta, _ = kv.prefill_and_capture(gemma, TINY_PROMPT)
    _, specs = _over_wire(tensors)
    h, rebuilt = _through_envelope(specs, meta)
    assert check_header(gemma, h.kind.value, h.tensors, rebuilt, need_next_token=True).tokens == (0, 13)
    for bad in ("7", 3.0, True, -1, 2**63):
        h, rebuilt = _through_envelope(specs, {**meta, "next_token": bad})
        with pytest.raises(KVMismatch, match="next_token"):
            check_header(gemma, h.kind.value, h.tensors, rebuilt)
    _, specs64 = _over_wire({k: v.double() for k, v in tensors.items()})
    h, rebuilt = _through_envelope(specs64, {**meta, "dtype": "float64"})
    with pytest.raises(KVMismatch, match="float64"):
        check_header(gemma, h.kind.value, h.tensors, rebuilt)


def test_decoding_receiver_needs_next_token(llama: LoadedModel) -> None:
    """A capture that stops before the cache end ships no next token: fine to store, not to decode."""
    _, _, state = kv.prefill_and_capture(llama, TINY_PROMPT)
    tensors, meta = kv.capture(llama, state, tokens=(0, 5))
    assert meta["next_token"] is None
    rx, specs = _over_wire(tensors)
    assert check_header(llama, kv.KIND_FULL, specs, meta).next_token is None
    with pytest.raises(KVMismatch, match="next_token"):
        check_header(llama, kv.KIND_FULL, specs, meta, need_next_token=True)
    assert kv.inject(llama, rx, meta).length == 5


@pytest.mark.parametrize("specs", [None, "L0.k", [("L0.k",)], [("L0.k", "float32", (1, 2, 3, 16), -1)],
                                   [(7, "float32", (1,), 4)], [("L0.k", "float32", (1.0,), 4)],
                                   [("x", "float32", (1,), 4), ("x", "float32", (1,), 4)]], ids=repr)
def test_malformed_specs_refused(specs: Any, llama: LoadedModel) -> None:
    _, meta, _ = kv.prefill_and_capture(llama, TINY_PROMPT)
    with pytest.raises(KVMismatch):
        check_header(llama, kv.KIND_FULL, specs, meta)


@pytest.mark.parametrize("kind", ["BOGUS", None, 7, ["KV_CACHE"]], ids=repr)
def test_unknown_kind_refused(kind: Any, llama: LoadedModel) -> None:
    with pytest.raises(KVMismatch, match="kind"):
        check_header(llama, kind, [], {})


def test_meta_not_a_map_refused(llama: LoadedModel) -> None:
    tensors, _, _ = kv.prefill_and_capture(llama, TINY_PROMPT)
    rx, specs = _over_wire(tensors)
    for meta in (None, [], "meta"):
        with pytest.raises(KVMismatch, match="meta"):
            check_header(llama, kv.KIND_FULL, specs, meta)  # type: ignore[arg-type]
        with pytest.raises(KVMismatch, match="meta"):
            kv.inject(llama, rx, meta)  # type: ignore[arg-type]
    with pytest.raises(KVMismatch, match="tensor"):
        kv.inject(llama, {"L0.k": [1, 2]}, {})  # type: ignore[dict-item]


# -- a correct message still passes and continues like the sender ----------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_correct_message_passes_and_continues_like_sender(family: str, cache_dir: Path) -> None:
    lm = _tiny(family, cache_dir)
    ref_tokens, ref_logits = kv.generate_reference(lm, TINY_PROMPT, N)
    tensors, meta, state = kv.prefill_and_capture(lm, TINY_PROMPT)
    rx_tensors, specs = _over_wire(tensors)
    head = check_header(lm, kv.KIND_FULL, specs, meta)
    assert head.tokens == (0, len(TINY_PROMPT)) and head.next_token == state.next_token
    rx = kv.inject(lm, rx_tensors, meta)
    fork = kv.inject(lm, *kv.capture(lm, rx))  # decode on a fork; rx stays at the prompt's end
    tokens, logits = kv.continue_greedy(lm, fork, N)
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)  # bitwise, fp32
    delta, dmeta = kv.append_turn(lm, state, TINY_TURN2)
    rx_delta, dspecs = _over_wire(delta)
    check_header(lm, kv.KIND_DELTA, dspecs, dmeta, cache_length=rx.length)
    kv.apply_delta(lm, rx, rx_delta, dmeta)
    ref2_tokens, ref2_logits = kv.continue_greedy(lm, state, N)
    tokens2, logits2 = kv.continue_greedy(lm, rx, N)
    assert tokens2 == ref2_tokens and torch.equal(logits2, ref2_logits)


# -- the other kinds ------------------------------------------------------------------------------
def test_hidden_slice_header(llama: LoadedModel) -> None:
    t, m, ref = hidden.capture_hidden(llama, TINY_PROMPT, 1)
    rx, specs = _over_wire(t)
    assert check_header(llama, hidden.KIND, specs, m).layers == (1, 2)
    assert torch.equal(hidden.run_from_hidden(llama, rx, m), ref)
    for override, reason in (({"layer_start": 99}, "layer"), ({"layer_end": 3}, "layer"),
                             ({"token_start": 1}, "token_start"), ({"token_end": 5}, "hidden"),
                             ({"dtype": "float64"}, "float64"), ({"threads": 3}, "threads")):
        with pytest.raises(KVMismatch, match=reason):
            check_header(llama, hidden.KIND, specs, {**m, **override})
        with pytest.raises(hidden.HiddenMismatch, match=reason):
            hidden.run_from_hidden(llama, rx, {**m, **override})
    with pytest.raises(KVMismatch, match="int8"):
        hidden.run_from_hidden(llama, {"hidden": t["hidden"].to(torch.int8)}, m)


def test_residual_patch_header_and_nan_gate(llama: LoadedModel) -> None:
    own = residual.capture_residual(llama, TINY_PROMPT, 1)
    t, m = residual.make_patch(1, [0, 1], own[:2] * 0.1, gain=1.0)
    _, specs = _over_wire(t)
    assert check_header(llama, residual.KIND, specs, m).gain == 1.0
    for override, reason in (({"gain": float("nan")}, "gain"), ({"gain": True}, "gain"),
                             ({"gain": "1"}, "gain"), ({"layer_start": -1}, "layer_start"),
                             ({"token_end": 3}, "patch"), ({"apply": "OVERWRITE"}, "apply")):
        with pytest.raises(residual.PatchRejected, match=reason):
            with residual.residual_patch(llama, t, {**m, **override}):
                pass  # pragma: no cover
    nan, nm = residual.make_patch(1, [0, 1], torch.full_like(own[:2], float("nan")), gain=1.0)
    with pytest.raises(KVMismatch, match="norm ratio"):  # NaN compares False: the gate must see it
        with residual.residual_patch(llama, nan, nm, max_norm_ratio=1e9):
            with torch.inference_mode():
                llama.model(input_ids=torch.tensor([TINY_PROMPT]), use_cache=False)


def test_virtual_prefix_header(llama: LoadedModel) -> None:
    t, m = prefix.capture_prefix(llama, TINY_PROMPT[:5])
    _, specs = _over_wire(t)
    check_header(llama, prefix.KIND, specs, m)
    for override, reason in (({"token_start": 2}, "token"), ({"token_end": 4}, "embeds"),
                             ({"dtype": "bfloat16"}, "bfloat16"), ({"batch": 2}, "batch")):
        with pytest.raises(prefix.PrefixMismatch, match=reason):
            prefix.prefill_with_prefix(llama, t, {**m, **override}, TINY_PROMPT[5:])


# -- properties: arbitrary peer values raise KVMismatch and nothing else --------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 20),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.binary(max_size=8), st.sampled_from(["KV_CACHE", "APPEND", "float32"]))
values = st.one_of(scalars, st.lists(scalars, max_size=6))
META_KEYS = ["kind", "apply", "layer_start", "layer_end", "token_start", "token_end", "batch",
             "next_token", "cumulative_length", "dtype", "threads", "gain", "other"]
overrides = st.dictionaries(st.sampled_from(META_KEYS), values, max_size=5)
drops = st.sets(st.sampled_from(META_KEYS), max_size=3)
KINDS = [kv.KIND_FULL, kv.KIND_DELTA, hidden.KIND, residual.KIND, prefix.KIND]


Turns = tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]


@pytest.fixture(scope="module")
def turns(gemma: LoadedModel) -> Turns:
    """One sender conversation (snapshot + delta), computed once: the properties vary the rest."""
    tensors, meta, state = kv.prefill_and_capture(gemma, TINY_PROMPT)
    delta, dmeta = kv.append_turn(gemma, state, TINY_TURN2)
    return tensors, meta, delta, dmeta


@settings(max_examples=150, deadline=None)
@given(override=overrides, drop=drops, kind=st.sampled_from(KINDS))
def test_arbitrary_meta_raises_only_kvmismatch(override: dict[str, Any], drop: set[str], kind: str,
                                               gemma: LoadedModel, turns: Turns) -> None:
    tensors, meta, delta, dmeta = turns
    base, payload = (dmeta, delta) if kind == kv.KIND_DELTA else (meta, tensors)
    m = {k: v for k, v in {**base, **override}.items() if k not in drop}
    rx, specs = _over_wire(payload)
    try:
        check_header(gemma, kind, specs, m, cache_length=len(TINY_PROMPT))
    except KVMismatch:
        pass
    try:
        state = kv.inject(gemma, rx, m)
    except KVMismatch:
        pass
    else:  # accepted means decodable: the crash must not just move to the next step
        if state.next_token is not None:
            kv.continue_greedy(gemma, state, 2)
    target = kv.inject(gemma, tensors, meta)
    before = [(layer.keys, layer.get_seq_length()) for layer in target.cache.layers]
    try:
        kv.apply_delta(gemma, target, rx, m)
    except KVMismatch:  # and nothing was applied
        assert target.length == len(TINY_PROMPT) and target.next_token == meta["next_token"]
        assert [(layer.keys, layer.get_seq_length()) for layer in target.cache.layers] == before
    else:
        if target.next_token is not None:
            kv.continue_greedy(gemma, target, 2)


_SPEC_NAMES = ["L0.k", "L0.v", "L3.v", "logits", "hidden", "patch", "embeds", "", "x" * 300]
spec_items = st.tuples(st.sampled_from(_SPEC_NAMES) | st.integers() | st.none(),
                       st.sampled_from([*WIRE_DTYPES, "complex64", ""]) | st.none(),
                       st.lists(st.integers(-2, 2**40) | st.floats(), max_size=5) | st.text(max_size=3),
                       st.integers(-2**70, 2**70) | st.floats())
spec_lists = st.lists(spec_items | st.lists(scalars, max_size=5), max_size=6)


@settings(max_examples=150, deadline=None)
@given(specs=spec_lists, kind=st.sampled_from(KINDS))
def test_arbitrary_specs_raise_only_kvmismatch(specs: list[Any], kind: str, gemma: LoadedModel,
                                               turns: Turns) -> None:
    _, meta, _, dmeta = turns
    try:
        check_header(gemma, kind, specs, {**(dmeta if kind == kv.KIND_DELTA else meta), "kind": kind})
    except KVMismatch:
        pass


def test_bad_values_are_not_silently_coerced(llama: LoadedModel) -> None:
    """``13.0 == 13`` and ``True == 1`` in Python: exact-type checks keep them out of positions."""
    tensors, meta, _ = kv.prefill_and_capture(llama, TINY_PROMPT)
    for key, coerced in (("token_end", float(meta["token_end"])), ("layer_end", 4.0),
                         ("batch", False), ("threads", True), ("threads", 1.0)):
        _refused(llama, tensors, {**meta, key: coerced}, key)


def test_learned_positions_bound_token_end_rotary_ones_do_not(cache_dir: Path) -> None:
    """GPT-2's position table ends (an index past it crashes); rotary positions go on."""
    gpt2 = _tiny("gpt2", cache_dir)
    tensors, meta, _ = kv.prefill_and_capture(gpt2, TINY_PROMPT)
    _refused(gpt2, tensors, {**meta, "token_end": gpt2.model.config.n_positions}, "token_end")
    llama = _tiny("llama", cache_dir)
    assert accept.layout(llama).max_positions is None
    assert accept.layout(gpt2).max_positions == gpt2.model.config.n_positions
