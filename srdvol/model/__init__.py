"""The SRDTrans network (:mod:`~srdvol.model.network`) and its model file
(:mod:`~srdvol.model.checkpoint`). Importing this package imports torch."""

from __future__ import annotations

from srdvol.model.checkpoint import (
    ModelRecord,
    Normalization,
    check_compatible,
    load_model,
    load_tensors,
    model_checksum,
    read_record,
    save_model,
    save_tensors,
)
from srdvol.model.network import NetworkConfig, SRDTransNetwork, build_network, count_parameters

__all__ = [
    "ModelRecord",
    "NetworkConfig",
    "Normalization",
    "SRDTransNetwork",
    "build_network",
    "check_compatible",
    "count_parameters",
    "load_model",
    "load_tensors",
    "model_checksum",
    "read_record",
    "save_model",
    "save_tensors",
]
