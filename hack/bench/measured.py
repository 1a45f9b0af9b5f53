#!/usr/bin/env python3
"""Runs one benchmark step and records how much of the machine other processes took
meanwhile: these machines are shared, and a figure taken while something else ran is
not the engine's.

    measured.py LOG LABEL -- COMMAND [ARGS...]
    measured.py --summary LOG

COMMAND's stdout and stderr pass through. One JSON line is appended to LOG:
{"label", "wall_s", "own_cpu_s" (COMMAND and its children), "others_cpu_s" (every other
process, from /proc/stat's busy time), "others_share" (others' CPU seconds over the
machine's CPU seconds during the step)}. Exits with COMMAND's status.

--summary prints one line: the mean share other processes took over LOG's steps, and the
worst step.
"""

import json
import os
import resource
import subprocess
import sys
import time


def busy_seconds():
    """CPU seconds all processors spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat") as f:
        cpu = f.readline().split()[1:]
    ticks = [int(v) for v in cpu]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def summary(log):
    """The mean and worst share of the machine other processes took during LOG's steps."""
    with open(log) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    if not steps:
        return
    worst = max(steps, key=lambda s: s["others_share"])
    mean = sum(s["others_share"] for s in steps) / len(steps)
    print(f"other processes took {100 * mean:.1f} % of the machine on average during the steps, "
          f"at most {100 * worst['others_share']:.1f} % ({worst['label']}); per step in {log}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--summary":
        summary(sys.argv[2])
        return
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.exit(__doc__)
    log, label, cmd = sys.argv[1], sys.argv[2], sys.argv[4:]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, t0 = busy_seconds(), time.monotonic()
    rc = subprocess.call(cmd)
    wall, busy = time.monotonic() - t0, busy_seconds() - busy0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    others = max(0.0, busy - own)
    line = {
        "label": label,
        "wall_s": round(wall, 3),
        "own_cpu_s": round(own, 3),
        "others_cpu_s": round(others, 3),
        "others_share": round(others / (wall * os.cpu_count()), 4) if wall > 0 else 0.0,
    }
    with open(log, "a") as f:
        f.write(json.dumps(line) + "\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()
