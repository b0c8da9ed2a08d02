"""Side features: encoding, unknown values, buckets, multi-valued fields."""

import numpy as np
import torch

from common.data.tables import FeatureTable, FieldSpec
from common.model.features import FeatureEncoder

FIELDS = (FieldSpec("color", "categorical"), FieldSpec("price", "numeric", buckets=2),
          FieldSpec("tags", "multi", max_len=2))


def _table(ids, colors, prices, tags) -> FeatureTable:
    return FeatureTable.build(ids, FIELDS, {"color": colors, "price": prices, "tags": tags})


def test_unknown_categorical_value_encodes_to_zero() -> None:
    enc = FeatureEncoder.fit(_table(["a"], ["red"], [1.0], [("x",)]))
    ef = enc.encode(_table(["b"], ["purple"], [1.0], [()]))
    assert ef.cat[ef.rows(["b"])[0], 0].item() == 0


def test_missing_numeric_gets_bucket_zero_and_values_bucketise() -> None:
    enc = FeatureEncoder.fit(_table(["a", "b", "c"], ["r", "g", "b"], [1.0, 2.0, 3.0],
                                    [(), (), ()]))
    ef = enc.encode(_table(["n", "lo", "hi"], ["r"] * 3, [np.nan, 0.5, 9.0], [(), (), ()]))
    assert ef.cat[ef.rows(["n", "lo", "hi"]), 1].tolist() == [0, 1, 2]


def test_infinite_numeric_does_not_crash() -> None:
    enc = FeatureEncoder.fit(_table(["a", "b"], ["r", "g"], [1.0, np.inf], [(), ()]))
    ef = enc.encode(_table(["x"], ["r"], [-np.inf], [()]))
    assert ef.cat.shape == (2, 2)


def test_multi_values_are_padded_and_truncated() -> None:
    enc = FeatureEncoder.fit(_table(["a"], ["r"], [1.0], [("x", "y", "z")]))
    ef = enc.encode(_table(["a", "b"], ["r", "r"], [1.0, 1.0], [("x", "y", "z"), ("nope",)]))
    assert ef.multi[0].shape == (3, 2)
    assert (ef.multi[0][ef.rows(["a"])[0]] > 0).all()
    assert ef.multi[0][ef.rows(["b"])[0]].tolist() == [0, 0]


def test_ids_without_features_get_row_zero() -> None:
    enc = FeatureEncoder.fit(_table(["a"], ["r"], [1.0], [()]))
    ef = enc.encode(_table(["a"], ["r"], [1.0], [()]))
    assert ef.rows(["zzz"]).tolist() == [0]
    cat, multi = ef.gather(torch.tensor([0]))
    assert cat.sum().item() == 0 and multi[0].sum().item() == 0


def test_encoder_round_trips_through_dict() -> None:
    t = _table(["a", "b"], ["r", "g"], [1.0, 5.0], [("x",), ("y",)])
    enc = FeatureEncoder.fit(t)
    again = FeatureEncoder.from_dict(enc.to_dict())
    assert torch.equal(enc.encode(t).cat, again.encode(t).cat)
    assert again.cardinalities() == enc.cardinalities()
