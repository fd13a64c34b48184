"""`tandem parity`: proves, tensor by tensor, that the engine computes what the JAX reference
computes and that pipelining does not change the result; exits non-zero on any mismatch.
Not here: the tolerances (harness/tolerances.py), the op-tier inputs (harness/parity_ops.py),
launching ranks (harness/pipeline.py), or any timing (`tandem bench`).

Per case of a suite, one seeded weights file and one pair of token shards feed both sides (each
side reads them with its own reader), then the tiers run:
  op          every kernel (td_op_*) and the stage passes (encoder, one block, head) vs
              jax.vjp of reference.ops, on random inputs
  model       logits, loss and every gradient by name after one forward + backward at step 0
  trajectory  K AdamW steps with the case's micro-batches: every step's loss, final parameters
  schedule    the pipelined engine vs the one-stage, no-micro-batching engine control: every
              step's loss and the step-0 gradients; final parameters vs the one-stage engine
              with the same micro-batches (schedule_tier says why)
Output: a per-tensor table on stdout; parity.parquet, parity_summary.json, losses.parquet and
run.json in --out. Exit 0 when every comparison passes, 1 on a mismatch, 2 on a bad suite or
option, 3 when the engine or a rank failed.
"""

from __future__ import annotations

import dataclasses

import argparse
import datetime as _dt
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness import tolerances as tol
from harness.config import (CaseConfig, SuiteConfig, case_slug, load_suite, microbatch_size)
from harness.data import make_case_data, read_shard, write_shard
from harness.engine import Model, read_tokens, version as engine_version
from harness.errors import ConfigError, DataError, EngineError, RankFailure
from harness.init import init_params, read_safetensors, write_safetensors
from harness.records import PARITY_COLUMNS, ParityRow, to_frame, write_json

