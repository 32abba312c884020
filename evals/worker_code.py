"""Which worker code the suite drives: the checkout's own, or another commit's.

Scoring a commit other than the checkout's (`--worker-ref main`) is how a
change is measured before and after on the same day with the same suite: the
ref's files are exported (`git archive`, no worktree, nothing checked out)
into a temporary directory, and the worker process, and only it, imports the
project from there (`PYTHONPATH`). The suite itself stays the checkout's.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path


class WorkerCodeError(RuntimeError):
    pass


def _git(repo: Path, *args: str) -> bytes:
    try:
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        stderr = (getattr(exc, "stderr", b"") or b"").decode(errors="replace").strip()
        raise WorkerCodeError(f"git {' '.join(args)}: {stderr or exc}") from exc


def export_ref(repo: Path, ref: str, dest: Path) -> str:
    """The files of `ref` into `dest`; returns `ref (short commit)` for the report."""
    commit = _git(repo, "rev-parse", "--short", f"{ref}^{{commit}}").decode().strip()
    archive = _git(repo, "archive", "--format=tar", commit)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return f"{ref} at {commit}"
