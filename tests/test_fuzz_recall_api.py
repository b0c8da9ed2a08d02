"""Fuzzing the recall API's parameters: any query string is either a valid request
(a user id of 1..256 characters, 1 <= k <= max_k) or a 400 whose message says why;
against the running server, nothing is ever a 500.

Case counts come from the Hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from publishing import publish_settings, service_for

from serving.app import MAX_URL_CHARS, BadRequestError, parse_recall, serve_http

DEFAULT_K, MAX_K = 50, 1000
# The targeted tests (one kind of bad parameter each): a quarter of the profile's cases.
FEWER = settings(max_examples=max(settings.default.max_examples // 4, 25))

names = st.sampled_from(["user_id", "k", "K", "user", "user_id ", "", "k[]"]) \
    | st.text(max_size=12)
values = st.text(max_size=300) | st.integers(-2**70, 2**70).map(str) \
    | st.sampled_from(["", " 5", "5 ", "1_000", "0x10", "1e3", "5.0", "+7", "-0", "٣", "∞"])


def _outcome(query: str) -> tuple[str, int] | str:
    """The parsed request, or the 400's message; any other exception fails the test."""
    try:
        user_id, k = parse_recall(query, DEFAULT_K, MAX_K)
    except BadRequestError as exc:
        assert str(exc).strip(), "a 400 says why"
        return str(exc)
    assert isinstance(user_id, str) and 1 <= len(user_id) <= 256
    assert type(k) is int and 1 <= k <= MAX_K
    return user_id, k


@given(st.text(max_size=400))
def test_any_query_text_is_a_request_or_a_400_with_a_message(query: str) -> None:
    _outcome(query)


@given(st.binary(max_size=200))
def test_any_percent_encoded_bytes_are_a_request_or_a_400(raw: bytes) -> None:
    _outcome("user_id=" + quote(raw) + "&k=" + quote(raw[:4]))


@given(st.lists(st.tuples(names, values), max_size=10))
def test_any_parameter_list_is_a_request_or_a_400(params: list[tuple[str, str]]) -> None:
    _outcome(urlencode(params))


@given(st.text(min_size=1, max_size=256), st.integers(1, MAX_K))
def test_a_valid_request_is_read_back_exactly(user_id: str, k: int) -> None:
    assert _outcome(urlencode({"user_id": user_id, "k": k})) == (user_id, k)


@FEWER
@given(st.text(min_size=1, max_size=256))
def test_k_defaults_when_absent(user_id: str) -> None:
    assert _outcome(urlencode({"user_id": user_id})) == (user_id, DEFAULT_K)


@FEWER
@given(st.integers().filter(lambda k: not 1 <= k <= MAX_K))
def test_k_out_of_range_is_a_400(k: int) -> None:
    assert "between 1 and 1000" in str(_outcome(urlencode({"user_id": "u1", "k": k})))


@FEWER
@given(st.text(min_size=257, max_size=600))
def test_an_overlong_user_id_is_a_400(user_id: str) -> None:
    assert "user_id is required" in str(_outcome(urlencode({"user_id": user_id})))


@FEWER
@given(names.filter(lambda n: n not in ("user_id", "k")), values)
def test_an_unknown_parameter_is_a_400(name: str, value: str) -> None:
    result = _outcome(urlencode([("user_id", "u1"), (name, value)]))
    # An empty name with an empty value is no parameter at all ("user_id=u1&=").
    assert isinstance(result, str) or (name, value) == ("", "")


@FEWER
@given(st.sampled_from(["user_id", "k"]), st.lists(st.integers(1, 9).map(str), min_size=2,
                                                     max_size=4))
def test_a_repeated_parameter_is_a_400(name: str, repeats: list[str]) -> None:
    params = [("user_id", "u1"), ("k", "5")]
    params += [(name, v) for v in repeats]
    assert "once" in str(_outcome(urlencode(params)))


def test_more_than_eight_fields_is_a_400() -> None:
    assert "unreadable query string" in str(_outcome("&".join(["a=1"] * 9)))


# -- against the running server (no version released: valid requests are a 503) -----


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis_server: object) -> Iterator[str]:
    settings = publish_settings(Path(tmp_path_factory.mktemp("home")),
                                redis_server.url, "fuzzapi")  # type: ignore[attr-defined]
    with serve_http(service_for(settings), "127.0.0.1", 0) as srv:
        yield f"{srv.server_address[0]}:{srv.server_address[1]}"


def _get(server: str, target: bytes) -> tuple[int, bytes]:
    """One raw request (no client-side URL checks): the status and the body."""
    host, port = server.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("target", [
    b"/recall?k=5",
    b"/recall?user_id=u1&k=1001",
    b"/recall?user_id=u1&k=-1",
    b"/recall?user_id=u1&k=1e3",
    b"/recall?user_id=u1&k=%FF%FE",
    b"/recall?user_id=u1&user_id=u2",
    b"/recall?" + b"&".join([b"a=1"] * 50),
    b"/recall?user_id=" + b"x" * 257,
    b"/recall?;;;&&&===",
    b"/recall?user_id=\xf0\x9f\x92\xa9&k=\xff",
])
def test_bad_parameters_on_the_server_are_a_400_with_a_message(server: str,
                                                              target: bytes) -> None:
    status, body = _get(server, target)
    assert status == 400 and json.loads(body)["error"]


@pytest.mark.parametrize("target", [
    b"/recall?user_id=u1&k=10",
    b"/recall?user_id=%00%FF%C3%28&k=5",  # undecodable bytes read as U+FFFD: an odd id
    b"/recall?user_id=%F0%9F%92%A9",
])
def test_a_valid_request_before_any_release_is_a_503_not_a_500(server: str,
                                                              target: bytes) -> None:
    status, body = _get(server, target)
    assert status == 503 and "no model version" in json.loads(body)["error"]


def test_a_url_over_the_limit_is_a_414(server: str) -> None:
    status, body = _get(server, b"/recall?user_id=" + b"x" * MAX_URL_CHARS)
    assert status == 414 and "longer than" in json.loads(body)["error"]


def test_a_request_line_over_64_kib_is_refused_by_the_http_server(server: str) -> None:
    status, _ = _get(server, b"/recall?user_id=" + b"x" * 70_000)
    assert status == 414
