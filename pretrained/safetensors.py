"""A reader and a writer for safetensors files (Hugging Face's weight format), numpy/torch only.

File layout:

    N          8 bytes, little-endian uint64: the length of the header
    header     N bytes of UTF-8 JSON: {name: {"dtype": "F32" | "F16" | "BF16" | ..., "shape":
               [..], "data_offsets": [begin, end]}, "__metadata__": {str: str} (optional)};
               offsets are relative to the first byte after the header
    data       the tensors' raw little-endian bytes, row-major (C order)

A sharded checkpoint has model.safetensors.index.json: {"metadata": {...}, "weight_map":
{tensor name: shard file name}}, next to the shard files.

    read_header, read_metadata, load_file, load_dir      reading (load_file(keep_dtype=True)
                                                          keeps F16/BF16/F64 as they are)
    save_file                                             writing (atomically), bit-exact
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import torch

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
# torch dtype -> safetensors name, for the writer (BF16 is written through a 16-bit integer view)
TORCH_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
               torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsError(ValueError):
    pass


def _read_raw_header(path: str) -> tuple:
    """-> (the whole header dict, __metadata__ included; the byte offset of the data)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path) - 8:
            raise SafetensorsError(f"{path}: header length {n} runs past the end of the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    return header, 8 + n


def read_header(path: str) -> tuple:
    """-> (header dict without __metadata__, byte offset of the data section)."""
    header, start = _read_raw_header(path)
    header.pop("__metadata__", None)
    return header, start


def read_metadata(path: str) -> dict:
    """The header's __metadata__ ({str: str}), {} when there is none."""
    return _read_raw_header(path)[0].get("__metadata__") or {}


def _check_entry(path: str, name: str, info, data_len: int) -> tuple:
    """-> (dtype name, shape, begin, end) of a well-formed header entry."""
    ok = isinstance(info, dict) and isinstance(info.get("dtype"), str)
    shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
    ints = (lambda xs: isinstance(xs, list) and
            all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs))
    if not (ok and ints(shape) and ints(offsets) and len(offsets) == 2):
        raise SafetensorsError(f"{path}: tensor {name}: malformed header entry {info!r}")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise SafetensorsError(f"{path}: tensor {name}: bytes {begin}..{end} run past the end "
                               f"of the file ({data_len} data bytes)")
    return info["dtype"], tuple(shape), begin, end


def load_file(path: str, keep_dtype: bool = False) -> dict:
    """{name: torch tensor} of one safetensors file, in the header's order. By default BF16,
    F16 and F64 become float32 (the backbone is rebuilt in float32); keep_dtype=True returns
    every tensor in its stored dtype, bit for bit (what save_file wrote)."""
    header, start = read_header(path)
    data_len = os.path.getsize(path) - start
    buf = np.memmap(path, dtype=np.uint8, mode="r") if data_len > 0 else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        dtype, shape, begin, end = _check_entry(path, name, info, data_len)
        raw = np.asarray(buf[start + begin:start + end])
        size = {"BF16": 2}.get(dtype) or (np.dtype(DTYPES[dtype]).itemsize
                                           if dtype in DTYPES else None)
        if size is None:
            raise SafetensorsError(f"{path}: tensor {name} has dtype {dtype}, which "
                                   f"this reader does not handle")
        if raw.size != int(np.prod(shape)) * size:
            raise SafetensorsError(f"{path}: tensor {name}: {raw.size // size} values for "
                                   f"shape {shape}")
        # (every astype copies: the tensors do not keep the file mapped)
        if dtype == "BF16" and keep_dtype:  # the same 16 bits, as torch's bfloat16
            bits = raw.view("<i2").astype("=i2").reshape(shape)
            out[name] = torch.from_numpy(bits).view(torch.bfloat16)
            continue
        if dtype == "BF16":  # the high half of a float32
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.view(np.dtype(DTYPES[dtype]).newbyteorder("<"))
            arr = arr.astype(np.float32 if arr.dtype.kind == "f" and not keep_dtype
                             else arr.dtype.newbyteorder("="))
        out[name] = torch.from_numpy(arr.reshape(shape))
    return out


def save_file(tensors: dict, path: str, metadata: dict = None):
    """Write {name: tensor} as one safetensors file at `path`, atomically (a temporary file in
    the same directory, then os.replace). Every dtype of TORCH_NAMES, any shape (scalars and
    empty tensors too), bit-exact; `metadata` ({str: str}) goes into __metadata__. The header is
    padded with spaces to a multiple of 8 bytes and the tensors are laid out widest dtype first
    (in their given order within a dtype width), so each one starts aligned to its element
    size; the header lists them in the given order."""
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise SafetensorsError("safetensors metadata must be a {str: str} dict")
    arrays = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"{path}: tensor name {name!r} is not allowed")
        if not isinstance(t, torch.Tensor) or t.dtype not in TORCH_NAMES:
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise SafetensorsError(f"{path}: tensor {name}: {what} cannot be written "
                                   f"({', '.join(TORCH_NAMES.values())})")
        t = t.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)  # the raw bits: numpy has no bfloat16
        a = t.numpy()
        arrays[name] = (TORCH_NAMES[tensors[name].dtype], tuple(t.shape),
                        np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)))
    order = sorted(arrays, key=lambda n: -arrays[n][2].itemsize)  # stable: widest first
    offsets, pos = {}, 0
    for name in order:
        offsets[name] = (pos, pos + arrays[name][2].nbytes)
        pos += arrays[name][2].nbytes
    header = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, (dtype, shape, _) in arrays.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": list(offsets[name])}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name in order:
                f.write(arrays[name][2].reshape(-1).view(np.uint8).data)
    _atomic_write(path, write)


def _atomic_write(path: str, write):
    from plumbing.checkpoint import atomic_write  # lazily: plumbing imports this package
    atomic_write(path, write)


def load_dir(path: str) -> dict:
    """Every tensor of a model directory: model.safetensors, or the shards listed in
    model.safetensors.index.json."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        out = {}
        for shard in sorted(set(weight_map.values())):
            tensors = load_file(os.path.join(path, shard))
            out.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise SafetensorsError(f"{index}: tensors not found in their shards: {missing[:5]}")
        return out
    single = os.path.join(path, SINGLE)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{single}: not found (nor {INDEX})")
    return load_file(single)
