"""Bad input never kills the host: every malformed file, out-of-range id and bad configuration
comes back as an EngineError whose message names the problem, and the process (and the model
handle, where there is one) keeps working afterwards.

Files are broken by hand (struct + json) so each test controls exactly one defect.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from harness.engine import Model, read_tokens
from harness.errors import EngineError

from engine_util import TINY, tokens_for

# ---- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def model(make_model, seeded_init):
    return make_model(TINY, seeded_init)


@pytest.fixture
def good_file(model, tmp_path):
    path = tmp_path / "good.safetensors"
    model.save_safetensors(path)
    return path


def _split(path):
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def _still_works(model):
    """The handle survived the error: a forward pass still runs and gives a finite loss."""
    tokens, targets = tokens_for(TINY, seed=1)
    _, loss = model.forward(tokens, targets)
    assert np.isfinite(loss)


def _load_bad(model, tmp_path, data: bytes, match: str, status: str = "TD_ERR_FORMAT"):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(EngineError, match=match) as info:
        model.load_safetensors(path)
    assert info.value.status == status
    assert str(path) in str(info.value)  # the message names the file
    _still_works(model)


def _save_bad(model, tmp_path, tensors: dict, match: str):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    _load_bad(model, tmp_path, path.read_bytes(), match)


# ---- safetensors -------------------------------------------------------------------------------


def test_truncated_file(model, good_file, tmp_path):
    raw = good_file.read_bytes()
    _load_bad(model, tmp_path, raw[: len(raw) // 2],
              r"has data_offsets \[\d+, \d+\] but the data section holds \d+ bytes")
    _load_bad(model, tmp_path, raw[:5], r"is 5 bytes, too short for a safetensors file")
    _load_bad(model, tmp_path, raw[:100], r"declares a \d+-byte header but the file has 92 bytes")


def test_garbled_header_json(model, good_file, tmp_path):
    raw = good_file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].replace(b'"dtype":', b'"dtype"=', 1)  # same length, not JSON
    _load_bad(model, tmp_path, raw[:8] + header + raw[8 + n:],
              r"malformed JSON header: expected ':'")


def test_header_offsets_past_end_of_file(model, good_file, tmp_path):
    header, data = _split(good_file)
    header["ln_f.bias"]["data_offsets"] = [len(data), len(data) + 4 * TINY["n_embd"]]
    _load_bad(model, tmp_path, _join(header, data),
              rf"tensor 'ln_f.bias' has data_offsets \[{len(data)}, \d+\] but the data section "
              rf"holds {len(data)} bytes")


def test_wrong_shape(model, seeded_init, tmp_path):
    tensors = dict(seeded_init, **{"h.0.ln_1.weight": np.ones(13, np.float32)})
    _save_bad(model, tmp_path, tensors,
              r"tensor 'h.0.ln_1.weight' has shape \(13,\), the model expects \(12,\)")
    tensors = dict(seeded_init, **{"wte.weight": seeded_init["wte.weight"].T.copy()})
    _save_bad(model, tmp_path, tensors,
              r"tensor 'wte.weight' has shape \(12, 17\), the model expects \(17, 12\)")


def test_missing_tensor(model, seeded_init, tmp_path):
    tensors = {k: v for k, v in seeded_init.items() if k != "h.1.mlp.c_fc.bias"}
    _save_bad(model, tmp_path, tensors,
              r"lacks tensor 'h.1.mlp.c_fc.bias' \(expected shape \(48,\)\)")


def test_wrong_dtype(model, seeded_init, tmp_path):
    tensors = dict(seeded_init, **{"h.0.ln_1.bias": np.zeros(12, np.int32)})
    _save_bad(model, tmp_path, tensors, r"tensor 'h.0.ln_1.bias' has dtype I32")


@pytest.mark.parametrize("name", ["h.0.attn.rotary.weight", "h.2.ln_1.bias", "lm_head.weight"])
def test_unknown_tensor_name(model, seeded_init, tmp_path, name):
    tensors = dict(seeded_init, **{name: np.zeros(12, np.float32)})
    _save_bad(model, tmp_path, tensors,
              rf"holds tensor '{name}', which is not in the model's parameter table")


def test_failed_load_leaves_parameters_untouched(model, seeded_init, tmp_path):
    other = {k: v + 1.0 for k, v in seeded_init.items() if k != "ln_f.bias"}
    path = tmp_path / "partial.safetensors"
    save_file(other, str(path))
    with pytest.raises(EngineError, match="lacks tensor 'ln_f.bias'"):
        model.load_safetensors(path)
    for name, want in seeded_init.items():
        assert model.get_param(name).tobytes() == want.tobytes(), name


# ---- token shards ------------------------------------------------------------------------------


def _shard(path, ids, magic=0x544E4454, count=None, width=2):
    count = len(ids) if count is None else count
    header = struct.pack("<IIIIQ40s", magic, 1, width, 0, count, bytes(40))
    path.write_bytes(header + np.asarray(ids, "<u2" if width == 2 else "<u4").tobytes())
    return path


def test_good_shard_reads(tmp_path):
    ids = read_tokens(_shard(tmp_path / "ok.bin", [0, 16, 3], width=4), vocab_size=17)
    assert ids.dtype == np.int32 and ids.tolist() == [0, 16, 3]


def test_shard_with_wrong_magic(tmp_path):
    path = _shard(tmp_path / "s.bin", [1, 2, 3], magic=0x12345678)
    with pytest.raises(EngineError, match=r"has magic 0x12345678, expected 0x544E4454 \('TDNT'\)"):
        read_tokens(path)
    assert read_tokens(_shard(tmp_path / "ok.bin", [1, 2])).tolist() == [1, 2]


def test_shard_size_disagrees_with_header(tmp_path):
    path = _shard(tmp_path / "s.bin", [1, 2, 3], count=5)
    with pytest.raises(EngineError, match=r"header says 5 tokens of 2 bytes \(74 bytes with the "
                       r"header\) but the file has 70 bytes"):
        read_tokens(path)
    path = _shard(tmp_path / "s.bin", [1, 2, 3], count=2)
    with pytest.raises(EngineError, match=r"header says 2 tokens"):
        read_tokens(path)


def test_shard_token_at_or_above_vocab_size(tmp_path):
    path = _shard(tmp_path / "s.bin", [1, 17, 2])
    with pytest.raises(EngineError, match=r"token 1 is 17, outside \[0, vocab_size=17\)") as info:
        read_tokens(path, vocab_size=17)
    assert info.value.status == "TD_ERR_RANGE"
    assert read_tokens(path, vocab_size=18).tolist() == [1, 17, 2]


# ---- passes ------------------------------------------------------------------------------------


def test_token_id_at_vocab_size_passed_to_forward(model):
    tokens, targets = tokens_for(TINY, seed=1)
    tokens[1, 3] = TINY["vocab_size"]
    with pytest.raises(EngineError, match=r"tokens\[1, 3\] = 17 is outside \[0, vocab_size=17\)"):
        model.forward(tokens, targets)
    tokens[1, 3] = -1
    with pytest.raises(EngineError, match=r"tokens\[1, 3\] = -1 is outside"):
        model.forward(tokens)
    tokens[1, 3] = 0
    targets[0, 0] = 99
    with pytest.raises(EngineError, match=r"targets\[0, 0\] = 99 is outside"):
        model.forward_backward(tokens, targets)
    _still_works(model)


def test_batch_larger_than_batch_size(model):
    tokens = np.zeros((TINY["batch_size"] + 1, 2), np.int32)
    with pytest.raises(EngineError, match=r"B=3 is outside \[1, batch_size=2\]") as info:
        model.forward(tokens, tokens)
    assert info.value.status == "TD_ERR_ARG"
    with pytest.raises(EngineError, match=r"T=6 is outside \[1, seq_len=5\]"):
        model.forward(np.zeros((1, 6), np.int32))
    _still_works(model)


# ---- configuration -----------------------------------------------------------------------------


def _bad_config(match: str, **override):
    with pytest.raises(EngineError, match=match) as info:
        Model(**dict(TINY, **override))
    assert info.value.status == "TD_ERR_CONFIG"
    Model(**TINY).close()  # the library still builds good models


def test_n_embd_not_divisible_by_n_head():
    _bad_config(r"n_embd=13 is not divisible by n_head=3", n_embd=13)


def test_seq_len_beyond_n_positions():
    _bad_config(r"seq_len=9 exceeds n_positions=8", seq_len=9)


@pytest.mark.parametrize("key", ["n_layer", "n_embd", "n_head", "vocab_size", "n_positions",
                                 "seq_len", "batch_size"])
@pytest.mark.parametrize("value", [0, -3])
def test_zero_and_negative_sizes(key, value):
    _bad_config(rf"{key}={value} must be > 0", **{key: value})


def test_unknown_config_key():
    _bad_config(r"unknown key 'n_layers'", n_layers=2)
    _bad_config(r"unknown key 'dropout'", dropout=0.1)


def test_out_of_range_optimizer_value():
    _bad_config(r"lr=-1 is out of range", lr=-1.0)
    _bad_config(r"beta2=1 is out of range", beta2=1.0)


def test_unknown_fault_name_is_refused(monkeypatch):
    """A typo in TANDEM_FAULT must not let a fault-injection test pass without a fault."""
    monkeypatch.setenv("TANDEM_FAULT", "layernorm_bakward")
    with pytest.raises(EngineError, match=r"TANDEM_FAULT=layernorm_bakward names no kernel"):
        Model(**TINY)
    monkeypatch.setenv("TANDEM_FAULT", "layernorm_backward")
    Model(**TINY).close()
