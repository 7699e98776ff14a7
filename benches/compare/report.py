#!/usr/bin/env python3
"""Turns a compare.sh work directory into benches/RESULTS.md (and prints the
tables). Medians over rounds; a ratio to HAProxy is taken per round (same
round, minutes apart at most) and then its median is reported.

usage: report.py WORKDIR OUT.md
"""
import os
import statistics
import sys
from collections import defaultdict

work, out = sys.argv[1], sys.argv[2]

# data[mode][target][key][round] = float
data = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
with open(os.path.join(work, "results.tsv")) as f:
    for line in f:
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 5:
            continue
        mode, target, rnd, key, value = parts
        try:
            data[mode][target][key][int(rnd)] = float(value)
        except ValueError:
            pass


def read(name):
    p = os.path.join(work, name)
    return open(p).read() if os.path.exists(p) else ""


meta = {}
for line in read("meta.txt").splitlines():
    if "=" in line:
        k, v = line.split("=", 1)
        meta[k] = v


settings = {}
for part in meta.get("settings", "").split():
    if "=" in part:
        k, v = part.split("=", 1)
        settings[k] = v.strip('"')
DUR = settings.get("DUR", "10s")
DUR_SHORT = settings.get("DUR_SHORT", "8s")


def total(mode, target, key):
    return sum(data[mode][target][key].values())


def med(mode, target, key):
    vals = list(data[mode][target][key].values())
    return statistics.median(vals) if vals else None


def spread(mode, target, key):
    vals = list(data[mode][target][key].values())
    if len(vals) < 2:
        return ""
    m = statistics.median(vals)
    if not m:
        return ""
    return f" ±{(max(vals) - min(vals)) / 2 / abs(m) * 100:.0f}%"


def ratio(mode, target, key, ref):
    a = data[mode][target][key]
    b = data[mode][ref][key]
    rs = [a[r] / b[r] for r in a if r in b and b[r]]
    return statistics.median(rs) if rs else None


def ratios(mode, target, key, ref):
    """The ratio in each round both were measured, by round."""
    a = data[mode][target][key]
    b = data[mode][ref][key]
    return {r: a[r] / b[r] for r in sorted(a) if r in b and b[r]}


def diffs(mode, target, key, ref):
    a = data[mode][target][key]
    b = data[mode][ref][key]
    return {r: a[r] - b[r] for r in sorted(a) if r in b}


def values(mode, target, key):
    return dict(sorted(data[mode][target][key].items()))


def diff(mode, target, key, ref):
    a = data[mode][target][key]
    b = data[mode][ref][key]
    ds = [a[r] - b[r] for r in a if r in b]
    return statistics.median(ds) if ds else None


def fmt(v, digits=0, suffix=""):
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}{suffix}"
    return f"{v:,.{digits}f}{suffix}"


def fx(v):
    return "–" if v is None else f"{v:.2f}×"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


NAMES = {
    "cyan": "cyan (access log off)",
    "cyan-log": "cyan (access log on, file)",
    "haproxy": "HAProxy 2.6",
    "haproxy-log": "HAProxy 2.6 (httplog to a file)",
    "nginx": "nginx 1.22",
    "direct": "direct (no proxy)",
    "cyan-mt": "cyan (all cores)",
    "haproxy-mt": "HAProxy (default nbthread)",
    "nginx-mt": "nginx (worker_processes auto)",
    "direct-mt": "direct (no proxy)",
}

sections = []
# (name, median measured, goal, kind, per round [(measured, goal)])
summary_targets = []


def per_round(measured, goal):
    """Pairs each round's measurement with its goal: a number, or a goal
    measured per round too (HAProxy's added latency)."""
    if isinstance(goal, dict):
        return [(measured[r], goal[r]) for r in measured if r in goal]
    return [(v, goal) for v in measured.values()]

