"""Triton kernels (each file: kernels + their Python wrapper). Import lazily: triton is optional."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when kernels run on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_interpreter() -> None:
    """Raise a clear error, before launching, when the interpreter cannot run our kernels (see ops)."""
    if not interpreting():  # GPU launches pay one env lookup
        return
    from s2ft_lightning.ops import installed_interpreter_problem

    if why := installed_interpreter_problem():
        raise RuntimeError(why)
