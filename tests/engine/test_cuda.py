"""The CUDA backend held to the CPU engine (and, run as a script, to JAX on the same GPU).

Tiers (docs/cuda.md has the measured numbers):
  fp32  - the GPU in pure fp32 (cuBLASLt CUBLAS_COMPUTE_32F, no TF32) against the CPU engine on
          odd shapes (V=311, NH=3, head sizes 16 and 24, T=1, both attention modes): logits and
          loss within 1e-5 relative, every gradient within 1e-4 relative L2, parameters after 5
          AdamW steps of 2 micro-batches within 1e-4 (the key-bias slice of c_attn.bias has an
          analytically zero gradient, see _compare_params).
  bf16  - bf16 compute with fp32 master weights against the CPU fp32 engine: the loss within 2%
          at every one of 20 steps, every gradient within 2e-2 relative L2; with the default
          automatic attention (flash for bf16 head sizes 16..64, else materialised) and with
          TANDEM_CUDA_ATTENTION=flash (64-row tiles crossed at T=130 and T=200; head sizes 32, 48,
          64 on the FlashAttention-2 kernels, 96 on the first ones); flash against the
          materialised attention directly; the default picks the mode it should.
  determinism - the same batch twice gives the same bits (no float atomics), flash included.
The device-state tiers (lazy zero_grad, tuned products, checkpoints, host-stage refusal) are in
tests/engine/test_cuda_state.py, which takes its cases and helpers from here.
Skipped with the reason when this libtandem was built without CUDA or no GPU is usable.
`python tests/engine/test_cuda.py --json OUT.json` runs every tier of both files (plus
engine-vs-JAX fp32 on the GPU when JAX sees one) and prints a table of the measured values.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_util when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine_util import rough_params, tokens_for  # noqa: E402
from harness import engine  # noqa: E402
from harness.errors import EngineError  # noqa: E402
from harness.init import init_params  # noqa: E402

FP32_CASES = {
    "hs16": dict(n_layer=2, n_embd=48, n_head=3, vocab_size=311, n_positions=16, seq_len=7,
                 batch_size=3),
    "hs24": dict(n_layer=2, n_embd=72, n_head=3, vocab_size=311, n_positions=16, seq_len=7,
                 batch_size=3),
    "t1": dict(n_layer=2, n_embd=48, n_head=3, vocab_size=311, n_positions=16, seq_len=1,
               batch_size=4),
    # n_embd not a multiple of 8: the scalar LayerNorm / column-sum kernels, not the 16-byte ones
    "c36": dict(n_layer=2, n_embd=36, n_head=3, vocab_size=311, n_positions=16, seq_len=7,
                batch_size=3),
}
BF16_CASES = {
    # head size 32, one 64-row attention tile
    "hs32": dict(n_layer=2, n_embd=128, n_head=4, vocab_size=311, n_positions=64, seq_len=64,
                 batch_size=4),
    # head size 64 (GPT-2's), T=200: four flash tiles, the last one partial
    "hs64-t200": dict(n_layer=2, n_embd=128, n_head=2, vocab_size=311, n_positions=256,
                      seq_len=200, batch_size=2),
    # head size 48 (mma.sync flash kernels, 3 k-chunks), T=130: a 2-row last tile
    "hs48-t130": dict(n_layer=2, n_embd=96, n_head=2, vocab_size=311, n_positions=192,
                      seq_len=130, batch_size=2),
    # head size 96: the first (WMMA) flash kernels, kept for head sizes above 64
    "hs96-t80": dict(n_layer=1, n_embd=192, n_head=2, vocab_size=311, n_positions=128,
                     seq_len=80, batch_size=2),
    # n_embd 36, head size 12: scalar element-wise kernels and the materialised attention
    "c36-t40": dict(n_layer=2, n_embd=36, n_head=3, vocab_size=311, n_positions=64,
                    seq_len=40, batch_size=3),
    # GPT-2 124M's and 1.5B's widths (one layer): the 16-byte LayerNorm kernels with 3 and 7
    # vectors per lane, column sums over several 256-column blocks
    "c768": dict(n_layer=1, n_embd=768, n_head=12, vocab_size=311, n_positions=64, seq_len=64,
                 batch_size=2),
    "c1600": dict(n_layer=1, n_embd=1600, n_head=25, vocab_size=311, n_positions=32,
                  seq_len=32, batch_size=2),
}
BF16_CASE = BF16_CASES["hs32"]
FP32_TOL = dict(logits=1e-5, loss=1e-5, grad=1e-4, param=1e-4)
BF16_TOL = dict(loss=2e-2, grad=2e-2)


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run here, or None when it can."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi: no NVIDIA GPU on this machine"
    try:
        with engine.Model(backend="cuda", dtype="fp32", **FP32_CASES["t1"]):
            return None
    except EngineError as exc:
        msg = str(exc)
        if "built without CUDA" in msg or "no CUDA device" in msg:
            return msg
        raise


@pytest.fixture(scope="module")
def cuda_ok(engine_library):
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)


def rel_l2(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    n = np.linalg.norm(ref)
    d = np.linalg.norm(a - ref)
    return float(d / n) if n > 0 else float(d)


def _cuda_model(config, dtype, attention=None):
    """A CUDA model built with TANDEM_CUDA_ATTENTION=attention (the engine reads it at build);
    the caller's environment is restored afterwards."""
    old = os.environ.get("TANDEM_CUDA_ATTENTION")
    if attention:
        os.environ["TANDEM_CUDA_ATTENTION"] = attention
    try:
        return engine.Model(backend="cuda", dtype=dtype, **config)
    finally:
        if attention:
            if old is None:
                os.environ.pop("TANDEM_CUDA_ATTENTION", None)
            else:
                os.environ["TANDEM_CUDA_ATTENTION"] = old


