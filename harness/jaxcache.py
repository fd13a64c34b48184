"""JAX's persistent compilation cache for `tandem parity` (and so for the mutation tool, which
runs it once per planted bug).

Most of a smoke run on a small CPU is JAX compiling the reference's programs (every op shape of
the op tier, each case's model step); the programs are the same from one run to the next.
Measured on the 2-core CI machine under load 4.5-5.6: `tandem parity --suite smoke` 136 s with an
empty cache, 59 s with it filled (3.2 MB), the same 1140 comparisons passing. The cache changes
no numbers: a cached executable is the one XLA compiled for the same program and flags.

`tandem bench` does not use it: its JAX side reports compile time as a result (compile_s), and
it runs JAX in its own worker processes, which this module leaves alone.

Where: $TANDEM_JAX_CACHE (a directory; "off" disables), else $XDG_CACHE_HOME/tandem/jax, else
~/.cache/tandem/jax. A cache the user set up for JAX itself (JAX_COMPILATION_CACHE_DIR) wins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "TANDEM_JAX_CACHE"
OFF = ("off", "0", "none", "false")


def cache_dir(env: dict[str, str] | None = None) -> Path | None:
    """The directory the cache goes in, or None when disabled."""
    env = os.environ if env is None else env
    value = env.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem" / "jax"


def enable(env: dict[str, str] | None = None) -> str:
    """Turn the cache on for this process's JAX; returns what was done, for run records:
    the directory, "off", "JAX_COMPILATION_CACHE_DIR=..." (the user's own), or
    "unavailable: why" (an unwritable directory: parity runs uncached)."""
    env = os.environ if env is None else env
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return f"JAX_COMPILATION_CACHE_DIR={env['JAX_COMPILATION_CACHE_DIR']}"
    d = cache_dir(env)
    if d is None:
        return "off"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"unavailable: {d}: {exc.strerror or exc}"
    import jax

    jax.config.update("jax_compilation_cache_dir", str(d))
    # cache every program: the op tier's are small and quick to compile one by one, but there
    # are hundreds of them
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    try:  # JAX settles on a cache (or none) at its first compile: after one, start it afresh
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass
    return str(d)


__all__ = ["ENV", "cache_dir", "enable"]

if __name__ == "__main__":  # pragma: no cover - `python -m harness.jaxcache` prints the place
    print(cache_dir() or "off", file=sys.stdout)
