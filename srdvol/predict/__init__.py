"""Predictors: a batch of raw patches in, denoised patches out, and one block at a time."""
