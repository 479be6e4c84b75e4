"""S²FT (Structured Sparse Fine-Tuning) for PyTorch Lightning."""

__version__ = "0.1.0"
