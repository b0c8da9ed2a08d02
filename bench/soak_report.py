"""The soak's verdicts and report: RSS bounded or not, the reconciliation of what was
produced with what the daemons counted, latency from both ends, and the printed table."""

from __future__ import annotations

import argparse
import os
from typing import Any

# bench/harness.py puts the repository root on sys.path for the project imports below.
import harness
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from recstream.demo_report import Histogram, read_histogram


def rss_verdict(samples: list[tuple[float, float]], tolerance: float,
                slack_mib: float) -> dict[str, Any]:
    """Start, peak and end RSS; bounded when the last third's peak stays within the first
    third's peak × (1 + tolerance) + slack. The slope (least squares over the last two
    thirds, MiB/min) is reported beside it."""
    if len(samples) < 6:
        return {"samples": len(samples), "bounded": False, "why": "too few samples"}
    t, mib = np.array([s[0] for s in samples]), np.array([s[1] for s in samples])
    third = len(samples) // 3
    first_max, last_max = float(mib[:third].max()), float(mib[-third:].max())
    slope = float(np.polyfit(t[third:], mib[third:], 1)[0]) * 60
    return {"start_mib": float(mib[0]), "peak_mib": float(mib.max()), "end_mib": float(mib[-1]),
            "first_third_max_mib": first_max, "last_third_max_mib": last_max,
            "slope_mib_per_min": round(slope, 2), "samples": len(samples),
            "bounded": last_max <= first_max * (1 + tolerance) + slack_mib}


def minus(later: Histogram, earlier: Histogram) -> Histogram:
    """The observations ``later`` holds beyond ``earlier`` (same metric, scraped twice)."""
    if not earlier.count:
        return later
    return Histogram(later.bounds, [a - b for a, b in zip(later.cumulative, earlier.cumulative,
                                                          strict=True)],
                     later.total - earlier.total, later.count - earlier.count)


def by_label(text: str, name: str, label: str) -> dict[str, int]:
    """A labelled counter's values per ``label`` from a /metrics text."""
    return {str(x.labels[label]): int(x.value) for family in text_string_to_metric_families(text)
            if family.name == name for x in family.samples if x.name == name + "_total"}


def _ms(h: Histogram, q: float) -> float:
    return round(h.quantile(q) * 1e3, 2)


def summarise(args: argparse.Namespace, f: dict[str, Any]) -> dict[str, Any]:
    """The figures, the RSS verdicts, the reconciliation and the checks."""
    p = f["produced"]
    fresh = minus(read_histogram(f["trainer_metrics"], "recstream_stream_freshness_seconds"),
                  f["freshness_at_warmup"])
    serving, rss, reconciliation = serving_figures(args, f), rss_report(args, f), reconcile(f)
    checks = {"reconciliation": reconciliation["trainer_holds"]
              and reconciliation["lander_holds"],
              "rss_bounded": all(r["bounded"] for r in rss.values() if r["judged"]),
              "no_5xx_or_failed_requests": serving["errors_5xx"] == 0
              and serving["failed"] == 0,
              "daemons_alive": all(f["alive"].values())}
    return {
        "passed": all(checks.values()), "checks": checks,
        "events": {**p, "offered_per_s": args.rate,
                   "trainer_applied_per_s_during_load": round(
                       (f["applied_at_load_end"] - f["warmup_events"]) / p["seconds"], 1),
                   "drain_s": f["drain_s"]},
        "freshness_p50_s": fresh.quantile(0.5), "freshness_p99_s": fresh.quantile(0.99),
        "freshness_count": fresh.count, "serving": serving, "rss": rss,
        "reconciliation": reconciliation,
        "broker": f["broker"], "redis": f["redis"], "champion": f["champion"]}


def serving_figures(args: argparse.Namespace, f: dict[str, Any]) -> dict[str, Any]:
    """Latency as the load generator measured it and as the server's histogram has it."""
    q = f["queries"]
    server = read_histogram(f["serving_metrics"], "recstream_serving_request_seconds")
    lat = np.asarray(q["latencies"]) * 1e3 if q["latencies"] else np.zeros(1)
    return {"client_p50_ms": harness.percentile(lat, 50, 2),
            "client_p99_ms": harness.percentile(lat, 99, 2),
            "client_max_ms": round(float(lat.max()), 2), "qps_offered": args.qps,
            "qps_achieved": round(len(q["latencies"]) / q["seconds"], 1),
            "requests": len(q["latencies"]), "status": q["status"],
            "errors_5xx": sum(n for code, n in q["status"].items() if int(code) >= 500),
            "failed": q["failed"], "fallbacks": q["fallbacks"],
            "fallback_reasons": by_label(f["serving_metrics"], "recstream_serving_fallbacks",
                                         "reason"),
            "server_p50_ms": _ms(server, 0.5), "server_p99_ms": _ms(server, 0.99),
            "server_count": server.count}