# ---- closed loop
if "closed" in data:
    rows = []
    for t in ["cyan", "cyan-log", "haproxy", "haproxy-log", "nginx", "direct"]:
        if t not in data["closed"]:
            continue
        rows.append([
            NAMES[t],
            fmt(med("closed", t, "rps")) + spread("closed", t, "rps"),
            fx(ratio("closed", t, "rps", "haproxy")),
            fmt(med("closed", t, "p50_us")),
            fmt(med("closed", t, "p99_us")),
            fmt(med("closed", t, "cpu_us_per_req"), 2) + spread("closed", t, "cpu_us_per_req"),
            fx(ratio("closed", t, "cpu_us_per_req", "haproxy")),
            fmt(sum(data["closed"][t]["errors"].values())),
        ])
    sec = f"### HTTP/1.1 keep-alive, closed loop (`wrk -t1 -c64 -d{DUR} --latency`)\n\n"
    sec += table(["target", "req/s", "req/s vs HAProxy", "p50 µs", "p99 µs", "proxy CPU µs/req", "CPU/req vs HAProxy", "errors (all rounds)"], rows)
    if "cyan-log" in data["closed"]:
        lines = data["closed"]["cyan-log"]["log_lines"]
        drops = data["closed"]["cyan-log"]["log_dropped"]
        sec += (f"\n\nAccess log on: {fmt(sum(lines.values()))} lines written over the measured"
                f" and warm-up runs, {fmt(sum(drops.values()))} dropped (cyan_access_log_dropped_total).")
    if "haproxy-log" in data["closed"]:
        lines = data["closed"]["haproxy-log"]["log_lines"]
        sec += (f" HAProxy with its log on wrote {fmt(sum(lines.values()))} lines"
                " (`log stdout format raw` + `option httplog`, stdout to a file: one write per line).")
    sec += "\n\n± is half the spread (max − min) over the rounds, relative to the median."
    sections.append(sec)
    r = ratio("closed", "cyan", "cpu_us_per_req", "haproxy")
    summary_targets.append(("CPU per request (HTTP/1.1 closed loop) ≤ 0.87× HAProxy", r, 0.87, "ratio",
                            per_round(ratios("closed", "cyan", "cpu_us_per_req", "haproxy"), 0.87)))
    r = ratio("closed", "cyan-log", "cpu_us_per_req", "haproxy")
    summary_targets.append(("… same, access log on (HAProxy logging nothing)", r, 0.87, "ratio",
                            per_round(ratios("closed", "cyan-log", "cpu_us_per_req", "haproxy"), 0.87)))
    if "haproxy-log" in data["closed"]:
        r = ratio("closed", "cyan-log", "cpu_us_per_req", "haproxy-log")
        summary_targets.append(("… same, access log on, against HAProxy logging each request too", r, 0.87, "ratio",
                                per_round(ratios("closed", "cyan-log", "cpu_us_per_req", "haproxy-log"), 0.87)))

# ---- fixed rate
if "fixed" in data:
    rows = []
    for t in ["cyan", "cyan-log", "haproxy", "nginx", "direct"]:
        if t not in data["fixed"]:
            continue
        rows.append([
            NAMES[t],
            fmt(med("fixed", t, "rate")),
            fmt(med("fixed", t, "p50_us")),
            fmt(med("fixed", t, "p99_us")),
            fmt(med("fixed", t, "p999_us")),
            "–" if t == "direct" else fmt(diff("fixed", t, "p50_us", "direct")),
            "–" if t == "direct" else fmt(diff("fixed", t, "p99_us", "direct")),
            fmt(sum(data["fixed"][t]["errors"].values())),
        ])
    rate = meta.get("settings", "").split("RATE=")[1].split(" IDLE")[0] if "RATE=" in meta.get("settings", "") else ""
    rate_n, _, how = rate.partition(" ")
    slotted = "interleaved slots" in how
    per_run = "per target per round" if slotted else "per run"
    sec = f"### Fixed rate: {rate_n} req/s in total {how}, {DUR_SHORT} {per_run}\n\n"
    sec += table(["target", "achieved req/s", "p50 µs", "p99 µs", "p99.9 µs", "added p50 µs", "added p99 µs", "non-2xx"], rows)
    if slotted:
        sec += ("\n\nLatency from h2load's per-request logs, each round's slots of a target pooled"
                " (the slot length and the seconds skipped at each slot's start are in the heading);"
                " added = target − direct in the same round, median over rounds. The targets stay up"
                " through a round's slots, so an ejection one slot caused would reach the next ones"
                " (the count below says whether any happened).")
    else:
        sec += ("\n\nLatency from h2load's per-request log (first second skipped), added ="
                " target − direct in the same round, median over rounds.")
    pooled = data.get("fixed-pooled", {})
    if "direct" in pooled:
        def added(t, k):
            a, b = pooled[t][k].get(0), pooled["direct"][k].get(0)
            return "–" if a is None or b is None else f"{a - b:+,.0f}"
        parts = [f"{NAMES[t]} {added(t, 'p50_us')} / {added(t, 'p99_us')} / {added(t, 'p999_us')}"
                 for t in ["cyan", "cyan-log", "haproxy", "nginx"] if t in pooled]
        sec += ("\n\nEvery round's requests pooled, added p50 / p99 / p99.9 µs over direct pooled"
                " the same way (a second reading, not the verdict's): " + "; ".join(parts) + ".")
    sections.append(sec)
    summary_targets.append((
        "added median latency at 5k req/s ≤ HAProxy's",
        diff("fixed", "cyan", "p50_us", "direct"), diff("fixed", "haproxy", "p50_us", "direct"), "us",
        per_round(diffs("fixed", "cyan", "p50_us", "direct"), diffs("fixed", "haproxy", "p50_us", "direct"))))
    summary_targets.append((
        "added p99 latency at 5k req/s ≤ HAProxy's",
        diff("fixed", "cyan", "p99_us", "direct"), diff("fixed", "haproxy", "p99_us", "direct"), "us",
        per_round(diffs("fixed", "cyan", "p99_us", "direct"), diffs("fixed", "haproxy", "p99_us", "direct"))))

