"""The OpenMP wait setting chosen for the engine's threads before libtandem (and libgomp) load.

Pure environment policy: how many cores are free, and whether the engine's threads may spin
briefly at barriers. harness/engine_lib.py applies it when it loads the library;
harness/pipeline.py applies it to the ranks it launches. Nothing here loads the engine.
"""

from __future__ import annotations

import os
import time


# OpenMP threads that spin at barriers turn a shared machine's contention into collapse: with
# another process on one of 2 cores, a step of a small model took 2.9 s spinning vs 87 ms with
# passive waiting (measured here). Passive waiting has its own price on an idle machine: every
# one of a step's ~100 parallel regions wakes sleeping threads (a tiny model's step: 5.8 ms
# passive vs 3.5 ms with a short spin). So: passive by default, plus a short spin
# (GOMP_SPINCOUNT, which libgomp honours over the passive policy) only while the threads fit the
# cores nobody else is using. libgomp reads both when it loads, so they are chosen before the
# engine library is; an explicit setting in the environment wins.
SPIN_COUNT = "1000"  # libgomp spins, ~20 us here: covers the gaps between a step's regions
_USER_SPINCOUNT = "GOMP_SPINCOUNT" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cores_available() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system  # every thread of this process


def cpu_busy_elsewhere(window_s: float = 0.2) -> float | None:
    """Cores' worth of CPU that other processes used over the next `window_s` seconds: the
    machine's busy time (/proc/stat) less this process's own (all its threads), per second.
    None where /proc/stat cannot be read."""
    a, own_a, t_a = _cpu_jiffies(), _own_cpu_s(), time.monotonic()
    if a is None:
        return None
    time.sleep(window_s)
    b, own_b, t_b = _cpu_jiffies(), _own_cpu_s(), time.monotonic()
    if b is None:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy_s = (b[0] - a[0]) / tick - (own_b - own_a)
    return max(0.0, busy_s / max(t_b - t_a, 1e-3))


def cores_busy_elsewhere(samples: int = 5) -> int:
    """Cores other processes keep busy now: the larger of the CPU time they used over a short
    window (rounded; this process's own threads excluded) and the fewest runnable tasks seen in
    `samples` reads of /proc/loadavg, less this one. Where /proc/stat is unreadable, the rounded
    1-minute load average stands in for the window. Not the load average itself where the window
    can be measured: it trails the last minute, the harness's own work included (a `tandem run`
    right after its parity phase or a pip install saw load 0.9-1.1 on an idle 2-core machine, so
    the engine lost its spin and ran the tiny case at 0.83x JAX instead of 1.38x)."""
    running = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            break
        time.sleep(0.002)
    elsewhere = cpu_busy_elsewhere()
    if elsewhere is None:
        try:
            elsewhere = os.getloadavg()[0]
        except OSError:
            elsewhere = 0.0
    return max(int(elsewhere + 0.5), min(running) if running else 0)


def spin_env(total_threads: int) -> dict[str, str]:
    """The OpenMP wait setting for `total_threads` engine threads (all ranks together):
    {"GOMP_SPINCOUNT": SPIN_COUNT} when they fit the free cores, else {} (passive only).
    Empty when the caller set GOMP_SPINCOUNT themselves (theirs stands)."""
    if _USER_SPINCOUNT:
        return {}
    free = cores_available() - cores_busy_elsewhere()
    return {"GOMP_SPINCOUNT": SPIN_COUNT} if total_threads <= free else {}


def _library_threads() -> int:
    n = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(n) if n.isdigit() and int(n) > 0 else cores_available()


def libgomp_loaded() -> bool:
    """Whether libgomp is already mapped into this process (then the wait settings chosen here
    come too late: libgomp read its environment when it loaded)."""
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False
