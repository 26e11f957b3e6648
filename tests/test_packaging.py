"""The library installs from its wheel beside the torch a user already has, and leaves that torch alone.

setup.cfg declares the versions the library supports (ranges); constraints.txt pins the versions the tests
run on. The wheel tests build the wheel and install it into fresh virtual environments that already hold
torch: this environment's own build, and a CUDA build of the oldest torch the library declares.
"""

from __future__ import annotations

import configparser
import email.parser
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# What the build reads: the package, its metadata and the long description.
BUILD_INPUTS = ("attndistill_hf", "setup.cfg", "pyproject.toml", "README.md")
LIBRARY = "attndistill-hf"
# The local version label of a CUDA build, as a user's torch from the PyTorch index carries it.
CUDA_LABEL = "+cu124"


def declared_requirements() -> list[Requirement]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options"]["install_requires"].splitlines()
    return [Requirement(line) for line in lines if line.strip()]


def pinned_versions() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(pinned)
    return pins


def lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    assert bounds, f"{requirement} declares no lowest supported version"
    return max(bounds)


def test_the_pinned_versions_are_inside_the_declared_ranges() -> None:
    pins = pinned_versions()
    for requirement in declared_requirements():
        assert not [spec for spec in requirement.specifier if spec.operator in ("==", "===")], requirement
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"constraints.txt pins no version of {requirement.name}"
        assert requirement.specifier.contains(pinned), f"{requirement.name}=={pinned} is outside {requirement}"
    # The environment the tests run in holds the pinned torch.
    assert Version(version("torch")) == pins["torch"] and Version(version("torchvision")) == pins["torchvision"]


# ------------------------------------------------------------------------------------------------------
# The wheel in fresh virtual environments
# ------------------------------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """The environment of a user's shell: no pip configuration of this machine, nothing on PYTHONPATH."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PIP_", "PYTHON"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}


