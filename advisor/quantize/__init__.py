"""Quantizers: each method is a small module (round-to-nearest in rtn.py)."""
