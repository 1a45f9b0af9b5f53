"""Summarises hack/bench/flood.sh's ghz runs: the legitimate tenant's latency in the first
5 s of the flood and after, against its baseline; how the attacker's requests ended; how
requests ended at 3x overload with 1 s deadlines, from ghz and from the frontend's metrics.
Usage: flood_report.py OUT_DIR FLOOD_AFTER_SECONDS"""
import collections
import datetime
import json
import os
import re
import sys

out, flood_after = sys.argv[1], float(sys.argv[2])


def load(name):
    with open(os.path.join(out, name + ".json")) as f:
        return json.load(f)


def when(ts):
    # ghz writes RFC 3339 with nanoseconds; Python parses microseconds.
    ts = re.sub(r"(\.\d{6})\d+", r"\1", ts).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(ts).timestamp()


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def ok_latencies_ms(details, start=None, end=None):
    return [
        d["latency"] / 1e6
        for d in details
        if d.get("status") == "OK"
        and (start is None or when(d["timestamp"]) >= start)
        and (end is None or when(d["timestamp"]) < end)
    ]


def line(name, lat, sent):
    return (f"{name:34} ok {len(lat):4}/{sent:<4} p50 {pct(lat, 50):7.1f} ms  "
            f"p99 {pct(lat, 99):7.1f} ms  max {max(lat, default=float('nan')):7.1f} ms")


def flood():
    base = load("baseline")["details"]
    legit = load("flood-legit")["details"]
    attacker = load("flood-attacker")
    t0 = min(when(d["timestamp"]) for d in attacker["details"])
    base_lat = ok_latencies_ms(base)
    first = ok_latencies_ms(legit, t0, t0 + 5)
    steady = ok_latencies_ms(legit, t0 + 5)
    during = ok_latencies_ms(legit, t0)
    print("legitimate tenant (latency of successful Generate calls):")
    print(line("  baseline (alone)", base_lat, len(base)))
    print(line("  flood, first 5 s", first, sum(1 for d in legit if t0 <= when(d["timestamp"]) < t0 + 5)))
    print(line("  flood, after the first 5 s", steady, sum(1 for d in legit if when(d["timestamp"]) >= t0 + 5)))
    print(line("  flood, whole flood", during, sum(1 for d in legit if when(d["timestamp"]) >= t0)))
    b99 = pct(base_lat, 99)
    print(f"  p99 whole flood / baseline p99: {pct(during, 99) / b99:.2f}x; "
          f"first 5 s: {pct(first, 99) / b99:.2f}x; legit errors: "
          f"{dict(collections.Counter(d['status'] for d in legit if d['status'] != 'OK'))}")
    for d in legit:
        if d["status"] != "OK":
            # ghz closing its connection when its duration ends cuts what is in flight.
            print(f"    {d['status']} at +{when(d['timestamp']) - t0:.1f} s: {d.get('error', '')[:120]}")
    print("attacker:", dict(collections.Counter(d["status"] for d in attacker["details"])))


def deadlines():
    dl = load("deadlines")
    print("3x overload, 1 s deadlines (ghz):", dict(collections.Counter(d["status"] for d in dl["details"])))
    for message, n in sorted(dl.get("errorDistribution", {}).items(), key=lambda kv: -kv[1])[:6]:
        print(f"  {n:5}  {message[:150]}")
    with open(os.path.join(out, "deadlines-metrics.txt")) as f:
        metrics = f.read()
    for l in metrics.splitlines():
        if l.startswith(("switchyard_admission_requests_total{", "switchyard_admission_accepted_total",
                         "switchyard_admission_deadline_misses_total", "switchyard_requests_total{")) \
                and not l.endswith(" 0"):
            print("  " + l)


if os.path.exists(os.path.join(out, "flood-attacker.json")):
    flood()
if os.path.exists(os.path.join(out, "deadlines.json")):
    deadlines()
