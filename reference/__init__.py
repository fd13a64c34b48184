"""JAX reference for Tandem: the spec the C engine is held to (docs/model.md).

Pure, single-device functions over a flat dict of GPT-2-named parameters, AdamW, a training step,
and (in reference.pipeline) a JAX GPipe baseline for benchmarks. No schedules, no I/O.
"""

from .gpt2 import (GPTConfig, accumulated_loss_and_grads, forward, loss_and_grads, loss_fn,
                   n_layers, param_shapes)
from .optim import AdamWConfig, AdamWState, adamw_init, adamw_update, global_norm
from .pipeline import make_gpipe_loss_and_grads, make_gpipe_train_step
from .train import make_train_step, run_trajectory, set_precision

__all__ = [
    "GPTConfig", "forward", "loss_fn", "loss_and_grads", "accumulated_loss_and_grads",
    "param_shapes", "n_layers",
    "AdamWConfig", "AdamWState", "adamw_init", "adamw_update", "global_norm",
    "make_train_step", "run_trajectory", "set_precision",
    "make_gpipe_train_step", "make_gpipe_loss_and_grads",
]
