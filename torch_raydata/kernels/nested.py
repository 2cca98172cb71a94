"""Walks over nested containers of tensors (dicts, lists, tuples, namedtuples): what a
``collate_fn`` may return and a transport must move leaf by leaf.

Owns the container rules (which types are walked into, how they are rebuilt). Does not
own what happens to a leaf (the caller's ``fn``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["iter_leaves", "map_leaves"]


def map_leaves(obj: Any, fn: Callable[[Any], Any], leaf: type = torch.Tensor) -> Any:
    """``obj`` rebuilt with ``fn(x)`` in place of every ``leaf`` instance ``x`` inside it
    (dicts, lists, tuples and namedtuples keep their type); other values as they are."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_leaves(v, fn, leaf)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_leaves(v, fn, leaf) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_leaves(v, fn, leaf) for v in obj)
    return obj


def iter_leaves(obj: Any, leaf: type = torch.Tensor) -> Iterator[Any]:
    """Every ``leaf`` instance inside ``obj`` (mappings, lists, tuples), depth first."""
    if isinstance(obj, leaf):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from iter_leaves(v, leaf)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_leaves(v, leaf)
