"""One training step: what it may change, what it must not, and the loss it computes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import make_bundle, make_dataset, small_settings

from common.model.bundle import Features, encode_examples
from common.model.freq import FrequencyEstimator
from common.model.losses import inbatch_softmax_loss
from common.model.training import Trainer, TrainingDivergedError

ID_KEYS = ("user.ids.weight", "user.ids.accum", "item.ids.weight", "item.ids.accum")


def _setup(mode: str):
    ds = make_dataset()
    settings = small_settings()
    bundle = make_bundle(ds, settings)
    features = Features.build(bundle, ds.users, ds.items)
    examples = encode_examples(bundle, features, ds.events.positives(4.0))
    return bundle, Trainer(bundle, features, settings.train, mode=mode), examples


def _snapshot(bundle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bundle.model.state_dict().items()}


def test_embedding_step_changes_only_touched_id_rows() -> None:
    bundle, trainer, examples = _setup("embedding")
    before = _snapshot(bundle)
    batch = examples.take(np.arange(32))
    result = trainer.step(batch)
    after = bundle.model.state_dict()
    for key, value in before.items():
        if key not in ID_KEYS:
            assert torch.equal(value, after[key]), f"dense parameter {key} changed"
    for side, rows in (("user", result.user_rows), ("item", result.item_rows)):
        changed = (before[f"{side}.ids.weight"] != after[f"{side}.ids.weight"]).any(dim=1)
        assert set(np.flatnonzero(changed.numpy())) <= set(rows.tolist())
        assert changed.any()
    assert set(result.user_rows.tolist()) == set(batch.user_rows.tolist())


def test_full_step_updates_dense_parameters() -> None:
    bundle, trainer, examples = _setup("full")
    before = _snapshot(bundle)
    trainer.step(examples.take(np.arange(32)))
    after = bundle.model.state_dict()
    assert not torch.equal(before["user.mlp.0.weight"], after["user.mlp.0.weight"])
    assert not torch.equal(before["item.cat_table.weight"], after["item.cat_table.weight"])


def test_nan_weights_raise_and_apply_nothing() -> None:
    bundle, trainer, examples = _setup("full")
    with torch.no_grad():
        bundle.model.user.mlp[0].weight[0, 0] = float("nan")
    before = _snapshot(bundle)
    with pytest.raises(TrainingDivergedError):
        trainer.step(examples.take(np.arange(32)))
    after = bundle.model.state_dict()
    for key, value in before.items():
        assert torch.equal(value.nan_to_num(), after[key].nan_to_num()), key


def test_fused_softmax_loss_matches_cross_entropy_and_its_gradients() -> None:
    torch.manual_seed(0)
    users = F.normalize(torch.randn(16, 8), dim=1).requires_grad_(True)
    items = F.normalize(torch.randn(16, 8), dim=1).requires_grad_(True)
    negs = F.normalize(torch.randn(5, 8), dim=1).requires_grad_(True)
    keys = torch.tensor([1, 2, 3, 1] + list(range(10, 22)))  # position 3 repeats item 1
    log_q, neg_log_q = torch.rand(16).log(), torch.rand(5).log()
    loss = inbatch_softmax_loss(users, items, keys, log_q, 0.1, 1.5, negs, neg_log_q)
    grads = torch.autograd.grad(loss, (users, items, negs))

    logits = torch.cat([users @ items.T / 0.1 - 1.5 * log_q,
                        users @ negs.T / 0.1 - 1.5 * neg_log_q], dim=1)
    same = keys[:, None] == keys[None, :]
    same.fill_diagonal_(False)
    logits[:, :16] = logits[:, :16].masked_fill(same, float("-inf"))
    reference = F.cross_entropy(logits, torch.arange(16))
    ref_grads = torch.autograd.grad(reference, (users, items, negs))
    assert torch.allclose(loss, reference, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-5)


def test_frequency_estimator_matches_known_rates() -> None:
    """Items appear in each batch with known probabilities; estimates stay within 15%."""
    rng = np.random.default_rng(0)
    rates = np.array([0.9, 0.5, 0.2, 0.1, 0.05, 0.02])
    keys = np.arange(1, len(rates) + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    est = FrequencyEstimator(hash_size=1 << 16, num_hashes=2, alpha=0.01)
    noise = np.arange(1000, 60000, dtype=np.uint64)  # many one-off items share the table
    for step in range(20000):
        present = keys[rng.random(len(rates)) < rates]
        est.update(np.concatenate([present, noise[step: step + 2]]))
    estimate = est.probability(keys)
    assert np.all(np.abs(estimate - rates) / rates < 0.15), estimate


def test_frequency_state_round_trips() -> None:
    est = FrequencyEstimator(hash_size=64, num_hashes=2, alpha=0.1)
    est.update(np.array([1, 2, 3], dtype=np.uint64))
    again = FrequencyEstimator.from_state(est.state_dict())
    assert again.step == est.step
    keys = np.array([1, 2, 3, 4], dtype=np.uint64)
    assert np.array_equal(again.probability(keys), est.probability(keys))


@pytest.mark.parametrize("history_input", ["vectors", "ids"])
def test_frozen_items_learn_user_rows_as_the_general_step_does(history_input: str) -> None:
    """With item rows at rate 0 the step runs the item side without autograd, history items
    from a table of item vectors: the user rows it learns are those of the general path."""
    ds = make_dataset()
    env = {"RECSTREAM_MODEL_HISTORY_LEN": "6", "RECSTREAM_MODEL_HISTORY_INPUT": history_input,
           "RECSTREAM_MODEL_HISTORY_POOLING": "attention",
           "RECSTREAM_TRAIN_RANDOM_NEGATIVES": "16", "RECSTREAM_TRAIN_ITEM_LR_SCALE": "0"}
    rows = []
    for frozen in (True, False):
        settings = small_settings(**env)
        bundle = make_bundle(ds, settings)
        features = Features.build(bundle, ds.users, ds.items)
        examples = encode_examples(bundle, features, ds.events.positives(4.0))
        assert examples.history is not None and examples.history.mask.any()
        trainer = Trainer(bundle, features, settings.train, mode="embedding")
        trainer._items_frozen = lambda frozen=frozen: frozen  # type: ignore[method-assign]
        items_before = bundle.model.item.ids.weight.clone()
        for lo in range(0, 96, 32):
            result = trainer.step(examples.take(np.arange(lo, lo + 32)))
            assert len(result.item_rows) == 0
        assert torch.equal(items_before, bundle.model.item.ids.weight)
        rows.append(bundle.model.user.ids.weight.clone())
    assert not torch.equal(rows[0], make_bundle(ds, small_settings(**env)).model.user.ids.weight)
    torch.testing.assert_close(rows[0], rows[1], atol=1e-6, rtol=1e-5)
