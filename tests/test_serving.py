"""The recall API against a real Redis and real FAISS indexes."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from publishing import exact_answer, publish_settings, released_champion, service_for

from common.data.dataset import Dataset
from common.data.synthetic import SyntheticConfig, generate
from common.infra.settings import Settings
from common.model.registry import Registry
from publisher.base import Delta, Interactions
from publisher.redis_faiss import RedisFaissPublisher
from serving.app import serve_http
from serving.recall import RecallService, wait_until_serving


@dataclass
class Served:
    settings: Settings
    dataset: Dataset
    version: str
    service: RecallService
    base: str  # http://host:port

    def get(self, query: str, path: str = "/recall") -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"{self.base}{path}?{query}", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def world() -> Dataset:
    return generate(SyntheticConfig(n_users=600, n_items=400, n_days=6,
                                    events_per_day=3000)).dataset


@pytest.fixture
def served(tmp_path: Path, redis_url: str, prefix: str, world: Dataset) -> Iterator[Served]:
    settings = publish_settings(tmp_path, redis_url, prefix)
    end = int(world.events.ts_ms.max()) + 1
    version = released_champion(settings, world, end)
    service = service_for(settings)
    wait_until_serving(service, version)
    with serve_http(service, "127.0.0.1", 0) as server:
        host, port = server.server_address[:2]
        yield Served(settings, world, version, service, f"http://{host}:{port}")


def _warm_user(s: Served) -> str:
    bundle, _ = Registry(s.settings.models_dir).load(s.version)
    return bundle.user_vocab.ids[0]


def _items(body: dict) -> list[str]:
    return [it["item_id"] for it in body["items"]]


def test_recall_is_the_exact_top_k_of_the_published_vectors(served: Served) -> None:
    for user in Registry(served.settings.models_dir).load(served.version)[0].user_vocab.ids[:5]:
        seen = set(served.service.users.seen(user))
        status, body = served.get(f"user_id={user}&k=20")
        assert status == 200 and body["version"] == served.version and body["fallback"] is None
        assert _items(body) == exact_answer(served.settings, served.dataset, served.version,
                                            user, 20, seen)


def test_recall_after_a_delta_is_the_exact_top_k_of_the_updated_vectors(
        served: Served) -> None:
    user = _warm_user(served)
    rng = np.random.default_rng(1)
    dim = served.settings.model.embedding_dim
    new_emb = rng.normal(size=(1, dim)).astype(np.float32)
    out_dim = served.settings.model.output_dim
    moved = {"brand-new-item": _unit(rng, out_dim)}
    seen = set(served.service.users.seen(user))
    moved[exact_answer(served.settings, served.dataset, served.version, user, 1, seen)[0]] = \
        _unit(rng, out_dim)
    pub = RedisFaissPublisher.from_settings(served.settings)
    pub.publish_delta(Delta(served.version, [user], new_emb, list(moved),
                            np.stack(list(moved.values()))))
    served.service.refresh()
    status, body = served.get(f"user_id={user}&k=25")
    assert status == 200
    assert _items(body) == exact_answer(served.settings, served.dataset, served.version, user,
                                        25, seen, new_emb[0], moved)


def test_seen_items_are_not_recommended(served: Served) -> None:
    user = _warm_user(served)
    first = _items(served.get(f"user_id={user}&k=5")[1])
    pub = RedisFaissPublisher.from_settings(served.settings)
    pub.users.add_seen([user, user], first[:2], [1, 2])
    again = _items(served.get(f"user_id={user}&k=5")[1])
    assert not set(first[:2]) & set(again) and again[:3] == first[2:5]


def test_unknown_user_gets_popular_items_and_is_told(served: Served) -> None:
    status, body = served.get("user_id=nobody-at-all&k=7")
    assert status == 200 and body["fallback"] == "unknown user" and len(body["items"]) == 7
    assert _items(body) == served.service.current.popular[:7]


@pytest.mark.parametrize("query, message", [
    ("k=5", "user_id is required"),
    ("user_id=u1&k=0", "between 1 and"),
    ("user_id=u1&k=many", "k must be an integer"),
    ("user_id=u1&k=100000", "between 1 and"),
    ("user_id=u1&colour=red", "unknown parameter 'colour'"),
    ("user_id=u1&user_id=u2", "once"),
    (f"user_id={'x' * 300}", "user_id is required"),
])
def test_bad_parameters_get_a_400_with_a_message(served: Served, query: str,
                                                 message: str) -> None:
    status, body = served.get(query)
    assert status == 400 and message in body["error"]


def test_unknown_path_is_a_404(served: Served) -> None:
    status, body = served.get("", path="/nope")
    assert status == 404 and "/recall" in body["error"]


def test_healthz_and_metrics(served: Served) -> None:
    status, body = served.get("", path="/healthz")
    assert status == 200 and body == {"status": "ok", "version": served.version, "redis": True}
    served.get("user_id=nobody&k=3")
    with urllib.request.urlopen(f"{served.base}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'recstream_serving_fallbacks_total{reason="unknown user"} 1.0' in text
    assert f'recstream_serving_model_version_info{{version="{served.version}"}} 1.0' in text


def test_delta_publish_records_seen_items(served: Served) -> None:
    pub = RedisFaissPublisher.from_settings(served.settings)
    dim = served.settings.model.embedding_dim
    pub.publish_delta(Delta(served.version, ["u-new"], np.ones((1, dim), np.float32), [],
                            np.zeros((0, served.settings.model.output_dim), np.float32),
                            seen=Interactions(["u-new"], ["i-x"], [5])))
    assert served.service.users.seen("u-new") == ["i-x"]


def _unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_requests_during_flips_are_all_answered_from_a_whole_version(served: Served) -> None:
    from publishing import control_for

    from batch.jobs import nightly_job

    day = int(served.dataset.events.ts_ms.min()) // 86_400_000 * 86_400_000
    nightly = nightly_job(served.settings, served.dataset, day).version
    control = control_for(served.settings)
    control.publish(nightly, served.dataset)
    user, answers, stop = _warm_user(served), [], threading.Event()

    def ask() -> None:
        while not stop.is_set():
            answers.append(served.get(f"user_id={user}&k=10"))

    askers = [threading.Thread(target=ask) for _ in range(3)]
    for t in askers:
        t.start()
    try:
        for _ in range(5):
            control.promote(nightly, force=True)
            served.service.refresh()
            control.rollback()
            served.service.refresh()
    finally:
        stop.set()
        for t in askers:
            t.join(10)
    assert len(answers) > 10
    assert all(status == 200 and body["fallback"] is None and len(body["items"]) == 10
               and body["version"] in (served.version, nightly) for status, body in answers)
    assert {body["version"] for _, body in answers} == {served.version, nightly}
