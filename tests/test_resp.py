"""Packed RESP writes: the bytes redis-py would send, the state redis-py would leave,
and error replies raised (as ``PublishError`` by the user store) on a usable client."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from common.infra.settings import load_settings
from publisher import resp
from publisher.base import PublishError
from publisher.redis_users import Layout, UserStore, buckets_of
from publisher.resp import Commands, execute

_arg = st.binary(max_size=300) | st.text(max_size=40).map(str.encode)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"HSET", b"ZADD", b"ZREMRANGEBYRANK"]),
                          st.lists(_arg, max_size=12)).map(lambda c: [c[0], *c[1]]),
                min_size=1, max_size=8))
def test_packed_bytes_are_what_redis_py_sends(commands: list[list[bytes]]) -> None:
    cmds = Commands()
    for args in commands:
        cmds.add(*args)
    expected = b"".join(bytes(c) for c in redis.Connection().pack_commands(commands))
    assert cmds.packed() == expected
    assert list(cmds.each()) == commands  # what a cluster client gets, command by command


@given(st.lists(_arg, max_size=20))
def test_args_is_arg_of_each(values: list[bytes]) -> None:
    assert resp.args(values) == [resp.arg(v) for v in values]


def _store(redis_url: str, prefix: str, **env: str) -> UserStore:
    s = load_settings({"RECSTREAM_REDIS_URL": redis_url, "RECSTREAM_REDIS_PREFIX": prefix,
                       "RECSTREAM_REDIS_BUCKET_SIZE": "4", **env})
    return UserStore(redis.Redis.from_url(redis_url), s.redis)


def _dump(r: redis.Redis, pattern: str) -> dict[bytes, object]:
    out: dict[bytes, object] = {}
    for key in r.scan_iter(match=pattern, count=1000):
        kind = r.type(key)
        out[key.split(b":", 1)[1]] = (r.hgetall(key) if kind == b"hash"
                                      else r.zrange(key, 0, -1, withscores=True))
    return out


def test_user_writes_and_seen_items_store_what_redis_py_commands_store(
        redis_url: str, prefix: str) -> None:
    """The store's packed writes against the same commands sent one by one by redis-py."""
    rng = np.random.default_rng(1)
    users = [f"u{k}é" for k in range(40)]
    vecs = rng.normal(size=(40, 4)).astype(np.float32)
    feats = rng.integers(0, 9, size=(40, 3)).astype(np.int32)
    seen_users = [users[k] for k in rng.integers(0, 40, 300)]
    seen_items = [f"i{k}" for k in rng.integers(0, 30, 300)]
    # Times on both sides of 12 and 13 digits, and one far outside them.
    seen_ts = rng.integers(999_999_900_000, 1_000_000_100_000, 300).tolist()
    seen_ts[0] = 7
    fast = _store(redis_url, f"{prefix}-fast", RECSTREAM_REDIS_PIPELINE_FIELDS="7")
    meta = fast.begin("v1", 40, 4, 3, 0)
    fast.write("v1", users, vecs, feats)
    fast.add_seen(seen_users, seen_items, seen_ts)

    r, keys = fast.r, Layout(f"{prefix}-plain")
    for u, b, vec, feat in zip(users, buckets_of(users, meta.buckets), vecs, feats,
                               strict=True):
        r.hset(keys.emb("v1", int(b)), u, vec.tobytes())
        r.hset(keys.feat("v1", int(b)), u, feat.tobytes())
    for u, i, t in zip(seen_users, seen_items, seen_ts, strict=True):
        r.zadd(keys.seen(u), {i: t}, lt=True)

    fast_state = {k: v for k, v in _dump(r, f"{prefix}-fast:*").items()
                  if not k.startswith(b"versions")}
    assert fast_state == _dump(r, f"{prefix}-plain:*")


def test_an_error_reply_is_raised_after_the_other_commands_ran(redis_url: str,
                                                               prefix: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.set(f"{prefix}:str", "x")
    cmds = Commands()
    cmds.add(b"ZADD", f"{prefix}:a".encode(), b"1", b"m")
    cmds.add(b"ZADD", f"{prefix}:str".encode(), b"1", b"m")  # WRONGTYPE
    cmds.add(b"ZADD", f"{prefix}:b".encode(), b"2", b"m")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        execute(r, cmds)
    assert r.zscore(f"{prefix}:a", "m") == 1 and r.zscore(f"{prefix}:b", "m") == 2
    assert r.ping()  # the client's pool is still good


def test_the_first_of_several_error_replies_is_raised(redis_url: str, prefix: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.set(f"{prefix}:str", "x")
    cmds = Commands()
    for k in range(5000):
        cmds.add(b"ZADD", f"{prefix}:z".encode(), b"%d" % k, b"m%d" % k)
    cmds.add(b"ZADD", f"{prefix}:str".encode(), b"1", b"m")  # WRONGTYPE
    cmds.add(b"ZADD", f"{prefix}:z".encode(), b"XX", b"NX", b"1", b"m")  # a syntax error
    cmds.add(b"ZADD", f"{prefix}:b".encode(), b"2", b"m")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        execute(r, cmds)
    assert r.zcard(f"{prefix}:z") == 5000 and r.zscore(f"{prefix}:b", "m") == 2
    assert r.ping()


def test_seen_write_to_a_key_of_another_type_is_a_publish_error(redis_url: str,
                                                                 prefix: str) -> None:
    store = _store(redis_url, prefix)
    store.r.set(store.keys.seen("u1"), "not a sorted set")
    with pytest.raises(PublishError, match="WRONGTYPE"):
        store.add_seen(["u1", "u2"], ["i1", "i2"], [10, 20])
    assert store.seen("u2") == ["i2"]


def test_many_commands_in_one_send(redis_url: str, prefix: str) -> None:
    """Far more replies than one socket read holds."""
    r = redis.Redis.from_url(redis_url)
    cmds = Commands()
    for k in range(50_000):
        cmds.add(b"HSET", f"{prefix}:{k % 97}".encode(), b"%d" % k, b"v" * 16)
    execute(r, cmds)
    assert sum(r.hlen(f"{prefix}:{b}") for b in range(97)) == 50_000


class _PipelineOnly:
    """A real Redis reached only through ``pipeline()``, as a cluster client is."""

    def __init__(self, r: redis.Redis) -> None:
        self.pipeline = r.pipeline


def test_clients_other_than_redis_redis_run_the_commands_through_a_pipeline(
        redis_url: str, prefix: str) -> None:
    r = redis.Redis.from_url(redis_url)
    cmds = Commands()
    cmds.add(b"HSET", f"{prefix}:h".encode(), b"f\r\n", b"\x00\r\n\xff")
    cmds.add(b"ZADD", f"{prefix}:z".encode(), b"LT", b"5", b"m", b"3", b"m")
    execute(_PipelineOnly(r), cmds)
    assert r.hgetall(f"{prefix}:h") == {b"f\r\n": b"\x00\r\n\xff"}
    assert r.zscore(f"{prefix}:z", "m") == 3  # LT: the lower of the two
