"""Fused ops: one file per op, each with its plain-PyTorch ``*_ref`` specification beside it."""
