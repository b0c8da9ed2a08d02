"""Model registry: atomic versions, aliases, and refusal of corrupt or partial versions."""

import json
from pathlib import Path

import pytest
import torch
from factories import make_bundle

from common.model.registry import CorruptVersionError, Registry, RegistryError, VersionNotFoundError


def _register(reg: Registry, parent: str | None = None, cutoff: int = 1000) -> str:
    return reg.register(make_bundle(), kind="bootstrap", cutoff_ms=cutoff, parent=parent,
                        metrics={"recall@50": 0.5}, config_hash="abc")


def test_register_writes_meta_with_parent_cutoff_metrics_and_hash(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1 = _register(reg)
    v2 = _register(reg, parent=v1, cutoff=2000)
    meta = reg.meta(v2)
    assert (v1, v2) == ("v000001", "v000002")
    assert meta["parent"] == v1 and meta["cutoff_ms"] == 2000
    assert meta["metrics"] == {"recall@50": 0.5} and meta["config_hash"] == "abc"
    assert reg.versions() == [v1, v2]


def test_loaded_bundle_scores_like_the_saved_one(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    bundle = make_bundle()
    v = reg.register(bundle, kind="bootstrap", cutoff_ms=1, parent=None, metrics={},
                     config_hash="x")
    loaded, _ = reg.load(v)
    for key, value in bundle.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    assert loaded.user_vocab.ids == bundle.user_vocab.ids
    assert loaded.freq.step == bundle.freq.step
    assert (loaded.item_counts == bundle.item_counts).all()


def test_promote_moves_champion_to_previous(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1, v2 = _register(reg), _register(reg)
    reg.promote(v1)
    reg.promote(v2)
    assert reg.aliases() == {"champion": v2, "previous": v1}
    assert reg.resolve("champion") == v2


def test_promoting_the_champion_again_changes_nothing(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1, v2 = _register(reg), _register(reg)
    reg.promote(v1)
    reg.promote(v2)
    reg.promote(v2)
    assert reg.aliases()["previous"] == v1


def test_missing_version_and_unset_alias_are_clear_errors(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(VersionNotFoundError, match="not set"):
        reg.load("champion")
    with pytest.raises(VersionNotFoundError, match="v000009"):
        reg.load("v000009")


def test_unknown_alias_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v = _register(reg)
    with pytest.raises(RegistryError, match="unknown alias"):
        reg.set_aliases(best=v)


def test_partial_version_is_not_listed_and_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v = _register(reg)
    (tmp_path / v / "meta.json").unlink()
    assert reg.versions() == []
    with pytest.raises(CorruptVersionError, match="incomplete"):
        reg.load(v)


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v = _register(reg)
    with open(tmp_path / v / "weights.pt", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(CorruptVersionError, match="checksum"):
        reg.load(v)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v = _register(reg)
    (tmp_path / v / "item_vocab.npz").unlink()
    with pytest.raises(CorruptVersionError, match="missing item_vocab.npz"):
        reg.load(v)


def test_garbage_meta_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v = _register(reg)
    (tmp_path / v / "meta.json").write_text("{not json")
    with pytest.raises(CorruptVersionError, match="not valid JSON"):
        reg.load(v)


def test_nan_weights_are_refused_even_with_matching_checksums(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    bundle = make_bundle()
    with torch.no_grad():
        bundle.model.item.mlp[0].weight[0, 0] = float("nan")
    v = reg.register(bundle, kind="bootstrap", cutoff_ms=1, parent=None, metrics={},
                     config_hash="x")
    with pytest.raises(CorruptVersionError, match="NaN"):
        reg.load(v)


def test_failed_registration_leaves_no_version(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry(tmp_path)

    def disk_full(**_: object) -> bytes:  # fails after weights and vocabularies are written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("common.model.registry.npz_bytes", disk_full)
    with pytest.raises(OSError, match="No space"):
        _register(reg)
    assert reg.versions() == []
    assert not list(tmp_path.glob(".staging-*"))


def test_weights_file_holds_only_tensors(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v = _register(reg)
    state = torch.load(tmp_path / v / "weights.pt", weights_only=True)
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    assert json.loads((tmp_path / v / "model.json").read_text())["user_rows"] > 0
