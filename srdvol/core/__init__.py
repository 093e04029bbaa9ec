"""Numerical building blocks on numpy and dask arrays: tiling, blending, statistics, metrics."""