BACKENDS = ("cpu", "cuda")
WORST_SHOWN = 3  # passing rows printed per case and tier (every failure is printed)
TEXT_CURVE_ROWS = 25  # at most this many steps of a real-text loss curve are printed


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, metavar="NAME|PATH",
                   help="a built-in suite name (smoke, full, ...) or a path to a suite .toml")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="results directory (default ./tandem-results/parity-<suite>)")
    p.add_argument("--backend", choices=BACKENDS, default="cpu",
                   help="engine backend to check: cpu (default), or cuda (a libtandem built "
                        "with CUDA: one-stage cases move to the GPU, fp32 against JAX fp32 "
                        "on the same GPU)")
    p.add_argument("--case", action="append", metavar="NAME", default=None,
                   help="run only this case (repeatable)")
    p.add_argument("--tier", action="append", choices=tol.TIERS, default=None,
                   help="run only this tier (repeatable; default: the case's tiers, plus "
                        "schedule for pipelined cases)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="engine OpenMP threads (default 1: parity checks maths, and results "
                        "are deterministic for a given thread count)")
    p.add_argument("--worst", type=int, default=WORST_SHOWN, metavar="N",
                   help=f"passing rows shown per case and tier (default {WORST_SHOWN}; "
                        "failures are always shown)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only failures, skipped tiers and the verdict")


# ---- inputs shared by both sides ---------------------------------------------------------------


@dataclass
class CaseInputs:
    """What both sides start from: one weights file, one pair of token shards, read back by each
    side's own reader (the engine's td_tokens_read, harness.data.read_shard for JAX)."""

    case: CaseConfig
    workdir: Path
    weights: Path
    table: list  # the engine's ParamInfo rows (whole model, one stage)
    inputs_SBT: np.ndarray  # engine side
    targets_SBT: np.ndarray
    jax_inputs_SBT: np.ndarray  # JAX side
    jax_targets_SBT: np.ndarray


def engine_config(case: CaseConfig, threads: int, *, optimizer: bool = True) -> dict:
    """Model(**config) keys for the one-stage engine running `case` (batch_size: the whole batch,
    so that the same model runs full batches and micro-batches)."""
    m, o = case.model, case.optim
    cfg = dict(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, vocab_size=m.vocab_size,
               n_positions=m.n_positions, seq_len=case.seq_len, batch_size=case.batch_size,
               threads=threads, backend=case.backend, dtype=case.dtype)
    if m.family == "llama":  # the family's own keys, as config.ModelConfig normalised them
        cfg.update(family="llama", n_kv_head=m.n_kv_head, ffn_dim=m.ffn_dim,
                   rope_theta=m.rope_theta, norm_eps=m.norm_eps)
    if optimizer:
        cfg.update(lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                   weight_decay=o.weight_decay, grad_clip=o.grad_clip)
    return cfg


def prepare(case: CaseConfig, workdir: Path, threads: int) -> CaseInputs:
    workdir.mkdir(parents=True, exist_ok=True)
    with Model(**engine_config(case, threads)) as m:
        table = list(m.table)
    params = init_params([(p.name, p.shape) for p in table], case.model.n_layer, case.seed)
    weights = workdir / "weights.safetensors"
    write_safetensors(weights, params, metadata={"case": case.name, "seed": str(case.seed)})
    x, y = make_case_data(case)
    V = case.model.vocab_size
    shards = {"inputs": write_shard(workdir / "tokens_inputs.bin", x, V),
              "targets": write_shard(workdir / "tokens_targets.bin", y, V)}
    eng = {k: read_tokens(p, V).reshape(x.shape) for k, p in shards.items()}
    jx = {k: read_shard(p, V).reshape(x.shape) for k, p in shards.items()}
    return CaseInputs(case, workdir, weights, table, eng["inputs"], eng["targets"],
                      jx["inputs"], jx["targets"])


def prepare_ops_only(case: CaseConfig, workdir: Path) -> CaseInputs:
    """The inputs of a Llama case that runs the op tier alone: its kernels draw their own
    inputs, so no weights and no tokens."""
    workdir.mkdir(parents=True, exist_ok=True)
    none = np.zeros((0, 0, 0), np.int32)
    return CaseInputs(case, workdir, workdir / "no-weights", [], none, none, none, none)


def _load_engine(inp: CaseInputs, threads: int) -> Model:
    m = Model(**engine_config(inp.case, threads))
    m.load_safetensors(inp.weights)
    return m


def _jax_params(inp: CaseInputs) -> dict:
    import jax.numpy as jnp

    return {k: jnp.asarray(v) for k, v in read_safetensors(inp.weights).items()}


def _ref_config(case: CaseConfig):
    """The reference's config of the case's model: a GPTConfig or a llama.LlamaConfig."""
    m = case.model
    if m.family == "llama":
        from reference.llama import LlamaConfig

        return LlamaConfig(m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.vocab_size, m.ffn_dim,
                           m.n_positions, m.rope_theta, m.norm_eps)
    from reference import GPTConfig

    return GPTConfig(m.n_layer, m.n_embd, m.n_head, m.vocab_size, m.n_positions)


def _ref_model(case: CaseConfig):
    """The reference module of the case's family (forward, loss_and_grads, param_shapes)."""
    if case.model.family == "llama":
        from reference import llama

        return llama
    from reference import gpt2

    return gpt2


# ---- collecting comparisons --------------------------------------------------------------------


@dataclass
class TierResult:
    rows: list[ParityRow] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(r.passed for r in self.rows)


class Collector:
    """Turns (tensor, got, want) into ParityRows with the policy's tolerance."""

    def __init__(self, suite: str, case: CaseConfig, backend: str, commit: str, stamp: str):
        self.suite, self.case, self.backend = suite, case, backend
        self.commit, self.stamp = commit, stamp

    def row(self, tier: str, tensor: str, kind: str, got, want, reference: str = "jax"
            ) -> ParityRow:
        t = tol.tolerance(self.case.dtype, tier, kind)
        try:
            e = tol.measure(got, want)
        except ValueError as exc:  # shapes differ: a failure to report, not a crash
            e = tol.Errors(float("inf"), float("inf"), float("inf"))
            tensor = f"{tensor} ({exc})"
        err = tol.error_for(e, t)
        return ParityRow(suite=self.suite, case=self.case.name, tier=tier, tensor=tensor,
                         max_abs=e.max_abs, rel_l2=e.rel_l2, rel=e.rel, metric=t.metric,
                         tol=t.value, share=err / t.value, passed=bool(err <= t.value),
                         backend=self.backend, dtype=self.case.dtype, reference=reference,
                         commit=self.commit, timestamp=self.stamp)

    def missing(self, tier: str, tensor: str, kind: str, why: str, reference: str = "jax"
                ) -> ParityRow:
        t = tol.tolerance(self.case.dtype, tier, kind)
        inf = float("inf")
        return ParityRow(suite=self.suite, case=self.case.name, tier=tier,
                         tensor=f"{tensor} ({why})", max_abs=inf, rel_l2=inf, rel=inf,
                         metric=t.metric, tol=t.value, share=inf, passed=False,
                         backend=self.backend, dtype=self.case.dtype, reference=reference,
                         commit=self.commit, timestamp=self.stamp)


# ---- the tiers ---------------------------------------------------------------------------------


def op_tier(inp: CaseInputs, col: Collector, threads: int) -> TierResult:
    """Every kernel and stage pass vs jax.vjp, at the case's micro-batch shape and at T = 1."""
    case = inp.case
    if case.model.family == "llama":
        from harness.parity_ops_llama import op_comparisons
    else:
        from harness.parity_ops import op_comparisons
    B = microbatch_size(case)
    res = TierResult()
    for T in sorted({case.seq_len, 1}, reverse=True):
        for name, got, want in op_comparisons(case.model, B, T, case.seed, threads):
            res.rows.append(col.row("op", name, "op", got, want))
    return res


def model_tier(inp: CaseInputs, col: Collector, threads: int) -> TierResult:
    """Logits, loss and every gradient by name after one forward + backward on step 0's batch."""
    import jax

    case, res = inp.case, TierResult()
    cfg, ref = _ref_config(case), _ref_model(case)
    want_table = ref.param_shapes(cfg)
    got_table = {p.name: tuple(p.shape) for p in inp.table}
    if list(got_table.items()) != list(want_table.items()):
        diff = sorted(set(got_table.items()) ^ set(want_table.items()))[:4]
        res.rows.append(col.missing("model", "table", "grad",
                                    f"engine and reference tables differ: {diff}"))
        return res
    x, y = inp.inputs_SBT[0], inp.targets_SBT[0]
    with _load_engine(inp, threads) as m:
        logits, loss_fwd = m.forward(x, y)
        m.zero_grad()
        loss = m.forward_backward(x, y, 1.0)
        grads = m.grads()
    params = _jax_params(inp)
    jx, jy = inp.jax_inputs_SBT[0], inp.jax_targets_SBT[0]
    want_logits = jax.jit(ref.forward, static_argnums=2)(params, jx, cfg)
    want_loss, want_grads = jax.jit(ref.loss_and_grads, static_argnums=3)(params, jx, jy, cfg)
    res.rows.append(col.row("model", "logits", "logits", logits, want_logits))
    res.rows.append(col.row("model", "loss", "loss", loss, want_loss))
    if loss_fwd != loss:  # forward alone and forward + backward must agree bit for bit
        res.rows.append(col.row("model", "loss(forward only)", "loss", loss_fwd, want_loss))
    for p in inp.table:
        res.rows.append(col.row("model", f"grad/{p.name}", "grad", grads[p.name],
                                want_grads[p.name]))
    return res


# AdamW is ill-conditioned where the gradient history of an element is near zero: its update
# lr * m_hat / (sqrt(v_hat) + eps) then has a slope of up to ~lr/eps (1e5 at the defaults) in g,
# so a last-bit difference in such a gradient (the rounding of a sum that cancels: ~1e-11..1e-9
# here, and sometimes an exact 0 on one side only) moves the parameter by a sizeable fraction of
# lr, and the two sides walk apart. The key third of attn.c_attn.bias is such a place by
# construction (its exact gradient is zero: the softmax ignores a constant added to a row of
# scores), and any large tensor holds a few elements whose gradient happens to cancel.
# Parameters after optimizer steps are therefore compared on the elements whose sqrt(v_hat) (the
# RMS gradient AdamW divided by) stayed above tolerances.ADAMW_ILL_CONDITIONED * eps at every
# step on both sides; the others (counted in the row's label) must only stay within the largest
# difference a correct pair can reach, 2 * lr per step. Elements whose gradient was exactly zero
# throughout on both sides (e.g. wpe rows >= T) only decay, identically: compared normally.


class AdamScale:
    """Per element, over the steps of a run: the smallest sqrt(v_hat) AdamW divided by (v_hat: the
    bias-corrected second moment of the clipped gradient, as in docs/model.md) and the largest
    |clipped gradient|. The two sides of a comparison are merged by min / max."""

    def __init__(self, beta2: float):
        self.beta2, self.t = beta2, 0
        self.v: dict[str, np.ndarray] = {}
        self.lo: dict[str, np.ndarray] = {}
        self.hi: dict[str, np.ndarray] = {}

    def fold(self, name: str, lo, hi) -> None:
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        if name in self.lo:
            lo, hi = np.minimum(self.lo[name], lo), np.maximum(self.hi[name], hi)
        self.lo[name], self.hi[name] = lo, hi

    def step(self, grads: dict, grad_norm: float, grad_clip: float) -> None:
        """One optimizer step's gradients (before clipping) and pre-clip global norm."""
        self.t += 1
        clip = grad_clip / grad_norm if 0 < grad_clip < grad_norm else 1.0
        for name, g in grads.items():
            g = np.asarray(g, np.float64) * clip
            v = self.beta2 * self.v.get(name, 0.0) + (1.0 - self.beta2) * g * g
            self.v[name] = v
            self.fold(name, np.sqrt(v / (1.0 - self.beta2 ** self.t)), np.abs(g))

    def merge(self, other: "AdamScale") -> "AdamScale":
        for name in other.lo:
            self.fold(name, other.lo[name], other.hi[name])
        return self

    def ill_conditioned(self, name: str, floor: float) -> np.ndarray:
        return (self.lo[name] <= floor) & (self.hi[name] > 0)


def _param_rows(col: Collector, tier: str, table, got: dict, want: dict, seen: AdamScale,
                case: CaseConfig, steps: int, reference: str = "jax") -> list[ParityRow]:
    rows = []
    floor = tol.ADAMW_ILL_CONDITIONED * case.optim.eps
    bound = 2.0 * case.optim.lr * steps
    for p in table:
        name = f"param/{p.name}"
        if p.name not in got:
            rows.append(col.missing(tier, name, "param", "missing from the run", reference))
            continue
        a = np.asarray(got[p.name], np.float64).ravel()
        b = np.asarray(want[p.name], np.float64).ravel()
        ill = seen.ill_conditioned(p.name, floor).ravel()
        k = int(ill.sum())
        if k == 0:
            rows.append(col.row(tier, name, "param", a, b, reference))
            continue
        rows.append(col.row(tier, f"{name} ({k} of {a.size} ill-cond.)", "param", a[~ill],
                            b[~ill], reference))
        worst = float(np.max(np.abs(a[ill] - b[ill])))
        if not worst <= bound:
            rows.append(col.missing(tier, f"{name}[ill-cond.]", "param",
                                    f"differ by {worst:.2e} > 2 * lr * steps = {bound:.2e}",
                                    reference))
    return rows


def _reference_trajectory(params, batches, cfg, opt, microbatches):
    """reference.train.make_train_step over `batches` from a fresh AdamW state, also reading
    AdamW's own second moment after each step for the AdamScale of the run.
    Returns (final params, losses (K,), AdamScale), numpy."""
    import jax
    import jax.numpy as jnp

    from reference import adamw_init, make_train_step

    step = make_train_step(cfg, opt, microbatches)
    state = adamw_init(params)
    lo = jax.tree.map(lambda p: jnp.full(p.shape, jnp.inf, jnp.float32), params)
    losses = []
    for t, (tokens, targets) in enumerate(batches, 1):
        params, state, loss, _ = step(params, state, tokens, targets)
        bc2 = 1.0 - opt.beta2 ** t
        lo = jax.tree.map(lambda m, v: jnp.minimum(m, jnp.sqrt(v / bc2)), lo, state.v)
        losses.append(loss)
    scale = AdamScale(opt.beta2)
    lo, v = jax.device_get(lo), jax.device_get(state.v)
    for k in lo:  # v > 0 at the end <=> some step had a non-zero gradient
        scale.fold(k, lo[k], np.sqrt(np.asarray(v[k], np.float64)))
    final = {k: np.asarray(a) for k, a in jax.device_get(params).items()}
    return final, np.asarray(jax.device_get(losses)), scale


def trajectory_tier(inp: CaseInputs, col: Collector, threads: int, losses: list
                    ) -> TierResult:
    """case.steps AdamW steps with case.pipeline.microbatches micro-batches, one-stage engine vs
    reference.train's step: each step's loss and every parameter at the end."""
    import jax.numpy as jnp

    from reference import AdamWConfig

    case, res = inp.case, TierResult()
    M, T = case.pipeline.microbatches, case.seq_len
    o = case.optim
    eng_losses, eng_seen = [], AdamScale(o.beta2)
    with _load_engine(inp, threads) as m:
        for x, y in zip(inp.inputs_SBT, inp.targets_SBT):
            loss, norm = m.train_step(x.reshape(M, -1, T), y.reshape(M, -1, T))
            eng_losses.append(loss)
            eng_seen.step(m.grads(), norm, o.grad_clip)  # AdamW leaves the step's gradient
        eng_params = m.params()
    opt = AdamWConfig(lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                      weight_decay=o.weight_decay, grad_clip=o.grad_clip)
    batches = [(jnp.asarray(x), jnp.asarray(y))
               for x, y in zip(inp.jax_inputs_SBT, inp.jax_targets_SBT)]
    jax_params, jax_losses, seen = _reference_trajectory(_jax_params(inp), batches,
                                                         _ref_config(case), opt, M)
    seen.merge(eng_seen)
    for s, (a, b) in enumerate(zip(eng_losses, jax_losses)):
        res.rows.append(col.row("trajectory", f"loss@step{s}", "loss", a, b))
        losses += [(case.name, "engine", s, float(a)), (case.name, "jax", s, float(b))]
    res.rows += _param_rows(col, "trajectory", inp.table, eng_params, jax_params, seen, case,
                            len(eng_losses))
    return res


def _pipeline_runner():
    """harness.pipeline.run_pipeline, or (None, why) when it cannot run here."""
    try:
        from harness import pipeline
    except ImportError as exc:
        return None, f"pipeline runner unavailable ({exc})"
    try:
        pipeline.find_mpirun()
        pipeline.engine_executable()
    except RankFailure as exc:
        return None, f"pipeline runner unavailable ({exc})"
    return pipeline.run_pipeline, None


@dataclass
class EngineRun:
    losses: list[float]
    grads0: dict[str, np.ndarray]  # step 0's accumulated gradients
    params: dict[str, np.ndarray]  # after the last step
    seen: AdamScale
    norms: list[float] = field(default_factory=list)  # each step's global gradient norm


def _engine_run(inp: CaseInputs, threads: int, microbatches: int) -> EngineRun:
    """The one-stage engine over every step of the case with `microbatches` equal
    micro-batches (gradient scale 1/M each), as the pipeline does."""
    M, T, clip_at = microbatches, inp.case.seq_len, inp.case.optim.grad_clip
    run = EngineRun([], {}, {}, AdamScale(inp.case.optim.beta2), [])
    with _load_engine(inp, threads) as m:
        for s, (x, y) in enumerate(zip(inp.inputs_SBT, inp.targets_SBT)):
            loss, norm = m.train_step(x.reshape(M, -1, T), y.reshape(M, -1, T))
            run.losses.append(loss)
            run.norms.append(float(norm))
            grads = m.grads()  # AdamW leaves the step's gradient in place
            run.grads0 = grads if s == 0 else run.grads0
            run.seen.step(grads, norm, clip_at)
        run.params = m.params()
    return run


def schedule_tier(inp: CaseInputs, col: Collector, threads: int, losses: list) -> TierResult:
    """The pipelined engine vs the one-stage, no-micro-batching engine control: every step's loss
    and the step-0 gradients. Final parameters are held to the one-stage engine with the same
    micro-batches: after K AdamW steps the control and any micro-batched run (pipelined or not)
    differ by ~1e-4 in small tensors (AdamW amplifies the rounding of the micro-batch sums, see
    above), while pipelining itself must change nothing (measured: <= 1e-7)."""
    run_pipeline, why = _pipeline_runner()
    if run_pipeline is None:
        return TierResult(skipped=why)
    case, res = inp.case, TierResult()
    M = case.pipeline.microbatches
    control = _engine_run(inp, threads, 1)
    same_m = _engine_run(inp, threads, M) if M > 1 else control
    ref, ref_m = "engine-1stage", "engine-1stage" + (f"-m{M}" if M > 1 else "")
    pipe = run_pipeline(case, inp.weights, inp.inputs_SBT, inp.targets_SBT,
                        inp.workdir / "pipeline", threads=threads)
    for s, b in enumerate(control.losses):
        losses.append((case.name, "engine-control", s, float(b)))
        if s < len(pipe.losses):
            res.rows.append(col.row("schedule", f"loss@step{s}", "loss", pipe.losses[s], b, ref))
            losses.append((case.name, "engine-pipeline", s, float(pipe.losses[s])))
        else:
            res.rows.append(col.missing("schedule", f"loss@step{s}", "loss",
                                        "the pipelined run reported no loss", ref))
    # the global gradient norm the ranks reduced (it sets the clip scale of every stage's
    # AdamW): against the same micro-batches, step by step, so a stage that counts a tensor
    # twice or leaves one out fails here even where AdamW's scale invariance hides it
    for s, b in enumerate(same_m.norms):
        if s < len(pipe.grad_norms):
            res.rows.append(col.row("schedule", f"grad_norm@step{s}", "loss", pipe.grad_norms[s],
                                    b, ref_m))
        else:
            res.rows.append(col.missing("schedule", f"grad_norm@step{s}", "loss",
                                        "the pipelined run reported no gradient norm", ref_m))
    for p in inp.table:
        if p.name in pipe.grads:
            res.rows.append(col.row("schedule", f"grad/{p.name}", "grad", pipe.grads[p.name],
                                    control.grads0[p.name], ref))
        else:
            res.rows.append(col.missing("schedule", f"grad/{p.name}", "grad",
                                        "missing from the pipelined run", ref))
    seen = AdamScale(case.optim.beta2).merge(same_m.seen)
    if pipe.grads and len(pipe.grad_norms):  # the pipeline's side: its step-0 gradients
        first = AdamScale(case.optim.beta2)
        first.step({k: v for k, v in pipe.grads.items() if k in seen.lo}, pipe.grad_norms[0],
                   case.optim.grad_clip)
        seen.merge(first)
    res.rows += _param_rows(col, "schedule", inp.table, pipe.params, same_m.params, seen, case,
                            len(same_m.losses), ref_m)
    return res


TIER_FUNCS = {"op": op_tier, "model": model_tier, "trajectory": trajectory_tier,
              "schedule": schedule_tier}


def case_tiers(case: CaseConfig, only: list[str] | None) -> list[str]:
    """The case's own tiers, plus schedule when it is pipelined or micro-batched, in tier order,
    filtered by --tier."""
    p = case.pipeline
    want = set(case.tiers) | ({"schedule"} if p.stages > 1 or p.microbatches > 1 else set())
    if only:
        want &= set(only)
    return [t for t in tol.TIERS if t in want]


# ---- output ------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    if x != x:
        return "nan"
    if x == float("inf"):
        return "inf"
    return f"{x:.2e}"


def _verdict(r: ParityRow) -> str:
    if not r.passed:
        return "FAIL"
    return "PASS bit-identical" if r.tier == "schedule" and r.max_abs == 0 else "PASS"


def print_case_table(name: str, results: dict[str, TierResult], worst: int, quiet: bool,
                     out=None) -> None:
    """One case's rows: every failure, then (unless quiet) the `worst` passes of each tier by
    share of tolerance and a count of the rest; skipped and errored tiers say why."""
    out = out or sys.stdout
    shown: list[tuple[str, ParityRow | str]] = []  # (tier, row or a note)
    for tier, res in results.items():
        if res.skipped:
            shown.append((tier, f"skipped: {res.skipped}"))
            continue
        if res.error:
            shown.append((tier, f"ERROR: {res.error}"))
        fails = [r for r in res.rows if not r.passed]
        passes = sorted((r for r in res.rows if r.passed), key=lambda r: -r.share)
        shown += [(tier, r) for r in fails + ([] if quiet else passes[:worst])]
        rest = len(passes) - min(worst, len(passes))
        if rest > 0 and not quiet:
            ident = sum(1 for r in passes if r.max_abs == 0)
            extra = f", {ident} bit-identical" if tier == "schedule" and ident else ""
            worst_rest = passes[min(worst, len(passes))].share
            shown.append((tier, f"... {rest} more passed (each <= {100 * worst_rest:.1f}% of "
                                f"tolerance{extra})"))
    if not shown:
        return
    rows = [r for _, r in shown if isinstance(r, ParityRow)]
    w = max([44] + [len(r.tensor) for r in rows])
    print(f"\ncase {name}", file=out)
    if rows:
        print(f"  {'tier':<10}  {'tensor':<{w}} {'max abs':>9} {'rel L2':>9} {'share':>9}  verdict",
              file=out)
    for tier, r in shown:
        if isinstance(r, str):
            print(f"  {tier:<10}  {r}", file=out)
        else:
            print(f"  {tier:<10}  {r.tensor:<{w}} {_fmt(r.max_abs):>9} {_fmt(r.rel_l2):>9}"
                  f" {100 * r.share:>8.1f}%  {_verdict(r)}", file=out)


def print_text_curve(name: str, losses: list, out=None) -> None:
    """Side-by-side loss curves of a real-text case (engine vs JAX)."""
    out = out or sys.stdout
    eng = {s: v for c, side, s, v in losses if c == name and side == "engine"}
    jx = {s: v for c, side, s, v in losses if c == name and side == "jax"}
    steps = sorted(set(eng) & set(jx))
    if not steps:
        return
    stride = max(1, -(-len(steps) // TEXT_CURVE_ROWS))
    print(f"  loss curve on real text (case {name}):", file=out)
    print(f"  {'step':>6} {'engine':>12} {'jax':>12} {'rel':>9}", file=out)
    for s in steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else []):
        rel = abs(eng[s] - jx[s]) / abs(jx[s]) if jx[s] else float("inf")
        print(f"  {s:>6} {eng[s]:>12.6f} {jx[s]:>12.6f} {_fmt(rel):>9}", file=out)


def tier_summary(res: TierResult) -> dict:
    worst = max(res.rows, key=lambda r: r.share, default=None)
    return {
        "passed": res.passed if not res.skipped else None,
        "skipped": res.skipped,
        "error": res.error,
        "compared": len(res.rows),
        "failed": sum(1 for r in res.rows if not r.passed),
        "bit_identical": sum(1 for r in res.rows if r.max_abs == 0),
        "worst_tensor": worst.tensor if worst else None,
        "worst_share": worst.share if worst else None,
    }


# ---- the command -------------------------------------------------------------------------------


def _select_cases(suite: SuiteConfig, names: list[str] | None, backend: str
                  ) -> tuple[list[CaseConfig], list[tuple[str, str]]]:
    if names:  # a name selects that case, or every point of the sweep it names ("base/...")
        cases = []
        for n in names:
            points = [c for c in suite.cases if c.name.startswith(n + "/")]
            cases += points or [suite.case(n)]  # suite.case raises ConfigError naming the cases
    else:
        cases = list(suite.cases)
    chosen, skipped = [], []
    for c in cases:
        if c.backend == backend:
            chosen.append(c)
        elif c.dtype == "bf16" and backend == "cpu":
            skipped.append((c.name, "bf16 needs a device backend"))
        else:  # --backend moves a case, pipelined or not, to that backend (fp32 stays fp32):
            # the schedule tier then runs CUDA ranks against the one-stage CUDA control
            chosen.append(dataclasses.replace(c, backend=backend))
    if not chosen:
        raise ConfigError(f"--backend {backend}: no case of suite {suite.name!r} runs on this "
                          f"backend (cases: {', '.join(f'{c.name} ({c.backend})' for c in cases)})")
    return chosen, skipped


def _check_backend(backend: str) -> None:
    """A clear error up front when libtandem was built without the requested backend."""
    if backend == "cpu":
        return
    try:
        Model(n_layer=1, n_embd=8, n_head=1, vocab_size=8, n_positions=2, seq_len=2,
              batch_size=1, backend=backend).close()
    except EngineError as exc:
        raise ConfigError(f"--backend {backend}: not built in this libtandem "
                          f"('{engine_version()}'): {exc}") from None


# Tiers that only exist on the CPU: td_op_* and the per-op stage passes run the CPU kernels. (The
# schedule tier runs on any backend: tandem-engine ranks with CUDA stages against the one-stage
# CUDA engine.)
CPU_ONLY_TIERS = {"op": "the op tier runs the CPU kernels (td_op_*, stage passes)"}


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    suite = load_suite(args.suite)  # ConfigError -> exit 2 through the CLI
    if args.threads < 0:
        raise ConfigError(f"--threads = {args.threads}: must be >= 0 (0 = OpenMP default)")
    _check_backend(args.backend)
    cases, skipped_cases = _select_cases(suite, args.case, args.backend)
    out = Path(args.out) if args.out else Path("tandem-results") / f"parity-{suite.name}"
    out.mkdir(parents=True, exist_ok=True)

    from reference import set_precision

    set_precision()  # before any JAX compute: fp32 matmuls stay fp32
    try:
        from harness.envinfo import collect_env
        env = collect_env()
    except ImportError:  # run.json then records the run without the machine
        env = {}
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit = str(env.get("commit", ""))
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    say(f"tandem parity: suite {suite.name} ({len(cases)} case{'s' * (len(cases) != 1)}, "
        f"backend {args.backend}, engine {engine_version()}) -> {out}")
    for name, why in skipped_cases:
        print(f"  skipped case {name}: {why}", flush=True)

    all_rows: list[ParityRow] = []
    losses: list[tuple] = []
    summary_cases: dict[str, dict] = {}
    any_error = False
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        col = Collector(suite.name, case, args.backend, commit, stamp)
        results: dict[str, TierResult] = {}
        case_error = None
        try:
            workdir = out / "cases" / case_slug(case)
            tiers = case_tiers(case, args.tier)
            if case.model.family == "llama" and tiers == ["op"]:
                inp = prepare_ops_only(case, workdir)
            else:
                inp = prepare(case, workdir, args.threads)
            for tier in tiers:
                fn = TIER_FUNCS[tier]
                if case.backend != "cpu" and tier in CPU_ONLY_TIERS:
                    results[tier] = TierResult(skipped=f"{CPU_ONLY_TIERS[tier]}, not "
                                                       f"{case.backend}")
                    continue
                try:
                    if tier in ("trajectory", "schedule"):
                        results[tier] = fn(inp, col, args.threads, losses)
                    else:
                        results[tier] = fn(inp, col, args.threads)
                except (EngineError, RankFailure, DataError) as exc:
                    results[tier] = TierResult(error=f"{type(exc).__name__}: {exc}")
        except (EngineError, DataError) as exc:
            case_error = f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - t0
        errored = case_error is not None or any(r.error for r in results.values())
        any_error |= errored
        passed = not errored and all(r.passed for r in results.values())
        for r in results.values():
            all_rows.extend(r.rows)
        counts = ", ".join(
            f"{t} skipped" if r.skipped else f"{t} {sum(x.passed for x in r.rows)}/{len(r.rows)}"
            for t, r in results.items())
        verdict = "ERROR" if errored else "PASS" if passed else "FAIL"
        if not (args.quiet and passed):
            print(f"[{i}/{len(cases)}] {case.name:<24} {verdict:<5} {counts}  "
                  f"({elapsed:.1f} s)", flush=True)
        if case_error:
            print(f"  error: {case_error}", flush=True)
        print_case_table(case.name, results, args.worst, args.quiet)
        if case.data == "text" and not args.quiet:
            print_text_curve(case.name, losses)
        summary_cases[case.name] = {
            "passed": passed, "error": case_error, "elapsed_s": round(elapsed, 3),
            "data": case.data, "dtype": case.dtype,
            "tiers": {t: tier_summary(r) for t, r in results.items()},
        }

    failed = sum(1 for c in summary_cases.values() if not c["passed"])
    passed_all = failed == 0
    code = 3 if any_error else 0 if passed_all else 1
    frame = to_frame(all_rows, PARITY_COLUMNS)
    frame.to_parquet(out / "parity.parquet", index=False)
    pd.DataFrame(losses, columns=["case", "side", "step", "loss"]).to_parquet(
        out / "losses.parquet", index=False)
    write_json(out / "parity_summary.json", {
        "suite": suite.name, "passed": passed_all, "exit_code": code, "backend": args.backend,
        "compared": len(all_rows), "failed_rows": int(sum(not r.passed for r in all_rows)),
        "cases": summary_cases, "skipped_cases": dict(skipped_cases),
    })
    write_json(out / "run.json", {
        **env, "argv": list(sys.argv),
        "suite": suite.name, "suite_path": str(suite.path) if suite.path else None,
        "backend": args.backend, "threads": args.threads, "tiers": args.tier,
        "cases": [c.name for c in cases], "elapsed_s": round(time.perf_counter() - t_start, 3),
        "tolerances": tol.policy_table(),
    })
    bad = [r for r in all_rows if not r.passed]
    n_cases = f"{len(cases)} case{'s' * (len(cases) != 1)}"
    if passed_all:
        print(f"parity: PASS ({len(all_rows)} comparisons in {n_cases}) -> {out}")
    else:
        print(f"parity: {'ERROR' if any_error else 'FAIL'}: {failed} of {n_cases}, "
              f"{len(bad)} of {len(all_rows)} comparisons failed -> {out}")
    return code


__all__ = ["add_parser", "run", "prepare", "engine_config", "case_tiers", "Collector",
           "TierResult", "op_tier", "model_tier", "trajectory_tier", "schedule_tier"]
