"""The row-copy kernel run by Triton's CPU interpreter, for tests on machines without CUDA."""

from __future__ import annotations

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
