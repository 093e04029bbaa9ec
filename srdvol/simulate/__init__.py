"""Synthetic two-photon calcium imaging with ground truth: the scene
(:mod:`~srdvol.simulate.scene`) and the stores written from it (:mod:`~srdvol.simulate.stores`)."""

from srdvol.simulate.scene import SceneConfig
from srdvol.simulate.stores import SimulationInfo, simulate

__all__ = ["SceneConfig", "SimulationInfo", "simulate"]