# ---- TLS
if "tls" in data:
    rows = []
    for t in ["cyan", "haproxy", "nginx"]:
        if t not in data["tls"]:
            continue
        rows.append([
            NAMES[t],
            fmt(med("tls", t, "h1_rps")) + spread("tls", t, "h1_rps"),
            fmt(med("tls", t, "h1_cpu_us_per_req"), 2),
            fx(ratio("tls", t, "h1_cpu_us_per_req", "haproxy")),
            fmt(med("tls", t, "h2_rps")) + spread("tls", t, "h2_rps"),
            fmt(med("tls", t, "h2_cpu_us_per_req"), 2),
            fx(ratio("tls", t, "h2_cpu_us_per_req", "haproxy")),
            fmt(sum(data["tls"][t]["h1_errors"].values()) + sum(data["tls"][t]["h2_errors"].values())),
        ])
    sec = f"### TLS 1.3 termination (HTTP/1.1 `wrk -t1 -c64 -d{DUR_SHORT}`; HTTP/2 `h2load -c16 -m10 -D {DUR_SHORT}`)\n\n"
    sec += table(["target", "h1 req/s", "h1 CPU µs/req", "h1 CPU vs HAProxy", "h2 req/s", "h2 CPU µs/req", "h2 CPU vs HAProxy", "errors"], rows)
    bad = [t for t in data["tls"] if data["tls"][t]["h2_not_negotiated"]]
    if bad:
        sec += f"\n\n**h2 was not negotiated for: {', '.join(bad)}**"
    sections.append(sec)
    for proto in ["h1", "h2"]:
        name = "HTTP/1.1" if proto == "h1" else "HTTP/2"
        key = f"{proto}_cpu_us_per_req"
        summary_targets.append((f"TLS CPU per request ({name}) ≤ HAProxy's", ratio("tls", "cyan", key, "haproxy"), 1.0, "ratio",
                                per_round(ratios("tls", "cyan", key, "haproxy"), 1.0)))

# ---- memory
if "mem" in data:
    rows = []
    for t in ["cyan", "haproxy", "nginx"]:
        if t not in data["mem"]:
            continue
        rows.append([
            NAMES[t],
            fmt(med("mem", t, "base_kib")),
            fmt(med("mem", t, "with_kib")),
            fmt(med("mem", t, "kib_per_conn"), 2),
            fmt(min(data["mem"][t]["conns_ok"].values())) + " / " + fmt(min(data["mem"][t]["conns_held"].values())),
        ])
    sec = "### Memory per idle keep-alive connection\n\n"
    sec += table(["target", "PSS idle KiB", "PSS with conns KiB", "KiB per connection", "conns opened / still open (min over rounds)"], rows)
    sec += ("\n\nEach connection sent one request (at most 16 in flight) and then idled."
            " PSS from /proc/PID/smaps_rollup (nginx: master + worker), measured 2 s after the last response.")
    sections.append(sec)
    summary_targets.append(("memory per idle connection < 5 KiB", med("mem", "cyan", "kib_per_conn"), 5.0, "lt",
                            per_round(values("mem", "cyan", "kib_per_conn"), 5.0 - 1e-9)))

