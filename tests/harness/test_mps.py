"""harness.mps: when a CUDA job's ranks share a GPU, a private MPS daemon is started for the job
and stopped after; what happened is reported, and a daemon that cannot start is an error only
when asked for. A fake nvidia-cuda-mps-control (a shell script that makes and removes the control
pipe the way the real one does) stands in for the driver's; the real one runs in the GPU tests
(test_pipeline_gpu.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from harness import mps
from harness.errors import ConfigError

FAKE = """#!/bin/sh
echo "$0 $*" >> "{log}"
if [ "$1" = "-d" ]; then
    {start}
    exit 0
fi
read cmd
[ "$cmd" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
"""


def _fake(tmp_path: Path, monkeypatch, start='touch "$CUDA_MPS_PIPE_DIRECTORY/control"'):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    exe = bindir / mps.CONTROL
    exe.write_text(FAKE.format(log=log, start=start))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-server-here"))
    return log


def test_private_daemon_serves_one_job_and_is_stopped(tmp_path, monkeypatch):
    log = _fake(tmp_path, monkeypatch)
    with mps.job_mps("auto", ranks=4, gpus=1) as (how, env):
        assert how == "private"
        pipe = Path(env["CUDA_MPS_PIPE_DIRECTORY"])
        assert (pipe / "control").exists() and Path(env["CUDA_MPS_LOG_DIRECTORY"]).is_dir()
        assert pipe != tmp_path / "no-server-here"  # its own, not the caller's
    assert not pipe.exists()  # quit and removed
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and calls[0].endswith(" -d")


def test_daemon_stopped_when_the_job_fails(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch)
    with pytest.raises(RuntimeError, match="rank 2 died"):
        with mps.job_mps("auto", ranks=2, gpus=1) as (how, env):
            pipe = Path(env["CUDA_MPS_PIPE_DIRECTORY"])
            raise RuntimeError("rank 2 died")
    assert not pipe.exists()


def test_nothing_started_when_each_rank_has_a_gpu_or_a_server_runs(tmp_path, monkeypatch):
    log = _fake(tmp_path, monkeypatch)
    with mps.job_mps("auto", ranks=4, gpus=4) as (how, env):
        assert (how, env) == ("off (one GPU per rank)", {})
    server = tmp_path / "system-pipe"
    server.mkdir()
    (server / "control").touch()
    with mps.job_mps("on", ranks=4, gpus=1, env={"CUDA_MPS_PIPE_DIRECTORY": str(server)}) as r:
        assert r == ("external", {})
    with mps.job_mps("off", ranks=4, gpus=1) as r:
        assert r == ("off", {})
    assert not log.exists()


def test_daemon_that_cannot_start_is_recorded_under_auto_and_an_error_under_on(tmp_path,
                                                                                monkeypatch):
    _fake(tmp_path, monkeypatch, start='echo "cannot open the GPU" >&2; exit 3')
    with mps.job_mps("auto", ranks=4, gpus=1) as (how, env):
        assert env == {}
        assert how == f"unavailable: {mps.CONTROL} -d exited 3: cannot open the GPU"
    with pytest.raises(ConfigError, match=r"mps=on: cannot start a CUDA MPS daemon for 4 ranks "
                                          r"sharing 1 GPU\(s\): .* exited 3: cannot open the GPU"
                                          r"\. HINT: use mps=auto"):
        with mps.job_mps("on", ranks=4, gpus=1):
            pass
    left = [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("tandem-mps-*")
            if p.stat().st_mtime > (tmp_path / "bin").stat().st_mtime]
    assert left == []  # the failed daemons' directories are gone


def test_daemon_without_control_pipe_is_not_waited_on_forever(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, start=":")
    monkeypatch.setattr(mps, "START_TIMEOUT_S", 0.3)
    with mps.job_mps("auto", ranks=2, gpus=1) as (how, env):
        assert how.startswith("unavailable: ") and "no control pipe in 0 s" in how


def test_no_control_binary_and_bad_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "none"))
    with mps.job_mps("auto", ranks=2, gpus=1) as (how, _):
        assert how == f"unavailable: {mps.CONTROL} not on PATH"
    with pytest.raises(ConfigError, match=r"mps='sometimes': allowed auto, on, off"):
        with mps.job_mps("sometimes", ranks=2, gpus=1):
            pass


def test_visible_gpus_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert mps.visible_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert mps.visible_gpus() == 0


def test_bench_rejects_a_bad_mps_mode():
    from harness.bench import bench_suite

    with pytest.raises(ConfigError, match=r"--mps = 'always': expected one of auto, on, off"):
        bench_suite("cpu-smoke", mps="always", cases=["tiny"])
