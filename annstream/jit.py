"""How annstream compiles its few hot loops: numba nopython mode, cached on disk, no GIL.

`cache=True` compiles a kernel once per machine (later processes load it in milliseconds);
each module's `warm_up()` loads its kernels at start-up so no micro-batch pays for it. `nogil`
lets a kernel run next to a Faiss call in another thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

__all__ = ["jit", "jit_reassoc"]

F = TypeVar("F", bound=Callable[..., Any])


def jit(fn: F) -> F:
    """Compile `fn` (IEEE arithmetic as written)."""
    return cast(F, numba.njit(cache=True, nogil=True)(fn))


def jit_reassoc(fn: F) -> F:
    """Compile `fn` letting float sums be reordered (SIMD); infinities and NaN keep their
    meaning. Only for screens whose survivors are scored again exactly."""
    return cast(F, numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})(fn))