def run(command: list[str | Path], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{command[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The library's wheel, built offline from a copy of its sources (the build writes into its source tree)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--wheel-dir", root / "dist", source], cwd=root)  # fmt: skip
    (built,) = (root / "dist").glob("attndistill_hf-*.whl")
    return built


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    return [Requirement(line) for line in metadata.get_all("Requires-Dist", [])]


def dist_infos(folder: Path) -> dict[str, Path]:
    """The ``*.dist-info`` folders of ``folder`` by canonical distribution name."""
    found = {}
    for path in folder.glob("*.dist-info"):
        metadata = email.parser.Parser().parsestr((path / "METADATA").read_text(), headersonly=True)
        found[canonicalize_name(metadata["Name"])] = path
    return found


def fresh_venv(root: Path, replaced_versions: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A new virtual environment that already has torch and the library's other dependencies.

    Installing them again would take minutes, so the environment sees this one's through a ``.pth`` file
    that names a folder of links to its site-packages, minus the library itself (which then has to
    come from the wheel). ``replaced_versions`` makes distributions claim other versions, as a user's
    builds do: only their metadata changes, with every exact pin on them. Returns the environment's
    interpreter and its own site-packages folder.
    """
    replaced_versions = replaced_versions or {}
    view = root / "installed"
    view.mkdir()
    claimed_written = set()
    for site_packages in dict.fromkeys(Path(path).resolve() for path in site.getsitepackages()):
        if not site_packages.is_dir():
            continue
        infos = dist_infos(site_packages)
        skipped = {info.name for name, info in infos.items() if name in replaced_versions}
        for entry in site_packages.iterdir():
            own = "attndistill_hf" in entry.name  # the package, its metadata, an editable install's hooks
            if entry.name not in skipped and not own and not (view / entry.name).exists():
                (view / entry.name).symlink_to(entry)
        for name in replaced_versions.keys() & infos.keys() - claimed_written:
            write_claimed_metadata(infos[name], view, replaced_versions[name], replaced_versions)
            claimed_written.add(name)
    assert claimed_written == replaced_versions.keys()
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    own_site = Path(
        run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    )
    (own_site / "installed-before.pth").write_text(f"{view}\n")
    return python, own_site


def write_claimed_metadata(info: Path, view: Path, claimed: str, replaced_versions: dict[str, str]) -> None:
    """A copy of ``info``'s metadata that claims version ``claimed`` and pins the other replaced distributions."""
    metadata = email.parser.Parser().parsestr((info / "METADATA").read_text())
    name = metadata["Name"]
    metadata.replace_header("Version", claimed)
    requires = metadata.get_all("Requires-Dist", [])
    del metadata["Requires-Dist"]
    for line in requires:
        requirement = Requirement(line)
        other = replaced_versions.get(canonicalize_name(requirement.name))
        if other is not None and requirement.marker is None:
            line = f"{requirement.name}=={other}"  # torchvision pins the torch it was built with
        metadata["Requires-Dist"] = line
    claimed_info = view / f"{name}-{claimed}.dist-info"
    claimed_info.mkdir()
    (claimed_info / "METADATA").write_text(metadata.as_string())


def pip_install(python: Path, wheel: Path, cwd: Path, *extra: str) -> list[str]:
    """``pip install attndistill_hf`` from the wheel's folder alone; the names of what pip installs."""
    report = cwd / "report.json"
    run([python, "-m", "pip", "install", "--no-index", "--find-links", wheel.parent, "--report", report, *extra]
        + ["attndistill_hf"], cwd=cwd)  # fmt: skip
    return [canonicalize_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]]


@pytest.mark.slow
def test_the_wheel_declares_ranges_that_admit_the_tested_versions(wheel: Path) -> None:
    requirements = {canonicalize_name(r.name): r for r in wheel_requirements(wheel) if r.marker is None}
    assert {"torch", "torchvision", "transformers", "accelerate", "datasets", "safetensors"} <= requirements.keys()
    for name, requirement in requirements.items():
        assert not [spec for spec in requirement.specifier if spec.operator in ("==", "===")], requirement
        assert requirement.specifier.contains(version(name)), f"the tested {name} {version(name)} is not in range"
    assert lower_bound(requirements["torch"]) < Version(version("torch"))


@pytest.mark.slow
def test_installing_the_wheel_keeps_the_torch_of_the_environment(wheel: Path, tmp_path: Path) -> None:
    python, own_site = fresh_venv(tmp_path)
    assert pip_install(python, wheel, tmp_path) == [LIBRARY]
    # Only the library went into the environment (beside the .pth file that shows it what it had).
    library_version = wheel.name.split("-")[1]
    assert sorted(path.name for path in own_site.iterdir()) == [
        "attndistill_hf",
        f"attndistill_hf-{library_version}.dist-info",
        "installed-before.pth",
    ]
    probe = (
        "import json, torch, attndistill_hf, attndistill_hf.data, attndistill_hf.evaluation; "
        "print(json.dumps([torch.__version__, torch.__file__, attndistill_hf.__file__]))"
    )
    # -I: nothing from this checkout or the current folder can stand in for the installed wheel.
    done = run([python, "-I", "-c", probe], cwd=tmp_path)
    torch_version, torch_file, library_file = json.loads(done.stdout.splitlines()[-1])
    assert torch_version == torch.__version__
    assert Path(torch_file).resolve() == Path(torch.__file__).resolve()
    assert Path(library_file).is_relative_to(own_site)


@pytest.mark.slow
def test_a_cuda_build_of_the_oldest_supported_torch_is_kept(wheel: Path, tmp_path: Path) -> None:
    requirements = {canonicalize_name(r.name): r for r in wheel_requirements(wheel) if r.marker is None}
    oldest = {name: lower_bound(requirements[name]).release for name in ("torch", "torchvision")}
    claimed = {name: ".".join(map(str, (*release, 0, 0)[:3])) + CUDA_LABEL for name, release in oldest.items()}
    python, _ = fresh_venv(tmp_path, claimed)
    listed = run([python, "-m", "pip", "list", "--format", "json"], cwd=tmp_path).stdout
    installed = {canonicalize_name(item["name"]): item["version"] for item in json.loads(listed)}
    assert {name: installed[name] for name in claimed} == claimed
    # pip would have to fetch another torch (and fail: there is no index) if the wheel pinned one.
    assert pip_install(python, wheel, tmp_path, "--dry-run") == [LIBRARY]
