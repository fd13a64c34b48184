"""Helpers shared by the engine tests (imported by name: tests/engine is on sys.path under
pytest's default import mode). Plain functions, no fixtures; conftest.py holds those.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from harness.init import init_params

REPO = Path(__file__).resolve().parents[2]

# L2 C12 NH3 (head size 4) V17 T5 B2: every op runs, the vocabulary is prime, and a
# finite-difference sweep over every tensor takes well under a second.
TINY = dict(n_layer=2, n_embd=12, n_head=3, vocab_size=17, n_positions=8, seq_len=5,
            batch_size=2, threads=1)


def tokens_for(config: dict, seed: int, B: int | None = None, T: int | None = None):
    """Seeded (tokens, targets), each (B, T) int32 in [0, vocab_size)."""
    B = config["batch_size"] if B is None else B
    T = config["seq_len"] if T is None else T
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config["vocab_size"], size=(2, B, T), dtype=np.int32)
    return ids[0], ids[1]


def rough_params(table, n_layer: int, seed: int) -> dict[str, np.ndarray]:
    """harness.init's seeded weights, then every tensor moved off its special initial value
    (biases 0, LayerNorm weights 1) and the linear weights enlarged, so that every term of the
    maths is exercised: attention far from uniform, GELU in its curved region."""
    params = init_params([(p.name, p.shape) for p in table], n_layer, seed)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for name, w in params.items():
        if w.ndim >= 2:
            w = w * 10.0  # std 0.2 (0.1 for wpe)
        elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            w = w + rng.normal(0.0, 0.2, w.shape)
        else:
            w = w + rng.normal(0.0, 0.1, w.shape)
        out[name] = np.asarray(w, np.float32)
    return out


def have_cmake_and_cc() -> bool:
    return shutil.which("cmake") is not None and any(
        shutil.which(cc) for cc in ("cc", "gcc", "clang"))


def fd_relative_errors(model, params, tokens, targets, step=1e-4, samples=4, seed=11):
    """Per tensor of model.table: the relative L2 error between the analytic gradient and central
    differences (float64 loss) at the element with the largest gradient and samples - 1 seeded
    random ones. The perturbed values must be float32 (parameters cross the ABI as fp32), so the
    denominator is the difference actually applied, not 2 * step."""
    import numpy as np

    model.set_params(params)
    model.zero_grad()
    model.forward_backward(tokens, targets, 1.0)
    grads = model.grads()

    def loss():
        return model.forward(tokens, targets, logits=False)[1]

    def central(name, index):
        base = params[name]
        flat = base.ravel().copy()
        x0 = float(flat[index])
        hi, lo = float(np.float32(x0 + step)), float(np.float32(x0 - step))
        out = []
        for v in (hi, lo):
            flat[index] = v
            model.set_param(name, flat.reshape(base.shape))
            out.append(loss())
        model.set_param(name, base)
        return (out[0] - out[1]) / (hi - lo)

    rng = np.random.default_rng(seed)
    errors = {}
    for p in model.table:
        g = grads[p.name].ravel().astype(np.float64)
        picks = [int(np.argmax(np.abs(g)))]
        picks += [int(i) for i in rng.choice(p.numel, size=min(samples - 1, p.numel),
                                               replace=False)]
        fd = np.array([central(p.name, i) for i in picks])
        an = g[picks]
        assert np.linalg.norm(an) > 0, f"{p.name}: zero gradient on the sampled elements"
        errors[p.name] = float(np.linalg.norm(fd - an) / np.linalg.norm(an))
    return errors
