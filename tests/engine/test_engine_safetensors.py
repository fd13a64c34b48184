"""Safetensors round trips between the engine and the reference implementation (the
`safetensors` package): engine -> engine, engine -> safetensors.numpy, safetensors.numpy ->
engine with the public GPT-2 conventions ("transformer." prefix, attention-mask buffers), and
the float dtypes the loader widens. Malformed files are in test_engine_bad_input.py.
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load_file, save_file


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == np.float32, name
        assert got[name].shape == w.shape, name
        assert got[name].tobytes() == np.asarray(w, np.float32).tobytes(), name


def test_engine_save_then_engine_load(tiny_config, make_model, seeded_init, tmp_path):
    src = make_model(tiny_config, seeded_init)
    path = tmp_path / "w.safetensors"
    src.save_safetensors(path)
    dst = make_model(tiny_config)  # zero parameters until loaded
    dst.load_safetensors(path)
    _assert_same(dst.params(), seeded_init)


def test_engine_save_reads_in_safetensors_numpy(tiny_config, make_model, seeded_init, tmp_path):
    model = make_model(tiny_config, seeded_init)
    path = tmp_path / "w.safetensors"
    model.save_safetensors(path)
    loaded = load_file(str(path))
    assert set(loaded) == {p.name for p in model.table}
    _assert_same(loaded, seeded_init)


def test_safetensors_numpy_save_with_gpt2_conventions_loads(tiny_config, make_model, seeded_init,
                                                            tmp_path):
    """A file shaped like the public GPT-2 checkpoint: every name under "transformer.", plus the
    per-layer causal-mask buffers `.attn.bias` (1, 1, P, P) and `.attn.masked_bias` (scalar),
    which carry no parameter and are skipped."""
    P = tiny_config["n_positions"]
    tensors = {f"transformer.{k}": v for k, v in seeded_init.items()}
    for i in range(tiny_config["n_layer"]):
        tensors[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((P, P), np.float32))[None, None]
        tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    path = tmp_path / "gpt2-like.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    model = make_model(tiny_config)
    model.load_safetensors(path)
    _assert_same(model.params(), seeded_init)


def test_safetensors_numpy_save_without_prefix_loads(tiny_config, make_model, seeded_init,
                                                     tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(dict(reversed(list(seeded_init.items()))), str(path))  # order must not matter
    model = make_model(tiny_config)
    model.load_safetensors(path)
    _assert_same(model.params(), seeded_init)


def test_other_float_dtypes_are_widened_exactly(tiny_config, make_model, seeded_init, tmp_path):
    """F64 and F16 tensors load as the fp32 of their values (values chosen to be exact in both)."""
    f16 = {k: v.astype(np.float16) for k, v in seeded_init.items()}
    f64 = {k: v.astype(np.float64) for k, v in seeded_init.items()}
    for name, tensors in (("f16", f16), ("f64", f64)):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        model = make_model(tiny_config)
        model.load_safetensors(path)
        _assert_same(model.params(), {k: v.astype(np.float32) for k, v in tensors.items()})
