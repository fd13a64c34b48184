"""`tandem train`: train the engine for N steps, with checkpoints, resume and a NaN/inf guard.

One stage runs in-process through the binding (harness.engine.Model); a pipelined layout
(--stages > 1) runs `tandem-engine` under mpirun (harness.pipeline). Every K steps each stage's
training state (parameters, AdamW moments, step, data position) goes to
DIR/step_<8 digits>/stage<s>.safetensors, written atomically by the engine; --resume starts from
the newest step whose every stage file is there, and reads the same tokens from there on
(step s always trains on batch s of the run's fixed data). Not here: parity or timing
(tandem parity, tandem bench).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.config import CaseConfig, engine_model_keys, load_suite, stage_layers
from harness.data import batches, case_tokens, read_shard
from harness.errors import ConfigError, DataError, EngineError, TandemError
from harness.init import init_params, write_safetensors

ON_NONFINITE = ("stop", "skip")
STEP_DIR = re.compile(r"step_(\d{8})")
MANIFEST = "train.json"  # what the checkpoints in a directory were trained on


class NonFiniteError(TandemError):
    """Training reached a non-finite loss or gradient norm with --on-nonfinite stop."""

    exit_code = 3


def add_parser(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "examples:\n"
        "  tandem train --steps 20 --checkpoint-dir ckpt --checkpoint-every 5\n"
        "  tandem train --steps 40 --checkpoint-dir ckpt --checkpoint-every 5 --resume\n"
        "  tandem train --stages 2 --microbatches 2 --schedule zb-h1 --steps 20 --json\n"
        "exit codes: 0 trained; 2 bad input (suite, case, option, token file, checkpoint);\n"
        "3 an engine or rank failure, or a non-finite step with --on-nonfinite stop")
    p.add_argument("--suite", default="smoke", metavar="NAME|PATH",
                   help="suite holding the case (default %(default)s)")
    p.add_argument("--case", default="tiny", metavar="NAME",
                   help="case whose model, batch, optimizer, seed and data are used "
                        "(default %(default)s)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="optimizer steps in the whole run, resumed or not (default: the case's)")
    p.add_argument("--tokens", metavar="FILE", default=None,
                   help="a token shard (harness.data.write_shard format) to sample batches "
                        "from (default: the case's built-in data)")
    p.add_argument("--stages", type=int, default=None, metavar="P",
                   help="pipeline ranks (default: the case's; 1 trains in-process)")
    p.add_argument("--microbatches", type=int, default=None, metavar="M",
                   help="micro-batches per step (default: the case's)")
    p.add_argument("--schedule", default=None, metavar="NAME",
                   help="pipeline schedule: gpipe, 1f1b, interleaved, zb-h1 (default: the case's)")
    p.add_argument("--chunks", type=int, default=None, metavar="V",
                   help="model chunks per rank (interleaved; default: the case's)")
    p.add_argument("--backend", choices=("cpu", "cuda"), default=None,
                   help="engine backend (default: the case's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the case's)")
    p.add_argument("--grad-clip", type=float, default=None, metavar="X",
                   help="global-norm clip, 0 = off (default: the case's)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="engine OpenMP threads per stage (default 1; results are bit-identical "
                        "for a given thread count)")
    p.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="where checkpoints go (DIR/step_<8 digits>/stage<s>.safetensors) and "
                        "where --resume looks")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="write a checkpoint after every K-th step (default 0: never)")
    p.add_argument("--resume", action="store_true",
                   help="start from the newest complete checkpoint in --checkpoint-dir")
    p.add_argument("--on-nonfinite", choices=ON_NONFINITE, default="stop",
                   help="at a non-finite loss or gradient norm: stop (default; the message "
                        "names the step, the stage and the first non-finite tensor) or skip "
                        "(that step's update is not applied; skipped steps are counted)")
    p.add_argument("--work-dir", metavar="DIR", default=None,
                   help="pipelined runs: where the ranks' files go (default: a temporary "
                        "directory, removed afterwards)")
    p.add_argument("--progress-every", type=int, default=None, metavar="N",
                   help="print progress to stderr every N steps (default: about 10 lines per "
                        "run; 0 = none)")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on stdout: per-step losses and gradient "
                        "norms, skipped steps, checkpoints written, a digest of the final "
                        "parameters")


# ---- the run's settings --------------------------------------------------------------------------


def _case(args) -> CaseConfig:
    case = load_suite(args.suite).case(args.case)
    pipe = {k: v for k, v in (("stages", args.stages), ("microbatches", args.microbatches),
                              ("schedule", args.schedule), ("chunks", args.chunks))
            if v is not None}
    optim = {k: v for k, v in (("lr", args.lr), ("grad_clip", args.grad_clip)) if v is not None}
    top = {k: v for k, v in (("steps", args.steps), ("backend", args.backend)) if v is not None}
    try:  # the typed configs check every value and name the key
        if pipe:
            p = dataclasses.replace(case.pipeline, **pipe)
            if p.layers is not None and len(p.layers) != p.stages * p.chunks:
                p = dataclasses.replace(p, layers=None)
            case = dataclasses.replace(case, pipeline=p)
        if optim:
            case = dataclasses.replace(case, optim=dataclasses.replace(case.optim, **optim))
        if top:
            case = dataclasses.replace(case, **top)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tandem train: {exc}") from None
    return case


def _check_args(args) -> None:
    if args.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every}: must be >= 0 "
                          "(0 = no checkpoints)")
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: must be >= 0")
    if args.progress_every is not None and args.progress_every < 0:
        raise ConfigError(f"--progress-every {args.progress_every}: must be >= 0")
    if (args.checkpoint_every or args.resume) and not args.checkpoint_dir:
        what = "--resume" if args.resume else f"--checkpoint-every {args.checkpoint_every}"
        raise ConfigError(f"{what} needs --checkpoint-dir DIR")
    if args.resume and not Path(args.checkpoint_dir).is_dir():
        raise DataError(f"--resume: checkpoint directory {args.checkpoint_dir} does not exist")


def _data(case: CaseConfig, tokens_path: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(inputs_SBT, targets_SBT, description): batch s is the same whatever the run's length,
    so a resumed run reads exactly the tokens the uninterrupted one would."""
    if tokens_path:
        p = Path(tokens_path)
        if not p.is_file():
            raise DataError(f"--tokens {p}: no such file")
        tokens = read_shard(p, case.model.vocab_size)
        source = {"tokens": str(p.resolve()), "tokens_count": int(tokens.size)}
    else:
        tokens = case_tokens(case)
        source = {"data": case.data}
    x, y = batches(tokens, case.batch_size, case.seq_len, case.steps, case.seed)
    return x, y, source


