"""Every module ships: a wheel (not only an editable install) must carry each subpackage."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_folder_of_modules_is_a_package():
    found = set(find_packages(str(ROOT), include=["ln_ray*"]))
    folders = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "ln_ray").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert folders <= found, folders - found
