"""Fixtures for the engine tests: tiny configurations, seeded weights and token batches, and a
helper that builds a model with its parameters loaded.

These tests drive libtandem only through harness.engine (the one binding). They never skip: if
no built library is found, one is built once per session with CMake into a temporary directory.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
import pytest

from harness import engine
from harness.errors import EngineError
from harness.init import init_params

from engine_util import REPO, TINY, tokens_for  # tests/engine is on sys.path under pytest


def _ensure_library(tmp_root: Path) -> None:
    try:
        engine.find_library("fp32")
        engine.find_library("f64")
        return
    except EngineError:
        pass
    build = tmp_root / "tdbuild"
    for cmd in (["cmake", "-S", str(REPO / "engine"), "-B", str(build), "-DTD_TESTS=OFF"],
                ["cmake", "--build", str(build), "-j2"]):
        subprocess.run(cmd, check=True, capture_output=True)
    os.environ["TANDEM_LIB_DIR"] = str(build)
    engine.load_library.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def engine_library(tmp_path_factory):
    """Makes sure libtandem and libtandem_f64 can be loaded (builds them if need be)."""
    _ensure_library(tmp_path_factory.mktemp("engine-lib"))
    return engine.find_library("fp32")


@pytest.fixture
def tiny_config() -> dict:
    return dict(TINY)


@pytest.fixture
def tiny_tokens(tiny_config):
    return tokens_for(tiny_config, seed=7)


@pytest.fixture
def seeded_init(tiny_config):
    """harness.init.init_params for the tiny model's table, seed 3."""
    with engine.Model(**tiny_config) as m:
        table = [(p.name, p.shape) for p in m.table]
    return init_params(table, tiny_config["n_layer"], seed=3)


@pytest.fixture
def make_model():
    """make_model(config, params=None, variant="fp32") -> a built Model with `params` set;
    every model made here is closed at the end of the test."""
    made = []

    def make(config: dict, params: dict | None = None, variant: str = "fp32") -> engine.Model:
        m = engine.Model(variant, **config)
        made.append(m)
        if params is not None:
            m.set_params(params)
        return m

    yield make
    for m in made:
        m.close()
