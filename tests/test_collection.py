"""Every test file under tests/ is collected by `pytest tests`: a folder that matches ``norecursedirs`` is skipped
silently (pytest's default list holds "build", which once hid tests/build from CI)."""
from fnmatch import fnmatch
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_folder_matches_norecursedirs(pytestconfig):
    patterns = pytestconfig.getini("norecursedirs")
    folders = {path.parent for path in TESTS.rglob("test_*.py")}
    hidden = sorted(
        str(folder.relative_to(TESTS)) for folder in folders
        if any(fnmatch(part, pattern) for part in folder.relative_to(TESTS).parts for pattern in patterns)
    )
    assert not hidden, f"pytest never enters {hidden}: they match norecursedirs {patterns}"
