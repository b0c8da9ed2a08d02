"""A Redis client from the settings: the configured URL, or the home's embedded server.

Password, ACL user and TLS come from ``RedisSettings``; with ``cluster`` set the
Redis Cluster client is used (the published layout keeps each bucket's keys in one
hash slot, so per-bucket commands work on a cluster too).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import RedisCluster

from common.redis_server import home_redis
from common.settings import Settings

RedisClient = redis.Redis | RedisCluster


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
    if rs.tls:
        kwargs["ssl"] = True
        if rs.tls_ca_file:
            kwargs["ssl_ca_certs"] = rs.tls_ca_file
    url = url or redis_url(settings)
    if rs.cluster:
        return RedisCluster.from_url(url, **kwargs)
    return redis.Redis.from_url(url, **kwargs)