def _manifest(case: CaseConfig, source: dict) -> dict:
    """What a checkpoint directory's states were trained on, beyond what the engine checks in
    every file (model, stage layout, optimizer): the batch, the seed and the data."""
    return {"case": case.name, "seq_len": case.seq_len, "batch_size": case.batch_size,
            "seed": case.seed, "microbatches": case.pipeline.microbatches,
            "schedule": case.pipeline.schedule, **source}


def _check_manifest(ckpt_dir: Path, want: dict) -> None:
    path = ckpt_dir / MANIFEST
    if not path.exists():
        return _write_manifest(ckpt_dir, want)
    try:
        got = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if not isinstance(got, dict):
        raise DataError(f"{path}: expected a JSON object")
    for key, value in want.items():
        if got.get(key) != value:
            raise DataError(f"{path}: the checkpoints here were trained with {key}="
                            f"{got.get(key)!r}, this run has {key}={value!r}. HINT: use the "
                            "same settings to resume, or another --checkpoint-dir")


def _write_manifest(ckpt_dir: Path, want: dict) -> None:
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(want, indent=1, sort_keys=True) + "\n")
    tmp.replace(ckpt_dir / MANIFEST)


def stage_files(step_dir: Path, n_stages: int) -> list[Path]:
    return [step_dir / f"stage{s}.safetensors" for s in range(n_stages)]


def newest_complete(ckpt_dir: Path, n_stages: int) -> tuple[int, Path] | None:
    """(step, directory) of the newest step_<8 digits> under ckpt_dir holding every stage's
    file; None when there is none. A stage file exists only whole (the engine renames a
    finished temporary file into place), so a writer killed mid-step leaves that step
    incomplete and the one before it is taken."""
    found = []
    for d in ckpt_dir.iterdir():
        m = STEP_DIR.fullmatch(d.name)
        if m and d.is_dir() and all(f.is_file() for f in stage_files(d, n_stages)):
            found.append((int(m.group(1)), d))
    return max(found) if found else None


# ---- engine models -----------------------------------------------------------------------------


def _model_config(case: CaseConfig, threads: int, **extra) -> dict:
    o = case.optim
    return dict(**engine_model_keys(case.model), seq_len=case.seq_len, threads=threads,
                lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                weight_decay=o.weight_decay, grad_clip=o.grad_clip, **extra)


