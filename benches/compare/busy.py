#!/usr/bin/env python3
"""Prints the processes that used more than THRESHOLD % of one CPU over a
SECONDS-long sample ("pid comm pct" per line), except the PIDs given (and
this script). Used by compare.sh to wait for other work to finish.

usage: busy.py THRESHOLD SECONDS [EXCLUDED_PID ...]
"""
import os
import sys
import time

threshold = float(sys.argv[1])
seconds = float(sys.argv[2])
excluded = {int(p) for p in sys.argv[3:]} | {os.getpid(), os.getppid()}
tck = os.sysconf("SC_CLK_TCK")


def sample():
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index("(") + 1 : s.rindex(")")]
        fields = s[s.rindex(")") + 2 :].split()
        out[int(d)] = (comm, int(fields[11]) + int(fields[12]), int(fields[1]))
    return out


a = sample()
time.sleep(seconds)
b = sample()
for pid, (comm, t1, ppid) in sorted(b.items()):
    if pid in excluded or ppid in excluded:
        continue
    t0 = a.get(pid, (comm, t1, ppid))[1]
    pct = (t1 - t0) / tck / seconds * 100
    if pct > threshold:
        print(f"{pid} {comm} {pct:.0f}%")
