"""harness.jaxcache: where `tandem parity` keeps JAX's compiled programs, and that a directory it
cannot write is reported, not fatal."""

from __future__ import annotations

from pathlib import Path

from harness import jaxcache


def test_cache_dir_follows_the_environment(tmp_path):
    assert jaxcache.cache_dir({"TANDEM_JAX_CACHE": "off"}) is None
    assert jaxcache.cache_dir({"TANDEM_JAX_CACHE": str(tmp_path)}) == tmp_path
    assert jaxcache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "tandem" / "jax"
    assert jaxcache.cache_dir({}) == Path.home() / ".cache" / "tandem" / "jax"


def test_enable_reports_what_it_did(tmp_path):
    assert jaxcache.enable({"TANDEM_JAX_CACHE": "off"}) == "off"
    assert jaxcache.enable({"JAX_COMPILATION_CACHE_DIR": "/x"}) == "JAX_COMPILATION_CACHE_DIR=/x"
    blocker = tmp_path / "file"
    blocker.write_text("")
    got = jaxcache.enable({"TANDEM_JAX_CACHE": str(blocker / "sub")})
    assert got.startswith(f"unavailable: {blocker / 'sub'}: ")


def test_parity_fills_the_cache(tmp_path):
    """`tandem parity` in its own process (as users and tools/mutate.py run it) writes its
    compiled programs to the cache directory; a second run finds them."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["TANDEM_JAX_CACHE"] = str(cache)
    cmd = [sys.executable, "-m", "harness.cli", "parity", "--suite", "smoke", "--case", "tiny",
           "--tier", "op", "--quiet", "--out", str(tmp_path / "out")]
    counts = []
    for _ in range(2):
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        counts.append(len(list(cache.iterdir())))
    assert counts[0] > 0
    assert counts[1] == counts[0]  # the second run added nothing: every program was found