def rss_report(args: argparse.Namespace, f: dict[str, Any]) -> dict[str, Any]:
    """Each process tree's RSS verdict over the load (broker and Redis reported, not judged)."""
    rss = {}
    for name, samples in f["rss_samples"].items():
        in_load = [s for s in samples if s[0] <= f["load_end_s"]]
        rss[name] = {**rss_verdict(in_load, args.rss_tolerance, args.rss_slack_mib),
                     "judged": name not in ("broker", "redis"),
                     "processes": f["rss_processes"][name], "timeline": samples}
    return rss


def reconcile(f: dict[str, Any]) -> dict[str, Any]:
    """Produced = applied + dead-lettered = landed + lander rejects; dead letters = poison."""
    p, c = f["produced"], f["counters"]
    total = f["warmup_events"] + p["events"] + p["poison"]
    return {"produced": total, "warmup_events": f["warmup_events"], "poison_sent": p["poison"],
            **c, "dead_letter_reasons": by_label(f["trainer_metrics"],
                                                 "recstream_stream_events_rejected", "reason"),
            "trainer_holds": total == c["applied"] + c["dead_lettered"]
            and c["dead_lettered"] == p["poison"],
            "lander_holds": total == c["landed"] + c["lander_rejected"]
            and c["lander_rejected"] == p["poison"] and c["lander_duplicates"] == 0}


def print_table(args: argparse.Namespace, r: dict[str, Any]) -> None:
    e, sv, rc = r["events"], r["serving"], r["reconciliation"]
    print(f"soak: {args.duration:g} s at {args.rate:,.0f} events/s offered and {args.qps:g} "
          f"QPS, {os.cpu_count()} cpus, broker {r['broker']}, redis {r['redis']}")
    rows = [("events produced", f"{e['events']:,} + {e['poison']} poison in {e['seconds']} s:"
             f" {e['events_per_s']:,.0f} events/s"),
            ("trainer applied during load", f"{e['trainer_applied_per_s_during_load']:,.0f} "
             f"events/s (drained {e['drain_s']} s after the load)"),
            ("freshness (trainer histogram)", f"p50 {r['freshness_p50_s']} s, p99 "
             f"{r['freshness_p99_s']} s over {r['freshness_count']:,} events"),
            ("recall API (load generator)", f"p50 {sv['client_p50_ms']} ms, p99 "
             f"{sv['client_p99_ms']} ms, max {sv['client_max_ms']} ms; {sv['requests']:,} "
             f"requests at {sv['qps_achieved']} QPS, status {sv['status']}, "
             f"{sv['failed']} failed, fallbacks {sv['fallback_reasons']}"),
            ("recall API (server histogram)", f"p50 {sv['server_p50_ms']} ms, p99 "
             f"{sv['server_p99_ms']} ms over {sv['server_count']:,} requests")]
    harness.print_rows(rows, 31)
    print(f"  {'RSS MiB':<12}{'start':>8}{'peak':>8}{'end':>8}{'1st⅓ max':>10}"
          f"{'last⅓ max':>11}{'MiB/min':>9}  verdict")
    for name, v in r["rss"].items():
        if "start_mib" not in v:
            print(f"  {name:<12}{v['why']}")
            continue
        verdict = ("bounded" if v["bounded"] else "UNBOUNDED") if v["judged"] else "(info)"
        print(f"  {name:<12}{v['start_mib']:>8.0f}{v['peak_mib']:>8.0f}{v['end_mib']:>8.0f}"
              f"{v['first_third_max_mib']:>10.0f}{v['last_third_max_mib']:>11.0f}"
              f"{v['slope_mib_per_min']:>9.1f}  {verdict}"
              + (f" ({v['processes']} processes)" if v["processes"] > 1 else ""))
    print(f"  reconciliation: produced {rc['produced']:,} = applied {rc['applied']:,} + "
          f"dead-lettered {rc['dead_lettered']:,} {rc['dead_letter_reasons']}: "
          f"{_holds(rc['trainer_holds'])}; = landed "
          f"{rc['landed']:,} + lander rejects {rc['lander_rejected']:,} (duplicates "
          f"{rc['lander_duplicates']}): {_holds(rc['lander_holds'])}")
    failed = [k for k, ok in r["checks"].items() if not ok]
    print(f"  verdict: {'PASS' if r['passed'] else 'FAIL: ' + ', '.join(failed)}")


def _holds(ok: bool) -> str:
    return "holds" if ok else "FAILS"
