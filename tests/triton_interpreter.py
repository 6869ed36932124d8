"""The row-copy kernel run by Triton's CPU interpreter, for tests on machines without CUDA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def interpreted_row_copy_kernel() -> Any:
    """``row_copy._copy_rows_kernel`` as an interpreted function.

    Triton 3.6's interpreter turns a scalar into a loop bound with ``int()`` of a one-element
    array, which numpy >= 2.4 refuses; the kernel's loop bound is such a scalar, so this wraps
    that conversion (once per process) before handing the kernel out.
    """
    from triton.runtime import interpreter

    from elastic_ep.eplb import row_copy

    if not getattr(interpreter._patch_lang_tensor, "_scalar_index", False):
        original = interpreter._patch_lang_tensor

        def patched(tensor: Any, scope: Any) -> None:
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        patched._scalar_index = True  # type: ignore[attr-defined]
        interpreter._patch_lang_tensor = patched
    return interpreter.InterpretedFunction(row_copy._copy_rows_kernel.fn)


def _nested_function_class() -> Any:
    from triton.runtime import interpreter

    class Nested(interpreter.InterpretedFunction):  # type: ignore[misc]
        """An interpreted function called from an interpreted kernel that undoes its own
        patches of ``triton.language`` on return (``InterpretedFunction`` leaves those of
        modules the kernel does not name, such as ``tl.core``, in place, and the real compiler
        then fails on them)."""

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            scope = interpreter._patch_lang(self.fn)
            try:
                return self.rewrite()(*args, **kwargs)
            finally:
                scope.restore()

    return Nested


def _nested(fn: Any) -> Any:
    return _nested_function_class()(fn)


_INTERPRETED: dict[int, Any] = {}
"""Interpreted copies by ``id`` of the original (hashing a JITFunction walks its dependencies)."""


@contextlib.contextmanager
def interpreted_language(*modules: Any) -> Iterator[None]:
    """While open, triton.language's own jit functions (``tl.sort``, ``tl.cumsum``, ...) and
    those of ``modules`` run under the interpreter too.

    An ``InterpretedFunction`` made without ``TRITON_INTERPRET=1`` interprets its own body only:
    a call to one of those functions raises "Cannot call @triton.jit'd outside of the scope of a
    kernel". This swaps them, in ``triton.language`` and its ``standard`` module, for interpreted
    copies and puts them back on exit (so the real compiler still sees the originals).
    """
    import triton.experimental.gluon  # noqa: F401 (the interpreter imports it lazily, and it
    import triton.language as tl  # refuses tl functions that are not JITFunctions)
    from triton.runtime.jit import JITFunction

    swapped = []
    for module in (tl.standard, tl, *modules):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                copy = _INTERPRETED.setdefault(id(value), _nested(value.fn))
                swapped.append((module, name, value))
                setattr(module, name, copy)
    try:
        yield
    finally:
        for module, name, value in swapped:
            setattr(module, name, value)
