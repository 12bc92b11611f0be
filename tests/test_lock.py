"""requirements/lock.txt: what the project is tested with, and what every machine installs.

The README's commands, .ci/run, clusters/Dockerfile and every cluster config install through the
lock (tests/test_clusters.py checks the cluster files); these tests check the lock itself: it
satisfies pyproject.toml's ranges, it holds every package those need, and the environment the
tests run in is exactly the lock.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lockfile import LOCK, ROOT, pins, python_version

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared_requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]


def unsatisfied(requirements: list[Requirement], locked: dict[str, str]) -> list[str]:
    """Each requirement that the lock leaves out or pins outside its range."""
    problems = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name not in locked:
            problems.append(f"{requirement}: not in the lock")
        elif not requirement.specifier.contains(locked[name], prereleases=True):
            problems.append(f"{requirement}: the lock pins {locked[name]}")
    return problems


def closure(roots: list[Requirement]) -> dict[str, set[str]]:
    """Every installed distribution ``roots`` need here (markers and extras followed), with the
    extras asked of it, read from the installed metadata."""
    needed: dict[str, set[str]] = {}
    pending = [(requirement, frozenset({""})) for requirement in roots]
    while pending:
        requirement, extras = pending.pop()
        if requirement.marker is not None and not any(requirement.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(requirement.name)
        new = set(requirement.extras) - needed.get(name, set()) if name in needed else set(requirement.extras)
        if name in needed and not new:
            continue
        needed.setdefault(name, set()).update(requirement.extras)
        for text in metadata.requires(name) or []:
            pending.append((Requirement(text), frozenset({"", *needed[name]})))
    return needed


def test_the_lock_pins_what_pyproject_asks_within_its_ranges():
    assert not unsatisfied(declared_requirements(), pins())


def test_a_lock_outside_a_range_is_caught():
    locked = pins()
    assert unsatisfied(declared_requirements(), {**locked, "torch": "2.15.0"}) == ["torch<=2.14.1,>=2.9: the lock pins 2.15.0"]
    assert unsatisfied(declared_requirements(), {k: v for k, v in locked.items() if k != "mlflow"}) == \
        ["mlflow>=3.0: not in the lock"]


def test_the_tests_run_on_exactly_the_locked_versions():
    """Every distribution hilbert[test] needs here is installed at the lock's version, so the
    lock is what was tested (install with `pip install -c requirements/lock.txt -e '.[test]'`)."""
    locked = pins()
    needed = closure(declared_requirements())
    assert "torch" in needed and "ray" in needed and len(needed) > 100
    drift = {name: (metadata.version(name), locked.get(name, "not in the lock")) for name in sorted(needed)
             if locked.get(name) != metadata.version(name)}
    assert not drift, f"installed vs locked: {drift}; reinstall with pip install -c {LOCK.relative_to(ROOT)} -e '.[test]'"


def test_the_lock_is_complete_every_locked_package_has_what_it_requires():
    locked = pins()
    for name in closure(declared_requirements()):
        requires = [Requirement(text) for text in metadata.requires(name) or []]
        here = [r for r in requires if r.marker is None or r.marker.evaluate({"extra": ""})]
        assert not unsatisfied(here, locked), name


def test_the_lock_is_for_this_python():
    assert python_version() == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_ci_installs_through_the_lock():
    assert "pip install --quiet -c requirements/lock.txt -e '.[test]'" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_commands_install_through_the_lock():
    readme = (ROOT / "README.md").read_text()
    installs = [line for line in readme.splitlines() if "pip install" in line and line.startswith("python3 -m venv")]
    assert len(installs) >= 2, installs
    assert all("-c requirements/lock.txt" in line for line in installs), installs
