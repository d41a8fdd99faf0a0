"""kiln deploy: a Triton model repository for a model (``triton_repository``), TensorRT-LLM-style config templates
(``fill_template``), and Kubernetes / KServe manifests for replicas of it (``kubernetes``)."""
