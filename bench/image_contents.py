"""What each image's /opt/kubetoll holds, and how big it is, built here as the Dockerfiles build it.

No Docker engine is needed: the script builds the project's wheel, makes one venv
per image, installs the wheel with that image's extra from the package index
(`pip install "<wheel>[sidecar,traces]"`, as the Dockerfile's builder stage does), runs
the Dockerfile's own prune step and prints the venv's size, the project packages
it holds and its largest dependencies. The runtime image adds python:3.11-slim
(about 130 MB) to this.

    .venv/bin/python bench/image_contents.py            # both images (needs the package index, ~1 min)
    .venv/bin/python bench/image_contents.py --keep DIR # keep the venvs in DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {"sidecar": "Dockerfile.sidecar", "operator": "Dockerfile.operator"}
# The extras each Dockerfile installs (the sidecar carries OpenTelemetry for telemetry.otlp, loaded only then).
EXTRAS = {"sidecar": "sidecar,traces", "operator": "operator"}


def prune_step(dockerfile: Path) -> str:
    """The builder's RUN step that removes the project's packages the image does not run."""
    joined = dockerfile.read_text().replace("\\\n", " ")
    steps = [line.strip()[4:] for line in joined.splitlines() if line.startswith("RUN") and "shutil.rmtree" in line]
    if len(steps) != 1:
        raise SystemExit(f"{dockerfile.name}: expected one prune step, found {len(steps)}")
    return steps[0]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", metavar="DIR", help="build the venvs in DIR and keep them")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kt-images-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        dist = work / "dist"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(dist), str(ROOT)], check=True
        )
        wheel = next(dist.glob("kubetoll-*.whl"))
        for which, dockerfile in IMAGES.items():
            venv = work / which
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            subprocess.run([*pip, f"{wheel}[{EXTRAS[which]}]"], check=True)
            subprocess.run(
                ["bash", "-c", prune_step(ROOT / dockerfile).replace("/opt/kubetoll", str(venv))], check=True
            )
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "--yes", "pip"],
                check=True,
            )
            site = site_packages(venv / "bin" / "python")
            sizes = {p.name: du(p) for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")}
            ours = sorted(n for n in sizes if n.startswith("kubetoll_"))
            top = sorted(((s, n) for n, s in sizes.items() if not n.startswith("kubetoll_")), reverse=True)[:8]
            print(f"{which} image: /opt/kubetoll {du(venv) / 2**20:.1f} MiB (without python:3.11-slim)")
            print(f"  project packages: {', '.join(ours)} ({sum(sizes[n] for n in ours) / 2**20:.1f} MiB)")
            print("  largest dependencies: " + ", ".join(f"{n} {s / 2**20:.1f} MiB" for s, n in top))
            scripts = sorted(p.name for p in (venv / "bin").iterdir() if p.name.startswith("kubetoll"))
            print(f"  entry points: {json.dumps(scripts)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
