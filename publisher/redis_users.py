"""User ID embeddings (and packed user features) in Redis, one namespace per version.

Layout (prefix ``rs``)::

    rs:versions                 hash  version -> JSON meta {state, buckets, dim, ...}
    rs:{release}                string JSON {champion, previous, seq, at}: what serves
    rs:{release}:withdrawn      set   versions rolled back from (the stream avoids them)
    rs:uemb:{V:b}               hash  user id -> float32 ID embedding bytes
    rs:ufeat:{V:b}              hash  user id -> int32 packed feature row bytes
    rs:seen:{user}              zset  item id -> first event time (ms), capped: the
                                      user's positives, so its last N by time are the
                                      user tower's history input
    rs:rebased:V                string JSON offsets: the stream caught up on V
    rs:events                   pub/sub channel: release changes and deltas

A bucket ``b`` is ``stable_hash(user) % buckets``; the ``{V:b}`` hash tag keeps a
bucket's keys in one Redis Cluster slot while spreading buckets over the cluster.
A version is ``writing`` until every user is written, then ``complete``; only a
complete version can be released, so a reader never sees a half-written one.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import redis

from common.infra.redis_client import RedisClient
from common.infra.settings_groups import RedisSettings
from common.model.freq import stable_hash
from publisher.base import PublishError
from publisher.resp import Commands, execute
from publisher.resp_bulk import Groups, RememberedArgs, hset_rows, zadd_lt

WRITING, COMPLETE = "writing", "complete"
_TRIM_EVERY = 8
_BUCKETS_REMEMBERED = 2_000_000  # users whose bucket is kept (~200 MB at most)
_MEMBERS_REMEMBERED = 1_000_000  # seen items' encoded ids kept (~100 MB at most)


class VersionStateError(RuntimeError):
    """A version is missing from Redis or not in the state an operation needs."""


@dataclass(frozen=True)
class Layout:
    """Key names under one prefix."""

    prefix: str = "rs"

    @property
    def versions(self) -> str:
        return f"{self.prefix}:versions"

    # One hash tag: the release and the withdrawn set change in one transaction.
    @property
    def release(self) -> str:
        return f"{self.prefix}:{{release}}"

    @property
    def withdrawn(self) -> str:
        return f"{self.prefix}:{{release}}:withdrawn"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:events"

    def emb(self, version: str, bucket: int) -> str:
        return f"{self.prefix}:uemb:{{{version}:{bucket}}}"

    def feat(self, version: str, bucket: int) -> str:
        return f"{self.prefix}:ufeat:{{{version}:{bucket}}}"

    def seen(self, user_id: str) -> str:
        return f"{self.prefix}:seen:{{{user_id}}}"

    def rebased(self, version: str) -> str:
        return f"{self.prefix}:rebased:{version}"


@dataclass
class VersionMeta:
    """What Redis holds of a version."""

    version: str
    state: str
    buckets: int
    dim: int
    feat_width: int
    users: int = 0
    cutoff_ms: int = 0
    started_at: float = field(default_factory=time.time)
    completed_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> VersionMeta:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Release:
    """The serving pointer: champion and previous version, bumped on every flip."""

    champion: str | None = None
    previous: str | None = None
    seq: int = 0
    at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# One user's recent positives: item ids oldest first and their event times (ms).
Recent = tuple[list[str], list[int]]


@dataclass(frozen=True)
class UserRows:
    """Users read back for serving: ``found[i]`` says whether row ``i`` is real."""

    found: np.ndarray  # bool [n]
    vectors: np.ndarray  # float32 [n, dim]
    features: np.ndarray  # int32 [n, feat_width]; zeros (= unknown) where absent


# Per key (a user's seen set): its last ARGV[2] members with a score below ARGV[1]
# ("(ms", or "+inf"), oldest first; returned as three arrays: the count per key, then
# every key's members, then their scores (flat arrays parse in bulk on this side).
_HISTORIES_LUA = """
local counts, members, scores, n = {}, {}, {}, tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local r = redis.call('ZRANGE', key, ARGV[1], '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, n,
                       'WITHSCORES')
  counts[i] = #r / 2
  for j = #r - 1, 1, -2 do
    members[#members + 1] = r[j]
    scores[#scores + 1] = r[j + 1]
  end
end
return {counts, members, scores}
"""
_HISTORY_KEYS_PER_CALL = 4096


def buckets_of(user_ids: Sequence[str], buckets: int) -> np.ndarray:
    """The bucket of each user id (stable across processes and restarts)."""
    return (stable_hash(user_ids) % np.uint64(buckets)).astype(np.int64)


class UserStore:
    """Reads and writes the per-version user namespaces and the release pointer."""

    def __init__(self, client: RedisClient, rs: RedisSettings) -> None:
        self.r, self.rs, self.keys = client, rs, Layout(rs.prefix)
        self._seen_calls = 0
        self._buckets: tuple[int, dict[str, int]] = (0, {})  # bucket count, user -> bucket
        self._members = RememberedArgs(_MEMBERS_REMEMBERED)  # item id -> its RESP argument

    # -- versions ---------------------------------------------------------------------

    def versions(self) -> dict[str, VersionMeta]:
        """Every version Redis knows of, oldest first."""
        raw = self._call(self.r.hgetall, self.keys.versions)
        metas = {k.decode(): VersionMeta.from_json(v) for k, v in raw.items()}
        return dict(sorted(metas.items()))

    def meta(self, version: str) -> VersionMeta | None:
        raw = self._call(self.r.hget, self.keys.versions, version)
        return None if raw is None else VersionMeta.from_json(raw)

    def begin(self, version: str, users: int, dim: int, feat_width: int,
              cutoff_ms: int) -> VersionMeta:
        """Open ``version`` for a full write (again, after an interrupted one)."""
        meta = self.meta(version)
        if meta is not None and meta.state == COMPLETE:
            raise VersionStateError(f"version {version} is already published completely")
        buckets = max(1, math.ceil(users / self.rs.bucket_size))
        if meta is not None and (meta.buckets, meta.dim) != (buckets, dim):
            self.drop(version)  # an earlier attempt with another shape: start clean
        meta = VersionMeta(version, WRITING, buckets, dim, feat_width, users, cutoff_ms)
        self._call(self.r.hset, self.keys.versions, version, meta.to_json())
        return meta

    def complete(self, version: str) -> VersionMeta:
        meta = self._require(version)
        meta.state, meta.completed_at = COMPLETE, time.time()
        self._call(self.r.hset, self.keys.versions, version, meta.to_json())
        return meta

    def drop(self, version: str) -> None:
        """Remove a version's keys (UNLINK: freed in the background) and its meta."""
        meta = self.meta(version)
        if meta is not None:
            keys = [k for b in range(meta.buckets)
                    for k in (self.keys.emb(version, b), self.keys.feat(version, b))]
            for lo in range(0, len(keys), 1000):
                self._pipe_call(lambda p, chunk=keys[lo:lo + 1000]: [p.unlink(k) for k in chunk])
        self._call(self.r.unlink, self.keys.rebased(version))
        self._call(self.r.hdel, self.keys.versions, version)

    def _require(self, version: str) -> VersionMeta:
        meta = self.meta(version)
        if meta is None:
            raise VersionStateError(f"version {version} is not published to Redis")
        return meta

    # -- users ------------------------------------------------------------------------

    def write(self, version: str, user_ids: Sequence[str], vectors: np.ndarray,
              features: np.ndarray | None = None) -> None:
        """Write users' vectors (and packed features) into ``version``; raises
        ``PublishError`` when Redis fails, leaving earlier writes in place."""
        meta = self._require(version)
        if vectors.shape[1:] != (meta.dim,):
            raise PublishError(f"vectors of width {vectors.shape[1:]} for version {version} "
                               f"of dim {meta.dim}")
        ids = list(user_ids)
        feats = None if features is None else np.ascontiguousarray(features, dtype=np.int32)
        # One HSET per bucket, and one more of features when the rows have any; sent
        # once the commands hold pipeline_fields users or more.
        hashes = [(partial(self.keys.emb, version),
                   np.ascontiguousarray(vectors, dtype=np.float32))]
        if feats is not None and feats.shape[1]:
            hashes.append((partial(self.keys.feat, version), feats))
        for commands in hset_rows(ids, self._buckets_of(ids, meta.buckets), hashes,
                                  self.rs.pipeline_fields):
            self._execute(commands)

    def _buckets_of(self, ids: list[str], buckets: int) -> np.ndarray:
        """``buckets_of``, remembered: the stream writes the same users step after step,
        and hashing is most of the cost."""
        count, known = self._buckets
        if count != buckets or len(known) > _BUCKETS_REMEMBERED:
            known = {}
            self._buckets = (buckets, known)
        try:
            return np.fromiter(map(known.__getitem__, ids), np.int64, len(ids))
        except KeyError:
            new = [u for u in ids if u not in known]
            known.update(zip(new, buckets_of(new, buckets).tolist(), strict=True))
            return np.fromiter(map(known.__getitem__, ids), np.int64, len(ids))

    def read(self, version: str, user_ids: Sequence[str],
             meta: VersionMeta | None = None) -> UserRows:
        """Users' vectors and features from ``version`` (one round trip when its
        ``meta`` is given)."""
        return self._read(meta or self._require(version), user_ids, None)[0]

    def read_with_seen(self, meta: VersionMeta, user_id: str, times: bool = True
                       ) -> tuple[UserRows, Recent]:
        """One user's row and seen items, in one round trip (the recall API's read).

        The seen items come oldest first with their event times (``times``; without it,
        as a model with no history field needs, the times list is empty and Redis sends
        none), so the last N are the user's history: no second command for it."""
        return self._read(meta, [user_id], user_id, times)

    def histories(self, user_ids: Sequence[str], max_len: int,
                  before_ms: int | None = None) -> list[Recent]:
        """Each user's last ``max_len`` positives by time (item ids oldest first, and
        their times in ms), only those before ``before_ms`` if given (what a replayed
        step read the first time, later positives being stored since): one pipelined
        ZRANGE ... WITHSCORES per user, one round trip for the batch."""
        if max_len < 0:
            raise ValueError(f"max_len must be at least 0, got {max_len}")
        if max_len == 0 or not len(user_ids):  # ZRANGE -0 -1 would be the whole set
            return [([], []) for _ in user_ids]

        bound = "+inf" if before_ms is None else f"({before_ms}"
        users = list(user_ids)

        def commands(p: Any) -> None:
            if self.rs.cluster:  # a script's keys must share a slot: one ZRANGE each
                for u in users:
                    p.eval(_HISTORIES_LUA, 1, self.keys.seen(u), bound, max_len)
                return
            # A script per few thousand users, not a ZRANGE each: redis-py's per-command
            # cost (~40 us) was most of a stream step's time with 50-positive histories.
            for lo in range(0, len(users), _HISTORY_KEYS_PER_CALL):
                chunk = users[lo:lo + _HISTORY_KEYS_PER_CALL]
                p.eval(_HISTORIES_LUA, len(chunk), *map(self.keys.seen, chunk), bound,
                       max_len)

        return [h for reply in self._pipe_call(commands) for h in _unpack_histories(reply)]

    def _read(self, meta: VersionMeta, user_ids: Sequence[str], seen_of: str | None,
              times: bool = False) -> tuple[UserRows, Recent]:
        version = meta.version
        buckets = buckets_of(user_ids, meta.buckets).tolist()

        def commands(p: Any) -> None:
            for u, b in zip(user_ids, buckets, strict=True):
                p.hget(self.keys.emb(version, b), u)
                p.hget(self.keys.feat(version, b), u)
            if seen_of is not None:
                p.zrange(self.keys.seen(seen_of), 0, -1, withscores=times)

        replies = self._pipe_call(commands)
        seen: Recent = ([], [])
        if seen_of is not None:
            seen = _recent(replies[-1]) if times else ([m.decode() for m in replies[-1]], [])
        n = len(user_ids)
        found = np.zeros(n, bool)
        vectors = np.zeros((n, meta.dim), np.float32)
        feats = np.zeros((n, meta.feat_width), np.int32)
        for i in range(n):
            emb, feat = replies[2 * i], replies[2 * i + 1]
            if emb is not None and len(emb) == 4 * meta.dim:
                found[i] = True
                vectors[i] = np.frombuffer(emb, np.float32)
            if feat is not None and len(feat) == 4 * meta.feat_width:
                feats[i] = np.frombuffer(feat, np.int32)
        return UserRows(found, vectors, feats), seen

    # -- seen items -------------------------------------------------------------------

    def add_seen(self, user_ids: Sequence[str], item_ids: Sequence[str],
                 ts_ms: Sequence[int]) -> None:
        """Record (user, item) interactions, keeping about each user's ``seen_max``
        latest; idempotent, so a re-published delta changes nothing.

        Trimming is the costly half (a command per user per delta), so a user is trimmed
        when this call brings ``seen_max`` interactions or more, else on one call in
        ``_TRIM_EVERY``: a set may exceed the cap by what a few deltas add.

        One ZADD LT per user with all its interactions: a member given twice keeps its
        first time, as separate ZADDs would. First, not last: then a history read while
        a step is replayed (after a crash or for a rebase) holds what it held the first
        time for every event before the step, although later ones are stored by then
        (a repeat positive on an item does not move it to the front of the history).
        ``resp_bulk`` packs the commands in a few C-level passes over the events and the
        users rather than Python per event."""
        if self.rs.seen_max == 0 or not len(user_ids):
            return
        if not len(user_ids) == len(item_ids) == len(ts_ms):
            raise ValueError("user_ids, item_ids and ts_ms differ in length")
        users = Groups.of(user_ids)
        self._seen_calls += 1
        cap, turn = self.rs.seen_max, self._seen_calls % _TRIM_EVERY
        crc = np.fromiter(map(zlib.crc32, users.keys), np.int64, len(users.keys))
        trim = (users.counts >= cap) | (crc % _TRIM_EVERY == turn)
        # Sent once the commands hold 2 * pipeline_fields arguments or more.
        for commands in zadd_lt(self.keys.seen, users, ts_ms, self._members(item_ids), trim,
                                cap, 2 * self.rs.pipeline_fields):
            self._execute(commands)

    def seen(self, user_id: str) -> list[str]:
        return [m.decode() for m in self._call(self.r.zrange, self.keys.seen(user_id), 0, -1)]

    # -- release pointer and notifications --------------------------------------------

    def release(self) -> Release:
        raw = self._call(self.r.get, self.keys.release)
        return Release() if raw is None else Release(**json.loads(raw))

    def flip(self, expected_seq: int, champion: str, previous: str | None,
             event: dict[str, Any], withdraw: str | None = None) -> Release:
        """Set the release pointer if nobody flipped it since ``expected_seq`` (else
        ``VersionStateError``) and announce it on the channel; ``withdraw`` marks the
        version rolled back from, and the new champion is never withdrawn."""
        if self._require(champion).state != COMPLETE:
            raise VersionStateError(f"version {champion} is not completely published")
        new = Release(champion, previous, expected_seq + 1, time.time())
        with self.r.pipeline(transaction=True) as p:
            try:
                p.watch(self.keys.release)
                raw = p.get(self.keys.release)
                seq = 0 if raw is None else int(json.loads(raw)["seq"])
                if seq != expected_seq:
                    raise VersionStateError("the release changed while this operation ran "
                                            "(another operator?); look again and retry")
                p.multi()
                p.set(self.keys.release, new.to_json())
                p.srem(self.keys.withdrawn, champion)
                if withdraw is not None:
                    p.sadd(self.keys.withdrawn, withdraw)
                p.publish(self.keys.channel, json.dumps({**event, **asdict(new)}))
                p.execute()
            except redis.WatchError:
                raise VersionStateError("the release changed while this operation ran "
                                        "(another operator?); look again and retry") from None
            except redis.RedisError as exc:
                raise PublishError(f"redis: {exc}") from exc
        return new

    def withdrawn(self) -> set[str]:
        return {m.decode() for m in self._call(self.r.smembers, self.keys.withdrawn)}

    def announce(self, event: dict[str, Any]) -> None:
        self._call(self.r.publish, self.keys.channel, json.dumps(event))

    def mark_rebased(self, version: str, offsets: dict[int, int]) -> None:
        self._call(self.r.set, self.keys.rebased(version),
                   json.dumps({str(p): o for p, o in offsets.items()}))

    def rebased(self, version: str) -> dict[int, int] | None:
        raw = self._call(self.r.get, self.keys.rebased(version))
        return None if raw is None else {int(p): o for p, o in json.loads(raw).items()}

    # -- plumbing ---------------------------------------------------------------------

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise PublishError(f"redis: {exc}") from exc

    def _execute(self, commands: Commands) -> None:
        try:
            execute(self.r, commands)
        except redis.RedisError as exc:
            raise PublishError(f"redis: {exc}") from exc

    def _pipe_call(self, commands: Any) -> list[Any]:
        try:
            with self.r.pipeline(transaction=False) as p:
                commands(p)
                return p.execute()
        except redis.RedisError as exc:
            raise PublishError(f"redis: {exc}") from exc


def _unpack_histories(reply: list[Any]) -> list[Recent]:
    """``_HISTORIES_LUA``'s reply as (item ids, times in ms) per key, oldest first."""
    counts, members, scores = reply
    try:  # numpy decodes ASCII ids in bulk; anything else one by one
        items = np.array(members, dtype=bytes).astype(str).tolist() if members else []
    except UnicodeDecodeError:
        items = [m.decode() for m in members]
    ts = np.array(scores, dtype=bytes).astype(np.float64).astype(np.int64).tolist() \
        if scores else []
    ends = np.cumsum(counts).tolist()
    return [(items[hi - c:hi], ts[hi - c:hi]) for c, hi in zip(counts, ends, strict=True)]


def _recent(reply: list[tuple[bytes, float]]) -> Recent:
    """A ZRANGE ... WITHSCORES reply (ascending by time) as (item ids, times in ms)."""
    return [m.decode() for m, _ in reply], [int(t) for _, t in reply]
