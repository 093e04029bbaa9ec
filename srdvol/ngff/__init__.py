"""OME-Zarr storage: reading, checking, locking and writing NGFF images."""
