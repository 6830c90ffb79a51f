"""Every record the stream writes or stores, with its one codec (orjson; never pickle).

=====================  ============================================  ==================================
record                 where                                         codec
=====================  ============================================  ==================================
prediction             topic ``predictions`` (key: user id)          :func:`prediction_record`
outcome                topic ``outcomes`` (key: user id)             :func:`outcome_record`
dead letter            topic ``events.dlq`` (key: the event's key)   :func:`dlq_record`
user state             table ``histories`` (+ its changelog)         :func:`encode_state` / :func:`decode_state`
forget request         topic ``events`` (key: user id; header        :class:`ForgetRequest`
                       ``nextaction-control: forget``)
forget marker          topic ``outcomes`` (key: user id)             :func:`forget_marker`
model update           topic ``model-updates`` (key: ``b"model"``)   :class:`ModelUpdate`
=====================  ============================================  ==================================

Every record on a topic that downstream teams read (``predictions``, ``outcomes``, ``events.dlq``
and the full records on ``model-updates``) carries ``schema_version`` (:data:`SCHEMA_VERSION`) and
is described by a JSON Schema in ``stream_app/schemas/`` (:func:`schema`); what the fields mean
and what a version change promises: docs/contract.md.

A user's state is one value: the event window (:meth:`EventSeq.to_json` columns) plus ``"p"``,
the :class:`StoredPrediction` the user's next event turns into an outcome, ``"seen"``, the wall
clock (epoch ms) when the worker last read an event of the user (the idle sweep's clock; states
written before it existed lack it: :func:`last_seen`), and ``"w"``, the user's activity: events per
event-time window (:func:`count_activity`; the newest :data:`ACTIVITY_WINDOWS_KEPT` windows). One
record per user holds all of it, so one table write and one changelog record carry an event's whole
effect on the state (the activity once had a windowed table of its own: one more record per event).

>>> h = EventSeq.from_columns(["a"], ["cart"], [5])
>>> last = StoredPrediction("m1", 5, 0, 7, Prediction([0.2, 0.8, 0, 0, 0], [("b", 0.5)], 60.0))
>>> back = decode_state(encode_state(UserState(h, last)))
>>> back.history.items, back.last.version, back.last.prediction.top_items
(['a'], 'm1', [('b', 0.5)])
>>> decode_state(None).last is None, decode_state(h.pack()).last is None  # no entry; no prediction yet
(True, True)
>>> last_seen(decode_state(encode_state(UserState(h, seen=9)))), last_seen(decode_state(h.pack()))  # else: newest event
(9, 5)
>>> decode_state(encode_state(UserState(h, activity={3: 2}))).activity
{3: 2}
>>> ModelUpdate.decode(ModelUpdate("v1", "/models/v1", "ab" * 32).encode()).path
'/models/v1'
>>> orjson.loads(forget_marker("u1", "request"))["schema_version"] == SCHEMA_VERSION
True
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources

import orjson

from models.predictor import Prediction
from models.schema import ACTION_INDEX, N_ACTIONS, EventSeq

# --- the contract -------------------------------------------------------------------------------------
#: The version of the record contract (docs/contract.md), written into every ``predictions``,
#: ``outcomes``, ``events.dlq`` and full ``model-updates`` record as ``schema_version``. Within one
#: version fields are only ever added; a field removed, renamed, retyped or given another meaning or
#: unit raises it. 1: ``top_items`` scores are probabilities (issue 16); records without the field
#: were written before it (their ``top_items`` scores are the Transformer's raw scores).
SCHEMA_VERSION = 1
#: The topics' JSON Schemas (draft 2020-12), files in ``stream_app/schemas/``: name -> file.
SCHEMAS = {"predictions": "predictions.schema.json", "outcomes": "outcomes.schema.json",
           "events.dlq": "events.dlq.schema.json", "model-updates": "model-updates.schema.json"}


@functools.cache
def schema(name: str) -> dict:
    """The JSON Schema of the records of topic ``name`` (a key of :data:`SCHEMAS`, the default topic
    names), as shipped in the package.

    >>> schema("predictions")["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    True
    """
    if name not in SCHEMAS:
        raise ValueError(f"no schema for {name!r}: one of {sorted(SCHEMAS)}")
    return json.loads(resources.files("stream_app").joinpath("schemas", SCHEMAS[name]).read_text("utf-8"))


# --- user state (table ``histories``) ----------------------------------------------------------------
@dataclass(slots=True)
class StoredPrediction:
    """The latest prediction published for a user, as stored with the user's window: the next event
    of the user pairs with it as an outcome."""

    version: str
    event_ts: int  # the event it was made for
    partition: int  # ... and that event's source partition and offset
    offset: int
    prediction: Prediction
    #: The contract its scores follow (:data:`SCHEMA_VERSION`); 0: stored by a release before the
    #: contract, whose Transformer scores were not probabilities (:func:`outcome_record` leaves them out).
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return {"v": self.version, "event_ts": self.event_ts, "partition": self.partition, "offset": self.offset,
                "sv": self.schema_version, **self.prediction.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "StoredPrediction":
        return cls(str(d["v"]), int(d["event_ts"]), int(d["partition"]), int(d["offset"]), Prediction.from_json(d),
                   int(d.get("sv", 0)))

    def covers(self, partition: int, offset: int) -> bool:
        """Was the event at ``partition``/``offset`` already processed when this was stored (a redelivery)?"""
        return self.partition == partition and self.offset >= offset


@dataclass(slots=True)
class UserState:
    """One user's ``histories`` value: the event window, the latest prediction (``None`` before the
    first) and when the worker last read an event of the user (wall clock, epoch ms; ``None`` in a
    state written before this field existed)."""

    history: EventSeq
    last: StoredPrediction | None = None
    seen: int | None = None
    activity: dict[int, int] = field(default_factory=dict)  # event-time window index -> events counted


#: Activity windows kept per user: the newest ones by window index (older ones are dropped).
ACTIVITY_WINDOWS_KEPT = 24


def count_activity(activity: dict[int, int], window: int) -> int:
    """Count one event in ``window`` (an index: event time // window size) and return that window's
    count; keeps the newest :data:`ACTIVITY_WINDOWS_KEPT` windows. An event older than all of them
    is counted (its own count is returned) but not kept.

    >>> a = {}
    >>> count_activity(a, 7), count_activity(a, 7), count_activity(a, 8), a
    (1, 2, 1, {7: 2, 8: 1})
    >>> a = {w: 1 for w in range(100, 124)}
    >>> count_activity(a, 124), 100 in a, count_activity(a, 50), 50 in a, len(a)
    (1, False, 1, False, 24)
    """
    n = activity.get(window, 0) + 1
    activity[window] = n
    if len(activity) > ACTIVITY_WINDOWS_KEPT:
        for w in sorted(activity)[:len(activity) - ACTIVITY_WINDOWS_KEPT]:
            del activity[w]
    return n


def encode_state(state: UserState) -> bytes:
    """Table value bytes (what also goes to the changelog)."""
    d = state.history.to_json()
    if state.last is not None:
        d["p"] = state.last.to_json()
    if state.seen is not None:
        d["seen"] = state.seen
    if state.activity:
        d["w"] = [[w, n] for w, n in state.activity.items()]
    return orjson.dumps(d)


_STR = {str}


def decode_state(value: bytes | None) -> UserState:
    """Inverse of :func:`encode_state`; ``None`` (no entry yet) is the empty history, and a value
    without ``"p"`` (written before the prediction joined the window) has no prediction yet.

    A value it cannot read as a consistent state (not JSON, missing or mistyped columns, columns of
    different lengths, unknown actions, times out of order, a malformed prediction) raises
    :class:`ValueError`, never anything else: the pipeline then resets the user's state
    (``state_reset``, docs/architecture.md).

    >>> decode_state(b'{"i": ["a"], "a": [9], "t": [1], "d": [""], "l": [""]}')
    Traceback (most recent call last):
    ...
    ValueError: stored state unreadable: action index out of range
    """
    if value is None:
        return UserState(EventSeq.empty())
    try:
        d = orjson.loads(value)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        last = d.pop("p", None)
        seen = d.pop("seen", None)
        if seen is not None and (isinstance(seen, bool) or not isinstance(seen, int)):
            raise ValueError("'seen' must be an integer")
        activity = {int(w): int(c) for w, c in d.pop("w", ())}
        h = EventSeq.from_json(d)
        n = len(h.items)
        if not (len(h.actions) == len(h.ts) == len(h.devices) == len(h.locations) == len(h.categories) == n):
            raise ValueError("columns of different lengths")
        if h.actions.ndim != 1 or h.ts.ndim != 1:
            raise ValueError("columns must be flat lists")
        if n and int(h.actions.max()) >= N_ACTIONS:
            raise ValueError("action index out of range")
        if n > 1 and bool((h.ts[1:] < h.ts[:-1]).any()):
            raise ValueError("event times out of order")
        for column in (h.items, h.devices, h.locations, h.categories):
            if not isinstance(column, list) or not set(map(type, column)) <= _STR:
                raise ValueError("string columns must be lists of strings")
        stored = StoredPrediction.from_json(last) if last is not None else None
        if stored is not None and len(stored.prediction.action_probs) != N_ACTIONS:
            raise ValueError("prediction has the wrong number of action probabilities")
        return UserState(h, stored, seen, activity)
    except ValueError as exc:
        raise ValueError(f"stored state unreadable: {exc}") from None
    except (TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        raise ValueError(f"stored state unreadable: {type(exc).__name__}: {exc}") from None


def last_seen(state: UserState) -> int:
    """When the user was last active (epoch ms) for the idle sweep: ``seen``, or for a state written
    before ``seen`` existed the newest event's time (the best guess on a live stream); 0 if empty."""
    if state.seen is not None:
        return state.seen
    return int(state.history.ts[-1]) if len(state.history) else 0


# --- privacy: forget requests (topic ``events``) and markers (topic ``outcomes``) ---------------------------
#: Kafka header that marks a control record on ``events`` (never an event: never validated, never
#: dead-lettered, never predicted); its value names the kind (:data:`FORGET`).
CONTROL_HEADER = "nextaction-control"
FORGET = "forget"
#: Why a user is forgotten: on request (``nextaction forget``) or idle longer than ``state_idle_ttl_s``.
REQUEST, IDLE = "request", "idle"


def control_kind(headers) -> str | None:
    """The control kind of an ``events`` record from its headers (a mapping or ``[(key, bytes)]``), or
    ``None`` for an ordinary event.

    >>> control_kind([("nextaction-control", b"forget")]), control_kind({"x": b"1"}), control_kind(None)
    ('forget', None, None)
    """
    if not headers:
        return None
    pairs = headers.items() if hasattr(headers, "items") else headers
    for key, value in pairs:
        if key == CONTROL_HEADER:
            if isinstance(value, (bytes, bytearray)):
                return bytes(value).decode("utf-8", "replace")
            return str(value)
    return None


@dataclass(frozen=True, slots=True)
class ForgetRequest:
    """The value of a forget control record (key: the user id). ``idle_before_ms`` (the sweep's)
    makes it conditional: the user is forgotten only if not seen since then (an event that arrived
    after the sweep looked keeps the user).

    >>> ForgetRequest.decode(ForgetRequest(IDLE, 5).encode()), ForgetRequest.decode(b"")
    (ForgetRequest(reason='idle', idle_before_ms=5), ForgetRequest(reason='request', idle_before_ms=None))
    """

    reason: str = REQUEST
    idle_before_ms: int | None = None

    def encode(self) -> bytes:
        d: dict = {"reason": self.reason}
        if self.idle_before_ms is not None:
            d["idle_before_ms"] = self.idle_before_ms
        return orjson.dumps(d)

    @classmethod
    def decode(cls, value: bytes | None) -> "ForgetRequest":
        """Parse a request (an empty value is a plain request); ``ValueError`` names what is wrong."""
        if not value:
            return cls()
        try:
            d = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ValueError("expected a JSON object")
        reason = d.get("reason", REQUEST)
        if reason not in (REQUEST, IDLE):
            raise ValueError(f"'reason' must be {REQUEST!r} or {IDLE!r} (got {reason!r})")
        before = d.get("idle_before_ms")
        if before is not None and (isinstance(before, bool) or not isinstance(before, int)):
            raise ValueError(f"'idle_before_ms' must be an integer (got {before!r})")
        return cls(reason, before)


def forget_marker(user_id: str, reason: str) -> bytes:
    """The ``outcomes`` record that tells the trainer to drop the user's examples (pending and replayed).

    >>> forget_user_of(orjson.loads(forget_marker("u1", "request")))
    'u1'
    """
    return orjson.dumps({"schema_version": SCHEMA_VERSION, "forget": user_id, "reason": reason})


def forget_user_of(rec: dict) -> str | None:
    """The user a decoded ``outcomes`` record asks to forget (:func:`forget_marker`), else ``None``."""
    user = rec.get("forget") if isinstance(rec, dict) else None
    return str(user) if user is not None else None



# --- topic records ----------------------------------------------------------------------------------
def prediction_record(user_id: str, stored: StoredPrediction, *, latency_ms: float, history_len: int, activity: int,
                      duplicate: bool, published_ms: int) -> bytes:
    """The ``predictions`` record (README, "A prediction"; docs/contract.md): ``top_items`` carry the
    model's probability that each item is the user's next item, ``action_probs`` sum to 1."""
    p = stored.prediction
    record = {"schema_version": SCHEMA_VERSION, "user_id": user_id, "event_ts": stored.event_ts, "model_version": stored.version,
              "action_probs": p.action_dict(), "top_items": [[i, s] for i, s in p.top_items],
              "next_gap_s": p.next_gap_s, "latency_ms": round(latency_ms, 3), "history_len": history_len,
              "activity": activity, "partition": stored.partition, "offset": stored.offset, "duplicate": duplicate,
              "published_ms": published_ms}
    if p.explanation:
        record["explanation"] = p.explanation
    if p.why is not None:  # setting explain_top > 0 (models/explain.py, docs/explanations.md)
        record["why"] = p.why
    return orjson.dumps(record)


def outcome_record(user_id: str, last: StoredPrediction, *, served: EventSeq, action: str, item_id: str,
                   category: str, event_ts: int, partition: int, offset: int, item_text: str = "") -> bytes:
    """The ``outcomes`` record: the previous prediction and the window it was made from (``served``:
    the user's window as of that prediction's event, exactly what the model encoded), and what the
    user did next (the target). The online trainer's examples are these records
    (:func:`online.examples.example_from_outcome`): the window is carried whole, so an example is the
    served input and never needs state the trainer does not have.

    A prediction stored before the contract (``last.schema_version`` 0: the user's first event after
    the upgrade) has no probabilities to report: its ``top_items`` are left out (``[]``), its
    ``item_rank`` still says where the item was in them. ``item_text``: the event's, when it had
    one (``happened.item_text``; left out otherwise): the trainer starts an item it does not know there."""
    p = last.prediction
    ranks = {item: n for n, (item, _) in enumerate(p.top_items, start=1)}
    tops = [[i, s] for i, s in p.top_items] if last.schema_version >= 1 else []
    return orjson.dumps({
        "schema_version": SCHEMA_VERSION, "user_id": user_id,
        "context": {"model_version": last.version, "event_ts": last.event_ts, "action_probs": p.action_dict(),
                    "top_items": tops, "next_gap_s": p.next_gap_s,
                    "partition": last.partition, "offset": last.offset, "window": served.to_json()},
        "happened": {"action": action, "item_id": item_id, "category": category, "ts": event_ts,
                     "gap_s": (event_ts - last.event_ts) / 1000.0, "item_rank": ranks.get(item_id),
                     "action_prob": p.action_probs[ACTION_INDEX[action]], **({"item_text": item_text} if item_text else {})},
        "partition": partition, "offset": offset,
    })


#: Bound of an encoded dead-letter record (the value), well under the producer's maximum request size
#: (Faust/aiokafka: 1,000,000 bytes; the broker's ``max.message.bytes``: 1,048,588). It keeps any event up
#: to ``max_event_bytes``' default (16 KiB) whole, even if every character is escaped (6 bytes each).
DLQ_MAX_BYTES = 256 * 1024
#: Bound of a dead-letter record's message key (and of the ``key`` field's source bytes).
DLQ_MAX_KEY_BYTES = 1024
#: The smallest ``max_bytes`` :func:`dlq_record` accepts: room for its bounded fields at their worst
#: (every character escaped) and a prefix of the original.
DLQ_MIN_BYTES = 16 * 1024
_MAX_REASON_CHARS, _MAX_DETAIL_CHARS, _MAX_TOPIC_CHARS = 64, 1024, 255


def dlq_key(key: bytes | None) -> bytes | None:
    """The message key of a dead-letter record: the event's key, cut to :data:`DLQ_MAX_KEY_BYTES`."""
    return key if key is None or len(key) <= DLQ_MAX_KEY_BYTES else key[:DLQ_MAX_KEY_BYTES]


def _text(s: str, limit: int) -> str:
    """``s`` cut to ``limit`` characters, as valid UTF-8 (lone surrogates replaced)."""
    s = str(s)
    if len(s) > limit:
        s = s[: limit - 1] + "\u2026"
    return s.encode("utf-8", "replace").decode("utf-8")


def _fit_text(text: str, budget: int) -> str:
    """The longest prefix of ``text`` whose JSON string encoding takes at most ``budget`` bytes."""
    lo, hi = 0, min(len(text), budget)  # every character takes at least one byte
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(orjson.dumps(text[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def dlq_record(raw: bytes | None, reason: str, detail: str, *, topic: str, partition: int, offset: int,
               key: bytes | None = None, max_bytes: int = DLQ_MAX_BYTES) -> bytes:
    """The dead-letter record: the original bytes (as UTF-8 text, or base64 if not UTF-8) + why + where.

    The encoded record is never longer than ``max_bytes`` (at least :data:`DLQ_MIN_BYTES`), so it can
    always be produced: ``reason``, ``detail``, ``key`` and ``source.topic`` are cut to fixed lengths,
    and an original that does not fit is cut to the prefix that does; the record then says
    ``"truncated": true`` with ``original_bytes`` (the full length) and ``original_sha256`` (hex digest
    of the full original bytes, to match it with the source message). A key longer than
    :data:`DLQ_MAX_KEY_BYTES` is cut likewise, with ``key_bytes`` and ``key_sha256``.

    >>> orjson.loads(dlq_record(b"\\xff", "not_json", "invalid", topic="events", partition=0, offset=3))["encoding"]
    'base64'
    >>> rec = orjson.loads(dlq_record(b"x" * 100_000, "too_large", "big", topic="events", partition=0, offset=4,
    ...                               max_bytes=20_000))
    >>> rec["truncated"], rec["original_bytes"], len(rec["original"]) < 20_000
    (True, 100000, True)
    """
    if max_bytes < DLQ_MIN_BYTES:
        raise ValueError(f"max_bytes must be >= {DLQ_MIN_BYTES} (got {max_bytes})")
    raw = raw or b""
    try:
        original, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        original, encoding = None, "base64"
    record = {"schema_version": SCHEMA_VERSION,
              "reason": _text(reason, _MAX_REASON_CHARS), "detail": _text(detail, _MAX_DETAIL_CHARS),
              "original": original if original is not None else base64.b64encode(raw).decode(),
              "encoding": encoding, "key": None,
              "source": {"topic": _text(topic, _MAX_TOPIC_CHARS), "partition": int(partition), "offset": int(offset)}}
    if key:
        record["key"] = key[:DLQ_MAX_KEY_BYTES].decode("utf-8", "replace")
        if len(key) > DLQ_MAX_KEY_BYTES:
            record.update(key_bytes=len(key), key_sha256=hashlib.sha256(key).hexdigest())
    out = orjson.dumps(record)
    if len(out) <= max_bytes:
        return out
    # Too large: keep the prefix of the original that fits beside everything else.
    record.update(original="", truncated=True, original_bytes=len(raw), original_sha256=hashlib.sha256(raw).hexdigest())
    budget = max_bytes - len(orjson.dumps(record)) + 2  # the 2 bytes of the empty string's quotes
    if original is not None:
        record["original"] = _fit_text(original, budget)
    else:
        record["original"] = base64.b64encode(raw[: max(0, budget - 2) // 4 * 3]).decode()
    return orjson.dumps(record)


# --- model updates (topic ``model-updates``) -----------------------------------------------------------
#: Record header naming a ``model-updates`` record's kind: ``full`` (a :class:`ModelUpdate`, JSON; also
#: a record without the header) or ``delta`` (a :class:`models.delta.ModelDelta`, safetensors bytes).
KIND_HEADER = "kind"
FULL, DELTA = "full", "delta"


def update_kind(headers) -> str:
    """The kind of a ``model-updates`` record from its Kafka headers (``[(key, bytes)]`` or None)."""
    for key, value in headers or ():
        if key == KIND_HEADER:
            return DELTA if value == DELTA.encode() else FULL
    return FULL


@dataclass(frozen=True, slots=True)
class ModelUpdate:
    """A full ``model-updates`` record: serve the checkpoint at ``path`` (``sha256`` = its manifest's
    ``content_hash``; ``version`` a label, by default the hash's first 12 hex digits). The online
    trainer numbers its records (``n``, increasing: a worker ignores a trainer record numbered below
    the last it applied) and says why (``reason``: ``online``, ``reset``, ``rollback``); ``nextaction
    deploy`` leaves both unset. The codec reads a record without ``sha256``; a worker refuses to load
    one (:func:`stream_app.updates.admit`: the hash and a path under the checkpoint roots)."""

    version: str | None
    path: str
    sha256: str | None = None
    n: int | None = None
    reason: str | None = None

    #: Key of every record (full and delta): one key, so every update lands in one partition, in order.
    KEY = b"model"

    def encode(self) -> bytes:
        d = {"schema_version": SCHEMA_VERSION, "version": self.version, "path": self.path, "sha256": self.sha256}
        if self.n is not None:
            d.update(n=self.n, reason=self.reason)
        return orjson.dumps(d)

    @classmethod
    def decode(cls, value: bytes | None) -> "ModelUpdate":
        """Parse a record; ``ValueError`` names what is wrong with it (also a ``schema_version`` newer
        than :data:`SCHEMA_VERSION`: a record a newer release wrote, whose meaning may have changed)."""
        try:
            rec = orjson.loads(value) if value is not None else None
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not rec["path"]:
            raise ValueError("expected a JSON object with a non-empty string 'path'")
        sha = rec.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not sha):
            raise ValueError(f"'sha256' must be a hex string (got {sha!r})")
        n = rec.get("n")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"'n' must be a non-negative integer (got {n!r})")
        sv = rec.get("schema_version")  # absent: written before the field existed
        if sv is not None and (isinstance(sv, bool) or not isinstance(sv, int) or not 1 <= sv <= SCHEMA_VERSION):
            raise ValueError(f"'schema_version' {sv!r} is not one this worker reads (1..{SCHEMA_VERSION}): "
                             f"upgrade the worker")
        version = rec.get("version")
        return cls(None if version is None else str(version), rec["path"], sha, n, rec.get("reason"))

    def names(self, version: str) -> bool:
        """Does this update announce exactly the weights labelled ``version`` (a content-hash prefix,
        with no online delta applied on top) that are already served?"""
        return self.sha256 is not None and len(version) >= 8 and "+" not in version \
            and self.sha256.lower().startswith(version.lower())
