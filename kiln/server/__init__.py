"""kiln's inference server: Triton's model repository and KServe v2 protocols (HTTP, gRPC), metrics.

Map: ``app.py`` runs the endpoints on one event loop; ``protocols/`` translate wire formats;
``server.py`` is every operation the protocols call; ``repository.py`` loads and unloads models
(``config.py`` reads their configs); ``model.py`` serves one loaded version through its
``scheduling/`` queue to its ``backends/`` instances; ``core.py`` is the one request and response
type, ``validation.py`` and ``outputs.py`` check and shape their tensors; ``stats.py``,
``metrics.py`` and ``shm.py`` hold statistics, the metrics page and shared memory.
"""
