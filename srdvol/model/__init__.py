"""The SRDTrans network (:mod:`~srdvol.model.network`) and its model file
(:mod:`~srdvol.model.checkpoint`). Importing this package imports torch."""

from __future__ import annotations

from srdvol.model.network import NetworkConfig, SRDTransNetwork, build_network, count_parameters

__all__ = ["NetworkConfig", "SRDTransNetwork", "build_network", "count_parameters"]