# ---- syscalls
if "syscalls" in data:
    rows = []
    for t in ["cyan", "cyan-log", "haproxy", "nginx"]:
        if t not in data["syscalls"]:
            continue
        rows.append([
            NAMES[t],
            fmt(med("syscalls", t, "strace_per_req"), 2),
            fmt(med("syscalls", t, "perf_per_req"), 2),
        ])
    sec = "### Syscalls per request (HTTP/1.1 keep-alive, `wrk -t1 -c16 -d2s`)\n\n"
    sec += table(["target", "strace -c -f", "perf raw_syscalls:sys_enter"], rows)
    sec += ("\n\nstrace slows the proxy several-fold (batching changes), so the perf count —"
            " which does not — is the closer one to the unobserved process; both are shown.")
    st = read("extra.txt.strace")
    if st:
        sec += "\n\nTop syscalls per request (round 1, strace):\n\n" + st
    sections.append(sec)
    summary_targets.append(("syscalls per request ≤ 4.5 (strace)", med("syscalls", "cyan", "strace_per_req"), 4.5, "le",
                            per_round(values("syscalls", "cyan", "strace_per_req"), 4.5)))
    summary_targets.append(("syscalls per request ≤ 4.5 (perf)", med("syscalls", "cyan", "perf_per_req"), 4.5, "le",
                            per_round(values("syscalls", "cyan", "perf_per_req"), 4.5)))

# ---- multi-thread
if "mt" in data:
    rows = []
    for t in ["cyan-mt", "haproxy-mt", "nginx-mt", "direct-mt"]:
        if t not in data["mt"]:
            continue
        rows.append([
            NAMES[t],
            fmt(med("mt", t, "rps")) + spread("mt", t, "rps"),
            fx(ratio("mt", t, "rps", "haproxy-mt")),
            fmt(med("mt", t, "p50_us")),
            fmt(med("mt", t, "p99_us")),
            fmt(med("mt", t, "cpu_us_per_req"), 2),
            fx(ratio("mt", t, "cpu_us_per_req", "haproxy-mt")),
            fmt(sum(data["mt"][t]["errors"].values())),
        ])
    sec = f"### Multi-thread defaults, unpinned (`wrk -t2 -c64 -d{DUR_SHORT}`), for completeness\n\n"
    sec += table(["target", "req/s", "req/s vs HAProxy", "p50 µs", "p99 µs", "proxy CPU µs/req", "CPU/req vs HAProxy", "errors"], rows)
    sec += ("\n\nEverything (proxy, backends, wrk) shares both CPUs here, so this mostly shows how"
            " each proxy behaves when it competes with its own load generator.")
    sections.append(sec)

# Summed over cyan's targets in each mode (cyan, cyan-log, cyan-mt).
ej = {m: sum(total(m, t, "ejections") for t in data[m] if t.startswith("cyan"))
      for m in data if m not in ("abort", "fixed-pooled")}
ej_total = sum(ej.values())
sections.append(
    "### cyan passive-health ejections\n\n"
    + (f"cyan logged {ej_total:.0f} endpoint ejections in all (by mode: " + ", ".join(f"{m} {v:.0f}" for m, v in ej.items()) + "),"
       " counted 0.5 s after each measured run, so including the one the load generator's own stop"
       " can cause (see below). The error columns show whether any request failed *during* a run."
       if ej else "not recorded.")
    + " Each measurement runs on a fresh process after a warm-up that ends cleanly (`h2load -n`),"
    " so an ejection caused by one run never reaches the next; in the fixed-rate mode that is"
    " one process per round, shared by the round's slots."
)

