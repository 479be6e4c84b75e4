"""All-or-nothing model changes: an undo journal, the one record surgery keeps on a model, and its marker.

Every stage that changes a model (probe, permute, verify, install, quantize, shard) runs inside a
`Transaction`. A change is journaled with how to undo it; any exception, `KeyboardInterrupt` included, undoes
the journal in reverse order. Each change and its journal entry are made together with Ctrl-C held back
(`deferred_interrupts`), so an interrupt never lands between a change and its undo being recorded.

The model carries one record (``model.__dict__["_s2ft"]``, a `SurgeryRecord`; `s2ft_lightning.state.S2State`
extends it): the applied plan and a marker. The marker is set before anything moves and cleared on commit or
on a completed rollback. If a rollback cannot complete, or a change that cannot be undone (sharding) fails
midway, the marker stays and every later call refuses the model (`check_intact`) instead of using it as if
it were whole (docs/ARCHITECTURE.md, invariant 7).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

RECORD_ATTR = "_s2ft"


class ModelStateError(RuntimeError):
    """The model is half-changed: a surgery step failed and could not be undone. Reload the model."""


class SurgeryRecord:
    """What surgery keeps on a model: the plan it is permuted by and, while unsafe, a marker."""

    def __init__(self) -> None:
        self.plan: Any = None  # surgery.plan.S2Plan the model is permuted by (with its certificate)
        self.marker: str | None = None  # set while a change is in progress or could not be undone
        self.txn: Transaction | None = None  # the transaction changing the model now

    @classmethod
    def adopt(cls, other: SurgeryRecord | None) -> SurgeryRecord:
        """A record of this class holding ``other``'s fields (itself when it already is one)."""
        if isinstance(other, cls):
            return other
        new = cls()
        if other is not None:
            new.__dict__.update(vars(other))
        return new

    def is_empty(self) -> bool:
        """True when the record says nothing (the model is as loaded): it can be removed."""
        return self.plan is None and self.marker is None

    def __getstate__(self) -> dict:
        return {**vars(self), "txn": None}  # a running transaction is not part of a copy


def record_of(model: torch.nn.Module) -> SurgeryRecord | None:
    """The record surgery keeps on ``model``, or None for a model it never changed."""
    return model.__dict__.get(RECORD_ATTR)


def check_intact(model: torch.nn.Module) -> None:
    """Refuse a model whose surgery did not complete and could not be undone (the marker says what happened).

    The transaction changing the model right now passes (its own steps call the public functions).
    """
    rec = record_of(model)
    if rec is None or rec.marker is None or (rec.txn is not None and rec.txn.active):
        return
    raise ModelStateError(rec.marker)


