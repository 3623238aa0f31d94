"""What a run directory records about how it was made: git commit, versions, command line."""

import json
import os
import subprocess
import sys
from typing import Optional


def git_sha(cwd: Optional[str] = None) -> str:
    """HEAD (+ "-dirty" when tracked files changed), or $HYDRALM_COMMIT when set: a copied tree on a remote GPU
    machine can carry a stale .git (seen 2026-11-28: a run of c4ef886 recorded an older HEAD), so the sender
    names the commit. $HYDRALM_GIT_SHA, its earlier name, is still read. Run directories and the benchmark
    record (benchmarks/record.py) both take their commit from here."""
    for name in ("HYDRALM_COMMIT", "HYDRALM_GIT_SHA"):
        if os.environ.get(name):
            return os.environ[name]
    run = dict(cwd=cwd, capture_output=True, text=True, timeout=10)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_run_info(output_dir: str, source_dir: str) -> dict:
    import lightning
    import torch

    info = {
        "git_sha": git_sha(source_dir),
        "command": " ".join(sys.argv),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info
