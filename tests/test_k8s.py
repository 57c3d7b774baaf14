"""Offline checks of the Kubernetes manifests in k8s/ (no cluster, a few seconds).

Each kustomization (k8s/base and the overlays) is rendered with ``kubectl kustomize`` and every
object it outputs is validated against a real schema: KubeRay's RayCluster / RayJob / RayService
against the CRDs in ../shared/k8s-schemas/kuberay (OpenAPI v3 read as JSON Schema), the core
kinds with the ``kubernetes-validate`` package. Then the things a schema cannot see: the RayJob
runs an ``armature`` command whose Hydra overrides compose, it points at the in-cluster MLflow
and MinIO, no credentials are written down, the gpu overlay asks for GPUs on GPU nodes.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMAS = REPO.parent / "shared" / "k8s-schemas"  # beside the checkout, locally and in CI
TARGETS = {
    "base": K8S / "base",
    "cpu-dev": K8S / "overlays" / "cpu-dev",
    "gpu": K8S / "overlays" / "gpu",
    "gpu-direct-ingress": K8S / "overlays" / "gpu-direct-ingress",
}
K8S_VERSION = "1.32.0"  # core schemas of this Kubernetes release (kubernetes-validate ships them)
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
SERVE_IMPORT_PATH = "armature.serve.app:build_app"


# =========================================================================== rendering
def _kustomize_command() -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    pytest.skip("neither kubectl nor kustomize is on PATH: cannot render k8s/")


@functools.cache
def _render(path: Path) -> tuple[dict, ...]:
    out = subprocess.run([*_kustomize_command(), str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kustomize failed on {path.relative_to(REPO)}:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def render(target: str) -> list[dict]:
    """The objects of one kustomization (fresh copies: tests may change them)."""
    return copy.deepcopy(list(_render(TARGETS[target])))


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def ray_cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    return {
        "RayCluster": lambda s: s,
        "RayJob": lambda s: s["rayClusterSpec"],
        "RayService": lambda s: s["rayClusterConfig"],
    }[doc["kind"]](doc["spec"])


def ray_groups(doc: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) of the head and each worker group of a Ray object."""
    spec = ray_cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def walk(node, key: str):
    """Every value stored under ``key`` anywhere in a parsed manifest."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def container_env(container: dict, docs: list[dict]) -> dict[str, str]:
    """The plain (non-secret) environment of a container: its ConfigMaps, then its own values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# =========================================================================== validation
def _require_schemas() -> Path:
    kuberay = SCHEMAS / "kuberay"
    if not kuberay.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {kuberay} (the shared folder beside the checkout)")
    return kuberay


