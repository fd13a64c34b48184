"""harness/config.py: strict suite loading. Every bad input names its key path and value."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from harness.config import (CaseConfig, ModelConfig, OptimConfig, PipelineConfig, builtin_suites,
                            case_axes, case_id, case_slug, load_suite, microbatch_size,
                            parse_suite, stage_layers)
from harness.errors import ConfigError
from harness.records import Record

MODEL = "{ n_layer = 2, n_embd = 48, n_head = 3, vocab_size = 311, n_positions = 32 }"


def suite(case: str = "", *, model: str = MODEL, head: str = "", more: str = "") -> str:
    """A one-case suite; `case` lines are appended to (and may override) a valid case."""
    base = {"name": '"tiny"', "model": model, "seq_len": "16", "batch_size": "4", "steps": "5"}
    lines = [ln for ln in case.strip().splitlines() if ln.strip()]
    for ln in lines:
        base.pop(ln.split("=")[0].strip(), None)
    body = "\n".join(f"{k} = {v}" for k, v in base.items())
    return f'[suite]\nname = "t"\n{head}\n[[case]]\n{body}\n' + "\n".join(lines) + f"\n{more}"


def bad(text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_suite(text, "t.toml")


def test_valid_minimal_case_and_defaults():
    s = parse_suite(suite(), "t.toml")
    (c,) = s.cases
    assert (c.name, c.seq_len, c.batch_size, c.steps, c.seed) == ("tiny", 16, 4, 5, 0)
    assert c.model == ModelConfig(2, 48, 3, 311, 32)
    assert c.optim == OptimConfig() and c.pipeline == PipelineConfig()
    assert (c.data, c.dtype, c.backend, c.tiers) == ("random", "fp32", "cpu",
                                                     ("op", "model", "trajectory"))
    assert s.bench.repeats == 5 and s.bench.warmup == 2 and s.description == ""
    assert s.path == Path("t.toml")


def test_full_case_keys():
    text = suite('''
        seed = 3
        lr = 3e-4
        beta1 = 0.8
        beta2 = 0.99
        eps = 1e-6
        weight_decay = 0
        grad_clip = 0
        data = "text"
        tiers = ["trajectory", "model"]
        pipeline = { stages = 2, microbatches = 2, schedule = "1f1b", layers = [1, 1] }
    ''', model="{ n_layer = 2, n_embd = 48, n_head = 3, vocab_size = 256, n_positions = 32 }",
                 head="[bench]\nrepeats = 7\nwarmup = 0\n")
    s = parse_suite(text)
    c = s.cases[0]
    assert c.optim == OptimConfig(3e-4, 0.8, 0.99, 1e-6, 0.0, 0.0)
    assert isinstance(c.optim.weight_decay, float)
    assert c.pipeline == PipelineConfig(2, 2, "1f1b", 1, (1, 1))
    assert c.tiers == ("trajectory", "model") and c.data == "text" and c.seed == 3
    assert (s.bench.repeats, s.bench.warmup) == (7, 0)


def test_helpers():
    c = parse_suite(suite('pipeline = { stages = 2, microbatches = 2, schedule = "gpipe" }')
                    ).cases[0]
    axes = case_axes(c)
    assert axes == {"n_layer": 2, "n_embd": 48, "n_head": 3, "vocab_size": 311, "seq_len": 16,
                    "batch_size": 4, "stages": 2, "microbatches": 2, "schedule": "gpipe",
                    "chunks": 1}
    Record(suite="t", case=case_id(c), side="engine", metric="m", value=1.0, unit="x", **axes)
    assert case_id(c) == "tiny" and microbatch_size(c) == 2
    assert stage_layers(c) == (1, 1)
    c5 = dataclasses.replace(c, model=ModelConfig(5, 48, 3, 311, 32),
                             pipeline=PipelineConfig(stages=3))
    assert stage_layers(c5) == (2, 2, 1)
    ci = dataclasses.replace(c5, pipeline=PipelineConfig(2, 2, "interleaved", 2))
    assert stage_layers(ci) == (2, 1, 1, 1)
    named = dataclasses.replace(c, name="a/stages=2,m=4")
    assert case_slug(named) == "a_stages=2_m=4"


@pytest.mark.parametrize("lines, pattern", [
    # unknown keys, at every level
    ("sedd = 1", r"case\[0\]\.sedd: unknown key \(allowed: name, model, pipeline, seq_len"),
    ("", r"case\[0\]\.model\.n_hed: unknown key \(allowed: n_layer, n_embd, n_head, vocab_size, "
         r"n_positions\)"),
    ("pipeline = { stages = 1, schedul = 'gpipe' }",
     r"case\[0\]\.pipeline\.schedul: unknown key \(allowed: stages, microbatches, schedule"),
    # wrong types
    ("seq_len = '16'", r"case\[0\]\.seq_len = '16': expected an integer"),
    ("steps = true", r"case\[0\]\.steps = True: expected an integer"),
    ("batch_size = 4.0", r"case\[0\]\.batch_size = 4\.0: expected an integer"),
    ("lr = 'fast'", r"case\[0\]\.lr = 'fast': expected a finite number"),
    ("lr = nan", r"case\[0\]\.lr = nan: expected a finite number"),
    ("model = 5", r"case\[0\]\.model = 5: expected a table"),
    ("pipeline = 2", r"case\[0\]\.pipeline = 2: expected a table"),
    ("tiers = 'op'", r"case\[0\]\.tiers = 'op': expected a list"),
    ("name = ''", r"case\[0\]\.name = '': expected a non-empty string"),
    # bad values
    ("seq_len = 0", r"case\[0\]\.seq_len = 0: must be >= 1"),
    ("seq_len = 33", r"case\[0\]\.seq_len = 33: exceeds model\.n_positions = 32"),
    ("batch_size = -4", r"case\[0\]\.batch_size = -4: must be >= 1"),
    ("steps = 0", r"case\[0\]\.steps = 0: must be >= 1"),
    ("seed = -1", r"case\[0\]\.seed = -1: must be >= 0"),
    ("lr = 0", r"case\[0\]\.lr = 0\.0: must be > 0"),
    ("beta2 = 1.0", r"case\[0\]\.beta2 = 1\.0: must be in \[0, 1\)"),
    ("eps = 0", r"case\[0\]\.eps = 0\.0: must be > 0"),
    ("weight_decay = -0.1", r"case\[0\]\.weight_decay = -0\.1: must be >= 0"),
    ("grad_clip = -1", r"case\[0\]\.grad_clip = -1\.0: must be >= 0"),
    ("data = 'wiki'", r"case\[0\]\.data = 'wiki': unknown value \(allowed: random, text\)"),
    ("dtype = 'fp16'", r"case\[0\]\.dtype = 'fp16': unknown value \(allowed: fp32, bf16\)"),
    ("dtype = 'bf16'", r"case\[0\]\.dtype = 'bf16': bf16 needs backend = 'cuda'"),
    ("backend = 'tpu'", r"case\[0\]\.backend = 'tpu': unknown value \(allowed: cpu, cuda\)"),
    ("tiers = []", r"case\[0\]\.tiers = \[\]: needs at least one tier"),
    ("tiers = ['op', 'speed']", r"case\[0\]\.tiers\[1\] = 'speed': unknown value"),
    ("tiers = ['op', 'op']", r"case\[0\]\.tiers = \['op', 'op'\]: lists a tier twice"),
    # pipeline
    ("pipeline = { schedule = '1f1c' }",
     r"case\[0\]\.pipeline\.schedule = '1f1c': unknown value \(allowed: gpipe, 1f1b, "
     r"interleaved, zb-h1\)"),
    ("pipeline = { stages = 0 }", r"case\[0\]\.pipeline\.stages = 0: must be >= 1"),
    ("pipeline = { stages = 3 }", r"case\[0\]\.pipeline\.stages = 3: more stages than layers "
                                  r"\(n_layer = 2\)"),
    ("pipeline = { microbatches = 3 }",
     r"case\[0\]\.pipeline\.microbatches = 3: does not divide batch_size = 4"),
    ("pipeline = { microbatches = 8 }",
     r"case\[0\]\.pipeline\.microbatches = 8: does not divide batch_size = 4"),
    ("pipeline = { chunks = 2 }",
     r"case\[0\]\.pipeline\.chunks = 2: chunks > 1 needs schedule = 'interleaved'"),
    ("pipeline = { stages = 2, microbatches = 1, schedule = 'interleaved' }",
     r"case\[0\]\.pipeline\.microbatches = 1: interleaved needs a multiple of stages = 2"),
    ("pipeline = { stages = 2, microbatches = 2, schedule = 'interleaved', chunks = 2 }",
     r"case\[0\]\.pipeline\.chunks = 2: stages x chunks = 4 model chunks but only n_layer = 2"),
    ("pipeline = { stages = 2, layers = [2] }",
     r"case\[0\]\.pipeline\.layers = \[2\]: needs 2 entries"),
    ("pipeline = { stages = 2, layers = [2, 1] }",
     r"case\[0\]\.pipeline\.layers = \[2, 1\]: sums to 3, not n_layer = 2"),
    ("pipeline = { stages = 2, layers = [2, 0] }",
     r"case\[0\]\.pipeline\.layers\[1\] = 0: must be >= 1"),
])
def test_bad_case(lines, pattern):
    model = MODEL.replace("n_head", "n_hed") if "n_hed" in pattern else MODEL
    bad(suite(lines, model=model), pattern)


@pytest.mark.parametrize("model, pattern", [
    ("{ n_layer = 2, n_embd = 50, n_head = 3, vocab_size = 311, n_positions = 32 }",
     r"case\[0\]\.model\.n_embd = 50: not divisible by n_head = 3"),
    ("{ n_layer = 0, n_embd = 48, n_head = 3, vocab_size = 311, n_positions = 32 }",
     r"case\[0\]\.model\.n_layer = 0: must be >= 1"),
    ("{ n_layer = 2, n_embd = 48, n_head = 3, vocab_size = -1, n_positions = 32 }",
     r"case\[0\]\.model\.vocab_size = -1: must be >= 1"),
    ("{ n_layer = 2, n_embd = 48, n_head = 3, vocab_size = 311 }",
     r"case\[0\]\.model\.n_positions: missing \(required\)"),
    ("'huge'", r"case\[0\]\.model = 'huge': unknown model name"),
])
def test_bad_model(model, pattern):
    bad(suite(model=model), pattern)


def test_text_data_needs_byte_vocab():
    small = "{ n_layer = 2, n_embd = 48, n_head = 3, vocab_size = 100, n_positions = 32 }"
    bad(suite("data = 'text'", model=small),
        r"case\[0\]\.model\.vocab_size = 100: data = 'text' is byte-level and needs "
        r"vocab_size >= 256")


def test_message_names_file_and_case():
    with pytest.raises(ConfigError) as e:
        parse_suite(suite("seq_len = 0"), "suites/x.toml")
    assert 'case "tiny"' in str(e.value) and "suites/x.toml" in str(e.value)


def test_missing_required_case_key():
    text = f'[suite]\nname = "t"\n[[case]]\nname = "a"\nmodel = {MODEL}\nseq_len = 4\n'
    bad(text, r"case\[0\]\.batch_size: missing \(required\)")


def test_top_level_and_tables():
    ok = suite()
    bad("foo = 1\n" + ok, r"^foo: unknown key \(allowed: suite, defaults, models, bench, case\)")
    bad(ok.replace('name = "t"', 'name = "t"\nowner = "me"', 1),
        r"suite\.owner: unknown key \(allowed: name, description\)")
    bad(ok.replace('name = "t"\n', "", 1), r"suite\.name = None: expected a non-empty string")
    bad('[suite]\nname = "t"\n', r"case: the suite needs at least one \[\[case\]\] table")
    bad(suite(head="[bench]\nrepeat = 3\n"), r"bench\.repeat: unknown key \(allowed: repeats, "
                                             r"warmup\)")
    bad(suite(head="[bench]\nrepeats = 0\n"), r"bench\.repeats = 0: must be >= 1")
    bad(suite(head="[bench]\nwarmup = -1\n"), r"bench\.warmup = -1: must be >= 0")
    bad(suite(head="[defaults]\nname = 'x'\n"), r"defaults\.name: unknown key")
    bad(suite(head="[models]\nm = { n_layer = 2 }\n"), r"models\.m\.n_embd: missing")


def test_defaults_apply_and_merge():
    text = ('[suite]\nname = "t"\n[defaults]\nsteps = 9\nlr = 0.01\n'
            f'model = {MODEL}\nseq_len = 8\nbatch_size = 4\n'
            'pipeline = { schedule = "1f1b", microbatches = 2 }\n'
            '[[case]]\nname = "a"\n'
            '[[case]]\nname = "b"\nsteps = 2\npipeline = { stages = 2 }\n')
    a, b = parse_suite(text).cases
    assert (a.steps, b.steps, a.optim.lr, b.optim.lr) == (9, 2, 0.01, 0.01)
    assert a.pipeline == PipelineConfig(1, 2, "1f1b")
    assert b.pipeline == PipelineConfig(2, 2, "1f1b")  # tables merge key by key


def test_bad_default_names_defaults():
    text = suite(head="[defaults]\nseed = -3\n").replace("steps = 5", "")
    bad(text, r"defaults\.seed = -3: must be >= 0 \[case \"tiny\", applied to case\[0\]")


def test_named_models():
    text = suite(model='"m"', head=f"[models]\nm = {MODEL}\n")
    assert parse_suite(text).cases[0].model.n_embd == 48
    bad(suite(head="[models]\nm = { n_layer = 2, n_embd = 47, n_head = 3, vocab_size = 3, "
                   "n_positions = 8 }\n"), r"models\.m\.n_embd = 47: not divisible by n_head")


def test_duplicate_case_names():
    text = suite() + f'[[case]]\nname = "tiny"\nmodel = {MODEL}\nseq_len = 4\nbatch_size = 1\n'
    bad(text, r"case\[1\]\.name = 'tiny': duplicate case name \(also case\[0\]\)")


def test_malformed_toml_names_file_line_column():
    with pytest.raises(ConfigError, match=r"t\.toml: malformed TOML: .*line 3, column"):
        parse_suite('[suite]\nname = "t"\nsteps = = 3\n', "t.toml")


# ---- sweeps ------------------------------------------------------------------------------------


def test_sweep_expansion_names_and_order():
    s = parse_suite(suite(more="[case.sweep]\nstages = [1, 2]\nmicrobatches = [1, 2, 4]\n"))
    names = [c.name for c in s.cases]
    assert names == [f"tiny/stages={p},microbatches={m}" for p in (1, 2) for m in (1, 2, 4)]
    c = s.case("tiny/stages=2,microbatches=4")
    assert (c.pipeline.stages, c.pipeline.microbatches) == (2, 4)


def test_sweep_model_and_shape_axes():
    head = f"[models]\nsmall = {MODEL}\n"
    more = ("[case.sweep]\nmodel = ['small', { n_layer = 1, n_embd = 32, n_head = 2, "
            "vocab_size = 64, n_positions = 16 }]\nn_head = [1, 2]\nseq_len = [8]\n")
    s = parse_suite(suite(model='"small"', head=head, more=more))
    names = [c.name for c in s.cases]
    assert names[0] == "tiny/model=small,n_head=1,seq_len=8"
    assert names[-1] == "tiny/model=L1C32NH2V64,n_head=2,seq_len=8"
    assert s.cases[-1].model == ModelConfig(1, 32, 2, 64, 16)


def test_sweep_errors():
    bad(suite(more="[case.sweep]\nstage = [1]\n"), r"case\[0\]\.sweep\.stage: unknown key")
    bad(suite(more="[case.sweep]\nstages = 2\n"),
        r"case\[0\]\.sweep\.stages = 2: expected a non-empty list")
    bad(suite(more="[case.sweep]\nstages = [1, 'x']\n"),
        r"case\[0\]\.sweep\.stages\[1\] = 'x': expected an integer >= 1")
    bad(suite(more="[case.sweep]\nschedule = ['gpipe', 'zb-v']\n"),
        r"case\[0\]\.sweep\.schedule\[1\] = 'zb-v': unknown value")
    bad(suite(more="[case.sweep]\nstages = [1, 1]\n"), r"lists a value twice")
    bad(suite(more="[case.sweep]\nskip_invalid = 1\nstages=[1]\n"),
        r"case\[0\]\.sweep\.skip_invalid = 1: expected true or false")
    # an invalid point fails the load unless skip_invalid is set
    bad(suite(more="[case.sweep]\nmicrobatches = [1, 3]\n"),
        r"case\[0\]\.pipeline\.microbatches = 3: does not divide batch_size = 4 "
        r"\[case \"tiny\", sweep point microbatches=3")
    bad(suite(more="[case.sweep]\nn_head = [5]\n"), r"case\[0\]\.model\.n_embd = 48: not "
                                                    r"divisible by n_head = 5")


def test_sweep_skip_invalid():
    more = "[case.sweep]\nstages = [1, 2, 3]\nmicrobatches = [1, 3]\nskip_invalid = true\n"
    s = parse_suite(suite(more=more))
    assert [c.name for c in s.cases] == ["tiny/stages=1,microbatches=1",
                                         "tiny/stages=2,microbatches=1"]
    assert len(s.skipped) == 4 and s.skipped[0][0] == "tiny/stages=1,microbatches=3"
    bad(suite(more="[case.sweep]\nstages = [3]\nskip_invalid = true\n"),
        r"case\[0\]\.sweep: every sweep point is invalid; the first: .*stages = 3")


# ---- dataclasses validate on their own too --------------------------------------------------


def test_dataclasses_validate_directly():
    m = ModelConfig(2, 48, 3, 311, 32)
    with pytest.raises(ConfigError, match=r"n_embd = 50: not divisible by n_head = 3"):
        ModelConfig(2, 50, 3, 311, 32)
    c = CaseConfig("x", m, 16, 4)
    with pytest.raises(ConfigError, match=r"seq_len = 64: exceeds model\.n_positions = 32"):
        dataclasses.replace(c, seq_len=64)
    with pytest.raises(ConfigError, match=r"schedule = 'pipedream'"):
        PipelineConfig(schedule="pipedream")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seq_len = 3  # type: ignore[misc]


# ---- built-in suites ---------------------------------------------------------------------------


def test_builtin_suites_all_load():
    names = builtin_suites()
    for want in ("smoke", "full", "cpu-smoke", "cpu-perf", "cpu-scaling", "gpu", "gpu-pipeline"):
        assert want in names
    for name in names:
        s = load_suite(name)
        assert s.name == name and s.cases and s.description
        assert s.path is not None and s.path.name == f"{name}.toml"


def test_builtin_suite_contents():
    smoke = load_suite("smoke")
    assert any(c.seq_len == 1 for c in smoke.cases)
    assert any(c.data == "text" and c.model.vocab_size == 256 for c in smoke.cases)
    assert {(c.pipeline.stages, c.pipeline.schedule, c.pipeline.microbatches)
            for c in smoke.cases} >= {(2, "1f1b", 2), (2, "gpipe", 4)}
    full = load_suite("full")
    inv = [c for c in full.cases if c.name.startswith("invariance")]
    assert {c.pipeline.schedule for c in inv} == {"gpipe", "1f1b", "zb-h1", "interleaved"}
    assert {c.pipeline.stages for c in inv} == {1, 2, 3, 4}
    assert {c.pipeline.microbatches for c in inv} == {1, 2, 4, 8}
    assert any(c.steps == 200 and c.data == "text" for c in full.cases)
    assert any(c.model.head_size == 24 and c.model.n_head == 3 for c in full.cases)
    assert {c.pipeline.schedule for c in smoke.cases if c.pipeline.stages > 1} == {
        "gpipe", "1f1b", "zb-h1", "interleaved"}
    assert any(c.pipeline.schedule == "zb-h1" and c.optim.grad_clip not in (0, 1)
               for c in smoke.cases)
    # AdamW off its defaults where a micro-batched trajectory runs (tools/mutants.toml's
    # clip-always needs clipping set above the gradient norm, i.e. inactive), with eps large
    # enough to break AdamW's scale invariance
    assert any(c.pipeline.microbatches > 1 and c.optim.grad_clip > 2.5 and c.optim.eps >= 1e-6
               for c in smoke.cases)
    gp = load_suite("gpu-pipeline")
    assert all(c.backend == "cuda" and c.dtype == "bf16" and c.seq_len == 1024 for c in gp.cases)
    piped = [c for c in gp.cases if c.pipeline.stages > 1]
    assert {c.pipeline.schedule for c in piped} == {"gpipe", "1f1b", "zb-h1", "interleaved"}
    assert {c.pipeline.stages for c in piped} == {2, 4}
    assert {c.pipeline.microbatches for c in piped} == {4, 8, 16}
    assert {c.model.n_layer for c in gp.cases} == {24, 48}
    # every model has one-stage controls at the same global batch, at M 2 and M 16
    for L in (24, 48):
        ctrl = {c.pipeline.microbatches for c in gp.cases
                if c.model.n_layer == L and c.pipeline.stages == 1}
        assert ctrl == {2, 16}
    gpu = load_suite("gpu")
    assert all(c.backend == "cuda" and c.dtype == "bf16" for c in gpu.cases)
    assert [c.model.n_layer for c in gpu.cases] == [12, 24, 48]
    perf = load_suite("cpu-perf")
    assert perf.case("gpt2-124m").model == ModelConfig(12, 768, 12, 50257, 1024)


def test_load_suite_by_path_and_unknown_name(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text(suite())
    assert load_suite(p).cases[0].name == "tiny"
    assert load_suite(str(p)).path == p
    with pytest.raises(ConfigError, match=r"no such suite file"):
        load_suite(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"unknown suite 'nosuch' \(built-in: .*smoke"):
        load_suite("nosuch")
    p.write_text("[suite\nname = 1\n")
    with pytest.raises(ConfigError, match=re.escape(str(p)) + r": malformed TOML: .*line 1"):
        load_suite(p)


# ---- the model family switch (family = "llama") ------------------------------------------------

LLAMA = ('{ family = "llama", n_layer = 2, n_embd = 48, n_head = 6, n_kv_head = 2, '
         'vocab_size = 311, n_positions = 32, ffn_dim = 80 }')


def llama(case: str = "", model: str = LLAMA) -> str:
    return suite('tiers = ["op"]\n' + case, model=model)


def test_family_defaults_to_gpt2_and_llama_keys_normalise():
    (g,) = parse_suite(suite()).cases
    assert g.model.family == "gpt2" and g.model.n_kv_head is None and g.model.ffn_dim is None
    (c,) = parse_suite(llama()).cases
    m = c.model
    assert (m.family, m.n_kv_head, m.ffn_dim, m.multiple_of, m.rope_theta, m.norm_eps) == \
        ("llama", 2, 80, None, 10000.0, 1e-5)
    assert c.tiers == ("op",) and m.head_size == 8
    # n_kv_head defaults to n_head; the MLP width follows Llama's multiple_of rule (256)
    (d,) = parse_suite(llama(model='{ family = "llama", n_layer = 1, n_embd = 48, n_head = 6, '
                                   'vocab_size = 17, n_positions = 16 }')).cases
    assert (d.model.n_kv_head, d.model.multiple_of, d.model.ffn_dim) == (6, 256, 256)
    (e,) = parse_suite(llama(model='{ family = "llama", n_layer = 1, n_embd = 4096, n_head = 32, '
                                   'vocab_size = 17, n_positions = 16, rope_theta = 500000.0 }'
                                   )).cases
    assert e.model.ffn_dim == 11008 and e.model.rope_theta == 500000.0  # Llama 2 7B's width
    assert ModelConfig(2, 48, 3, 311, 32) == g.model  # the GPT-2 positional form still holds


@pytest.mark.parametrize("model,pattern", [
    ('{ family = "llama", n_layer = 2, n_embd = 48, n_head = 6, n_kv_head = 4, vocab_size = 9, '
     'n_positions = 8 }', r"case\[0\]\.model\.n_kv_head = 4: must divide n_head = 6"),
    ('{ family = "llama", n_layer = 2, n_embd = 36, n_head = 4, vocab_size = 9, n_positions = 8 }',
     r"case\[0\]\.model\.n_head = 4: head size n_embd / n_head = 9 must be even"),
    ('{ family = "llama", n_layer = 2, n_embd = 48, n_head = 6, vocab_size = 9, n_positions = 8, '
     'ffn_dim = 100, multiple_of = 64 }',
     r"model\.ffn_dim = 100: multiple_of = 64 gives 128 for n_embd = 48: give ffn_dim or "
     r"multiple_of, not both"),
    ('{ family = "llama", n_layer = 2, n_embd = 48, n_head = 6, vocab_size = 9, n_positions = 8, '
     'rope_theta = 0 }', r"model\.rope_theta = 0\.0: must be > 0"),
    ('{ family = "llama", n_layer = 2, n_embd = 48, n_head = 6, vocab_size = 9, n_positions = 8, '
     'norm_eps = -1e-5 }', r"model\.norm_eps = -1e-05: must be > 0"),
    ('{ family = "llama", n_layer = 2, n_embd = 48, n_head = 6, vocab_size = 9, n_positions = 8, '
     'n_kv_head = 0 }', r"model\.n_kv_head = 0: must be >= 1"),
    ('{ family = "llama", n_layer = 2, n_embd = 48, n_head = 6, vocab_size = 9, n_positions = 8, '
     'ffn_dim = "big" }', r"model\.ffn_dim = 'big': expected an integer"),
    ('{ family = "mistral", n_layer = 2, n_embd = 48, n_head = 6, vocab_size = 9, '
     'n_positions = 8 }', r"model\.family = 'mistral': unknown value \(allowed: gpt2, llama\)"),
    ('{ n_layer = 2, n_embd = 48, n_head = 6, vocab_size = 9, n_positions = 8, n_kv_head = 2 }',
     r"model\.n_kv_head = 2: only for family = 'llama' \(this model is family = 'gpt2'\)"),
    ('{ family = "llama", n_layer = 2, n_embd = 48, n_head = 6, vocab_size = 9, n_positions = 8, '
     'n_kv_heads = 2 }', r"model\.n_kv_heads: unknown key .*family = 'llama' adds n_kv_head, "
     r"ffn_dim, multiple_of, rope_theta, norm_eps"),
])
def test_llama_model_keys_validate_naming_the_key(model, pattern):
    bad(llama(model=model), pattern)


def test_llama_case_runs_any_layout_and_backend():
    (m,) = parse_suite(suite(model=LLAMA)).cases  # every tier the config knows
    assert m.tiers == ("op", "model", "trajectory")
    (p,) = parse_suite(llama('pipeline = { stages = 2, microbatches = 2, schedule = "zb-h1" }')).cases
    assert (p.pipeline.stages, p.pipeline.microbatches) == (2, 2)
    (g,) = parse_suite(llama('backend = "cuda"\ndtype = "bf16"')).cases
    assert (g.backend, g.dtype) == ("cuda", "bf16")


def test_llama_sweep_recomputes_the_rule_width():
    text = suite('tiers = ["op"]\n[case.sweep]\nn_embd = [48, 96]',
                 model='{ family = "llama", n_layer = 1, n_embd = 48, n_head = 6, n_kv_head = 3, '
                       'vocab_size = 9, n_positions = 32, multiple_of = 32 }')
    widths = {c.model.n_embd: c.model.ffn_dim for c in parse_suite(text).cases}
    assert widths == {48: 128, 96: 256}


def test_llama_ops_suite():
    s = load_suite("llama-ops")
    assert all(c.model.family == "llama" and c.tiers == ("op",) for c in s.cases)
    kv = {(c.model.n_head, c.model.n_kv_head) for c in s.cases}
    assert {(6, 2), (6, 1), (4, 4)} == kv  # GQA, MQA, MHA
    assert any(c.seq_len == 1 for c in s.cases)
    assert any(c.model.rope_theta != 10000.0 for c in s.cases)
    for name in builtin_suites():  # llama cases: the llama suites', and llama-* cases elsewhere
        if not name.startswith("llama-"):
            assert all(c.model.family == "gpt2" or c.name.startswith("llama-")
                       for c in load_suite(name).cases), name
    (perf,) = [c for c in load_suite("cpu-perf").cases if c.model.family == "llama"]
    assert perf.backend == "cpu" and perf.model.n_kv_head < perf.model.n_head


def test_llama_smoke_suite():
    """Model and trajectory tiers on one stage: GQA, MQA, MHA at T = 1, real text; and every
    schedule family pipelined over two CPU ranks (ZB-H1 with clipping active)."""
    s = load_suite("llama-smoke")
    one = [c for c in s.cases if c.pipeline.stages == 1]
    assert all(c.model.family == "llama" for c in s.cases)
    assert all(c.tiers == ("model", "trajectory") and c.pipeline.microbatches == 1 for c in one)
    kinds = {(c.model.n_head, c.model.n_kv_head) for c in one}
    assert {(6, 2), (6, 1), (4, 4)} <= kinds
    assert any(c.seq_len == 1 for c in one) and any(c.data == "text" for c in one)
    assert all(c.steps >= 3 for c in s.cases)
    piped = {c.pipeline.schedule: c for c in s.cases if c.pipeline.stages > 1}
    assert sorted(piped) == ["1f1b", "gpipe", "interleaved", "zb-h1"]
    assert piped["zb-h1"].optim.grad_clip < 1.0 and piped["interleaved"].pipeline.chunks == 2
