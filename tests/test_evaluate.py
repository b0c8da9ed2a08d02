"""Temporal split, offline evaluation of a scorer, and prequential test-then-train replay."""

from collections.abc import Sequence

import numpy as np
import pytest
from factories import events_from_rows as _events

from common.data.events import DAY_MS, Events
from common.evaluation.baselines import PopularityScorer
from common.evaluation.offline import evaluate_scorer, temporal_split
from common.evaluation.prequential import prequential, prequential_arms

CATALOG = np.array(["a", "b", "c", "d", "e"], dtype=object)


class FixedScorer:
    """The same per-item scores for every user."""

    def __init__(self, scores: Sequence[float]) -> None:
        self.scores = np.asarray(scores, dtype=np.float32)

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        return np.tile(self.scores, (len(user_ids), 1))


class MemoryModel:
    """Scores 1 for every item it has learned for the user: it knows only what `learn` told it."""

    def __init__(self, catalog: np.ndarray) -> None:
        self.col = {str(c): j for j, c in enumerate(catalog)}
        self.known: dict[str, set[int]] = {}
        self.calls: list[tuple[str, list[str]]] = []

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        self.calls.append(("score", list(user_ids)))
        out = np.zeros((len(user_ids), len(self.col)), dtype=np.float32)
        for r, u in enumerate(user_ids):
            out[r, list(self.known.get(u, ()))] = 1.0
        return out

    def learn(self, events: Events) -> None:
        self.calls.append(("learn", events.event_id.tolist()))
        for u, i in zip(events.user_id, events.item_id, strict=True):
            if i in self.col:
                self.known.setdefault(u, set()).add(self.col[i])


class FixedScorerModel(FixedScorer):
    """A fixed scorer that learns nothing."""

    def learn(self, events: Events) -> None:
        pass


class LastItemModel:
    """Recommends the item most recently learned from anyone (scores by recency)."""

    def __init__(self, catalog: np.ndarray) -> None:
        self.col = {str(c): j for j, c in enumerate(catalog)}
        self.recency = np.zeros(len(catalog), dtype=np.float32)
        self.learned: list[list[int]] = []

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        return np.tile(self.recency, (len(user_ids), 1))

    def learn(self, events: Events) -> None:
        self.learned.append(events.ts_ms.tolist())
        for i, ts in zip(events.item_id, events.ts_ms, strict=True):
            self.recency[self.col[i]] = 1 + ts



def test_temporal_split_boundaries() -> None:
    cutoff = 10 * DAY_MS
    ev = _events([("u", "a", cutoff - 1), ("u", "b", cutoff), ("u", "c", cutoff + 2 * DAY_MS - 1),
                  ("u", "d", cutoff + 2 * DAY_MS)])
    train, test = temporal_split(ev, cutoff, test_days=2)
    assert train.item_id.tolist() == ["a"]
    assert test.item_id.tolist() == ["b", "c"]


def test_temporal_split_rejects_empty_test_window() -> None:
    with pytest.raises(ValueError, match="test_days"):
        temporal_split(_events([("u", "a", 0)]), 1, test_days=0)


def test_perfect_scorer_gets_full_marks() -> None:
    train = _events([("u1", "a", 0)])
    test = _events([("u1", "c", 10), ("u2", "c", 11)])
    m = evaluate_scorer(FixedScorer([0, 0, 1, 0, 0]), CATALOG, train, test, ks=(1, 3))
    assert m["recall@1"] == m["ndcg@3"] == m["hitrate@1"] == m["auc"] == 1.0
    assert m["n_users"] == 2
    assert list(m)[:7] == ["recall@1", "recall@3", "ndcg@1", "ndcg@3", "hitrate@1",
                           "hitrate@3", "auc"]


def test_training_interactions_are_excluded_from_the_ranking() -> None:
    # a is the scorer's favourite but u1 rated it (badly) in training: b moves up to first.
    train = _events([("u1", "a", 0, 1.0)])
    test = _events([("u1", "b", 10)])
    m = evaluate_scorer(FixedScorer([5, 4, 3, 2, 1]), CATALOG, train, test, ks=(1,))
    assert m["recall@1"] == 1.0 and m["auc"] == 1.0


def test_relevant_items_outside_the_catalogue_are_dropped_and_counted() -> None:
    test = _events([("u1", "zzz", 10), ("u1", "b", 11), ("u2", "yyy", 12)])
    m = evaluate_scorer(FixedScorer([0, 1, 0, 0, 0]), CATALOG, Events.empty(), test, ks=(1,))
    assert m["n_relevant_dropped"] == 2
    assert m["n_users"] == 1 and m["recall@1"] == 1.0