def _models(config, params, dtype, attention=None, threads=2):
    """(cpu, gpu) models with the same parameters; attention selects the CUDA attention mode."""
    gpu = _cuda_model(config, dtype, attention)
    cpu = engine.Model(threads=threads, **config)
    cpu.set_params(params)
    gpu.set_params(params)
    return cpu, gpu


def _table(config):
    with engine.Model(**config) as m:
        return [(p.name, p.shape) for p in m.table]


def _kbias_split(name, a, C):
    """c_attn.bias without its key slice [C:2C] (whose gradient is analytically zero: softmax
    is shift-invariant, so AdamW turns rounding noise there into updates)."""
    if name.endswith("attn.c_attn.bias"):
        return np.concatenate([a[:C], a[2 * C:]]), a[C:2 * C]
    return a, None


def check_fp32(case: str, attention: str | None = None) -> list[dict]:
    config = FP32_CASES[case]
    C = config["n_embd"]
    params = rough_params([engine.ParamInfo(n, s, 0, False) for n, s in _table(config)],
                          config["n_layer"], seed=11)
    cpu, gpu = _models(config, params, "fp32", attention)
    label = f"fp32/{case}" + (f"/{attention}" if attention else "")
    rows = []
    try:
        x, y = tokens_for(config, seed=5)
        lc, loss_c = cpu.forward(x, y)
        lg, loss_g = gpu.forward(x, y)
        rows.append(dict(tier=label, metric="logits rel L2", tensor="logits",
                         value=rel_l2(lg, lc), bound=FP32_TOL["logits"]))
        rows.append(dict(tier=label, metric="loss rel", tensor="loss",
                         value=abs(loss_g - loss_c) / abs(loss_c), bound=FP32_TOL["loss"]))
        for m in (cpu, gpu):
            m.zero_grad()
            m.forward_backward(x, y, 0.5)  # a grad_scale other than 1 is part of the contract
        gc, gg = cpu.grads(), gpu.grads()
        total = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in gc.values()))
        for name in gc:
            a, kb = _kbias_split(name, gg[name], C)
            r, kr = _kbias_split(name, gc[name], C)
            rows.append(dict(tier=label, metric="grad rel L2", tensor=name, value=rel_l2(a, r),
                             bound=FP32_TOL["grad"]))
            if kb is not None:  # zero up to rounding on both sides
                rows.append(dict(tier=label, metric="k-bias grad max abs / |grad|",
                                 tensor=name + "[C:2C]",
                                 value=float(max(np.abs(kb).max(), np.abs(kr).max()) / total),
                                 bound=1e-5))
        # 5 AdamW steps of 2 micro-batches each (from the same parameters again)
        cpu.set_params(params)
        gpu.set_params(params)
        B, T = config["batch_size"], config["seq_len"]
        rng = np.random.default_rng(9)
        lossc, lossg = [], []
        for _ in range(5):
            ids = rng.integers(0, config["vocab_size"], size=(2, 2, B, T), dtype=np.int32)
            lossc.append(cpu.train_step(ids[0], ids[1])[0])
            lossg.append(gpu.train_step(ids[0], ids[1])[0])
        rows.append(dict(tier=label, metric="5-step loss max rel", tensor="loss",
                         value=float(np.max(np.abs(np.subtract(lossg, lossc)) / np.abs(lossc))),
                         bound=FP32_TOL["loss"] * 10))
        pc, pg = cpu.params(), gpu.params()
        for name in pc:
            a, _ = _kbias_split(name, pg[name], C)
            r, _ = _kbias_split(name, pc[name], C)
            rows.append(dict(tier=label, metric="params after 5 AdamW steps rel L2", tensor=name,
                             value=rel_l2(a, r), bound=FP32_TOL["param"]))
    finally:
        cpu.close()
        gpu.close()
    return rows


