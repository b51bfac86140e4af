"""Large float32 tensors in a safetensors file, written and read through a memory map.

Cached features are N x views x dim floats, which for a few hundred thousand images need not
fit in RAM: the file is laid out first (the safetensors header: 8-byte length, JSON with
each tensor's dtype, shape and byte range), rows are written into the map as they come, and
readers map it back without loading it. Any safetensors reader (`safetensors.torch.load_file`)
reads these files too.
"""

import json
import struct
import warnings

import numpy as np
import torch


def create(path: str, shapes: dict) -> dict:
    """A new file at `path` holding float32 tensors {name: shape}; returns {name: writable
    np.memmap}. The caller fills the rows, then flushes."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        fh.truncate(8 + len(text) + offset)
    return _maps(path, "r+")


def _maps(path, mode):
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {info['dtype']}, expected F32")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        out[name] = (np.memmap(path, dtype=np.float32, mode=mode, offset=8 + n + begin,
                               shape=shape) if end > begin else np.zeros(shape, np.float32))
    return out


def open_read(path: str) -> dict:
    """{name: torch tensor} backed by the file's pages (copy-on-write: nothing is loaded
    until read, and nothing written back)."""
    with warnings.catch_warnings():  # torch warns about non-writable arrays; these are
        warnings.simplefilter("ignore")  # copy-on-write maps, never written
        return {k: torch.from_numpy(v) for k, v in _maps(path, "c").items()}