def test_relevant_items_seen_in_training_are_not_counted() -> None:
    train = _events([("u1", "a", 0)])
    test = _events([("u1", "a", 10), ("u1", "b", 11), ("u2", "b", 12)])
    m = evaluate_scorer(FixedScorer([0, 1, 0, 0, 0]), CATALOG, train, test, ks=(1,))
    assert m["n_relevant_seen"] == 1
    assert m["recall@1"] == 1.0  # u1's only countable item is b
    assert m["n_users"] == 2


def test_test_ratings_below_threshold_are_not_relevant() -> None:
    test = _events([("u1", "a", 10, 2.0), ("u1", "b", 11, 4.0)])
    m = evaluate_scorer(FixedScorer([1, 0, 0, 0, 0]), CATALOG, Events.empty(), test, ks=(1,))
    assert m["recall@1"] == 0.0 and m["n_users"] == 1


def test_warm_evaluates_only_users_with_training_events() -> None:
    train = _events([("u1", "a", 0, 2.0)])
    test = _events([("u1", "b", 10), ("u2", "c", 11)])
    scorer = FixedScorer([0, 1, 0, 0, 0])
    all_users = evaluate_scorer(scorer, CATALOG, train, test, ks=(1,), users="all")
    warm = evaluate_scorer(scorer, CATALOG, train, test, ks=(1,), users="warm")
    assert (all_users["n_users"], all_users["recall@1"]) == (2, 0.5)
    assert (warm["n_users"], warm["recall@1"]) == (1, 1.0)


def test_batching_does_not_change_the_result() -> None:
    rng = np.random.default_rng(0)
    rows = [(f"u{rng.integers(20)}", CATALOG[rng.integers(5)], t) for t in range(200)]
    train, test = temporal_split(_events(rows), 120, test_days=1)
    scorer = PopularityScorer(train, CATALOG)
    one = evaluate_scorer(scorer, CATALOG, train, test, batch_users=1)
    many = evaluate_scorer(scorer, CATALOG, train, test, batch_users=256)
    assert one == pytest.approx(many, nan_ok=True)


def test_scorer_with_wrong_shape_is_rejected() -> None:
    test = _events([("u1", "a", 10)])
    with pytest.raises(ValueError, match="expected"):
        evaluate_scorer(FixedScorer([1, 0]), CATALOG, Events.empty(), test)


def test_prequential_scores_a_chunk_before_learning_it() -> None:
    # Had the model learned the chunk first, it would know every clicked item: all hits.
    # Nobody clicks a, the item an all-zero score puts first.
    ev = _events([("u1", "b", 0), ("u1", "c", 1), ("u2", "d", 2), ("u2", "e", 3)])
    for chunk in (1, 2, 4):
        result = prequential(MemoryModel(CATALOG), CATALOG, ev, k=1, chunk_events=chunk)
        assert result.hit.tolist() == [False] * 4


def test_prequential_calls_score_then_learn_per_chunk() -> None:
    ev = _events([("u1", "a", 0), ("u2", "b", 1), ("u1", "c", 2)])
    model = MemoryModel(CATALOG)
    prequential(model, CATALOG, ev, k=1, chunk_events=2)
    assert model.calls == [("score", ["u1", "u2"]), ("learn", ["e0", "e1"]),
                           ("score", ["u1"]), ("learn", ["e2"])]


def test_prequential_learning_pays_off_in_later_chunks() -> None:
    # u2 clicks what u1 just clicked: a model updated per event catches it.
    ev = _events([("u1", "c", 0), ("u2", "c", 1), ("u1", "e", 2), ("u2", "e", 3)])
    result = prequential(LastItemModel(CATALOG), CATALOG, ev, k=1, chunk_events=1)
    assert result.hit.tolist() == [False, True, False, True]
    assert result.recall == 0.5


def test_chunk_ms_cuts_aligned_time_windows() -> None:
    ev = _events([("u", "a", 100), ("u", "b", 999), ("u", "c", 1000), ("u", "d", 2500)])
    model = LastItemModel(CATALOG)
    prequential(model, CATALOG, ev, chunk_events=None, chunk_ms=1000)
    assert model.learned == [[100, 999], [1000], [2500]]


