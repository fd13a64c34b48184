"""The typed suite configuration: frozen dataclasses per concern (model, optimizer, pipeline,
case, suite), each validating its own values, and the helpers over a case (ids, slugs, layers).

They describe runs only: nothing here reads files (harness/config.py loads TOML into them), runs
anything, or imports the engine or JAX. Every name here is importable from harness.config too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
TIERS = ("op", "model", "trajectory")
DATA_KINDS = ("random", "text")
DTYPES = ("fp32", "bf16")
BACKENDS = ("cpu", "cuda")
FAMILIES = ("gpt2", "llama")
MODEL_REQUIRED = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")
LLAMA_KEYS = ("n_kv_head", "ffn_dim", "multiple_of", "rope_theta", "norm_eps")
LLAMA_DEFAULTS = {"multiple_of": 256, "rope_theta": 10000.0, "norm_eps": 1e-5}  # n_kv_head: n_head
TEXT_VOCAB = 256  # data = "text" is byte-level: ids 0..255

# ---- validation helpers ------------------------------------------------------------------------


class _Invalid(ConfigError):
    """A bad value found inside a dataclass. `rel` is the key path relative to the object being
    built ("pipeline.microbatches"); the loader re-raises it with the full path and the file."""

    def __init__(self, rel: str, value: Any, msg: str):
        self.rel, self.value, self.msg = rel, value, msg
        super().__init__(f"{rel} = {value!r}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # TOML booleans are not sizes


def _int(rel: str, v: Any, minimum: int = 1) -> int:
    if not _is_int(v):
        raise _Invalid(rel, v, "expected an integer")
    if v < minimum:
        raise _Invalid(rel, v, f"must be >= {minimum}")
    return v


def _float(rel: str, v: Any) -> float:
    if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
        raise _Invalid(rel, v, "expected a finite number")
    return float(v)


def _choice(rel: str, v: Any, allowed: tuple[str, ...]) -> str:
    if v not in allowed:
        raise _Invalid(rel, v, f"unknown value (allowed: {', '.join(allowed)})")
    return v


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalise a field of a frozen dataclass


# ---- the typed configs -------------------------------------------------------------------------


def llama_ffn_dim(n_embd: int, multiple_of: int) -> int:
    """Llama's MLP width: 2/3 of 4·n_embd rounded up to a multiple of `multiple_of` (the rule
    of reference.llama.llama_ffn_dim, repeated here because config imports no JAX)."""
    return multiple_of * -(-int(2 * 4 * n_embd / 3) // multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    """Model shape (docs/model.md). HS = n_embd / n_head. family "gpt2" (default) takes the
    five GPT-2 keys only; "llama" adds n_kv_head (default n_head; must divide it), the MLP
    width as ffn_dim or by the multiple_of rule (default multiple_of = 256), rope_theta
    (default 10000) and norm_eps (default 1e-5), all normalised here: a loaded llama model has
    every one of them set (multiple_of stays None when ffn_dim was given)."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    family: str = "gpt2"
    n_kv_head: int | None = None
    ffn_dim: int | None = None
    multiple_of: int | None = None
    rope_theta: float | None = None
    norm_eps: float | None = None

    def __post_init__(self) -> None:
        for name in MODEL_REQUIRED:
            _int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise _Invalid("n_embd", self.n_embd, f"not divisible by n_head = {self.n_head}")
        _choice("family", self.family, FAMILIES)
        if self.family == "gpt2":
            for k in LLAMA_KEYS:
                if getattr(self, k) is not None:
                    raise _Invalid(k, getattr(self, k), "only for family = 'llama' (this model "
                                   "is family = 'gpt2')")
            return
        nkv = _int("n_kv_head", self.n_head if self.n_kv_head is None else self.n_kv_head)
        if self.n_head % nkv:
            raise _Invalid("n_kv_head", nkv, f"must divide n_head = {self.n_head}")
        if self.head_size % 2:
            raise _Invalid("n_head", self.n_head, f"head size n_embd / n_head = "
                           f"{self.head_size} must be even for rotary embeddings")
        _set(self, "n_kv_head", nkv)
        if self.ffn_dim is None:
            mult = _int("multiple_of", LLAMA_DEFAULTS["multiple_of"] if self.multiple_of is None
                        else self.multiple_of)
            _set(self, "multiple_of", mult)
            _set(self, "ffn_dim", llama_ffn_dim(self.n_embd, mult))
        else:
            _int("ffn_dim", self.ffn_dim)
            if self.multiple_of is not None:
                rule = llama_ffn_dim(self.n_embd, _int("multiple_of", self.multiple_of))
                if rule != self.ffn_dim:
                    raise _Invalid("ffn_dim", self.ffn_dim,
                                   f"multiple_of = {self.multiple_of} gives {rule} for n_embd = "
                                   f"{self.n_embd}: give ffn_dim or multiple_of, not both")
        for k in ("rope_theta", "norm_eps"):
            v = _float(k, LLAMA_DEFAULTS[k] if getattr(self, k) is None else getattr(self, k))
            if not v > 0:
                raise _Invalid(k, v, "must be > 0")
            _set(self, k, v)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters (docs/model.md); grad_clip = 0 turns clipping off."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            _set(self, f.name, _float(f.name, getattr(self, f.name)))
        if self.lr <= 0:
            raise _Invalid("lr", self.lr, "must be > 0")
        for b in ("beta1", "beta2"):
            if not 0 <= getattr(self, b) < 1:
                raise _Invalid(b, getattr(self, b), "must be in [0, 1)")
        if self.eps <= 0:
            raise _Invalid("eps", self.eps, "must be > 0")
        if self.weight_decay < 0:
            raise _Invalid("weight_decay", self.weight_decay, "must be >= 0")
        if self.grad_clip < 0:
            raise _Invalid("grad_clip", self.grad_clip, "must be >= 0 (0 = no clipping)")


