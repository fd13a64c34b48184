"""Synthetic but realistic results directories for the report tests (and for eyeballing).

What it is: writers for a GPU bench run (model-size, stage and micro-batch sweeps, several
schedules, repeats + summary rows, bubble measured vs theory) and a CPU run (raw repeats only,
parity of every tier with one planted failure, loss curves incl. a real-text one, 2-rank
timelines and Perfetto traces). Numbers follow the design FACTS in scale; not measurements.
    python3 tests/reports/report_fixtures.py OUT   # writes OUT/gpu, OUT/cpu, OUT/gpu-slow
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.records import PARITY_COLUMNS, RECORD_COLUMNS, write_json  # noqa: E402

COMMIT = "3f9c2e1a7b5d"
STAMP = "2026-11-21T10:00:00Z"
H200_BF16 = 989e12


def n_params(V, C, L):
    return V * C + L * (12 * C * C + 13 * C) + 2 * C


def flops_per_token(V, C, L, T, palm=False):
    return 6 * n_params(V, C, L) + (12 if palm else 6) * L * T * C


def bubble_theory(schedule, p, m, v=1):
    if p <= 1:
        return 0.0
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    if schedule == "zb-h1":
        return (p - 1) / (m + p - 1) / 3
    return 0.0


def _rows(rng, base: dict, side: str, metric: str, unit: str, median: float, repeats: int,
          rel_noise: float, summaries: bool, **extra) -> list[dict]:
    vals = median * (1 + rel_noise * rng.standard_normal(repeats))
    rows = [dict(base, side=side, metric=metric, unit=unit, value=float(v), repeat=i, **extra)
            for i, v in enumerate(vals)]
    if summaries:
        rows.append(dict(base, side=side, metric=metric, unit=unit, value=float(np.median(vals)),
                         repeat=-1, spread_lo=float(np.percentile(vals, 25)),
                         spread_hi=float(np.percentile(vals, 75)), **extra))
    return rows


def bench_rows(cases: list[dict], *, device, backend, dtype, peak, peak_source, suite, seed=0,
               repeats=5, noise=0.02, summaries=True, slow: dict | None = None) -> pd.DataFrame:
    """Rows for every case: engine/jax tokens/s, step ms, FLOP/s, MFU (+PaLM), memory, compile
    time, engine/theory bubble for pipelines, ratio speedup. `slow[case] = k` divides the
    engine's throughput by k (a planted regression)."""
    rng = np.random.default_rng(seed)
    slow = slow or {}
    rows = []
    for c in cases:
        base = {k: c[k] for k in ("case", "n_layer", "n_embd", "n_head", "vocab_size", "seq_len",
                                  "batch_size", "stages", "microbatches", "schedule", "chunks")}
        base.update(suite=suite, device=device, backend=backend, dtype=dtype, commit=COMMIT,
                    timestamp=STAMP, spread_lo=math.nan, spread_hi=math.nan,
                    peak_flops=math.nan, peak_source="")
        V, C, L, T = c["vocab_size"], c["n_embd"], c["n_layer"], c["seq_len"]
        tokens = c["batch_size"] * T
        fpt, fpt_palm = flops_per_token(V, C, L, T), flops_per_token(V, C, L, T, palm=True)
        devices = max(1, c["stages"])
        tps = {"engine": c["engine"] / slow.get(c["case"], 1.0), "jax": c["jax"]}
        for side in ("engine", "jax"):
            t = tps[side]
            rows += _rows(rng, base, side, "tokens_per_s", "tokens/s", t, repeats, noise, summaries)
            rows += _rows(rng, base, side, "step_ms", "ms", tokens / t * 1e3, repeats, noise,
                          summaries)
            rows += _rows(rng, base, side, "flops_per_s", "FLOP/s", fpt * t, repeats, noise,
                          summaries)
            pk = dict(peak_flops=peak * devices, peak_source=peak_source)
            base_pk = {**base, **pk}
            rows += _rows(rng, base_pk, side, "mfu", "fraction", fpt * t / (peak * devices),
                          repeats, noise, summaries)
            rows += _rows(rng, base_pk, side, "mfu_palm", "fraction",
                          fpt_palm * t / (peak * devices), repeats, noise, summaries)
            mem = c.get("mem_gib", 8.0) * 2 ** 30 * (1.0 if side == "engine" else 1.25)
            rows += _rows(rng, base, side, "peak_mem_bytes", "B", mem, 1, 0.0, summaries)
            rows += _rows(rng, base, side, "compile_s", "s", 0.4 if side == "engine" else 9.5, 1,
                          0.05, summaries)
        rows += _rows(rng, base, "ratio", "speedup", "x", tps["engine"] / tps["jax"], repeats,
                      noise, summaries)
        if c["stages"] > 1:
            th = bubble_theory(c["schedule"], c["stages"], c["microbatches"], c["chunks"])
            rows += _rows(rng, base, "theory", "bubble", "fraction", th, 1, 0.0, summaries)
            rows += _rows(rng, base, "theory", "bubble_sim", "fraction", th + 0.0125, repeats,
                          0.0, summaries)
            rows += _rows(rng, base, "engine", "bubble", "fraction", c.get("bubble", th + 0.025),
                          repeats, 0.08, summaries)
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)