def check_bf16(steps: int = 20, case: str = "hs32", attention: str | None = None) -> list[dict]:
    """attention None: the automatic choice (bf16: flash for head sizes 16..64, else the
    materialised attention, kept per layer)."""
    config = BF16_CASES[case]
    params = init_params(_table(config), config["n_layer"], seed=3)
    cpu, gpu = _models(config, params, "bf16", attention)
    tier = f"bf16/{case}/{attention or 'auto'}"
    rows = []
    try:
        x, y = tokens_for(config, seed=5)
        for m in (cpu, gpu):
            m.zero_grad()
            m.forward_backward(x, y, 1.0)
        gc, gg = cpu.grads(), gpu.grads()
        for name in gc:
            rows.append(dict(tier=tier, metric="grad rel L2 (vs CPU fp32)", tensor=name,
                             value=rel_l2(gg[name], gc[name]), bound=BF16_TOL["grad"]))
        lg_logits, _ = gpu.forward(x, y)  # bf16 logits come back as fp32
        assert lg_logits.dtype == np.float32 and np.all(np.isfinite(lg_logits))
        cpu.set_params(params)
        gpu.set_params(params)
        rng = np.random.default_rng(1)
        worst = 0.0
        B, T = config["batch_size"], config["seq_len"]
        losses = []
        for _ in range(steps):
            ids = rng.integers(0, config["vocab_size"], size=(2, 1, B, T), dtype=np.int32)
            a = cpu.train_step(ids[0], ids[1])[0]
            b = gpu.train_step(ids[0], ids[1])[0]
            losses.append((a, b))
            worst = max(worst, abs(b - a) / abs(a))
        rows.append(dict(tier=tier, metric=f"loss max rel over {steps} steps", tensor="loss",
                         value=worst, bound=BF16_TOL["loss"],
                         note=f"first {losses[0][0]:.4f}/{losses[0][1]:.4f}, "
                              f"last {losses[-1][0]:.4f}/{losses[-1][1]:.4f} (cpu/gpu)"))
    finally:
        cpu.close()
        gpu.close()
    return rows


def check_flash_vs_materialized(case: str = "hs64-t200") -> list[dict]:
    """bf16 flash attention against the bf16 materialised attention, both on the GPU."""
    config = BF16_CASES[case]
    params = init_params(_table(config), config["n_layer"], seed=3)
    x, y = tokens_for(config, seed=8)
    out = {}
    for mode in ("flash", "store"):
        os.environ["TANDEM_CUDA_ATTENTION"] = mode
        try:
            m = engine.Model(backend="cuda", dtype="bf16", **config)
        finally:
            os.environ.pop("TANDEM_CUDA_ATTENTION", None)
        with m:
            m.set_params(params)
            logits, loss = m.forward(x, y)
            m.zero_grad()
            m.forward_backward(x, y, 1.0)
            out[mode] = (logits, loss, m.grads())
    tier = f"bf16-flash-vs-store/{case}"
    rows = [dict(tier=tier, metric="logits rel L2", tensor="logits",
                 value=rel_l2(out["flash"][0], out["store"][0]), bound=2e-2),
            dict(tier=tier, metric="loss rel", tensor="loss",
                 value=abs(out["flash"][1] - out["store"][1]) / abs(out["store"][1]), bound=2e-2)]
    for name, g in out["flash"][2].items():
        rows.append(dict(tier=tier, metric="grad rel L2", tensor=name,
                         value=rel_l2(g, out["store"][2][name]), bound=2e-2))
    return rows