def openapi_to_jsonschema(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema, with the API server's reading of it:

    - ``x-kubernetes-int-or-string``: an integer or a string (controller-gen also writes an
      ``anyOf`` of both; added when missing);
    - ``nullable: true``: null is allowed too;
    - an object that lists its ``properties`` takes no others (strict field validation, kubectl's
      default), unless it says ``x-kubernetes-preserve-unknown-fields``.

    CEL rules (``x-kubernetes-validations``) are not evaluated: none applies to what k8s/ sets.
    """
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = openapi_to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [openapi_to_jsonschema(sub) for sub in value]
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def kuberay_validators() -> dict:
    """(apiVersion, kind) -> JSON Schema validator, for every served version of the KubeRay CRDs."""
    import jsonschema

    validators = {}
    for path in sorted(_require_schemas().glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft4Validator(schema)
    return validators


def json_path(path) -> str:
    """``spec.workerGroupSpecs[0].replicas`` from a jsonschema error path."""
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return text or "(root)"


# A resource quantity, as the KubeRay CRDs spell it; the core schemas accept any string there.
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?(\d+(\.\d*)?|\.\d+))?$")


def quantity_errors(node, path: tuple = ()):
    """(path, value) of each resource request, limit or sizeLimit that is not a quantity."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from quantity_errors(item, (*path, index))
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("requests", "limits") and isinstance(value, dict):
                yield from (((*path, key, name), q) for name, q in value.items() if not QUANTITY.match(str(q)))
            elif key == "sizeLimit" and not QUANTITY.match(str(value)):
                yield (*path, key), value
            else:
                yield from quantity_errors(value, (*path, key))


def validate(doc: dict) -> list[str]:
    """Every schema error of one object, each as ``Kind/name: path: message``."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if str(doc.get("apiVersion", "")).startswith("ray.io/"):
        validator = kuberay_validators().get((doc["apiVersion"], doc["kind"]))
        if validator is None:
            return [f"{where}: no KubeRay schema for apiVersion {doc['apiVersion']} kind {doc['kind']}"]
        errors = sorted(validator.iter_errors(doc), key=lambda e: json_path(e.absolute_path))
    else:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            errors = []
        except kubernetes_validate.ValidationError as err:  # the first error only
            errors = [err]
        except kubernetes_validate.SchemaNotFoundError as err:
            return [f"{where}: {err.message}"]
        errors += [
            SimpleNamespace(absolute_path=path, message=f"{value!r} is not a Kubernetes quantity")
            for path, value in quantity_errors(doc)
        ]
    return [f"{where}: {json_path(e.absolute_path)}: {e.message}" for e in errors]


# =========================================================================== every object is valid
@pytest.mark.parametrize("target", TARGETS)
def test_core_objects_match_the_kubernetes_schemas(target):
    docs = [d for d in render(target) if d["kind"] not in RAY_KINDS]
    errors = [message for doc in docs for message in validate(doc)]
    assert not errors, f"{target}: schema errors:\n  " + "\n  ".join(errors)
    assert {"Deployment", "StatefulSet", "Service", "PersistentVolumeClaim", "ConfigMap", "Job"} <= {
        d["kind"] for d in docs
    }


@pytest.mark.parametrize("target", TARGETS)
def test_ray_objects_match_the_kuberay_crds(target):
    _require_schemas()
    docs = [d for d in render(target) if d["kind"] in RAY_KINDS]
    errors = [message for doc in docs for message in validate(doc)]
    assert not errors, f"{target}: schema errors:\n  " + "\n  ".join(errors)
    assert sorted(d["kind"] for d in docs) == sorted(RAY_KINDS)


def test_a_planted_error_fails_with_a_message_naming_its_path():
    _require_schemas()
    docs = render("base")

    deployment = one(docs, "Deployment", "armature-mlflow")
    deployment["spec"]["replicas"] = "two"
    assert validate(deployment) == ["Deployment/armature-mlflow: spec.replicas: 'two' is not of type 'integer', 'null'"]

    claim = one(docs, "PersistentVolumeClaim", "armature-minio")
    claim["spec"]["resources"]["requests"]["storage"] = "lots"
    assert validate(claim) == [
        "PersistentVolumeClaim/armature-minio: spec.resources.requests.storage: 'lots' is not a Kubernetes quantity"
    ]

    cluster = one(docs, "RayCluster", "armature-interactive")
    bad = copy.deepcopy(cluster)
    del bad["spec"]["headGroupSpec"]
    assert validate(bad) == ["RayCluster/armature-interactive: spec: 'headGroupSpec' is a required property"]

    job = one(docs, "RayJob", "armature-train")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert validate(job) == [
        "RayJob/armature-train: spec.rayClusterSpec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'"
    ]

    # A misspelt field is an error, not silently dropped (x-kubernetes-preserve-unknown-fields aside).
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["rayStartParam"] = {}
    [message] = validate(bad)
    assert message.startswith("RayCluster/armature-interactive: spec.workerGroupSpecs[0]: ")
    assert "'rayStartParam' was unexpected" in message

    # x-kubernetes-int-or-string: a quantity may be an integer or a string, not anything else.
    resources = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    resources["limits"]["cpu"] = 2
    resources["requests"]["cpu"] = "1500m"
    assert validate(cluster) == []
    resources["limits"]["cpu"] = "two"
    [message] = validate(cluster)
    assert message.startswith(
        "RayCluster/armature-interactive: spec.headGroupSpec.template.spec.containers[0].resources.limits.cpu: 'two'"
    )


# =========================================================================== the training job
@pytest.mark.parametrize("target", TARGETS)
def test_rayjob_entrypoint_is_an_armature_command_whose_overrides_compose(target, monkeypatch):
    from omegaconf import OmegaConf

    from armature import cli
    from armature.platform.config import ConfigError, compose

    docs = render(target)
    job = one(docs, "RayJob", "armature-train")
    program, command, *overrides = shlex.split(job["spec"]["entrypoint"])
    assert program == "armature"
    with pytest.raises(SystemExit) as exited:  # the real parser: an unknown command exits 2
        cli.main([command, "--help"])
    assert exited.value.code == 0, f"`armature {command}` is not a command of armature.cli"
    assert command == "train"
    assert not [o for o in overrides if o.startswith("-")], "flags in the entrypoint: only overrides expected"

    # Compose with the head's environment: `tracking=server` and `cluster=remote` read it.
    head = ray_cluster_spec(job)["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = container_env(head, docs)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # set by Ray's job manager on the cluster
    try:
        cfg = OmegaConf.to_container(compose("train", overrides), resolve=True)
    except ConfigError as err:
        pytest.fail(f"{target}: the RayJob's overrides do not compose: {err}", pytrace=False)
    assert cfg["tracking"]["tracking_uri"] == env["MLFLOW_TRACKING_URI"]
    assert cfg["cluster"]["address"] == "auto"
    assert cfg["trainer"]["storage_path"].startswith("s3://")
    assert cfg["tracking"]["run_name"], "a fixed run name lets a retried job resume"

    # The job's actors fit its cluster: Ray counts each pod's CPU and GPU limits.
    limits = [
        (
            group.get("maxReplicas", 1) if name != "head" else 1,
            group["template"]["spec"]["containers"][0]["resources"]["limits"],
        )
        for name, group in ray_groups(job)
    ]
    have_cpus = sum(n * cpus(lim["cpu"]) for n, lim in limits)
    have_gpus = sum(n * int(lim.get("nvidia.com/gpu", 0)) for n, lim in limits)
    trainer, cluster, reward = cfg["trainer"], cfg["cluster"], cfg["reward"]
    need_cpus = (
        trainer["num_workers"] * trainer["cpus_per_worker"]
        + cluster["num_samplers"] * cluster["sampler_num_cpus"]
        + reward["num_actors"] * reward["num_cpus"]
    )
    need_gpus = (
        trainer["num_workers"] * trainer["use_gpu"]
        + cluster["num_samplers"] * cluster["sampler_num_gpus"]
        + reward["num_actors"] * reward["num_gpus"]
    )
    assert need_cpus <= have_cpus, f"{target}: the job asks for {need_cpus} CPUs, its cluster has {have_cpus}"
    assert need_gpus <= have_gpus, f"{target}: the job asks for {need_gpus} GPUs, its cluster has {have_gpus}"


@pytest.mark.parametrize("target", TARGETS)
def test_every_ray_pod_reaches_mlflow_and_s3_in_the_cluster(target):
    docs = render(target)
    services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in find(docs, "Service")}
    for doc in [d for d in docs if d["kind"] in RAY_KINDS]:
        for group, spec in ray_groups(doc):
            container = spec["template"]["spec"]["containers"][0]
            env = container_env(container, docs)
            for variable in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
                url = urlsplit(env.get(variable, ""))
                where = f"{target} {doc['kind']}/{doc['metadata']['name']} {group}: {variable}={url.geturl()!r}"
                assert url.scheme == "http" and url.hostname in services, f"{where}: no such Service"
                assert url.port in services[url.hostname], f"{where}: the Service has no port {url.port}"
            secrets = [s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s]
            assert "armature-s3" in secrets, f"{doc['metadata']['name']} {group}: no S3 credentials"
    mlflow = one(docs, "Deployment", "armature-mlflow")["spec"]["template"]["spec"]["containers"][0]
    allowed = container_env(mlflow, docs)["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "armature-mlflow:*" in allowed, "MLflow 3 would reject the Host header of in-cluster clients"


# =========================================================================== the generator
@pytest.mark.parametrize("target", TARGETS)
def test_rayservice_serves_the_armature_serve_app(target):
    service = one(render(target), "RayService", "armature-generator")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = config["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH
    local = yaml.safe_load((REPO / "configs" / "ray_serve.yaml").read_text())["http_options"]
    for key in ("keep_alive_timeout_s", "request_timeout_s"):  # the proxy bounds requests on the cluster too
        assert config["http_options"][key] == local[key], key
    module = SERVE_IMPORT_PATH.split(":")[0]
    assert (REPO / Path(*module.split(".")[:-1]) / "__init__.py").is_file(), f"no package for {module}"


def test_serve_app_module_defines_the_builder():
    module, attribute = SERVE_IMPORT_PATH.split(":")
    source = REPO / (module.replace(".", "/") + ".py")
    if not source.is_file():
        pytest.skip(f"{source.relative_to(REPO)} is not written yet: RayService imports {SERVE_IMPORT_PATH}")
    tree = ast.parse(source.read_text())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert attribute in names, f"{source.relative_to(REPO)} defines no {attribute} (RayService serveConfigV2)"


# =========================================================================== credentials
SECRET_EXAMPLE = K8S / "secret.example.yaml"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:(?!\$\()[^/\s@]+@")  # user:password@, not $(VAR)


@pytest.mark.parametrize("target", TARGETS)
def test_no_credentials_in_rendered_output(target):
    docs = render(target)
    assert not [d for d in docs if d["kind"] == "Secret" and (d.get("data") or d.get("stringData"))]
    for doc in docs:
        for env in walk(doc, "env"):
            for var in env:
                if "value" in var:
                    assert not SECRET_NAME.search(var["name"]), f"{var['name']} has a literal value: use a Secret"
                    assert not URL_WITH_PASSWORD.search(var["value"]), f"{var['name']} holds a password"
        if doc["kind"] == "ConfigMap":
            assert not [k for k in doc.get("data", {}) if SECRET_NAME.search(k)], "credentials in a ConfigMap"


def test_secret_example_is_not_applied_and_covers_every_reference():
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        listed = [*spec.get("resources", []), *[p.get("path", "") for p in spec.get("patches", [])]]
        assert not [r for r in listed if "secret" in r], f"{kustomization} applies a Secret"
        assert "secretGenerator" not in spec, f"{kustomization} generates a Secret"
    examples = list(yaml.safe_load_all(SECRET_EXAMPLE.read_text()))
    for example in examples:
        assert validate(example) == []
    keys = {s["metadata"]["name"]: set(s["stringData"]) for s in examples}
    for target in TARGETS:
        docs = render(target)
        for ref in walk(docs, "secretKeyRef"):
            assert ref["key"] in keys.get(ref["name"], ()), f"{ref} is not in {SECRET_EXAMPLE.name}"
        for ref in walk(docs, "secretRef"):
            assert ref["name"] in keys, f"Secret {ref['name']} is not in {SECRET_EXAMPLE.name}"


# =========================================================================== overlays and images
def ray_worker_pods(docs: list[dict]):
    for doc in [d for d in docs if d["kind"] in RAY_KINDS]:
        for group, spec in ray_groups(doc)[1:]:
            yield f"{doc['kind']}/{doc['metadata']['name']} {group}", spec["template"]["spec"]


@pytest.mark.parametrize("target", ["gpu", "gpu-direct-ingress"])
def test_gpu_overlay_puts_ray_workers_on_gpu_nodes(target):
    workers = list(ray_worker_pods(render(target)))
    assert len(workers) == 3
    for where, pod in workers:
        resources = pod["containers"][0]["resources"]
        assert int(resources["limits"].get("nvidia.com/gpu", 0)) >= 1, f"{where}: no nvidia.com/gpu limit"
        assert resources["requests"].get("nvidia.com/gpu") == resources["limits"]["nvidia.com/gpu"], where
        assert pod.get("nodeSelector"), f"{where}: no nodeSelector"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f"{where}: no toleration"
    job = one(render(target), "RayJob", "armature-train")
    assert "trainer.use_gpu=true" in shlex.split(job["spec"]["entrypoint"])


def test_direct_ingress_serves_the_replicas_own_port_to_a_service():
    """k8s/components/direct-ingress: Serve's settings on every Ray pod of the generator, the port pinned
    where the Service, the readiness probe and the NetworkPolicy look for it, no replica on the head."""
    docs = render("gpu-direct-ingress")
    service = one(docs, "RayService", "armature-generator")
    (_, head), (_, workers) = ray_groups(service)
    assert head["rayStartParams"]["num-cpus"] == "0"  # the replicas run where the Service looks
    port = 30000
    for group in (head, workers):
        env = container_env(group["template"]["spec"]["containers"][0], docs)
        assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1" and env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"
        assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == "30000"
    container = workers["template"]["spec"]["containers"][0]
    assert {"name": "serve-direct", "containerPort": port} in container["ports"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": port}
    svc = one(docs, "Service", "armature-generator-direct")
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["targetPort"] == "serve-direct"
    labels = workers["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert not svc["spec"]["selector"].items() <= head["template"]["metadata"]["labels"].items()
    # The gpu overlay otherwise: the rest of the output is the same objects.
    names = {(d["kind"], d["metadata"]["name"]) for d in render("gpu")}
    added = {(d["kind"], d["metadata"]["name"]) for d in docs} - names
    assert added == {("Service", "armature-generator-direct"), ("NetworkPolicy", "armature-generator-direct-ingress")}


@pytest.mark.parametrize("target", ["base", "cpu-dev"])
def test_cpu_targets_ask_for_no_gpu(target):
    docs = render(target)
    assert not [r for r in walk(docs, "limits") if "nvidia.com/gpu" in r]
    assert not list(walk(docs, "nodeSelector"))


def test_cpu_dev_ray_pods_are_small():
    for doc in [d for d in render("cpu-dev") if d["kind"] in RAY_KINDS]:
        for group, spec in ray_groups(doc):
            limits = spec["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert cpus(limits["cpu"]) <= 2, f"{doc['metadata']['name']} {group}: {limits}"


def test_images_are_pinned_and_match_the_dockerfile():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.M))
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{VARIANT\}", dockerfile, re.M)
    assert args["PYTHON_TAG"] == "py311" and args["VARIANT"] in ("cpu", "gpu")
    for target, variant in (("base", "cpu"), ("cpu-dev", "cpu"), ("gpu", "gpu"), ("gpu-direct-ingress", "gpu")):
        docs = render(target)
        for image in walk(docs, "image"):
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", f"{target}: image {image!r} is not pinned"
        for doc in [d for d in docs if d["kind"] in RAY_KINDS]:
            assert ray_cluster_spec(doc)["rayVersion"] == args["RAY_VERSION"], "rayVersion != the image's Ray"
            images = set(walk(doc, "image"))
            assert images and all(i.startswith("armature:") and i.endswith(f"-{variant}") for i in images), images


# =========================================================================== least privilege
def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod an object makes: workloads, Ray groups, the RayJob's submitter."""
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [(where, doc["spec"]["template"]["spec"])]
    if doc["kind"] not in RAY_KINDS:
        return []
    pods = [(f"{where} {group}", spec["template"]["spec"]) for group, spec in ray_groups(doc)]
    if "submitterPodTemplate" in doc["spec"]:
        pods.append((f"{where} submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return pods


def restricted(security_context: dict) -> bool:
    return (
        security_context.get("allowPrivilegeEscalation") is False
        and security_context.get("readOnlyRootFilesystem") is True
        and security_context.get("capabilities", {}).get("drop") == ["ALL"]
        and not security_context.get("privileged")
        and security_context.get("runAsUser", 1) != 0
    )


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_runs_as_non_root_read_only_with_limits(target):
    docs = render(target)
    pods = [pod for doc in docs for pod in pod_specs(doc)]
    assert len(pods) == 11  # MinIO, its Job, MLflow, PostgreSQL, 3 Ray clusters x 2 groups, the submitter
    for where, pod in pods:
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) > 0, f"{where}: may run as root"
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, f"{where}: no RuntimeDefault seccomp"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod.get("initContainers", []) + pod["containers"]:
            name = f"{where} {container['name']}"
            assert restricted(container.get("securityContext", {})), f"{name}: {container.get('securityContext')}"
            assert {"cpu", "memory"} <= set(container.get("resources", {}).get("limits", {})), f"{name}: no limits"
        for container in pod["containers"]:  # a read-only root, so somewhere to write temporary files
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], f"{where} {container['name']}: no /tmp"
            assert volumes[mounts["/tmp"]]["emptyDir"].get("sizeLimit"), f"{where}: /tmp without a size limit"
    autoscaler = ray_cluster_spec(one(docs, "RayCluster", "armature-interactive"))["autoscalerOptions"]
    assert restricted(autoscaler["securityContext"]) and {"cpu", "memory"} <= set(autoscaler["resources"]["limits"])


@pytest.mark.parametrize("target", TARGETS)
def test_generator_api_key_comes_from_a_secret(target):
    service = one(render(target), "RayService", "armature-generator")
    for group, spec in ray_groups(service):
        env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0].get("env", [])}
        assert env["ARMATURE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "armature-generator",
            "key": "ARMATURE_API_KEY",
        }, f"generator {group}: keyless"


