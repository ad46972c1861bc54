"""Nothing the project ships is swallowed by .gitignore: such a file passes locally and is missing from main."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("tests", "csrc", "elva", "elva_kernels", "benchmarks", "scripts", "configs")
# Build and run products that are rightly ignored.
GENERATED = ("__pycache__", ".egg-info", ".pytest_cache", ".benchmarks")

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def ignored_source_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "status", "--ignored", "--porcelain", "--untracked-files=all", "--", *SOURCE_FOLDERS],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    paths = [line[3:] for line in out.splitlines() if line.startswith("!! ")]
    return [p for p in paths if not any(part in p for part in GENERATED) and not p.endswith((".so", ".pyc"))]


def test_no_source_file_is_ignored():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = ignored_source_files(REPO)
    assert not ignored, f"ignored by .gitignore, so missing from a clone: {ignored[:10]}"


def test_the_check_sees_an_ignored_file(tmp_path):
    """The check itself, in a scratch repository: the unanchored rule that once hid tests/build/ is caught, the
    project's rule is not."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "tests" / "build").mkdir(parents=True)
    (tmp_path / "tests" / "build" / "test_native_build.py").write_text("")
    (tmp_path / ".gitignore").write_text("build/\n")
    assert ignored_source_files(tmp_path) == ["tests/build/test_native_build.py"]
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    assert ignored_source_files(tmp_path) == []