def _same_bits(runs) -> bool:
    """Two (loss, grads) runs with the same loss and every gradient byte for byte."""
    (loss_a, ga), (loss_b, gb) = runs
    return loss_a == loss_b and all(ga[k].tobytes() == gb[k].tobytes() for k in ga)


def check_determinism(dtype: str, attention: str | None = None,
                      case: str | None = None) -> list[dict]:
    config = FP32_CASES["hs24"] if dtype == "fp32" else BF16_CASES[case or "hs32"]
    params = init_params(_table(config), config["n_layer"], seed=4)
    x, y = tokens_for(config, seed=6)
    gpu = _cuda_model(config, dtype, attention)
    with gpu:
        gpu.set_params(params)
        runs = []
        for _ in range(2):
            gpu.zero_grad()
            loss = gpu.forward_backward(x, y, 1.0)
            runs.append((loss, gpu.grads()))
    same = _same_bits(runs)
    label = f"determinism/{dtype}" + (f"/{attention}" if attention else "") + \
        (f"/{case}" if case else "")
    return [dict(tier=label, metric="bit-identical rerun (1 = yes)",
                 tensor="loss+grads", value=float(same), bound=None)]


DEFAULT_ATTENTION = {"hs64-t200": "flash", "hs48-t130": "flash", "hs96-t80": "store"}


def check_default_attention(case: str) -> list[dict]:
    """The bf16 default picks flash for head sizes with the FlashAttention-2 kernels (16..64) and
    the materialised attention otherwise: the default run and the forced mode give the same bits."""
    config = BF16_CASES[case]
    params = init_params(_table(config), config["n_layer"], seed=4)
    x, y = tokens_for(config, seed=6)
    runs = []
    for mode in (None, DEFAULT_ATTENTION[case]):
        old = os.environ.pop("TANDEM_CUDA_ATTENTION", None)
        if mode:
            os.environ["TANDEM_CUDA_ATTENTION"] = mode
        try:
            gpu = engine.Model(backend="cuda", dtype="bf16", **config)
        finally:
            os.environ.pop("TANDEM_CUDA_ATTENTION", None)
            if old is not None:
                os.environ["TANDEM_CUDA_ATTENTION"] = old
        with gpu:
            gpu.set_params(params)
            gpu.zero_grad()
            loss = gpu.forward_backward(x, y, 1.0)
            runs.append((loss, gpu.grads()))
    same = _same_bits(runs)
    return [dict(tier=f"default-attention/{case}",
                 metric=f"default == {DEFAULT_ATTENTION[case]}, bitwise (1 = yes)",
                 tensor="loss+grads", value=float(same), bound=None)]


