"""jaxsft's requirements (pyproject.toml) against this interpreter, for launch/gpu_local.sh:

    python launch/requirements.py plan CONSTRAINTS  # what to install over this python's packages
    python launch/requirements.py pin NAME          # the version that jaxsft pins NAME to

`plan` keeps the jax that is installed, with its jaxlib and CUDA plugins (pinned in the constraints
file it writes; a warning where jaxsft pins another version), and prints one requirement per line
for each other requirement that is missing or installed at a version jaxsft does not accept.
"""

from __future__ import annotations

import importlib.metadata as metadata
import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
KEPT = re.compile(r"^(jax|jaxlib|jax[-_]cuda\d+[-_](plugin|pjrt))$")  # the machine's own jax stays


def dependencies() -> list[str]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]


def _requirement(text: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(text)


def requirements() -> list:
    return [_requirement(d) for d in dependencies()]


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def satisfied(req) -> bool:
    """Installed at an accepted version, with the dependencies of its extras."""
    installed = version(req.name)
    if installed is None or not req.specifier.contains(installed, prereleases=True):
        return False
    extras = [_requirement(r) for r in metadata.requires(req.name) or ()]
    return all(version(r.name) is not None for r in extras
               if r.marker and any(r.marker.evaluate({"extra": e}) for e in req.extras))


def plan(constraints: str) -> None:
    kept = sorted({d.metadata["Name"]: d.version for d in metadata.distributions()
                   if KEPT.match(d.metadata["Name"].lower())}.items())
    pathlib.Path(constraints).write_text("".join(f"{name}=={v}\n" for name, v in kept))
    for req in requirements():
        if KEPT.match(req.name.lower()):
            if version(req.name) is None:
                sys.exit(f"error: this python has no {req.name}; use JAX=cuda12 or JAX=cuda13")
            if not req.specifier.contains(version(req.name), prereleases=True):
                print(f"warning: keeping {req.name} {version(req.name)} (jaxsft pins {req.specifier})",
                      file=sys.stderr)
        elif not satisfied(req):
            print(req)


def pin(name: str) -> None:
    """Needs no `packaging`: a plain interpreter runs it before any venv exists."""
    print(next(m[1] for d in dependencies() if (m := re.fullmatch(rf"{re.escape(name)}\s*==\s*([\w.]+)", d))))


if __name__ == "__main__":
    if sys.argv[1:2] == ["plan"] and len(sys.argv) == 3:
        plan(sys.argv[2])
    elif sys.argv[1:2] == ["pin"] and len(sys.argv) == 3:
        pin(sys.argv[2])
    else:
        sys.exit(__doc__)
