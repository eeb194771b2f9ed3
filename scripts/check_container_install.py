"""Prove that the container install line replaces none of the NeMo 24.07 container's packages.

The install line users run inside ``nvcr.io/nvidia/nemo:24.07`` is::

    pip install -r requirements-container.txt -c constraints/nemo-24.07.txt

Two checks, each failing (exit status 1) if pip would install any version of a protected package:

``--venv PATH``
    On an environment that already holds the container's packages (``scripts/setup_env.sh container``
    builds one): records the protected versions, asks pip for a dry-run report of the install line,
    then (with ``--install``) runs the line for real and compares ``pip list`` before and after.
``--exact-versions``
    On a throw-away environment holding only metadata that carries the container's exact version strings
    (e.g. NVIDIA's ``torch 2.3.0a0+40ec155e58.nv24.3``, which no registry serves): a dry run shows that pip
    accepts those pre-release/local builds as they are instead of "upgrading" them to a release.

Standard library only; runs with any Python 3.10+.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements-container.txt"
CONSTRAINTS = REPO / "constraints" / "nemo-24.07.txt"
PIP_VERSION = "pip==24.0"

# The container's packages that the install line must never replace: its library stack and its NeMo.
PROTECTED = (
    "torch",
    "transformers",
    "tokenizers",
    "sentencepiece",
    "protobuf",
    "megatron-core",
    "datasets",
    "numpy",
    "nemo-toolkit",
    "pytorch-lightning",
    "hydra-core",
    "omegaconf",
    "huggingface-hub",
)

# Version strings as a NeMo 24.07 container reports them (NGC builds of torch carry a pre-release
# number and a local label). Used only to write metadata for the --exact-versions check.
CONTAINER_VERSION_STRINGS = {
    "torch": "2.3.0a0+40ec155e58.nv24.3",
    "transformers": "4.40.2",
    "tokenizers": "0.19.1",
    "sentencepiece": "0.2.0",
    "protobuf": "4.24.4",
    "megatron-core": "0.8.0rc0",
    "datasets": "2.20.0",
    "numpy": "1.24.4",
    "pyarrow": "16.1.0",
    "fsspec": "2024.5.0",
    "safetensors": "0.4.3",
    # NeMo's line in the container; the others as the CI stand-in has them (their exact strings in the
    # container are not published; any release satisfies NeMo 2.0.0rc1's requirements).
    "nemo-toolkit": "2.0.0rc1",
    "pytorch-lightning": "2.3.3",
    "hydra-core": "1.3.2",
    "omegaconf": "2.3.0",
    "huggingface-hub": "0.24.5",
}


def normalize(name: str) -> str:
    """PEP 503 form of a distribution name (``Megatron_Core`` -> ``megatron-core``)."""
    return name.lower().replace("_", "-").replace(".", "-")


def installed_versions(python: Path) -> dict[str, str]:
    """Return {normalized name: version} of every distribution in the environment of ``python``."""
    listing = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {normalize(item["name"]): item["version"] for item in json.loads(listing)}


def install_line(python: Path, *extra: str) -> list[str]:
    """The users' container install line, run with the environment's own pip."""
    return [
        str(python), "-m", "pip", "install", "--disable-pip-version-check",
        "-r", str(REQUIREMENTS), "-c", str(CONSTRAINTS), *extra,
    ]  # fmt: skip


def upgrade_pip(python: Path) -> None:
    """Give a new venv the pip release of the container's period (Python 3.10's venv ships pip 23.0)."""
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PIP_VERSION],
        check=True,
    )


def dry_run_installs(python: Path) -> dict[str, str]:
    """Ask pip what the install line would install: {normalized name: version}."""
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        cmd = install_line(python, "--dry-run", "--quiet", "--report", str(report_path))
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        report = json.loads(report_path.read_text())
    return {
        normalize(item["metadata"]["name"]): item["metadata"]["version"] for item in report.get("install", [])
    }


def protected_in(installs: dict[str, str]) -> dict[str, str]:
    """The protected packages among ``installs``."""
    return {name: version for name, version in installs.items() if name in PROTECTED}


def report_dry_run(python: Path, before: dict[str, str]) -> bool:
    """Print the dry-run plan against the protected versions in ``before``; True when none is touched."""
    installs = dry_run_installs(python)
    print("pip would install:", ", ".join(f"{n}=={v}" for n, v in sorted(installs.items())) or "nothing")
    touched = protected_in(installs)
    for name, version in sorted(touched.items()):
        print(f"REPLACED: {name} {before.get(name, '(absent)')} -> {version}")
    return not touched


def check_venv(venv: Path, install: bool) -> bool:
    """Dry-run (and optionally real) install on an environment holding the container's packages."""
    python = venv / "bin" / "python"
    before = installed_versions(python)
    missing = [name for name in PROTECTED if name not in before]
    if missing:
        print(f"error: {venv} lacks the container packages {missing}; run scripts/setup_env.sh container")
        return False
    print("container packages before:", ", ".join(f"{n}=={before[n]}" for n in PROTECTED))
    ok = report_dry_run(python, before)
    if not install:
        return ok
    print("$ " + " ".join(install_line(python)), flush=True)
    subprocess.run(install_line(python, "--quiet"), check=True)
    after = installed_versions(python)
    for name in PROTECTED:
        if after.get(name) != before[name]:
            print(f"CHANGED by the install line: {name} {before[name]} -> {after.get(name, '(removed)')}")
            ok = False
    added = sorted(set(after) - set(before))
    changed = sorted(n for n in set(after) & set(before) if after[n] != before[n])
    print(f"pip list after: {len(added)} added, {len(changed)} other versions changed: {changed or 'none'}")
    print("container packages after: ", ", ".join(f"{n}=={after.get(n)}" for n in PROTECTED))
    return ok


