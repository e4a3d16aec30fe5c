#!/usr/bin/env python3
"""Build the collection tarball from the files git tracks (as they are in the work
tree), so that nothing untracked (notes, lab output, editor files) is packed; galaxy.yml's
build_ignore then leaves out what users do not need (tests, bench, tools).

    tools/build_collection.py OUTPUT_DIR   (prints the tarball's path)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    listing = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listing.split("\0") if name and (ROOT / name).is_file()]


def build(output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    galaxy = Path(sys.executable).parent / "ansible-galaxy"
    with tempfile.TemporaryDirectory(prefix="keyway-build-") as tmp:
        src = Path(tmp) / "ipsec"
        for name in tracked_files():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
        done = subprocess.run(
            [str(galaxy), "collection", "build", "--force", "--output-path", str(output), str(src)],
            capture_output=True,
            text=True,
            cwd=tmp,
        )
        if done.returncode:
            sys.exit(f"ansible-galaxy collection build failed:\n{done.stdout}{done.stderr}")
    (tarball,) = output.glob("keyway-ipsec-*.tar.gz")
    return tarball


if __name__ == "__main__":
    print(build(Path(sys.argv[1]).resolve()))
