"""The ``python`` backend: a ``model.py`` written for Triton's Python backend runs unmodified.

``model.py`` defines ``TritonPythonModel`` with ``initialize(args)``, ``execute(requests)`` (plain or
``async def``) and optionally ``finalize()`` and the static ``auto_complete_config``; it imports
``triton_python_backend_utils`` (``stub/``) for tensors, requests, responses, errors, the decoupled
response sender, BLS calls to other models and logging.

Each instance runs in a process of its own (``process.py``, ``stub/kiln_python_stub.py``), so a model
that raises fails only its own requests, and one that crashes (a segfault, ``os._exit``) fails only the
requests it held, with a message naming it, and is started again for its next request. Tensors cross
a Unix socket in a pickle, small ones inside it and large ones as numpy buffers out of band, or through
shared memory (``stub/kiln_python_wire.py``): one copy each way. Where the model batches neither
dynamically nor by sequence, its process holds the next call while one runs (``calls_ahead``), so it does
not idle between calls. ``instance.py`` routes responses, cancellation questions and BLS calls;
``backend.py`` is the model version and its ``auto_complete_config``.
"""
from kiln.server.backends.python.backend import PythonBackend

__all__ = ["PythonBackend"]
