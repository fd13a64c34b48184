"""The JAX side of `tandem bench`: a worker process (`python -m harness.bench_jax`) per case,
started with the devices the case needs (XLA_FLAGS host device count, set before JAX starts) and
driven over stdin/stdout one JSON line at a time, so engine and JAX blocks alternate while each
side stays warm. Not here: the engine, statistics and records (harness/bench.py and its parts
bench_sides.py, which drives this worker, bench_case.py, bench_records.py).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

# Protocol (requests from bench_sides.JaxWorker -> replies from this worker):
#   {"op": "setup", "case": {...}, "data": PATH.npz, "weights": PATH.safetensors, "warmup": W,
#    "steps": K, "min_block_s": S, "max_steps": N, "variant": "plain" | "remat" | "accum"}
#       -> {"ok": true, "baseline": ..., "baseline_note": ..., "compile_s", "first_call_s",
#           "calib_step_s", "compilations", "devices", "base_rss_bytes", "loss", "micro_batches",
#           "need_bytes", "limit_bytes"}
#     variant: plain = the case's own step; remat = the same with jax.checkpoint around every
#     transformer block; accum = gradient accumulation over more micro-batches at the same global
#     batch (the fewest that fit). A step that does not fit the device (compiled memory analysis
#     above the limit, or RESOURCE_EXHAUSTED when it runs) answers
#       -> {"ok": false, "error": "...", "oom": {"variant", "batch", "micro_batches",
#           "asked_bytes", "limit_bytes", "message"}}
#   {"op": "block"}   -> {"ok": true, "step_s": [...], "peak_mem_bytes", "peak_mem_source", "loss"}
#   {"op": "peak"}    -> {"ok": true, "gpu_gemm_peak": {...}}  (envinfo.measure_gpu_peak)
#   {"op": "quit"}    -> the worker exits 0
# Any failure -> {"ok": false, "error": "...", "traceback": "..."} and the worker keeps serving.

PROTOCOL_VERSION = 2
VARIANTS = ("plain", "remat", "accum")
# A memory limit for JAX's step in bytes, applied to the compiled memory analysis on any backend
# (the device's own limit applies on a GPU anyway): lets a CPU run exercise the out-of-memory
# path, and caps JAX on a shared GPU.
MEMORY_LIMIT_ENV = "TANDEM_JAX_MEMORY_LIMIT"


class JaxOutOfMemory(RuntimeError):
    """JAX's step of one variant does not fit: `info` is the protocol's "oom" object."""

    def __init__(self, message: str, info: dict[str, Any]):
        super().__init__(message)
        self.info = info


def _is_oom_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _asked_bytes(message: str) -> int | None:
    """The allocation size in an XLA out-of-memory message ("... allocate 9.30GiB ..." or
    "... allocate 9987654321 bytes ...")."""
    import re

    m = re.search(r"allocat\w*\s+([\d.]+)\s*([KMGT]i?B|bytes|B)\b", message)
    if not m:
        return None
    scale = {"B": 1, "bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
             "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[m.group(2)]
    return int(float(m.group(1)) * scale)


def _vm_kib(field: str) -> int | None:
    """A Vm* field of /proc/self/status in KiB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_high_water_bytes() -> tuple[int, str]:
    """The RSS high-water mark of this process: VmHWM on Linux, else ru_maxrss."""
    kib = _vm_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "VmHWM (process RSS high-water mark)"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def _stage_mesh(devices):
    """The one-axis ("stage") mesh reference.pipeline builds over `devices`, with Auto axes
    where this JAX has axis types, so that a sharding on it equals the step's output sharding."""
    import jax

    axis_type = getattr(jax.sharding, "AxisType", None)
    try:
        return jax.sharding.Mesh(np.asarray(devices), ("stage",), axis_types=(axis_type.Auto,))
    except (AttributeError, TypeError):  # jax without axis types
        return jax.sharding.Mesh(np.asarray(devices), ("stage",))