def test_only_minio_and_its_job_hold_the_root_key_and_ray_pods_a_scoped_one():
    docs = render("base")
    examples = {s["metadata"]["name"]: s["stringData"] for s in yaml.safe_load_all(SECRET_EXAMPLE.read_text())}
    root_user = examples["armature-minio-root"]["MINIO_ROOT_USER"]
    assert root_user not in (
        examples["armature-s3"]["AWS_ACCESS_KEY_ID"],
        examples["armature-s3-mlflow"]["AWS_ACCESS_KEY_ID"],
    )
    holders = {
        where
        for doc in docs
        for where, pod in pod_specs(doc)
        if any(ref["name"] == "armature-minio-root" for ref in [*walk(pod, "secretRef"), *walk(pod, "secretKeyRef")])
    }
    assert holders == {"Deployment/armature-minio", "Job/armature-minio-buckets"}
    for doc in [d for d in docs if d["kind"] in RAY_KINDS]:
        for group, spec in ray_groups(doc):
            secrets = {ref["name"] for ref in walk(spec, "secretRef")}
            assert "armature-s3" in secrets and "armature-s3-mlflow" not in secrets, (
                f"{doc['metadata']['name']} {group}"
            )
    # the bucket Job makes the Ray pods' key a MinIO user whose policy names bucket "armature" alone
    job = one(docs, "Job", "armature-minio-buckets")["spec"]["template"]["spec"]["containers"][0]
    script = job["args"][0]
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in job["env"]}
    assert env["RAY_ACCESS_KEY_ID"] == {"name": "armature-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert 'grant "$RAY_ACCESS_KEY_ID" "$RAY_SECRET_ACCESS_KEY" armature\n' in script
    assert "mc admin user add" in script and "mc admin policy attach" in script
    assert '"arn:aws:s3:::$3"' in script and '"arn:aws:s3:::$3/*"' in script and "arn:aws:s3:::*" not in script


# =========================================================================== network policies
PodRef = tuple  # (namespace labels, pod labels); pods of the namespace armature have {"ns": "armature"}
HOME_NS = {"kubernetes.io/metadata.name": "armature"}


def selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
        }[op]
        if not ok:
            return False
    return True


