"""The Llama family's whole model in the engine (engine/src/llama_model.c): its parameter table
against reference.llama's, a finite-difference check of every gradient on the float64 build (in
the form of test_engine_gradcheck.py), gradient accumulation, a safetensors round trip, the
build's refusals, and `tandem parity` running the model and trajectory tiers on a llama case.
Parity against JAX proper is suites/llama-smoke.toml's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine_util import fd_relative_errors, rough_params, tokens_for
from harness.engine import Model
from harness.errors import EngineError

# two layers, GQA (4 query heads over 2 kv heads, head size 4), an MLP width that is no multiple
# of C, theta far from the default so that the rotations differ visibly between positions
LLAMA_TINY = dict(family="llama", n_layer=2, n_embd=16, n_head=4, n_kv_head=2, vocab_size=23,
                  n_positions=8, ffn_dim=24, rope_theta=100.0, norm_eps=1e-5, seq_len=5,
                  batch_size=2, threads=1)
STEP, TOL, SAMPLES = 1e-4, 1e-6, 4  # test_engine_gradcheck.py says why


def _ref_config(c):
    from reference.llama import LlamaConfig

    return LlamaConfig(c["n_layer"], c["n_embd"], c["n_head"], c["n_kv_head"], c["vocab_size"],
                       c["ffn_dim"], c["n_positions"], c["rope_theta"], c["norm_eps"])


def test_table_is_the_references_in_order_with_decay_on_matrices(make_model):
    from reference.llama import param_shapes

    m = make_model(LLAMA_TINY)
    want = param_shapes(_ref_config(LLAMA_TINY))
    assert [(p.name, p.shape) for p in m.table] == list(want.items())
    assert all(p.decayed == (len(p.shape) >= 2) for p in m.table)
    assert m.get_int("family") == 1 and m.get_int("n_kv_head") == 2


def test_gradients_match_finite_differences_for_every_tensor(make_model):
    """As test_engine_gradcheck.py does for GPT-2: every tensor by name, on the float64 build,
    central differences at STEP on the largest and 3 random elements of each."""
    model = make_model(LLAMA_TINY, variant="f64")
    params = rough_params(model.table, LLAMA_TINY["n_layer"], seed=3)
    tokens, targets = tokens_for(LLAMA_TINY, seed=7)
    errors = fd_relative_errors(model, params, tokens, targets, STEP, SAMPLES)
    assert len(errors) == 1 + 9 * LLAMA_TINY["n_layer"] + 2
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v < TOL}
    assert not bad, f"relative L2 error above {TOL:g} (step {STEP:g}): {bad}"


def test_gradients_accumulate_over_micro_batches_and_loss_is_deterministic(make_model):
    m = make_model(LLAMA_TINY)
    m.set_params(rough_params(m.table, LLAMA_TINY["n_layer"], seed=3))
    tokens, targets = tokens_for(LLAMA_TINY, seed=7)
    m.zero_grad()
    loss = m.forward_backward(tokens, targets, 1.0)
    once = m.grads()
    m.zero_grad()
    for _ in range(2):
        assert m.forward_backward(tokens, targets, 0.5) == loss  # same bits each time
    twice = m.grads()
    for name, g in once.items():
        np.testing.assert_allclose(twice[name], g, rtol=1e-6, atol=1e-7, err_msg=name)
    assert m.forward(tokens, targets, logits=False)[1] == loss


def test_safetensors_round_trip_under_the_public_names(make_model, tmp_path):
    a = make_model(LLAMA_TINY)
    a.set_params(rough_params(a.table, LLAMA_TINY["n_layer"], seed=5))
    a.save_safetensors(tmp_path / "w.safetensors")
    b = make_model(LLAMA_TINY)
    b.load_safetensors(tmp_path / "w.safetensors")
    for name, w in a.params().items():
        np.testing.assert_array_equal(b.get_param(name), w, err_msg=name)
    gpt2 = make_model(dict(n_layer=2, n_embd=16, n_head=4, vocab_size=23, n_positions=8,
                           seq_len=5, batch_size=2))
    with pytest.raises(EngineError, match=r"holds tensor 'model\.embed_tokens\.weight', which "
                                          r"is not in the model's parameter table"):
        gpt2.load_safetensors(tmp_path / "w.safetensors")


def test_two_stages_with_a_split_backward_equal_one_stage(make_model):
    """The model cut after layer 0: stage 0 holds the embedding and layer 0, stage 1 layer 1,
    the final norm and the untied head. Two micro-batches in flight, B and W apart (W of the
    first only after B of the second, so a grad store shared between slots would be overwritten):
    the loss and every gradient equal the one-stage model's over the same micro-batches."""
    whole = make_model(LLAMA_TINY)
    params = rough_params(whole.table, LLAMA_TINY["n_layer"], seed=3)
    whole.set_params(params)
    tokens, targets = tokens_for({**LLAMA_TINY, "batch_size": 4}, seed=7)
    mb = [(tokens[2 * i:2 * i + 2], targets[2 * i:2 * i + 2]) for i in range(2)]
    whole.zero_grad()
    want_loss = sum(whole.forward_backward(x, y, 0.5) for x, y in mb) / 2
    split = dict(stages=2, slots=2, split_backward=1)
    first = make_model({**LLAMA_TINY, **split, "stage": 0, "layer_begin": 0, "layer_end": 1})
    last = make_model({**LLAMA_TINY, **split, "stage": 1, "layer_begin": 1, "layer_end": 2})
    assert [p.name for p in first.table] == ["model.embed_tokens.weight"] + [
        n for n in params if n.startswith("model.layers.0.")]
    assert [p.name for p in last.table] == [n for n in params if n.startswith(
        "model.layers.1.")] + ["model.norm.weight", "lm_head.weight"]
    for m in (first, last):
        m.set_params({p.name: params[p.name] for p in m.table})
        m.zero_grad()
    losses, dins = [], []
    for i, (x, y) in enumerate(mb):
        h, _ = first.stage_forward(i, tokens=x)
        losses.append(last.stage_forward(i, inputs=h, targets=y)[1])
    for i in (1, 0):
        dins.append((i, last.stage_backward(i, grad_scale=0.5, part="B", shape=x.shape)))
    for i in (0, 1):
        last.stage_backward(i, part="W")
    for i, din in sorted(dins):
        first.stage_backward(i, dout=din, part="B")
        first.stage_backward(i, part="W")
    assert abs(np.mean(losses) - want_loss) < 1e-6
    want = whole.grads()
    got = {**first.grads(), **last.grads()}
    assert sorted(got) == sorted(want)
    for name, g in want.items():
        np.testing.assert_allclose(got[name], g, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("change, pattern", [
    (dict(ffn_dim=0), r"ffn_dim=0 must be in \[1, 4194304\] for family=1 \(llama\)"),
    (dict(n_kv_head=3), r"n_kv_head=3 does not divide n_head=4"),
    (dict(n_embd=12, n_head=4, n_kv_head=4), r"head size n_embd/n_head=3 is odd"),
    (dict(family=2), r"family=2 \(0 = gpt2, 1 = llama\)"),
    (dict(family="gpt2"), r"n_kv_head=2, ffn_dim=24 are Llama keys, but family=0 \(gpt2\)"),
    (dict(norm_eps=0.0), r"norm_eps=0 is out of range"),
])
def test_build_refuses_what_the_llama_passes_do_not_run(change, pattern):
    with pytest.raises(EngineError, match=pattern):
        Model(**{**LLAMA_TINY, **change})


def test_build_time_llama_keys_are_fixed_after_build(make_model):
    m = make_model(LLAMA_TINY)
    with pytest.raises(EngineError, match=r"'rope_theta' cannot change after td_model_build"):
        m.set_float("rope_theta", 10.0)
    m.set_float("lr", 1e-4)  # the optimizer's keys still may


# ---- through `tandem parity` ---------------------------------------------------------------------


def test_parity_cli_runs_the_llama_model_and_trajectory_tiers(tmp_path, capsys):
    from harness.cli import main

    rc = main(["parity", "--suite", "llama-smoke", "--case", "mha-t1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    tiers = json.loads((tmp_path / "parity_summary.json").read_text())["cases"]["mha-t1"]["tiers"]
    assert list(tiers) == ["model", "trajectory"]
    assert tiers["model"]["passed"] and tiers["model"]["compared"] == 2 + 1 + 9 + 2
    assert tiers["trajectory"]["passed"] and tiers["trajectory"]["compared"] == 3 + 1 + 9 + 2


def test_parity_cli_runs_llama_micro_batches_through_the_schedule_tier(tmp_path, capsys):
    """Micro-batches add the schedule tier (engine micro-batched vs the one-stage control, on
    tandem-engine when it is built): the case runs, and the tier is there (run or, without MPI,
    skipped with its reason)."""
    from harness.cli import main

    suite = tmp_path / "llama-m2.toml"
    suite.write_text('[suite]\nname = "llama-m2"\ndescription = "d"\n[[case]]\nname = "m"\n'
                     'model = { family = "llama", n_layer = 1, n_embd = 32, n_head = 4, '
                     'vocab_size = 17, n_positions = 8 }\nseq_len = 4\nbatch_size = 2\n'
                     'tiers = ["model"]\npipeline = { microbatches = 2 }\n')
    rc = main(["parity", "--suite", str(suite), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads((tmp_path / "out" / "parity_summary.json").read_text())
    tiers = summary["cases"]["m"]["tiers"]
    assert list(tiers) == ["model", "schedule"]
    assert tiers["model"]["passed"]
    assert tiers["schedule"].get("skipped") or tiers["schedule"]["passed"]


# ---- through `tandem train` ----------------------------------------------------------------------


def _train_json(capsys, *argv):
    from harness.cli import main

    rc = main(["train", "--suite", "llama-smoke", "--case", "text-bytes", "--progress-every", "0",
               "--json", *map(str, argv)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_train_runs_a_llama_case_and_resumes_bit_identically(tmp_path, capsys):
    whole = _train_json(capsys, "--steps", 6)
    assert whole["losses"][-1] < whole["losses"][0]
    ck = tmp_path / "ck"
    _train_json(capsys, "--steps", 3, "--checkpoint-dir", ck, "--checkpoint-every", 3)
    rest = _train_json(capsys, "--steps", 6, "--checkpoint-dir", ck, "--checkpoint-every", 3,
                       "--resume")
    assert rest["start_step"] == 3 and rest["params_sha256"] == whole["params_sha256"]


def test_train_runs_a_pipelined_llama_case_and_resumes_it_bit_identically(tmp_path, capsys):
    """ZB-H1 over two tandem-engine ranks: the losses are the in-process micro-batched run's
    (the schedule tier's promise, through `tandem train`), and a resumed pipelined run ends on
    the same parameters as the uninterrupted one."""
    from harness import pipeline

    if pipeline.unavailable():
        pytest.skip(pipeline.unavailable())
    layout = ("--stages", 2, "--microbatches", 2, "--schedule", "zb-h1")
    one = _train_json(capsys, "--steps", 4, "--microbatches", 2)
    piped = _train_json(capsys, "--steps", 4, *layout)
    np.testing.assert_allclose(piped["losses"], one["losses"], rtol=1e-6)
    ck = tmp_path / "ck"
    _train_json(capsys, "--steps", 2, *layout, "--checkpoint-dir", ck, "--checkpoint-every", 2)
    rest = _train_json(capsys, "--steps", 4, *layout, "--checkpoint-dir", ck,
                       "--checkpoint-every", 2, "--resume")
    assert rest["start_step"] == 2 and rest["params_sha256"] == piped["params_sha256"]
