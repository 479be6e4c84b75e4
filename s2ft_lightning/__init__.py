"""S²FT (Structured Sparse Fine-Tuning) for PyTorch Lightning."""

__version__ = "0.1.0"

from s2ft_lightning.callbacks import S2FT, AdapterCheckpoint, MergeAdapters  # noqa: E402
from s2ft_lightning.module import S2FTModule, WarmupLinear  # noqa: E402
from s2ft_lightning.pipeline import S2Config, prepare_model  # noqa: E402
from s2ft_lightning.reporting import HeldOutAccuracy, LossCurve  # noqa: E402

__all__ = [
    "S2FT",
    "AdapterCheckpoint",
    "HeldOutAccuracy",
    "LossCurve",
    "MergeAdapters",
    "S2Config",
    "S2FTModule",
    "WarmupLinear",
    "__version__",
    "prepare_model",
]
