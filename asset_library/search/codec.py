"""The one hex <-> integer codec for 64-bit perceptual hashes (pHash, aHash, dHash).

Hashes are stored as 16-digit lower-case hex (ImageHash's convention: first bit most
significant) and searched as ``uint64``. Every conversion goes through here so that Python,
numpy and DuckDB agree bit for bit: :func:`hex_to_uint64` gives what DuckDB's
``('0x' || hex)::UBIGINT`` gives on valid input, and :func:`sql_hex_to_ubigint` spells that SQL
with the same validation. Upper-case digits are read as DuckDB reads them; output is lower-case.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

_HEX_DIGITS = 16
#: Every bit of a hash set: the largest hash, and the mask that folds int64 into uint64.
ALL_BITS = (1 << 64) - 1

_HEX = re.compile(f"[0-9a-fA-F]{{{_HEX_DIGITS}}}")
_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate("0123456789abcdef"):
    _HEX_LUT[ord(_c)] = _i
    _HEX_LUT[ord(_c.upper())] = _i


def hex_to_int(text: str) -> int:
    """One hash as a Python int; the scalar form of :func:`hex_to_uint64`."""
    if not isinstance(text, str) or not _HEX.fullmatch(text):
        raise ValueError(f"hash {text!r}: expected {_HEX_DIGITS} hex digits")
    return int(text, 16)


def int_to_hex(value: int) -> str:
    """One hash as 16 lower-case hex digits; the scalar form of :func:`uint64_to_hex`."""
    return f"{hash_int(value):016x}"


def hash_int(value: int | str | np.integer) -> int:
    """One hash as a Python int in ``[0, 2**64)``: hex, uint64, or int64 with the same bits
    (engines without unsigned types store hashes as int64)."""
    if isinstance(value, str):
        return hex_to_int(value)
    value = int(value)
    if not -(1 << 63) <= value <= ALL_BITS:
        raise ValueError(f"hash {value}: out of the 64-bit range")
    return value & ALL_BITS


def hex_to_uint64(values: Iterable[str] | np.ndarray) -> np.ndarray:
    """Parse hex hashes (as stored in tables and Parquet) without a Python loop.

    Accepts a list, a numpy array of str/bytes, or anything with ``to_numpy`` (a pyarrow array
    or a pandas Series); upper-case digits are accepted as DuckDB accepts them. The digits are
    read straight from the array's code units: no per-string work unless a value is bad."""
    to_numpy = getattr(values, "to_numpy", None)  # a pyarrow array or a pandas Series
    if to_numpy is not None and not isinstance(values, np.ndarray):
        arrow = type(values).__module__.startswith("pyarrow")
        values = to_numpy(zero_copy_only=False) if arrow else to_numpy()
    given = np.asarray(values if isinstance(values, np.ndarray) else list(values))
    if given.size == 0:
        return np.zeros(given.shape, dtype=np.uint64)
    arr = given
    if arr.dtype.kind == "O":
        flat = arr.ravel().tolist()
        if not all(type(v) is str for v in flat):
            _raise_first_bad(given, np.array([isinstance(v, str) for v in flat]))
        arr = np.array(flat, dtype=str).reshape(given.shape)
    if arr.dtype.kind not in "US":
        raise TypeError(f"hex_to_uint64: expected strings, got dtype {arr.dtype}")
    unit = 4 if arr.dtype.kind == "U" else 1
    if arr.dtype.itemsize != _HEX_DIGITS * unit:
        lengths_ok = np.strings.str_len(arr) == _HEX_DIGITS
        if not lengths_ok.all():
            _raise_first_bad(given, lengths_ok)
        arr = arr.astype(f"{arr.dtype.kind}{_HEX_DIGITS}")
    codes = np.ascontiguousarray(arr).reshape(-1).view(np.uint32 if unit == 4 else np.uint8)
    if unit == 4:
        codes = np.minimum(codes, 255)  # any code point past Latin-1 is no hex digit either
    nibbles = _HEX_LUT[codes].reshape(-1, _HEX_DIGITS)
    ok = ~(nibbles == 255).any(axis=1)
    if not ok.all():
        _raise_first_bad(given, ok)
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return np.ascontiguousarray(packed).view(">u8").reshape(arr.shape).astype(np.uint64)


def _raise_first_bad(given: np.ndarray, ok: np.ndarray) -> None:
    """Name the first value where ``ok`` is false, its position and why: a batch error must
    say which hash is bad, not only that one is."""
    position = int(np.flatnonzero(~ok.ravel())[0])
    value = given.ravel()[position]
    value = value.item() if isinstance(value, np.generic) else value
    if not isinstance(value, str | bytes):
        reason = "not a string"
    elif len(value) != _HEX_DIGITS:
        reason = f"not {_HEX_DIGITS} characters"
    elif not value.isascii():
        reason = "not ASCII"
    else:
        reason = "not hex digits"
    raise ValueError(f"hash {value!r} (value {position}): {reason}")


def uint64_to_hex(values: np.ndarray | Sequence[int]) -> np.ndarray:
    """Format hashes back to the 16-digit lower-case hex used everywhere else."""
    arr = as_uint64(values)
    shape = arr.shape
    big = np.ascontiguousarray(arr.reshape(-1).astype(">u8")).view(np.uint8).reshape(-1, 8)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    out = np.empty((big.shape[0], _HEX_DIGITS), dtype=np.uint8)
    out[:, 0::2] = digits[big >> 4]
    out[:, 1::2] = digits[big & 15]
    return out.view(f"S{_HEX_DIGITS}").reshape(shape).astype(f"U{_HEX_DIGITS}")


def as_uint64(values: np.ndarray | Sequence[int] | Sequence[str]) -> np.ndarray:
    """Hashes as a uint64 array, from uint64, int64 (same bits), other ints, hex or objects."""
    arr = np.asarray(values)
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype == np.int64:
        return arr.view(np.uint64)
    if arr.dtype.kind in "US":
        return hex_to_uint64(arr)
    if arr.dtype.kind in "iu":
        if arr.size and arr.min() < 0:
            return arr.astype(np.int64).view(np.uint64)
        return arr.astype(np.uint64)
    if arr.dtype.kind == "O":
        return np.array([hash_int(v) for v in arr.ravel()], dtype=np.uint64).reshape(arr.shape)
    raise TypeError(f"expected 64-bit hashes, got dtype {arr.dtype}")


def sql_hex_to_ubigint(expression: str) -> str:
    """DuckDB SQL turning a hex hash expression into ``UBIGINT``, the value
    :func:`hex_to_uint64` gives, for views and macros that compare hashes inside DuckDB.

    A bare ``('0x' || h)::UBIGINT`` reads ``'abc'`` as ``0xabc`` and 17 digits with a leading 0
    as 16; this form fails on anything but 16 hex digits, naming the value, as the numpy
    codec does. NULL stays NULL."""
    e = f"({expression})"
    return (
        f"CASE WHEN regexp_full_match({e}, '[0-9a-fA-F]{{{_HEX_DIGITS}}}') "
        f"THEN ('0x' || {e})::UBIGINT WHEN {e} IS NULL THEN NULL "
        f"ELSE error('hash ' || {e} || ': expected {_HEX_DIGITS} hex digits') END"
    )
