"""User ID embeddings (and packed user features) in Redis, one namespace per version.

Layout (prefix ``rs``)::

    rs:versions                 hash  version -> JSON meta {state, buckets, dim, ...}
    rs:{release}                string JSON {champion, previous, seq, at}: what serves
    rs:{release}:withdrawn      set   versions rolled back from (the stream avoids them)
    rs:uemb:{V:b}               hash  user id -> float32 ID embedding bytes
    rs:ufeat:{V:b}              hash  user id -> int32 packed feature row bytes
    rs:seen:{user}              zset  item id -> last event time (ms), capped
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import redis

from common.infra.redis_client import RedisClient
from common.infra.settings_groups import RedisSettings
from common.model.freq import stable_hash
from publisher.base import PublishError
from publisher.resp import Commands, arg, args, execute

WRITING, COMPLETE = "writing", "complete"
_TRIM_EVERY = 8
_HSET, _ZADD, _GT, _ZREMRANGEBYRANK = map(arg, (b"HSET", b"ZADD", b"GT", b"ZREMRANGEBYRANK"))
_BUCKETS_REMEMBERED = 2_000_000  # users whose bucket is kept (~200 MB at most)
_MEMBERS_REMEMBERED = 1_000_000  # seen items' encoded ids kept (~100 MB at most)
_TRIM = b"*4\r\n" + _ZREMRANGEBYRANK  # a trim's header and name; its key and range follow
_TABLE_MAX = 1024  # values formatted through a table below this, else each distinct one


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


@dataclass(frozen=True)
class UserRows:
    """Users read back for serving: ``found[i]`` says whether row ``i`` is real."""

    found: np.ndarray  # bool [n]
    vectors: np.ndarray  # float32 [n, dim]
    features: np.ndarray  # int32 [n, feat_width]; zeros (= unknown) where absent


def buckets_of(user_ids: Sequence[str], buckets: int) -> np.ndarray:
    """The bucket of each user id (stable across processes and restarts)."""
    return (stable_hash(user_ids) % np.uint64(buckets)).astype(np.int64)


class UserStore:
    """Reads and writes the per-version user namespaces and the release pointer."""

    def __init__(self, client: RedisClient, rs: RedisSettings) -> None:
        self.r, self.rs, self.keys = client, rs, Layout(rs.prefix)
        self._seen_calls = 0
        self._buckets: tuple[int, dict[str, int]] = (0, {})  # bucket count, user -> bucket
        self._members: dict[str, bytes] = {}  # item id -> its RESP argument

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
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        feats = None if features is None else np.ascontiguousarray(features, dtype=np.int32)
        for commands in self._hset_batches(meta, list(user_ids), vectors, feats):
            self._execute(commands)

    def _hset_batches(self, meta: VersionMeta, ids: list[str], vectors: np.ndarray,
                      feats: np.ndarray | None) -> Iterator[Commands]:
        """One HSET per bucket (and one more of features), rows in the order given;
        sent once the commands hold ``pipeline_fields`` users or more."""
        buckets = self._buckets_of(ids, meta.buckets)
        order = np.argsort(buckets, kind="stable")
        bucket_of = buckets[order]
        starts = np.flatnonzero(np.r_[True, bucket_of[1:] != bucket_of[:-1]])
        rows = np.diff(np.r_[starts, len(order)])
        # A field is two pieces, its head and the user, and its value's piece opens
        # with the field's CRLF: no formatting per user.
        names = list(map(str.encode, ids))
        sizes = np.fromiter(map(len, names), np.int64, len(names))
        fields = (_formatted(sizes, lambda n: b"$%d\r\n" % n)[order], _objects(names)[order])
        hashes = [(self.keys.emb, _values(vectors, b"\r\n")[order])]
        if feats is not None and feats.shape[1]:
            hashes.append((self.keys.feat, _values(feats, b"\r\n")[order]))
        slots = len(hashes) * (1 + 3 * rows)
        pieces = np.empty(int(slots.sum()), object)
        first = np.cumsum(slots) - slots
        for h, (key_of, values) in enumerate(hashes):
            heads = [b"*%d\r\n%b%b" % (2 + 2 * n, _HSET, arg(key_of(meta.version, b).encode()))
                     for b, n in zip(bucket_of[starts].tolist(), rows.tolist(), strict=True)]
            _place(pieces, first + h * (1 + 3 * rows), [_objects(heads)], _ranked(rows),
                   *fields, values)
        layout = _Layout(slots, np.full(len(rows), len(hashes)), len(hashes) * (2 + 2 * rows))
        yield from _batches(pieces, layout, rows, self.rs.pipeline_fields)

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

    def read_with_seen(self, meta: VersionMeta, user_id: str) -> tuple[UserRows, list[str]]:
        """One user's row and seen items, in one round trip (the recall API's read)."""
        return self._read(meta, [user_id], user_id)

    def _read(self, meta: VersionMeta, user_ids: Sequence[str],
              seen_of: str | None) -> tuple[UserRows, list[str]]:
        version = meta.version
        buckets = buckets_of(user_ids, meta.buckets).tolist()

        def commands(p: Any) -> None:
            for u, b in zip(user_ids, buckets, strict=True):
                p.hget(self.keys.emb(version, b), u)
                p.hget(self.keys.feat(version, b), u)
            if seen_of is not None:
                p.zrange(self.keys.seen(seen_of), 0, -1)

        replies = self._pipe_call(commands)
        seen = [m.decode() for m in replies[-1]] if seen_of is not None else []
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

        One ZADD GT per user with all its interactions: a member given twice keeps the
        later time, as separate ZADDs would. The commands are packed with numpy, a few
        C-level passes over the events and the users rather than Python per event."""
        if self.rs.seen_max == 0 or not len(user_ids):
            return
        if not len(user_ids) == len(item_ids) == len(ts_ms):
            raise ValueError("user_ids, item_ids and ts_ms differ in length")
        users = _Groups.of(user_ids)
        members = _objects(self._members_of(item_ids))[users.order]
        scores = _objects(_scores(ts_ms))[users.order]
        self._seen_calls += 1
        for commands in self._zadd_batches(users, scores, members):
            self._execute(commands)

    def _members_of(self, item_ids: Sequence[str]) -> list[bytes]:
        """Each item's RESP argument, remembered (the catalogue recurs step after step)."""
        if len(self._members) > _MEMBERS_REMEMBERED:
            self._members = {}
        known = self._members
        try:
            return list(map(known.__getitem__, item_ids))
        except KeyError:
            new = [i for i in dict.fromkeys(item_ids) if i not in known]
            known.update(zip(new, args(list(map(str.encode, new))), strict=True))
            return list(map(known.__getitem__, item_ids))

    def _zadd_batches(self, users: _Groups, scores: np.ndarray,
                      members: np.ndarray) -> Iterator[Commands]:
        """Each user's ZADD GT of its (score, member) pairs, then its trim if due; sent
        once the commands hold ``2 * pipeline_fields`` arguments or more."""
        encoded = list(map(str.encode, users.keys))
        cap, turn = self.rs.seen_max, self._seen_calls % _TRIM_EVERY
        crc = np.fromiter(map(zlib.crc32, encoded), np.int64, len(encoded))
        trim = (users.counts >= cap) | (crc % _TRIM_EVERY == turn)
        # A command opens with a piece formatted once per (argument count, key size): its
        # header, its name and its key up to the user; the user and the rest follow.
        before, _, after = self.keys.seen("\0").encode().rpartition(b"\0")
        key_size = np.fromiter(map(len, encoded), np.int64, len(encoded)) + len(before + after)
        zadd_args, wide = 3 + 2 * users.counts, int(key_size.max()) + 1
        opens = _formatted(zadd_args * wide + key_size, lambda c: b"*%d\r\n%b$%d\r\n%b" % (
            c // wide, _ZADD, c % wide, before))
        names = _objects(encoded)
        slots = 3 + 2 * users.counts + 3 * trim
        pieces = np.empty(int(slots.sum()), object)
        ends = np.cumsum(slots)
        _place(pieces, ends - slots, [opens, names, after + b"\r\n" + _GT],
               _ranked(users.counts), scores, members)
        trimmed = ends[trim]
        pieces[trimmed - 3] = _formatted(key_size[trim], lambda n: b"%b$%d\r\n%b" % (
            _TRIM, n, before))
        pieces[trimmed - 2] = names[trim]
        pieces[trimmed - 1] = after + b"\r\n" + arg(b"0") + arg(b"%d" % (-cap - 1))
        n_args = zadd_args + 4 * trim
        layout = _Layout(slots, 1 + trim.astype(np.int64), n_args)
        yield from _batches(pieces, layout, n_args, 2 * self.rs.pipeline_fields)

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


@dataclass(frozen=True)
class _Groups:
    """Events grouped by key: the keys in order of first appearance, the event indices
    grouped (in their order within a group) and each group's size."""

    keys: list[str]
    order: np.ndarray  # int [events]
    counts: np.ndarray  # int64 [groups]

    @classmethod
    def of(cls, keys: Sequence[str]) -> _Groups:
        """Group by ``keys``: one dict pass and a stable sort, no Python per event."""
        n = len(keys)
        first = dict(zip(reversed(keys), range(n - 1, -1, -1), strict=True))  # earliest wins
        label = np.fromiter(map(first.__getitem__, keys), np.int64, n)
        order = np.argsort(label, kind="stable")
        grouped = label[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        return cls(list(map(keys.__getitem__, grouped[starts].tolist())), order,
                   np.diff(np.r_[starts, n]))


@dataclass(frozen=True)
class _Layout:
    """Commands laid out in ``pieces`` group after group (a group: a user, a bucket)."""

    slots: np.ndarray  # pieces of each group
    commands: np.ndarray  # commands of each group
    args: np.ndarray  # arguments of each group's commands


def _batches(pieces: np.ndarray, layout: _Layout, weight: np.ndarray,
             limit: int) -> Iterator[Commands]:
    """Whole groups' commands, sent once their ``weight`` reaches ``limit``."""
    ends, commands, n_args, total = (np.r_[0, np.cumsum(a)] for a in (
        layout.slots, layout.commands, layout.args, weight))
    lo, groups = 0, len(weight)
    while lo < groups:
        hi = min(int(np.searchsorted(total, total[lo] + limit)), groups)
        batch = Commands()
        batch.add_packed(int(commands[hi] - commands[lo]), int(n_args[hi] - n_args[lo]),
                         b"".join(pieces[ends[lo]:ends[hi]].tolist()))
        yield batch
        lo = hi


def _ranked(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For items grouped by ``counts``: each item's group and its rank in the group."""
    group = np.repeat(np.arange(len(counts)), counts)
    return group, np.arange(len(group)) - (np.cumsum(counts) - counts)[group]


def _place(pieces: np.ndarray, first: np.ndarray, head: list[bytes | np.ndarray],
           ranked: tuple[np.ndarray, np.ndarray], *per_item: np.ndarray) -> None:
    """Each group's command from slot ``first[g]``: the pieces of ``head`` (each a
    constant or a piece per group), then the pieces of each of its items (``per_item``:
    a piece per item each)."""
    for k, piece in enumerate(head):
        pieces[first + k] = piece
    group, rank = ranked
    at = first[group] + len(head) + len(per_item) * rank
    for k, piece in enumerate(per_item):
        pieces[at + k] = piece


def _formatted(values: np.ndarray, fmt: Callable[[int], bytes]) -> np.ndarray:
    """``fmt`` of each (non-negative) value as objects, formatting each distinct value
    once: through a table while the values are small, else through ``np.unique``."""
    top = int(values.max(initial=0))
    if top < _TABLE_MAX:
        return _objects([fmt(n) for n in range(top + 1)])[values]
    distinct, index = np.unique(values, return_inverse=True)
    return _objects([fmt(n) for n in distinct.tolist()])[index]


def _objects(values: list[bytes]) -> np.ndarray:
    """``values`` as a numpy array of objects (for gathering and placing them)."""
    return np.fromiter(values, object, len(values))


def _scores(ts_ms: Sequence[int]) -> list[bytes]:
    """Each event time as a ZADD score argument; the contract's 13-digit times formatted
    in bulk."""
    times = np.asarray(ts_ms)
    if times.dtype.kind != "i" or times.shape != (len(ts_ms),):
        return [_score(t) for t in ts_ms]
    rows = np.empty((len(times), 20), np.uint8)
    rows[:, :5] = np.frombuffer(b"$13\r\n", np.uint8)
    rest = times
    for place in range(17, 4, -1):  # last digit first
        rest, rows[:, place] = np.divmod(rest, 10)
    rows[:, 5:18] += ord("0")
    rows[:, 18:] = np.frombuffer(b"\r\n", np.uint8)
    scores = rows.view("S20").ravel().tolist()  # no trailing NULs to lose: rows end CRLF
    for k in np.flatnonzero((times < 10**12) | (times >= 10**13)).tolist():
        scores[k] = _score(ts_ms[k])
    return scores


def _score(ts_ms: int) -> bytes:
    """One ZADD score (an event time) as a RESP argument."""
    return arg(b"%d" % ts_ms)


def _values(values: np.ndarray, lead: bytes = b"") -> np.ndarray:
    """Each row's bytes as a RESP argument, after ``lead`` (objects)."""
    width = values.shape[1] * values.itemsize
    rows = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), width)
    head = np.frombuffer(lead + b"$%d\r\n" % rows.shape[1], np.uint8)
    out = np.empty((len(rows), len(head) + rows.shape[1] + 2), np.uint8)
    out[:, :len(head)] = head
    out[:, len(head):-2] = rows
    out[:, -2:] = np.frombuffer(b"\r\n", np.uint8)
    # numpy drops an S item's trailing NULs; these end in CRLF, so none are lost.
    return _objects(out.view(f"S{out.shape[1]}").ravel().tolist())
