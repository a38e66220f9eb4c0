"""jaxsft's requirements (pyproject.toml) against this interpreter, for launch/gpu_local.sh:

    python launch/requirements.py missing   # the requirements not installed, one per line; warns on stderr
                                            # for each installed one whose version jaxsft does not pin
    python launch/requirements.py pin NAME  # the version that jaxsft pins NAME to
"""

import importlib.metadata as metadata
import pathlib
import sys
import tomllib

from packaging.requirements import Requirement

PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements() -> list[Requirement]:
    return [Requirement(d) for d in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]


def installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def missing() -> None:
    for req in requirements():
        if not installed(req.name):
            print(req.name)
            continue
        extras = [Requirement(r) for r in metadata.requires(req.name) or ()]
        if any(r.marker and any(r.marker.evaluate({"extra": e}) for e in req.extras) and not installed(r.name)
               for r in extras):
            print(f"{req.name}[{','.join(sorted(req.extras))}]")
        version = metadata.version(req.name)
        if not req.specifier.contains(version, prereleases=True):
            print(f"warning: keeping {req.name} {version} (jaxsft asks {req.specifier})", file=sys.stderr)


def pin(name: str) -> None:
    req = next(r for r in requirements() if r.name == name)
    print(next(s.version for s in req.specifier if s.operator == "=="))


if __name__ == "__main__":
    if sys.argv[1:2] == ["missing"]:
        missing()
    elif sys.argv[1:2] == ["pin"] and len(sys.argv) == 3:
        pin(sys.argv[2])
    else:
        sys.exit(__doc__)
