"""The settings groups: one frozen model per component (``settings.kafka`` is a
``KafkaSettings``), each validating its own fields, so a component can be handed its
group alone.

A group's fields are ``RECSTREAM_<GROUP>_<FIELD>`` variables (see ``common.infra.settings``
for how they are read). Values checked against each other (SASL credentials against the
protocol, a password against its file) are checked in field order: a validator reads the
fields declared before its own from ``info.data``.

>>> ModelSettings(hidden_dims=[128, 64]).hidden_dims
(128, 64)
>>> "hunter2" in repr(RedisSettings(password="hunter2"))
False
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _existing_file(path: str) -> str:
    try:
        if not path or Path(path).is_file():
            return path
    except (OSError, ValueError):
        pass
    raise ValueError("no such file")


def _secret_file(path: str) -> str:
    """The secret a file holds (a trailing newline dropped), or ValueError saying why."""
    try:
        secret = Path(path).read_text().removesuffix("\n").removesuffix("\r")
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
        raise ValueError(f"cannot read the file: {reason}") from None
    if not secret:
        raise ValueError("the file is empty")
    return secret


def _readable_secret_file(path: str) -> str:
    if path:
        _secret_file(path)
    return path


# A file holding a secret: readable and not empty at start-up (the secret itself is read
# by the password field's validator).
SecretFile = Annotated[str, AfterValidator(_readable_secret_file)]


def _secret(value: SecretStr, path: str, name: str) -> SecretStr:
    """The secret from ``value`` or from the file at ``path`` (one of them, not both)."""
    if not path:
        return value
    from_file = _secret_file(path)
    if value.get_secret_value() and value.get_secret_value() != from_file:
        raise ValueError(f"set {name} or {name}_FILE, not both")
    return SecretStr(from_file)


class KafkaSettings(_Group):
    """Broker connection and topics. Empty bootstrap = start the embedded broker.

    SASL_* protocols need a mechanism, a user and a password (or password file); SSL
    files must exist; SASL and SSL settings a protocol would ignore are refused.
    """

    bootstrap: str = ""
    topic: str = "interactions"
    dlq_topic: str = "interactions.dlq"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str = Field("", validate_default=True,
                                description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_username: str = Field("", validate_default=True)
    sasl_password_file: SecretFile = Field("", description="a file holding the SASL password "
                                    "(read at start-up; instead of sasl_password)")
    sasl_password: SecretStr = Field(SecretStr(""), validate_default=True)
    ssl_cafile: str = Field("", description="CA bundle to verify the brokers (SSL, SASL_SSL)")
    ssl_certfile: str = Field("", description="client certificate (SSL, SASL_SSL)")
    ssl_keyfile: str = Field("", description="client certificate's key (SSL, SASL_SSL)")
    max_message_bytes: int = Field(64 * 1024, gt=0)
    # Quick group joins (see ARCHITECTURE, broker facts): first records in ~3 s, not ~23 s.
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    max_poll_interval_ms: int = Field(30000, ge=1000)
    max_poll_records: int = Field(5000, ge=1)
    fetch_max_wait_ms: int = Field(50, ge=1, le=10_000, description="how long a fetch "
                                   "may wait for records: the embedded broker answers an "
                                   "empty fetch only after this, so it bounds freshness")
    partitions: int = Field(4, ge=1, description="partitions of the topic when recstream "
                            "creates it (an existing topic is left as it is)")

    @field_validator("sasl_mechanism")
    @classmethod
    def _mechanism(cls, v: str, info: ValidationInfo) -> str:
        if v and v not in SASL_MECHANISMS:
            raise ValueError(f"must be one of {', '.join(SASL_MECHANISMS)}")
        return cls._sasl_only(v, info)

    @field_validator("sasl_username")
    @classmethod
    def _sasl_only(cls, v: str, info: ValidationInfo) -> str:
        """Required with SASL_*, refused without (credentials that would go unused)."""
        protocol = info.data.get("security_protocol")
        if protocol is None:  # invalid itself: that error is the one reported
            return v
        if protocol.startswith("SASL_") and not v:
            raise ValueError(f"required with security_protocol {protocol}")
        if v and not protocol.startswith("SASL_"):
            raise ValueError(f"is only used with security_protocol SASL_PLAINTEXT or "
                             f"SASL_SSL, not {protocol}")
        return v

    @field_validator("sasl_password")
    @classmethod
    def _password(cls, v: SecretStr, info: ValidationInfo) -> SecretStr:
        v = _secret(v, info.data.get("sasl_password_file", ""),
                    "RECSTREAM_KAFKA_SASL_PASSWORD")
        cls._sasl_only("*" if v.get_secret_value() else "", info)
        return v

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _ssl_file(cls, v: str, info: ValidationInfo) -> str:
        protocol = info.data.get("security_protocol")
        if v and protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
            raise ValueError(f"is only used with security_protocol SSL or SASL_SSL, "
                             f"not {protocol}")
        return _existing_file(v)


class RedisSettings(_Group):
    """Redis connection and the published layout. Empty url = start the embedded server.

    A password may come in the URL (``redis://:secret@host``), from ``password`` or from
    ``password_file``, one of them; the URL is then a secret too and never shown.
    """

    url: str = Field("", repr=False, description="redis://, rediss:// (TLS) or unix://")
    username: str = Field("", description="ACL user (needs its password)")
    password_file: SecretFile = Field("", description="a file holding the password (read at "
                               "start-up; instead of password)")
    password: SecretStr = Field(SecretStr(""), validate_default=True)
    tls: bool = False
    tls_ca_file: str = Field("", description="CA bundle to verify the server (TLS only)")
    cluster: bool = Field(False, description="connect with the Redis Cluster client")
    socket_timeout_s: float = Field(5.0, gt=0)
    prefix: str = Field("rs", min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")
    retention_versions: int = Field(3, ge=1, description="published versions kept (the "
                                    "champion and previous are never removed)")
    bucket_size: int = Field(
        512, ge=1, description="users per hash bucket of a published version")
    pipeline_fields: int = Field(20_000, ge=1, description="hash fields per pipeline flush")
    seen_max: int = Field(500, ge=0, description="items kept per user for seen filtering")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v:
            return v
        try:  # messages never quote the URL: it may hold a password
            parts = urlsplit(v)
            parts.port  # noqa: B018 - parsing it is the check
        except ValueError:
            raise ValueError("is not a valid URL (bad host or port)") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
        return v

    @field_validator("password")
    @classmethod
    def _password(cls, v: SecretStr, info: ValidationInfo) -> SecretStr:
        v = _secret(v, info.data.get("password_file", ""), "RECSTREAM_REDIS_PASSWORD")
        in_url = urlsplit(info.data.get("url", "")).password
        if in_url and v.get_secret_value():
            raise ValueError("the URL holds a password too: set one of them")
        if info.data.get("username") and not (in_url or v.get_secret_value()):
            raise ValueError("required with RECSTREAM_REDIS_USERNAME (an ACL user signs in "
                             "with its password)")
        return v

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_file(cls, v: str, info: ValidationInfo) -> str:
        if v and not (info.data.get("tls") or info.data.get("url", "").startswith("rediss:")):
            raise ValueError("is only used with TLS: set RECSTREAM_REDIS_TLS=true")
        return _existing_file(v)


class IndexSettings(_Group):
    """The FAISS item index: exact below ``exact_max_items``, IVF above."""

    exact_max_items: int = Field(100_000, ge=1)
    ivf_nlist: int = Field(0, ge=0, description="IVF lists; 0 = about 4 x sqrt(items), at "
                           "most train_sample / 39")
    ivf_nprobe: int = Field(0, ge=0, description="lists searched per query; 0 = the fewest "
                            "that find target_recall of the exact top-100 for a sample of "
                            "the version's users, measured at its build")
    target_recall: float = Field(0.95, gt=0, le=1, description="recall@100 against exact "
                                 "search that the build's nprobe sweep asks for")
    tune_queries: int = Field(200, ge=0, description="users whose served vectors the sweep "
                              "searches with (0 = no sweep: a quarter of the lists)")
    ivf_train_iters: int = Field(10, ge=1, description="k-means iterations of the IVF "
                                 "quantiser (FAISS' default 25 took twice as long at 1M items "
                                 "for the same recall at the same nprobe)")
    train_sample: int = Field(100_000, ge=1000, description="vectors the IVF quantiser is "
                              "trained on")
    snapshot_every_deltas: int = Field(
        100, ge=1, description="rewrite the index file after this many deltas (each delta "
        "is durable in its own file at once)")
    threads: int = Field(0, ge=0, description="FAISS OpenMP threads; 0 = FAISS default")


class PublisherSettings(_Group):
    """Promotion and the champion flip after a rebase."""

    rebase_timeout_s: float = Field(
        900.0, gt=0, description="promote a nightly this long after its publish even if "
        "the stream has not reported the rebase")


class ServingSettings(_Group):
    """The recall API."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_k: int = Field(1000, ge=1)
    default_k: int = Field(50, ge=1)
    popular_items: int = Field(1000, ge=1, description="fallback list length")
    version_poll_s: float = Field(
        2.0, gt=0, description="read the release pointer this often in case a pub/sub "
        "message was missed")
    threads: int = Field(1, ge=0, description="torch threads; 0 = torch default")


class ModelSettings(_Group):
    """Two-tower architecture knobs (saved with each model version)."""

    embedding_dim: int = Field(32, ge=2, le=1024)
    feature_dim: int = Field(16, ge=1, le=1024)
    hidden_dims: tuple[int, ...] = (64,)
    output_dim: int = Field(32, ge=2, le=1024)
    senet: bool = False
    temperature: float = Field(0.1, gt=0, description="score = cosine / temperature (0.1 "
                               "chosen on the freshness curve's validation days)")
    min_count: int = Field(2, ge=1)
    freq_hash_size: int = Field(1 << 20, ge=16)
    freq_num_hashes: int = Field(2, ge=1, le=8)
    freq_alpha: float = Field(0.01, gt=0, le=1)
    # --- issue 14: the user tower's history field ---
    history_len: int = Field(
        50, ge=0, le=1000, description="the user's last N positives pooled into the user tower "
        "(0 = ID row and side features only)")
    history_pooling: Literal["decay", "attention"] = Field(
        "attention", description="time-decayed mean, or a small learned attention")
    history_half_life_h: float = Field(
        24.0, gt=0, description="half-life of the decayed mean's weights, in hours")
    history_input: Literal["ids", "vectors"] = Field(
        "vectors", description="pool item-ID rows into an MLP field, or pool item vectors and "
        "add them to the user vector")
    prior_beta: float = Field(
        0.0, ge=0, description="weight of the decayed-popularity prior folded into the "
        "served vectors (one more dimension; 0 = none)")
    prior_half_life_days: float = Field(
        30.0, gt=0, description="half-life of the prior's item counts, in days")


class TrainSettings(_Group):
    """Optimisation knobs for the bootstrap, nightly and stream updates."""

    loss: Literal["inbatch", "pointwise"] = "inbatch"
    batch_size: int = Field(128, ge=2, description="small batches: more steps per epoch; the "
                            "in-batch softmax on ML-100K barely trains at 1024")
    bootstrap_epochs: int = Field(
        5, ge=1, description="bootstrap epochs counted in examples: with recency sampling each "
        "pass keeps a share of the history, so epochs / share passes are made")
    lr_dense: float = Field(3e-3, gt=0)
    lr_embedding: float = Field(0.05, gt=0)
    nightly_lr_dense: float = Field(
        3e-4, gt=0, description="dense Adam lr of the one-epoch nightly: a day's data is "
        "small, and a fresh optimiser at the bootstrap lr drags the towers off")
    weight_decay: float = Field(0.0, ge=0)
    logq_strength: float = Field(
        1.5, ge=0, description="multiplier on log q; above 1 the model keeps a popularity prior "
        "in the cosine (it learns log p(i|u) + (strength - 1) log q(i))")
    random_negatives: int = Field(0, ge=0)
    pointwise_negatives: int = Field(4, ge=1)
    hot_item_threshold: float = Field(0.0, ge=0, description="0 disables down-sampling")
    recency_half_life_days: float = Field(
        20.0, ge=0, description="keep an example a days older than the newest with prob "
        "0.5^(a/h) in each pass; 0=off")
    rating_threshold: float = 4.0
    max_grad_norm: float = Field(10.0, gt=0)
    max_loss: float = Field(1e4, gt=0, description="a loss above this counts as divergence")
    seed: int = 0
    threads: int = Field(0, ge=0, description="torch threads; 0 = torch default")
    # --- issue 14 ---
    user_id_dropout: float = Field(
        0.3, ge=0, lt=1, description="share of full-training examples whose user row is "
        "swapped for the cold row, so history and features learn to carry new users")
    item_lr_scale: float = Field(
        1.0, ge=0, description="item ID rows step at lr_embedding times this (the stream "
        "sets its own: one user's few events should move their row, not everyone's items)")


class StreamSettings(_Group):
    """The stream daemons: the trainer consumer and the lander."""

    trainer_group: str = "trainer"
    publisher: Literal["redis", "files"] = Field(
        "redis", description="where the trainer publishes deltas: Redis + FAISS indexes, "
        "or files under RECSTREAM_HOME/published (no serving; for trials)")
    lander_group: str = "lander"
    update_interval_s: float = Field(
        300.0, gt=0, description="gather a micro-batch this long (from the oldest record's "
        "arrival, less up to half of it for the time that record was already on the way)")
    max_batch_events: int = Field(50_000, ge=1, description="or until this many events")
    batch_size: int = Field(
        512, ge=2, description="examples per embedding-only step (the nightly uses "
        "train.batch_size); larger steps keep up with 50k events/s")
    lr_embedding: float = Field(
        0.5, gt=0, description="row-wise Adagrad lr of the stream's ID rows (chosen on the "
        "freshness curve's validation days; small steps are topped up to min_batch)")
    threads: int = Field(1, ge=0, description="torch threads of the trainer daemon; one "
                         "leaves a core to polling and decoding; 0 = torch default")
    checkpoint_every_steps: int = Field(10, ge=1)
    checkpoints_kept: int = Field(2, ge=1)
    poll_timeout_ms: int = Field(100, ge=1)
    rebase_check_s: float = Field(5.0, gt=0, description="how often to look for a new version")
    time_index_days: float = Field(
        7.0, gt=0, description="how far back the time->offset index reaches (rebase window)")
    lander_flush_s: float = Field(30.0, gt=0, description="write a Parquet file this often")
    lander_max_rows: int = Field(200_000, ge=1, description="or at this many buffered rows")
    metrics_host: str = "127.0.0.1"
    trainer_metrics_port: int = Field(9410, ge=0, le=65535, description="0 = no endpoint")
    lander_metrics_port: int = Field(9411, ge=0, le=65535, description="0 = no endpoint")
    # --- issue 14: stream steps that stay sane on small windows ---
    # Defaults from the freshness-curve sweep (bench/results/freshness_sweep.json): at 60 s
    # windows, replay + negatives + user rows only took recall@50 from 0.20 to 0.46.
    replay_size: int = Field(
        2048, ge=0, description="recent positives kept to top up small steps (0 = no replay)")
    min_batch: int = Field(
        128, ge=2, description="a step's new positives are topped up from the replay to this")
    random_negatives: int = Field(
        128, ge=0, description="catalogue negatives (prob ∝ count^0.75) added to each step")
    item_lr_scale: float = Field(
        0.0, ge=0, description="item rows step at lr_embedding times this (0 = users only: "
        "one user's events then never move another user's answers)")


class EvalSettings(_Group):
    """Offline evaluation and the registry gate."""

    ks: tuple[int, ...] = (10, 50)
    gate_metric: str = "recall@50"
    gate_tolerance: float = Field(0.02, ge=0)


class NightlySettings(_Group):
    """The nightly job (``recstream nightly``) and the scheduler daemon that runs it."""

    cron: str = Field(
        "0 2 * * *", description="when the scheduler runs the nightly: crontab fields minute "
        "hour day month weekday (0 or 7 = Sunday), or six with seconds first")
    timezone: str = Field("", description="IANA zone of the cron schedule; empty = the "
                          "machine's local zone")
    misfire_grace_s: int = Field(3600, ge=1, description="a run missed (scheduler down or "
                                 "busy) by less than this still runs; missed runs coalesce")
    lock_ttl_s: float = Field(60.0, ge=2, description="the Redis lock that keeps two "
                              "schedulers apart expires this long after its holder stops "
                              "renewing it")
    catchup_days: int = Field(3, ge=1, description="at most this many not yet trained days "
                              "per run, oldest first")
    lateness_s: float = Field(600.0, ge=0, description="a day counts as landed once the "
                              "lander's watermark passed the next midnight by this much")
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5, description="the day's latest events "
                                    "held out to evaluate the candidate against the champion")
    eval_max_users: int = Field(5000, ge=1, description="held-out users evaluated at most "
                                "(a seeded sample)")
    gate_min_users: int = Field(100, ge=0, description="with fewer held-out users the gate "
                                "compares no figures (they are noise); it still refuses a "
                                "NaN/inf loss")
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9412, ge=0, le=65535, description="the scheduler's /metrics; "
                              "0 = no endpoint")
    guard_events: int = Field(2000, ge=0, description="after a promotion, score the new and "
                              "the previous champion on this many streamed positives and "
                              "roll back a worse one; 0 = no guard")
    guard_tolerance: float = Field(0.02, ge=0, description="roll back when the new "
                                   "champion's recall is below the previous one's by more")
    guard_timeout_s: float = Field(3600.0, gt=0, description="give up (no decision) when "
                                   "the events have not streamed in by then")
