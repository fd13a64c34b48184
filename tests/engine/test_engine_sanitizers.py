"""Drives the engine's C unit tests (engine/tests/test_engine.c) under AddressSanitizer and
UndefinedBehaviorSanitizer: configure with -DTD_SANITIZE=ON into a temporary build tree, build,
run ctest, and require success. Slow (a full sanitized build); skipped when there is no CMake or
no C compiler, never otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from engine_util import REPO, have_cmake_and_cc


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
        f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.mark.slow
@pytest.mark.skipif(not have_cmake_and_cc(), reason="needs cmake and a C compiler")
def test_c_unit_tests_pass_under_asan_and_ubsan(tmp_path):
    build = tmp_path / "asan"
    _run(["cmake", "-S", str(REPO / "engine"), "-B", str(build), "-DTD_SANITIZE=ON",
          "-DTD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Debug"])
    _run(["cmake", "--build", str(build), "-j2"])  # every C test target
    env = dict(os.environ,
               ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
               OMP_NUM_THREADS="2")
    ctest = shutil.which("ctest") or "ctest"
    proc = _run([ctest, "--output-on-failure", "--timeout", "300"], cwd=build, env=env)
    assert "100% tests passed" in proc.stdout, proc.stdout
