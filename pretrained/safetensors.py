"""A reader for safetensors files (Hugging Face's weight format), numpy/torch only.

File layout:

    N          8 bytes, little-endian uint64: the length of the header
    header     N bytes of UTF-8 JSON: {name: {"dtype": "F32" | "F16" | "BF16" | ..., "shape":
               [..], "data_offsets": [begin, end]}, "__metadata__": {str: str} (optional)};
               offsets are relative to the first byte after the header
    data       the tensors' raw little-endian bytes, row-major (C order)

A sharded checkpoint has model.safetensors.index.json: {"metadata": {...}, "weight_map":
{tensor name: shard file name}}, next to the shard files.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import torch

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsError(ValueError):
    pass


def read_header(path: str) -> tuple:
    """-> (header dict without __metadata__, byte offset of the data section)."""
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
    header.pop("__metadata__", None)
    return header, 8 + n


def load_file(path: str) -> dict:
    """{name: float32 or integer torch tensor} of one safetensors file (BF16 and F16 become
    float32: the backbone is rebuilt in float32)."""
    header, start = read_header(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = buf[start + begin:start + end]
        shape = tuple(info["shape"])
        if info["dtype"] == "BF16":  # the high half of a float32
            arr = (np.asarray(raw).view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in DTYPES:
            arr = np.asarray(raw).view(np.dtype(DTYPES[info["dtype"]]).newbyteorder("<"))
            if arr.dtype.kind == "f":
                arr = arr.astype(np.float32)
        else:
            raise SafetensorsError(f"{path}: tensor {name} has dtype {info['dtype']}, which "
                                   f"this reader does not handle")
        if arr.size != int(np.prod(shape)):
            raise SafetensorsError(f"{path}: tensor {name}: {arr.size} values for shape {shape}")
        out[name] = torch.from_numpy(np.array(arr).reshape(shape))
    return out


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