def test_chunk_events_splits_a_time_window() -> None:
    ev = _events([("u", i, t) for i, t in zip("abcde", [0, 1, 2, 3, 5000], strict=True)])
    model = LastItemModel(CATALOG)
    prequential(model, CATALOG, ev, chunk_events=3, chunk_ms=1000)
    assert model.learned == [[0, 1, 2], [3], [5000]]


def test_larger_chunks_delay_learning() -> None:
    ev = _events([("u1", "c", 0), ("u2", "c", 400), ("u1", "e", 1200), ("u2", "e", 1500)])
    fresh = prequential(LastItemModel(CATALOG), CATALOG, ev, k=1, chunk_events=None,
                        chunk_ms=100)
    stale = prequential(LastItemModel(CATALOG), CATALOG, ev, k=1, chunk_events=None,
                        chunk_ms=DAY_MS)
    assert fresh.recall == 0.5 and stale.recall == 0.0


def test_prequential_excludes_items_seen_before_each_event() -> None:
    # LastItemModel ranks a first, but u1 saw a (seeded) and b (earlier in the same chunk).
    seen = _events([("u1", "a", -5)])
    ev = _events([("u1", "b", 0), ("u1", "c", 1)])
    filtered = prequential(FixedScorerModel([5, 4, 3, 2, 1]), CATALOG, ev, k=1,
                           chunk_events=10, seen=seen)
    unfiltered = prequential(FixedScorerModel([5, 4, 3, 2, 1]), CATALOG, ev, k=1,
                             chunk_events=10, seen=seen, exclude_seen=False)
    assert filtered.hit.tolist() == [True, True]
    assert unfiltered.hit.tolist() == [False, False]


def test_prequential_skips_repeats_and_unknown_items_but_learns_them() -> None:
    ev = _events([("u1", "a", 0), ("u1", "a", 1), ("u1", "zzz", 2), ("u1", "b", 3, 1.0)])
    model = MemoryModel(CATALOG)
    result = prequential(model, CATALOG, ev, k=1, chunk_events=1)
    assert len(result.hit) == 1
    assert (result.n_skipped_seen, result.n_skipped_uncatalogued) == (1, 1)
    assert [c for c in model.calls if c[0] == "learn"][-1] == ("learn", ["e3"])


def test_prequential_breakdowns_by_day_and_user() -> None:
    ev = _events([("u1", "c", 0), ("u2", "c", 1), ("u1", "e", DAY_MS), ("u2", "e", DAY_MS + 1),
                  ("u3", "d", DAY_MS + 2)])
    result = prequential(LastItemModel(CATALOG), CATALOG, ev, k=1, chunk_events=1)
    assert [(d.key, d.n_events, d.hits) for d in result.per_day()] == [(0, 2, 1), (1, 3, 1)]
    assert [(u.key, u.recall) for u in result.per_user(["u2", "u3"])] == [("u2", 1.0),
                                                                         ("u3", 0.0)]
    assert result.restrict(["u2"]).recall == 1.0


def test_prequential_needs_a_chunking_rule() -> None:
    with pytest.raises(ValueError, match="chunk"):
        prequential(LastItemModel(CATALOG), CATALOG, Events.empty(), chunk_events=None)


def test_arms_share_the_queries_and_learn_once_per_chunk() -> None:
    rng = np.random.default_rng(1)
    ev = _events([(f"u{rng.integers(6)}", CATALOG[rng.integers(5)], t) for t in range(60)])
    chunks: list[int] = []
    arms = {"fixed": FixedScorerModel([5, 4, 3, 2, 1]), "last": LastItemModel(CATALOG)}

    def learn(chunk: Events) -> None:
        chunks.append(len(chunk))
        arms["last"].learn(chunk)

    both = prequential_arms(arms, learn, CATALOG, ev, ks=(1, 3), chunk_events=7)
    assert chunks == [7] * 8 + [4]
    alone = {"fixed": prequential(FixedScorerModel([5, 4, 3, 2, 1]), CATALOG, ev, k=3,
                                  chunk_events=7),
             "last": prequential(LastItemModel(CATALOG), CATALOG, ev, k=3, chunk_events=7)}
    for arm, result in alone.items():
        assert both[arm][3].hit.tolist() == result.hit.tolist()
        assert both[arm][1].hit.sum() <= both[arm][3].hit.sum()
    assert both["fixed"][3].hit.tolist() != both["last"][3].hit.tolist()