def _model_config(model: dict):
    """The reference's config of a case's model (dataclasses.asdict of config.ModelConfig): a
    GPTConfig, or a LlamaConfig for family = "llama"."""
    from reference.gpt2 import GPTConfig
    from reference.llama import LlamaConfig

    shape = {k: int(model[k]) for k in ("n_layer", "n_embd", "n_head", "vocab_size",
                                        "n_positions")}
    if model.get("family", "gpt2") != "llama":
        return GPTConfig(**shape)
    return LlamaConfig(**shape, n_kv_head=int(model["n_kv_head"]), ffn_dim=int(model["ffn_dim"]),
                       rope_theta=float(model["rope_theta"]), norm_eps=float(model["norm_eps"]))


class _Side:
    """The JAX state of one case: the step function, parameters, optimizer state, batches."""

    def __init__(self, req: dict[str, Any]):
        import jax
        import jax.numpy as jnp

        from harness.init import read_safetensors
        from reference.optim import AdamWConfig, adamw_init

        c = req["case"]
        self.jax = jax
        self.backend, self.dtype = c["backend"], c["dtype"]
        self.stages, self.microbatches = int(c["stages"]), int(c["microbatches"])
        if self.backend == "cuda":
            try:
                gpus = jax.devices("gpu")
            except RuntimeError:
                gpus = []
            if not gpus:
                raise RuntimeError(
                    f"backend = 'cuda' but JAX sees no GPU (jax.devices(): {jax.devices()}). "
                    "HINT: install jax with CUDA support (pip install 'jax[cuda13]') on a GPU host")
            self.devices = gpus
            if self.dtype == "bf16":
                # JAX at its best on a GPU: cuDNN's fused attention (FACTS.md's anchors)
                from reference.ops import set_attention_implementation
                set_attention_implementation("cudnn")
                self.attention = "cudnn"
        else:
            self.devices = jax.devices("cpu")
        self.base_rss = (_vm_kib("VmRSS") or 0) * 1024
        if self.dtype == "fp32":
            # true fp32 matmuls (on GPUs JAX would use TF32): the engine computes in fp32
            jax.config.update("jax_default_matmul_precision", "highest")
        cfg = _model_config(c["model"])
        opt = AdamWConfig(**{k: float(c["optim"][k]) for k in
                             ("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip")})
        self.mesh = None
        params = {k: jnp.asarray(v) for k, v in read_safetensors(req["weights"]).items()}
        data = np.load(req["data"])
        # every batch is on the device before any clock starts: transfers are not timed
        xs = [jnp.asarray(a) for a in data["inputs_SBT"]]
        ys = [jnp.asarray(a) for a in data["targets_SBT"]]
        state = adamw_init(params)
        self.aot_compile_s = 0.0
        self.variant = req.get("variant", "plain")
        self.micro_batches, self.need_bytes, self.limit_bytes = self.microbatches, None, None
        self.step, self.baseline, self.baseline_note = self._make_step(
            cfg, opt, c, (params, state, xs[0], ys[0]), self.variant)
        if self.mesh is not None:
            # GPipe: inputs replicated on the stage mesh up front. Its outputs come back with
            # that sharding; inputs on one device would make the second call compile again.
            rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            params, state, xs, ys = jax.device_put((params, state, xs, ys), rep)
        self.params, self.state, self.x, self.y = params, state, xs, ys
        self.order_untimed = [int(i) for i in data["untimed_order"]]
        self.order_timed = [int(i) for i in data["timed_order"]]
        # compile events (trace, lowering, backend compile), to attribute compile time to the
        # call that paid it and to notice a recompilation inside a timed block
        self.compile_events: list[float] = []
        self.recompiled_in_block = 0
        monitoring = getattr(jax, "monitoring", None)
        self.monitored = monitoring is not None and hasattr(
            monitoring, "register_event_duration_secs_listener")
        if self.monitored:
            monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, secs: float, **_kw) -> None:
        if name.startswith("/jax/core/compile/"):
            self.compile_events.append(float(secs))

    def _make_step(self, cfg, opt, c, example, variant):
        """(step, baseline label, note). GPipe over P devices for pipelined cases when it can
        run (variant plain), else a single-device step compiled ahead of time with its memory
        checked against the limit (`_fitting_step`). Parameters and optimizer state are
        donated: the step updates them in place."""
        step, label, note = self._make_step_inner(cfg, opt, c, example, variant)
        if not hasattr(step, "lower"):  # already compiled (the fitting search)
            return step, label, note
        return self.jax.jit(step, donate_argnums=(0, 1)), label, note + "; params and " \
            "optimizer state donated"

    def _limit(self) -> int:
        """Bytes the step may need: 90% of the device's bytes_limit on a GPU (the rest is the
        allocator's slack) and $TANDEM_JAX_MEMORY_LIMIT when set, the smaller; 0 = unknown."""
        limits = []
        if self.backend == "cuda":
            dev = int((self.devices[0].memory_stats() or {}).get("bytes_limit", 0))
            if dev:
                limits.append(int(0.9 * dev))
        raw = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
        if raw:
            try:
                limits.append(int(float(raw)))
            except ValueError:
                raise ValueError(f"{MEMORY_LIMIT_ENV}={raw!r}: not a number of bytes") from None
        return min(limits) if limits else 0

    def _fitting_step(self, make, candidates: list[int], example, variant: str):
        """The compiled step of the first micro-batch count m in `candidates` whose compiled
        memory (arguments + outputs + temporaries - aliased) fits the limit: (compiled step, m,
        what it needs, the limit). Raises JaxOutOfMemory, with what the first candidate asked,
        when none fits."""
        jax = self.jax
        limit = self._limit()
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), example)
        tried = []
        for m in candidates:
            t0 = time.perf_counter()
            compiled = jax.jit(make(m), donate_argnums=(0, 1)).lower(*shapes).compile()
            self.aot_compile_s += time.perf_counter() - t0
            ma = compiled.memory_analysis()
            need = None if ma is None else int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                                               + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
            if need is None or not limit or need <= limit:
                return compiled, m, need, limit
            tried.append((m, need))
        B = int(example[2].shape[0])
        m0, need0 = tried[0]
        msg = (f"out of memory at B{B}: the {variant} step over {m0} micro-batch(es) needs "
               f"{_fmt_bytes(need0)}, the limit is {_fmt_bytes(limit)}")
        if len(tried) > 1:
            msg += f" (also too big over {', '.join(str(m) for m, _ in tried[1:])} micro-batches)"
        raise JaxOutOfMemory(msg, {"variant": variant, "batch": B,
                                   "micro_batches": [m for m, _ in tried], "asked_bytes": need0,
                                   "limit_bytes": limit, "message": msg})

    def _make_step_inner(self, cfg, opt, c, example, variant):
        from reference.pipeline import make_gpipe_loss_and_grads, make_gpipe_train_step

        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
        M, P = self.microbatches, self.stages
        B = int(example[2].shape[0])
        why = None
        if P > 1 and variant == "plain":
            if cfg.n_layer % P:
                why = f"n_layer = {cfg.n_layer} is not divisible by stages = {P}"
            elif len(self.devices) < P:
                why = (f"{P} stages need {P} devices, JAX sees {len(self.devices)} "
                       f"{self.backend} device(s)")
            elif c.get("uneven_layers"):
                why = "an explicit uneven layer split (the GPipe baseline splits evenly)"
            if why is None:
                try:
                    devs = self.devices[:P]
                    self.mesh = _stage_mesh(devs)
                    if self.dtype == "bf16":
                        step = self._bf16_gpipe_step(make_gpipe_loss_and_grads(cfg, P, M, devs),
                                                     opt)
                    else:
                        step = make_gpipe_train_step(cfg, opt, P, M, devs)
                    label = f"gpipe-shard_map P={P} ({self.backend})"
                    note = (f"JAX GPipe (reference.pipeline, shard_map + ppermute) over {P} "
                            f"{self.backend} devices, {M} micro-batches; the engine runs "
                            f"schedule {c['schedule']!r}")
                    if self.dtype == "bf16":
                        note += ("; bf16: parameters cast to bf16 inside the step, the pipelined "
                                 "loss and gradients in bf16, AdamW on fp32 master weights")
                    return step, label, note
                except Exception as exc:  # noqa: BLE001 - fall back, and say why
                    self.mesh = None
                    why = f"the GPipe baseline failed to build: {type(exc).__name__}: {exc}"
        divisors = [d for d in range(1, B + 1) if B % d == 0]
        if variant == "accum":
            # more micro-batches than the case's at the same global batch: the fewest that fit
            candidates = [d for d in divisors if d > M]
            if not candidates:
                raise ValueError(f"variant accum: the batch of {B} is already split into {M} "
                                 "micro-batches of one sequence")
        elif P > 1 and self.backend == "cuda":
            # a pipelined case on one GPU: the fewest micro-batches that fit (JAX's best
            # setting; the engine's M is a pipeline parameter)
            candidates = [d for d in divisors if d <= M and M % d == 0]
        else:
            candidates = [M]
        remat = variant == "remat"
        step, m, need, limit = self._fitting_step(
            lambda m: self._single_step(cfg, opt, m, remat), candidates, example, variant)
        self.micro_batches, self.need_bytes, self.limit_bytes = m, need, limit
        fit = (f"needs {_fmt_bytes(need)} of {_fmt_bytes(limit)}" if need and limit else
               f"needs {_fmt_bytes(need)}" if need else "memory analysis unavailable")
        if why is not None:
            label = "single-device (fallback)"
            note = (f"single-device JAX at the same global batch, gradient accumulation over {m} "
                    f"micro-batch(es) ({fit}) instead of the JAX GPipe baseline: {why}")
        else:
            label = "single-device"
            note = f"single-device JAX step, gradient accumulation over {m} micro-batch(es) ({fit})"
        if remat:
            label += " + remat"
            note += "; jax.checkpoint around every transformer block (activations recomputed)"
        elif variant == "accum":
            label += f" + accumulation over {m}"
            note += f"; {m} micro-batches instead of the case's {M}, at the same global batch"
        return step, label, note + "; params and optimizer state donated" + self._dtype_note()

    def _single_step(self, cfg, opt, M, remat: bool = False):
        """The single-device step over M micro-batches in the case's dtype: the reference's own
        step for plain fp32, else the same loss built here with bf16 casts and/or remat."""
        from reference.train import make_train_step

        if self.dtype == "bf16" or remat:
            return self._custom_single_step(cfg, opt, M, self.dtype == "bf16", remat)
        return make_train_step(cfg, opt, M)

    def _dtype_note(self) -> str:
        if self.dtype != "bf16":
            return ""
        note = ("; bf16 compute (parameters cast to bf16 inside the step, loss in fp32), fp32 "
                "master weights, gradients and AdamW")
        if getattr(self, "attention", None):
            note += f"; attention through jax.nn.dot_product_attention({self.attention!r})"
        return note

    # -- bf16 compute with fp32 master weights, around the reference functions -------------------
    def _custom_single_step(self, cfg, opt, M, bf16: bool, remat: bool):
        """reference/ computes in the parameters' dtype and has no mixed-precision or remat
        path: both live here. bf16: forward/backward on a bf16 copy of the fp32 master weights,
        logits upcast to fp32 for the cross-entropy, gradients back in fp32 through the cast's
        transpose. remat: jax.checkpoint around every block (its activations are recomputed in
        the backward). Accumulation over micro-batches and AdamW in fp32 (docs/model.md)."""
        jax, jnp = self.jax, self.jax.numpy
        from reference import gpt2, llama, ops
        from reference.optim import adamw_update
        from reference.train import as_microbatches

        if isinstance(cfg, llama.LlamaConfig):
            fam = llama
            def blk(p, x):
                return llama.block(p, x, cfg)

            def hd(p, x):
                return llama.head(p, x, cfg)
        else:
            fam = gpt2
            def blk(p, x):
                return gpt2.block(p, x, cfg.n_head)

            def hd(p, x):
                return gpt2.head(p, x)
        block = jax.checkpoint(blk) if remat else blk

        def loss32(params32, x_BT, y_BT):
            p = {k: v.astype(jnp.bfloat16) for k, v in params32.items()} if bf16 else params32
            x_BTC = fam.embed(p, x_BT)
            for i in range(fam.n_layers(p)):
                x_BTC = block(fam.layer_params(p, i), x_BTC)
            logits_BTV = hd(p, x_BTC).astype(jnp.float32)
            return ops.softmax_cross_entropy(logits_BTV, y_BT)

        grad_fn = jax.value_and_grad(loss32)

        def step(params, state, tokens, targets):
            x_MBT, y_MBT = as_microbatches(tokens, M), as_microbatches(targets, M)

            def acc(carry, batch):
                loss, grads = grad_fn(params, batch[0], batch[1])
                a_loss, a_grads = carry
                return (a_loss + loss / M, jax.tree.map(lambda a, g: a + g / M, a_grads,
                                                        grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(acc, zeros, (x_MBT, y_MBT))
            params, state, norm = adamw_update(params, grads, state, opt)
            return params, state, loss, norm

        return jax.jit(step)

    def _bf16_gpipe_step(self, loss_and_grads, opt):
        jax, jnp = self.jax, self.jax.numpy
        from reference.optim import adamw_update

        def step(params, state, tokens, targets):
            p16 = {k: v.astype(jnp.bfloat16) for k, v in params.items()}
            loss, g16 = loss_and_grads(p16, tokens, targets)
            grads = {k: g.astype(jnp.float32) for k, g in g16.items()}
            params, state, norm = adamw_update(params, grads, state, opt)
            return params, state, loss.astype(jnp.float32), norm

        return jax.jit(step)

    # -- timing --------------------------------------------------------------------------------
    def one_step(self, batch: int) -> tuple[float, bool]:
        """One optimizer step on batch `batch`: (wall seconds including the device sync, whether
        JAX compiled anything during it)."""
        n_events = len(self.compile_events)
        t0 = time.perf_counter()
        out = self.step(self.params, self.state, self.x[batch], self.y[batch])
        self.jax.block_until_ready(out)  # on GPU too: the clock is read after the device is done
        dt = time.perf_counter() - t0
        self.params, self.state = out[0], out[1]
        self._last_loss = out[2]
        return dt, len(self.compile_events) > n_events

    def setup(self, req: dict[str, Any]) -> dict[str, Any]:
        """First call (trace + compile + one step), then the untimed warm-up steps.

        compile_s = the first call minus the median steady step, plus the same excess for any
        later untimed call during which JAX compiled again (seen through jax.monitoring)."""
        try:
            calls = [self.one_step(b) for b in self.order_untimed]
        except Exception as exc:  # noqa: BLE001 - out of memory is a result, the rest re-raised
            if not _is_oom_error(exc):
                raise
            B = int(self.x[0].shape[0])
            text = f"{type(exc).__name__}: {exc}"
            msg = (f"out of memory at B{B} running the {self.variant} step over "
                   f"{self.micro_batches} micro-batch(es): {text.splitlines()[0][:300]}")
            raise JaxOutOfMemory(msg, {"variant": self.variant, "batch": B,
                                       "micro_batches": [self.micro_batches],
                                       "asked_bytes": _asked_bytes(text),
                                       "limit_bytes": self.limit_bytes, "message": msg}) from None
        steady_calls = [t for t, compiled in calls[1:] if not compiled] or \
            [t for t, _ in calls[1:]]
        steady = statistics.median(steady_calls)
        compile_s = self.aot_compile_s + sum(max(t - steady, 0.0) for i, (t, compiled) in
                                             enumerate(calls) if i == 0 or compiled)
        self.min_steps, self.max_steps = int(req["steps"]), int(req["max_steps"])
        self.min_block_s = float(req["min_block_s"])
        return {"compile_s": compile_s, "first_call_s": calls[0][0], "calib_step_s": steady,
                "compilations": sum(1 for i, (_, c) in enumerate(calls) if c or i == 0),
                "compile_events_s": sum(self.compile_events) if self.monitored else None,
                "baseline": self.baseline,
                "baseline_note": self.baseline_note, "base_rss_bytes": self.base_rss,
                "devices": [str(d) for d in self.devices[:max(1, self.stages)]],
                "loss": float(self._last_loss), "variant": self.variant,
                "micro_batches": self.micro_batches, "need_bytes": self.need_bytes,
                "limit_bytes": self.limit_bytes}

    def block(self) -> dict[str, Any]:
        """A timed block: at least `steps` steps, and more until it has lasted min_block_s
        (at most max_steps); one clock reading per step."""
        timed = self.order_timed
        step_s: list[float] = []
        t0 = time.perf_counter()
        while len(step_s) < self.min_steps or (time.perf_counter() - t0 < self.min_block_s
                                               and len(step_s) < self.max_steps):
            dt, compiled = self.one_step(timed[len(step_s) % len(timed)])
            step_s.append(dt)
            self.recompiled_in_block += compiled
        mem, source = self.peak_memory()
        return {"step_s": step_s, "peak_mem_bytes": mem, "peak_mem_source": source,
                "recompiled_steps": self.recompiled_in_block, "loss": float(self._last_loss)}

    def peak_memory(self) -> tuple[int, str]:
        """GPU: the allocator's peak bytes in use, summed over the devices the step uses. CPU:
        the compiled step's own memory (XLA's buffer assignment, the counterpart of the engine's
        allocation counter); the worker's RSS high-water mark where that is unknown (GPipe)."""
        if self.backend == "cuda":
            total = 0
            for d in self.devices[:max(1, self.stages)]:
                stats = d.memory_stats() or {}
                total += int(stats.get("peak_bytes_in_use", 0))
            return total, "JAX device allocator peak_bytes_in_use (sum over devices)"
        if self.need_bytes:
            return self.need_bytes, ("XLA's compiled memory analysis of the step (arguments + "
                                     "outputs + temporaries - donated)")
        mem, src = rss_high_water_bytes()
        return mem, src + " of the JAX worker (JAX runtime included)"


def serve(inp, out) -> int:
    """Answer requests from `inp` on `out` until "quit" or end of input."""
    side: _Side | None = None

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    for line in inp:
        if not line.strip():
            continue
        req = None
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "quit":
                reply({"ok": True})
                return 0
            if op == "setup":
                side = _Side(req)
                reply({"ok": True, "protocol": PROTOCOL_VERSION, **side.setup(req)})
            elif op == "block":
                if side is None:
                    raise RuntimeError("'block' before 'setup'")
                reply({"ok": True, **side.block()})
            elif op == "peak":
                from harness.envinfo import measure_gpu_peak

                reply({"ok": True, "gpu_gemm_peak": measure_gpu_peak()})
            else:
                raise ValueError(f"unknown op {op!r}")
        except JaxOutOfMemory as exc:
            reply({"ok": False, "error": str(exc), "oom": exc.info})
        except Exception as exc:  # noqa: BLE001 - every failure goes back to bench.py
            err = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()}
            if _is_oom_error(exc):  # e.g. while compiling: a result, like the other OOMs
                req_ = req if isinstance(req, dict) else {}
                err["oom"] = {"variant": req_.get("variant", "plain"), "batch": None,
                              "micro_batches": [], "asked_bytes": _asked_bytes(str(exc)),
                              "limit_bytes": None, "message": err["error"][:500]}
            reply(err)
    return 0


def main() -> int:
    # The protocol owns the real stdout; anything else that prints (JAX, XLA, C libraries)
    # goes to stderr, which bench.py sends to a log file.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return serve(sys.stdin, proto)


if __name__ == "__main__":
    sys.exit(main())