_deferring = threading.local()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) inside the block and deliver it at its end.

    Wraps a change and the journal entry that undoes it, and every restore in a ``finally``, so an interrupt
    cannot split them. Only the main thread receives signals; elsewhere (and when a handler from C is
    installed) this is a plain block.
    """
    if getattr(_deferring, "depth", 0) or threading.current_thread() is not threading.main_thread():
        _deferring.depth = getattr(_deferring, "depth", 0) + 1
        try:
            yield
        finally:
            _deferring.depth -= 1
        return
    caught: list[tuple[int, Any]] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed from C: leave it alone
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    _deferring.depth = 1
    try:
        yield
    finally:
        _deferring.depth = 0
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(*caught[0])  # default_int_handler raises KeyboardInterrupt here
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


class Transaction:
    """Undo journal for one change of a model, made all-or-nothing (see the module docstring).

    Use `transaction` to open one; `step` journals an atomic change, `on_rollback` an idempotent undo
    registered before its change, `savepoint`/`rollback_to` undo part of the journal (the probe moves every
    coupling and moves it back), `irreversible` marks a change that cannot be undone.
    """

    def __init__(self, model: torch.nn.Module, what: str) -> None:
        self.model = model
        self.what = what
        self.active = False
        self._undo: list[tuple[str, Callable[[], Any]]] = []
        self._no_return: str | None = None

    # ---- journal -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, undo: Callable[[], Any], label: str = "") -> Iterator[None]:
        """Run the block's change with interrupts held back and journal ``undo`` when it completes.

        The block must change the model atomically (one tensor copy, one attribute swap): if it raises, nothing
        is journaled, so it must have changed nothing.
        """
        with deferred_interrupts():
            yield
            self._undo.append((label, undo))

    def on_rollback(self, undo: Callable[[], Any], label: str = "") -> None:
        """Journal ``undo`` before making its change; it must be safe whether or not the change happened."""
        self._undo.append((label, undo))

    def savepoint(self) -> int:
        """A position in the journal to `rollback_to`."""
        return len(self._undo)

    def rollback_to(self, point: int) -> None:
        """Undo every change journaled after ``point`` (newest first), each with interrupts held back."""
        while len(self._undo) > point:
            with deferred_interrupts():
                label, undo = self._undo[-1]
                try:
                    undo()
                except BaseException as e:
                    self._broken(f"undoing {label or 'a step'} failed ({type(e).__name__}: {e})")
                    raise
                self._undo.pop()

    def irreversible(self, what: str) -> None:
        """From here on a failure cannot be undone: it leaves the marker naming ``what``."""
        self._no_return = what

    # ---- outcome -----------------------------------------------------------------------------------
    def _broken(self, why: str) -> None:
        self.active = False
        rec = record_of(self.model)
        if rec is not None:
            rec.txn = None
            rec.marker = (
                f"{self.what} failed and the model could not be restored: {why}. Its weights or modules may be "
                "half-changed; reload the model (from_pretrained / load_model) and prepare it again"
            )

    def _rollback(self, error: BaseException) -> None:
        if self._no_return is not None:
            self._broken(f"{self._no_return} failed midway ({type(error).__name__}: {error}) and cannot be undone")
            return
        try:
            self.rollback_to(0)
        except BaseException:
            return  # the marker names the undo that failed
        self._restore_record()

    def _enter(self, record_cls: type[SurgeryRecord]) -> None:
        with deferred_interrupts():
            self._prior = record_of(self.model)
            self._prior_fields = dict(vars(self._prior)) if self._prior is not None else None
            rec = record_cls.adopt(self._prior)
            rec.marker = f"{self.what} was interrupted before it completed or was undone"
            rec.txn = self
            self.model.__dict__[RECORD_ATTR] = rec
            self.active = True

    def _restore_record(self) -> None:
        with deferred_interrupts():
            if self._prior is None:
                self.model.__dict__.pop(RECORD_ATTR, None)
            else:
                self._prior.__dict__.clear()
                self._prior.__dict__.update(self._prior_fields)
                self.model.__dict__[RECORD_ATTR] = self._prior
            self.active = False

    def _commit(self) -> None:
        with deferred_interrupts():
            rec = record_of(self.model)
            rec.marker, rec.txn = None, None
            if rec.is_empty():
                del self.model.__dict__[RECORD_ATTR]
            self._undo.clear()
            self.active = False


@contextlib.contextmanager
def transaction(
    model: torch.nn.Module, what: str, record_cls: type[SurgeryRecord] = SurgeryRecord
) -> Iterator[Transaction]:
    """Open a `Transaction` on ``model``, or join the one already changing it (its journal and outcome).

    Refuses a model whose earlier surgery could not be undone. On success the marker is cleared; on any
    exception the journal is undone and the exception re-raised (the marker stays only if undoing failed).
    """
    rec = record_of(model)
    if rec is not None and rec.txn is not None and rec.txn.active:
        if not isinstance(rec, record_cls):  # joining with a richer record: upgrade it in place
            with deferred_interrupts():
                model.__dict__[RECORD_ATTR] = record_cls.adopt(rec)
        yield rec.txn
        return
    check_intact(model)
    txn = Transaction(model, what)
    try:
        txn._enter(record_cls)
        yield txn
        txn._commit()
    except BaseException as e:
        with deferred_interrupts():
            if txn.active:  # an interrupt held back during the commit arrives after it: nothing to undo
                txn._rollback(e)
        raise


__all__ = [
    "RECORD_ATTR",
    "ModelStateError",
    "SurgeryRecord",
    "Transaction",
    "check_intact",
    "deferred_interrupts",
    "record_of",
    "transaction",
]
