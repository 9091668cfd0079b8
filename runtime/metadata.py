"""The config inside an ONNX model: one ``metadata_props`` key holding the JSON of a ModelSpec.

Any ONNX file whose metadata carries :data:`METADATA_KEY` with a supported ``schema_version``
can be sampled by the runtime; anything else is refused with a ConfigError naming what is missing.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from runtime.config import ConfigError, ModelSpec

METADATA_KEY = "ddim_deploy.config"  # JSON of ModelSpec.to_dict() plus an "export" section


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
