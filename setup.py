"""Maps the repository's top-level folders under the `meshagent` import namespace.

DESIGN.md fixes the folders (`agent/`, `controller/`, `lab/`, `common/`, `bpf/`); installing
them as top-level packages would take generic names, so each becomes `meshagent.<folder>`.
Sub-packages are found by walking the folders, so a new one needs no edit here. A folder of
data files only (no `__init__.py`, e.g. `lab/examples/`) is declared too, as a namespace
package, so setuptools ships its package data without warning that it is "absent from the
packages configuration"; pyproject.toml's `[tool.setuptools.package-data]` says which files.
"""

from pathlib import Path

from setuptools import setup

FOLDERS = ("agent", "controller", "lab", "common", "bpf")
ROOT = Path(__file__).parent


def _packages() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for folder in FOLDERS:
        top = ROOT / folder
        for path in sorted([top, *top.rglob("*")]):
            if not path.is_dir() or path.name == "__pycache__" or path.name.startswith("."):
                continue
            rel = path.relative_to(ROOT)
            name = "meshagent." + ".".join(rel.parts)
            packages.append(name)
            package_dir[name] = rel.as_posix()
    return packages, package_dir


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir)
