"""requirements/lock.txt read as data: the exact versions every machine of the project installs."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def pins(text: str | None = None) -> dict[str, str]:
    """Canonical package name -> pinned version, for the lines whose marker holds here."""
    result: dict[str, str] = {}
    for line in (LOCK.read_text() if text is None else text).splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        (specifier,) = requirement.specifier  # the lock pins: exactly one `==`
        assert specifier.operator == "==", f"not a pin in the lock: {line}"
        result[canonicalize_name(requirement.name)] = specifier.version
    return result


def python_version(text: str | None = None) -> str:
    """The Python the lock was resolved for (``--python-version`` of requirements/refresh)."""
    header = LOCK.read_text() if text is None else text
    return re.search(r"--python-version (\d+\.\d+)", header).group(1)
