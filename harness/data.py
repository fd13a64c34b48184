"""Token data: binary token shards, a byte-level text corpus, seeded random tokens, and the
per-step (inputs, targets) batches that the engine and the JAX reference both consume.

The shard layout is the one engine/include/tandem.h documents and td_tokens_read reads; this is
its writer. Everything is deterministic from a case's seed. No tokenizer lives here: real text is
byte-level (vocab 256), and pre-tokenized corpora arrive as shards.
"""

from __future__ import annotations

import functools
import os
import struct
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import ConfigError, DataError

# Shard header, little-endian, 64 bytes: magic, version, bytes per token, reserved, count, pad.
SHARD_MAGIC = 0x544E4454  # the bytes "TDNT" on disk
SHARD_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<IIIIQ40s")
assert _HEADER.size == HEADER_BYTES

# Independent random streams derived from one case seed (init.py uses PCG64(seed) itself).
_STREAM_TOKENS = 1
_STREAM_OFFSETS = 2
RANDOM_CORPUS_TOKENS = 1 << 16  # a random "corpus" of fixed size, so steps do not change it


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream])))


def bytes_per_token(vocab_size: int) -> int:
    """2 (uint16) while every id fits, else 4 (uint32)."""
    return 4 if vocab_size > 65535 else 2


def write_shard(path: str | os.PathLike, tokens: Any, vocab_size: int) -> Path:
    """Write token ids (any integer array; flattened in C order) as a shard. Every id must lie
    in [0, vocab_size); the first one that does not is named in the DataError."""
    path = Path(path)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ConfigError(f"vocab_size = {vocab_size!r}: must be an integer >= 1")
    t = np.asarray(tokens)
    if t.size and t.dtype.kind not in "iu":
        raise DataError(f"{path}: tokens have dtype {t.dtype}, expected integers")
    t = t.reshape(-1).astype(np.int64, copy=False)
    bad = np.flatnonzero((t < 0) | (t >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: token at position {i} is {int(t[i])}, outside [0, {vocab_size}) "
                        f"({bad.size} such ids)")
    bpt = bytes_per_token(vocab_size)
    header = _HEADER.pack(SHARD_MAGIC, SHARD_VERSION, bpt, 0, t.size, bytes(40))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(t.astype("<u2" if bpt == 2 else "<u4").tobytes())
    tmp.replace(path)
    return path


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Read a shard into an int32 array, checking the header and (if given) every id against
    vocab_size. Raises DataError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read token shard: {e.strerror or e}") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte shard "
                        "header")
    magic, version, bpt, reserved, count, pad = _HEADER.unpack_from(raw)
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic 0x{magic:08X} (expected 0x{SHARD_MAGIC:08X}, "
                        "'TDNT'): not a Tandem token shard")
    if version != SHARD_VERSION:
        raise DataError(f"{path}: shard version {version}, this harness reads version "
                        f"{SHARD_VERSION}")
    if bpt not in (2, 4):
        raise DataError(f"{path}: {bpt} bytes per token in the header (expected 2 or 4)")
    if reserved != 0 or any(pad):
        raise DataError(f"{path}: reserved header bytes are not zero")
    body = len(raw) - HEADER_BYTES
    if body != count * bpt:
        raise DataError(f"{path}: header says {count} tokens x {bpt} bytes = {count * bpt} bytes, "
                        f"but the file holds {body} bytes after the header")
    ids = np.frombuffer(raw, "<u2" if bpt == 2 else "<u4", count, HEADER_BYTES).astype(np.int64)
    limit = vocab_size if vocab_size is not None else 2**31
    bad = np.flatnonzero(ids >= limit)
    if bad.size:
        i = int(bad[0])
        what = f"vocab_size = {vocab_size}" if vocab_size is not None else "the int32 range"
        raise DataError(f"{path}: token at position {i} is {int(ids[i])}, outside {what} "
                        f"({bad.size} such ids)")
    return ids.astype(np.int32)


