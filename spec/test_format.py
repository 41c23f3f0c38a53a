"""The C sources follow the checked-in .clang-format (STYLE.md, section 6)."""
import glob
import os
import re
import shutil
import subprocess

from harness import ROOT, TestFailure, check

SOURCES = ("common/*.[ch]", "storage/*.[ch]", "lua/*.[ch]", "host/server/*.[ch]",
           "host/cli/*.[ch]", "examples/*.c", "spec/unit/*.[ch]", "spec/fuzz/*.c")


def test_clang_format_clean():
    tool = shutil.which("clang-format")
    if tool is None:
        raise TestFailure("clang-format is not installed (./dev deps installs it)")
    files = []
    for pattern in SOURCES:
        files += glob.glob(os.path.join(ROOT, pattern))
    p = subprocess.run([tool, "--dry-run", "--Werror"] + files, capture_output=True, text=True)
    if p.returncode != 0:
        raise TestFailure("run ./dev format:\n" + p.stderr[:3000])


# The layers, lowest first (docs/design.md): a file includes headers of its own folder and of
# lower layers only, by their path from the root ("common/common.h"); and a folder's private
# headers are included from that folder alone.
LAYERS = ["common", "storage", "lua", "host/server", "host/cli"]
PRIVATE = {"lua/internal.h", "lua/watchdog.h", "storage/redis_route.h"}


def test_includes_point_down_the_layers_only():
    bad = []
    for rank, folder in enumerate(LAYERS):
        for path in glob.glob(os.path.join(ROOT, folder, "*.[ch]")):
            for line in open(path):
                m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
                if not m:
                    continue
                inc = m.group(1)
                target = inc if "/" in inc else os.path.join(folder, inc)
                where = os.path.dirname(target)
                name = os.path.relpath(path, ROOT)
                if where in LAYERS and LAYERS.index(where) > rank:
                    bad.append("%s includes %s: up a layer" % (name, inc))
                elif where in LAYERS and where != folder and target in PRIVATE:
                    bad.append("%s includes %s: another folder's private header" % (name, inc))
                elif where not in LAYERS and not inc.endswith("_lua.h"):
                    bad.append("%s includes %s: no such layer" % (name, inc))
    check(not bad, "\n".join(bad))
    # The public header needs nothing of ours (and no libuv, no Lua).
    public = open(os.path.join(ROOT, "host", "server", "mphost.h")).read()
    check(not re.search(r'#\s*include\s+"', public), "mphost.h includes a header of ours")
