"""Dask: the lazy denoise graph, the resumable writer, clusters and distributed training."""
