"""Many Redis write commands sent at once, for the stream's per-step writes.

redis-py's pipeline builds a command object per command and packs each argument through
several Python calls; at the stream's ~40k commands a step (a ZADD per user) that was
most of the publisher's time. ``Commands`` packs RESP with a few bytes joins and
``execute`` sends it on one pooled connection, then reads every reply in order: the
server receives exactly the bytes redis-py would send for the same commands. Batches of
HSETs and ZADDs laid out with numpy, rather than a command at a time, come from
``publisher.resp_bulk``.

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
_ARG = b"$%d\r\n%b\r\n"
_INCOMPLETE = object()  # what the hiredis reader gives while no whole reply is buffered
_is_error = redis.ResponseError.__instancecheck__  # isinstance(reply, ResponseError), in C


def arg(value: bytes) -> bytes:
    """One argument as a RESP bulk string."""
    return _ARG % (len(value), value)


def args(values: list[bytes]) -> list[bytes]:
    """``arg`` of each value, without a Python call per value.

    >>> args([b"a", b"bc"])
    [b'$1\\r\\na\\r\\n', b'$2\\r\\nbc\\r\\n']
    """
    return list(map(_ARG.__mod__, zip(map(len, values), values, strict=True)))


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

    def add_packed(self, n_commands: int, n_args: int, packed: bytes) -> None:
        """``n_commands`` commands already in RESP (headers included) with ``n_args``
        arguments in all."""
        self.parts.append(packed)
        self.count += n_commands
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
    Python per reply, more than the server spends on a ZADD. The replies each read
    completes are taken and searched for an error in C, not a Python step per reply.
    """
    reader = hiredis.Reader(replyError=redis.ResponseError, notEnoughData=_INCOMPLETE)
    buffer = bytearray(1 << 16)
    error: redis.ResponseError | None = None
    try:
        while replies > 0:
            n = sock.recv_into(buffer)
            if not n:
                raise redis.ConnectionError("Redis closed the connection")
            reader.feed(buffer, 0, n)
            complete = list(iter(reader.gets, _INCOMPLETE))
            replies -= len(complete)
            if error is None:
                error = next(filter(_is_error, complete), None)
    except TimeoutError as exc:  # socket.timeout
        raise redis.TimeoutError(f"timeout reading replies from Redis: {exc}") from exc
    except OSError as exc:
        raise redis.ConnectionError(f"error reading replies from Redis: {exc}") from exc
    return error
