"""The JAX side of `tandem bench`: a worker process (`python -m harness.bench_jax`) per case,
started with the devices the case needs (XLA_FLAGS host device count, set before JAX starts) and
driven over stdin/stdout one JSON line at a time, so engine and JAX blocks alternate while each
side stays warm. Not here: the engine, statistics and records (harness/bench.py).
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

# Protocol (requests from bench.py -> replies from this worker):
#   {"op": "setup", "case": {...}, "data": PATH.npz, "weights": PATH.safetensors, "warmup": W,
#    "steps": K, "min_block_s": S, "max_steps": N}
#       -> {"ok": true, "baseline": ..., "baseline_note": ..., "compile_s", "first_call_s",
#           "calib_step_s", "compilations", "devices", "base_rss_bytes", "loss"}
#   {"op": "block"}   -> {"ok": true, "step_s": [...], "peak_mem_bytes", "peak_mem_source", "loss"}
#   {"op": "peak"}    -> {"ok": true, "gpu_gemm_peak": {...}}  (envinfo.measure_gpu_peak)
#   {"op": "quit"}    -> the worker exits 0
# Any failure -> {"ok": false, "error": "...", "traceback": "..."} and the worker keeps serving.

PROTOCOL_VERSION = 1


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


class _Side:
    """The JAX state of one case: the step function, parameters, optimizer state, batches."""

    def __init__(self, req: dict[str, Any]):
        import jax
        import jax.numpy as jnp

        from harness.init import read_safetensors
        from reference.gpt2 import GPTConfig
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
        cfg = GPTConfig(**{k: int(c["model"][k]) for k in
                           ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")})
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
        self.step, self.baseline, self.baseline_note = self._make_step(
            cfg, opt, c, (params, state, xs[0], ys[0]))
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

    def _make_step(self, cfg, opt, c, example):
        """(jitted step, baseline label, note). GPipe over P devices for pipelined cases when it
        can run, else the single-device step with gradient accumulation over M micro-batches
        (on a GPU, for a pipelined case: the fewest micro-batches whose step fits the device,
        JAX's best setting, since the engine's M is a pipeline parameter). Parameters and
        optimizer state are donated: the step updates them in place."""
        step, label, note = self._make_step_inner(cfg, opt, c, example)
        if not hasattr(step, "lower"):  # already compiled (the fitting search)
            return step, label, note
        return self.jax.jit(step, donate_argnums=(0, 1)), label, note + "; params and " \
            "optimizer state donated"

    def _fitting_step(self, make, M: int, example):
        """The compiled step of the fewest micro-batches m (a divisor of the batch, m <= M)
        whose compiled memory (arguments + outputs + temporaries - aliased) fits in 90% of the
        device's memory; (compiled step, m, what it needs, the limit)."""
        jax = self.jax
        B = int(example[2].shape[0])
        limit = int((self.devices[0].memory_stats() or {}).get("bytes_limit", 0))
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), example)
        last = None
        for m in [d for d in range(1, M + 1) if M % d == 0 and B % d == 0]:
            t0 = time.perf_counter()
            compiled = jax.jit(make(m), donate_argnums=(0, 1)).lower(*shapes).compile()
            self.aot_compile_s += time.perf_counter() - t0
            ma = compiled.memory_analysis()
            need = None if ma is None else int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                                               + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
            last = (compiled, m, need, limit)
            if need is None or not limit or need <= 0.9 * limit:
                return last
        return last

    def _make_step_inner(self, cfg, opt, c, example):
        from reference.pipeline import make_gpipe_loss_and_grads, make_gpipe_train_step

        M, P = self.microbatches, self.stages
        note = ""
        if P > 1:
            why = None
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
            label = "single-device (fallback)"
            if self.backend == "cuda":
                step, m, need, limit = self._fitting_step(
                    lambda m: self._single_step(cfg, opt, m), M, example)
                fit = (f"needs {need / 2**30:.1f} of {limit / 2**30:.1f} GiB" if need and limit
                       else "memory analysis unavailable")
                note = (f"single-device JAX at the same global batch, gradient accumulation over "
                        f"{m} micro-batch(es) (the fewest that fit: {fit}; the engine pipelines "
                        f"{M}) instead of the JAX GPipe baseline: {why}; params and optimizer "
                        "state donated")
                return step, label, note + self._dtype_note()
            note = (f"single-device JAX (gradient accumulation over {M} micro-batches) instead "
                    f"of the JAX GPipe baseline: {why}")
        else:
            label = "single-device"
            note = f"single-device JAX step, gradient accumulation over {M} micro-batch(es)"
        return self._single_step(cfg, opt, M), label, note + self._dtype_note()

    def _single_step(self, cfg, opt, M):
        """The single-device step over M micro-batches, in the case's dtype (jitted)."""
        from reference.train import make_train_step

        if self.dtype == "bf16":
            return self._bf16_single_step(cfg, opt, M)
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
    def _bf16_single_step(self, cfg, opt, M):
        """reference/ computes in the parameters' dtype and has no mixed-precision path: the cast
        lives here. Forward/backward in bf16 on a bf16 copy of the fp32 master weights; logits
        upcast to fp32 for the cross-entropy; gradients arrive in fp32 through the cast's
        transpose; accumulation over micro-batches and AdamW in fp32 (docs/model.md order)."""
        jax, jnp = self.jax, self.jax.numpy
        from reference import gpt2, ops
        from reference.optim import adamw_update
        from reference.train import as_microbatches

        def loss32(params32, x_BT, y_BT):
            p16 = {k: v.astype(jnp.bfloat16) for k, v in params32.items()}
            x_BTC = gpt2.embed(p16, x_BT)
            for i in range(gpt2.n_layers(p16)):
                x_BTC = gpt2.block(gpt2.layer_params(p16, i), x_BTC, cfg.n_head)
            logits_BTV = gpt2.head(p16, x_BTC).astype(jnp.float32)
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
        calls = [self.one_step(b) for b in self.order_untimed]
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
                "loss": float(self._last_loss)}

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
        """GPU: the allocator's peak bytes in use, summed over the devices the step uses.
        CPU: the worker's RSS high-water mark (JAX runtime included, like the engine's process)."""
        if self.backend == "cuda":
            total = 0
            for d in self.devices[:max(1, self.stages)]:
                stats = d.memory_stats() or {}
                total += int(stats.get("peak_bytes_in_use", 0))
            return total, "JAX device allocator peak_bytes_in_use (sum over devices)"
        return rss_high_water_bytes()


def serve(inp, out) -> int:
    """Answer requests from `inp` on `out` until "quit" or end of input."""
    side: _Side | None = None

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    for line in inp:
        if not line.strip():
            continue
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
        except Exception as exc:  # noqa: BLE001 - every failure goes back to bench.py
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()})
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
