"""Triton kernels (each file: kernels + their Python wrapper). Import lazily: triton is optional."""
