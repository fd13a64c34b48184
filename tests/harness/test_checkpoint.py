"""Checkpoint/resume and the NaN/inf guard: a resumed run is bit-identical to an uninterrupted one
(one stage in-process, two pipelined stages under 1F1B and ZB-H1); checkpoints are written
atomically; truncated, foreign and mismatched files are refused with messages that name the
problem; --on-nonfinite skip skips and counts, stop names the step, the stage and the first
non-finite tensor; bad `tandem train` input exits 2 with a message."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from harness import train
from harness.cli import main as tandem_main
from harness.config import load_suite
from harness.data import make_case_data
from harness.engine import Model
from harness.errors import EngineError, RankFailure
from harness.init import init_params, read_safetensors, read_safetensors_metadata, \
    write_safetensors

TINY = dict(n_layer=2, n_embd=48, n_head=3, vocab_size=311, n_positions=32, seq_len=16,
            batch_size=4)


def _model(**over):
    return Model(**{**TINY, **over})


def _init(model, seed=1):
    model.set_params(init_params([(p.name, p.shape) for p in model.table], TINY["n_layer"], seed))


def _steps(model, x, y, steps):
    losses = []
    for s in steps:
        model.zero_grad()
        losses.append(model.forward_backward(x[s], y[s]))
        model.optimizer_step()
    return losses


@pytest.fixture(scope="module")
def data():
    case = dataclasses.replace(load_suite("smoke").case("tiny"), steps=6)
    return make_case_data(case)


def _same_params(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ---- the engine's checkpoint ABI -----------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 3, 5])
def test_one_stage_resume_is_bit_identical(tmp_path, data, split):
    x, y = data
    whole = _model()
    _init(whole)
    want = _steps(whole, x, y, range(6))
    first = _model()
    _init(first)
    got = _steps(first, x, y, range(split))
    first.save_checkpoint(tmp_path / "c.safetensors", data_position=split)
    resumed = _model()  # a fresh model: everything comes from the file
    assert resumed.load_checkpoint(tmp_path / "c.safetensors") == split
    assert resumed.get_int("step") == split
    got += _steps(resumed, x, y, range(split, 6))
    assert got == want  # exact floats, every step
    assert _same_params(resumed.params(), whole.params())


def test_checkpoint_holds_params_moments_and_settings(tmp_path, data):
    x, y = data
    m = _model()
    _init(m)
    _steps(m, x, y, range(2))
    m.save_checkpoint(tmp_path / "c.safetensors", 2)
    tensors = read_safetensors(tmp_path / "c.safetensors")
    names = [p.name for p in m.table]
    assert sorted(tensors) == sorted(names + [f"adamw.{k}.{n}" for k in "mv" for n in names])
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert np.array_equal(tensors["wte.weight"], m.get_param("wte.weight"))
    assert (tensors["adamw.v.wte.weight"] >= 0).all() and tensors["adamw.v.wte.weight"].any()
    meta = read_safetensors_metadata(tmp_path / "c.safetensors")
    assert meta["format"] == "tandem-checkpoint" and meta["format_version"] == "1"
    assert meta["step"] == "2" and meta["data_position"] == "2"
    assert meta["n_layer"] == "2" and float(meta["lr"]) == 1e-3 and meta["stages"] == "1"


def test_checkpoint_write_is_atomic(tmp_path, data):
    """The file appears whole by rename: no temporary is left, and a stray temporary from a
    writer killed mid-write does not disturb the previous checkpoint or the next save."""
    x, y = data
    m = _model()
    _init(m)
    _steps(m, x, y, range(1))
    path = tmp_path / "c.safetensors"
    m.save_checkpoint(path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    before = path.read_bytes()
    (tmp_path / "c.safetensors.tmp.999999").write_bytes(before[: len(before) // 3])
    fresh = _model()
    assert fresh.load_checkpoint(path) == 1  # the previous checkpoint is still whole
    _steps(m, x, y, range(1, 2))
    m.save_checkpoint(path, 2)
    assert _model().load_checkpoint(path) == 2


def test_save_to_a_missing_directory_names_it(tmp_path):
    m = _model()
    with pytest.raises(EngineError, match=r"td_model_save_checkpoint: cannot create '.*nodir/c"
                                          r"\.safetensors\.tmp\.\d+'"):
        m.save_checkpoint(tmp_path / "nodir" / "c.safetensors", 0)
    with pytest.raises(EngineError, match=r"data_position=-1 must be >= 0"):
        m.save_checkpoint(tmp_path / "c.safetensors", -1)


@pytest.mark.parametrize("cut", [4, 100, 3000, -100])
def test_truncated_checkpoint_is_refused_and_model_untouched(tmp_path, data, cut):
    x, y = data
    m = _model()
    _init(m)
    _steps(m, x, y, range(2))
    m.save_checkpoint(tmp_path / "c.safetensors", 2)
    raw = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:cut])
    other = _model()
    _init(other, seed=7)
    before = other.params()
    with pytest.raises(EngineError, match=r"td_model_load_checkpoint: '.*t\.safetensors' "
                                          r"(is \d+ bytes, too short|declares a \d+-byte header"
                                          r"|has a malformed JSON header|is truncated or "
                                          r"corrupt: tensor 'adamw\.v\.)"):
        other.load_checkpoint(tmp_path / "t.safetensors")
    assert _same_params(other.params(), before)
    assert other.get_int("step") == 0


@pytest.mark.parametrize("over, key, got, want", [
    ({"lr": 2e-3}, "lr", "0.001", "0.002"),
    ({"n_layer": 3}, "n_layer", "2", "3"),
    ({"n_embd": 60, "n_head": 3}, "n_embd", "48", "60"),
    ({"grad_clip": 0.0}, "grad_clip", "1", "0"),
])
def test_mismatched_config_is_refused_naming_key_and_values(tmp_path, over, key, got, want):
    _model().save_checkpoint(tmp_path / "c.safetensors", 0)
    with pytest.raises(EngineError, match=rf"written for {key}={got}, this model has "
                                          rf"{key}={want}\. HINT: resume with the configuration"):
        _model(**over).load_checkpoint(tmp_path / "c.safetensors")


def test_checkpoint_of_another_stage_is_refused(tmp_path):
    s0 = _model(stage=0, stages=2)
    s0.save_checkpoint(tmp_path / "s0.safetensors", 0)
    with pytest.raises(EngineError, match=r"written for stage=0, this model has stage=1"):
        _model(stage=1, stages=2).load_checkpoint(tmp_path / "s0.safetensors")
    with pytest.raises(EngineError, match=r"written for stages=2, this model has stages=1"):
        _model().load_checkpoint(tmp_path / "s0.safetensors")


def test_weights_file_is_not_a_checkpoint(tmp_path):
    m = _model()
    m.save_safetensors(tmp_path / "w.safetensors")
    with pytest.raises(EngineError, match=r"is not a training checkpoint \(__metadata__ format "
                                          r"is missing, expected 'tandem-checkpoint'\)"):
        m.load_checkpoint(tmp_path / "w.safetensors")


def test_missing_moment_and_wrong_version_are_refused(tmp_path):
    m = _model()
    m.save_checkpoint(tmp_path / "c.safetensors", 0)
    tensors = read_safetensors(tmp_path / "c.safetensors")
    meta = read_safetensors_metadata(tmp_path / "c.safetensors")
    no_v = {k: v for k, v in tensors.items() if k != "adamw.v.ln_f.bias"}
    write_safetensors(tmp_path / "nov.safetensors", no_v, meta)
    with pytest.raises(EngineError, match=r"lacks tensor 'adamw\.v\.ln_f\.bias' \(expected F32 "
                                          r"\(48,\)\)"):
        m.load_checkpoint(tmp_path / "nov.safetensors")
    write_safetensors(tmp_path / "v2.safetensors", tensors, {**meta, "format_version": "2"})
    with pytest.raises(EngineError, match=r"written for format_version=2, this model has "
                                          r"format_version=1"):
        m.load_checkpoint(tmp_path / "v2.safetensors")
    f64 = {k: v.astype(np.float64) for k, v in tensors.items()}
    write_safetensors(tmp_path / "f64.safetensors", f64, meta)
    with pytest.raises(EngineError, match=r"tensor 'wte\.weight' is F64 \(311, 48\), the model "
                                          r"expects F32 \(311, 48\)"):
        m.load_checkpoint(tmp_path / "f64.safetensors")


def test_find_nonfinite_names_the_first_tensor(monkeypatch, data):
    x, y = data
    m = _model()
    _init(m)
    assert m.find_nonfinite() is None
    w = m.get_param("h.1.mlp.c_proj.weight")
    w[3, 5] = np.inf
    m.set_param("h.1.mlp.c_proj.weight", w)
    assert m.find_nonfinite() == ("parameter", "h.1.mlp.c_proj.weight")
    m.zero_grad()
    m.forward_backward(x[0], y[0])
    found = m.find_nonfinite()
    assert found is not None and found[0] == "gradient"
    with pytest.raises(EngineError, match=r"grad_norm=-?(nan|inf) is not a finite non-negative "
                                          r"number \(step 0\); first non-finite gradient on stage "
                                          rf"0: '{found[1]}'"):
        m.optimizer_step()


# ---- pipelined resume ----------------------------------------------------------------------------

from harness import pipeline  # noqa: E402

needs_mpi = [pytest.mark.mpi, pytest.mark.skipif(pipeline.unavailable() is not None,
                                                 reason=str(pipeline.unavailable()))]


def _pipe_case(schedule, steps=6, **optim):
    base = load_suite("smoke").case("tiny")
    pipe = dataclasses.replace(base.pipeline, stages=2, microbatches=2, schedule=schedule)
    case = dataclasses.replace(base, steps=steps, pipeline=pipe)
    if optim:
        case = dataclasses.replace(case, optim=dataclasses.replace(case.optim, **optim))
    return case


def _weights(case, path):
    m = case.model
    with Model(**{**TINY, "n_layer": m.n_layer}) as probe:
        params = init_params([(p.name, p.shape) for p in probe.table], m.n_layer, case.seed)
    write_safetensors(path, params)
    return path


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
@pytest.mark.parametrize("resume_at", [2, 4])
@needs_mpi[0]
@needs_mpi[1]
def test_pipelined_resume_after_a_crash_is_bit_identical(tmp_path, schedule, resume_at):
    """A rank dies at step 5; the run resumes from a checkpoint written every 2 steps: the losses
    of the resumed steps and the final parameters equal the uninterrupted run's, bit for bit."""
    case = _pipe_case(schedule)
    weights = _weights(case, tmp_path / "w.safetensors")
    x, y = make_case_data(case)
    whole = pipeline.run_pipeline(case, weights, x, y, tmp_path / "whole", timeout=120)
    ck = tmp_path / "ck"
    with pytest.raises(RankFailure, match=r"TANDEM_CRASH requested.*step 5"):
        pipeline.run_pipeline(case, weights, x, y, tmp_path / "a", timeout=120,
                              checkpoint_dir=ck, checkpoint_every=2,
                              extra_env={"TANDEM_CRASH": "1:5"})
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002", "step_00000004"]
    assert sorted(p.name for p in (ck / "step_00000004").iterdir()) == [
        "stage0.safetensors", "stage1.safetensors"]
    res = pipeline.run_pipeline(case, weights, x, y, tmp_path / "b", timeout=120,
                                checkpoint_dir=ck, checkpoint_every=2, resume_step=resume_at)
    assert list(res.steps) == list(range(resume_at, 6))
    assert np.array_equal(res.losses, whole.losses[resume_at:])
    assert np.array_equal(res.grad_norms, whole.grad_norms[resume_at:])
    assert _same_params(res.params, whole.params)


