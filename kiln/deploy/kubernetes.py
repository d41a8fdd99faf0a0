"""``kiln deploy --kubernetes DIR``: manifests that run replicas of a deployed model repository on the cluster
software people already operate, and nothing home-made:

- ``Dockerfile``: an image holding kiln and the repository (``kiln serve --model-repository /models``);
- ``deployment.yaml``: replicas with readiness and liveness probes on ``/v2/health/ready`` and ``/v2/health/live``,
  Prometheus scrape annotations for the metrics port, the API key from an optional Secret;
- ``service.yaml``: one address in front of the replicas (the cluster's own load balancing), HTTP, gRPC, metrics;
- ``hpa.yaml``: a HorizontalPodAutoscaler (autoscaling/v2) on ``kiln_num_requests_waiting``, the requests waiting
  for an engine's running batch, per pod (served to the autoscaler by a metrics adapter such as
  prometheus-adapter, from the scraped metrics);
- ``kserve-servingruntime.yaml`` and ``kserve-inferenceservice.yaml``: for clusters that run KServe, a
  ServingRuntime that serves KServe's v2 protocol (HTTP and gRPC) with kiln, and an InferenceService whose model
  (the repository, at ``storage_uri``) that runtime serves;
- ``README.md``: the commands, in order.

Every manifest is checked against the Kubernetes schemas (``validate_manifests``, with ``kubernetes-validate``,
offline; at deploy where it is installed, the extra ``kiln[deploy]``, and always in kiln's tests): the core kinds
whole; in KServe's custom resources, the Kubernetes objects they hold (metadata, containers), since no KServe
schema ships offline.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
WAITING_METRIC = "kiln_num_requests_waiting"
API_KEY_SECRET = "kiln-api-key"  # optional: without it the server asks for no key


@dataclass(frozen=True)
class ManifestOptions:
    repository: Path  # the deployed repository (its folder name names the app)
    image: str | None = None  # default: kiln-<repository name>:latest, built from the Dockerfile
    replicas: int = 1
    max_replicas: int = 4
    waiting_per_pod: int = 8  # the autoscaler's target of WAITING_METRIC per pod
    storage_uri: str | None = None  # KServe: where the repository lies (default pvc://kiln-models/<name>)
    cpu: str = "2"
    memory: str = "8Gi"
    gpus: int = 0  # > 0: nvidia.com/gpu limit

    @property
    def app(self) -> str:
        return _dns_name(self.repository.name)

    @property
    def image_name(self) -> str:
        return self.image or f"kiln-{self.app}:latest"


def manifests(o: ManifestOptions) -> dict[str, dict]:
    """File name -> manifest."""
    if o.replicas < 1 or o.max_replicas < o.replicas:
        raise ValueError(f"replicas must be >= 1 and at most max replicas (got {o.replicas} and {o.max_replicas})")
    labels = {"app.kubernetes.io/name": o.app, "app.kubernetes.io/part-of": "kiln"}
    resources = {"requests": {"cpu": o.cpu, "memory": o.memory}, "limits": {"memory": o.memory}}
    if o.gpus:
        resources["limits"]["nvidia.com/gpu"] = str(o.gpus)
    ports = [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
             {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
             {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    api_key = {"name": "KILN_API_KEY", "valueFrom": {"secretKeyRef": {"name": API_KEY_SECRET, "key": "key",
                                                                       "optional": True}}}
    container = {
        "name": "kiln",
        "image": o.image_name,
        "args": ["serve", "--model-repository", "/models", "--host", "0.0.0.0", "--http-port", str(HTTP_PORT),
                 "--grpc-port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT)],
        "ports": ports,
        "env": [api_key],
        "resources": resources,
        # Loading an engine (and compiling its kernels at first start) takes a while: the startup probe allows
        # 10 minutes before liveness counts.
        "startupProbe": _probe("/v2/health/live", period=10, failures=60),
        "livenessProbe": _probe("/v2/health/live", period=10, failures=3),
        "readinessProbe": _probe("/v2/health/ready", period=5, failures=2),
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": o.app, "labels": labels},
        "spec": {
            "replicas": o.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                    "prometheus.io/path": "/metrics"}},
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 30},
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": o.app, "labels": labels},
        "spec": {"selector": labels, "type": "ClusterIP", "ports": [
            {"name": p["name"], "port": p["containerPort"], "targetPort": p["name"], "protocol": "TCP"}
            for p in ports]},
    }
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": o.app, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": o.app},
            "minReplicas": o.replicas, "maxReplicas": o.max_replicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": WAITING_METRIC},
                "target": {"type": "AverageValue", "averageValue": str(o.waiting_per_pod)}}}],
        },
    }
    runtime_container = {
        "name": "kserve-container",
        "image": o.image_name,
        # KServe puts the model (the repository) at /mnt/models and sends v2 requests to port 8080 (HTTP) and
        # 9000 (gRPC).
        "args": ["serve", "--model-repository", "/mnt/models", "--host", "0.0.0.0", "--http-port", "8080",
                 "--grpc-port", "9000", "--metrics-port", str(METRICS_PORT)],
        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
        "env": [api_key],
        "resources": resources,
        "readinessProbe": _probe("/v2/health/ready", period=5, failures=2, port=8080),
    }
    runtime = {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
        "metadata": {"name": "kiln", "labels": labels, "annotations": {
            "prometheus.kserve.io/port": str(METRICS_PORT), "prometheus.kserve.io/path": "/metrics"}},
        "spec": {
            "supportedModelFormats": [{"name": "kiln", "version": "1", "autoSelect": True}],
            "protocolVersions": ["v2", "grpc-v2"],
            "multiModel": False,
            "containers": [runtime_container],
        },
    }
    inference_service = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": o.app, "labels": labels},
        "spec": {"predictor": {
            "minReplicas": o.replicas, "maxReplicas": o.max_replicas,
            "model": {"modelFormat": {"name": "kiln"}, "runtime": "kiln", "protocolVersion": "v2",
                      "storageUri": o.storage_uri or f"pvc://kiln-models/{o.repository.name}"},
        }},
    }
    return {"deployment.yaml": deployment, "service.yaml": service, "hpa.yaml": hpa,
            "kserve-servingruntime.yaml": runtime, "kserve-inferenceservice.yaml": inference_service}


def write_manifests(folder: Path, o: ManifestOptions) -> list[Path]:
    import yaml

    docs = manifests(o)
    try:
        import kubernetes_validate  # noqa: F401  (108 MB of schemas: an extra, not a dependency)
    except ImportError:
        pass
    else:
        validate_manifests(docs)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in docs.items():
        path = folder / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        written.append(path)
    for name, text in (("Dockerfile", _dockerfile(o)), ("README.md", _readme(o, folder))):
        (folder / name).write_text(text)
        written.append(folder / name)
    return written


def validate_manifests(docs: dict[str, dict], version: str | None = None) -> None:
    """Check each manifest against the Kubernetes schemas (strict: an unknown field is an error); in KServe's
    resources, their ObjectMeta and Containers. Raises kubernetes_validate.ValidationError."""
    import kubernetes_validate

    version = version or kubernetes_validate.latest_version()
    for name, doc in docs.items():
        if doc["apiVersion"].startswith("serving.kserve.io/"):
            _validate_part(doc["metadata"], "objectmeta-meta-v1.json", version)
            for container in doc["spec"].get("containers", []):
                _validate_part(container, "container-v1.json", version)
        else:
            kubernetes_validate.validate(doc, version, strict=True)


def _validate_part(obj: dict, schema_file: str, version: str) -> None:
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    newest = [v for v in utils.all_versions() if utils.major_minor(v) <= utils.major_minor(version)][-1]
    folder = f"kubernetes-json-schema/v{newest}-local-strict"
    schema = utils.schema_contents(f"{folder}/{schema_file}", version)
    definitions = utils.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    try:
        jsonschema.validators.Draft202012Validator(schema, registry=registry).validate(obj)
    except jsonschema.ValidationError as e:
        raise kubernetes_validate.ValidationError(e, version=utils.major_minor(version)) from None


def _probe(path: str, period: int, failures: int, port: int | str = "http") -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures}


def _dns_name(name: str) -> str:
    """A Kubernetes object name (RFC 1123 label) from a folder name."""
    out = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:63].strip("-")
    return out or "kiln"


def _dockerfile(o: ManifestOptions) -> str:
    repo = o.repository.name
    return f"""# The image the manifests run: kiln, and the model repository `kiln deploy` wrote.
