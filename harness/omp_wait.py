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


def cores_busy_elsewhere(samples: int = 5) -> int:
    """Cores other processes keep busy now: the larger of the 1-minute load average (rounded)
    and the fewest runnable tasks seen in `samples` reads of /proc/loadavg, less this one."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return 0
    running = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            break
        time.sleep(0.002)
    return max(int(load1 + 0.5), min(running) if running else 0)


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
