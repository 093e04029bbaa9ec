"""Self-supervised training: patches, training pairs, the optimiser loop and its state."""
