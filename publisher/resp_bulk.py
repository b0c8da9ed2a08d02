"""Many HSET and ZADD commands packed into RESP at once, with numpy.

The user store writes tens of thousands of hash fields and sorted-set members a step;
formatting each command in Python cost more than Redis spent running it. Here a batch of
commands is laid out as pieces of bytes in one numpy object array, filled by a few
C-level passes over the rows and the groups (a group: a hash bucket, a user), and joined
once per ``Commands`` sent: no Python work per row. The bytes are exactly what redis-py
would send for the same commands (``tests/test_resp.py``).

``hset_rows`` writes rows of bytes into hashes, one HSET per group and hash;
``zadd_lt`` adds (time, member) pairs to a sorted set per group, each followed by a
trim where asked.

>>> [c.packed() for c in hset_rows(["a", "b"], np.array([0, 0]),
...                                [(lambda g: f"h{g}", np.array([[1], [2]], np.int8))], 10)]
[b'*6\\r\\n$4\\r\\nHSET\\r\\n$2\\r\\nh0\\r\\n$1\\r\\na\\r\\n$1\\r\\n\\x01\\r\\n$1\\r\\nb\\r\\n$1\\r\\n\\x02\\r\\n']
>>> users = Groups.of(["u", "u"])
>>> [list(c.each()) for c in zadd_lt(lambda u: f"s:{u}", users, [5, 7], args([b"i", b"j"]),
...                                  np.array([True]), 3, 100)]
[[[b'ZADD', b's:u', b'LT', b'5', b'i', b'7', b'j'], [b'ZREMRANGEBYRANK', b's:u', b'0', b'-4']]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from publisher.resp import Commands, arg, args

_HSET, _ZADD, _LT, _ZREMRANGEBYRANK = map(arg, (b"HSET", b"ZADD", b"LT", b"ZREMRANGEBYRANK"))
_TRIM = b"*4\r\n" + _ZREMRANGEBYRANK  # a trim's header and name; its key and range follow
_TABLE_MAX = 1024  # values formatted through a table below this, else each distinct one


@dataclass(frozen=True)
class Groups:
    """Events grouped by key: the keys (UTF-8) in order of first appearance, the event
    indices grouped (in their order within a group) and each group's size."""

    keys: list[bytes]
    order: np.ndarray  # int [events]
    counts: np.ndarray  # int64 [groups]

    @classmethod
    def of(cls, keys: Sequence[str]) -> Groups:
        """Group by ``keys``: one dict pass and a stable sort, no Python per event."""
        n = len(keys)
        first = dict(zip(reversed(keys), range(n - 1, -1, -1), strict=True))  # earliest wins
        label = np.fromiter(map(first.__getitem__, keys), np.int64, n)
        order = np.argsort(label, kind="stable")
        grouped = label[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        return cls(list(map(str.encode, map(keys.__getitem__, grouped[starts].tolist()))),
                   order, np.diff(np.r_[starts, n]))


class RememberedArgs:
    """Strings' RESP arguments, remembered: the same ids recur step after step, and
    encoding them is most of the cost. Forgets everything past ``limit`` strings."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: dict[str, bytes] = {}

    def __call__(self, values: Sequence[str]) -> list[bytes]:
        if len(self._known) > self.limit:
            self._known = {}
        known = self._known
        try:
            return list(map(known.__getitem__, values))
        except KeyError:
            new = [v for v in dict.fromkeys(values) if v not in known]
            known.update(zip(new, args(list(map(str.encode, new))), strict=True))
            return list(map(known.__getitem__, values))


def hset_rows(fields: Sequence[str], groups: np.ndarray,
              hashes: Sequence[tuple[Callable[[int], str], np.ndarray]],
              max_fields: int) -> Iterator[Commands]:
    """HSETs of row ``i``'s bytes under field ``fields[i]``, into the hash of its group
    ``groups[i]`` (int64 [rows]): for each group, lowest first, one HSET per entry of
    ``hashes`` (the key of a group, a C-contiguous array [rows, ...] whose row ``i`` is
    field ``i``'s value), fields in the order given. A ``Commands`` is yielded once it
    holds ``max_fields`` fields or more (or at the end), and never splits a group."""
    order = np.argsort(groups, kind="stable")
    group_of = groups[order]
    starts = np.flatnonzero(np.r_[True, group_of[1:] != group_of[:-1]])
    rows = np.diff(np.r_[starts, len(order)])
    # A field is two pieces, its head and its name, and its value's piece opens with the
    # field's CRLF: no formatting per field.
    names = list(map(str.encode, fields))
    sizes = np.fromiter(map(len, names), np.int64, len(names))
    field_pieces = (_formatted(sizes, lambda n: b"$%d\r\n" % n)[order], _objects(names)[order])
    slots = len(hashes) * (1 + 3 * rows)
    pieces = np.empty(int(slots.sum()), object)
    first = np.cumsum(slots) - slots
    for h, (key_of, values) in enumerate(hashes):
        heads = [b"*%d\r\n%b%b" % (2 + 2 * n, _HSET, arg(key_of(g).encode()))
                 for g, n in zip(group_of[starts].tolist(), rows.tolist(), strict=True)]
        _place(pieces, first + h * (1 + 3 * rows), [_objects(heads)], _ranked(rows),
               *field_pieces, _values(values, b"\r\n")[order])
    layout = _Layout(slots, np.full(len(rows), len(hashes)), len(hashes) * (2 + 2 * rows))
    yield from _batches(pieces, layout, rows, max_fields)


def zadd_lt(key_of: Callable[[str], str], users: Groups, ts_ms: Sequence[int],
            members: Sequence[bytes], trim: np.ndarray, keep: int,
            max_args: int) -> Iterator[Commands]:
    """Per group of ``users``, one ``ZADD key_of(user) LT`` of its events' (time,
    member) pairs in their order (``members``: each event's member as an ``arg``), then
    ``ZREMRANGEBYRANK key 0 -(keep + 1)`` where ``trim`` (bool [groups]) says so. A
    ``Commands`` is yielded once it holds ``max_args`` arguments or more (or at the
    end), and never splits a group.

    ``key_of`` must put the user in one place of a fixed text (``prefix + user +
    suffix``): a command opens with a piece formatted once per (argument count, key
    size), its header, its name and its key up to the user; the user and the rest follow.
    """
    before, _, after = key_of("\0").encode().rpartition(b"\0")
    key_size = (np.fromiter(map(len, users.keys), np.int64, len(users.keys))
                + len(before + after))
    zadd_args, wide = 3 + 2 * users.counts, int(key_size.max()) + 1
    opens = _formatted(zadd_args * wide + key_size, lambda c: b"*%d\r\n%b$%d\r\n%b" % (
        c // wide, _ZADD, c % wide, before))
    names = _objects(users.keys)
    slots = 3 + 2 * users.counts + 3 * trim
    pieces = np.empty(int(slots.sum()), object)
    ends = np.cumsum(slots)
    _place(pieces, ends - slots, [opens, names, after + b"\r\n" + _LT],
           _ranked(users.counts), _objects(_scores(ts_ms))[users.order],
           _objects(members)[users.order])
    trimmed = ends[trim]
    pieces[trimmed - 3] = _formatted(key_size[trim], lambda n: b"%b$%d\r\n%b" % (
        _TRIM, n, before))
    pieces[trimmed - 2] = names[trim]
    pieces[trimmed - 1] = after + b"\r\n" + arg(b"0") + arg(b"%d" % (-keep - 1))
    n_args = zadd_args + 4 * trim
    layout = _Layout(slots, 1 + trim.astype(np.int64), n_args)
    yield from _batches(pieces, layout, n_args, max_args)


@dataclass(frozen=True)
class _Layout:
    """Commands laid out in ``pieces`` group after group."""

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


def _objects(values: Sequence[bytes]) -> np.ndarray:
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
