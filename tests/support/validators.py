"""Validators that are not ours, run on what the node writes: dicom3tools' ``dciodvfy``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def check_with_dciodvfy(path: Path, iod: str = "Segmentation") -> list[str]:
    """Run ``dciodvfy`` on ``path`` and check it verified the file as ``iod`` without error.

    The check fails unless the tool is installed, names the IOD it verified against (so it
    read the file), prints no ``Error`` line and exits with status 0 (it exits 1 on errors).

    Returns
    -------
    list of str
        Its ``Warning`` lines (advisories, not faults).

    Raises
    ------
    AssertionError
        Any of the above does not hold; the message holds the tool's whole output.
    """
    binary = shutil.which("dciodvfy")
    assert binary is not None, "dciodvfy not found: `make peers` installs dicom3tools"
    result = subprocess.run(
        [binary, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    # It writes the IOD's name and its findings to stderr, and may interleave them with
    # stdout: look for the markers anywhere in a line.
    output = result.stdout + result.stderr
    lines = output.splitlines()
    assert any(line.strip() == iod for line in lines), (
        f"dciodvfy did not verify {path} as {iod} (exit {result.returncode}):\n{output}"
    )
    errors = [line for line in lines if "Error - " in line or "Abort - " in line]
    assert errors == [], output
    assert result.returncode == 0, f"dciodvfy exit status {result.returncode}:\n{output}"
    return [line for line in lines if line.startswith("Warning - ")]
