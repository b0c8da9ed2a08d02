"""The Redis user store against a real Redis: versions, users, seen items, the release."""

from __future__ import annotations

import numpy as np
import pytest

from common.infra.redis_client import connect
from common.infra.settings import Settings, load_settings
from publisher.base import PublishError
from publisher.redis_users import COMPLETE, WRITING, UserStore, VersionStateError


def _settings(redis_url: str, prefix: str, **redis: str) -> Settings:
    env = {"RECSTREAM_REDIS_URL": redis_url, "RECSTREAM_REDIS_PREFIX": prefix,
           "RECSTREAM_REDIS_BUCKET_SIZE": "8", "RECSTREAM_REDIS_PIPELINE_FIELDS": "16"}
    env.update({f"RECSTREAM_REDIS_{k.upper()}": v for k, v in redis.items()})
    return load_settings(env)


@pytest.fixture
def store(redis_url: str, prefix: str) -> UserStore:
    s = _settings(redis_url, prefix)
    return UserStore(connect(s), s.redis)


def _users(n: int, dim: int = 4, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return ([f"u{i}" for i in range(n)], rng.normal(size=(n, dim)).astype(np.float32),
            rng.integers(0, 9, size=(n, 3)).astype(np.int32))


def test_full_write_reads_back_every_user_bit_exact(store: UserStore) -> None:
    ids, vecs, feats = _users(100)
    store.begin("v000001", len(ids), 4, 3, cutoff_ms=5)
    store.write("v000001", ids, vecs, feats)
    assert store.complete("v000001").state == COMPLETE
    rows = store.read("v000001", ids + ["stranger"])
    assert rows.found.tolist() == [True] * 100 + [False]
    assert np.array_equal(rows.vectors[:100], vecs) and np.array_equal(rows.features[:100], feats)
    assert not rows.vectors[100].any() and not rows.features[100].any()


def test_delta_overwrites_only_its_users(store: UserStore) -> None:
    ids, vecs, _ = _users(20)
    store.begin("v000001", 20, 4, 0, 0)
    store.write("v000001", ids, vecs)
    store.write("v000001", ids[:2], vecs[:2] + 1)
    rows = store.read("v000001", ids)
    assert np.array_equal(rows.vectors[:2], vecs[:2] + 1)
    assert np.array_equal(rows.vectors[2:], vecs[2:])


def test_a_version_is_writing_until_completed_and_cannot_be_released_before(
        store: UserStore) -> None:
    store.begin("v000001", 5, 4, 0, 0)
    assert store.meta("v000001").state == WRITING
    with pytest.raises(VersionStateError, match="not completely published"):
        store.flip(0, "v000001", None, {})


def test_a_complete_version_is_not_rewritten(store: UserStore) -> None:
    store.begin("v000001", 5, 4, 0, 0)
    store.complete("v000001")
    with pytest.raises(VersionStateError, match="already published"):
        store.begin("v000001", 5, 4, 0, 0)


def test_drop_removes_every_key_of_a_version(store: UserStore) -> None:
    ids, vecs, feats = _users(50)
    store.begin("v000001", 50, 4, 3, 0)
    store.write("v000001", ids, vecs, feats)
    store.mark_rebased("v000001", {0: 1})
    store.drop("v000001")
    assert store.meta("v000001") is None
    assert store.r.keys(f"{store.keys.prefix}:*v000001*") == []


def test_flip_is_compare_and_set_and_announced(store: UserStore) -> None:
    store.begin("v000001", 1, 4, 0, 0)
    store.complete("v000001")
    pubsub = store.r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(store.keys.channel)
    pubsub.get_message(timeout=1)
    release = store.flip(0, "v000001", None, {"type": "promote"})
    assert (release.champion, release.seq) == ("v000001", 1)
    assert store.release() == release
    message = pubsub.get_message(timeout=5)
    assert message is not None and b'"promote"' in message["data"]
    with pytest.raises(VersionStateError, match="release changed"):
        store.flip(0, "v000001", None, {})  # a second operator working from seq 0


def test_seen_keeps_the_latest_items_and_is_idempotent(redis_url: str, prefix: str) -> None:
    s = _settings(redis_url, prefix, seen_max="3")
    store = UserStore(connect(s), s.redis)
    items = [f"i{k}" for k in range(5)]
    for _ in range(2):
        store.add_seen(["u"] * 5, items, [10, 20, 30, 40, 50])
    assert sorted(store.seen("u")) == ["i2", "i3", "i4"]


_T13, _T12 = 1_700_000_000_000, 999_999_999_000  # times of 13 and of 12 digits
# crc32 % _TRIM_EVERY of the users: ua 2, u2 4 (trimmed on the 4th call), uc 6 (never here).
_SEEN_CALL_1 = [("ua", "i1", 100), ("u2", "j1", _T13 + 10), ("ua", "i2", 200),
                ("uc", "k1", _T12 + 1), ("ua", "i3", 400), ("ua", "i1", 150),
                ("u2", "j2", _T13 + 20), ("ua", "i3", 50), ("ua", "i4", 120),
                ("uc", "k2", _T12 + 2)]


def _add_seen(store: UserStore, triples: list[tuple[str, str, int]]) -> None:
    users, items, ts = (list(column) for column in zip(*triples, strict=True))
    store.add_seen(users, items, ts)


def _seen_state(store: UserStore, *users: str) -> dict[str, list[tuple[str, float]]]:
    return {u: [(m.decode(), s) for m, s in
                store.r.zrange(store.keys.seen(u), 0, -1, withscores=True)] for u in users}


def test_seen_contents_exactly(redis_url: str, prefix: str) -> None:
    """A member given twice keeps its first time; a call bringing seen_max or
    more trims at once, else a user is trimmed on its turn (one call in 8); re-publishing
    a delta changes nothing."""
    s = _settings(redis_url, prefix, seen_max="3", pipeline_fields="3")
    store = UserStore(connect(s), s.redis)
    _add_seen(store, _SEEN_CALL_1)
    _add_seen(store, [("u2", "j3", _T13 + 30), ("u2", "j1", _T13 + 5)])
    _add_seen(store, [("u2", "j4", _T13 + 40), ("uc", "k3", _T12 + 3), ("uc", "k4", _T12 + 4)])
    assert _seen_state(store, "u2")["u2"] == [("j1", _T13 + 5), ("j2", _T13 + 20),
                                              ("j3", _T13 + 30), ("j4", _T13 + 40)]
    for _ in range(2):  # the 4th call is u2's turn; the 5th re-publishes it
        _add_seen(store, [("u2", "j5", _T13 + 50)])
    assert _seen_state(store, "ua", "u2", "uc") == {
        "ua": [("i1", 100), ("i4", 120), ("i2", 200)],
        "u2": [("j3", _T13 + 30), ("j4", _T13 + 40), ("j5", _T13 + 50)],
        "uc": [("k1", _T12 + 1), ("k2", _T12 + 2), ("k3", _T12 + 3), ("k4", _T12 + 4)]}


def test_histories_are_each_users_last_positives_by_time_in_one_round_trip(
        store: UserStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Oldest first, the last ``max_len`` by event time (not by arrival), a re-seen item
    at its first time, 13-digit times exact; one pipeline for the whole batch."""
    _add_seen(store, [("ua", "i3", _T13 + 30), ("ua", "i1", _T13 + 10), ("ua", "i4", _T13 + 40),
                      ("ua", "i2", _T13 + 20), ("ub", "j1", 7), ("ua", "i1", _T13 + 50)])
    pipelines = []
    real = store._pipe_call
    monkeypatch.setattr(store, "_pipe_call", lambda c: pipelines.append(c) or real(c))
    assert store.histories(["ua", "nobody", "ub"], 3) == [
        (["i2", "i3", "i4"], [_T13 + 20, _T13 + 30, _T13 + 40]), ([], []), (["j1"], [7])]
    assert len(pipelines) == 1
    assert store.histories(["ua"], 10)[0][0] == ["i1", "i2", "i3", "i4"]
    assert store.histories(["ua"], 0) == [([], [])] and store.histories([], 5) == []
    # Bounded: the last two strictly before a time, oldest first (a replayed step's read).
    assert store.histories(["ua", "ub"], 2, before_ms=_T13 + 40) == [
        (["i2", "i3"], [_T13 + 20, _T13 + 30]), (["j1"], [7])]


def test_the_recall_read_returns_the_seen_items_with_their_times(store: UserStore) -> None:
    ids, vecs, feats = _users(3)
    meta = store.begin("v000001", 3, 4, 3, 0)
    store.write("v000001", ids, vecs, feats)
    _add_seen(store, [("u1", "b", _T13 + 2), ("u1", "a", _T13 + 1)])
    rows, recent = store.read_with_seen(meta, "u1")
    assert rows.found.tolist() == [True] and np.array_equal(rows.vectors[0], vecs[1])
    assert recent == (["a", "b"], [_T13 + 1, _T13 + 2])
    assert store.read_with_seen(meta, "u1", times=False)[1] == (["a", "b"], [])
    assert store.read_with_seen(meta, "stranger")[1] == ([], [])


def test_seen_commands_and_their_pipeline_chunks(redis_url: str, prefix: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One ZADD LT per user in order of first appearance, its trim right after it, and a
    send once the commands hold 2 * pipeline_fields arguments or more."""
    s = _settings(redis_url, prefix, seen_max="3", pipeline_fields="4")
    store = UserStore(connect(s), s.redis)
    sent: list[list[list[bytes]]] = []
    monkeypatch.setattr(store, "_execute", lambda c: sent.append(list(c.each())) if c else None)
    _add_seen(store, _SEEN_CALL_1)
    key = {u: store.keys.seen(u).encode() for u in ("ua", "u2", "uc")}
    assert sent == [
        [[b"ZADD", key["ua"], b"LT", b"100", b"i1", b"200", b"i2", b"400", b"i3", b"150",
          b"i1", b"50", b"i3", b"120", b"i4"], [b"ZREMRANGEBYRANK", key["ua"], b"0", b"-4"]],
        [[b"ZADD", key["u2"], b"LT", b"%d" % (_T13 + 10), b"j1", b"%d" % (_T13 + 20), b"j2"],
         [b"ZADD", key["uc"], b"LT", b"%d" % (_T12 + 1), b"k1", b"%d" % (_T12 + 2), b"k2"]]]


def test_wrong_width_is_refused(store: UserStore) -> None:
    store.begin("v000001", 1, 4, 0, 0)
    with pytest.raises(PublishError, match="width"):
        store.write("v000001", ["u"], np.zeros((1, 5), np.float32))


def test_unreachable_redis_raises_publish_error(prefix: str) -> None:
    from common.infra.launcher import free_port

    s = _settings(f"redis://127.0.0.1:{free_port()}/0", prefix, socket_timeout_s="0.5")
    with pytest.raises(PublishError, match="redis"):
        UserStore(connect(s), s.redis).versions()
