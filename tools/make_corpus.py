"""Writes the seed corpora of the engine's fuzz targets into engine/fuzz/corpus/<target>/.

    python3 tools/make_corpus.py

Valid files come from the project's own writers (the engine's safetensors writer through the
binding, harness.data.write_shard, harness.schedule.to_csv, harness.pipeline.write_runfile); a
few hand-made edge cases sit beside them. The output is deterministic and committed; the fuzzers
add what they find to their own working directories, not here.
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FUZZ = REPO / "engine" / "fuzz"
sys.path.insert(0, str(REPO))

from harness import schedule  # noqa: E402
from harness.config import load_suite  # noqa: E402
from harness.data import write_shard  # noqa: E402
from harness.engine import Model  # noqa: E402
from harness.pipeline import write_runfile  # noqa: E402

# fuzz_safetensors.c builds this model (one stage, and stage 1 of 2)
FUZZ_MODEL = dict(n_layer=2, n_embd=4, n_head=2, vocab_size=5, n_positions=4, seq_len=2,
                  batch_size=1)


def _out(target: str) -> Path:
    d = FUZZ / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    return d


def _safetensors(header: dict, data: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors() -> None:
    d = _out("safetensors")
    with tempfile.TemporaryDirectory() as tmp, Model(**FUZZ_MODEL) as m:
        path = Path(tmp) / "w.safetensors"
        m.save_safetensors(path)
        valid = path.read_bytes()
    (d / "valid.safetensors").write_bytes(valid)
    n = struct.unpack("<Q", valid[:8])[0]
    header, data = json.loads(valid[8:8 + n]), valid[8 + n:]
    # the public GPT-2 layout: "transformer." prefixes, metadata and the tolerated mask buffers
    gpt2 = {"__metadata__": {"format": "pt"}}
    for k, v in header.items():
        gpt2["transformer." + k] = v
    gpt2["h.0.attn.bias"] = {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}
    (d / "gpt2-names.safetensors").write_bytes(_safetensors(gpt2, data))
    # other dtypes: the same tensors as F16 / BF16 (2 bytes each) and F64
    for dtype, size in (("F16", 2), ("BF16", 2), ("F64", 8)):
        hdr, off = {}, 0
        for k, v in header.items():
            numel = (v["data_offsets"][1] - v["data_offsets"][0]) // 4
            hdr[k] = {"dtype": dtype, "shape": v["shape"], "data_offsets": [off, off + numel * size]}
            off += numel * size
        payload = (bytes(range(0, 256, 3)) * (off // 86 + 1))[:off]  # finite in every dtype
        (d / f"{dtype.lower()}.safetensors").write_bytes(_safetensors(hdr, payload))
    (d / "empty-header.safetensors").write_bytes(_safetensors({}, b""))
    (d / "truncated.safetensors").write_bytes(valid[: len(valid) // 2])
    (d / "short.safetensors").write_bytes(b"\x02\x00\x00\x00")


def tokens() -> None:
    d = _out("tokens")
    with tempfile.TemporaryDirectory() as tmp:
        for name, ids, vocab in (("u16.bin", [0, 1, 2, 50256, 7], 50257),
                                 ("u32.bin", [0, 70000, 3], 100000),
                                 ("empty.bin", [], 50257)):
            p = Path(tmp) / name
            write_shard(p, ids, vocab)
            (d / name).write_bytes(p.read_bytes())
    good = (d / "u16.bin").read_bytes()
    (d / "truncated.bin").write_bytes(good[:-1])
    (d / "header-only.bin").write_bytes(good[:64])


def schedules() -> None:
    d = _out("schedule")
    with tempfile.TemporaryDirectory() as tmp:
        for name, P, M, V in (("gpipe", 2, 4, 1), ("1f1b", 2, 4, 1), ("interleaved", 2, 4, 2),
                              ("zb-h1", 2, 4, 1)):
            p = Path(tmp) / f"{name}.csv"
            schedule.to_csv(schedule.generate(name, P, M, V), p)
            (d / f"{name}-p{P}m{M}v{V}.csv").write_bytes(p.read_bytes())
    (d / "header-only.csv").write_text("rank,index,kind,stage,microbatch\n")
    (d / "bad-kind.csv").write_text("rank,index,kind,stage,microbatch\n0,0,X,0,0\n")
    (d / "out-of-range.csv").write_text("rank,index,kind,stage,microbatch\n0,0,F,9,-1\n")


def runfiles() -> None:
    d = _out("runfile")
    files = {k: f"/data/{k}" for k in ("weights", "inputs", "targets", "schedule")}
    files["out"] = "/data/out"
    with tempfile.TemporaryDirectory() as tmp:
        for suite in ("smoke",):
            for case in load_suite(suite).cases:
                if case.pipeline.stages < 2:
                    continue
                p = Path(tmp) / "run.txt"
                write_runfile(p, case, files, steps=case.steps, threads=1, save_grads_step=0)
                (d / f"{case.name}.run").write_bytes(p.read_bytes())
    (d / "comment-and-blank.run").write_text("# a comment\n\nn_layer 2\nlr 1e-3\n")
    (d / "unknown-key.run").write_text("n_layers 2\n")
    (d / "not-a-number.run").write_text("n_layer two\n")


if __name__ == "__main__":
    safetensors()
    tokens()
    schedules()
    runfiles()
    for t in sorted((FUZZ / "corpus").iterdir()):
        print(f"{t.relative_to(FUZZ)}: {len(list(t.iterdir()))} files")