def gpu_cases() -> list[dict]:
    def case(name, L, C, NH, B, p=1, m=1, sched="none", v=1, engine=0.0, jax=0.0, mem=8.0):
        return dict(case=name, n_layer=L, n_embd=C, n_head=NH, vocab_size=50257, seq_len=1024,
                    batch_size=B, stages=p, microbatches=m, schedule=sched, chunks=v,
                    engine=engine, jax=jax, mem_gib=mem)

    cases = [
        case("gpt2-124m", 12, 768, 12, 16, engine=371e3, jax=343e3, mem=21),
        case("gpt2-350m", 24, 1024, 16, 16, engine=146e3, jax=139e3, mem=38),
        case("gpt2-774m", 36, 1280, 20, 16, engine=71e3, jax=67e3, mem=57),
        case("gpt2-1.5b", 48, 1600, 25, 16, engine=37.9e3, jax=36.5e3, mem=92),
    ]
    for p, e, j in ((1, 37.0e3, 35.5e3), (2, 69e3, 61e3), (4, 121e3, 101e3)):
        cases.append(case(f"gpt2-1.5b-1f1b-p{p}-m8", 48, 1600, 25, 32, p, 8, "1f1b", engine=e,
                          jax=j, mem=92 / p + 6))
    for m, e, j in ((4, 96e3, 83e3), (16, 131e3, 109e3), (32, 128e3, 111e3)):
        cases.append(case(f"gpt2-1.5b-1f1b-p4-m{m}", 48, 1600, 25, 32, 4, m, "1f1b", engine=e,
                          jax=j, mem=30 + m * 0.4))
    cases += [
        case("gpt2-1.5b-gpipe-p4-m8", 48, 1600, 25, 32, 4, 8, "gpipe", engine=112e3, jax=101e3,
             mem=41),
        case("gpt2-1.5b-interleaved-p4-m8-v2", 48, 1600, 25, 32, 4, 8, "interleaved", 2,
             engine=129e3, jax=101e3, mem=33),
        case("gpt2-1.5b-zbh1-p4-m8", 48, 1600, 25, 32, 4, 8, "zb-h1", engine=137e3, jax=101e3,
             mem=31),
    ]
    return cases


def run_json(path: Path, **over) -> None:
    obj = {
        "machine": "h200-node-07 (Linux 6.8, x86_64)",
        "cpu": "2× Intel Xeon Platinum 8480C (112 cores)",
        "gpu": "4× NVIDIA H200 141 GB (SXM, NVLink NV18)",
        "versions": {"python": "3.12.7", "jax": "0.11.0", "jaxlib": "0.11.0", "cuda": "13.0",
                     "nccl": "2.27.3", "tandem": "0.1.0"},
        "commit": COMMIT,
        "peaks": {"bf16": {"flops": H200_BF16, "source": "datasheet H200 SXM bf16 dense"},
                  "fp32": {"flops": 67e12, "source": "datasheet H200 SXM fp32"}},
        "command": "tandem bench --suite suites/gpu-scaling.toml --out results/gpu",
        "timestamp": STAMP,
    }
    obj.update(over)
    write_json(path / "run.json", obj)


