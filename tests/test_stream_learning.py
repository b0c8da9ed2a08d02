"""Learning through the real loop: a day of drifting interests replayed through Kafka into
a running trainer (1 s interval) makes the next day's recall of the drifted users rise
well above the frozen nightly model's (prequential evaluator, same events)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from streaming import bootstrap_champion, produce, stream_settings, wait_for

from common.data.events import DAY_MS, Events
from common.data.synthetic import SyntheticConfig, generate
from common.evaluation.prequential import prequential
from common.evaluation.two_tower import TwoTowerScorer
from common.infra.shutdown import StopFlag
from common.model.bundle import Features, ModelBundle
from common.model.registry import Registry
from publisher.files import FilePublisher
from stream.consumer import TrainerConsumer

# 20 interest clusters of 50 items; a fifth of the users change interest every day.
DRIFTING = SyntheticConfig(n_users=1000, n_items=1000, n_clusters=20, n_days=8,
                           events_per_day=5000, p_in_cluster=0.9, zipf_exponent=0.8,
                           drift_per_day=0.2, seed=0)


class _Frozen:
    """A scorer that ignores what it is shown: both arms are frozen on the test day."""

    def __init__(self, bundle: ModelBundle, features: Features, catalog: np.ndarray,
                 seen: Events) -> None:
        self.scorer = TwoTowerScorer(bundle, features, catalog, seen=seen)

    def score(self, user_ids: list[str]) -> np.ndarray:
        return self.scorer.score(user_ids)

    def learn(self, events: Events) -> None:
        """Deliberately ignores events."""


@pytest.mark.slow
def test_streamed_day_lifts_next_day_recall_of_drifted_users(
        tmp_path: Path, kafka_bootstrap: str, topic: str) -> None:
    world = generate(DRIFTING)
    ds, starts = world.dataset, world.day_start_ms
    settings = stream_settings(tmp_path, kafka_bootstrap, topic,
                               RECSTREAM_MODEL_EMBEDDING_DIM="32",
                               RECSTREAM_MODEL_OUTPUT_DIM="32", RECSTREAM_MODEL_HIDDEN_DIMS="64",
                               RECSTREAM_MODEL_FEATURE_DIM="16",
                               RECSTREAM_TRAIN_BATCH_SIZE="256", RECSTREAM_TRAIN_THREADS="2",
                               RECSTREAM_STREAM_UPDATE_INTERVAL_S="1")
    bootstrap_champion(settings, ds, int(starts[6]), epochs=settings.train.bootstrap_epochs)
    stream_day = ds.events.between(int(starts[6]), int(starts[7]))
    next_day = ds.events.between(int(starts[7]), int(starts[7]) + DAY_MS)
    produce(kafka_bootstrap, topic, stream_day)

    stop = StopFlag()
    trainer = TrainerConsumer.from_settings(settings, ds, FilePublisher(tmp_path / "published"),
                                            kafka_bootstrap, stop=stop)
    trainer.start()
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: trainer.events_applied >= len(stream_day), 120, "the streamed day")
    finally:
        stop.set("test over")
        thread.join(60)
    assert trainer.metrics.steps._value.get() >= 1

    moved = (world.user_cluster[6] != world.user_cluster[5]) & (world.user_cluster[5] >= 0)
    drifted = [f"u{k}" for k in np.flatnonzero(moved)]
    catalog, seen = ds.catalog(), ds.events.between(None, int(starts[7]))
    recalls = {}
    # Histories: the nightly's as of its cutoff; the stream's with the streamed day in.
    for arm, bundle, known in (
            ("nightly", Registry(settings.models_dir).load("champion")[0],
             ds.events.between(None, int(starts[6]))),
            ("nightly+stream", trainer.learner.bundle, seen)):
        scorer = _Frozen(bundle, Features.build(bundle, ds.users, ds.items), catalog, known)
        result = prequential(scorer, catalog, next_day, k=50, chunk_events=1000, seen=seen)
        recalls[arm] = (result.recall, result.restrict(drifted).recall)
    print(f"\nnext-day prequential recall@50 (all users, {len(drifted)} drifted users): "
          f"{recalls}")
    assert recalls["nightly+stream"][1] > 2 * recalls["nightly"][1]
    assert recalls["nightly+stream"][0] > recalls["nightly"][0]
