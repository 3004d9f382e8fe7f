"""Read and write safetensors files with NumPy alone (bfloat16 included).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header mapping tensor names to ``{"dtype", "shape", "data_offsets"}`` (plus an optional
``"__metadata__"`` of strings), then the raw little-endian bytes. NumPy has no bfloat16, so BF16
tensors are read as their exact float32 values and written by rounding to nearest-even.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) nearest to ``x`` (round to nearest, ties to even)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to the nearest bfloat16-representable value, returned in x's float dtype."""
    return from_bf16_bits(bf16_bits(x)).astype(np.result_type(x, np.float32))


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as NumPy arrays (BF16 -> exact float32)."""
    path = Path(path)
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            f.seek(base + start)
            raw = f.read(end - start)
            if info["dtype"] == "BF16":
                arr = from_bf16_bits(np.frombuffer(raw, dtype="<u2"))
            elif info["dtype"] in _DTYPES:
                arr = np.frombuffer(raw, dtype=np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")).astype(
                    _DTYPES[info["dtype"]])
            else:
                raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which refquant cannot read.")
            out[name] = arr.reshape(info["shape"])
    return out


def read_dir(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face checkpoint directory (single file or sharded with an index)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"no model.safetensors or model.safetensors.index.json in {model_dir}; "
            "refquant reads Hugging Face checkpoints saved with safe_serialization=True."
        )
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(read(model_dir / shard))
    return tensors


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], bf16: tuple[str, ...] | bool = (),
          metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (temporary name, then rename).

    ``bf16``: names to store as bfloat16 (``True`` for every floating tensor); other tensors keep
    their dtype.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    blobs, offset = [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        as_bf16 = (bf16 and arr.dtype.kind == "f") if isinstance(bf16, bool) else name in bf16
        if as_bf16:
            raw, dtype = bf16_bits(arr).astype("<u2").tobytes(), "BF16"
        else:
            if arr.dtype not in _NAMES:
                raise ValueError(f"tensor {name}: dtype {arr.dtype} cannot be written to safetensors here.")
            raw, dtype = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes(), _NAMES[arr.dtype]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)
