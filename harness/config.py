"""Typed suite configuration: TOML files in, frozen dataclasses out, validated strictly at load.

A suite is a named list of cases (model shape, batch, steps, optimizer, pipeline layout, data,
dtype, backend, parity tiers). Unknown keys, wrong types and inconsistent values raise ConfigError
naming the key path and the value. This module only describes runs: it runs nothing and imports
neither the engine nor JAX. The file format is documented in suites/smoke.toml.
The dataclasses and the helpers over a case live in harness/config_types.py (every name
there is importable from here); this module reads and validates the TOML.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from harness.config_types import SCHEDULES, TIERS, DATA_KINDS, DTYPES, BACKENDS  # noqa: F401
from harness.config_types import FAMILIES, MODEL_REQUIRED, LLAMA_KEYS, LLAMA_DEFAULTS  # noqa: F401
from harness.config_types import TEXT_VOCAB  # noqa: F401
from harness.config_types import _Invalid, _is_int, _int, _float, _choice, _set  # noqa: F401
from harness.config_types import llama_ffn_dim, ModelConfig, OptimConfig  # noqa: F401
from harness.config_types import PipelineConfig, CaseConfig, BenchDefaults  # noqa: F401
from harness.config_types import SuiteConfig, case_id, case_slug  # noqa: F401
from harness.config_types import engine_model_keys  # noqa: F401
from harness.config_types import case_axes, microbatch_size, stage_layers  # noqa: F401
from harness.errors import ConfigError

# ---- TOML loading ------------------------------------------------------------------------------

MODEL_KEYS = tuple(f.name for f in fields(ModelConfig))
OPTIM_KEYS = tuple(f.name for f in fields(OptimConfig))
PIPELINE_KEYS = tuple(f.name for f in fields(PipelineConfig))
CASE_VALUE_KEYS = ("seq_len", "batch_size", "steps", "seed", "data", "dtype", "backend", "tiers")
CASE_KEYS = ("name", "model", "pipeline", *CASE_VALUE_KEYS, *OPTIM_KEYS, "sweep")
DEFAULT_KEYS = tuple(k for k in CASE_KEYS if k not in ("name", "sweep"))
TOP_KEYS = ("suite", "defaults", "models", "bench", "case")
SUITE_KEYS = ("name", "description")
BENCH_KEYS = tuple(f.name for f in fields(BenchDefaults))
SWEEP_PIPELINE_AXES = ("stages", "microbatches", "schedule", "chunks")
SWEEP_CASE_AXES = ("batch_size", "seq_len")
SWEEP_MODEL_AXES = ("n_layer", "n_embd", "n_head")
SWEEP_AXES = (*SWEEP_PIPELINE_AXES, *SWEEP_CASE_AXES, *SWEEP_MODEL_AXES, "model")
SWEEP_KEYS = (*SWEEP_AXES, "skip_invalid")


class _Loader:
    """Walks one parsed TOML document; every error names `where` (the file)."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, msg: str, context: str = "") -> ConfigError:
        extra = f"{context}, " if context else ""
        return ConfigError(f"{path}: {msg} [{extra}in {self.source}]")

    def invalid(self, prefix: str, exc: _Invalid, context: str = "") -> ConfigError:
        return self.fail(f"{prefix}.{exc.rel} = {exc.value!r}", exc.msg, context)

    def table(self, path: str, v: Any, allowed: tuple[str, ...]) -> dict:
        if not isinstance(v, dict):
            raise self.fail(f"{path} = {v!r}", "expected a table")
        for k in v:
            if k not in allowed:
                raise self.fail(f"{path}.{k}" if path else k,
                                f"unknown key (allowed: {', '.join(allowed)})")
        return v

    def model(self, path: str, v: Any, models: dict[str, ModelConfig]) -> ModelConfig:
        if isinstance(v, str):
            if v not in models:
                known = ", ".join(models) or "none: add a [models] table"
                raise self.fail(f"{path} = {v!r}", f"unknown model name (defined: {known})")
            return models[v]
        if not isinstance(v, dict):
            raise self.fail(f"{path} = {v!r}", "expected a table")
        for k in v:
            if k not in MODEL_KEYS:
                raise self.fail(f"{path}.{k}", f"unknown key (allowed: {', '.join(MODEL_REQUIRED)})"
                                f" and family = {' | '.join(map(repr, FAMILIES))}; family = "
                                f"'llama' adds {', '.join(LLAMA_KEYS)}")
        for k in MODEL_REQUIRED:
            if k not in v:
                raise self.fail(f"{path}.{k}", "missing (required)")
        try:
            return ModelConfig(**v)
        except _Invalid as e:
            raise self.invalid(path, e) from None

    def suite(self, doc: dict, path: Path | None) -> SuiteConfig:
        self.table("", doc, TOP_KEYS)
        suite = self.table("suite", doc.get("suite", {}), SUITE_KEYS)
        name = suite.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail(f"suite.name = {name!r}", "expected a non-empty string")
        description = suite.get("description", "")
        if not isinstance(description, str):
            raise self.fail(f"suite.description = {description!r}", "expected a string")

        bench_raw = self.table("bench", doc.get("bench", {}), BENCH_KEYS)
        try:
            bench = BenchDefaults(**bench_raw)
        except _Invalid as e:
            raise self.invalid("bench", e) from None

        models_raw = self.table("models", doc.get("models", {}), tuple(doc.get("models", {})))
        models = {k: self.model(f"models.{k}", v, {}) for k, v in models_raw.items()}

        defaults = self.table("defaults", doc.get("defaults", {}), DEFAULT_KEYS)

        cases_raw = doc.get("case")
        if not isinstance(cases_raw, list) or not cases_raw:
            raise self.fail("case", "the suite needs at least one [[case]] table")
        cases: list[CaseConfig] = []
        skipped: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        for i, raw in enumerate(cases_raw):
            got, skip = self.case(f"case[{i}]", raw, defaults, models)
            for c in got:
                if c.name in seen:
                    raise self.fail(f"case[{i}].name = {c.name!r}",
                                    f"duplicate case name (also case[{seen[c.name]}])")
                seen[c.name] = i
            cases.extend(got)
            skipped.extend(skip)
        return SuiteConfig(name, description, tuple(cases), path, bench, tuple(skipped))

    def case(self, path: str, raw: Any, defaults: dict, models: dict[str, ModelConfig]
             ) -> tuple[list[CaseConfig], list[tuple[str, str]]]:
        self.table(path, raw, CASE_KEYS)
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise self.fail(f"{path}.name = {name!r}", "expected a non-empty string")
        # [defaults] fill keys the case leaves out; the model and pipeline tables merge key by key
        merged = dict(defaults)
        for k, v in raw.items():
            if k in ("model", "pipeline") and isinstance(v, dict) and isinstance(
                    merged.get(k), dict):
                merged[k] = {**merged[k], **v}
            else:
                merged[k] = v
        from_defaults = {k for k in defaults if k not in raw}
        ctx = f'case "{name}"'
        model_axis = isinstance(merged.get("sweep"), dict) and "model" in merged["sweep"]
        for k in ("seq_len", "batch_size") + (() if model_axis else ("model",)):
            if k not in merged:
                raise self.fail(f"{path}.{k}", "missing (required)", ctx)
        mpath = "defaults.model" if "model" in from_defaults else f"{path}.model"
        model = self.model(mpath, merged["model"], models) if "model" in merged else None
        pipeline = self.table("defaults.pipeline" if "pipeline" in from_defaults
                              else f"{path}.pipeline", merged.get("pipeline", {}), PIPELINE_KEYS)
        sweep = merged.pop("sweep", None)

        def build(case_name: str, model: ModelConfig, pipe: dict, over: dict, point: str = ""
                  ) -> CaseConfig:
            values = {k: merged[k] for k in CASE_VALUE_KEYS if k in merged}
            values.update(over)
            optim = {k: merged[k] for k in OPTIM_KEYS if k in merged}
            context = ctx + (f", sweep point {point}" if point else "")
            try:
                try:
                    o = OptimConfig(**optim)
                except _Invalid as e:
                    raise _Invalid(e.rel, e.value, e.msg) from None  # optimizer keys are flat
                try:
                    p = PipelineConfig(**pipe)
                except _Invalid as e:
                    raise _Invalid(f"pipeline.{e.rel}", e.value, e.msg) from None
                return CaseConfig(name=case_name, model=model, optim=o, pipeline=p, **values)
            except _Invalid as e:
                top = e.rel.split(".")[0].split("[")[0]
                prefix = "defaults" if top in from_defaults else path
                if top in from_defaults:
                    context += f", applied to {path}"
                raise self.invalid(prefix, e, context) from None

        if sweep is None:
            return [build(name, model, pipeline, {})], []
        return self.sweep(f"{path}.sweep", sweep, name, model, pipeline, models, build)

    def sweep(self, path: str, sweep: Any, name: str, model: ModelConfig, pipeline: dict,
              models: dict[str, ModelConfig], build) -> tuple[list[CaseConfig], list]:
        self.table(path, sweep, SWEEP_KEYS)
        skip_invalid = sweep.get("skip_invalid", False)
        if not isinstance(skip_invalid, bool):
            raise self.fail(f"{path}.skip_invalid = {skip_invalid!r}", "expected true or false")
        axes: dict[str, list] = {}
        for axis, values in sweep.items():
            if axis == "skip_invalid":
                continue
            if not isinstance(values, list) or not values:
                raise self.fail(f"{path}.{axis} = {values!r}", "expected a non-empty list")
            checked = []
            for j, v in enumerate(values):
                vpath = f"{path}.{axis}[{j}]"
                if axis == "model":
                    m = self.model(vpath, v, models)
                    checked.append((v if isinstance(v, str) else _model_label(m), m))
                elif axis == "schedule":
                    if v not in SCHEDULES:
                        raise self.fail(f"{vpath} = {v!r}",
                                        f"unknown value (allowed: {', '.join(SCHEDULES)})")
                    checked.append((v, v))
                else:
                    if not _is_int(v) or v < 1:
                        raise self.fail(f"{vpath} = {v!r}", "expected an integer >= 1")
                    checked.append((str(v), v))
            labels = [lab for lab, _ in checked]
            if len(set(labels)) != len(labels):
                raise self.fail(f"{path}.{axis} = {values!r}", "lists a value twice")
            axes[axis] = checked
        if not axes:
            raise self.fail(path, "a sweep needs at least one axis "
                            f"(allowed: {', '.join(SWEEP_AXES)})")

        cases, skipped, first_error = [], [], None
        for combo in itertools.product(*axes.values()):
            point = ",".join(f"{a}={lab}" for a, (lab, _) in zip(axes, combo))
            chosen = {a: v for a, (_, v) in zip(axes, combo)}
            m = chosen.get("model", model)
            shape = {k: chosen[k] for k in SWEEP_MODEL_AXES if k in chosen}
            if shape:
                if m.family == "llama" and m.multiple_of is not None:
                    shape["ffn_dim"] = None  # the width follows n_embd by the rule
                try:
                    m = replace(m, **shape)
                except _Invalid as e:
                    err = self.invalid(path.rsplit(".", 1)[0] + ".model", e, f"sweep point {point}")
                    if not skip_invalid:
                        raise err from None
                    first_error = first_error or err
                    skipped.append((f"{name}/{point}", str(err)))
                    continue
            pipe = {**pipeline, **{k: chosen[k] for k in SWEEP_PIPELINE_AXES if k in chosen}}
            over = {k: chosen[k] for k in SWEEP_CASE_AXES if k in chosen}
            try:
                cases.append(build(f"{name}/{point}", m, pipe, over, point))
            except ConfigError as err:
                if not skip_invalid:
                    raise
                first_error = first_error or err
                skipped.append((f"{name}/{point}", str(err)))
        if not cases:
            raise ConfigError(f"{path}: every sweep point is invalid; the first: {first_error}")
        return cases, skipped