@dataclass(frozen=True)
class PipelineConfig:
    """How the model is cut and scheduled. `layers`: optional explicit layer counts, one per
    stage (stages·chunks entries for "interleaved", in model order: chunk c of rank r is entry
    c·stages + r); uneven splits are allowed. Checks against the model live in CaseConfig."""

    stages: int = 1
    microbatches: int = 1
    schedule: str = "gpipe"
    chunks: int = 1
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _int("stages", self.stages)
        _int("microbatches", self.microbatches)
        _choice("schedule", self.schedule, SCHEDULES)
        _int("chunks", self.chunks)
        if self.chunks > 1 and self.schedule != "interleaved":
            raise _Invalid("chunks", self.chunks,
                           f"chunks > 1 needs schedule = 'interleaved' (got {self.schedule!r})")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise _Invalid("layers", self.layers, "expected a list of layer counts")
            layers = tuple(self.layers)
            for i, n in enumerate(layers):
                _int(f"layers[{i}]", n)
            want = self.stages * self.chunks
            if len(layers) != want:
                raise _Invalid("layers", list(layers),
                               f"needs {want} entries (stages = {self.stages} x chunks = "
                               f"{self.chunks}), got {len(layers)}")
            _set(self, "layers", layers)


@dataclass(frozen=True)
class CaseConfig:
    """One run: a model, a batch of `batch_size` sequences of `seq_len` tokens per optimizer
    step, `steps` steps, seeded init and data, a pipeline layout, and the parity tiers to run."""

    name: str
    model: ModelConfig
    seq_len: int
    batch_size: int
    steps: int = 1
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: str = "random"
    dtype: str = "fp32"
    backend: str = "cpu"
    tiers: tuple[str, ...] = TIERS

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise _Invalid("name", self.name, "expected a non-empty string")
        for key, cls in (("model", ModelConfig), ("optim", OptimConfig),
                         ("pipeline", PipelineConfig)):
            if not isinstance(getattr(self, key), cls):
                raise _Invalid(key, getattr(self, key), f"expected a {cls.__name__}")
        m, p = self.model, self.pipeline
        _int("seq_len", self.seq_len)
        if self.seq_len > m.n_positions:
            raise _Invalid("seq_len", self.seq_len,
                           f"exceeds model.n_positions = {m.n_positions}")
        _int("batch_size", self.batch_size)
        _int("steps", self.steps)
        _int("seed", self.seed, minimum=0)
        if self.seed >= 2**63:
            raise _Invalid("seed", self.seed, "must be < 2**63")
        _choice("data", self.data, DATA_KINDS)
        if self.data == "text" and m.vocab_size < TEXT_VOCAB:
            raise _Invalid("model.vocab_size", m.vocab_size,
                           f"data = 'text' is byte-level and needs vocab_size >= {TEXT_VOCAB}")
        _choice("dtype", self.dtype, DTYPES)
        _choice("backend", self.backend, BACKENDS)
        if self.dtype == "bf16" and self.backend != "cuda":
            raise _Invalid("dtype", self.dtype, "bf16 needs backend = 'cuda' (CPU runs fp32)")
        self._check_tiers()
        self._check_pipeline(m, p)

    def _check_tiers(self) -> None:
        tiers = self.tiers
        if isinstance(tiers, str) or not hasattr(tiers, "__iter__"):
            raise _Invalid("tiers", tiers, f"expected a list drawn from {', '.join(TIERS)}")
        tiers = tuple(tiers)
        if not tiers:
            raise _Invalid("tiers", list(tiers), "needs at least one tier")
        for i, t in enumerate(tiers):
            _choice(f"tiers[{i}]", t, TIERS)
        if len(set(tiers)) != len(tiers):
            raise _Invalid("tiers", list(tiers), "lists a tier twice")
        _set(self, "tiers", tiers)

    def _check_pipeline(self, m: ModelConfig, p: PipelineConfig) -> None:
        if p.stages > m.n_layer:
            raise _Invalid("pipeline.stages", p.stages,
                           f"more stages than layers (n_layer = {m.n_layer}); every stage "
                           "needs at least one layer")
        if self.batch_size % p.microbatches:
            raise _Invalid("pipeline.microbatches", p.microbatches,
                           f"does not divide batch_size = {self.batch_size}")
        if p.schedule == "interleaved":
            if p.microbatches % p.stages:
                raise _Invalid("pipeline.microbatches", p.microbatches,
                               f"interleaved needs a multiple of stages = {p.stages}")
            if p.stages * p.chunks > m.n_layer:
                raise _Invalid("pipeline.chunks", p.chunks,
                               f"stages x chunks = {p.stages * p.chunks} model chunks but only "
                               f"n_layer = {m.n_layer} layers (each chunk needs >= 1 layer)")
        if p.layers is not None and sum(p.layers) != m.n_layer:
            raise _Invalid("pipeline.layers", list(p.layers),
                           f"sums to {sum(p.layers)}, not n_layer = {m.n_layer}")