# Build from the folder that holds {repo}/, giving the kiln to install (a wheel you copied in, or a pip spec):
#   docker build -f {{this file}} -t {o.image_name} --build-arg KILN="kiln" .
FROM python:3.12-slim
ARG KILN=kiln
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir torch --index-url "$TORCH_INDEX" && pip install --no-cache-dir "$KILN"
COPY {repo}/ /models/
EXPOSE {HTTP_PORT} {GRPC_PORT} {METRICS_PORT}
ENTRYPOINT ["kiln"]
CMD ["serve", "--model-repository", "/models", "--host", "0.0.0.0"]
"""


def _readme(o: ManifestOptions, folder: Path) -> str:
    return f"""# Running `{o.repository.name}` on Kubernetes

1. Build and push the image (from the folder that holds `{o.repository.name}/`):

       docker build -f {folder}/Dockerfile -t {o.image_name} .
       docker push {o.image_name}

2. Optionally guard the API with a key (probes need none):

       kubectl create secret generic {API_KEY_SECRET} --from-literal=key=YOUR-KEY

3. Replicas behind one Service, scaled on the requests waiting per pod:

       kubectl apply -f {folder}/deployment.yaml -f {folder}/service.yaml -f {folder}/hpa.yaml
       kubectl port-forward svc/{o.app} {HTTP_PORT}:{HTTP_PORT}
       curl -X POST localhost:{HTTP_PORT}/v2/models/ensemble/generate -d '{{"text_input": "Hello", "max_tokens": 32}}'

   The autoscaler reads `{WAITING_METRIC}` per pod through the custom metrics API: a metrics adapter
   (prometheus-adapter) must serve it from the Prometheus that scrapes the pods (annotated
   `prometheus.io/scrape`; with an API key, give the scrape job the key as a bearer token).

4. Or, on a cluster that runs KServe: put the repository where `storageUri` points (a PVC `kiln-models` holding
   `{o.repository.name}/`, or change it to your bucket), then

       kubectl apply -f {folder}/kserve-servingruntime.yaml -f {folder}/kserve-inferenceservice.yaml

   and send KServe v2 requests to the InferenceService's URL (`kubectl get inferenceservice {o.app}`).
"""
