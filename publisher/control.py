"""Promotion and rollback: flip Redis pointer, index and model weights as one step.

The Redis release pointer is what serving follows (user namespace and index are
both keyed by the version it names); the registry's champion/previous aliases are
what the nightly warm-starts from. A flip is a compare-and-set on the pointer, so
of two operators acting at once one wins and the other is told to look again; the
registry aliases follow the winner, and the change is announced over pub/sub.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from common.data.dataset import Dataset
from common.infra.settings import Settings
from common.infra.settings_groups import EvalSettings, PublisherSettings
from common.model.bundle import Features
from common.model.registry import Registry, RegistryError, VersionNotFoundError
from publisher.redis_faiss import FullPublishReport, RedisFaissPublisher, history_of
from publisher.redis_users import COMPLETE, Release, VersionStateError

log = logging.getLogger(__name__)


class GateRefusedError(RuntimeError):
    """The version's offline metrics do not allow promotion (override: ``--force``)."""


class PromotionAbandonedError(RuntimeError):
    """A wait for the stream's rebase was cut short; the champion is unchanged."""


@dataclass(frozen=True)
class VersionInfo:
    """One line of ``recstream publisher versions``."""

    version: str
    kind: str
    cutoff_ms: int
    metrics: dict[str, float]
    published: str  # complete | writing | no
    index: bool
    users: int
    rebased: bool
    role: str  # champion | previous | withdrawn | ""
    index_search: dict[str, Any] = field(default_factory=dict)  # nprobe and its sweep


