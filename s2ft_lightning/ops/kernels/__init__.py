"""Triton kernels (each file: kernels + their Python wrapper). Import lazily: triton is optional."""

from __future__ import annotations

import functools
import os


def interpreting() -> bool:
    """True when kernels run on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_interpreter() -> None:
    """Raise a clear error, before launching, when the interpreter cannot run our kernels (see ops)."""
    if not interpreting():  # GPU launches pay one env lookup
        return
    if why := installed_interpreter_problem():
        raise RuntimeError(why)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton imports (the interpreter needs no GPU)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _major_minor(version: str) -> tuple[int, int]:
    parts = (version.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


def interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why the Triton CPU interpreter cannot run our kernels with these versions (default: installed), or None.

    Triton <= 3.6's interpreter turns tensor loop bounds into ints through 1-element arrays, which numpy >= 2.4
    refuses ("only 0-dimensional arrays can be converted"); checked: 3.6.0 fails with numpy 2.4.6, passes with
    2.3.5, and 3.7.1 passes with 2.4.6. Real GPU compilation is not affected.
    """
    if triton_version is None or numpy_version is None:
        import numpy
        import triton

        triton_version = triton_version or triton.__version__
        numpy_version = numpy_version or numpy.__version__
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (
            f"the Triton CPU interpreter of triton {triton_version} cannot run these kernels with numpy "
            f"{numpy_version} (tensor loop bounds fail); install triton>=3.7 or numpy<2.4, or use "
            "S2FT_KERNELS=torch"
        )
    return None


@functools.lru_cache(maxsize=1)
def installed_interpreter_problem() -> str | None:
    """``interpreter_problem`` for the installed triton and numpy (None without triton), checked once."""
    return interpreter_problem() if triton_available() else None
