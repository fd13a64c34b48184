"""GPT-2 training throughput on one GPU: the Tandem CUDA engine (bf16) against JAX on the same GPU.

A development benchmark for the CUDA backend in engine/cuda (the harness's `tandem bench` is the
tracked one); a tool above the harness, which it imports. For each size it writes seeded fp32
weights once, then runs each side in its own process (so neither holds the other's GPU memory):
W untimed steps, then K timed full training steps (forward, backward, global-norm, AdamW on fp32
master weights), the device synchronised before each clock read; the median step gives tokens/s
and MFU (harness.flops: 6N + 6LTC; peak 989e12 bf16, H100 / H200 SXM datasheet). JAX:
parameters cast to bf16 inside the jitted step, fp32 master weights and AdamW (reference/optim.py),
loss in fp32, attention through jax.nn.dot_product_attention (cuDNN when it accepts the case, else
XLA; the row says which), params/state donated.

  python tools/gpu_bench.py --sizes 124M,350M,1.5B --out results/gpu
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # GPT-2 family, T = 1024
    "124M": dict(n_layer=12, n_embd=768, n_head=12, batch=16),
    "350M": dict(n_layer=24, n_embd=1024, n_head=16, batch=16),
    "774M": dict(n_layer=36, n_embd=1280, n_head=20, batch=8),
    "1.5B": dict(n_layer=48, n_embd=1600, n_head=25, batch=8),
}
V, NPOS, T = 50257, 1024, 1024
PEAK_BF16 = 989e12
PEAK_SOURCE = "H100/H200 SXM datasheet dense bf16"


def model_cfg(size):
    s = SIZES[size]
    return dict(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"], vocab_size=V,
                n_positions=NPOS)


def write_weights(size: str, path: Path, seed: int = 0) -> None:
    """docs/model.md's initialisation scale per tensor (harness.init.init_rule), but the normal
    values are cycled from a pool of 2^24 float32 draws so that 1.5B parameters take seconds:
    these are timing weights (random, never zeros), not a parity fixture."""
    from harness.init import init_rule, write_safetensors
    from reference.gpt2 import GPTConfig, param_shapes

    cfg = model_cfg(size)
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 24, dtype=np.float32)
    pool2 = np.concatenate([pool, pool])
    start = 0
    tensors = {}
    for name, shape in param_shapes(GPTConfig(**cfg)).items():
        kind, std = init_rule(name, cfg["n_layer"])
        if kind == "normal":
            n = int(np.prod(shape))
            window = pool2[start:start + min(n, pool.size)]
            a = (window.copy() if n <= pool.size else np.resize(window, n)).reshape(shape)
            start = (start + 7919) % pool.size
            a *= np.float32(std)
        else:
            a = np.full(shape, 1.0 if kind == "ones" else 0.0, np.float32)
        tensors[name] = a
    write_safetensors(path, tensors)


def batches(size: str, n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    B = SIZES[size]["batch"]
    ids = rng.integers(0, V, size=(n, 2, B, T), dtype=np.int32)
    return ids


def side_engine(size, weights, warmup, steps, profile=False):
    """Two timings on one model: `train_step` through the ABI as it is (zero_grad, forward +
    backward, norm, AdamW), and the device path alone (forward_backward + optimizer_step without
    zero_grad: the gradients then accumulate across steps, which timing does not see; zero_grad
    itself is lazy on the GPU and writes nothing)."""
    from harness import engine

    B = SIZES[size]["batch"]
    t0 = time.perf_counter()
    m = engine.Model(backend="cuda", dtype="bf16", batch_size=B, seq_len=T, **model_cfg(size))
    m.load_safetensors(weights)
    setup_s = time.perf_counter() - t0
    ids = batches(size, 4)
    losses, times, dev_times = [], [], []
    for i in range(warmup + steps):
        x, y = ids[i % len(ids)]
        t = time.perf_counter()
        loss, _ = m.train_step(x, y)  # returns after AdamW is done on the device
        dt = time.perf_counter() - t
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
    for i in range(warmup + steps):
        x, y = ids[i % len(ids)]
        t = time.perf_counter()
        m.forward_backward(x, y, 1.0)
        m.optimizer_step()  # synchronises: AdamW is done on the device when it returns
        dt = time.perf_counter() - t
        if i >= warmup:
            dev_times.append(dt)
    t = time.perf_counter()
    m.zero_grad()
    zero_s = time.perf_counter() - t
    m.close()
    prof = None
    if profile:  # a separate, short run: the events perturb the timing a little
        path = Path("/tmp") / f"tandem_prof_{size}.tsv"
        os.environ["TANDEM_CUDA_PROFILE"] = str(path)
        m = engine.Model(backend="cuda", dtype="bf16", batch_size=B, seq_len=T,
                         **model_cfg(size))
        m.load_safetensors(weights)
        for i in range(4):
            x, y = ids[i % len(ids)]
            m.forward_backward(x, y, 1.0)
            m.optimizer_step()
        m.close()
        del os.environ["TANDEM_CUDA_PROFILE"]
        prof = path.read_text() if path.exists() else "no profile written"
    return dict(side="engine", step_s=times, device_step_s=dev_times, losses=losses,
                setup_s=setup_s, zero_grad_s=zero_s, profile=prof,
                attention=os.environ.get("TANDEM_CUDA_ATTENTION") or "default",
                note="Tandem CUDA engine, bf16 compute, fp32 master weights; attention: "
                     + {"flash": "flash.cu (FlashAttention-2 kernels for head sizes 16-64)",
                        "store": "materialised (cuBLASLt batched products + softmax kernels), "
                                 "kept per layer",
                        "recompute": "materialised, recomputed in the backward"}.get(
                         os.environ.get("TANDEM_CUDA_ATTENTION", ""),
                         "the engine's default (bf16, head size 16-64: flash.cu's "
                         "FlashAttention-2 kernels on the heads in place)"))


def side_jax(size, weights, warmup, steps):
    import jax
    import jax.numpy as jnp

    from harness.init import read_safetensors
    from reference import gpt2, ops
    from reference.optim import AdamWConfig, adamw_init, adamw_update

    cfg = gpt2.GPTConfig(**model_cfg(size))
    opt = AdamWConfig()

    def make(impl):
        def attention(qkv_BT3C, n_head):
            B_, T_, C3 = qkv_BT3C.shape
            C = C3 // 3
            q, k, v = (t.reshape(B_, T_, n_head, C // n_head)
                       for t in jnp.split(qkv_BT3C, 3, axis=-1))
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
            return o.reshape(B_, T_, C)

        def block(p, x_BTC):
            a = ops.layernorm(x_BTC, p["ln_1.weight"], p["ln_1.bias"])
            qkv = ops.matmul(a, p["attn.c_attn.weight"], p["attn.c_attn.bias"])
            x_BTC = x_BTC + ops.matmul(attention(qkv, cfg.n_head), p["attn.c_proj.weight"],
                                       p["attn.c_proj.bias"])
            a = ops.layernorm(x_BTC, p["ln_2.weight"], p["ln_2.bias"])
            h = ops.gelu(ops.matmul(a, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"]))
            return x_BTC + ops.matmul(h, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])

        def loss32(params32, x, y):
            p16 = {k: v.astype(jnp.bfloat16) for k, v in params32.items()}
            h = gpt2.embed(p16, x)
            for i in range(cfg.n_layer):
                h = block(gpt2.layer_params(p16, i), h)
            logits = gpt2.head(p16, h).astype(jnp.float32)
            return ops.softmax_cross_entropy(logits, y)

        def step(params, state, x, y):
            loss, grads = jax.value_and_grad(loss32)(params, x, y)
            params, state, norm = adamw_update(params, grads, state, opt)
            return params, state, loss, norm

        return jax.jit(step, donate_argnums=(0, 1))

    t0 = time.perf_counter()
    params = {k: jnp.asarray(v) for k, v in read_safetensors(weights).items()}
    state = adamw_init(params)
    ids = [(jnp.asarray(a[0]), jnp.asarray(a[1])) for a in batches(size, 4)]
    setup_s = time.perf_counter() - t0
    impl_used, err = None, None
    for impl in ("cudnn", None):
        try:
            step = make(impl)
            t = time.perf_counter()
            compiled = step.lower(params, state, *ids[0]).compile()
            compile_s = time.perf_counter() - t
            impl_used = impl or "default (XLA)"
            break
        except Exception as exc:  # noqa: BLE001 - try the next implementation, keep the reason
            err = f"{type(exc).__name__}: {str(exc)[:300]}"
    if impl_used is None:
        raise RuntimeError(f"no JAX attention implementation compiled: {err}")
    losses, times = [], []
    for i in range(warmup + steps):
        x, y = ids[i % len(ids)]
        t = time.perf_counter()
        params, state, loss, _ = compiled(params, state, x, y)
        jax.block_until_ready((params, loss))
        dt = time.perf_counter() - t
        losses.append(float(loss))
        if i >= warmup:
            times.append(dt)
    return dict(side="jax", step_s=times, losses=losses, setup_s=setup_s, compile_s=compile_s,
                attention=impl_used, jax=jax.__version__,
                note=f"JAX {jax.__version__}, bf16 compute (params cast in the step), fp32 "
                     f"master weights and AdamW, dot_product_attention implementation={impl_used}"
                     + (f" (cudnn failed: {err})" if impl_used != "cudnn" and err else ""))


def run_side(side, size, weights, warmup, steps, timeout, profile=""):
    cmd = [sys.executable, __file__, "--side", side, "--sizes", size, "--weights", str(weights),
           "--warmup", str(warmup), "--steps", str(steps), "--profile", profile]
    env = dict(os.environ)
    if side == "jax":  # let XLA take what the 80 GB of an H100 allow (default: 75%)
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return dict(side=side, error=f"timed out after {timeout} s")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return dict(side=side, error=f"exit {p.returncode}: {(p.stderr or p.stdout)[-1500:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="124M")
    ap.add_argument("--sides", default="engine,jax")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--side", choices=["engine", "jax"], help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--profile", default="124M", help="sizes whose engine run also records a "
                    "per-phase device-time profile (comma-separated, '' for none)")
    args = ap.parse_args(argv)

    if args.side:  # worker
        if args.side == "engine":
            r = side_engine(args.sizes, args.weights, args.warmup, args.steps,
                            args.sizes in args.profile.split(","))
        else:
            r = side_jax(args.sizes, args.weights, args.warmup, args.steps)
        print(json.dumps(r), flush=True)
        return 0

    from harness.flops import flops_per_token

    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    rows, raw = [], []
    for size in args.sizes.split(","):
        weights = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp") / f"tandem_{size}.safetensors"
        t = time.perf_counter()
        write_weights(size, weights)
        print(f"[{size}] weights written in {time.perf_counter() - t:.1f} s", flush=True)
        cfg = model_cfg(size)
        fpt = flops_per_token(cfg["n_layer"], cfg["n_embd"], V, NPOS, T)
        tokens = SIZES[size]["batch"] * T
        res = {}
        for side in args.sides.split(","):
            r = run_side(side, size, weights, args.warmup, args.steps, args.timeout, args.profile)
            r["size"] = size
            raw.append(r)
            res[side] = r
            if "error" in r:
                print(f"[{size}] {side}: ERROR {r['error']}", flush=True)
                continue
            variants = [(side, r["step_s"])]
            if side == "engine":
                variants = [("engine (ABI train_step)", r["step_s"]),
                            ("engine (device path)", r["device_step_s"])]
                if r.get("profile"):
                    print(f"[{size}] engine device-time profile per step:\n{r['profile']}", flush=True)
            for label, st in variants:
                rows.append(make_row(size, label, st, r, tokens, fpt, gpu))
        ej = [x for x in rows if x["size"] == size]
        jax_rows = [x for x in ej if x["side"] == "jax"]
        if jax_rows:
            for row in ej:
                row["engine_over_jax"] = jax_rows[0]["median_step_ms"] / row["median_step_ms"]
        weights.unlink(missing_ok=True)
        write_out(args.out, rows, raw)  # after every size: a later timeout keeps these
    print_table(rows, gpu, args)
    return 0 if rows else 1


def write_out(out, rows, raw):
    if not out:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(dict(rows=rows, raw=raw), indent=1))
    with open(out / "bench.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r})
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def make_row(size, side, step_s, r, tokens, fpt, gpu):
    med = statistics.median(step_s)
    tps = tokens / med
    row = dict(size=size, side=side, batch=SIZES[size]["batch"], seq_len=T,
               tokens_per_step=tokens, median_step_ms=1e3 * med, min_step_ms=1e3 * min(step_s),
               max_step_ms=1e3 * max(step_s), timed_steps=len(step_s), tokens_per_s=tps,
               flops_per_token=fpt, mfu=fpt * tps / PEAK_BF16, peak_flops=PEAK_BF16,
               peak_source=PEAK_SOURCE, first_loss=r["losses"][0], last_loss=r["losses"][-1],
               device=gpu, note=r.get("note", ""))
    print(f"[{size}] {side}: {1e3 * med:.1f} ms/step, {tps:,.0f} tok/s, MFU {100 * row['mfu']:.1f}%,"
          f" loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", flush=True)
    return row


def print_table(rows, gpu, args):
    print()
    print(f"device: {gpu}; peak {PEAK_BF16 / 1e12:.0f} TFLOP/s ({PEAK_SOURCE}); T={T}; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print("| size | side | B | ms/step | tokens/s | MFU | engine/JAX |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['engine_over_jax']:.2f}x" if "engine_over_jax" in r else ""
        print(f"| {r['size']} | {r['side']} | {r['batch']} | {r['median_step_ms']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
