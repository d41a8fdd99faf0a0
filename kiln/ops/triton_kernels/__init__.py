"""Triton kernels behind the ``triton`` plugins registered in ``kiln/ops/triton_plugins.py`` (and, for the
4-bit packed-weight ops, in ``kiln/ops/packed_linear.py``).

Importing a module here imports Triton and defines its kernels. Triton decides at definition time
whether a kernel is compiled or interpreted (``TRITON_INTERPRET=1``), so the plugins import these
modules on their first call, and CPU tests set the variable before importing them.
"""
