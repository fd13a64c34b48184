"""harness/tolerances.py: the parity policy table and how errors are measured."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness import tolerances as tol
from harness.errors import ConfigError


def test_fp32_policy_is_the_documented_one():
    t = lambda tier, kind: tol.tolerance("fp32", tier, kind)
    assert (t("model", "loss").metric, t("model", "loss").value) == ("rel", 1e-5)
    assert (t("model", "logits").metric, t("model", "logits").value) == ("rel_l2", 1e-5)
    assert (t("model", "grad").metric, t("model", "grad").value) == ("rel_l2", 1e-4)
    assert (t("op", "op").metric, t("op", "op").value) == ("rel_l2", 1e-5)
    assert (t("trajectory", "loss").metric, t("trajectory", "loss").value) == ("rel", 1e-4)
    assert (t("trajectory", "param").metric, t("trajectory", "param").value) == ("rel_l2", 1e-4)
    for kind, same_as in (("loss", ("trajectory", "loss")), ("grad", ("model", "grad")),
                          ("param", ("trajectory", "param"))):
        assert t("schedule", kind) == t(*same_as)


def test_bf16_is_looser_than_fp32_everywhere():
    rows = tol.policy_table()
    fp32 = {(r["tier"], r["kind"]): r["value"] for r in rows if r["dtype"] == "fp32"}
    bf16 = {(r["tier"], r["kind"]): r["value"] for r in rows if r["dtype"] == "bf16"}
    assert fp32.keys() == bf16.keys()
    assert all(bf16[k] > fp32[k] for k in fp32)
    assert all(r["why"] for r in rows)  # every gate says why


def test_unknown_gate_is_a_config_error():
    with pytest.raises(ConfigError, match=r"dtype='fp16', tier='model', kind='loss'"):
        tol.tolerance("fp16", "model", "loss")
    with pytest.raises(ConfigError, match=r"tier='model', kind='param'"):
        tol.tolerance("fp32", "model", "param")


def test_measure():
    want = np.array([3.0, 4.0], np.float32)
    e = tol.measure(want + np.float32([0.0, 1e-3]), want)
    assert e.max_abs == pytest.approx(1e-3, rel=1e-4)
    assert e.rel_l2 == pytest.approx(1e-3 / 5.0, rel=1e-4)
    assert e.rel == pytest.approx(1e-3 / 4.0, rel=1e-4)
    assert tol.measure(want, want) == tol.Errors(0.0, 0.0, 0.0)
    # a scalar: rel == rel_l2 == |got - want| / |want|
    s = tol.measure(np.float32(2.0002), 2.0)
    assert s.rel == pytest.approx(s.rel_l2) and s.rel == pytest.approx(1e-4, rel=1e-3)
    # both zero passes; a non-zero against zero, NaN or inf never does
    assert tol.measure(np.zeros(3), np.zeros(3)).rel_l2 == 0.0
    assert math.isinf(tol.measure(np.ones(3), np.zeros(3)).rel_l2)
    assert math.isinf(tol.measure([1.0, np.nan], [1.0, 1.0]).rel_l2)
    assert math.isinf(tol.measure([1.0, 1.0], [1.0, np.inf]).max_abs)
    with pytest.raises(ValueError, match="shape mismatch"):
        tol.measure(np.ones(3), np.ones(4))


def test_error_for_picks_the_gate_metric():
    e = tol.Errors(max_abs=1.0, rel_l2=2.0, rel=3.0)
    assert tol.error_for(e, tol.Tolerance("rel_l2", 1.0, "")) == 2.0
    assert tol.error_for(e, tol.Tolerance("rel", 1.0, "")) == 3.0
