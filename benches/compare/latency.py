#!/usr/bin/env python3
"""Summarise h2load --log-file logs (start_us<TAB>status<TAB>duration_us per
request): requests, non-2xx, achieved rate, p50/p99/p999/max latency in µs.

usage: latency.py LOGFILE [SKIP_SECONDS=0]
       latency.py --skip SKIP_SECONDS LOGFILE...

Several logs (the slots of one target, compare.sh's fixed mode) are pooled:
each loses its own first SKIP_SECONDS, then the latencies are merged; the
rate is the requests over the sum of the logs' spans.
prints: count=N bad=N rate=R p50=US p99=US p999=US max=US
"""
import sys


def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def load(path, skip):
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    if rows:
        t0 = min(r[0] for r in rows)
        rows = [r for r in rows if r[0] - t0 >= skip * 1e6]
    span = (max(r[0] for r in rows) - min(r[0] for r in rows)) / 1e6 if len(rows) > 1 else 0
    return rows, span


args = sys.argv[1:]
try:
    if args and args[0] == "--skip":
        if len(args) < 2:
            raise ValueError("--skip needs a number of seconds")
        skip, paths = float(args[1]), args[2:]
    elif len(args) <= 2:
        paths, skip = args[:1], float(args[1]) if len(args) > 1 else 0.0
    else:
        raise ValueError("several logs take --skip first")
except (IndexError, ValueError) as e:
    sys.exit(f"latency.py: {e}\n{__doc__}")
if not paths:
    sys.exit(__doc__)

rows, span = [], 0.0
for p in paths:
    r, s = load(p, skip)
    rows += r
    span += s
bad = sum(1 for r in rows if not 200 <= r[1] < 300)
lat = sorted(r[2] for r in rows)
rate = len(rows) / span if span else 0
print(
    f"count={len(rows)} bad={bad} rate={rate:.0f} p50={pct(lat, 50)} "
    f"p99={pct(lat, 99)} p999={pct(lat, 99.9)} max={lat[-1] if lat else 'nan'}"
)
