"""Baseline scorers on data small enough that the right answer is obvious."""

import numpy as np
from factories import events_from_rows as _events

from common.data.events import DAY_MS
from common.evaluation.baselines import ItemKNNScorer, PopularityScorer, RecentPopularityScorer
from common.evaluation.metrics import top_k

CATALOG = np.array(["a", "b", "c", "d", "e"], dtype=object)


def _ranking(scores: np.ndarray) -> list[str]:
    return CATALOG[top_k(scores, len(CATALOG))[0]].tolist()



def test_popularity_counts_positive_events_only() -> None:
    train = _events([("u1", "b", 0), ("u2", "b", 1), ("u1", "c", 2, 5.0),
                     ("u2", "d", 3, 2.0), ("u3", "d", 4, 3.0)])
    scores = PopularityScorer(train, CATALOG, rating_threshold=4.0).score(["x", "y"])
    assert scores.dtype == np.float32 and scores.shape == (2, 5)
    assert scores[0].tolist() == [0.0, 2.0, 1.0, 0.0, 0.0]
    assert (scores[0] == scores[1]).all()


def test_popularity_threshold_is_a_parameter() -> None:
    train = _events([("u1", "d", 0, 3.0)])
    assert PopularityScorer(train, CATALOG, rating_threshold=3.0).score(["u"])[0, 3] == 1.0


def test_popularity_ignores_items_outside_the_catalogue() -> None:
    train = _events([("u1", "zzz", 0), ("u1", "a", 1)])
    assert PopularityScorer(train, CATALOG).score(["u"])[0].tolist() == [1, 0, 0, 0, 0]


def test_recent_popularity_counts_only_the_window_before_the_cutoff() -> None:
    old = [("u1", "a", 0), ("u2", "a", 1), ("u3", "a", 2)]
    recent = [("u1", "c", 40 * DAY_MS), ("u2", "c", 40 * DAY_MS + 1)]
    scorer = RecentPopularityScorer(_events(old + recent), CATALOG, window_days=30)
    assert scorer.counts.tolist() == [0, 0, 2, 0, 0]
    assert _ranking(scorer.score(["u"]))[0] == "c"


def test_recent_popularity_breaks_ties_by_all_time_popularity() -> None:
    train = _events([("u1", "d", 0), ("u2", "d", 1), ("u1", "b", 2), ("u1", "e", 50 * DAY_MS)])
    ranking = _ranking(RecentPopularityScorer(train, CATALOG, window_days=7).score(["u"]))
    assert ranking == ["e", "d", "b", "a", "c"]


def test_recent_popularity_window_ends_at_an_explicit_cutoff() -> None:
    train = _events([("u1", "a", 0), ("u1", "b", 10 * DAY_MS)])
    scorer = RecentPopularityScorer(train, CATALOG, window_days=5, cutoff_ms=4 * DAY_MS)
    assert scorer.counts.tolist() == [1, 0, 0, 0, 0]


def test_item_knn_recommends_co_occurring_items() -> None:
    train = _events([("u1", "a", 0), ("u1", "b", 1), ("u2", "a", 2), ("u2", "b", 3),
                     ("u3", "c", 4), ("u4", "c", 5), ("u5", "c", 6), ("u6", "a", 7)])
    ranking = _ranking(ItemKNNScorer(train, CATALOG).score(["u6"]))
    assert ranking[0] == "b"


def test_item_knn_uses_cosine_not_raw_co_occurrence() -> None:
    # b and c each co-occur with a twice, but c is everywhere: its cosine is lower.
    rows = [("u1", "a", 0), ("u1", "b", 1), ("u1", "c", 2), ("u2", "a", 3), ("u2", "b", 4),
            ("u2", "c", 5)] + [(f"v{n}", "c", 10 + n) for n in range(8)] + [("me", "a", 30)]
    ranking = _ranking(ItemKNNScorer(_events(rows), CATALOG).score(["me"]))
    assert ranking[:2] == ["b", "c"]


def test_item_knn_cold_user_gets_the_popularity_order() -> None:
    train = _events([("u1", "c", 0), ("u2", "c", 1), ("u1", "e", 2), ("u3", "b", 3),
                     ("u2", "b", 4), ("u4", "b", 5)])
    knn = ItemKNNScorer(train, CATALOG).score(["stranger"])
    assert _ranking(knn) == ["b", "c", "e", "a", "d"]


def test_item_knn_ties_go_to_the_more_popular_item() -> None:
    # d and e both have cosine 1/2 with a; e has more positive events (w1 clicked it twice).
    rows = [("u1", "a", 0), ("u1", "d", 1), ("u2", "a", 2), ("u2", "e", 3),
            ("w1", "e", 4), ("w1", "e", 5), ("w2", "d", 6), ("me", "a", 7)]
    scorer = ItemKNNScorer(_events(rows), CATALOG)
    assert scorer.counts.tolist() == [3, 0, 0, 2, 3]
    assert _ranking(scorer.score(["me"]))[:2] == ["e", "d"]


def test_item_knn_keeps_only_the_top_neighbours() -> None:
    # b is a's closest neighbour; with one neighbour kept, c gets nothing from a.
    rows = [("u1", "a", 0), ("u1", "b", 1), ("u2", "a", 2), ("u2", "b", 3),
            ("u3", "a", 4), ("u3", "c", 5), ("v1", "e", 6), ("v2", "e", 7), ("me", "a", 8)]
    wide = _ranking(ItemKNNScorer(_events(rows), CATALOG, neighbours=100).score(["me"]))
    narrow = _ranking(ItemKNNScorer(_events(rows), CATALOG, neighbours=1).score(["me"]))
    assert wide[:2] == ["b", "c"]
    assert narrow[:3] == ["b", "a", "e"]


def test_item_knn_counts_only_positives_as_history() -> None:
    rows = [("u1", "a", 0), ("u1", "b", 1), ("me", "a", 2, 1.0)]
    scores = ItemKNNScorer(_events(rows), CATALOG).score(["me"])
    assert _ranking(scores)[:2] == ["a", "b"]


def test_scores_are_deterministic() -> None:
    rows = [(f"u{n % 7}", CATALOG[(n * 3) % 5], n) for n in range(40)]
    first = ItemKNNScorer(_events(rows), CATALOG).score(["u1", "u3", "new"])
    again = ItemKNNScorer(_events(list(reversed(rows))), CATALOG).score(["u1", "u3", "new"])
    assert first.dtype == np.float32
    assert (first == again).all()
