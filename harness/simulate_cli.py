"""`tandem simulate`: one simulated step, the validation table, the scaling curve, the Amdahl
ceiling, and the records that `tandem report` draws figures from.

    tandem simulate --model llama3-405b --cluster h100-sxm --layout tp=8,pp=16,dp=128,vp=8 \
        --schedule interleaved --microbatches 16 --seq 8192 [--json]
    tandem simulate --validate            # exit 1 if any point is outside its bound
    tandem simulate --scaling --out DIR   # 1k -> 220k GPUs on GB300 NVL72, + the projection
    tandem report DIR --out DIR/report    # the figures (reports.simulate) and the section

What it is not: the cost model (harness.simulate) or the network model (harness.netmodel).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from harness import netmodel as nm
from harness import schedule as sched
from harness import simulate as sm
from harness.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent


def data_path(path: str) -> Path:
    """A measured-data path from a suite file or the command line: absolute as given; relative to
    the working directory first (a user's own records), then to the source checkout beside the
    harness package (results/ is not in the wheel). Missing everywhere: a DataError naming the
    places looked in."""
    p = Path(path)
    if p.is_absolute():
        return p
    tried = [Path.cwd() / p, ROOT / p]
    for q in tried:
        if q.exists():
            return q
    raise DataError(f"{path}: not found (looked in {', '.join(str(q.parent) for q in tried)}); "
                    "measured validation data lives in a Tandem checkout's results/ (run from "
                    "the checkout, or pass an absolute path)")
VALIDATION_FILE = nm.SUITES / "simulate" / "validation.toml"
PROJECTION_FILE = nm.SUITES / "simulate" / "projection.toml"
KINDS = ("measured", "replay", "published")
ROLES = ("fitted", "predicted")

# ---- validation points --------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    name: str
    kind: str
    role: str
    fitted: str
    source: str
    bound: float
    raw: dict  # the job keys and the kind's own keys


JOB_KEYS = {
    "model": (str, ""), "cluster": (str, ""), "tp": (int, 1), "pp": (int, 1), "dp": (int, 1),
    "chunks": (int, 1), "schedule": (str, "1f1b"), "microbatches": (int, 1),
    "microbatch_size": (int, 1), "seq_len": (int, 1024), "tp_overlap": (float, 0.0),
    "dp_overlap": (bool, True), "sequence_parallel": (bool, True),
    "distributed_optimizer": (bool, True), "order": (str, "tp,dp,pp"),
}
POINT_KEYS = {
    "name": (str, ...), "kind": (str, ...), "role": (str, ...), "fitted": (str, ""),
    "source": (str, ...), "bound": (float, ...), "notes": (str, ""), "records": (str, ""),
    "case": (str, ""), "calibrate_records": (str, ""), "calibrate_case": (str, ""),
    "timelines": (str, ""), "p2p_s": (float, 0.0), "published_mfu": (float, 0.0),
    **JOB_KEYS,
}


def load_points(path: Path = VALIDATION_FILE) -> list:
    doc = nm.read_toml(path)
    top = nm.take(str(path), doc, {"point": ("tables", ...)})
    points, seen = [], set()
    for i, raw in enumerate(top["point"]):
        where = f"{path}: point[{i}]"
        v = nm.take(where, raw, POINT_KEYS)
        for key, allowed in (("kind", KINDS), ("role", ROLES)):
            if v[key] not in allowed:
                raise ConfigError(f"{where}.{key} = {v[key]!r}: unknown value "
                                  f"(allowed: {', '.join(allowed)})")
        if v["name"] in seen:
            raise ConfigError(f"{where}.name = {v['name']!r}: duplicate")
        seen.add(v["name"])
        need = {"measured": ("model", "cluster", "records", "case"),
                "replay": ("records", "case", "timelines"),
                "published": ("model", "cluster", "published_mfu")}[v["kind"]]
        for key in need:
            if not v[key]:
                raise ConfigError(f"{where}.{key}: required for kind = {v['kind']!r}")
        nm.fraction(where, bound=v["bound"])
        points.append(Point(v["name"], v["kind"], v["role"], v["fitted"], v["source"],
                            v["bound"], v))
    return points


def job_from(v: dict, **override) -> sm.Job:
    keys = {k: v[k] for k in JOB_KEYS if k not in ("model", "cluster")}
    keys.update(override)
    return sm.check_job(sm.Job(sm.load_model(v["model"]), nm.load_cluster(v["cluster"]), **keys))


def _records(path: str):
    import pandas as pd

    p = data_path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such records file")
    return pd.read_parquet(p)


def measured_step_s(path: str, case: str) -> float:
    """Median engine step_ms of `case` (the summary row if there is one) in seconds."""
    df = _records(path)
    rows = df[(df.case == case) & (df.side == "engine") & (df.metric == "step_ms")]
    if rows.empty:
        raise DataError(f"{path}: no engine step_ms rows for case {case!r}")
    summary = rows[rows.repeat == -1]
    return float((summary if not summary.empty else rows).value.median()) / 1e3


def replay_step_s(v: dict) -> tuple:
    """(predicted step s, bubble) from the run's own per-rank timelines: per rank the median F
    and BW of the timed steps (step 0 dropped: warm-up), the all-reduce's cost on the rank that
    waits least (the others' include waiting), the slowest rank's optimizer median."""
    import pandas as pd

    d = data_path(v["timelines"])
    files = sorted(d.glob("timeline_rank*.csv"))
    if not files:
        raise DataError(f"{d}: no timeline_rank*.csv files")
    df = pd.concat(pd.read_csv(f) for f in files)
    df = df[df.step > df.step.min()]
    df["dur"] = (df.end_us - df.start_us) / 1e6
    med = df.groupby(["rank", "kind"]).dur.median()
    P = v["pp"]
    if sorted(df["rank"].unique()) != list(range(P)):
        raise DataError(f"{d}: ranks {sorted(df['rank'].unique())} for pp = {P}")
    s = sched.generate(v["schedule"], P, v["microbatches"], v["chunks"])
    f = [float(med[(r, "F")]) for r in range(P)]
    b = [float(med[(r, "BW")]) for r in range(P)]
    sim = sched.simulate(s, f, b, [0.0] * P, comm=v["p2p_s"])
    ar = min(float(med.get((r, "ALLREDUCE"), 0.0)) for r in range(P))
    opt = max(float(med.get((r, "OPT"), 0.0)) for r in range(P))
    return sim.makespan + ar + opt, sim.bubble


DEVICE_CLUSTERS = (("H100", "h100-sxm"), ("H200", "h200-sxm"))


def calibration_scale(records: str, case: str, cluster: str | None = None) -> tuple:
    """(compute scale, what it was computed from) of a one-stage engine run in a `tandem bench`
    records file: measured step ÷ the cost model's step for the same GPT-2 shape, batch and
    micro-batching on `cluster` (default: the cluster of the record's device, H100 or H200).
    Multiplying a job's compute times by it carries the engine's measured speed to the target."""
    df = _records(records)
    rows = df[(df.case == case) & (df.side == "engine") & (df.metric == "step_ms")]
    if rows.empty:
        raise DataError(f"{records}: no engine step_ms rows for case {case!r}")
    r = rows.iloc[0]
    if int(r.stages) != 1:
        raise ConfigError(f"--calibrate {records} {case!r}: a {int(r.stages)}-stage case; "
                          f"calibrate on a one-stage case (its compute alone)")
    if cluster is None:
        cluster = next((c for key, c in DEVICE_CLUSTERS if key in str(r.device)), None)
        if cluster is None:
            raise ConfigError(f"--calibrate: no cluster file for device {r.device!r}; HINT: "
                              f"name one with --calibrate-cluster")
    M = int(r.microbatches)
    if int(r.batch_size) % M:
        raise DataError(f"{records}: case {case!r} batch {int(r.batch_size)} is not a multiple "
                        f"of its {M} micro-batches")
    model = sm.Model(f"{case} shape", "gpt2", int(r.n_layer), int(r.n_embd), int(r.n_head),
                     int(r.vocab_size), int(r.seq_len))
    job = sm.Job(model, nm.load_cluster(cluster), microbatches=M,
                 microbatch_size=int(r.batch_size) // M, seq_len=int(r.seq_len))
    measured = measured_step_s(records, case)
    scale = measured / sm.simulate_step(job).step_s
    return scale, (f"{case} in {records} on {r.device}: measured {measured * 1e3:.1f} ms, "
                   f"model on {cluster} {measured / scale * 1e3:.1f} ms")


@dataclass(frozen=True)
class Check:
    point: Point
    metric: str  # "step_ms" or "mfu"
    predicted: float
    reference: float
    error: float  # predicted / reference - 1
    ok: bool
    detail: str


def check_point(p: Point) -> Check:
    v = p.raw
    if p.kind == "replay":
        pred, bubble = replay_step_s(v)
        ref = measured_step_s(v["records"], v["case"])
        detail = f"replayed bubble {bubble:.1%}"
        metric, pv, rv = "step_ms", pred * 1e3, ref * 1e3
    elif p.kind == "measured":
        scale = 1.0
        if v["calibrate_case"]:
            ctl = job_from(v, pp=1, schedule="1f1b", chunks=1)
            ctl_meas = measured_step_s(v["calibrate_records"], v["calibrate_case"])
            scale = ctl_meas / sm.simulate_step(ctl).step_s
        r = sm.simulate_step(job_from(v, compute_scale=scale))
        ref = measured_step_s(v["records"], v["case"])
        detail = f"compute scale {scale:.3f} from {v['calibrate_case']}" if v["calibrate_case"] \
            else f"MFU {r.mfu:.1%}"
        metric, pv, rv = "step_ms", r.step_s * 1e3, ref * 1e3
    else:
        r = sm.simulate_step(job_from(v))
        detail = (f"step {r.step_s:.2f} s, bubble {r.bubble:.1%}, exposed DP "
                  f"{r.breakdown['dp_comm_exposed'] / r.step_s:.1%}, TP "
                  f"{r.breakdown['tp_comm_exposed'] / r.step_s:.1%}")
        metric, pv, rv = "mfu", r.mfu_palm, v["published_mfu"]
    err = pv / rv - 1.0
    return Check(p, metric, pv, rv, err, abs(err) <= p.bound, detail)


def validate(path: Path | None = None) -> list:
    """Check every point of `path` (default: VALIDATION_FILE, read at call time)."""
    return [check_point(p) for p in load_points(path or VALIDATION_FILE)]


def validation_table(checks: list) -> str:
    lines = [f"{'point':34} {'role':9} {'metric':7} {'predicted':>10} {'reference':>10} "
             f"{'error':>7} {'bound':>6}  verdict  detail"]
    for c in checks:
        fmt = (lambda x: f"{x:9.1f}ms") if c.metric == "step_ms" else (lambda x: f"{x:9.1%} ")
        lines.append(f"{c.point.name:34} {c.point.role:9} {c.metric:7} {fmt(c.predicted):>10} "
                     f"{fmt(c.reference):>10} {c.error:+7.1%} {c.point.bound:6.0%}  "
                     f"{'ok' if c.ok else 'OUTSIDE':7}  {c.detail}")
    return "\n".join(lines)


# ---- projection and scaling ---------------------------------------------------------------------


def load_projection(path: Path = PROJECTION_FILE) -> dict:
    """The seeds' cluster projection: a job (JOB_KEYS), the GPU counts of the scaling curve,
    the global batch in tokens held fixed per GPU, and the claimed speedup to bound."""
    doc = nm.read_toml(path)
    top = nm.take(str(path), doc, {"projection": (dict, ...), "scaling": (dict, ...),
                                   "claim": (dict, ...)})
    job = nm.take(f"{path}: projection", top["projection"],
                  {"source": (str, ...), "gpus": (int, ...), **JOB_KEYS})
    scal = nm.take(f"{path}: scaling", top["scaling"], {"gpus": ("ints", ...),
                                                        "global_batch_tokens": (int, 0)})
    claim = nm.take(f"{path}: claim", top["claim"], {"speedup": (float, ...),
                                                     "source": (str, ...)})
    if not scal["gpus"] or min(scal["gpus"]) < 1:
        raise ConfigError(f"{path}: scaling.gpus = {scal['gpus']!r}: needs GPU counts >= 1")
    return {"job": job, "scaling": scal["gpus"], "claim": claim,
            "global_batch_tokens": scal["global_batch_tokens"]}


def projection_job(proj: dict, gpus: int | None = None) -> sm.Job:
    """The projection's layout, with dp set so that tp x pp x dp = gpus (rounded down to a
    whole number of pipelines) at the projection's micro-batching per pipeline."""
    v = proj["job"]
    gpus = gpus or v["gpus"]
    per = v["tp"] * v["pp"]
    dp = max(1, gpus // per)
    return job_from(v, dp=dp)


def scaling_curve(proj: dict) -> list:
    """Weak scaling: the projection's micro-batches per pipeline at every GPU count."""
    return [sm.simulate_step(projection_job(proj, g)) for g in proj["scaling"]]


def fixed_batch_curve(proj: dict) -> list:
    """Strong scaling at scaling.global_batch_tokens: dp from the GPU count, then as many
    micro-batches per pipeline as the batch gives (at least one); an interleaved layout whose
    count is not a multiple of pp falls back to 1F1B (interleaving needs whole groups)."""
    G = proj["global_batch_tokens"]
    if not G:
        return []
    v = proj["job"]
    out = []
    for g in proj["scaling"]:
        dp = max(1, g // (v["tp"] * v["pp"]))
        M = max(1, round(G / (dp * v["microbatch_size"] * v["seq_len"])))
        keys = {"dp": dp, "microbatches": M}
        if v["schedule"] == "interleaved" and M % v["pp"]:
            keys.update(schedule="1f1b", chunks=1)
        out.append(sm.simulate_step(job_from(v, **keys)))
    return out


def amdahl_rows(r: sm.Result, speedup: float) -> list:
    """Per share of the step a faster engine could shrink: {part, f, ceiling, needed}, with
    ceiling = 1 / (1 - f) (that share made infinitely fast) and needed = the speedup s of that
    share for 1 / ((1 - f) + f / s) to reach `speedup` (inf when past the ceiling). The shares:
    the kernels alone; the kernels and the pipeline bubble (idle time scales with stage compute
    time, so faster kernels shrink it too); everything (kernels, bubble, communication)."""
    b = r.breakdown
    kernels = b["forward"] + b["backward_input"] + b["backward_weight"] + b["optimizer"]
    out = []
    for part, t in (("compute kernels", kernels),
                    ("compute kernels + the bubble they set", kernels + b["pipeline_idle"]),
                    ("the whole step, communication included", r.step_s)):
        f = min(1.0, t / r.step_s)
        out.append({"part": part, "f": f, "ceiling": 1 / (1 - f) if f < 1 else math.inf,
                    "needed": sm.amdahl_needed(speedup, f)})
    return out


def amdahl_lines(r: sm.Result, speedup: float) -> list:
    """The Amdahl reading of a claimed whole-step speedup, as printed lines."""
    lines = [f"Amdahl: a claimed {speedup:g}x step speedup needs, of this step "
             f"({r.step_s:.3f} s, MFU {r.mfu:.1%}):"]
    for x in amdahl_rows(r, speedup):
        f, ceil, need = x["f"], x["ceiling"], x["needed"]
        ceil_txt = f"{ceil:.2f}x" if math.isfinite(ceil) else "none"
        need_txt = (f"those {f:.1%} {need:.1f}x faster" if math.isfinite(need)
                    else f"more than the {ceil_txt} ceiling: impossible even at infinite speed; "
                         f"the other {1 - f:.1%} of the step must shrink too")
        lines.append(f"  {x['part']}: f = {f:.1%}, ceiling 1/(1-f) = {ceil_txt}; {speedup:g}x "
                     f"needs {need_txt}")
    lines.append(f"  read the other way: a step {speedup:g}x longer than this one is the "
                 f"baseline running at {r.mfu / speedup:.1%} MFU; against a baseline at MFU m the "
                 f"ceiling of any engine is 1/m (at m = 40%, 2.5x)")
    return lines


# ---- output -------------------------------------------------------------------------------------


def result_dict(r: sm.Result) -> dict:
    j = r.job
    return {
        "compute_scale": j.compute_scale, "model": j.model.name, "cluster": j.cluster.name,
        "gpus": j.gpus, "tp": j.tp, "pp": j.pp, "dp": j.dp, "chunks": j.chunks, "schedule": j.schedule, "microbatches": j.microbatches,
        "microbatch_size": j.microbatch_size, "seq_len": j.seq_len,
        "global_batch_tokens": j.tokens, "step_s": r.step_s, "tokens_per_s": r.tokens_per_s,
        "mfu": r.mfu, "mfu_palm": r.mfu_palm, "bubble": r.bubble, "p2p_s": r.p2p_s,
        "dp_allreduce_s": r.dp_s, "dp_algorithm": r.dp_algorithm, "optimizer_s": r.optimizer_s,
        "breakdown_s": r.breakdown,
    }


def print_result(r: sm.Result) -> None:
    d = result_dict(r)
    print(f"{d['model']} on {d['gpus']} x {r.job.cluster.gpu.name} ({d['cluster']}): "
          f"tp={d['tp']} pp={d['pp']} dp={d['dp']} vp={d['chunks']} {d['schedule']} "
          f"M={d['microbatches']} x {d['microbatch_size']} seq {d['seq_len']}")
    print(f"  step {r.step_s * 1e3:.1f} ms   {r.tokens_per_s:,.0f} tok/s   MFU {r.mfu:.1%} "
          f"(6N+12LTC: {r.mfu_palm:.1%})   bubble {r.bubble:.1%}")
    print(f"  p2p message {r.p2p_s * 1e6:.0f} us   DP reduction {r.dp_s * 1e3:.1f} ms "
          f"({r.dp_algorithm})   optimizer {r.optimizer_s * 1e3:.1f} ms")
    print("  breakdown of the critical rank's step:")
    for k, v in r.breakdown.items():
        if abs(v) > 1e-12:
            print(f"    {k:22} {v * 1e3:10.1f} ms  {v / r.step_s:6.1%}")


def write_outputs(out: Path, checks: list, proj_result, curve: list, claim: dict | None,
                  elapsed_1k: float | None, fixed: list = ()) -> list:
    """OUT/simulate.parquet (long-form rows) and OUT/simulate.json (what `tandem report OUT`
    draws the breakdown, scaling and validation figures from). Returns the paths written."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in checks:
        rows.append({"section": "validation", "name": c.point.name, "metric": c.metric,
                     "predicted": c.predicted, "reference": c.reference, "error": c.error,
                     "bound": c.point.bound, "ok": c.ok, "role": c.point.role,
                     "kind": c.point.kind, "source": c.point.source, "detail": c.detail})
    tagged = ([("projection", proj_result)] if proj_result else []) + \
        [("scaling", r) for r in curve] + [("fixed_batch", r) for r in fixed]
    for sec, r in tagged:
        d = result_dict(r)
        base = {k: d[k] for k in ("gpus", "step_s", "tokens_per_s", "mfu", "mfu_palm", "bubble",
                                  "microbatches", "global_batch_tokens")}
        for k, v in d["breakdown_s"].items():
            rows.append({"section": sec, "name": f"{d['model']}@{d['gpus']}", "metric": k,
                         "predicted": v, **{f"job_{a}": b for a, b in base.items()}})
    df = pd.DataFrame(rows)
    df.to_parquet(out / "simulate.parquet", index=False)
    meta = {"projection": result_dict(proj_result) if proj_result else None,
            "scaling": [result_dict(r) for r in curve],
            "fixed_batch": [result_dict(r) for r in fixed], "claim": claim,
            "amdahl": amdahl_lines(proj_result, claim["speedup"]) if proj_result and claim
            else [],
            "amdahl_rows": [{k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                             for k, v in x.items()}
                            for x in amdahl_rows(proj_result, claim["speedup"])]
            if proj_result and claim else [],
            "simulate_1k_gpus_s": elapsed_1k,
            "validation": [{"name": c.point.name, "metric": c.metric, "predicted": c.predicted,
                            "reference": c.reference, "error": c.error, "ok": c.ok,
                            "role": c.point.role, "fitted": c.point.fitted}
                           for c in checks]}
    (out / "simulate.json").write_text(json.dumps(meta, indent=1))
    # figures are drawn by the report layer (reports.simulate), which reads simulate.json:
    # `tandem report DIR --out OUT`; the harness does not import it (tests/test_layering.py)
    return [out / "simulate.parquet", out / "simulate.json"]


# ---- CLI ----------------------------------------------------------------------------------------


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="suites/models/<name>.toml or a path")
    p.add_argument("--cluster", help="suites/clusters/<name>.toml or a path")
    p.add_argument("--layout", default="", help="tp=N,pp=N,dp=N[,vp=N] (default 1 each)")
    p.add_argument("--schedule", default="1f1b", choices=sched.NAMES)
    p.add_argument("--microbatches", type=int, default=1, metavar="M")
    p.add_argument("--microbatch-size", type=int, default=1, metavar="SEQS")
    p.add_argument("--seq", type=int, default=1024, metavar="T")
    p.add_argument("--tp-overlap", type=float, default=0.0, metavar="X",
                   help="share of tensor-parallel communication hidden under GEMMs (0..1)")
    p.add_argument("--no-dp-overlap", action="store_true",
                   help="start the gradient reduction after the last backward, not with it")
    p.add_argument("--order", default="tp,dp,pp", choices=sm.ORDERS, metavar="ORDER",
                   help="placement, innermost first: tp,dp,pp (Megatron-LM's, the default) or "
                        "tp,pp,dp (Llama 3's: data parallelism outermost)")
    p.add_argument("--calibrate", nargs=2, metavar=("RECORDS", "CASE"),
                   help="scale compute times by a one-stage engine run's measured step ÷ the "
                        "model's (a `tandem bench` records.parquet and its case)")
    p.add_argument("--calibrate-cluster", metavar="C",
                   help="cluster of the --calibrate run (default: from its device, H100/H200)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--validate", action="store_true",
                   help="print the validation table; exit 1 if a point is outside its bound")
    p.add_argument("--scaling", action="store_true",
                   help="the projection (suites/simulate/projection.toml) and its 1k -> 220k "
                        "GPU scaling curve, with the Amdahl ceiling of the claimed speedup")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write simulate.parquet and simulate.json; `tandem report DIR --out OUT` "
                        "draws the figures")


def run(args: argparse.Namespace) -> int:
    if not (args.validate or args.scaling or args.model):
        raise ConfigError("give --model M --cluster C [--layout ...], --validate or --scaling")
    status = 0
    checks, proj_r, curve, fixed, claim, t1k = [], None, [], [], None, None
    if args.model:
        if not args.cluster:
            raise ConfigError("--model needs --cluster (suites/clusters/*.toml)")
        lay = sm.parse_layout(args.layout)
        scale, why = 1.0, ""
        if args.calibrate:
            scale, why = calibration_scale(*args.calibrate, args.calibrate_cluster)
        j = sm.Job(sm.load_model(args.model), nm.load_cluster(args.cluster), **lay,
                   schedule=args.schedule, microbatches=args.microbatches,
                   microbatch_size=args.microbatch_size, seq_len=args.seq,
                   tp_overlap=args.tp_overlap, dp_overlap=not args.no_dp_overlap,
                   order=args.order, compute_scale=scale)
        r = sm.simulate_step(j)
        if why and not args.json:
            print(f"calibrated: compute x {scale:.3f} ({why})")
        if args.json:
            print(json.dumps(result_dict(r), indent=1))
        else:
            print_result(r)
        proj_r = r
    if args.validate:
        checks = validate()
        print(validation_table(checks))
        bad = [c.point.name for c in checks if not c.ok]
        print(f"{len(checks) - len(bad)}/{len(checks)} points within their bounds"
              + (f"; outside: {', '.join(bad)}" if bad else ""))
        status = 1 if bad else 0
    if args.scaling:
        proj = load_projection()
        claim = proj["claim"]
        t0 = time.perf_counter()
        sm.simulate_step(projection_job(proj, 1024))
        t1k = time.perf_counter() - t0
        proj_r = sm.simulate_step(projection_job(proj))
        print_result(proj_r)
        curve = scaling_curve(proj)
        print(f"\nscaling ({proj_r.job.model.name}, {proj_r.job.cluster.name}, "
              f"{proj_r.job.microbatches} micro-batches per pipeline):")
        print(f"{'GPUs':>8} {'dp':>6} {'step s':>8} {'Mtok/s':>8} {'MFU':>6} {'bubble':>7} "
              f"{'DP exp.':>8}")
        for r in curve:
            print(f"{r.job.gpus:8d} {r.job.dp:6d} {r.step_s:8.3f} {r.tokens_per_s / 1e6:8.2f} "
                  f"{r.mfu:6.1%} {r.bubble:7.1%} "
                  f"{r.breakdown['dp_comm_exposed'] / r.step_s:8.1%}")
        fixed = fixed_batch_curve(proj)
        if fixed:
            print(f"\nfixed global batch of {proj['global_batch_tokens']:,} tokens:")
            print(f"{'GPUs':>8} {'dp':>6} {'M':>4} {'schedule':>11} {'step s':>8} {'Mtok/s':>8} "
                  f"{'MFU':>6} {'bubble':>7}")
            for r in fixed:
                print(f"{r.job.gpus:8d} {r.job.dp:6d} {r.job.microbatches:4d} "
                      f"{r.job.schedule:>11} {r.step_s:8.3f} {r.tokens_per_s / 1e6:8.2f} "
                      f"{r.mfu:6.1%} {r.bubble:7.1%}")
        print()
        print("\n".join(amdahl_lines(proj_r, claim["speedup"])))
        print(f"(simulating one step of the 1,024-GPU layout took {t1k:.3f} s)")
    if args.out:
        for f in write_outputs(args.out, checks, proj_r, curve, claim, t1k, fixed):
            print(f)
        print(f"figures and report: tandem report {args.out} --out {args.out}/report")
    return status


__all__ = ["load_points", "check_point", "validate", "validation_table", "load_projection",
           "projection_job", "scaling_curve", "fixed_batch_curve", "amdahl_rows", "amdahl_lines",
           "result_dict", "write_outputs"]
