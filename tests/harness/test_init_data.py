"""harness/init.py and harness/data.py: seeded init, safetensors (ours and the PyPI package's),
token shards (round trip and every malformed-file message), batches."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from harness.config import CaseConfig, ModelConfig
from harness.data import (HEADER_BYTES, SHARD_MAGIC, batches, make_case_data, random_tokens,
                          read_shard, text_corpus, write_case_shards, write_shard)
from harness.errors import ConfigError, DataError
from harness.init import (check_against_table, init_params, read_safetensors,
                          read_safetensors_metadata, write_safetensors)


def gpt2_table(L, C, V, P):
    """The docs/model.md table, in table order (the engine exports the same)."""
    t = [("wte.weight", (V, C)), ("wpe.weight", (P, C))]
    for i in range(L):
        t += [(f"h.{i}.ln_1.weight", (C,)), (f"h.{i}.ln_1.bias", (C,)),
              (f"h.{i}.attn.c_attn.weight", (C, 3 * C)), (f"h.{i}.attn.c_attn.bias", (3 * C,)),
              (f"h.{i}.attn.c_proj.weight", (C, C)), (f"h.{i}.attn.c_proj.bias", (C,)),
              (f"h.{i}.ln_2.weight", (C,)), (f"h.{i}.ln_2.bias", (C,)),
              (f"h.{i}.mlp.c_fc.weight", (C, 4 * C)), (f"h.{i}.mlp.c_fc.bias", (4 * C,)),
              (f"h.{i}.mlp.c_proj.weight", (4 * C, C)), (f"h.{i}.mlp.c_proj.bias", (C,))]
    return t + [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]


TABLE = gpt2_table(L=4, C=64, V=300, P=128)


# ---- init --------------------------------------------------------------------------------------


def test_init_deterministic_and_seeded():
    a, b = init_params(TABLE, 4, seed=1), init_params(TABLE, 4, seed=1)
    c = init_params(TABLE, 4, seed=2)
    assert list(a) == [n for n, _ in TABLE]
    for n, shape in TABLE:
        assert a[n].dtype == np.float32 and a[n].shape == shape
        assert np.array_equal(a[n], b[n])
    assert not np.array_equal(a["wte.weight"], c["wte.weight"])
    # pinned bits: the same numbers on every platform (PCG64 + float64 normals, one rounding)
    assert a["wte.weight"][0, :3].tolist() == pytest.approx(
        [float(x) for x in (np.random.Generator(np.random.PCG64(1)).standard_normal(3) * 0.02)
         .astype(np.float32)], abs=0)


def test_init_distributions():
    p = init_params(TABLE, 4, seed=0)
    assert p["wte.weight"].std() == pytest.approx(0.02, rel=0.05)
    assert p["wpe.weight"].std() == pytest.approx(0.01, rel=0.05)
    assert p["h.0.attn.c_attn.weight"].std() == pytest.approx(0.02, rel=0.05)
    assert p["h.0.mlp.c_fc.weight"].std() == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(2 * 4)
    assert p["h.3.attn.c_proj.weight"].std() == pytest.approx(resid, rel=0.05)
    assert p["h.3.mlp.c_proj.weight"].std() == pytest.approx(resid, rel=0.05)
    assert abs(p["wte.weight"].mean()) < 1e-3
    for n in ("h.0.ln_1.weight", "h.2.ln_2.weight", "ln_f.weight"):
        assert np.all(p[n] == 1)
    for n in ("h.0.attn.c_attn.bias", "h.1.mlp.c_proj.bias", "ln_f.bias", "h.0.ln_1.bias"):
        assert np.all(p[n] == 0)


def test_init_rules_for_the_llama_names():
    """docs/model.md: norms 1, o_proj and down_proj N(0, (0.02/sqrt(2L))^2), every other matrix
    (embed_tokens, q/k/v, gate/up, the untied lm_head) N(0, 0.02^2); a name outside the table
    has no rule."""
    from reference.llama import LlamaConfig, param_shapes

    shapes = param_shapes(LlamaConfig(n_layer=4, n_embd=64, n_head=4, n_kv_head=2,
                                      vocab_size=300, ffn_dim=160, n_positions=8))
    p = init_params(list(shapes.items()), 4, 0)
    assert list(p) == list(shapes)
    resid = 0.02 / math.sqrt(2 * 4)
    for n in ("model.layers.3.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert p[n].std() == pytest.approx(resid, rel=0.05), n
    for n in ("model.embed_tokens.weight", "lm_head.weight",
              "model.layers.1.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight",
              "model.layers.2.self_attn.v_proj.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        assert p[n].std() == pytest.approx(0.02, rel=0.1), n
    for n in ("model.layers.0.input_layernorm.weight",
              "model.layers.3.post_attention_layernorm.weight", "model.norm.weight"):
        assert np.all(p[n] == 1), n
    with pytest.raises(ConfigError, match=r"parameter 'model.layers.0.mlp.w3.weight': no "
                                          r"initialisation rule"):
        init_params([("model.layers.0.mlp.w3.weight", (4, 4))], 1, 0)


def test_init_table_forms_and_errors():
    dicts = [{"name": n, "shape": s, "stage": 0} for n, s in TABLE]
    assert np.array_equal(init_params(dicts, 4, 3)["wte.weight"],
                          init_params(TABLE, 4, 3)["wte.weight"])
    with pytest.raises(ConfigError, match=r"parameter 'h.0.attn.rotary': no initialisation rule"):
        init_params([("h.0.attn.rotary", (4,))], 1, 0)
    with pytest.raises(ConfigError, match=r"'wte.weight' appears twice"):
        init_params([("wte.weight", (2, 2))] * 2, 1, 0)
    p = init_params(TABLE, 4, 0)
    check_against_table(p, TABLE)
    del p["ln_f.bias"]
    with pytest.raises(DataError, match=r"missing \['ln_f.bias'\]"):
        check_against_table(p, TABLE)


# ---- safetensors -------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    import ml_dtypes

    t = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float16([1.5, -2]),
         "c": np.array(3.0, np.float32), "d": np.zeros((0, 4), np.float32),
         "e": np.int64([1, 2]), "bf": np.array([1.0, -3.5, 2**-8], ml_dtypes.bfloat16)}
    write_safetensors(tmp_path / "x.safetensors", t, metadata={"format": "pt"})
    r = read_safetensors(tmp_path / "x.safetensors")
    assert list(r) == list(t)
    for k in ("a", "b", "c", "d", "e"):
        assert r[k].dtype == t[k].dtype and np.array_equal(r[k], t[k])
    assert r["bf"].dtype == np.float32 and r["bf"].tolist() == [1.0, -3.5, 2**-8]
    assert read_safetensors(tmp_path / "x.safetensors", upcast=True)["b"].dtype == np.float32
    assert read_safetensors_metadata(tmp_path / "x.safetensors") == {"format": "pt"}
    r["a"][0, 0] = 7  # writable
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0  # data aligned as the spec asks


def test_safetensors_interop_with_pypi_package(tmp_path):
    from safetensors.numpy import load_file, save_file

    p = init_params(gpt2_table(2, 16, 50, 8), 2, seed=5)
    write_safetensors(tmp_path / "ours.safetensors", p)
    theirs = load_file(tmp_path / "ours.safetensors")
    assert set(theirs) == set(p) and all(np.array_equal(theirs[k], p[k]) for k in p)

    save_file({**p, "h.0.extra": np.float16([1, 2, 3])}, tmp_path / "theirs.safetensors",
              metadata={"who": "pypi"})
    ours = read_safetensors(tmp_path / "theirs.safetensors")
    assert all(np.array_equal(ours[k], p[k]) for k in p)
    assert ours["h.0.extra"].dtype == np.float16
    assert read_safetensors_metadata(tmp_path / "theirs.safetensors") == {"who": "pypi"}


def _st(tmp_path, header: dict, data: bytes = b"", raw_header: bytes | None = None,
        length: int | None = None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def test_safetensors_bad_files(tmp_path):
    def bad(path, pattern):
        with pytest.raises(DataError, match=pattern):
            read_safetensors(path)

    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    (tmp_path / "short").write_bytes(b"abc")
    bad(tmp_path / "short", r"short.*3 bytes, too short")
    bad(tmp_path / "none", r"none: cannot read safetensors file")
    bad(_st(tmp_path, {}, length=10**6), r"header length 1000000 bytes exceeds the file")
    bad(_st(tmp_path, {}, raw_header=b"{not json"), r"header is not valid UTF-8 JSON")
    bad(_st(tmp_path, {}, raw_header=b"[1, 2]"), r"header is a JSON list, not an object")
    bad(_st(tmp_path, {"w": {"dtype": "F32", "shape": [2]}}), r"tensor 'w': entry must have "
                                                              r"exactly dtype, shape")
    bad(_st(tmp_path, {"w": {**f32, "dtype": "Q4"}}, bytes(8)), r"tensor 'w': dtype 'Q4' is "
                                                                r"not supported")
    bad(_st(tmp_path, {"w": {**f32, "shape": [-2]}}, bytes(8)), r"shape \[-2\] is not a list")
    bad(_st(tmp_path, {"w": f32}, bytes(4)), r"tensor 'w': data_offsets \[0, 8\] outside the "
                                             r"4-byte data buffer")
    bad(_st(tmp_path, {"w": {**f32, "shape": [3]}}, bytes(8)), r"span 8 bytes but F32 \[3\] "
                                                               r"needs 12")
    bad(_st(tmp_path, {"w": f32, "v": {**f32, "data_offsets": [4, 12]}}, bytes(12)),
        r"tensors 'w' \[0, 8\) and 'v' \[4, 12\) overlap")
    bad(_st(tmp_path, {"__metadata__": {"a": 1}}), r"__metadata__ must map strings to strings")


# ---- token shards ------------------------------------------------------------------------------


def test_shard_round_trip_and_layout(tmp_path):
    t = np.array([0, 1, 310, 7], np.int64)
    p = write_shard(tmp_path / "a.bin", t, vocab_size=311)
    raw = p.read_bytes()
    assert len(raw) == HEADER_BYTES + 4 * 2
    assert raw[:4] == b"TDNT"  # 0x544E4454 little-endian
    assert struct.unpack_from("<IIIIQ", raw) == (SHARD_MAGIC, 1, 2, 0, 4)
    assert raw[24:64] == bytes(40)
    r = read_shard(p, vocab_size=311)
    assert r.dtype == np.int32 and r.tolist() == t.tolist()

    big = np.array([0, 70000, 50256], np.int32)
    raw = write_shard(tmp_path / "b.bin", big, vocab_size=100_000).read_bytes()
    assert struct.unpack_from("<I", raw, 8)[0] == 4 and len(raw) == HEADER_BYTES + 12
    assert read_shard(tmp_path / "b.bin").tolist() == big.tolist()
    assert read_shard(write_shard(tmp_path / "c.bin", [], 5)).size == 0
    x = np.arange(12).reshape(3, 4)
    assert read_shard(write_shard(tmp_path / "d.bin", x, 12)).tolist() == x.ravel().tolist()


def test_shard_write_errors(tmp_path):
    with pytest.raises(DataError, match=r"a.bin: token at position 2 is 311, outside \[0, 311\)"):
        write_shard(tmp_path / "a.bin", [0, 1, 311, 400], 311)
    with pytest.raises(DataError, match=r"token at position 0 is -1"):
        write_shard(tmp_path / "a.bin", [-1], 311)
    with pytest.raises(DataError, match=r"dtype float64, expected integers"):
        write_shard(tmp_path / "a.bin", [1.0], 311)
    with pytest.raises(ConfigError, match=r"vocab_size = 0"):
        write_shard(tmp_path / "a.bin", [0], 0)
    assert not (tmp_path / "a.bin").exists()


def _shard(tmp_path, magic=SHARD_MAGIC, version=1, bpt=2, reserved=0, count=3, pad=bytes(40),
           body=None):
    p = tmp_path / "s.bin"
    body = np.arange(count, dtype="<u2").tobytes() if body is None else body
    p.write_bytes(struct.pack("<IIIIQ40s", magic, version, bpt, reserved, count, pad) + body)
    return p


def test_shard_read_errors(tmp_path):
    def bad(path, pattern, **kw):
        with pytest.raises(DataError, match=pattern):
            read_shard(path, **kw)

    bad(tmp_path / "nope.bin", r"nope.bin: cannot read token shard")
    (tmp_path / "tiny.bin").write_bytes(b"TDNT")
    bad(tmp_path / "tiny.bin", r"tiny.bin: 4 bytes, shorter than the 64-byte shard header")
    bad(_shard(tmp_path, magic=0x12345678), r"s.bin: bad magic 0x12345678 \(expected "
                                            r"0x544E4454, 'TDNT'\)")
    bad(_shard(tmp_path, version=2), r"s.bin: shard version 2, this harness reads version 1")
    bad(_shard(tmp_path, bpt=3), r"s.bin: 3 bytes per token in the header \(expected 2 or 4\)")
    bad(_shard(tmp_path, reserved=1), r"reserved header bytes are not zero")
    bad(_shard(tmp_path, pad=b"x" + bytes(39)), r"reserved header bytes are not zero")
    bad(_shard(tmp_path, count=5, body=bytes(6)), r"s.bin: header says 5 tokens x 2 bytes = "
                                                  r"10 bytes, but the file holds 6 bytes")
    bad(_shard(tmp_path, count=3, body=bytes(8)), r"holds 8 bytes after the header")
    body = np.array([1, 2, 400, 500], "<u2").tobytes()
    bad(_shard(tmp_path, count=4, body=body), r"s.bin: token at position 2 is 400, outside "
                                              r"vocab_size = 311 \(2 such ids\)", vocab_size=311)
    body = np.array([1, 2**31], "<u4").tobytes()
    bad(_shard(tmp_path, bpt=4, count=2, body=body), r"position 1 is 2147483648, outside the "
                                                     r"int32 range")


# ---- corpora and batches -----------------------------------------------------------------------


def test_text_corpus():
    t = text_corpus(max_bytes=4096)
    assert t.dtype == np.int32 and t.size == 4096 and t.max() < 256
    assert np.array_equal(t, text_corpus(max_bytes=1 << 20)[:4096])  # a prefix: fixed order
    assert bytes(t[:200].astype(np.uint8)).isascii()


def test_random_tokens():
    a = random_tokens(1000, 311, seed=4)
    assert a.dtype == np.int32 and a.min() >= 0 and a.max() == 310
    assert np.array_equal(a, random_tokens(1000, 311, seed=4))
    assert not np.array_equal(a, random_tokens(1000, 311, seed=5))


def test_batches():
    tokens = np.arange(100, dtype=np.int32)
    x, y = batches(tokens, batch_size=3, seq_len=8, steps=5, seed=1)
    assert x.shape == y.shape == (5, 3, 8) and x.dtype == y.dtype == np.int32
    assert np.array_equal(y[..., :-1], x[..., 1:])
    assert np.all(np.diff(x, axis=-1) == 1) and np.all(y == x + 1)  # contiguous windows
    x2, _ = batches(tokens, 3, 8, steps=2, seed=1)
    assert np.array_equal(x2, x[:2])  # earlier steps do not depend on `steps`
    x3, _ = batches(tokens, 3, 8, 5, seed=2)
    assert not np.array_equal(x3, x)
    x4, _ = batches(tokens[:9], 2, 8, 1, seed=0)  # exactly one window fits
    assert x4.tolist() == [[list(range(8))] * 2]
    with pytest.raises(DataError, match=r"at least seq_len \+ 1 = 9 tokens"):
        batches(tokens[:8], 2, 8, 1, seed=0)


def test_make_case_data_and_shards(tmp_path):
    case = CaseConfig("c", ModelConfig(1, 8, 2, 311, 16), seq_len=16, batch_size=4, steps=3,
                      seed=9)
    x, y = make_case_data(case)
    assert x.shape == (3, 4, 16) and x.max() < 311
    assert np.array_equal(x, make_case_data(case)[0])
    text = CaseConfig("t", ModelConfig(1, 8, 2, 256, 16), 16, 2, steps=2, data="text")
    xt, yt = make_case_data(text)
    assert xt.max() < 256 and np.array_equal(xt[..., 1:], yt[..., :-1])
    paths = write_case_shards(case, tmp_path / "d")
    assert np.array_equal(read_shard(paths["inputs"], 311), x.ravel())
    assert np.array_equal(read_shard(paths["targets"], 311), y.ravel())
