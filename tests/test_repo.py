"""The repository stands alone: no absolute path of the machine it was written on, and every file that
the code, --help texts and documentation name exists in a fresh clone."""

import re
import subprocess

from conftest import ROOT

MACHINE_PATH = re.compile(r"(?<![\w.])/(work|home|tmp|Users|root|mnt|scratch)/[\w.-]+")
# A repository file named in text: a path with a folder, or a top-level .md / .py / .sh file.
NAMED = re.compile(r"(?<![\w./-])((?:common|docs|tests|bench|\.ci)/[\w./-]*\w|[A-Z][A-Z_]+\.md|\w+\.sh|(?:caption|masksyn|imgsyn|train_\w+)\.py)\b")


def repo_files() -> list[str]:
    """What a clone holds: tracked files, and new ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [f for f in out if (ROOT / f).is_file()]


def tracked() -> list[str]:
    """The files whose text is checked (not the sample data)."""
    return [f for f in repo_files() if not f.startswith("tests/data/")]


def text_of(name: str) -> str | None:
    try:
        return (ROOT / name).read_text()
    except UnicodeDecodeError:
        return None


def test_no_absolute_machine_paths():
    found = [f"{name}: {m.group(0)}" for name in tracked() if name != "tests/test_repo.py"
             for m in MACHINE_PATH.finditer(text_of(name) or "")]
    assert not found, found


# Folders that commands write into (git-ignored in .gitignore), not repository files.
OUTPUTS = ("bench/out/", "runs/", "synth/", "captions/", "datasets/")


def test_every_named_repository_file_exists():
    files = set(repo_files())
    folders = {str(p) for f in files for p in __import__("pathlib").PurePosixPath(f).parents}
    missing = []
    for name in tracked():
        for m in NAMED.finditer(text_of(name) or ""):
            ref = m.group(1).rstrip(".")
            if "*" in ref or "{" in ref or ref in files or ref in folders or (ref + "/").startswith(OUTPUTS):
                continue
            if ref.endswith((".md", ".sh", ".py")) or "/" in ref:
                missing.append(f"{name}: {ref}")
    assert not missing, missing
