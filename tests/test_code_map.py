"""README's Code map names every module a change could go to: a module added without a row is one a new
contributor cannot find."""

from __future__ import annotations

from tests.conftest import ROOT


def unnamed_modules(code_map: str) -> list[str]:
    """The package's modules that the Code map names neither by file name (`split.py`, `tunesmith/run.py`) nor,
    inside a package's own sub-package, by its folder (`tunesmith/train/fast/`); an `__init__.py` goes with its
    folder."""
    missing = []
    for path in sorted((ROOT / "tunesmith").rglob("*.py")):
        relative = path.relative_to(ROOT)
        folders = [parent.as_posix() + "/" for parent in relative.parents if len(parent.parts) > 2]
        named = f"`{path.name}`" in code_map or f"`{relative.as_posix()}`" in code_map or any(
            f"`{folder}`" in code_map for folder in folders)
        if not named and path.name != "__init__.py":
            missing.append(relative.as_posix())
    return missing


def test_the_code_map_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code_map = readme.split("## Code map", 1)[1].split("\n## ", 1)[0]
    assert unnamed_modules(code_map) == []
    # The check finds a module whose row is gone.
    assert unnamed_modules(code_map.replace("`digest.py`", "")) == ["tunesmith/digest.py"]