class ReleaseControl:
    """Status, versions, promote and rollback over the registry and the publisher."""

    def __init__(self, publisher: RedisFaissPublisher, registry: Registry,
                 ps: PublisherSettings, es: EvalSettings, rating_threshold: float) -> None:
        self.pub, self.registry = publisher, registry
        self.ps, self.es = ps, es  # the rebase wait; the promotion gate
        self.rating_threshold = rating_threshold  # positives of the seen history published

    @classmethod
    def from_settings(cls, settings: Settings, publisher: RedisFaissPublisher | None = None,
                      registry: Registry | None = None) -> ReleaseControl:
        """Release control over ``settings``' registry and publisher (or the ones given)."""
        return cls(publisher or RedisFaissPublisher.from_settings(settings),
                   registry or Registry(settings.models_dir), settings.publisher,
                   settings.eval, settings.train.rating_threshold)

    def versions(self) -> list[VersionInfo]:
        release, published = self.pub.users.release(), self.pub.users.versions()
        withdrawn = self.pub.users.withdrawn()
        out = []
        for v in self.registry.versions():
            meta = self.registry.meta(v)
            red = published.get(v)
            role = ("champion" if v == release.champion else "previous"
                    if v == release.previous else "withdrawn" if v in withdrawn else "")
            out.append(VersionInfo(
                v, meta.get("kind", ""), int(meta.get("cutoff_ms", 0)), meta.get("metrics", {}),
                red.state if red else "no", self.pub.indexes.exists(v),
                red.users if red else 0, self.pub.users.rebased(v) is not None, role,
                self.pub.indexes.search_meta(v) if self.pub.indexes.exists(v) else {}))
        return out

    def status(self) -> dict[str, Any]:
        release = self.pub.users.release()
        aliases = self.registry.aliases()
        info = self.pub.users.r.info("memory")
        return {"release": asdict(release), "registry_aliases": aliases,
                "consistent": aliases["champion"] == release.champion,
                "redis_used_memory_bytes": int(info.get("used_memory", 0)),
                "versions": [asdict(v) for v in self.versions()]}

    def publish(self, version: str, dataset: Dataset, progress: bool = False
                ) -> FullPublishReport:
        """Fully publish a registered version (not released); side features, catalogue
        and seen history (events before its cutoff) come from ``dataset``."""
        bundle, meta = self.registry.load(version)
        cutoff = int(meta["cutoff_ms"])
        history = history_of(dataset.events.between(None, cutoff), self.rating_threshold)
        report = self.pub.publish_full(meta["version"], bundle,
                                       Features.build(bundle, dataset.users, dataset.items),
                                       dataset.catalog(), cutoff, history, progress)
        self.pub.prune()
        return report

    # -- flips ------------------------------------------------------------------------

    def promote(self, version: str, force: bool = False) -> Release:
        """Make ``version`` champion (gated unless ``force``); the old one is previous."""
        version = self.registry.resolve(version)
        release = self.pub.users.release()
        if release.champion == version:
            return release
        self._require_published(version)
        if not force:
            self.gate(version, release.champion)
        # Promoting an older version is a rollback in effect: the stream must leave the
        # current champion, so it is withdrawn as a rollback would.
        older = release.champion is not None and version < release.champion
        return self._flip(release, version, release.champion, "promote",
                          release.champion if older else None)

    def rollback(self, to: str | None = None, expected: Release | None = None) -> Release:
        """Serve ``to`` (default: the previous version) again; the current champion is
        withdrawn so the stream does not rebase back onto it.

        Without ``to``, a previous version that was itself withdrawn is refused: that is a
        second operator rolling back the same bad release, and it would bring the bad
        release back. With ``expected`` the flip happens only if the release is still
        exactly that one (compare-and-set on its sequence number)."""
        release = expected or self.pub.users.release()
        if release.champion is None:
            raise VersionNotFoundError("nothing is released yet: no champion to roll back")
        target = self.registry.resolve(to) if to else release.previous
        if target is None:
            raise VersionNotFoundError("no previous version to roll back to; name one: "
                                       "rollback --to V")
        if target == release.champion:
            raise VersionStateError(f"{target} is already the champion")
        if to is None and target in self.pub.users.withdrawn():
            raise VersionStateError(f"the previous version {target} was withdrawn (rolled "
                                    f"back from); {release.champion} stays champion; name "
                                    "another with: rollback --to V")
        self._require_published(target)
        return self._flip(release, target, release.champion, "rollback", release.champion)

    def promote_when_rebased(self, version: str, timeout_s: float | None = None,
                             poll_s: float = 0.5, force: bool = False,
                             keep_waiting: Callable[[], bool] = lambda: True) -> Release:
        """Wait until the stream reports ``version`` caught up (or the timeout), then
        promote: serving never loses the streamed updates since its cutoff. When
        ``keep_waiting`` turns false (a shutdown) it gives up without promoting."""
        timeout_s = self.ps.rebase_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while self.pub.users.rebased(version) is None and time.monotonic() < deadline:
            if not keep_waiting():
                raise PromotionAbandonedError(f"stopped while waiting for the stream's "
                                              f"rebase onto {version}; not promoted")
            time.sleep(poll_s)
        if self.pub.users.rebased(version) is None:
            log.warning("no rebase reported in time; promoting anyway",
                        extra={"version": version, "timeout_s": timeout_s})
        return self.promote(version, force=force)

    def gate(self, version: str, champion: str | None) -> None:
        """Refuse a version whose gate metric is missing, NaN or worse than the
        champion's beyond the tolerance (no champion: nothing to compare with).

        A nightly evaluated the champion on its own held-out events: when that champion
        is still the one, the nightly's decision on those events stands."""
        if champion is None:
            return
        name, tol = self.es.gate_metric, self.es.gate_tolerance
        meta = self.registry.meta(version)
        evaluated = meta.get("eval", {})
        if evaluated.get("against") == champion and evaluated.get("gate", {}).get("passed"):
            return
        value = meta.get("metrics", {}).get(name)
        if value is None or not math.isfinite(float(value)):
            raise GateRefusedError(f"{version} has no usable {name} ({value}); evaluate it "
                                   "or promote with --force")
        best = self.registry.meta(champion).get("metrics", {}).get(name)
        if best is not None and math.isfinite(float(best)) and value < best - tol:
            raise GateRefusedError(f"{version} {name}={value:.4f} is worse than champion "
                                   f"{champion}'s {best:.4f} beyond the tolerance {tol}; "
                                   "use --force to promote anyway")

    def _require_published(self, version: str) -> None:
        meta = self.pub.users.meta(version)
        if meta is None or meta.state != COMPLETE or not self.pub.indexes.exists(version):
            raise VersionStateError(f"{version} is not published completely (Redis "
                                    f"{meta.state if meta else 'absent'}, index "
                                    f"{'present' if self.pub.indexes.exists(version) else 'absent'}"
                                    f"); run: recstream publisher publish {version}")

    def _flip(self, release: Release, champion: str, previous: str | None, action: str,
              withdraw: str | None) -> Release:
        new = self.pub.users.flip(release.seq, champion, previous,
                                  {"type": action}, withdraw=withdraw)
        try:
            self.registry.set_aliases(champion=champion, previous=previous)
        except (RegistryError, OSError) as exc:
            log.error("release flipped but the registry aliases could not follow",
                      extra={"error": str(exc), "champion": champion})
            raise
        log.info(action, extra={"champion": champion, "previous": previous,
                                "seq": new.seq})
        self.pub.prune()
        return new
