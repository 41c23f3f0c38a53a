"""The C sources follow the checked-in .clang-format (STYLE.md, section 6)."""
import glob
import os
import shutil
import subprocess

from harness import ROOT, TestFailure


def test_clang_format_clean():
    tool = shutil.which("clang-format")
    if tool is None:
        raise TestFailure("clang-format is not installed (./dev deps installs it)")
    files = []
    for pattern in ("host/*.[ch]", "lua/*.[ch]", "storage/*.[ch]", "examples/*.c",
                    "spec/unit/*.[ch]", "spec/fuzz/*.c"):
        files += glob.glob(os.path.join(ROOT, pattern))
    p = subprocess.run([tool, "--dry-run", "--Werror"] + files, capture_output=True, text=True)
    if p.returncode != 0:
        raise TestFailure("run ./dev format:\n" + p.stderr[:3000])