def peer_matches(peer: dict, pod: PodRef) -> bool:
    namespace, labels = pod
    if "ipBlock" in peer:
        return False  # pods are matched by selectors here; ipBlocks are for outside the cluster
    in_namespace = (
        selects(peer["namespaceSelector"], namespace) if "namespaceSelector" in peer else namespace == HOME_NS
    )
    return in_namespace and selects(peer.get("podSelector", {}), labels)


def allowed(policies: list[dict], direction: str, pod: PodRef, peer: PodRef, port: int) -> bool:
    """Kubernetes' reading: a pod no policy of ``direction`` selects is open; else some rule of
    one of the policies that select it must admit the peer and the port."""
    applying = [
        p["spec"]
        for p in policies
        if pod[0] == HOME_NS and selects(p["spec"]["podSelector"], pod[1]) and direction in p["spec"]["policyTypes"]
    ]
    if not applying:
        return True
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for spec in applying:
        for rule in spec.get(key, []):
            if (peers not in rule or any(peer_matches(x, peer) for x in rule[peers])) and (
                "ports" not in rule
                or any(r["port"] == port and r.get("protocol", "TCP") == "TCP" for r in rule["ports"])
            ):
                return True
    return False


def reachable(policies, source: PodRef, target: PodRef, port: int) -> bool:
    return allowed(policies, "Egress", source, target, port) and allowed(policies, "Ingress", target, source, port)


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_deny_by_default_and_open_only_what_each_part_needs(target):
    docs = render(target)
    policies = find(docs, "NetworkPolicy")
    assert {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]} in [p["spec"] for p in policies]
    pods: dict[str, PodRef] = {}
    for doc in docs:
        for where, _ in pod_specs(doc):
            template = (
                doc["spec"]["submitterPodTemplate"]
                if where.endswith("submitter")
                else dict(ray_groups(doc))[where.split()[-1]]["template"]
                if doc["kind"] in RAY_KINDS
                else doc["spec"]["template"]
            )
            pods[where] = (HOME_NS, template["metadata"]["labels"])
    pods["stranger"] = (HOME_NS, {"app": "notebook"})  # any other pod of the namespace
    pods["operator"] = ({"kubernetes.io/metadata.name": "kuberay", "armature/ray-operator": "true"}, {"app": "kuberay"})
    pods["ingress"] = ({"kubernetes.io/metadata.name": "ingress-nginx", "armature/ingress": "true"}, {"app": "nginx"})
    pods["elsewhere"] = ({"kubernetes.io/metadata.name": "default"}, {"app": "x"})
    train, gen, inter = "RayJob/armature-train", "RayService/armature-generator", "RayCluster/armature-interactive"
    mlflow, minio, pg = "Deployment/armature-mlflow", "Deployment/armature-minio", "StatefulSet/armature-postgres"
    buckets = "Job/armature-minio-buckets"
    opened = [
        (f"{train} workers", f"{train} head", 6379),
        (f"{train} head", f"{train} workers", 10002),
        (f"{gen} workers", f"{gen} head", 6379),
        (f"{inter} head", f"{inter} workers", 10002),
        (f"{train} submitter", f"{train} head", 8265),
        ("operator", f"{train} head", 8265),
        ("operator", f"{gen} head", 8265),
        ("operator", f"{inter} head", 8265),
        ("ingress", f"{gen} head", 8000),
        ("ingress", f"{gen} workers", 8000),
        (f"{train} head", mlflow, 5000),
        (f"{inter} workers", mlflow, 5000),
        (f"{train} workers", minio, 9000),
        (f"{gen} workers", minio, 9000),
        (mlflow, pg, 5432),
        (mlflow, minio, 9000),
        (buckets, minio, 9000),
    ]
    closed = [
        ("stranger", f"{train} head", 8265),
        ("stranger", f"{inter} head", 8265),
        ("stranger", f"{gen} head", 8000),
        ("stranger", mlflow, 5000),
        ("stranger", minio, 9000),
        ("stranger", pg, 5432),
        ("elsewhere", f"{inter} head", 8265),
        ("elsewhere", mlflow, 5000),
        ("elsewhere", f"{gen} head", 8000),
        (f"{train} head", pg, 5432),
        (f"{train} workers", f"{gen} head", 8000),
        (f"{gen} head", f"{train} head", 8265),
        (f"{inter} workers", f"{train} head", 6379),
        (f"{train} submitter", f"{train} head", 6379),
        (f"{train} submitter", mlflow, 5000),
        ("ingress", f"{gen} head", 8265),
        ("ingress", mlflow, 5000),
        ("operator", f"{train} head", 6379),
        (minio, pg, 5432),
        (buckets, mlflow, 5000),
        (f"{train} head", minio, 9001),
        (mlflow, f"{train} head", 8265),
        (pg, minio, 9000),
    ]
    # The generator replicas' own port (direct ingress): open to the ingress controller only, only where they serve.
    direct = ("ingress", f"{gen} workers", 30000)
    (opened if target.endswith("direct-ingress") else closed).append(direct)
    closed += [("ingress", f"{gen} head", 30000), ("stranger", f"{gen} workers", 30000)]
    closed += [("elsewhere", f"{gen} workers", 30000), (f"{train} workers", f"{gen} workers", 30000)]
    wrong = [f"{s} -> {t}:{port} is closed" for s, t, port in opened if not reachable(policies, pods[s], pods[t], port)]
    wrong += [f"{s} -> {t}:{port} is open" for s, t, port in closed if reachable(policies, pods[s], pods[t], port)]
    assert not wrong, f"{target}:\n  " + "\n  ".join(wrong)
