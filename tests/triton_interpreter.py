"""Running kiln's Triton kernels in tests: compiled on a CUDA device, else in Triton's CPU interpreter.

``conftest.py`` sets ``TRITON_INTERPRET=1`` on machines without CUDA before anything imports Triton
(Triton reads it at import and when it defines a kernel); this module checks that it took effect,
works around an interpreter bug, and names the ``DEVICE`` the kernel tests use.
"""
from __future__ import annotations

import torch
import triton
import triton.runtime.interpreter as _interpreter

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if DEVICE.type == "cpu" and not isinstance(triton.language.standard.cdiv, _interpreter.InterpretedFunction):
    raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set; run the tests through pytest "
                       "(tests/conftest.py sets it) or set it yourself")


def _scalar_index_fix() -> None:
    """Let interpreted loops take run-time bounds under numpy >= 2.4.

    NOTE: Triton 3.6's interpreter keeps scalars as 1-element arrays and converts them with int(),
    which numpy 2.4 refuses (triton-lang/triton#9171, fixed upstream after 3.6); this applies the
    upstream fix, and only inside the interpreter's own patch of ``tl.tensor``.
    """
    original = _interpreter._patch_lang_tensor
    if getattr(original, "kiln_fixed", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch.kiln_fixed = True
    _interpreter._patch_lang_tensor = patch


if DEVICE.type == "cpu":
    _scalar_index_fix()
