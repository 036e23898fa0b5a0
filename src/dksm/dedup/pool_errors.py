"""The page pool's errors, one module below all of the pool's parts so that each can
raise them: callers catch :class:`PoolError` for anything the pool refuses."""

from __future__ import annotations

from dksm.error import DksmError


class PoolError(DksmError):
    """The page pool cannot be opened or used as asked."""


class PoolMissingError(PoolError):
    """There is no pool where one was asked for (and none is to be created)."""


class PoolDamagedError(PoolError):
    """The pool's files contradict themselves or each other, or are not what dksm
    wrote: the pool cannot be used, only inspected (verify) and removed (purge)."""
