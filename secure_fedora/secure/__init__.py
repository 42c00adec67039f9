"""Differential privacy plumbing, signed messages, CKKS relatedness and propagation, keys and anchors."""
