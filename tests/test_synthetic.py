"""The synthetic generator: determinism, shape, and the structure it plants."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common.data.events import DAY_MS
from common.data.synthetic import SyntheticConfig, SyntheticData, generate

CONFIG = SyntheticConfig(n_users=1000, n_items=500, n_clusters=8, n_days=6,
                         events_per_day=4000, new_users_per_day=0.05, new_items_per_day=0.05,
                         seed=7)


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return generate(CONFIG)


def event_days(data: SyntheticData) -> np.ndarray:
    return (data.dataset.events.ts_ms - data.day_start_ms[0]) // DAY_MS


def test_same_seed_gives_identical_data(data: SyntheticData) -> None:
    again = generate(CONFIG)
    assert again.dataset.events.to_records() == data.dataset.events.to_records()
    np.testing.assert_array_equal(again.user_cluster, data.user_cluster)
    assert again.dataset.items.columns["tags"].tolist() == \
        data.dataset.items.columns["tags"].tolist()


def test_other_seed_gives_other_data(data: SyntheticData) -> None:
    other = generate(dataclasses.replace(CONFIG, seed=8))
    assert other.dataset.events.item_id.tolist() != data.dataset.events.item_id.tolist()


def test_each_day_has_events_per_day_clicks_in_time_order(data: SyntheticData) -> None:
    events = data.dataset.events
    assert len(events) == CONFIG.n_days * CONFIG.events_per_day
    assert np.all(np.diff(events.ts_ms) >= 0)
    counts = np.bincount(event_days(data), minlength=CONFIG.n_days)
    assert counts.tolist() == [CONFIG.events_per_day] * CONFIG.n_days
    assert set(events.event_type.tolist()) == {"click"} and np.isnan(events.value).all()


def test_days_start_at_start_day_in_utc(data: SyntheticData) -> None:
    assert data.day_start_ms[0] == 1_704_067_200_000  # 2024-01-01T00:00Z
    assert np.all(np.diff(data.day_start_ms) == DAY_MS)


def test_event_ids_are_unique(data: SyntheticData) -> None:
    ids = data.dataset.events.event_id.tolist()
    assert len(set(ids)) == len(ids) and ids[0] == "syn-0"


def test_event_indices_match_the_string_ids(data: SyntheticData) -> None:
    events = data.dataset.events
    assert events.user_id[:100].tolist() == [f"u{k}" for k in data.event_user[:100]]
    assert events.item_id[:100].tolist() == [f"i{k}" for k in data.event_item[:100]]


def test_top_tenth_of_items_gets_over_half_the_clicks(data: SyntheticData) -> None:
    counts = np.sort(np.bincount(data.event_item, minlength=len(data.item_cluster)))[::-1]
    top = counts[: len(counts) // 10].sum() / counts.sum()
    assert top > 0.5  # about 0.65 with zipf_exponent=1.1; uniform would give 0.1


def test_most_clicks_fall_in_the_users_cluster_of_the_day(data: SyntheticData) -> None:
    cluster_of_user = data.user_cluster[event_days(data), data.event_user]
    share = np.mean(data.item_cluster[data.event_item] == cluster_of_user)
    # p_in_cluster plus the random picks that land on the same cluster: 0.85 + 0.15/8.
    assert share == pytest.approx(0.85 + 0.15 / 8, abs=0.02)


def test_about_drift_per_day_of_users_change_cluster_each_day(data: SyntheticData) -> None:
    before, after = data.user_cluster[:-1], data.user_cluster[1:]
    present = before >= 0
    moved = np.mean(before[present] != after[present])
    assert moved == pytest.approx(CONFIG.drift_per_day, abs=0.015)


def test_clicks_follow_a_user_to_its_new_cluster(data: SyntheticData) -> None:
    moved = np.flatnonzero(data.user_cluster[2] != data.user_cluster[1])
    moved = moved[data.user_cluster[1, moved] >= 0]
    on_day = (event_days(data) == 2) & np.isin(data.event_user, moved)
    users, items = data.event_user[on_day], data.event_item[on_day]
    assert len(users) > 20
    assert np.mean(data.item_cluster[items] == data.user_cluster[2, users]) > 0.75


def test_users_are_unassigned_before_they_arrive(data: SyntheticData) -> None:
    days = np.arange(CONFIG.n_days)[:, None]
    assigned = data.user_cluster >= 0
    np.testing.assert_array_equal(assigned, days >= data.user_arrival_day[None, :])
    assert data.user_cluster.shape == (CONFIG.n_days, 1000 + 5 * 50)


def test_new_users_click_only_from_their_arrival_day(data: SyntheticData) -> None:
    arrival = data.user_arrival_day[data.event_user]
    assert np.all(arrival <= event_days(data))
    assert np.any(arrival > 0)  # some newcomers did click


def test_new_items_are_clicked_only_once_released(data: SyntheticData) -> None:
    release = data.item_arrival_day[data.event_item]
    assert np.all(release <= event_days(data))
    assert np.any(release > 0)
    assert len(data.item_cluster) == 500 + 5 * 25


def test_features_cover_every_user_and_item(data: SyntheticData) -> None:
    users, items = data.dataset.users, data.dataset.items
    assert users.ids.tolist() == [f"u{k}" for k in range(data.user_cluster.shape[1])]
    assert items.ids.tolist() == [f"i{k}" for k in range(len(data.item_cluster))]
    assert all(1 <= len(t) <= 3 for t in items.columns["tags"])
    assert np.isfinite(users.columns["age"]).all() and (items.columns["price"] > 0).all()


def test_item_category_is_its_cluster(data: SyntheticData) -> None:
    assert data.dataset.items.columns["category"].tolist() == \
        [f"c{c}" for c in data.item_cluster]


def test_user_region_mostly_follows_the_first_cluster(data: SyntheticData) -> None:
    first = data.user_cluster[data.user_arrival_day, np.arange(data.user_cluster.shape[1])]
    region = data.dataset.users.columns["region"]
    # Within a cluster, the commonest region should hold at least p_region_match of users.
    for c in range(CONFIG.n_clusters):
        _, counts = np.unique(region[first == c], return_counts=True)
        assert counts.max() / counts.sum() > 0.6


def test_ratings_mode_rates_in_cluster_items_higher() -> None:
    data = generate(dataclasses.replace(CONFIG, click_only=False, n_days=2))
    events = data.dataset.events
    assert set(events.event_type.tolist()) == {"rating"}
    assert set(np.unique(events.value).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    in_cluster = data.item_cluster[data.event_item] == data.user_cluster[
        event_days(data), data.event_user]
    assert events.value[in_cluster].mean() > events.value[~in_cluster].mean() + 1


@pytest.mark.parametrize("field, value", [("n_clusters", 0), ("p_in_cluster", 1.5),
                                          ("drift_per_day", -0.1), ("start_day", "Jan 1")])
def test_invalid_config_is_rejected(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field if field != "start_day" else "invalid day"):
        SyntheticConfig(**{field: value})


def test_a_million_events_generate() -> None:
    config = SyntheticConfig(n_users=50_000, n_items=20_000, n_clusters=50, n_days=10,
                             events_per_day=100_000)
    assert len(generate(config).dataset.events) == 1_000_000
