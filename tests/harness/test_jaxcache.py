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


def test_parity_fills_the_cache(tmp_path, monkeypatch):
    import jax

    from harness.cli import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("TANDEM_JAX_CACHE", str(cache))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    before = jax.config.jax_compilation_cache_dir
    try:
        assert main(["parity", "--suite", "smoke", "--case", "tiny", "--tier", "op", "--quiet",
                     "--out", str(tmp_path / "out")]) == 0
        assert jax.config.jax_compilation_cache_dir == str(cache)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert any(cache.iterdir())