def write_gpu_dir(path: Path, slow: dict | None = None, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    bench_rows(gpu_cases(), device="NVIDIA H200", backend="cuda", dtype="bf16", peak=H200_BF16,
               peak_source="datasheet H200 SXM bf16 dense", suite="gpu-scaling", seed=seed,
               slow=slow).to_parquet(path / "records.parquet", index=False)
    run_json(path)
    return path


# --- CPU dir: parity, losses, timelines -------------------------------------------------------

PARAMS_L2 = ["wte.weight", "wpe.weight"] + [
    f"h.{i}.{n}" for i in range(2) for n in (
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
        "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight",
        "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")] + ["ln_f.weight", "ln_f.bias"]

FAILING_TENSOR = "grad/h.1.mlp.c_fc.weight"


def parity_rows(seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []

    def add(case, tier, tensor, err, tol, metric="rel_l2", reference="jax"):
        share = err / tol
        rows.append(dict(suite="cpu-parity", case=case, tier=tier, tensor=tensor,
                         max_abs=err * 3.1, rel_l2=err if metric == "rel_l2" else err * 0.7,
                         rel=err if metric == "rel" else err * 1.4, metric=metric, tol=tol,
                         share=share, passed=bool(share <= 1.0), backend="cpu", dtype="fp32",
                         reference=reference, commit=COMMIT, timestamp=STAMP))

    for op in ("matmul.dx", "matmul.dW", "layernorm.dx", "layernorm.dw", "attention.dq",
               "attention.dv", "gelu.dx", "softmax_xent.dlogits", "adamw.param"):
        add("ops-odd-shapes", "op", f"op/{op}", 10 ** rng.uniform(-7.5, -6.3), 1e-5)
    add("tiny-model", "model", "loss", 2.1e-7, 1e-5, "rel")
    add("tiny-model", "model", "logits", 3.4e-7, 1e-5)
    for p in PARAMS_L2:
        add("tiny-model", "model", f"grad/{p}", 10 ** rng.uniform(-6.4, -5.3), 1e-4)
    for k in range(20):
        add("tiny-traj", "trajectory", f"loss@step{k}", 1e-7 * (1 + k) ** 1.2, 1e-4, "rel")
    for p in PARAMS_L2:
        add("tiny-traj", "trajectory", f"param/{p}", 10 ** rng.uniform(-6.5, -5.6), 1e-4)
    for p in PARAMS_L2:
        err = 1.7e-4 if f"grad/{p}" == FAILING_TENSOR else 10 ** rng.uniform(-7.2, -6.2)
        add("tiny-1f1b-p2-m4", "schedule", f"grad/{p}", err, 1e-4, reference="1-stage control")
    add("tiny-1f1b-p2-m4", "schedule", "loss", 0.0, 1e-5, "rel", reference="1-stage control")
    return pd.DataFrame(rows, columns=PARITY_COLUMNS)


def loss_rows(seed: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    # random tokens: the loss can only fall to ln V's neighbourhood by learning unigram stats
    steps = np.arange(20)
    jax_r = math.log(512) + 0.05 - 0.04 * (1 - np.exp(-steps / 6)) + 0.004 * rng.standard_normal(20)
    steps_t = np.arange(60)
    jax_t = 2.9 + 3.35 * np.exp(-steps_t / 14) + 0.05 * rng.standard_normal(60)
    for case, s, j in (("tiny-random", steps, jax_r), ("tiny-shakespeare", steps_t, jax_t)):
        e = j * (1 + 1e-7 * (1 + s) ** 1.3 * rng.standard_normal(len(s)))
        rows += [dict(case=case, side="jax", step=int(a), loss=float(b)) for a, b in zip(s, j)]
        rows += [dict(case=case, side="engine", step=int(a), loss=float(b)) for a, b in zip(s, e)]
    return pd.DataFrame(rows)


def schedule_actions(schedule: str, p: int, m: int) -> list[list[tuple[str, int]]]:
    """Per-rank action lists (kind, micro-batch) for 1F1B (fused BW) or ZB-H1 (B then W)."""
    ranks = []
    for r in range(p):
        warm = min(p - r - 1, m)
        acts = [("F", i) for i in range(warm)]
        f, b = warm, 0
        while b < m:
            if f < m:
                acts.append(("F", f))
                f += 1
            if schedule == "1f1b":
                acts.append(("BW", b))
            else:
                acts.append(("B", b))
                if b >= warm:  # ZB-H1: weight gradients of the warm-up micro-batches wait
                    acts.append(("W", b - warm))
            b += 1
        if schedule != "1f1b":
            acts += [("W", i) for i in range(m - warm, m)]
        ranks.append(acts)
    return ranks


def simulate(schedule: str, p: int, m: int, steps: int = 3, seed: int = 3) -> pd.DataFrame:
    """Timeline rows for every rank: compute with dependencies, send/recv after each boundary
    crossing, WAIT for gaps, then the tied-embedding all-reduce and the optimizer step."""
    rng = np.random.default_rng(seed)
    dur = {"F": 1000.0, "B": 1000.0, "W": 900.0, "BW": 1900.0}
    lat = 120.0
    rows, t_step = [], 1_000_000.0
    for step in range(steps):
        acts = schedule_actions(schedule, p, m)
        done: dict[tuple[str, int, int], float] = {}
        free = [t_step] * p
        ptr = [0] * p
        events = [[] for _ in range(p)]
        while any(ptr[r] < len(acts[r]) for r in range(p)):
            progressed = False
            for r in range(p):
                if ptr[r] >= len(acts[r]):
                    continue
                kind, mb = acts[r][ptr[r]]
                if kind == "F":
                    dep = None if r == 0 else ("F", r - 1, mb)
                elif kind in ("B", "BW"):
                    dep = ("F", r, mb) if r == p - 1 else ("B", r + 1, mb)
                else:
                    dep = ("B", r, mb)
                if dep is not None and dep not in done:
                    continue
                ready = free[r]
                if dep is not None:
                    cross = dep[1] != r
                    ready = max(ready, done[dep] + (lat if cross else 0.0))
                    if cross:
                        events[dep[1]].append(("SEND", -1, mb, done[dep], done[dep] + lat))
                        events[r].append(("RECV", -1, mb, done[dep], done[dep] + lat))
                d = dur[kind] * (1 + 0.03 * rng.standard_normal())
                if ready > free[r] + 1:
                    events[r].append(("WAIT", -1, -1, free[r], ready))
                events[r].append((kind, r, mb, ready, ready + d))
                done[(kind if kind != "BW" else "B", r, mb)] = ready + d
                if kind == "BW":
                    done[("W", r, mb)] = ready + d
                free[r] = ready + d
                ptr[r] += 1
                progressed = True
            assert progressed, "schedule deadlocked"
        end = max(free)
        for r in range(p):
            if end > free[r] + 1:
                events[r].append(("WAIT", -1, -1, free[r], end))
            events[r].append(("ALLREDUCE", r, -1, end, end + 300))
            events[r].append(("OPT", r, -1, end + 300, end + 700))
        for r in range(p):
            rows += [dict(rank=r, step=step, kind=k, stage=st, microbatch=mb, start_us=round(a),
                          end_us=round(b)) for k, st, mb, a, b in events[r]]
        t_step = end + 900
    return pd.DataFrame(rows, columns=["rank", "step", "kind", "stage", "microbatch", "start_us",
                                       "end_us"])


def timeline_bubble(tl: pd.DataFrame) -> float:
    """1 − busy F/B/W/BW time ÷ (ranks × step wall time), median over steps."""
    out = []
    for _, s in tl.groupby("step"):
        busy = s[s["kind"].isin(["F", "B", "W", "BW"])]
        wall = s["end_us"].max() - s["start_us"].min()
        out.append(1 - (busy["end_us"] - busy["start_us"]).sum() / (s["rank"].nunique() * wall))
    return float(np.median(out))


def chrome_trace(tl: pd.DataFrame) -> dict:
    ev = [{"name": f"{r.kind}{'' if r.microbatch < 0 else r.microbatch}", "cat": r.kind, "ph": "X",
           "ts": float(r.start_us), "dur": float(r.end_us - r.start_us), "pid": 0,
           "tid": int(r.rank), "args": {"step": int(r.step)}} for r in tl.itertuples()]
    return {"traceEvents": ev, "displayTimeUnit": "ms"}


def cpu_cases() -> list[dict]:
    def case(name, L, C, NH, V, T, B, p=1, m=1, sched="none", engine=0.0, jax=0.0):
        return dict(case=name, n_layer=L, n_embd=C, n_head=NH, vocab_size=V, seq_len=T,
                    batch_size=B, stages=p, microbatches=m, schedule=sched, chunks=1,
                    engine=engine, jax=jax, mem_gib=0.05 * L)

    return [case("tiny", 4, 128, 4, 512, 64, 8, engine=14.1e3, jax=10.2e3),
            case("small", 6, 384, 6, 4096, 128, 8, engine=1.06e3, jax=0.75e3),
            case("tiny-1f1b-p2-m4", 2, 128, 4, 512, 64, 8, 2, 4, "1f1b", 15.5e3, 11.9e3),
            case("tiny-zbh1-p2-m4", 2, 128, 4, 512, 64, 8, 2, 4, "zb-h1", 16.1e3, 11.9e3)]


def write_cpu_dir(path: Path) -> Path:
    """CPU run: raw repeats only (the report computes medians), parity, losses, timelines."""
    path.mkdir(parents=True, exist_ok=True)
    cases = cpu_cases()
    timelines = {c["case"]: simulate(c["schedule"], c["stages"], c["microbatches"])
                 for c in cases if c["stages"] > 1}
    for c in cases:  # the measured bubble is what the timelines say
        if c["case"] in timelines:
            c["bubble"] = timeline_bubble(timelines[c["case"]])
    bench_rows(cases, device="AMD EPYC 9R14 (2 cores)", backend="cpu", dtype="fp32",
               peak=1.95e11, peak_source="measured fp32 GEMM 2048² (numpy/OpenBLAS)",
               suite="cpu-perf", seed=5, repeats=7, noise=0.06, summaries=False
               ).to_parquet(path / "records.parquet", index=False)
    parity_rows().to_parquet(path / "parity.parquet", index=False)
    loss_rows().to_parquet(path / "losses.parquet", index=False)
    (path / "traces").mkdir(exist_ok=True)
    for case, tl in timelines.items():
        d = path / "timelines" / case
        d.mkdir(parents=True, exist_ok=True)
        for r, g in tl.groupby("rank"):
            g.to_csv(d / f"timeline_rank{r}.csv", index=False)
        (path / "traces" / f"{case}.json").write_text(json.dumps(chrome_trace(tl)))
    run_json(path, machine="ci-runner-2 (Linux 6.1, x86_64)",
             cpu="AMD EPYC 9R14 (Zen 4, AVX-512), 2 cores", gpu="none",
             versions={"python": "3.11.7", "jax": "0.10.2", "numpy": "2.1.3", "openmpi": "5.0.6",
                       "tandem": "0.1.0"},
             peaks={"fp32": {"flops": 1.95e11, "source": "measured fp32 GEMM 2048²"}},
             command="tandem run --out results/cpu",
             cases={"tiny-1f1b-p2-m4": {"engine": {"rank_bubble": {
                 "0": {"measured": 0.212, "simulated": 0.2},
                 "1": {"measured": 0.19, "simulated": 0.185}},
                 "rank_device_bytes": {"0": 3 * 2**30}}}})
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tandem-synthetic")
    write_gpu_dir(out / "gpu")
    write_gpu_dir(out / "gpu-slow", slow={"gpt2-124m": 2.0})
    write_cpu_dir(out / "cpu")
    print(out)
