"""Evaluate a bf16 / fp16 model in fp32 without a full fp32 copy, so a check's verdict follows its measurement.

A permutation moves values bit-exactly: a correct plan changes the logits only by the rounding of reordered
sums. In bf16 that rounding (up to ~1e-2 of the logit scale) hides real errors of the same size (two swapped
Down columns in the last of 24 layers: 1.8e-2; a k bias not moved with its heads: 7e-3), so checks compute
in fp32, where a correct plan's difference is ~1e-6 and one tolerance (1e-4) holds whatever the stored dtype.

Memory (docs/ARCHITECTURE.md, "Verification"): the low-precision parameters and floating buffers outside the
model's layer stacks (embeddings, head, final norm) are replaced by fp32 copies for the whole forward; every
outermost block of a stack (an element of an ``nn.ModuleList``: a decoder layer, an encoder layer, a vision
block) gets its fp32 copies only while it runs (a forward pre-hook swaps them in, a forward hook swaps the
originals back). The extra memory is the fp32 copy of the tensors outside the stacks plus that of the largest
block, never a full fp32 copy of a large model. Parameters keep their objects (their ``.data`` is swapped and
put back), buffers are put back as the same objects: nothing is written, so the model stays bit-identical,
whatever is raised or interrupted. A model whose forward does not run block by block this way (a block used
outside its own call) is evaluated with every tensor swapped at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
from torch import nn

from surgery.transaction import deferred_interrupts

LOW_PRECISION = (torch.bfloat16, torch.float16)
T = TypeVar("T")


class UpcastError(RuntimeError):
    """The model cannot be evaluated in fp32 (its forward fails with its tensors upcast)."""


def _is_low(t: torch.Tensor | None) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION and type(t.data) is torch.Tensor


class _Swapped:
    """fp32 copies in place of the low-precision parameters and buffers of some modules, until `restore`.

    A tensor already in fp32 (swapped by an enclosing block, or stored so) is left alone, so nested swaps
    restore in reverse order to exactly what was there.
    """

    def __init__(self, modules: Iterable[nn.Module]):
        self._params: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        seen: set[int] = set()
        with deferred_interrupts():
            try:
                for mod in modules:
                    for p in mod.parameters(recurse=False):
                        if id(p) not in seen and _is_low(p):
                            seen.add(id(p))
                            self._params.append((p, p.data))
                            p.data = p.data.float()
                    for name, b in list(mod._buffers.items()):
                        if _is_low(b):
                            self._buffers.append((mod, name, b))
                            mod._buffers[name] = b.float()
            except BaseException:  # out of memory halfway: put back what was swapped
                self.restore()
                raise

    def restore(self) -> None:
        with deferred_interrupts():
            for p, original in reversed(self._params):
                p.data = original
            for mod, name, b in reversed(self._buffers):
                mod._buffers[name] = b
            self._params, self._buffers = [], []


def low_precision(model: nn.Module) -> bool:
    """True when the model holds bf16 / fp16 parameters or buffers (an fp32 evaluation differs from its own)."""
    return any(_is_low(t) for t in (*model.parameters(), *model.buffers()))


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost elements of the model's ``nn.ModuleList``s (layers of every stack)."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for _, mod in model.named_modules():  # parents come before their children
        if id(mod) in inside:
            for child in mod.children():
                inside.add(id(child))
            continue
        if isinstance(mod, nn.ModuleList):
            for child in mod.children():
                blocks.append(child)
                inside.add(id(child))
    return blocks


@contextlib.contextmanager
def _upcast_once(model: nn.Module, per_block: bool) -> Iterator[None]:
    blocks = _blocks(model) if per_block else []
    block_modules = {id(m) for b in blocks for m in b.modules()}
    rest = [m for m in model.modules() if id(m) not in block_modules]
    active: list[_Swapped] = []
    handles = []

    def swap_in(module, args):
        active.append(_Swapped(module.modules()))

    def swap_out(module, args, output):
        active.pop().restore()

    try:
        active.append(_Swapped(rest))
        with deferred_interrupts():
            for b in blocks:
                handles.append(b.register_forward_pre_hook(swap_in))
                handles.append(b.register_forward_hook(swap_out))
        yield
    finally:
        with deferred_interrupts():
            for h in handles:
                h.remove()
            while active:
                active.pop().restore()


@contextlib.contextmanager
def _highest_fp32_precision() -> Iterator[None]:
    """fp32 matmuls and convolutions in full precision (no TF32, which rounds to 10 mantissa bits)."""
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        with deferred_interrupts():
            torch.set_float32_matmul_precision(matmul)
            torch.backends.cudnn.allow_tf32 = cudnn


def fp32_call(model: nn.Module, fn: Callable[[], T]) -> T:
    """``fn()`` with ``model`` evaluated in fp32 block by block (see the module docstring); the model is left
    bit-identical. A forward that fails block by block is retried with every tensor upcast at once; one that
    fails that way too raises `UpcastError`."""
    with _highest_fp32_precision():
        if not low_precision(model):
            return fn()
        try:
            with _upcast_once(model, per_block=True):
                return fn()
        except Exception:  # a block used outside its own call met an fp32 input: all tensors at once
            pass
        try:
            with _upcast_once(model, per_block=False):
                return fn()
        except Exception as e:
            raise UpcastError(
                f"{type(model).__name__} could not be evaluated in float32 for the function check "
                f"({type(e).__name__}: {e}). The check must run in float32 because bf16/fp16 rounding hides "
                "real errors; prepare the model in float32 (model.float()) and cast it back afterwards "
                "(permutations commute with casting), or pass verify=False at your own risk"
            ) from e


@contextlib.contextmanager
def fp32_module(module: nn.Module) -> Iterator[None]:
    """``module`` (and its children) with fp32 copies of its low-precision tensors inside the block."""
    with _highest_fp32_precision():
        swapped = _Swapped(module.modules())
        try:
            yield
        finally:
            swapped.restore()
