"""The tiers of `tandem parity`: op (every kernel vs jax.vjp), model (one forward + backward),
trajectory (K AdamW steps vs the reference) and schedule (the pipelined engine vs the one-stage
engine control), each turning its comparisons into a TierResult.
Not here: the inputs (harness/parity_inputs.py), AdamW's conditioning (harness/parity_adamw.py),
printing (harness/parity_rows.py) or the command (harness/parity.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harness import tolerances as tol
from harness.config import CaseConfig, microbatch_size
from harness.errors import RankFailure
from harness.parity_adamw import AdamScale, _param_rows, _reference_trajectory
from harness.parity_inputs import CaseInputs, _jax_params, _load_engine, _ref_config, _ref_model
from harness.parity_rows import Collector, TierResult


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
