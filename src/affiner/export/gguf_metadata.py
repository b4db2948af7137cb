"""GGUF metadata as (key, value, type, element type) entries: what the writers add (`gguf_writer` for a
model, `gguf_lora` for a LoRA adapter), and a fast reader.

gguf's GGUFReader takes tens of seconds over a 262k-token vocabulary (it builds numpy views of every
field); `read_metadata` walks the same bytes with `struct` and reads it in about a second.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from gguf import GGUFValueType

from affiner.core.errors import AffinerError

# One metadata entry as GGUFWriter.add_key_value takes it: key, value, type, element type of an array.
Entry = tuple[str, Any, GGUFValueType, "GGUFValueType | None"]

# struct formats of GGUF's scalar value types, by GGUFValueType number.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_HEADER = 24  # magic, version, tensor count, metadata count


def entry(key: str, value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> Entry:
    return key, value, vtype, sub_type


def read_metadata(path: Path, prefix: str = "") -> list[Entry]:
    """The metadata entries of a GGUF file whose keys start with `prefix`, in file order."""
    out = []
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        magic, _version, _tensors, count = struct.unpack_from("<4sIQQ", blob, 0)
        if magic != b"GGUF":
            raise AffinerError(f"{path} is not a GGUF file.")
        pos = _HEADER
        for _ in range(count):
            key, pos = _read_string(blob, pos)
            (vtype,) = struct.unpack_from("<I", blob, pos)
            value, sub_type, pos = _read_value(blob, pos + 4, GGUFValueType(vtype))
            if key.startswith(prefix):
                out.append(entry(key, value, GGUFValueType(vtype), sub_type))
    return out


def _read_string(blob: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    return bytes(blob[pos + 8:pos + 8 + length]).decode("utf-8"), pos + 8 + length


def _read_value(blob: mmap.mmap, pos: int, vtype: GGUFValueType) -> tuple[Any, GGUFValueType | None, int]:
    """(value, element type of an array or None, position after the value)."""
    if vtype == GGUFValueType.STRING:
        value, pos = _read_string(blob, pos)
        return value, None, pos
    if vtype != GGUFValueType.ARRAY:
        fmt = _SCALARS[vtype]
        (value,) = struct.unpack_from(fmt, blob, pos)
        return value, None, pos + struct.calcsize(fmt)
    sub_type, length = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if sub_type == GGUFValueType.STRING:
        items = []
        for _ in range(length):
            item, pos = _read_string(blob, pos)
            items.append(item)
        return items, GGUFValueType(sub_type), pos
    fmt = _SCALARS[sub_type]
    items = list(struct.unpack_from(f"<{length}{fmt[1]}", blob, pos))
    return items, GGUFValueType(sub_type), pos + struct.calcsize(fmt) * length