# ---- targets
trows = []
for name, measured, goal, kind, rounds in summary_targets:
    if measured is None or goal is None:
        trows.append([name, "–", "–", "–", "not measured"])
        continue
    # A target met by the median but not in every round is reported as
    # such: on a shared host one run's rounds differ by more than some
    # margins, and the per-round count is what tells a margin from luck.
    held = sum(1 for v, g in rounds if (v < g if kind == "lt" else v <= g))
    if kind == "ratio":
        each = " ".join(f"{v:.2f}" for v, _ in rounds)
    elif kind == "us":
        each = " ".join(f"{v:+.0f}/{g:+.0f}" for v, g in rounds)
    else:
        each = " ".join(f"{v:.2f}" for v, _ in rounds)
    each = f"{each} ({held}/{len(rounds)})" if rounds else "–"
    if kind == "ratio":
        ok = measured <= goal
        m, g = f"{measured:.2f}×", f"≤ {goal:.2f}×"
        miss = "met" if ok else f"**missed** by {(measured / goal - 1) * 100:.0f}% ({measured - goal:+.2f}×)"
        if ok:
            miss = f"met ({(1 - measured / goal) * 100:.0f}% margin)"
    elif kind == "us":
        ok = measured <= goal
        m, g = f"{measured:+.0f} µs", f"≤ {goal:+.0f} µs (HAProxy)"
        miss = f"met ({goal - measured:.0f} µs margin)" if ok else f"**missed** by {measured - goal:.0f} µs"
    elif kind == "lt":
        ok = measured < goal
        m, g = f"{measured:.2f} KiB", f"< {goal:.0f} KiB"
        miss = f"met ({goal - measured:.2f} KiB margin)" if ok else f"**missed** by {measured - goal:.2f} KiB"
    else:
        ok = measured <= goal
        m, g = f"{measured:.2f}", f"≤ {goal}"
        miss = f"met ({goal - measured:.2f} margin)" if ok else f"**missed** by {measured - goal:.2f} ({(measured / goal - 1) * 100:.0f}%)"
    trows.append([name, m, g, each, miss])

doc = []
doc.append("# cyan vs HAProxy vs nginx — side-by-side load benchmark\n")
doc.append("Written by `bash benches/compare.sh` (issue 6); how to read it: `benches/README.md`.\n")
doc.append("## Machine and versions\n")
for k in ["date", "uname", "cpu", "mem", "cyan", "cyan_build", "haproxy", "nginx", "wrk", "h2load", "openssl", "rustc", "pinning", "settings", "load_start", "load_end", "elapsed"]:
    if k in meta:
        doc.append(f"- **{k}**: {meta[k]}")
doc.append("")
doc.append("## Targets (cyan, single thread, against HAProxy measured in the same rounds)\n")
doc.append(table(["target", "measured (median)", "goal", "each round (rounds that met it)", "verdict"], trows))
doc.append("\nAdded latency per round reads cyan/HAProxy, each minus direct in that round.")
doc.append("")
doc.append("## Results (medians over rounds)\n")
doc.extend(s + "\n" for s in sections)
ab = read("extra.txt.abort")
if ab:
    doc.append("## Client aborts counted as upstream failures (cyan)\n")
    doc.append("A load generator that stops with requests in flight (wrk does, at the end of every run)"
               " aborts those requests. cyan records each aborted request as a 502 from the upstream"
               " (`cyan_requests_total{code_class=\"5xx\"}`), its rollback window counts it as a failure,"
               " and passive health counts it toward `eject_after` consecutive failures — which can eject"
               " healthy endpoints of both colors, after which every request gets 503 for `eject_for`."
               " Measured right after the sanity check:\n")
    doc.append(ab)
san = read("extra.txt.sanity")
if san:
    doc.append("## Sanity check (before measuring)\n")
    doc.append(san)
cond = read("conditions.txt")
doc.append("## Conditions\n")
doc.append("Other work shares this machine; before every measured run the script waits while any"
           " cargo/rustc process, or any other process above 20 % of a CPU, is running (polling every"
           " 20 s, up to QUIET_WAIT). Waits, and a snapshot at the start of each mode:\n")
doc.append("```\n" + (cond.strip() or "(nothing recorded)") + "\n```\n")
doc.append("## Raw per-round values\n")
doc.append("```")
for mode in data:
    for t in data[mode]:
        for key in sorted(data[mode][t]):
            vals = data[mode][t][key]
            if not vals:
                continue
            doc.append(f"{mode:9} {t:11} {key:20} " + "  ".join(f"{vals[r]:g}" for r in sorted(vals)))
doc.append("```\n")
doc.append("## Exact commands\n")
doc.append("Each distinct command once. `$WORK` is the run's temp dir; ports are chosen free at run time;"
           " configs are `benches/compare/*` with the @…@ placeholders filled in (`KEEP=1` keeps them).\n")
seen, cmds = set(), []
for line in read("commands.txt").splitlines():
    line = line.replace(work.rstrip("/"), "$WORK")
    if line not in seen:
        seen.add(line)
        cmds.append(line)
doc.append("```\n" + "\n".join(cmds) + "\n```\n")

text = "\n".join(doc)
with open(out, "w") as f:
    f.write(text)
print("\n## Targets\n")
print(table(["target", "measured (median)", "goal", "each round (rounds that met it)", "verdict"], trows))
print()
for s in sections:
    print(s.split("\n\nTop syscalls")[0])
    print()
