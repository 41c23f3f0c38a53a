#!/usr/bin/env python3
"""run.py: the test runner. Runs the C unit tests (build/unit_tests, TAP) and every
test_* function of spec/test_*.py against the real binary, then prints the summary line
`N passed, M failed` last.

    spec/run.py [-k SUBSTRING] [--build DIR]
"""
import argparse
import importlib
import os
import shutil
import subprocess
import tempfile
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# The suite's modules come from Debian's python3-* packages (./dev installs them); run by
# another python3 of the same version (a pyenv one first on PATH), it finds them there too.
if "/usr/lib/python3/dist-packages" not in sys.path:
    sys.path.append("/usr/lib/python3/dist-packages")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default="", help="run only tests whose name contains this")
    ap.add_argument("--build", default=os.path.join(os.path.dirname(HERE), "build"))
    args = ap.parse_args()
    os.environ["MPHOST"] = os.path.join(os.path.abspath(args.build), "mphost")
    os.environ["MPH_BUILD"] = os.path.abspath(args.build)
    scratch = tempfile.mkdtemp(prefix="mph-spec-")
    os.chmod(scratch, 0o755)  # servers run as nobody in one test
    os.environ["MPH_TMP"] = scratch
    try:
        return run_all(args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_unit(path):
    """Runs one TAP unit-test program; returns (passed, [failure lines]). A failing test is
    printed with what the program wrote on stderr while it ran (its CHECK lines)."""
    p = subprocess.run([path], capture_output=True, text=True)
    passed, failures = 0, []
    # stderr carries "# name" before each test, then that test's CHECK messages.
    notes, current = {}, None
    for line in p.stderr.splitlines():
        if line.startswith("# "):
            current = line[2:]
        elif current is not None:
            notes.setdefault(current, []).append(line)
    for line in p.stdout.splitlines():
        if line.startswith("ok "):
            passed += 1
            print(line)
        elif line.startswith("not ok "):
            failures.append(line)
            name = line.rsplit(".", 1)[-1]
            print(line)
            print("\n".join(notes.get(name, [])))
    if p.returncode != 0 and not failures:
        failures.append("%s exited %d" % (os.path.basename(path), p.returncode))
        print("not ok - %s exited %d:\n%s" % (os.path.basename(path), p.returncode,
                                               p.stderr[-4000:]))
    sys.stdout.flush()
    return passed, failures


def run_all(args):
    passed = failed = 0
    failures = []

    if not args.k or "unit" in args.k:
        for prog in sorted(os.listdir(args.build)):
            path = os.path.join(args.build, prog)
            if prog.startswith("unit_") and os.access(path, os.X_OK) and os.path.isfile(path):
                p, f = run_unit(path)
                passed += p
                failed += len(f)
                failures += f
    for fname in sorted(os.listdir(HERE)):
        if not (fname.startswith("test_") and fname.endswith(".py")):
            continue
        mod = importlib.import_module(fname[:-3])
        tests = [(n, f) for n, f in vars(mod).items() if n.startswith("test_") and callable(f)]
        tests.sort(key=lambda t: t[1].__code__.co_firstlineno)
        for name, fn in tests:
            full = "%s.%s" % (fname[:-3], name)
            if args.k and args.k not in full:
                continue
            t0 = time.time()
            try:
                fn()
                passed += 1
                print("ok - %s (%.2fs)" % (full, time.time() - t0))
            except Exception as e:  # a failing test is reported, the run goes on
                failed += 1
                detail = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:])
                failures.append("%s: %s" % (full, detail))
                print("not ok - %s (%.2fs)\n%s" % (full, time.time() - t0, detail))
            sys.stdout.flush()

    import harness  # (after the tests: they put spec/ on the path)
    left = harness.stop_leftover_servers()
    # A test that failed may leave one, and so may a -k run that skips a file's last test (the
    # one that stops its shared server); a whole run that passed may not.
    if left and not failures and not args.k:
        failed += 1
        failures.append("servers left running by the tests: %d (stopped now)" % left)
        print("not ok - servers left running by the tests: %d" % left)
    if failures:
        print("\nFailures:")
        for f in failures:
            print("  " + f.splitlines()[0])
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
