"""The distribution: one namespace, the schemas inside it, and what --setup_file ships.

Built from this checkout with pip and setuptools, installed into a folder of its own and
imported from outside the repository, as a user's ``pip install .`` would be.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

FOLDERS = ("pipelines", "transforms", "schemas", "runners")


def _tracked_modules() -> set[str]:
    """The .py and .avsc files of the project's folders that a clone holds."""
    tracked = subprocess.run(
        ["git", "ls-files", *FOLDERS], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    return {name for name in tracked if name.endswith((".py", ".avsc"))}


def _checkout(root: Path) -> Path:
    """A copy of what a clone holds, so building leaves nothing (build/, egg-info) here."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        source = REPO / name.decode()
        target = root / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    return root


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    tree = _checkout(tmp_path_factory.mktemp("checkout"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(tree)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("moesif_beam-*.whl")
    return built


def test_the_wheel_installs_one_namespace_with_its_schemas_and_types(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"moesif_beam"}
    installed = {name.removeprefix("moesif_beam/") for name in names}
    assert _tracked_modules() <= installed
    assert "moesif_beam/py.typed" in names
    assert "moesif_beam/schemas/dead_letter.avsc" in names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Python: >=3.11" in text
    from moesif_beam import __version__

    assert f"Version: {__version__}\n" in text
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "moesif-beam = moesif_beam.runners.entry:main" in (
        zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_installed_it_imports_as_moesif_beam_only(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        "import importlib.util, sys\n"
        "sys.path = [p for p in sys.path if 'moesif_beam' not in p and p not in ('', '.')]\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        "for name in ('transforms', 'pipelines', 'runners', 'schemas'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "import moesif_beam\n"
        "from moesif_beam.schemas import schema_json\n"
        "from moesif_beam.runners import cli\n"
        f"assert moesif_beam.__file__.startswith({str(target)!r}), moesif_beam.__file__\n"
        f"assert cli.__file__.startswith({str(target)!r}), cli.__file__\n"
        "assert schema_json('dead_letter')['name'] == 'DeadLetter'\n"
        "print('ok')\n"
    )
    # -I: no user site, no cwd, no PYTHONPATH; the venv's own packages (Beam...) stay, but
    # the editable install of this checkout is dropped above.
    result = subprocess.run(
        [sys.executable, "-I", "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_setup_file_sdist_ships_every_module_and_schema(tmp_path):
    # Beam's --setup_file runs `python setup.py sdist` and installs the result on workers.
    subprocess.run(
        [sys.executable, "setup.py", "sdist", "--dist-dir", str(tmp_path / "dist")],
        cwd=_checkout(tmp_path / "checkout"),
        check=True,
        capture_output=True,
        timeout=300,
    )
    (sdist,) = (tmp_path / "dist").glob("moesif[-_]beam-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert _tracked_modules() <= names
    assert "moesif_beam/__init__.py" in names
