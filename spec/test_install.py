"""Installing: `cmake --install` into a prefix, a program built against it with pkg-config
(shared and static), and the Debian package of `./dev package` (its control data, its files,
and server5 served by the mphost it carries)."""
import os
import re
import shutil
import subprocess

from harness import ROOT, Server, check, embed_serves, eq, tmpdir

BUILD = os.environ.get("MPH_BUILD", os.path.join(ROOT, "build"))


def sanitized():
    """Whether the build under test is the ASan+UBSan one: what links its library must then
    be built with the sanitizers too."""
    with open(os.path.join(BUILD, "CMakeCache.txt")) as f:
        return re.search(r"^MPH_SANITIZE:BOOL=ON$", f.read(), re.M) is not None


def sh(cmd, env=None, timeout=300):
    """Runs a command (a list); fails the test with its output unless it exits 0."""
    full = dict(os.environ)
    full.update(env or {})
    p = subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=timeout)
    check(p.returncode == 0, "%s exited %d:\n%s%s" % (" ".join(cmd), p.returncode,
                                                      p.stdout[-3000:], p.stderr[-3000:]))
    return p.stdout


def test_install_prefix_and_pkg_config():
    """cmake --install into a temporary prefix puts the program, both libraries (the shared
    one with its soname), the header and mphost.pc; examples/embed.c, as installed, builds
    against them with `pkg-config --cflags --libs mphost` and serves a call; so does a static
    link (`pkg-config --static`: Requires.private and Libs.private)."""
    prefix = tmpdir("mph-prefix-")
    sh(["cmake", "--install", BUILD, "--prefix", prefix])
    libdir = os.path.join(prefix, "lib")
    for f in ("bin/mphost", "include/mphost.h", "lib/libmphost.a", "lib/libmphost.so",
              "lib/pkgconfig/mphost.pc", "share/doc/mphost/examples/embed.c"):
        check(os.path.exists(os.path.join(prefix, f)), "installed: " + f)
    real = os.path.realpath(os.path.join(libdir, "libmphost.so"))
    eq(os.path.basename(real), "libmphost.so.1.0.0", "the shared library's file")
    soname = sh(["objdump", "-p", real])
    check(re.search(r"SONAME\s+libmphost\.so\.1\n", soname), "soname libmphost.so.1")
    exported = sh(["nm", "-D", "--defined-only", real])
    names = re.findall(r" T (\w+)", exported)
    check(names and all(n.startswith("mph_host_") for n in names),
          "only mph_host_* is exported: %r" % names)
    # The public header stands alone: no private header, no libuv or Lua header needed.
    sh(["sh", "-c", "echo '#include <mphost.h>' | cc -std=c11 -Wall -Werror -fsyntax-only "
        "-I%s -x c -" % os.path.join(prefix, "include")])

    env = {"PKG_CONFIG_PATH": os.path.join(libdir, "pkgconfig")}
    eq(sh(["pkg-config", "--modversion", "mphost"], env).strip(), "1.0.0", "version")
    cflags = sh(["pkg-config", "--cflags", "mphost"], env).split()
    libs = sh(["pkg-config", "--libs", "mphost"], env).split()
    static_libs = sh(["pkg-config", "--static", "--libs", "mphost"], env).split()
    san = ["-fsanitize=address,undefined"] if sanitized() else []
    src = os.path.join(prefix, "share/doc/mphost/examples/embed.c")
    shared_bin = os.path.join(prefix, "embed-shared")
    sh(["cc"] + san + cflags + [src, "-o", shared_bin] + libs)
    static_bin = os.path.join(prefix, "embed-static")
    # libmphost.a rather than the .so next to it; the libraries it needs, from Libs.private
    # and Requires.private, as the system's shared ones.
    sh(["cc"] + san + cflags + [src, "-o", static_bin, "-Wl,-Bstatic", "-lmphost",
                                "-Wl,-Bdynamic"] + [f for f in static_libs if f != "-lmphost"])

    run_env = dict(os.environ, LD_LIBRARY_PATH=libdir)
    linked = sh(["ldd", shared_bin], {"LD_LIBRARY_PATH": libdir})
    check("libmphost.so.1 => %s/libmphost.so.1 " % libdir in linked, linked)
    check("libmphost" not in sh(["ldd", static_bin]), "the static build needs no libmphost.so")
    embed_serves(shared_bin, run_env)
    embed_serves(static_bin, dict(os.environ))
    # A program on its own libuv loop (examples/embed_loop.c) adds libuv's flags to ours.
    loop_bin = os.path.join(prefix, "embed-loop")
    src = os.path.join(prefix, "share/doc/mphost/examples/embed_loop.c")
    uv = sh(["pkg-config", "--cflags", "--libs", "mphost", "libuv"], env).split()
    sh(["cc"] + san + [src, "-o", loop_bin] + uv)
    out = sh([loop_bin, tmpdir("mph-data-"), "20"], run_env)
    check("final count 40 (exact)" in out and "uv_loop_close: 0" in out, out)
    shutil.rmtree(prefix, ignore_errors=True)


def test_debian_package():
    """`./dev package BUILD` makes a .deb whose Depends names the libraries the binaries link
    (dpkg-shlibdeps), with the files under /usr; extracted, its mphost serves server5."""
    out = sh([os.path.join(ROOT, "dev"), "package", BUILD])
    debs = [l for l in out.splitlines() if l.endswith(".deb")]
    eq(len(debs), 1, "one package: %s" % out)
    deb = debs[0] if os.path.isabs(debs[0]) else os.path.join(ROOT, debs[0])
    check(re.search(r"/mphost_1\.0\.0_amd64\.deb$", deb), deb)
    info = sh(["dpkg-deb", "-f", deb, "Package", "Version", "Depends"])
    check("Package: mphost\n" in info and "Version: 1.0.0\n" in info, info)
    for lib in ("libuv1", "libjansson4", "libhiredis0.14", "libhttp-parser2.9", "libluajit2-5.1-2",
                "libcrypt1", "libsystemd0", "zlib1g", "libc6"):
        check(re.search(r"\b%s\b" % re.escape(lib), info), "Depends lists %s: %s" % (lib, info))
    files = sh(["dpkg-deb", "-c", deb])
    for f in ("./usr/bin/mphost", "./usr/include/mphost.h", "./usr/lib/libmphost.a",
              "./usr/lib/libmphost.so.1.0.0", "./usr/lib/libmphost.so.1 -> libmphost.so.1.0.0",
              "./usr/lib/pkgconfig/mphost.pc", "./usr/share/doc/mphost/examples/server5.lua"):
        check(f in files, "the package holds %s:\n%s" % (f, files))
    root = tmpdir("mph-deb-")
    sh(["dpkg-deb", "-x", deb, root])
    with Server("server5.lua", binary=os.path.join(root, "usr/bin/mphost")) as s:
        eq(s.result("simple-storage", [{}]), {"requests": 1}, "first call")
        eq(s.result("simple-storage", [{}]), {"requests": 2}, "second call")
    shutil.rmtree(root, ignore_errors=True)
