"""A Redis client from the settings: the configured URL, or the home's embedded server.

Password, ACL user and TLS come from ``RedisSettings``; with ``cluster`` set the
Redis Cluster client is used (the published layout keeps each bucket's keys in one
hash slot, so per-bucket commands work on a cluster too).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import RedisCluster

from common.infra.redis_server import home_redis
from common.infra.settings import Settings

RedisClient = redis.Redis | RedisCluster


def redacted(url: str) -> str:
    """``url`` without its credentials, for printing.

    >>> redacted("redis://user:secret@cache:6379/0")
    'redis://***@cache:6379/0'
    """
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


def redis_url(settings: Settings) -> str:
    """The configured Redis URL, else the home's embedded server (started if needed)."""
    if settings.redis.url:
        return settings.redis.url
    return home_redis(settings.run_dir).ensure().url


def connect(settings: Settings, url: str | None = None) -> RedisClient:
    """A client for ``url`` (default: ``redis_url``) with the settings' credentials."""
    rs = settings.redis
    kwargs: dict[str, Any] = {"socket_timeout": rs.socket_timeout_s,
                              "socket_connect_timeout": rs.socket_timeout_s}
    if rs.username:
        kwargs["username"] = rs.username
    if rs.password.get_secret_value():
        kwargs["password"] = rs.password.get_secret_value()
    url = url or redis_url(settings)
    if rs.tls:
        # TLS is the URL scheme's business: redis-py hands an ``ssl`` argument of
        # from_url to the connection class, which does not take it.
        if url.startswith("redis://"):
            url = "rediss://" + url[len("redis://"):]
        if rs.tls_ca_file:
            kwargs["ssl_ca_certs"] = rs.tls_ca_file
    if rs.cluster:
        return RedisCluster.from_url(url, **kwargs)
    return redis.Redis.from_url(url, **kwargs)
