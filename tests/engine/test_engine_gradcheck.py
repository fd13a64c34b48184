"""Finite-difference check of the engine's backward pass, every parameter tensor by name, on the
float64-kernel build (libtandem_f64), plus gradient accumulation across forward_backward calls.

This checks the engine against calculus, not against JAX (that is `tandem parity`). Choice of the
step (measured on this model, worst tensor of 28):

    e        1e-2     3e-3     1e-3     3e-4     1e-4     3e-5     1e-5
    rel L2   3.8e-4   5.0e-5   5.2e-6   4.8e-7   6.4e-8   3.9e-8   3.7e-8

The error falls as e^2 (central-difference truncation) down to a floor of ~4e-8, the fp32
rounding of the analytic gradient on its way out through td_model_get_grad (2^-24 = 6e-8 per
element); the loss crosses the ABI as a double, so its rounding (~1e-16 * L / e) stays far below.
At e = 1e-4 both terms are < 1e-7, so a tolerance of 1e-6 leaves a 15x margin and still fails on
any wrong term of the maths (those show up at 1e-3 and above).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine_util import fd_relative_errors, rough_params, tokens_for

STEP = 1e-4
TOL = 1e-6
SAMPLES = 4  # per tensor: the element with the largest gradient, and 3 seeded random ones


def test_gradients_match_finite_differences_for_every_tensor(tiny_config, make_model):
    model = make_model(tiny_config, variant="f64")
    params = rough_params(model.table, tiny_config["n_layer"], seed=3)
    tokens, targets = tokens_for(tiny_config, seed=7)
    errors = fd_relative_errors(model, params, tokens, targets, STEP, SAMPLES)

    assert len(errors) == 2 + 12 * tiny_config["n_layer"] + 2  # every tensor of the table
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v < TOL}
    assert not bad, f"relative L2 error above {TOL:g} (step {STEP:g}): {bad}"


def test_loss_of_f64_and_fp32_builds_agree(tiny_config, make_model):
    """The two builds run the same kernels; the fp32 loss must sit within fp32 rounding of the
    float64 one (a sanity check that the FD test above tests the code that ships)."""
    m32 = make_model(tiny_config)
    m64 = make_model(tiny_config, variant="f64")
    params = rough_params(m32.table, tiny_config["n_layer"], seed=3)
    m32.set_params(params)
    m64.set_params(params)
    tokens, targets = tokens_for(tiny_config, seed=7)
    _, l32 = m32.forward(tokens, targets, logits=False)
    _, l64 = m64.forward(tokens, targets, logits=False)
    assert l32 == pytest.approx(l64, rel=1e-5)


def test_forward_backward_accumulates_scaled_gradients(tiny_config, make_model):
    """Two calls with grad_scale 1/2 on the same micro-batch give the gradient of one call with
    grad_scale 1 (to fp32 rounding of the sum), and zero_grad clears them."""
    model = make_model(tiny_config, variant="f64")
    model.set_params(rough_params(model.table, tiny_config["n_layer"], seed=5))
    tokens, targets = tokens_for(tiny_config, seed=2)
    model.zero_grad()
    model.forward_backward(tokens, targets, 1.0)
    once = model.grads()
    model.zero_grad()
    model.forward_backward(tokens, targets, 0.5)
    model.forward_backward(tokens, targets, 0.5)
    twice = model.grads()
    for name in once:
        np.testing.assert_allclose(twice[name], once[name], rtol=1e-6, atol=0, err_msg=name)
    model.zero_grad()
    assert all(not g.any() for g in model.grads().values())
