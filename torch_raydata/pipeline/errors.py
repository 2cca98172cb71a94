"""Exceptions cross threads as values (never swallowed, never re-wrapped twice).

A worker thread catches what it raised into an :class:`ExceptionWrapper`; the consumer
calls :meth:`ExceptionWrapper.reraise`, which raises the *original* exception object
(type, message and worker traceback intact) with a note naming the stage and batch.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

__all__ = ["ExceptionWrapper", "annotate"]

_NOTE_ATTR = "_torch_raydata_where"


def annotate(exc: BaseException, where: str) -> BaseException:
    """Attach ``where`` to ``exc`` once (the innermost stage wins)."""
    if getattr(exc, _NOTE_ATTR, None) is None:
        try:
            setattr(exc, _NOTE_ATTR, where)
        except (AttributeError, TypeError):  # exceptions with __slots__
            return exc
        note = f"[torch_raydata] raised in {where}"
        if sys.version_info >= (3, 11):
            exc.add_note(note)
        else:  # 3.10 has no notes: keep type and args, extend the message if it is one string
            if len(exc.args) == 1 and isinstance(exc.args[0], str):
                exc.args = (f"{exc.args[0]}\n{note}",)
    return exc


@dataclass
class ExceptionWrapper:
    exc: BaseException
    where: str

    @classmethod
    def capture(cls, exc: BaseException, where: str) -> ExceptionWrapper:
        return cls(exc, f"{where} (thread {threading.current_thread().name!r})")

    def reraise(self) -> None:
        raise annotate(self.exc, self.where)
