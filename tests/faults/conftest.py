"""The fault-injection suite: each case injects faults into real processes, brokers and
Redis servers, recovers, and records what it saw; the run ends with a summary table
(faults injected, recoveries, events lost, versions corrupted: the last two must be 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from recstream.daemons import Daemons

_KEY = pytest.StashKey["FaultLog"]()


@dataclass
class FaultRecord:
    case: str
    injected: int = 0
    recovered: int = 0
    events_lost: int = 0
    versions_corrupted: int = 0
    recovery_s: list[float] = field(default_factory=list)


@dataclass
class FaultLog:
    """What every fault case injected and how the system came back."""

    records: dict[str, FaultRecord] = field(default_factory=dict)

    def case(self, name: str) -> FaultRecord:
        return self.records.setdefault(name, FaultRecord(name))


@pytest.fixture(scope="session")
def fault_log(pytestconfig: pytest.Config) -> Iterator[FaultLog]:
    log = pytestconfig.stash.setdefault(_KEY, FaultLog())
    yield log


@pytest.fixture
def fault(fault_log: FaultLog, request: pytest.FixtureRequest) -> FaultRecord:
    """This test's record in the summary table."""
    return fault_log.case(request.node.name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    log = config.stash.get(_KEY, None)
    if log is None or not log.records:
        return
    tr = terminalreporter
    tr.section("fault injection summary")
    width = max(len(r.case) for r in log.records.values())
    tr.write_line(f"{'case':<{width}}  injected  recovered  events lost  versions corrupted"
                  "  slowest recovery")
    totals = FaultRecord("total")
    for r in log.records.values():
        slowest = f"{max(r.recovery_s):.1f} s" if r.recovery_s else "-"
        tr.write_line(f"{r.case:<{width}}  {r.injected:>8}  {r.recovered:>9}  "
                      f"{r.events_lost:>11}  {r.versions_corrupted:>18}  {slowest:>16}")
        totals.injected += r.injected
        totals.recovered += r.recovered
        totals.events_lost += r.events_lost
        totals.versions_corrupted += r.versions_corrupted
    tr.write_line(f"{'total':<{width}}  {totals.injected:>8}  {totals.recovered:>9}  "
                  f"{totals.events_lost:>11}  {totals.versions_corrupted:>18}")


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """Start daemons through this; all are stopped when the test ends."""
    running = Daemons()
    try:
        yield running
    finally:
        running.stop_all()