# Stdlib sources that make the byte-level text corpus, read in this (sorted) order. Files a
# Python version lacks are skipped, so the corpus is fixed for a given Python installation.
TEXT_SOURCES = tuple(sorted((
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py",
    "fractions.py", "functools.py", "heapq.py", "inspect.py", "json/decoder.py",
    "json/encoder.py", "pprint.py", "random.py", "shlex.py", "statistics.py", "string.py",
    "textwrap.py", "typing.py", "unittest/case.py",
)))


@functools.lru_cache(maxsize=4)
def _corpus_bytes(max_bytes: int) -> bytes:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for rel in TEXT_SOURCES:
        p = stdlib / rel
        if not p.is_file():
            continue
        b = p.read_bytes()
        out.append(b[: max_bytes - total])
        total += len(out[-1])
        if total >= max_bytes:
            break
    return b"".join(out)


def text_corpus(max_bytes: int = 1 << 20) -> np.ndarray:
    """Byte-level tokens (int32 in [0, 256)) of Python's own stdlib sources (TEXT_SOURCES, in
    order), at most max_bytes of them. Real text with real structure, and shipped with Python."""
    data = _corpus_bytes(int(max_bytes))
    if len(data) < 2:
        raise DataError(f"no text corpus: none of {TEXT_SOURCES[:3]}... found under "
                        f"{sysconfig.get_paths()['stdlib']}")
    return np.frombuffer(data, np.uint8).astype(np.int32)


def random_tokens(n: int, vocab_size: int, seed: int) -> np.ndarray:
    """n uniform ids in [0, vocab_size) as int32, from the case seed's token stream."""
    return _rng(seed, _STREAM_TOKENS).integers(0, vocab_size, size=n, dtype=np.int32)


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, steps: int, seed: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_SBT, targets_SBT), int32: for each of `steps` steps, `batch_size` windows of
    seq_len + 1 consecutive tokens at offsets drawn uniformly from the seed's offset stream;
    targets are the inputs shifted by one. The first k steps do not depend on `steps`."""
    tokens = np.asarray(tokens)
    n = tokens.shape[0]
    if tokens.ndim != 1 or n < seq_len + 1:
        raise DataError(f"token array of shape {tokens.shape}: need a 1-D array of at least "
                        f"seq_len + 1 = {seq_len + 1} tokens")
    offsets_SB = _rng(seed, _STREAM_OFFSETS).integers(0, n - seq_len, size=(steps, batch_size))
    window_SBT1 = tokens[offsets_SB[..., None] + np.arange(seq_len + 1)].astype(np.int32)
    return (np.ascontiguousarray(window_SBT1[..., :-1]),
            np.ascontiguousarray(window_SBT1[..., 1:]))


def case_tokens(case: Any) -> np.ndarray:
    """The token stream a case samples from: the text corpus, or a fixed-size random corpus."""
    if case.data == "text":
        return text_corpus()
    if case.data == "random":
        n = max(RANDOM_CORPUS_TOKENS, 4 * (case.seq_len + 1))
        return random_tokens(n, case.model.vocab_size, case.seed)
    raise ConfigError(f"data = {case.data!r}: unknown (allowed: random, text)")


def make_case_data(case: Any) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_SBT, targets_SBT) for a harness.config.CaseConfig: S = case.steps steps of
    B = case.batch_size sequences of T = case.seq_len tokens. The same arrays feed both sides."""
    return batches(case_tokens(case), case.batch_size, case.seq_len, case.steps, case.seed)


def write_case_shards(case: Any, directory: str | os.PathLike) -> dict[str, Path]:
    """Write make_case_data(case) as two shards (inputs, targets; S·B·T ids each, in step,
    sequence, position order) for an engine run in another process."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    x, y = make_case_data(case)
    v = case.model.vocab_size
    return {"inputs": write_shard(d / "tokens_inputs.bin", x, v),
            "targets": write_shard(d / "tokens_targets.bin", y, v)}


__all__ = ["SHARD_MAGIC", "SHARD_VERSION", "HEADER_BYTES", "TEXT_SOURCES", "bytes_per_token",
           "write_shard", "read_shard", "text_corpus", "random_tokens", "batches",
           "case_tokens", "make_case_data", "write_case_shards"]
