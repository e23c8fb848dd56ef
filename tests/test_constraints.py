"""constraints.txt pins one exact version of every dependency for this Python, and the set-up
installed exactly those: the README's numbers depend on them (the embedded corpus is built from
installed packages' docstrings)."""

from __future__ import annotations

from importlib import metadata

from helpers import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def pins_for_this_python() -> dict[str, str]:
    """{package: version} of the lines of constraints.txt whose markers hold here."""
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            (spec,) = req.specifier
            assert spec.operator == "==", line
            name = canonicalize_name(req.name)
            assert name not in pins, f"{name} pinned twice for this Python"
            pins[name] = spec.version
    return pins


def direct_dependencies() -> list[str]:
    return [canonicalize_name(Requirement(r).name) for r in metadata.requires("lit_prune")]


def test_every_direct_dependency_is_pinned_for_this_python():
    pins = pins_for_this_python()
    assert [name for name in direct_dependencies() if name not in pins] == []
    assert pins["torch"] == "2.13.0"  # the version the Makefile installs first


def test_the_installed_versions_are_the_pinned_ones():
    """Fails where the environment was installed without the constraints (`make setup` uses them)."""
    pins = pins_for_this_python()
    installed = {dist.metadata["Name"]: dist.version for dist in metadata.distributions()}
    installed = {canonicalize_name(name): Version(v).public for name, v in installed.items()}
    differ = {
        name: (installed[name], version)
        for name, version in pins.items()
        if name in installed and installed[name] != Version(version).public
    }
    assert differ == {}, (
        f"installed != pinned: {differ}; run `make setup` (or pip install -c constraints.txt)"
    )
    assert all(name in installed for name in direct_dependencies())