def check_jax_fp32(case: str = "hs24") -> list[dict]:
    """Engine fp32 on the GPU against JAX fp32 ('highest' matmul precision) on the same GPU."""
    import jax
    import jax.numpy as jnp

    from reference import gpt2
    from reference.train import set_precision

    if not any(d.platform == "gpu" for d in jax.devices()):
        return []
    set_precision()
    config = FP32_CASES[case]
    params = rough_params([engine.ParamInfo(n, s, 0, False) for n, s in _table(config)],
                          config["n_layer"], seed=11)
    x, y = tokens_for(config, seed=5)
    cfg = gpt2.GPTConfig(**{k: config[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size",
                                                  "n_positions")})
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    loss_j, grads_j = jax.jit(lambda p, a, b: gpt2.loss_and_grads(p, a, b, cfg))(jp, x, y)
    logits_j = np.asarray(jax.jit(lambda p, a: gpt2.forward(p, a, cfg))(jp, x))
    rows = []
    with engine.Model(backend="cuda", dtype="fp32", **config) as gpu:
        gpu.set_params(params)
        lg, loss_g = gpu.forward(x, y)
        rows.append(dict(tier=f"fp32-vs-jax-gpu/{case}", metric="logits rel L2", tensor="logits",
                         value=rel_l2(lg, logits_j), bound=FP32_TOL["logits"]))
        rows.append(dict(tier=f"fp32-vs-jax-gpu/{case}", metric="loss rel", tensor="loss",
                         value=abs(loss_g - float(loss_j)) / abs(float(loss_j)),
                         bound=FP32_TOL["loss"]))
        gpu.zero_grad()
        gpu.forward_backward(x, y, 1.0)
        for name, g in gpu.grads().items():
            rows.append(dict(tier=f"fp32-vs-jax-gpu/{case}", metric="grad rel L2", tensor=name,
                             value=rel_l2(g, np.asarray(grads_j[name])),
                             bound=FP32_TOL["grad"]))
    return rows


def _failures(rows):
    return [r for r in rows if r["bound"] is not None and not r["value"] <= r["bound"]]


# ---- pytest ------------------------------------------------------------------------------------

FP32_TIERS = [("hs16", None), ("hs24", None), ("t1", None), ("c36", None), ("hs16", "recompute"),
              ("hs24", "store")]


@pytest.mark.parametrize("case,attention", FP32_TIERS)
def test_fp32_matches_cpu(cuda_ok, case, attention):
    rows = check_fp32(case, attention)
    bad = _failures(rows)
    assert not bad, bad


BF16_TIERS = [("hs32", None), ("hs32", "flash"), ("hs64-t200", None), ("hs64-t200", "flash"),
              ("hs48-t130", "flash"), ("hs96-t80", "flash"), ("c36-t40", None),
              ("c768", None), ("c1600", None)]
FLASH_VS_STORE = ["hs64-t200", "hs48-t130", "hs96-t80"]


@pytest.mark.parametrize("case,attention", BF16_TIERS)
def test_bf16_close_to_cpu_fp32(cuda_ok, case, attention):
    rows = check_bf16(case=case, attention=attention)
    bad = _failures(rows)
    assert not bad, bad


@pytest.mark.parametrize("case", FLASH_VS_STORE)
def test_flash_matches_materialized_attention(cuda_ok, case):
    bad = _failures(check_flash_vs_materialized(case))
    assert not bad, bad


