"""Seeded GPT-2 and Llama initial weights (numpy) and the safetensors files that carry weights
across.

init_params() follows docs/model.md's initialisation over a parameter table given by the caller
(the engine's table; the reference uses the same names), so both sides start from identical bits.
write_safetensors()/read_safetensors() are a small pure-numpy implementation of the safetensors
format (JSON header + raw little-endian data). Nothing here trains, and nothing here loads
libtandem or JAX.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from harness.errors import ConfigError, DataError

STD = 0.02  # linear weights and wte
WPE_STD = 0.01
LLAMA_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")
LLAMA_STD = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
             "up_proj.weight")


def _entry(e: Any) -> tuple[str, tuple[int, ...]]:
    """(name, shape) from a table entry: a (name, shape, ...) sequence, a mapping with "name" and
    "shape", or an object with .name and .shape attributes."""
    if isinstance(e, Mapping):
        name, shape = e["name"], e["shape"]
    elif hasattr(e, "name") and hasattr(e, "shape"):
        name, shape = e.name, e.shape
    else:
        name, shape = e[0], e[1]
    return str(name), tuple(int(d) for d in shape)


def init_rule(name: str, n_layer: int) -> tuple[str, float]:
    """How docs/model.md initialises `name`: ("normal", std), ("zeros", 0) or ("ones", 1)."""
    parts = name.split(".")
    if parts[-1] == "bias":
        return "zeros", 0.0
    if parts[-1] != "weight":
        raise ConfigError(f"parameter {name!r}: no initialisation rule "
                          "(expected *.weight or *.bias)")
    if any(p.startswith("ln_") for p in parts) or name.endswith(LLAMA_NORMS):
        return "ones", 1.0
    if name == "wpe.weight":
        return "normal", WPE_STD
    if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
        return "normal", STD / math.sqrt(2 * n_layer)  # residual projections, GPT-2 paper
    if name == "wte.weight" or name.endswith(("attn.c_attn.weight", "mlp.c_fc.weight")):
        return "normal", STD
    # Llama (docs/model.md): the same rule under the public names, the two residual
    # projections scaled as GPT-2's
    if name.startswith("model.layers.") and name.endswith(("self_attn.o_proj.weight",
                                                            "mlp.down_proj.weight")):
        return "normal", STD / math.sqrt(2 * n_layer)
    if name in ("model.embed_tokens.weight", "lm_head.weight") or (
            name.startswith("model.layers.") and name.endswith(LLAMA_STD)):
        return "normal", STD
    raise ConfigError(f"parameter {name!r}: no initialisation rule in docs/model.md")


def init_params(table: Iterable[Any], n_layer: int, seed: int) -> dict[str, np.ndarray]:
    """Initial fp32 parameters for every (name, shape) in `table`, in table order.

    One numpy Generator(PCG64(seed)) is drawn from tensor by tensor in table order; only the
    normally distributed tensors draw (biases are 0, LayerNorm weights 1). Samples are drawn in
    float64, scaled by the std and rounded once to float32, which is bit-identical on every
    platform for a given numpy. Give the whole model's table: a stage's sub-table would shift
    the stream (the harness writes one file and each stage loads its own tensors from it)."""
    if not isinstance(n_layer, int) or n_layer < 1:
        raise ConfigError(f"n_layer = {n_layer!r}: must be an integer >= 1")
    rng = np.random.Generator(np.random.PCG64(seed))
    out: dict[str, np.ndarray] = {}
    for e in table:
        name, shape = _entry(e)
        if name in out:
            raise ConfigError(f"parameter {name!r} appears twice in the table")
        kind, std = init_rule(name, n_layer)
        if kind == "normal":
            out[name] = (rng.standard_normal(shape) * std).astype(np.float32)
        elif kind == "ones":
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = np.zeros(shape, np.float32)
    return out


def check_against_table(tensors: Mapping[str, np.ndarray], table: Iterable[Any],
                        source: str = "tensors") -> None:
    """DataError unless `tensors` holds exactly the table's names with the table's shapes."""
    want = dict(_entry(e) for e in table)
    missing = [n for n in want if n not in tensors]
    extra = [n for n in tensors if n not in want]
    if missing or extra:
        raise DataError(f"{source}: names differ from the parameter table: missing {missing[:5]}"
                        f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                        f"{'...' if len(extra) > 5 else ''}")
    for n, shape in want.items():
        if tuple(tensors[n].shape) != shape:
            raise DataError(f"{source}: {n} has shape {tuple(tensors[n].shape)}, the table says "
                            f"{shape}")


# ---- safetensors -------------------------------------------------------------------------------
# Layout: u64 little-endian N, then N bytes of UTF-8 JSON {name: {"dtype", "shape",
# "data_offsets": [begin, end]}, "__metadata__": {str: str}} (padded with spaces to a multiple
# of 8), then the data buffer; offsets are relative to the start of the data buffer.

_MAX_HEADER = 100 * 2**20  # the reference implementation's limit
_ST_DTYPES = {  # safetensors name -> little-endian numpy dtype (BF16 handled apart)
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _ST_DTYPES.items()}, "BF16": 2}


def _st_dtype(a: np.ndarray, name: str) -> str:
    if a.dtype.name == "bfloat16":  # ml_dtypes.bfloat16 (ships with JAX)
        return "BF16"
    for st, np_dt in _ST_DTYPES.items():
        d = np.dtype(np_dt)
        if (a.dtype.kind, a.dtype.itemsize) == (d.kind, d.itemsize):  # either byte order
            return st
    raise DataError(f"tensor {name!r}: dtype {a.dtype} has no safetensors equivalent")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (in mapping order) to a safetensors file; replaces `path` atomically."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays, offset = [], 0
    for name, a in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise DataError(f"tensor name {name!r}: must be a non-empty string, not __metadata__")
        a = np.asarray(a)
        st = _st_dtype(a, name)
        if st not in ("BF16", "U8", "I8", "BOOL"):
            a = a.astype(np.dtype(_ST_DTYPES[st]), copy=False)  # little-endian on any host
        a = a if a.flags.c_contiguous else a.copy(order="C")  # ascontiguousarray: 0-d -> 1-d
        header[name] = {"dtype": st, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-(8 + len(blob)) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())  # tobytes: also handles 0-d and empty arrays
    tmp.replace(path)


def _header(path: Path, buf: np.ndarray) -> tuple[dict, int]:
    size = buf.size
    if size < 8:
        raise DataError(f"{path}: {size} bytes, too short for a safetensors file (8-byte header "
                        "length first)")
    (n,) = struct.unpack("<Q", buf[:8].tobytes())
    if n > size - 8 or n > _MAX_HEADER:
        raise DataError(f"{path}: header length {n} bytes exceeds the file ({size} bytes) or the "
                        f"{_MAX_HEADER}-byte limit: not a safetensors file, or truncated")
    try:
        header = json.loads(buf[8:8 + n].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    return header, 8 + n


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The "__metadata__" table of a safetensors file ({} if absent)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = np.frombuffer(f.read(8), np.uint8)
        n = struct.unpack("<Q", head.tobytes())[0] if head.size == 8 else 0
        rest = np.frombuffer(f.read(min(n, _MAX_HEADER)), np.uint8)
    header, _ = _header(path, np.concatenate([head, rest]))
    return dict(header.get("__metadata__") or {})


def read_safetensors(path: str | os.PathLike, upcast: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, in header order, as writable numpy arrays.
    BF16 is always widened to float32 (exactly; numpy has no bfloat16). With upcast=True every
    other float tensor (F16, F64) becomes float32 too; otherwise each keeps its dtype.
    The header is validated: dtypes, shapes, offsets inside the data, sizes, no overlaps."""
    path = Path(path)
    try:
        size = path.stat().st_size
        buf = np.empty(size, np.uint8)
        with open(path, "rb") as f:
            got = f.readinto(memoryview(buf))
    except OSError as e:
        raise DataError(f"{path}: cannot read safetensors file: {e.strerror or e}") from None
    if got != size:
        raise DataError(f"{path}: read {got} of {size} bytes")
    header, start = _header(path, buf)
    data_len = size - start
    out: dict[str, np.ndarray] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in info.items()):
                raise DataError(f"{path}: __metadata__ must map strings to strings")
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise DataError(f"{where}: entry must have exactly dtype, shape, data_offsets; got "
                            f"{info!r}")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dt not in _ITEMSIZE:
            raise DataError(f"{where}: dtype {dt!r} is not supported (supported: "
                            f"{', '.join(_ITEMSIZE)})")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise DataError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise DataError(f"{where}: data_offsets {offs!r} outside the {data_len}-byte data "
                            "buffer (truncated file?)")
        nbytes = math.prod(shape) * _ITEMSIZE[dt]
        if offs[1] - offs[0] != nbytes:
            raise DataError(f"{where}: data_offsets {offs} span {offs[1] - offs[0]} bytes but "
                            f"{dt} {shape} needs {nbytes}")
        spans.append((offs[0], offs[1], name))
        raw = buf[start + offs[0]:start + offs[1]]
        if dt == "BF16":
            bits = raw.view("<u2").astype(np.uint32) << 16
            a = bits.view(np.float32)
        else:
            a = raw.view(np.dtype(_ST_DTYPES[dt]))
            if upcast and a.dtype.kind == "f":
                a = a.astype(np.float32)
        out[name] = a.reshape(tuple(shape))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise DataError(f"{path}: tensors {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) "
                            "overlap")
    return out


__all__ = ["init_params", "init_rule", "check_against_table", "write_safetensors",
           "read_safetensors", "read_safetensors_metadata"]
