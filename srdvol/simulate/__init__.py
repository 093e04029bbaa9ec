"""Synthetic two-photon calcium imaging with ground truth."""
