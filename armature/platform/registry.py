"""Adapters in the MLflow model registry: training jobs register, the server resolves.

A registered version points at the ``adapter/`` artifact folder of a training run
(``adapter_model.safetensors`` + ``adapter_config.json``, or ``unet.safetensors`` for a full
fine-tune). References: ``name`` (latest version), ``name/3`` (a version), ``name@prod`` (an
alias), or a local folder path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["register_adapter", "resolve_version", "resolve_adapter", "download_adapter", "list_adapters"]

ADAPTER_ARTIFACT = "adapter"


def register_adapter(
    tracking_uri: str, run_id: str, name: str, artifact_path: str = ADAPTER_ARTIFACT, tags: dict[str, str] | None = None
) -> int:
    """Register the run's adapter folder as a new version of model ``name``; returns the version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        client.create_registered_model(name, description="Armature diffusion adapter")
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
    return int(version.version)


def _parse(reference: str) -> tuple[str, str | None, str | None]:
    if "@" in reference:
        name, alias = reference.split("@", 1)
        return name, None, alias
    if "/" in reference:
        name, version = reference.rsplit("/", 1)
        if version.isdigit():
            return name, version, None
    return reference, None, None


def resolve_version(tracking_uri: str, reference: str) -> dict:
    """The registered version ``reference`` names: ``{name, version, source, run_id}``.

    Raises KeyError when there is no such model, version or alias.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    name, version, alias = _parse(reference)
    if not name or "'" in name:
        raise KeyError(f"adapter {reference!r}: not a registered model name")
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version:
            mv = client.get_model_version(name, version)
        else:
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise KeyError(f"adapter {reference!r}: no registered model of that name")
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException as err:
        raise KeyError(f"adapter {reference!r}: {err.message if hasattr(err, 'message') else err}") from err
    return {"name": mv.name, "version": int(mv.version), "source": mv.source, "run_id": mv.run_id}


def resolve_adapter(tracking_uri: str | None, reference: str, cache_dir: str | os.PathLike) -> Path:
    """A local folder holding the adapter named by ``reference`` (downloaded once per version)."""
    local = Path(reference).expanduser()
    if local.is_dir():
        return local
    if not tracking_uri:
        raise FileNotFoundError(f"adapter {reference!r}: no such folder, and no MLflow tracking URI set")
    return download_adapter(tracking_uri, resolve_version(tracking_uri, reference), cache_dir)


def download_adapter(tracking_uri: str, mv: dict, cache_dir: str | os.PathLike) -> Path:
    """The folder of the registered version ``mv`` (from ``resolve_version``), downloaded once."""
    from mlflow.artifacts import download_artifacts

    cache_dir = Path(cache_dir)
    target = cache_dir / f"{mv['name']}-v{mv['version']}"
    if not target.is_dir():
        # Download into a folder of our own, then rename: replicas sharing the cache may race.
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
        download_artifacts(artifact_uri=mv["source"], dst_path=str(tmp), tracking_uri=tracking_uri)
        inner = tmp / Path(mv["source"].rstrip("/")).name
        try:
            (inner if inner.is_dir() else tmp).rename(target)
        except OSError:
            if not target.is_dir():
                raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def list_adapters(tracking_uri: str) -> list[dict]:
    """Every registered adapter version: name, version, aliases, run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    out = []
    for model in client.search_registered_models():
        aliases = getattr(model, "aliases", None) or {}
        for mv in client.search_model_versions(f"name='{model.name}'"):
            version = int(mv.version)
            out.append(
                {
                    "name": mv.name,
                    "version": version,
                    "aliases": sorted(a for a, v in aliases.items() if int(v) == version),
                    "run_id": mv.run_id,
                }
            )
    return sorted(out, key=lambda d: (d["name"], d["version"]))
