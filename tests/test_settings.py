"""Settings: one typed object from RECSTREAM_* variables, failing loudly on bad values."""

from pathlib import Path

import pytest

from common.infra.settings import SettingsError, env_var_names, load_settings


def test_defaults_need_no_environment() -> None:
    s = load_settings({})
    assert s.home == Path("./var")
    assert s.kafka.bootstrap == "" and s.redis.url == ""
    assert s.model.embedding_dim == 32 and s.train.loss == "inbatch"


def test_grouped_and_top_level_variables_are_read() -> None:
    s = load_settings({
        "RECSTREAM_HOME": "/tmp/rs",
        "RECSTREAM_KAFKA_BOOTSTRAP": "broker:9092",
        "RECSTREAM_MODEL_HIDDEN_DIMS": "128, 64",
        "RECSTREAM_MODEL_SENET": "true",
        "RECSTREAM_TRAIN_LR_DENSE": "0.01",
    })
    assert s.home == Path("/tmp/rs")
    assert s.kafka.bootstrap == "broker:9092"
    assert s.model.hidden_dims == (128, 64)
    assert s.model.senet is True
    assert s.train.lr_dense == 0.01


def test_invalid_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="RECSTREAM_TRAIN_BATCH_SIZE='0'"):
        load_settings({"RECSTREAM_TRAIN_BATCH_SIZE": "0"})


def test_invalid_choice_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="RECSTREAM_TRAIN_LOSS"):
        load_settings({"RECSTREAM_TRAIN_LOSS": "hinge"})


def test_unknown_variable_is_rejected() -> None:
    with pytest.raises(SettingsError, match="RECSTREAM_MODEL_EMBEDING_DIM: unknown setting"):
        load_settings({"RECSTREAM_MODEL_EMBEDING_DIM": "8"})


def test_unrelated_variables_are_ignored() -> None:
    assert load_settings({"PATH": "/bin", "HOME": "/root"}).model.embedding_dim == 32


def test_config_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    cfg = tmp_path / "recstream.toml"
    cfg.write_text('home = "/srv/rs"\n[model]\nembedding_dim = 64\noutput_dim = 16\n')
    s = load_settings({"RECSTREAM_CONFIG": str(cfg), "RECSTREAM_MODEL_EMBEDDING_DIM": "8"})
    assert s.home == Path("/srv/rs")
    assert s.model.embedding_dim == 8 and s.model.output_dim == 16


def test_bad_config_file_value_names_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "recstream.toml"
    cfg.write_text("[train]\nbatch_size = -3\n")
    with pytest.raises(SettingsError, match=r"recstream.toml: train.batch_size"):
        load_settings({"RECSTREAM_CONFIG": str(cfg)})


def test_unreadable_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="RECSTREAM_CONFIG"):
        load_settings({"RECSTREAM_CONFIG": str(tmp_path / "missing.toml")})


def test_secrets_are_not_shown_in_repr() -> None:
    s = load_settings({"RECSTREAM_REDIS_PASSWORD": "hunter2"})
    assert "hunter2" not in repr(s)
    assert s.redis.password.get_secret_value() == "hunter2"


def test_env_var_names_cover_every_field() -> None:
    names = env_var_names()
    assert "RECSTREAM_HOME" in names and "RECSTREAM_KAFKA_BOOTSTRAP" in names
    assert "RECSTREAM_REDIS_URL" in names and "RECSTREAM_TRAIN_LOGQ_STRENGTH" in names
    for name in names:
        if name == "RECSTREAM_CONFIG":
            continue
        try:
            load_settings({name: "1"})
        except SettingsError as exc:  # a bad value is fine; an unknown name is not
            assert "unknown setting" not in str(exc)


def test_overrides_are_validated() -> None:
    s = load_settings({})
    assert s.with_overrides(train={"seed": 7}).train.seed == 7
    with pytest.raises(ValueError):
        s.with_overrides(train={"batch_size": 0})


def test_model_hash_changes_with_model_settings_only() -> None:
    a = load_settings({})
    assert a.model_hash() == load_settings({"RECSTREAM_TRAIN_SEED": "3"}).model_hash()
    assert a.model_hash() != load_settings({"RECSTREAM_MODEL_SENET": "1"}).model_hash()
