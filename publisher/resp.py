"""Many Redis write commands sent at once, for the stream's per-step writes.

redis-py's pipeline builds a command object per command and packs each argument through
several Python calls; at the stream's ~40k commands a step (a ZADD per user) that was
most of the publisher's time. ``Commands`` packs RESP with a few bytes joins and
``execute`` sends it on one pooled connection, then reads every reply in order: the
server receives exactly the bytes redis-py would send for the same commands.

>>> cmds = Commands()
>>> cmds.add(b"HSET", b"k", b"f", b"\\x00\\x01")
>>> cmds.packed()
b'*4\\r\\n$4\\r\\nHSET\\r\\n$1\\r\\nk\\r\\n$1\\r\\nf\\r\\n$2\\r\\n\\x00\\x01\\r\\n'
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import hiredis
import redis

_ATTEMPTS = 2  # a pooled connection the server closed fails once; writes are idempotent


def arg(value: bytes) -> bytes:
    """One argument as a RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


class Commands:
    """Write commands to be sent together, kept as RESP."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.count = 0
        self.args = 0

    def __len__(self) -> int:
        return self.count

    def add(self, *args: bytes) -> None:
        self.add_encoded(len(args), b"".join([arg(a) for a in args]))

    def add_encoded(self, n_args: int, encoded: bytes) -> None:
        """One command whose ``n_args`` arguments are already ``arg``-encoded, joined."""
        self.parts += (b"*%d\r\n" % n_args, encoded)
        self.count += 1
        self.args += n_args

    def packed(self) -> bytes:
        """The commands in RESP, as one buffer."""
        return b"".join(self.parts)

    def each(self) -> Iterator[list[bytes]]:
        """Each command's arguments (decoded back from RESP)."""
        data, pos = memoryview(self.packed()), 0
        while pos < len(data):
            end = bytes(data[pos:pos + 24]).index(b"\r\n") + pos
            n, pos, args = int(bytes(data[pos + 1:end])), end + 2, []
            for _ in range(n):
                end = bytes(data[pos:pos + 24]).index(b"\r\n") + pos
                size, pos = int(bytes(data[pos + 1:end])), end + 2
                args.append(bytes(data[pos:pos + size]))
                pos += size + 2
            yield args


def execute(client: Any, commands: Commands) -> None:
    """Run ``commands``; raises the first error reply (``redis.ResponseError``) or the
    connection's error (``redis.ConnectionError``, ``redis.TimeoutError``).

    A Redis Cluster client routes each command by its key through its own pipeline.
    """
    if not commands:
        return
    if not isinstance(client, redis.Redis):
        with client.pipeline(transaction=False) as p:
            for name, *args in commands.each():
                p.execute_command(name.decode(), *args)  # routing looks names up as str
            p.execute()
        return
    data = commands.packed()
    for attempt in range(_ATTEMPTS):
        try:
            _send(client.connection_pool, data, len(commands))
            return
        except redis.ConnectionError:
            if attempt == _ATTEMPTS - 1:
                raise


def _send(pool: Any, data: bytes, replies: int) -> None:
    conn = pool.get_connection()
    try:
        conn.send_packed_command([data])
        error = _read_replies(conn._sock, replies)  # noqa: SLF001 - see _read_replies
        if error is not None:
            raise error
    except BaseException:
        conn.disconnect()  # replies may be left unread: never reuse this connection
        raise
    finally:
        pool.release(conn)


def _read_replies(sock: socket.socket, replies: int) -> redis.ResponseError | None:
    """Read ``replies`` replies off the connection's socket; the first error reply.

    One hiredis reader for them all: redis-py's ``read_response`` costs ~3 us of
    Python per reply, more than the server spends on a ZADD.
    """
    reader = hiredis.Reader(replyError=redis.ResponseError)
    buffer = bytearray(1 << 16)
    error: redis.ResponseError | None = None
    try:
        while replies:
            reply = reader.gets()
            if reply is False:
                n = sock.recv_into(buffer)
                if not n:
                    raise redis.ConnectionError("Redis closed the connection")
                reader.feed(buffer, 0, n)
                continue
            replies -= 1
            if error is None and isinstance(reply, redis.ResponseError):
                error = reply
    except TimeoutError as exc:  # socket.timeout
        raise redis.TimeoutError(f"timeout reading replies from Redis: {exc}") from exc
    except OSError as exc:
        raise redis.ConnectionError(f"error reading replies from Redis: {exc}") from exc
    return error
