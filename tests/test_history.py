"""The user tower's history input: built from strictly earlier events only (no leakage),
kept in event order, pooled without reading padding."""

import numpy as np
import torch

from common.model.history import UserHistories, example_histories
from common.model.towers import HistoryPool, TwoTowerConfig


def _random_events(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    users = rng.choice([f"u{i}" for i in range(12)], size=n).astype(object)
    items = rng.integers(1, 60, size=n)
    ts = rng.integers(0, 50, size=n) * 1000  # many ties on purpose
    return users, items, ts


def test_history_holds_only_strictly_earlier_events_of_the_same_user() -> None:
    users, items, ts = _random_events(0)
    # Tag each event with its own index as the "item row" so the history names events.
    hist = example_histories(users, np.arange(len(users)) + 1, ts, max_len=50)
    for i in range(len(users)):
        held = hist.rows[i][hist.mask[i]] - 1
        assert i not in held, f"event {i}'s history holds the event itself"
        assert all(users[j] == users[i] for j in held), "another user's event leaked in"
        assert all(ts[j] < ts[i] for j in held), "a later or simultaneous event leaked in"
        earlier = [j for j in range(len(users)) if users[j] == users[i] and ts[j] < ts[i]]
        assert len(held) == min(50, len(earlier)), "an earlier event is missing"


def test_history_is_in_time_order_with_ages_and_respects_query_order() -> None:
    users, items, ts = _random_events(1)
    perm = np.random.default_rng(2).permutation(len(users))
    a = example_histories(users, items, ts, max_len=8)
    b = example_histories(users[perm], items[perm], ts[perm], max_len=8)
    assert np.array_equal(a.mask[perm], b.mask)
    assert np.allclose(a.age_h[perm], b.age_h)
    for i in range(len(users)):
        ages = a.age_h[i][a.mask[i]]
        assert np.all(np.diff(ages) <= 0), "history not oldest-first"
        assert np.all(ages > 0)


def test_context_events_count_as_earlier_history_but_are_not_queries() -> None:
    users = np.array(["u1", "u1", "u1"], dtype=object)
    hist = example_histories(users, np.array([5, 6, 7]), np.array([1, 2, 3]), max_len=4,
                             is_query=np.array([False, False, True]))
    assert len(hist) == 1
    assert hist.rows[0][hist.mask[0]].tolist() == [5, 6]


def test_running_histories_keep_the_last_n_in_order() -> None:
    h = UserHistories(max_len=3)
    h.append(["u1"] * 5, ["a", "b", "c", "d", "e"], [1, 2, 3, 4, 5])
    batch = h.batch(["u1", "new"], lambda ids: np.array([ord(i) for i in ids]), now_ms=5)
    assert batch.rows[0].tolist() == [ord("c"), ord("d"), ord("e")]
    assert not batch.mask[1].any()


def test_pooling_ignores_padding_and_empty_history_pools_to_zero() -> None:
    for mode in ("decay", "attention"):
        pool = HistoryPool(TwoTowerConfig(1, 1, embedding_dim=4, history_len=3,
                                          history_pooling=mode), dim=4)
        emb = torch.randn(2, 3, 4)
        mask = torch.tensor([[False, True, True], [False, False, False]])
        out = pool(emb, torch.ones(2, 3), mask)
        emb2 = emb.clone()
        emb2[0, 0] = 100.0  # a padded position's content must not matter
        assert torch.allclose(pool(emb2, torch.ones(2, 3), mask), out)
        assert torch.equal(out[1], torch.zeros(4))
