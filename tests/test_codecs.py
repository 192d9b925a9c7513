"""Tests for fedkd.codecs: exact byte counts, round trips, error bounds, error cases."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedkd.codecs import (HEADER_BYTES, Fp16Codec, Fp32Codec, Int8Codec, TopKCodec,
                          decode_any, get_codec)

# Deterministic and no example database written into the working tree.
FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None)
SPECS = ["fp32", "fp16", "int8", "topk:1", "topk:3", "topk:3:fp32", "topk:50"]
FP16_MAX = 65504.0

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
matrices = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=12),
                      elements=finite_f32)


def rng_matrix(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, size=(rows, cols)).astype(np.float32)


def reseal(payload: bytearray) -> bytes:
    """Recomputes the CRC so a test can reach the checks behind it."""
    crc = zlib.crc32(bytes(payload[HEADER_BYTES:]), zlib.crc32(bytes(payload[:HEADER_BYTES - 4])))
    payload[HEADER_BYTES - 4:HEADER_BYTES] = struct.pack("<I", crc)
    return bytes(payload)


# --- sizes ---------------------------------------------------------------------------

def test_int8_4x10_size_worked_by_hand():
    # Prepare: 4 rows x 10 cols.
    x = rng_matrix(4, 10)
    # Execute
    payload = Int8Codec().encode(x)
    # Assert: header 20 (2 magic + 1 id + 1 flags + 4 rows + 4 cols + 4 param + 4 crc)
    #         + 4 rows * 4 bytes float32 scale = 16 + 4*10 int8 values = 40  -> 76 bytes.
    assert len(payload) == 20 + 16 + 40 == 76
    assert Int8Codec().encoded_size(4, 10) == 76


def test_topk_2x10_size_worked_by_hand():
    # Prepare
    codec = get_codec("topk:3")
    # Execute
    payload = codec.encode(rng_matrix(2, 10))
    # Assert: header 20 + 2 rows * 3 kept * (2 bytes uint16 index + 2 bytes float16 value) = 24
    #         + 2 rows * 4 bytes float32 mean fill = 8  -> 52 bytes; fp32 values add 2*3*2 = 12.
    assert len(payload) == codec.encoded_size(2, 10) == 52
    assert get_codec("topk:3:fp32").encoded_size(2, 10) == 64


@FAST
@given(x=matrices, spec=st.sampled_from(SPECS))
def test_encoded_size_equals_payload_length(x, spec):
    # Prepare
    codec = get_codec(spec)
    rows, cols = (1, x.shape[0]) if x.ndim == 1 else x.shape
    # Execute
    payload = codec.encode(x)
    # Assert
    assert len(payload) == codec.encoded_size(rows, cols)


def test_topk_uses_uint32_indices_beyond_65535_cols():
    # Prepare
    x = np.zeros((1, 70_000), dtype=np.float32)
    x[0, 69_999] = 7.0
    codec = TopKCodec(2, value_dtype="float32")
    # Execute
    payload = codec.encode(x)
    decoded = codec.decode(payload)
    # Assert: 20 header + 2 * (4 index + 4 value) + 4 fill.
    assert len(payload) == codec.encoded_size(1, 70_000) == 20 + 16 + 4
    assert decoded[0, 69_999] == 7.0 and np.count_nonzero(decoded) == 1


# --- round trips ---------------------------------------------------------------------

@FAST
@given(x=matrices)
def test_fp32_round_trip_is_exact_and_keeps_shape(x):
    decoded = Fp32Codec().decode(Fp32Codec().encode(x))
    assert decoded.dtype == np.float32 and decoded.shape == x.shape
    np.testing.assert_array_equal(decoded, x)


@FAST
@given(x=matrices)
def test_fp16_round_trip_within_half_precision_and_clipped(x):
    # Prepare: fp16 clips to its finite range instead of producing inf.
    expected = np.clip(x.astype(np.float64), -FP16_MAX, FP16_MAX)
    # Execute
    decoded = Fp16Codec().decode(Fp16Codec().encode(x))
    # Assert: relative error 2**-11, absolute 2**-25 for float16 subnormals.
    assert decoded.shape == x.shape and np.isfinite(decoded).all()
    assert np.all(np.abs(decoded - expected) <= 2**-11 * np.abs(expected) + 2**-25)


def test_fp16_clips_out_of_range_values():
    decoded = get_codec("fp16").decode(get_codec("fp16").encode(np.array([1e6, -1e6, 1.5], np.float32)))
    np.testing.assert_array_equal(decoded, [FP16_MAX, -FP16_MAX, 1.5])


@FAST
@given(x=matrices)
def test_int8_error_at_most_half_a_step_per_row(x):
    # Prepare
    rows = x.reshape(1, -1) if x.ndim == 1 else x
    max_abs = np.abs(rows.astype(np.float64)).max(axis=1, initial=0.0)
    scale = (max_abs / 127).astype(np.float32).astype(np.float64)
    # Execute
    decoded = Int8Codec().decode(Int8Codec().encode(x))
    # Assert: scale/2 from rounding to the int8 grid, plus float32 rounding of the result.
    error = np.abs(decoded.reshape(rows.shape).astype(np.float64) - rows)
    bound = scale / 2 * (1 + 1e-9) + 2**-24 * max_abs + np.finfo(np.float32).smallest_subnormal
    assert decoded.shape == x.shape and np.isfinite(decoded).all()
    assert np.all(error <= bound[:, None])


def test_int8_zero_row_has_zero_scale_and_decodes_to_zeros():
    # Prepare
    x = np.array([[0, 0, 0], [1, -2, 0.5]], dtype=np.float32)
    # Execute
    payload = Int8Codec().encode(x)
    scales = np.frombuffer(payload, "<f4", count=2, offset=HEADER_BYTES)
    decoded = Int8Codec().decode(payload)
    # Assert
    np.testing.assert_array_equal(scales, np.float32([0, 2 / 127]))
    np.testing.assert_array_equal(decoded[0], [0, 0, 0])
    np.testing.assert_allclose(decoded[1], x[1], atol=1 / 127)


def test_topk_keeps_exactly_the_largest_magnitudes_on_hand_made_array():
    # Prepare: row 0 keeps -5 (col 1) and 4 (col 4); dropped 0.1, 3, 0.2 -> mean 1.1.
    #          row 1 is all ties in magnitude: the lower columns 0 and 1 win; dropped 1, -1, 0 -> 0.
    x = np.array([[0.1, -5, 3, 0.2, 4], [1, 1, 1, -1, 0]], dtype=np.float32)
    codec = get_codec("topk:2:fp32")
    # Execute
    decoded = codec.decode(codec.encode(x))
    # Assert
    np.testing.assert_allclose(decoded, [[1.1, -5, 1.1, 1.1, 4], [1, 1, 0, 0, 0]], rtol=1e-6)


def test_topk_constant_fill_and_float16_values():
    # Prepare
    x = np.array([0.5, -9.0, 2.25, 100.0], dtype=np.float32)
    codec = TopKCodec(2, fill=-1.0)
    # Execute
    payload = codec.encode(x)
    # Assert: one float32 fill for the whole payload instead of one per row.
    assert len(payload) == codec.encoded_size(1, 4) == 20 + 2 * (2 + 2) + 4
    np.testing.assert_array_equal(decode_any(payload), [-1.0, -9.0, -1.0, 100.0])


def test_topk_mean_fill_keeps_row_sums_and_k_is_clipped_to_cols():
    # Prepare
    x = rng_matrix(5, 8, seed=1)
    # Execute
    partial = get_codec("topk:3:fp32").decode(get_codec("topk:3:fp32").encode(x))
    full = get_codec("topk:50:fp32").decode(get_codec("topk:50:fp32").encode(x))
    # Assert
    np.testing.assert_allclose(partial.sum(axis=1), x.sum(axis=1), atol=1e-4)
    np.testing.assert_array_equal(full, x)


@pytest.mark.parametrize("spec", SPECS)
def test_decode_any_reads_the_codec_from_the_header(spec):
    # Prepare
    x = rng_matrix(3, 7, seed=2)
    codec = get_codec(spec)
    payload = codec.encode(x)
    # Execute / Assert: same result as the sender's codec, and encoding is deterministic.
    np.testing.assert_array_equal(decode_any(payload), codec.decode(payload))
    assert codec.encode(x) == payload


def test_one_dimensional_and_empty_inputs_keep_their_shape():
    for spec in SPECS:
        codec = get_codec(spec)
        assert codec.decode(codec.encode(np.arange(6, dtype=np.float32))).shape == (6,)
        assert codec.decode(codec.encode(np.zeros((0, 4), np.float32))).shape == (0, 4)


# --- registry and errors -------------------------------------------------------------

def test_get_codec_parses_valid_specs():
    assert [get_codec(s).name for s in ["fp32", "fp16", "int8", "topk:5", "topk:5:fp16", "topk:5:fp32"]] == \
        ["fp32", "fp16", "int8", "topk:5", "topk:5", "topk:5:fp32"]
    assert get_codec("topk:5:fp32").value_dtype == "float32" and get_codec("topk:5").k == 5


@pytest.mark.parametrize("spec", ["fp64", "", "topk", "topk:0", "topk:-1", "topk:x", "topk:5:int8",
                                  "topk:5:fp32:extra", "INT8", "topk:²"])
def test_get_codec_rejects_unknown_specs_listing_valid_forms(spec):
    with pytest.raises(ValueError, match="valid forms"):
        get_codec(spec)


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan], np.float32), np.array([[np.inf]], np.float32),
                                 np.array([1e300]), np.array([-np.inf, 0.0])])
@pytest.mark.parametrize("spec", SPECS)
def test_encode_rejects_non_finite_values(spec, bad):
    with pytest.raises(ValueError, match="non-finite values"):
        get_codec(spec).encode(bad)


def test_encode_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="1-D or 2-D"):
        Fp32Codec().encode(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="real numeric"):
        Fp32Codec().encode(np.array([1 + 2j]))
    with pytest.raises(ValueError, match="k >= 1"):
        TopKCodec(0)


@pytest.mark.parametrize("spec", SPECS)
def test_decode_rejects_every_truncation_and_every_single_byte_corruption(spec):
    # Prepare
    payload = get_codec(spec).encode(rng_matrix(2, 5, seed=3))
    # Execute / Assert: every prefix, one extra byte, and every flipped byte.
    for cut in range(len(payload)):
        with pytest.raises(ValueError):
            decode_any(payload[:cut])
    with pytest.raises(ValueError):
        decode_any(payload + b"\0")
    for i in range(len(payload)):
        corrupted = bytearray(payload)
        corrupted[i] ^= 0x5A
        with pytest.raises(ValueError):
            get_codec(spec).decode(bytes(corrupted))


def test_decode_rejects_wrong_codec_and_garbage():
    payload = get_codec("fp16").encode(rng_matrix(2, 3))
    with pytest.raises(ValueError, match="encoded with codec 'fp16', not 'int8'"):
        Int8Codec().decode(payload)
    with pytest.raises(ValueError, match="not a fedkd codec payload"):
        decode_any(b"\x80\x04" + bytes(30))  # e.g. a pickle
    with pytest.raises(ValueError, match="payload must be bytes"):
        decode_any("FK")  # type: ignore[arg-type]


def test_decode_rejects_malformed_bodies_even_with_a_valid_crc():
    # Prepare: top-k payload whose first index points past the last column.
    topk = bytearray(get_codec("topk:2").encode(rng_matrix(1, 5)))
    topk[HEADER_BYTES:HEADER_BYTES + 2] = struct.pack("<H", 9)
    repeated = bytearray(get_codec("topk:2").encode(rng_matrix(1, 5)))
    repeated[HEADER_BYTES:HEADER_BYTES + 4] = struct.pack("<2H", 3, 3)
    # int8 payload with the reserved value -128 and one with a negative scale.
    q128 = bytearray(Int8Codec().encode(rng_matrix(1, 4)))
    q128[HEADER_BYTES + 4] = 0x80
    neg_scale = bytearray(Int8Codec().encode(rng_matrix(1, 4)))
    neg_scale[HEADER_BYTES:HEADER_BYTES + 4] = struct.pack("<f", -1.0)
    # fp32 payload holding an inf, and one whose header claims more rows than it carries.
    inf32 = bytearray(Fp32Codec().encode(rng_matrix(1, 2)))
    inf32[HEADER_BYTES:HEADER_BYTES + 4] = struct.pack("<f", np.inf)
    rows = bytearray(Fp32Codec().encode(rng_matrix(1, 2)))
    rows[4:8] = struct.pack("<I", 3)
    # Execute / Assert
    for payload, message in [(topk, "indices"), (repeated, "not increasing"), (q128, "quantised"),
                             (neg_scale, "scale"), (inf32, "non-finite"), (rows, "header says")]:
        with pytest.raises(ValueError, match=message):
            decode_any(reseal(payload))
