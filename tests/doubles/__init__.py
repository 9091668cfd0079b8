"""Test doubles of optional GPU libraries (TensorRT, CuPy) that run on CPU."""
