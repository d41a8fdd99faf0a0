"""What runs in a Python model's own process: kiln's stub, ``triton_python_backend_utils`` and the wire
format. The process puts this folder first on ``sys.path`` and imports nothing else from kiln."""
