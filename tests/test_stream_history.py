"""The stream learner and users' histories: written before learning, read without leaks.

Histories are event facts, not model state: they live where serving reads them (the
publisher's seen sets), shared by every version. So a rebase's replay and a restart's
replay find them already holding the replayed events, and later ones; the learner must
then build each example's history from strictly earlier positives only, exactly as an
uninterrupted run did. That is what these tests pin down.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from factories import make_bundle, make_dataset, make_events, small_settings

from batch.trainer import bootstrap
from common.data.dataset import Dataset
from common.data.events import Events
from common.data.synthetic import SyntheticConfig, generate
from common.infra.settings import load_settings
from common.model.bundle import training_histories
from common.model.history import HistoryBatch, example_histories
from common.model.vectors import item_vectors, user_vectors
from publisher.base import Interactions
from publisher.files import FilePublisher
from stream.learner import StreamLearner, stream_train_settings

HISTORY = {"RECSTREAM_MODEL_HISTORY_LEN": "8", "RECSTREAM_MODEL_HISTORY_INPUT": "vectors",
           "RECSTREAM_MODEL_HISTORY_POOLING": "attention"}


def _learner(ds: Dataset, source: FilePublisher, **env: str) -> StreamLearner:
    settings = small_settings(**HISTORY, **env)
    return StreamLearner(make_bundle(ds, settings), ds, stream_train_settings(settings), "v1",
                         settings.stream, source)


def _steps() -> list:
    """Three steps of clicks, one minute apart in event time: in each, four users click
    two or three distinct items."""
    users = [f"u{k}" for k in range(6)]
    steps = []
    for s in range(3):
        pairs = [(users[(s + k % 4) % 6], f"i{(7 * s + 3 * k) % 30}") for k in range(10)]
        steps.append(make_events(pairs, start_ms=1_000_000 + 60_000 * s, step_ms=1000))
    return steps


def test_a_step_writes_its_positives_to_the_histories_before_it_learns(tmp_path: Path) -> None:
    ds = make_dataset()
    source = FilePublisher(tmp_path)
    written: list[int] = []

    class Watching(FilePublisher):
        def histories(self, user_ids: list[str], max_len: int,
                      before_ms: int | None = None) -> list:
            # What the store holds when the step reads (the step's own included).
            written.append(sum(len(items) for items, _ in source.histories(user_ids, 50)))
            return source.histories(user_ids, max_len, before_ms)

        def write_history(self, seen: Interactions) -> None:
            source.write_history(seen)

    learner = _learner(ds, Watching(tmp_path))
    events = _steps()[0]
    learner.step(events, 1)
    # The step's own 10 positives were stored before its examples' histories were read.
    assert written == [10]
    stored = source.histories(["u0"], 8)[0]
    assert stored[0] == [i for u, i in zip(events.user_id, events.item_id, strict=True)
                         if u == "u0"]


def test_a_replay_over_stored_later_events_learns_as_the_first_run_did(tmp_path: Path) -> None:
    """A rebase or restart replays steps whose events (and later ones) the histories
    already hold: the rows it learns are those of the run that saw them first."""
    ds = make_dataset()
    steps = _steps()
    first = _learner(ds, FilePublisher(tmp_path / "first"))
    outs = [first.step(ev, n) for n, ev in enumerate(steps, 1)]

    ahead = FilePublisher(tmp_path / "ahead")
    for ev in steps:  # every event, the later steps' too, is already in the histories
        ahead.write_history(Interactions(list(ev.user_id), list(ev.item_id),
                                         ev.ts_ms.tolist()))
    replay = _learner(ds, ahead)
    again = [replay.step(ev, n) for n, ev in enumerate(steps, 1)]
    for a, b in zip(outs, again, strict=True):
        assert a.user_ids == b.user_ids
        np.testing.assert_array_equal(a.user_vectors, b.user_vectors)

    # And the histories do matter: a learner blind to them learns other rows.
    blind = StreamLearner(make_bundle(ds, small_settings(**HISTORY)), ds,
                          stream_train_settings(small_settings(**HISTORY)), "v1")
    late = [blind.step(ev, n) for n, ev in enumerate(steps, 1)][-1]
    assert not np.array_equal(late.user_vectors, outs[-1].user_vectors)


def test_each_example_sees_exactly_its_strictly_earlier_positives(tmp_path: Path) -> None:
    """Against the plain event log: no later event, not the example's own, no event twice
    (the stored history holds the step's own events, written before it learns)."""
    ds = make_dataset()
    steps = _steps()
    ahead = FilePublisher(tmp_path)
    log = Events.concat(steps)
    ahead.write_history(Interactions(list(log.user_id), list(log.item_id), log.ts_ms.tolist()))
    learner = _learner(ds, ahead)
    learner.bundle.observe(log)
    rows = learner.bundle.item_vocab.lookup(log.item_id.astype(str))
    for n, ev in enumerate(steps):
        got = training_histories(learner.bundle, ev, learner._context(ev))
        mine = np.zeros(len(log), bool)
        mine[n * len(ev):(n + 1) * len(ev)] = True
        want = example_histories(log.user_id, rows, log.ts_ms, 8, is_query=mine)
        np.testing.assert_array_equal(got.mask, want.mask)
        np.testing.assert_array_equal(got.rows, want.rows)
        assert got.mask[:, -1].any() or n == 0


def test_small_steps_are_topped_up_from_the_replay_buffer(tmp_path: Path) -> None:
    ds = make_dataset()
    learner = _learner(ds, FilePublisher(tmp_path), RECSTREAM_STREAM_MIN_BATCH="16")
    steps = _steps()
    learner.step(steps[0], 1)
    assert len(learner.replay) == 10
    one = make_events([("u5", "i3")], start_ms=5_000_000)
    out = learner.step(one, 2)  # one positive: learned beside 10 replayed ones
    assert out.n_examples == 1 and np.isfinite(out.loss)
    assert "u5" in out.user_ids and len(out.user_ids) > 1  # replayed users moved too
    assert len(learner.replay) == 11


def test_a_burst_of_one_new_users_clicks_moves_that_user_and_not_the_others(
        tmp_path: Path) -> None:
    """Issue 14: one user's events must not move other users' answers more than their own.
    A new user clicks eight items of one cluster: their top-10 turns to that cluster (from
    the history, before any row of theirs exists), while other users' top-10 stay."""
    world = generate(SyntheticConfig(n_users=400, n_items=300, n_clusters=6, n_days=4,
                                     events_per_day=3000, seed=5))
    settings = load_settings({**HISTORY, "RECSTREAM_MODEL_HISTORY_LEN": "20",
                              "RECSTREAM_TRAIN_USER_ID_DROPOUT": "0.3",
                              "RECSTREAM_TRAIN_BOOTSTRAP_EPOCHS": "2",
                              "RECSTREAM_MODEL_EMBEDDING_DIM": "16",
                              "RECSTREAM_MODEL_OUTPUT_DIM": "16",
                              "RECSTREAM_MODEL_HIDDEN_DIMS": "32"})
    ds, split = world.dataset, int(world.day_start_ms[3])
    bundle, _ = bootstrap(settings.model, settings.train, ds, ds.events.between(None, split))
    source = FilePublisher(tmp_path)
    past = ds.events.between(None, split).positives(settings.train.rating_threshold)
    source.write_history(Interactions(list(past.user_id), list(past.item_id),
                                      past.ts_ms.tolist()))
    learner = StreamLearner(bundle, ds, stream_train_settings(settings), "v1",
                            settings.stream, source)
    day3 = ds.events.between(split)
    learner.step(day3.take(np.arange(600)), 1)  # the replay buffer fills, rows move
    catalog = [str(i) for i in ds.catalog()]
    column = {item: c for c, item in enumerate(catalog)}
    items = item_vectors(learner.bundle, learner.features, catalog).numpy()
    now = int(day3.ts_ms[600]) + 60_000

    def top10(user: str) -> set[str]:
        items_seen, stamps = source.histories([user], 20)[0]
        hist = HistoryBatch.empty(1, 20)
        if items_seen:
            k = len(items_seen)
            hist.rows[0, -k:] = learner.bundle.item_vocab.lookup(items_seen)
            hist.age_h[0, -k:] = (now - np.asarray(stamps)) / 3_600_000
            hist.mask[0, -k:] = True
        vec = user_vectors(learner.bundle, learner.features, [user], hist).numpy()
        scores = (vec @ items.T)[0]
        scores[[column[i] for i in items_seen]] = -np.inf
        return {catalog[i] for i in np.argsort(-scores)[:10]}

    active = day3.user_id[:600].astype(str)
    others = [u for u in dict.fromkeys(active.tolist())][:20]
    before = {u: top10(u) for u in [*others, "newbie"]}
    # The cluster the new user's generic (cold) answer shows least of.
    shown = np.bincount([world.item_cluster[int(i[1:])] for i in before["newbie"]],
                        minlength=6)
    cluster = int(np.argmin(shown))
    clicked = [f"i{k}" for k in np.flatnonzero(world.item_cluster == cluster)[:8]]
    burst = make_events([("newbie", i) for i in clicked], start_ms=now - 8000, step_ms=1000)
    learner.step(burst, 2)
    after = {u: top10(u) for u in [*others, "newbie"]}

    in_cluster = sum(world.item_cluster[int(i[1:])] == cluster for i in after["newbie"])
    assert len(after["newbie"] & before["newbie"]) <= 3 and in_cluster >= 7, \
        (before["newbie"], after["newbie"], shown, in_cluster)
    overlap = [len(after[u] & before[u]) / 10 for u in others]
    print(f"\nnew user: {in_cluster}/10 of the clicked cluster after the burst, "
          f"{len(after['newbie'] & before['newbie'])} of 10 kept; others' overlap: "
          f"min {min(overlap):.1f}, mean {np.mean(overlap):.2f}")
    assert min(overlap) >= 0.8, overlap
