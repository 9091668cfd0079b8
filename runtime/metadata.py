"""The config inside an ONNX model: one ``metadata_props`` key holding the JSON of a ModelSpec.

Any ONNX file whose metadata carries :data:`METADATA_KEY` with a supported ``schema_version``
can be sampled by the runtime; anything else is refused with a ConfigError naming what is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Mapping

from runtime.config import ConfigError, ModelSpec

METADATA_KEY = "ddim_deploy.config"  # JSON of ModelSpec.to_dict() plus an "export" section
_METADATA_PROPS = 14  # ModelProto.metadata_props (onnx.proto): StringStringEntryProto {key = 1, value = 2}
MAX_METADATA_BYTES = 1 << 20  # one metadata entry, as configs are capped (runtime.common.files.read_capped)
MAX_FIELDS = 100_000  # top-level fields of a ModelProto walked: ours have about 20


def spec_to_metadata(spec: ModelSpec, export_info: Mapping[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` entries to store in an exported model."""
    data = spec.to_dict()
    data["export"] = dict(export_info)
    return {METADATA_KEY: json.dumps(data, sort_keys=True)}


def spec_from_metadata(props: Mapping[str, str], source: str = "model") -> ModelSpec:
    """The ModelSpec stored in a model's metadata (``export`` info kept in ``extra``)."""
    if METADATA_KEY not in props:
        raise ConfigError(f"{source} has no {METADATA_KEY!r} metadata: not exported by ddim-export "
                          "(or exported without its config)")
    return ModelSpec.from_json(props[METADATA_KEY], source=f"{source} metadata {METADATA_KEY!r}")


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read without its graph: the ModelProto's top-level fields are walked
    and all but ``metadata_props`` skipped by seeking, so a model's config can be checked (and its file size
    bounded by it) before the file is parsed. A file that is not a protobuf gives what was found (maybe nothing):
    ONNX Runtime then says what is wrong with it."""
    props: dict[str, str] = {}
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        for _ in range(MAX_FIELDS):
            key = _varint(fh) if fh.tell() < size else None
            if not key or key >> 3 == 0:  # the end, or zero bytes (field 0 is no field): not a ModelProto here
                break
            field, wire = key >> 3, key & 7
            if wire == 0:
                _varint(fh)
            elif wire in (1, 5):
                fh.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            elif wire == 2:
                n = _varint(fh)
                if n is None or fh.tell() + n > size:
                    break
                if field != _METADATA_PROPS:
                    fh.seek(n, os.SEEK_CUR)
                elif n > MAX_METADATA_BYTES:
                    raise ConfigError(f"{path}: a metadata entry of {n:,} bytes (at most {MAX_METADATA_BYTES:,})")
                else:
                    entry = _entry(fh.read(n))
                    if entry is not None:
                        props[entry[0]] = entry[1]
            else:  # groups or garbage: not an ONNX file this reader understands
                break
    return props


def _varint(fh: IO[bytes]) -> int | None:
    """A protobuf varint read from ``fh``; None at the end or past 10 bytes."""
    value = 0
    for shift in range(0, 70, 7):
        b = fh.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
    return None


def _entry(data: bytes) -> tuple[str, str] | None:
    """``(key, value)`` of a StringStringEntryProto, None when it is not one."""
    import io

    fh, found = io.BytesIO(data), {1: "", 2: ""}
    while fh.tell() < len(data):
        key = _varint(fh)
        if key is None or key & 7 != 2:
            return None
        n = _varint(fh)
        if n is None:
            return None
        raw = fh.read(n)
        if key >> 3 in found:
            try:
                found[key >> 3] = raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
    return found[1], found[2]
