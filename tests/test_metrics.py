"""Ranking metrics: hand-computed cases, ties, exclusion, and properties any ranking must keep."""


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.evaluation.metrics import (
    auc,
    hit_rate_at_k,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
    top_k,
)

ROW = np.array([[0.9, 0.1, 0.7, 0.3, 0.5]])  # ranking: 0, 2, 4, 3, 1


def _rel(*cols: int, n: int = 5) -> np.ndarray:
    mask = np.zeros((1, n), dtype=bool)
    mask[0, list(cols)] = True
    return mask



def test_top_k_orders_best_first() -> None:
    assert top_k(ROW, 3).tolist() == [[0, 2, 4]]


def test_top_k_breaks_ties_by_lower_index() -> None:
    tied = np.array([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert top_k(tied, 2).tolist() == [[1, 2]]
    assert top_k(tied, 4).tolist() == [[1, 2, 3, 0]]


def test_top_k_larger_than_catalogue_returns_every_item() -> None:
    assert top_k(ROW, 50).tolist() == [[0, 2, 4, 3, 1]]


def test_top_k_puts_excluded_items_last() -> None:
    exclude = _rel(0, 2)
    assert top_k(ROW, 2, exclude).tolist() == [[4, 3]]
    assert top_k(ROW, 5, exclude).tolist()[0][:3] == [4, 3, 1]


def test_nan_scores_rank_last() -> None:
    scores = np.array([[np.nan, 0.1, 0.2]])
    assert top_k(scores, 3).tolist() == [[2, 1, 0]]


def test_recall_counts_share_of_relevant_found() -> None:
    assert recall_at_k(ROW, _rel(2, 3), 2).tolist() == [0.5]
    assert recall_at_k(ROW, _rel(2, 3), 4).tolist() == [1.0]


def test_recall_with_k_larger_than_catalogue_finds_everything() -> None:
    assert recall_at_k(ROW, _rel(1, 3), 100).tolist() == [1.0]


def test_ndcg_discounts_by_rank() -> None:
    # Hits at ranks 0 and 2 of three relevant: (1 + 1/2) / (1 + 1/log2(3) + 1/2).
    expected = 1.5 / (1 + 1 / np.log2(3) + 0.5)
    assert ndcg_at_k(ROW, _rel(0, 4, 1), 3)[0] == pytest.approx(expected)


def test_ndcg_ideal_is_over_min_of_k_and_relevant() -> None:
    assert ndcg_at_k(ROW, _rel(0, 2, 4, 3), 2)[0] == pytest.approx(1.0)
    assert ndcg_at_k(ROW, _rel(2), 5)[0] == pytest.approx(1 / np.log2(3))


def test_hit_rate_needs_one_relevant_in_top_k() -> None:
    assert hit_rate_at_k(ROW, _rel(4, 1), 3).tolist() == [1.0]
    assert hit_rate_at_k(ROW, _rel(4, 1), 2).tolist() == [0.0]


def test_auc_counts_ties_as_half() -> None:
    scores = np.array([[0.5, 0.5, 0.2]])
    assert auc(scores, _rel(0, n=3)).tolist() == [0.75]


def test_auc_is_one_for_perfect_and_zero_for_reversed_ranking() -> None:
    assert auc(ROW, _rel(0, 2)).tolist() == [1.0]
    assert auc(-ROW, _rel(0, 2)).tolist() == [0.0]


def test_auc_ignores_excluded_items() -> None:
    # Item 0 outranks the positive but is already seen, so it is no negative.
    assert auc(ROW, _rel(2), exclude=_rel(0)).tolist() == [1.0]


def test_excluded_items_are_never_hits() -> None:
    exclude = _rel(0)
    assert recall_at_k(ROW, _rel(0, 2), 1, exclude).tolist() == [1.0]
    assert hit_rate_at_k(ROW, _rel(4), 2, exclude).tolist() == [1.0]


def test_user_without_relevant_items_gets_nan() -> None:
    out = ranking_metrics(ROW, _rel(), (2,))
    assert all(np.isnan(v[0]) for v in out.values())


def test_relevant_item_that_is_excluded_does_not_count() -> None:
    out = ranking_metrics(ROW, _rel(0), (2,), exclude=_rel(0))
    assert all(np.isnan(v[0]) for v in out.values())


def test_metrics_are_per_user_rows() -> None:
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    relevant = np.array([[True, False, False], [True, False, False]])
    assert recall_at_k(scores, relevant, 1).tolist() == [1.0, 0.0]


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="relevant has shape"):
        recall_at_k(ROW, np.zeros((1, 4), dtype=bool), 2)
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_k(ROW, 0)


score_rows = st.integers(1, 4).flatmap(lambda n: st.integers(1, 12).flatmap(
    lambda m: st.tuples(
        arrays(np.float64, (n, m), elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0])),
        arrays(np.bool_, (n, m)),
        arrays(np.bool_, (n, m)))))


@settings(max_examples=200, deadline=None)
@given(score_rows)
def test_recall_is_within_unit_interval_and_monotone_in_k(case: tuple) -> None:
    scores, relevant, exclude = case
    previous = np.zeros(len(scores))
    for k in range(1, scores.shape[1] + 2):
        r = recall_at_k(scores, relevant, k, exclude)
        defined = ~np.isnan(r)
        assert ((r[defined] >= 0) & (r[defined] <= 1)).all()
        assert (r[defined] >= previous[defined] - 1e-12).all()
        previous = np.where(defined, r, 0)


@settings(max_examples=200, deadline=None)
@given(score_rows)
def test_perfect_scorer_gets_full_recall_ndcg_and_auc(case: tuple) -> None:
    _, relevant, exclude = case
    scores = relevant.astype(np.float64)
    usable = relevant & ~exclude
    k = max(int(usable.sum(axis=1).max()), 1)
    out = ranking_metrics(scores, relevant, (k,), exclude)
    has = usable.any(axis=1)
    assert np.allclose(out[f"recall@{k}"][has], 1.0)
    assert np.allclose(out[f"ndcg@{k}"][has], 1.0)
    has_neg = has & (~relevant & ~exclude).any(axis=1)
    assert np.allclose(out["auc"][has_neg], 1.0)


@settings(max_examples=200, deadline=None)
@given(score_rows, st.integers(1, 15))
def test_top_k_matches_a_full_sort(case: tuple, k: int) -> None:
    scores, _, exclude = case
    s = np.where(exclude, -np.inf, scores)
    expected = [np.lexsort((np.arange(len(row)), -row))[:k].tolist() for row in s]
    assert top_k(scores, k, exclude).tolist() == expected


@settings(max_examples=200, deadline=None)
@given(score_rows)
def test_auc_matches_pairwise_definition(case: tuple) -> None:
    scores, relevant, exclude = case
    got = auc(scores, relevant, exclude)
    for row in range(len(scores)):
        pos = scores[row][relevant[row] & ~exclude[row]]
        neg = scores[row][~relevant[row] & ~exclude[row]]
        if len(pos) == 0 or len(neg) == 0:
            assert np.isnan(got[row])
            continue
        wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        assert got[row] == pytest.approx(wins.mean())