def _model_label(m: ModelConfig) -> str:
    if m.family == "llama":
        return f"llama-L{m.n_layer}C{m.n_embd}NH{m.n_head}KV{m.n_kv_head}V{m.vocab_size}"
    return f"L{m.n_layer}C{m.n_embd}NH{m.n_head}V{m.vocab_size}"


def parse_suite(text: str, path: Path | str | None = None) -> SuiteConfig:
    """Parse and validate suite TOML text. `path` only labels messages and SuiteConfig.path."""
    source = str(path) if path is not None else "<string>"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # the message carries "(at line L, column C)"
        raise ConfigError(f"{source}: malformed TOML: {e}") from None
    return _Loader(source).suite(doc, Path(path) if path is not None else None)


def suite_dirs() -> list[Path]:
    """Where built-in suites live, in lookup order: inside the installed package (the wheel puts
    them in harness/suites), then the source checkout's suites/ beside the harness package."""
    import harness

    pkg = Path(harness.__file__).resolve().parent
    return [pkg / "suites", pkg.parent / "suites"]


def builtin_suites() -> list[str]:
    names: set[str] = set()
    for d in suite_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def load_suite(name_or_path: str | os.PathLike) -> SuiteConfig:
    """Load a suite: a path to a .toml file, or the name of a built-in suite ("smoke")."""
    text = str(name_or_path)
    if isinstance(name_or_path, os.PathLike) or text.endswith(".toml") or os.sep in text:
        p = Path(name_or_path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such suite file")
        return _load_file(p)
    for d in suite_dirs():
        p = d / f"{text}.toml"
        if p.is_file():
            return _load_file(p)
    raise ConfigError(f"unknown suite {text!r} (built-in: {', '.join(builtin_suites()) or 'none'}; "
                      "or give a path to a .toml file)")


def _load_file(p: Path) -> SuiteConfig:
    try:
        text = p.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read suite file: {e}") from None
    return parse_suite(text, p)


__all__ = [
    "SCHEDULES", "TIERS", "FAMILIES", "LLAMA_KEYS", "llama_ffn_dim",
    "engine_model_keys", "ModelConfig", "OptimConfig", "PipelineConfig", "CaseConfig",
    "BenchDefaults", "SuiteConfig", "case_id", "case_slug", "case_axes", "microbatch_size",
    "stage_layers", "parse_suite", "load_suite", "builtin_suites", "suite_dirs",
]
