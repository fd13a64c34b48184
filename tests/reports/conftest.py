"""Shared fixtures for the report tests: synthetic results directories, written once per session.

What it is: pytest fixtures over tests/reports/report_fixtures.py. What it is not: real
measurements; the numbers only need to look like a bench/parity run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import report_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> dict[str, Path]:
    """{'gpu': bench dir with sweeps, 'cpu': parity/losses/timelines dir, 'gpu_slow': the gpu
    dir with gpt2-124m's engine throughput halved (a planted 2× regression)}."""
    root = tmp_path_factory.mktemp("results")
    return {
        "gpu": report_fixtures.write_gpu_dir(root / "gpu"),
        "cpu": report_fixtures.write_cpu_dir(root / "cpu"),
        "gpu_slow": report_fixtures.write_gpu_dir(root / "gpu-slow", slow={"gpt2-124m": 2.0}),
    }