def _validate_checkpoint(case: CaseConfig, step_dir: Path, step: int) -> None:
    """Every stage file of a checkpoint loaded into a CPU model of that stage: the engine's own
    checks (truncation, format, settings, tensors) before any rank starts. Bad files: exit 2."""
    from harness.engine import Model

    layers = stage_layers(case)
    n = len(layers)
    for s, path in enumerate(stage_files(step_dir, n)):
        begin = sum(layers[:s])
        extra = {} if n == 1 else dict(stage=s, stages=n, layer_begin=begin,
                                       layer_end=begin + layers[s])
        with Model(**_model_config(case, 1, batch_size=1, **extra)) as probe:
            try:
                pos = probe.load_checkpoint(path)
            except EngineError as exc:
                raise DataError(f"checkpoint refused: {exc}") from None
        if pos != step:
            raise DataError(f"checkpoint refused: {path} holds data position {pos}, but its "
                            f"directory says step {step}")


def params_digest(params: dict[str, np.ndarray]) -> str:
    """sha256 over the final parameters (sorted by name, fp32 bytes): equal digests = equal
    bits."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(params[name], dtype=np.float32).tobytes())
    return h.hexdigest()


class _Progress:
    def __init__(self, total: int, start: int, every: int | None):
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.every = max(1, (total - start) // 10) if every is None else every

    def step(self, step: int, loss: float, norm: float, skipped: int) -> None:
        done = step + 1
        if not self.every or (done - self.start) % self.every and done != self.total:
            return
        rate = (time.perf_counter() - self.t0) / max(done - self.start, 1)
        extra = f", {skipped} skipped" if skipped else ""
        print(f"tandem train: step {done}/{self.total}: loss {loss:.6f}, grad norm {norm:.4g} "
              f"({rate:.3f} s/step{extra})", file=sys.stderr, flush=True)


def _first_nonfinite_text(model) -> str:
    found = model.find_nonfinite()
    if found is None:
        return "no gradient or parameter holds a NaN or inf"
    return f"first non-finite tensor: the {found[0]} of '{found[1]}'"


def _train_one_stage(case, args, x, y, start, resume_dir, ckpt_dir, result):
    from harness.engine import Model

    model = Model(**_model_config(case, args.threads, batch_size=case.batch_size,
                                  backend=case.backend, dtype=case.dtype))
    with model:
        if resume_dir is not None:
            model.load_checkpoint(resume_dir / "stage0.safetensors")
        else:
            model.set_params(init_params([(p.name, p.shape) for p in model.table],
                                         case.model.n_layer, case.seed))
        M = case.pipeline.microbatches
        progress = _Progress(case.steps, start, args.progress_every)
        for step in range(start, case.steps):
            model.zero_grad()
            xm = x[step].reshape(M, -1, case.seq_len)
            ym = y[step].reshape(M, -1, case.seq_len)
            loss = float(np.mean([model.forward_backward(xm[i], ym[i], 1.0 / M)
                                  for i in range(M)]))
            sq = model.grad_sq_sum()  # on the device that holds the gradients
            norm = math.sqrt(sq) if math.isfinite(sq) else float("nan")
            if not (math.isfinite(loss) and math.isfinite(norm)):  # the cheap check
                if args.on_nonfinite == "stop":
                    what = "loss" if not math.isfinite(loss) else "gradient norm"
                    raise NonFiniteError(
                        f"step {step}: non-finite {what} (loss {loss:g}, gradient norm "
                        f"{norm:g}) on stage 0; {_first_nonfinite_text(model)}. HINT: lower "
                        "the learning rate, enable --grad-clip, or --on-nonfinite skip")
                result["skipped"].append(step)
            else:
                model.optimizer_step_with_norm(norm)
            result["step_index"].append(step)
            result["losses"].append(loss)
            result["grad_norms"].append(norm)
            if ckpt_dir is not None and args.checkpoint_every and \
                    (step + 1) % args.checkpoint_every == 0:
                d = ckpt_dir / f"step_{step + 1:08d}"
                d.mkdir(exist_ok=True)
                model.save_checkpoint(d / "stage0.safetensors", step + 1)
                result["checkpoints"].append(str(d))
            progress.step(step, loss, norm, len(result["skipped"]))
        return model.params()


def _train_pipelined(case, args, x, y, start, ckpt_dir, result):
    from harness import pipeline
    from harness.engine import Model

    why = pipeline.unavailable()
    if why:
        raise ConfigError(f"--stages {case.pipeline.stages} needs pipelined runs: {why}")
    keep = args.work_dir is not None
    work = Path(args.work_dir) if keep else Path(tempfile.mkdtemp(prefix="tandem-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with Model(**_model_config(case, 1, batch_size=1)) as probe:
            params = init_params([(p.name, p.shape) for p in probe.table], case.model.n_layer,
                                 case.seed)
        write_safetensors(work / "weights.safetensors", params)
        print(f"tandem train: {case.steps - start} steps on {case.pipeline.stages} ranks "
              f"({case.pipeline.schedule}, {case.pipeline.microbatches} micro-batches)"
              + (f" from step {start}" if start else ""), file=sys.stderr, flush=True)
        res = pipeline.run_pipeline(
            case, work / "weights.safetensors", x, y, work, threads=max(args.threads, 1),
            save_grads_step=-1, checkpoint_dir=ckpt_dir,
            checkpoint_every=args.checkpoint_every if ckpt_dir is not None else 0,
            resume_step=start, on_nonfinite=args.on_nonfinite,
            timeout=max(600.0, 60.0 * (case.steps - start)))
    finally:
        if not keep:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
    result["step_index"] = [int(s) for s in res.steps]
    result["losses"] = [float(v) for v in res.losses]
    result["grad_norms"] = [float(v) for v in res.grad_norms]
    if res.skipped is not None:
        result["skipped"] = [int(s) for s, k in zip(res.steps, res.skipped) if k]
    if ckpt_dir is not None and args.checkpoint_every:
        result["checkpoints"] = [str(ckpt_dir / f"step_{s + 1:08d}") for s in res.steps
                                 if (s + 1) % args.checkpoint_every == 0]
    return res.params


def _finite_or_none(v: float):
    return v if math.isfinite(v) else None


def run(args) -> int:
    _check_args(args)
    case = _case(args)
    x, y, source = _data(case, args.tokens)
    n_stages = case.pipeline.stages * case.pipeline.chunks
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    start, resume_dir = 0, None
    if ckpt_dir is not None:
        if ckpt_dir.exists() and not ckpt_dir.is_dir():
            raise DataError(f"--checkpoint-dir {ckpt_dir}: exists and is not a directory")
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _check_manifest(ckpt_dir, _manifest(case, source))
    if args.resume:
        found = newest_complete(ckpt_dir, n_stages)
        if found is None:
            raise DataError(f"--resume: no complete checkpoint in {ckpt_dir} (a step_<8 digits> "
                            f"directory holding stage0..stage{n_stages - 1}.safetensors)")
        start, resume_dir = found
        if start > case.steps:
            raise DataError(f"--resume: the newest checkpoint ({resume_dir}) is at step {start}, "
                            f"past --steps {case.steps}")
        _validate_checkpoint(case, resume_dir, start)
    result = {"case": case.name, "suite": args.suite, "backend": case.backend,
              "stages": case.pipeline.stages, "schedule": case.pipeline.schedule,
              "microbatches": case.pipeline.microbatches, "steps": case.steps,
              "start_step": start, "resumed_from": str(resume_dir) if resume_dir else None,
              "on_nonfinite": args.on_nonfinite, "step_index": [], "losses": [],
              "grad_norms": [], "skipped": [], "checkpoints": []}
    t0 = time.perf_counter()
    try:
        if start >= case.steps:
            params = None
        elif case.pipeline.stages == 1 and case.pipeline.chunks == 1:
            params = _train_one_stage(case, args, x, y, start, resume_dir, ckpt_dir, result)
        else:
            params = _train_pipelined(case, args, x, y, start, ckpt_dir, result)
    except EngineError as exc:
        if exc.status in ("TD_ERR_FORMAT", "TD_ERR_CONFIG", "TD_ERR_IO"):
            raise DataError(str(exc)) from None
        raise
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    result["skipped_count"] = len(result["skipped"])
    result["params_sha256"] = params_digest(params) if params is not None else None
    if args.json:
        out = dict(result, losses=[_finite_or_none(v) for v in result["losses"]],
                   grad_norms=[_finite_or_none(v) for v in result["grad_norms"]])
        print(json.dumps(out, indent=1))
        return 0
    layout = "one stage" if n_stages == 1 else \
        f"{case.pipeline.stages} stages, {case.pipeline.schedule}"
    print(f"trained {case.name} ({layout}, {case.backend}) steps {start}..{case.steps}"
          + (f" (resumed from {resume_dir})" if resume_dir else ""))
    if result["losses"]:
        print(f"final loss {result['losses'][-1]:.6f}, grad norm {result['grad_norms'][-1]:.4g}")
    print(f"skipped steps: {result['skipped_count']}"
          + (f" ({', '.join(map(str, result['skipped']))})" if result["skipped"] else ""))
    if result["checkpoints"]:
        print(f"checkpoints: {len(result['checkpoints'])}, newest {result['checkpoints'][-1]}")
    if result["params_sha256"]:
        print(f"final parameters sha256 {result['params_sha256']}")
    return 0