@needs_mpi[0]
@needs_mpi[1]
def test_pipelined_resume_from_a_truncated_stage_file_names_it(tmp_path):
    case = _pipe_case("1f1b", steps=4)
    weights = _weights(case, tmp_path / "w.safetensors")
    x, y = make_case_data(case)
    ck = tmp_path / "ck"
    pipeline.run_pipeline(case, weights, x, y, tmp_path / "a", timeout=120, checkpoint_dir=ck,
                          checkpoint_every=2)
    f = ck / "step_00000002" / "stage1.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(RankFailure, match=r"rank 1 failed: .*resume at step 2, stage 1: "
                                          r"td_model_load_checkpoint: .*stage1\.safetensors' is "
                                          r"truncated or corrupt"):
        pipeline.run_pipeline(case, weights, x, y, tmp_path / "b", timeout=120,
                              checkpoint_dir=ck, resume_step=2)


# ---- tandem train --------------------------------------------------------------------------------


def _train(capsys, *argv):
    rc = tandem_main(["train", "--progress-every", "0", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _train_json(capsys, *argv):
    rc, out, err = _train(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


LAYOUTS = {"one-stage": [], "1f1b": ["--stages", 2, "--microbatches", 2, "--schedule", "1f1b"],
           "zb-h1": ["--stages", 2, "--microbatches", 2, "--schedule", "zb-h1"]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_train_resume_is_bit_identical(tmp_path, capsys, layout):
    if layout != "one-stage" and pipeline.unavailable():
        pytest.skip(pipeline.unavailable())
    extra = LAYOUTS[layout]
    whole = _train_json(capsys, "--steps", 7, *extra)
    ck = tmp_path / "ck"
    part = _train_json(capsys, "--steps", 4, "--checkpoint-dir", ck, "--checkpoint-every", 3,
                       *extra)
    assert part["checkpoints"] == [str(ck / "step_00000003")]
    rest = _train_json(capsys, "--steps", 7, "--checkpoint-dir", ck, "--checkpoint-every", 3,
                       "--resume", *extra)
    assert rest["start_step"] == 3 and rest["resumed_from"] == str(ck / "step_00000003")
    assert rest["step_index"] == [3, 4, 5, 6]
    assert part["losses"][:3] + rest["losses"] == whole["losses"]
    assert rest["params_sha256"] == whole["params_sha256"]
    assert rest["checkpoints"] == [str(ck / "step_00000006")]


def test_planted_bug_breaks_bit_identity(tmp_path, capsys, monkeypatch):
    """The bit-identity check is sharp: a resume that loses the second moments (v reset to
    zero, as if it were not saved) gives different losses and parameters."""
    whole = _train_json(capsys, "--steps", 5)
    ck = tmp_path / "ck"
    _train_json(capsys, "--steps", 2, "--checkpoint-dir", ck, "--checkpoint-every", 2)
    real_load = Model.load_checkpoint

    def load_without_v(self, path):
        pos = real_load(self, path)
        tensors = read_safetensors(path)
        meta = read_safetensors_metadata(path)
        tensors = {k: (np.zeros_like(v) if k.startswith("adamw.v.") else v)
                   for k, v in tensors.items()}
        zeroed = path.with_name("zeroed.safetensors")
        write_safetensors(zeroed, tensors, meta)
        real_load(self, zeroed)
        return pos

    monkeypatch.setattr(Model, "load_checkpoint", load_without_v)
    rest = _train_json(capsys, "--steps", 5, "--checkpoint-dir", ck, "--resume")
    assert rest["losses"] != whole["losses"][2:]
    assert rest["params_sha256"] != whole["params_sha256"]


def test_train_resume_skips_an_incomplete_newest_checkpoint(tmp_path, capsys):
    """A writer killed mid-save leaves only its temporary file: that step has no stage file,
    so --resume takes the step before it."""
    ck = tmp_path / "ck"
    _train_json(capsys, "--steps", 4, "--checkpoint-dir", ck, "--checkpoint-every", 2)
    killed = ck / "step_00000004"
    final = killed / "stage0.safetensors"
    final.replace(killed / "stage0.safetensors.tmp.12345")
    whole = _train_json(capsys, "--steps", 6)
    rest = _train_json(capsys, "--steps", 6, "--checkpoint-dir", ck, "--resume")
    assert rest["start_step"] == 2 and rest["params_sha256"] == whole["params_sha256"]


@pytest.mark.parametrize("layout", ["one-stage", "1f1b"])
def test_skip_mode_skips_and_counts(tmp_path, capsys, layout):
    if layout != "one-stage" and pipeline.unavailable():
        pytest.skip(pipeline.unavailable())
    res = _train_json(capsys, "--steps", 6, "--lr", 1e5, "--grad-clip", 0, "--on-nonfinite",
                      "skip", *LAYOUTS[layout])
    assert res["skipped_count"] == len(res["skipped"]) >= 1
    for step, loss, norm in zip(res["step_index"], res["losses"], res["grad_norms"]):
        assert (step in res["skipped"]) == (loss is None or norm is None), step
    rc, out, err = _train(capsys, "--steps", 6, "--lr", 1e5, "--grad-clip", 0,
                          "--on-nonfinite", "skip", *LAYOUTS[layout])
    assert rc == 0 and f"skipped steps: {res['skipped_count']} (" in out


def test_skip_mode_leaves_the_parameters_when_every_step_is_bad(capsys, monkeypatch):
    """A NaN planted in every GELU backward: every update is skipped, nothing changes."""
    monkeypatch.setenv("TANDEM_FAULT", "gelu_backward:nan")
    res = _train_json(capsys, "--steps", 3, "--on-nonfinite", "skip")
    assert res["skipped"] == [0, 1, 2] and res["skipped_count"] == 3
    seed = load_suite("smoke").case("tiny").seed
    with _model() as m:
        init = init_params([(p.name, p.shape) for p in m.table], TINY["n_layer"], seed)
    assert res["params_sha256"] == train.params_digest(init)


def test_stop_mode_names_step_stage_and_tensor(capsys, monkeypatch):
    monkeypatch.setenv("TANDEM_FAULT", "gelu_backward:nan")
    rc, out, err = _train(capsys, "--steps", 3)
    assert rc == 3
    assert "tandem train: error: step 0: non-finite gradient norm" in err
    assert "on stage 0; first non-finite tensor: the gradient of 'wte.weight'" in err
    assert "Traceback" not in err


@needs_mpi[0]
@needs_mpi[1]
def test_stop_mode_pipelined_names_step_stage_and_tensor(capsys):
    rc, out, err = _train(capsys, "--steps", 6, "--lr", 1e5, "--grad-clip", 0, *LAYOUTS["1f1b"])
    assert rc == 3
    import re
    assert re.search(r"rank \d failed: TD_ERR_RANGE: step \d: non-finite (loss|gradient norm) "
                     r".*this rank's stage \d.*(first non-finite tensor: the (gradient|parameter) "
                     r"of '[\w.]+' on stage \d|no non-finite gradient or parameter on this rank)",
                     err), err


def test_train_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        tandem_main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint-dir", "--checkpoint-every", "--resume", "--on-nonfinite",
                 "--json", "--tokens", "--stages"):
        assert flag in out


# ---- bad input: exit 2 with a message -----------------------------------------------------------


def test_negative_checkpoint_every(tmp_path, capsys):
    rc, out, err = _train(capsys, "--checkpoint-dir", tmp_path, "--checkpoint-every", -3)
    assert rc == 2 and "--checkpoint-every -3: must be >= 0" in err


def test_checkpoint_every_without_dir(capsys):
    rc, out, err = _train(capsys, "--checkpoint-every", 2)
    assert rc == 2 and "--checkpoint-every 2 needs --checkpoint-dir DIR" in err


def test_resume_from_a_missing_dir(tmp_path, capsys):
    rc, out, err = _train(capsys, "--checkpoint-dir", tmp_path / "nope", "--resume")
    assert rc == 2 and f"checkpoint directory {tmp_path / 'nope'} does not exist" in err


def test_resume_from_an_empty_dir(tmp_path, capsys):
    rc, out, err = _train(capsys, "--checkpoint-dir", tmp_path, "--resume")
    assert rc == 2 and f"--resume: no complete checkpoint in {tmp_path}" in err


def test_resume_from_a_truncated_checkpoint(tmp_path, capsys):
    _train_json(capsys, "--steps", 2, "--checkpoint-dir", tmp_path, "--checkpoint-every", 2)
    f = tmp_path / "step_00000002" / "stage0.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    rc, out, err = _train(capsys, "--steps", 4, "--checkpoint-dir", tmp_path, "--resume")
    assert rc == 2
    assert "checkpoint refused: td_model_load_checkpoint:" in err and "is truncated" in err
    assert "Traceback" not in err


def test_resume_with_another_optimizer_setting(tmp_path, capsys):
    _train_json(capsys, "--steps", 2, "--checkpoint-dir", tmp_path, "--checkpoint-every", 2)
    rc, out, err = _train(capsys, "--steps", 4, "--checkpoint-dir", tmp_path, "--resume",
                          "--lr", 0.002)
    assert rc == 2 and "was written for lr=0.001, this model has lr=0.002" in err


def test_resume_with_another_layout(tmp_path, capsys):
    if pipeline.unavailable():
        pytest.skip(pipeline.unavailable())
    _train_json(capsys, "--steps", 2, "--checkpoint-dir", tmp_path, "--checkpoint-every", 2)
    rc, out, err = _train(capsys, "--steps", 4, "--checkpoint-dir", tmp_path, "--resume",
                          *LAYOUTS["1f1b"])
    assert rc == 2 and "trained with microbatches=1, this run has microbatches=2" in err, err


def test_resume_with_other_data(tmp_path, capsys):
    from harness.data import random_tokens, write_shard

    _train_json(capsys, "--steps", 2, "--checkpoint-dir", tmp_path / "ck",
                "--checkpoint-every", 2)
    shard = write_shard(tmp_path / "t.bin", random_tokens(4096, 311, 3), 311)
    rc, out, err = _train(capsys, "--steps", 4, "--checkpoint-dir", tmp_path / "ck", "--resume",
                          "--tokens", shard)
    assert rc == 2 and "trained with tokens=None, this run has tokens=" in err


def test_resume_past_the_requested_steps(tmp_path, capsys):
    _train_json(capsys, "--steps", 4, "--checkpoint-dir", tmp_path, "--checkpoint-every", 4)
    rc, out, err = _train(capsys, "--steps", 2, "--checkpoint-dir", tmp_path, "--resume")
    assert rc == 2 and "is at step 4, past --steps 2" in err


def test_missing_token_file(tmp_path, capsys):
    rc, out, err = _train(capsys, "--tokens", tmp_path / "none.bin")
    assert rc == 2 and "none.bin: no such file" in err


def test_train_with_a_token_file(tmp_path, capsys):
    from harness.data import random_tokens, write_shard

    shard = write_shard(tmp_path / "t.bin", random_tokens(4096, 311, 3), 311)
    a = _train_json(capsys, "--steps", 3, "--tokens", shard)
    b = _train_json(capsys, "--steps", 3)
    assert a["losses"] != b["losses"] and len(a["losses"]) == 3
