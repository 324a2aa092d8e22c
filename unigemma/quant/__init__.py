"""Weight-only quantization: int8 per channel or group-wise, int4 group-wise (see pack.py)."""