def test_flash_needs_bf16(cuda_ok, monkeypatch):
    monkeypatch.setenv("TANDEM_CUDA_ATTENTION", "flash")
    with pytest.raises(EngineError, match="flash needs bf16"):
        engine.Model(backend="cuda", dtype="fp32", **FP32_CASES["hs16"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_reruns_are_bit_identical(cuda_ok, dtype):
    assert check_determinism(dtype)[0]["value"] == 1.0


@pytest.mark.parametrize("case", sorted(DEFAULT_ATTENTION))
def test_bf16_default_attention(cuda_ok, case):
    assert check_default_attention(case)[0]["value"] == 1.0


def test_flash_reruns_are_bit_identical(cuda_ok):
    """The flash backward is two kernels (dK/dV, then dQ) with no atomics: same bits twice."""
    assert check_determinism("bf16", "flash", "hs64-t200")[0]["value"] == 1.0


@pytest.mark.parametrize("case", ["hs64-t200", "hs48-t130"])
def test_flash_warps_per_block_give_the_same_bits(cuda_ok, monkeypatch, case):
    """TANDEM_CUDA_FLASH_WARPS picks 4 or 8 warps a block for each FlashAttention-2 kernel: the
    blocks share tiles differently, the rows' arithmetic is the same, so loss and every gradient
    match bit for bit (T = 200 and 130 end inside a 128-row block)."""
    config = BF16_CASES[case]
    params = init_params(_table(config), config["n_layer"], seed=4)
    x, y = tokens_for(config, seed=6)
    runs = []
    for warps in ("4,4,4", "8,8,8", "8,4,8", ""):
        monkeypatch.setenv("TANDEM_CUDA_FLASH_WARPS", warps)
        with _cuda_model(config, "bf16", "flash") as gpu:
            gpu.set_params(params)
            gpu.zero_grad()
            runs.append((gpu.forward_backward(x, y, 1.0), gpu.grads()))
    assert all(_same_bits([runs[0], r]) for r in runs[1:])


@pytest.mark.parametrize("value", ["5,8,8", "8,8", "8,8,8,8", "eight"])
def test_bad_flash_warps_is_a_config_error(cuda_ok, monkeypatch, value):
    monkeypatch.setenv("TANDEM_CUDA_FLASH_WARPS", value)
    with pytest.raises(EngineError, match=r"TANDEM_CUDA_FLASH_WARPS=.*each 4 or 8"):
        engine.Model(backend="cuda", dtype="bf16", **BF16_CASES["hs64-t200"])


def test_bad_attention_mode_is_a_config_error(cuda_ok, monkeypatch):
    monkeypatch.setenv("TANDEM_CUDA_ATTENTION", "sometimes")
    with pytest.raises(EngineError, match="TANDEM_CUDA_ATTENTION"):
        engine.Model(backend="cuda", dtype="fp32", **FP32_CASES["t1"])


# ---- script: every tier, one table ------------------------------------------------------------

def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every measured row here")
    ap.add_argument("--no-jax", action="store_true")
    args = ap.parse_args(argv)
    reason = cuda_unavailable_reason()
    if reason:
        print(f"SKIP: {reason}")
        return 0
    rows = []
    for case, att in FP32_TIERS:
        rows += check_fp32(case, att)
    for case, att in BF16_TIERS:
        try:
            rows += check_bf16(case=case, attention=att)
        except Exception as exc:  # noqa: BLE001 - one tier's crash must not hide the others
            rows.append(dict(tier=f"bf16/{case}/{att}", metric="error", tensor=repr(exc)[:300],
                             value=float("inf"), bound=0.0))
    for case in FLASH_VS_STORE:
        try:
            rows += check_flash_vs_materialized(case)
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(tier=f"bf16-flash-vs-store/{case}", metric="error",
                             tensor=repr(exc)[:300], value=float("inf"), bound=0.0))
    rows += check_determinism("fp32") + check_determinism("bf16")
    rows += check_determinism("bf16", "flash", "hs64-t200")
    from test_cuda_state import check_lazy_zero_grad, check_tuned_gemm

    rows += check_lazy_zero_grad()
    rows += check_tuned_gemm()
    for case in sorted(DEFAULT_ATTENTION):
        rows += check_default_attention(case)
    if not args.no_jax:
        try:
            rows += check_jax_fp32()
        except Exception as exc:  # noqa: BLE001 - reported, not fatal to the other tiers
            rows.append(dict(tier="fp32-vs-jax-gpu", metric="error", tensor=repr(exc)[:200],
                             value=float("nan"), bound=None))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    # summary: per tier and metric, the worst tensor
    summary = {}
    for r in rows:
        k = (r["tier"], r["metric"])
        if k not in summary or (r["value"] > summary[k]["value"]):
            summary[k] = r
    print(f"{'tier':28s} {'metric':38s} {'worst':>11s} {'bound':>8s}  tensor")
    for (tier, metric), r in summary.items():
        b = "" if r["bound"] is None else f"{r['bound']:.0e}"
        print(f"{tier:28s} {metric:38s} {r['value']:11.3e} {b:>8s}  {r['tensor']}"
              + (f"  ({r['note']})" if r.get("note") else ""))
    for tier in sorted({r["tier"] for r in rows if r["tier"].startswith("bf16/")}):
        grads = [r["value"] for r in rows if r["tier"] == tier and r["metric"].startswith("grad")]
        if grads:
            q = np.quantile(grads, [0, 0.5, 0.9, 1])
            print(f"{tier} grad rel L2 over {len(grads)} tensors: min {q[0]:.2e} median "
                  f"{q[1]:.2e} p90 {q[2]:.2e} max {q[3]:.2e}")
    bad = _failures(rows)
    print(f"{len(rows)} checks, {len(bad)} over their bound")
    for r in bad:
        print("  FAIL", r)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