@dataclass(frozen=True)
class BenchDefaults:
    """Suite-wide bench settings from the [bench] table: timed repeats and warm-up steps."""

    repeats: int = 5
    warmup: int = 2

    def __post_init__(self) -> None:
        _int("repeats", self.repeats)
        _int("warmup", self.warmup, minimum=0)


@dataclass(frozen=True)
class SuiteConfig:
    """A loaded suite. `skipped` lists (case name, reason) for sweep points dropped by
    `skip_invalid = true`, so a report can say what was not run."""

    name: str
    description: str
    cases: tuple[CaseConfig, ...]
    path: Path | None = None
    bench: BenchDefaults = field(default_factory=BenchDefaults)
    skipped: tuple[tuple[str, str], ...] = ()

    def case(self, name: str) -> CaseConfig:
        for c in self.cases:
            if c.name == name:
                return c
        raise ConfigError(f"suite {self.name!r} has no case {name!r} "
                          f"(cases: {', '.join(c.name for c in self.cases)})")


# ---- helpers over a case -----------------------------------------------------------------------


def engine_model_keys(m: ModelConfig) -> dict:
    """harness.engine.Model keys of the model's shape: GPT-2's five, and a Llama model's family
    keys as ModelConfig normalised them."""
    keys = dict(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, vocab_size=m.vocab_size,
                n_positions=m.n_positions)
    if m.family == "llama":
        keys.update(family="llama", n_kv_head=m.n_kv_head, ffn_dim=m.ffn_dim,
                    rope_theta=m.rope_theta, norm_eps=m.norm_eps)
    return keys


def case_id(case: CaseConfig) -> str:
    """The identifier written in the records' `case` column: the case name (unique in a suite;
    sweep points are named "base/axis=value,...")."""
    return case.name


def case_slug(case: CaseConfig) -> str:
    """case_id made safe for a file or directory name."""
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in case_id(case))


def case_axes(case: CaseConfig) -> dict[str, Any]:
    """The shape columns of records.Record / the report axes, as a flat dict."""
    m, p = case.model, case.pipeline
    return {
        "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
        "vocab_size": m.vocab_size, "seq_len": case.seq_len, "batch_size": case.batch_size,
        "stages": p.stages, "microbatches": p.microbatches, "schedule": p.schedule,
        "chunks": p.chunks,
    }


def microbatch_size(case: CaseConfig) -> int:
    """Sequences per micro-batch (validated to divide batch_size exactly)."""
    return case.batch_size // case.pipeline.microbatches


def stage_layers(case: CaseConfig) -> tuple[int, ...]:
    """Layer count per model chunk, in model order (stages·chunks entries). Explicit
    `pipeline.layers` if given, else an even split with the remainder on the earliest chunks
    (the last stage also carries the LM head and the loss)."""
    p = case.pipeline
    if p.layers is not None:
        return p.layers
    k = p.stages * p.chunks
    q, r = divmod(case.model.n_layer, k)
    return tuple(q + (1 if i < r else 0) for i in range(k))
