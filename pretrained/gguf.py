"""A reader for GGUF version 3 files (llama.cpp's format), numpy only.

File layout (all integers little-endian):

    magic          4 bytes  b"GGUF"
    version        uint32   3 (2 has the same layout; 1 used 32-bit counts and is refused)
    n_tensors      uint64
    n_kv           uint64
    n_kv x metadata key/value:
        key        string   (uint64 byte length, then UTF-8 bytes, no terminator)
        type       uint32   a value type below
        value      the value; an ARRAY is (uint32 element type, uint64 count, elements)
    n_tensors x tensor info:
        name       string
        n_dims     uint32
        dims       n_dims x uint64, FASTEST-VARYING FIRST: a PyTorch (out, in) matrix has
                   dims [in, out]; the data is row-major with dims[0] contiguous
        type       uint32   a ggml tensor type below
        offset     uint64   from the start of the data section; a multiple of the alignment
    padding to `general.alignment` (default 32) bytes, then the data section

Quantised types store blocks of 32 consecutive values of a row (along dims[0]):

    Q4_0  18 bytes: f16 scale d, 16 bytes of 4-bit codes q;      x = d * (q - 8)
    Q4_1  20 bytes: f16 scale d, f16 minimum m, 16 bytes of q;   x = d * q + m
    Q8_0  34 bytes: f16 scale d, 32 int8 codes q;                x = d * q
    Q5_0  22 bytes: f16 d, 4 bytes of high bits, 16 bytes of low nibbles; x = d * (q - 16)
    Q5_1  24 bytes: f16 d, f16 m, 4 bytes of high bits, 16 bytes of low nibbles; x = d * q + m

In the 4-bit (and the low 4 bits of the 5-bit) codes, byte j holds element j in its low nibble
and element j + 16 in its high nibble. In Q5 the 5th bit of element j is bit j of the uint32.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np

GGUF_MAGIC = b"GGUF"

# metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = \
    range(13)
_SCALAR = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4",
           FLOAT32: "<f4", BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}

# ggml tensor types: id -> (name, values per block, bytes per block)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16 = 0, 1, 2, 3, 6, 7, 8, 30
TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q4_0: ("Q4_0", 32, 18), Q4_1: ("Q4_1", 32, 20),
         Q5_0: ("Q5_0", 32, 22), Q5_1: ("Q5_1", 32, 24), Q8_0: ("Q8_0", 32, 34),
         BF16: ("BF16", 1, 2)}


class GGUFError(ValueError):
    pass


@dataclass
class TensorInfo:
    name: str
    shape: tuple  # PyTorch order (slowest first): dims reversed
    type: int
    offset: int  # absolute, in the file

    @property
    def n_values(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def n_bytes(self) -> int:
        _, per_block, block_bytes = TYPES[self.type]
        return self.n_values // per_block * block_bytes


class _Cursor:
    """Sequential reads from a bytes-like buffer (the memory-mapped file)."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int):
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated (wanted {n} bytes at offset {self.pos})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError(f"{self.path}: truncated (wanted {size} bytes at offset {self.pos})")
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        return str(self.take(self.scalar("Q")), "utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.scalar("I"), self.scalar("Q")
            if etype in _SCALAR:  # numbers in one read
                dt = np.dtype(_SCALAR[etype])
                arr = np.frombuffer(self.take(n * dt.itemsize), dtype=dt)
                return arr.astype(bool).tolist() if etype == BOOL else arr.tolist()
            return [self.value(etype) for _ in range(n)]
        if vtype in _SCALAR:
            dt = np.dtype(_SCALAR[vtype])
            v = np.frombuffer(self.take(dt.itemsize), dtype=dt)[0].item()
            return bool(v) if vtype == BOOL else v
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype} at offset {self.pos}")


class GGUFFile:
    """metadata: {key: value}; tensors: {name: TensorInfo}; tensor(name) -> float32 numpy array
    in PyTorch shape. The file is memory-mapped; nothing is read until asked for."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.buf = np.frombuffer(self._mm, dtype=np.uint8)
        c = _Cursor(self._mm, path)
        if bytes(c.take(4)) != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (bad magic)")
        self.version = c.scalar("I")
        if self.version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = c.scalar("Q"), c.scalar("Q")
        self.metadata = {}
        for _ in range(n_kv):
            key = c.string()
            self.metadata[key] = c.value(c.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.scalar("Q") for _ in range(c.scalar("I"))]
            ttype, offset = c.scalar("I"), c.scalar("Q")
            infos.append((name, tuple(reversed(dims)), ttype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        self.data_start = (c.pos + align - 1) // align * align
        self.tensors = {}
        for name, shape, ttype, offset in infos:
            if ttype not in TYPES:
                known = ", ".join(t[0] for t in TYPES.values())
                raise GGUFError(f"{path}: tensor {name} has ggml type {ttype}, which this reader "
                                f"does not decode (it reads {known})")
            info = TensorInfo(name, shape, ttype, self.data_start + offset)
            if shape and shape[-1] % TYPES[ttype][1]:
                raise GGUFError(f"{path}: tensor {name}: row length {shape[-1]} is not a whole "
                                f"number of {TYPES[ttype][0]} blocks")
            if info.offset + info.n_bytes > len(self.buf):
                raise GGUFError(f"{path}: tensor {name} runs past the end of the file")
            self.tensors[name] = info

    def type_name(self, name: str) -> str:
        return TYPES[self.tensors[name].type][0]

    def raw(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return self.buf[info.offset:info.offset + info.n_bytes]

    def tensor(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return dequantize(self.raw(name), info.type, info.n_values).reshape(info.shape)


def _f16(blocks, start):
    """Little-endian float16 at byte `start` of every block -> (n, 1) float32."""
    return blocks[:, start:start + 2].copy().view("<f2").astype(np.float32)


def _nibbles(qs):
    """(n, 16) bytes -> (n, 32) codes: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _high_bits(blocks, start):
    """Q5: a little-endian uint32 whose bit j is the 5th bit of element j -> (n, 32) of 0/16."""
    bits = blocks[:, start:start + 4].copy().view("<u4")  # (n, 1)
    return (((bits >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.float32)


def dequantize(data: np.ndarray, ttype: int, n_values: int) -> np.ndarray:
    """Raw bytes of a tensor (uint8) -> float32 values (flat)."""
    name, per_block, block_bytes = TYPES[ttype]
    data = np.asarray(data, dtype=np.uint8)
    if ttype == F32:
        return data.view("<f4").astype(np.float32)
    if ttype == F16:
        return data.view("<f2").astype(np.float32)
    if ttype == BF16:  # the high half of a float32
        return (data.view("<u2").astype(np.uint32) << 16).view(np.float32)
    blocks = data.reshape(-1, block_bytes)
    if ttype == Q8_0:
        x = _f16(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)
    elif ttype == Q4_0:
        x = _f16(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8)
    elif ttype == Q4_1:
        x = _f16(blocks, 0) * _nibbles(blocks[:, 4:]) + _f16(blocks, 2)
    elif ttype == Q5_0:
        x = _f16(blocks, 0) * (_nibbles(blocks[:, 6:]) + _high_bits(blocks, 2) - 16)
    elif ttype == Q5_1:
        x = _f16(blocks, 0) * (_nibbles(blocks[:, 8:]) + _high_bits(blocks, 4)) + _f16(blocks, 2)
    else:  # pragma: no cover (TYPES and this table go together)
        raise GGUFError(f"no decoder for {name}")
    out = x.reshape(-1)
    assert out.size == n_values
    return out