def write_metadata_only_dist(site_packages: Path, name: str, version: str) -> None:
    """Register ``name==version`` with pip without any code (a bare ``.dist-info`` folder)."""
    dist_info = site_packages / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist_info / "INSTALLER").write_text("check_container_install\n")
    (dist_info / "RECORD").write_text("")


def check_exact_versions(python_exe: str) -> bool:
    """Dry run against metadata carrying the container's exact version strings (no real packages)."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([python_exe, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        upgrade_pip(python)
        site_packages = Path(
            subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        for name, version in CONTAINER_VERSION_STRINGS.items():
            write_metadata_only_dist(site_packages, name, version)
        before = installed_versions(python)
        print("container version strings:", ", ".join(f"{n}=={before[n]}" for n in PROTECTED))
        return report_dry_run(python, before)


def main(argv: list[str] | None = None) -> int:
    """Run the requested checks; exit status 0 only if no protected package would be replaced."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, help="environment holding the container's packages")
    parser.add_argument("--install", action="store_true", help="after the dry run, run the line for real")
    parser.add_argument(
        "--exact-versions", action="store_true", help="dry run against the container's exact version strings"
    )
    parser.add_argument(
        "--python",
        default=os.environ.get("PYTHON310", "python3.10"),
        help="interpreter for the --exact-versions venv (default: $PYTHON310 or python3.10)",
    )
    parser.add_argument("--requirements", type=Path, help="override requirements-container.txt (self-test)")
    parser.add_argument("--constraints", type=Path, help="override constraints/nemo-24.07.txt (self-test)")
    args = parser.parse_args(argv)
    global REQUIREMENTS, CONSTRAINTS
    REQUIREMENTS = args.requirements or REQUIREMENTS
    CONSTRAINTS = args.constraints or CONSTRAINTS
    if not args.venv and not args.exact_versions:
        parser.error("give --venv PATH and/or --exact-versions")
    ok = True
    if args.exact_versions:
        print("== dry run against the NeMo 24.07 container's exact version strings")
        ok &= check_exact_versions(args.python)
    if args.venv:
        print(f"== container install line in {args.venv}")
        ok &= check_venv(args.venv, args.install)
    print("OK: the container install line replaces none of " + ", ".join(PROTECTED) if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
