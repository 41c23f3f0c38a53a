"""powerloss_fs.py: a FUSE file system that forgets, at a simulated power loss, whatever was
not made durable.

    /usr/bin/python3 spec/powerloss_fs.py BACKING MOUNTPOINT OUT

Run by spec/test_security_files.py (as root, with Debian's python3-fusepy and fuse3: the
system Python, which has fusepy, whatever python3 runs the suite). It prints "ready" once the
mount answers, serves until MOUNTPOINT is unmounted, then writes the durable view to OUT,
prints "materialized" and exits 0.

Why a file system and not a fault hook in mphost: the defect it is for (issue 19) is a sync
that mphost never makes (the parent of a data directory it created was never fsynced), and a
hook can only fail the syncs that are made. Only the layer under the program can tell what a
disk would still hold.

The model. Every operation passes through to BACKING, a plain directory: the live state, what
the running program sees. Beside it the layer keeps the durable view, under the strictest
reading of POSIX (what a journaling file system promises without heuristics such as ext4's
auto_da_alloc):
  - a file's contents are what they were at its last fsync or fdatasync (empty until then);
  - a directory's entries are what they were at its last fsync (fsync of a directory reaches
    FUSE as fsyncdir), each naming the node it named then: an entry created, renamed or
    removed since is not durable, whatever was synced inside the node it names;
  - whatever BACKING held at mount is durable.
So a new directory whose parent was never synced is lost with everything in it, however well
the files in it were synced; a rename is durable once the directories on both sides are.
Nodes have ids of our own, not inode numbers, which BACKING reuses once a file is gone: a
durable entry must keep naming the old file's durable contents, not a newcomer's.

"Power loss" is: kill -9 the program, unmount (the kernel drops its caches with the mount),
and OUT receives the durable view, walked from the root. The test then runs the program again
on OUT, with no FUSE in the way.

Single-threaded (nothreads): the model needs no lock, and a test's traffic is small. Each
fsync copies the whole file, which is fine for a test's files and nothing else.
"""
import os
import stat
import sys

from fusepy import FUSE, Operations


class Node:
    """A file, directory or symbolic link as the durable view knows it."""

    def __init__(self, kind, mode):
        self.kind = kind  # "f", "d" or "l"
        self.mode = mode  # permission bits when it was last made durable
        self.data = b""  # "f": contents at the last fsync; "l": the link's target
        self.entries = {}  # "d": name -> Node, as at the last fsyncdir


class PowerLossFS(Operations):
    def __init__(self, backing):
        self.backing = os.path.realpath(backing)
        self.by_ino = {}  # inode in BACKING -> Node, for the files that have a name there
        self.root = self.scan(self.backing)

    # -- the durable view --

    def full(self, path):
        return os.path.join(self.backing, path.lstrip("/"))

    def node(self, st):
        """The node of a live inode (a new one for an inode not seen yet)."""
        n = self.by_ino.get(st.st_ino)
        if n is None:
            kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
            n = self.by_ino[st.st_ino] = Node(kind, stat.S_IMODE(st.st_mode))
        return n

    def scan(self, path):
        """What BACKING holds at mount: all durable."""
        st = os.lstat(path)
        n = self.node(st)
        if n.kind == "d":
            for name in os.listdir(path):
                n.entries[name] = self.scan(os.path.join(path, name))
        elif n.kind == "l":
            n.data = os.readlink(path).encode()
        else:
            with open(path, "rb") as f:
                n.data = f.read()
        return n

    def forget_if_last(self, full):
        """Called before a name goes away: its inode, if this was its last name, may be
        reused by BACKING for a new file, which must get a node of its own."""
        try:
            st = os.lstat(full)
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1:
            self.by_ino.pop(st.st_ino, None)

    def materialize(self, out):
        os.makedirs(out, exist_ok=True)
        os.chmod(out, self.root.mode)
        self.write_entries(self.root, out)

    def write_entries(self, d, path):
        for name, n in d.entries.items():
            p = os.path.join(path, name)
            if n.kind == "d":
                os.mkdir(p, 0o700)
                self.write_entries(n, p)
                os.chmod(p, n.mode)
            elif n.kind == "l":
                os.symlink(n.data, p)
            else:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, n.data)
                os.fchmod(fd, n.mode)
                os.close(fd)

    # -- syncs: what makes the live state durable --

    def fsync(self, path, datasync, fh):
        st = os.fstat(fh)
        n = self.node(st)
        chunks, at = [], 0
        while True:
            chunk = os.pread(fh, 1 << 20, at)
            if not chunk:
                break
            chunks.append(chunk)
            at += len(chunk)
        n.data = b"".join(chunks)
        n.mode = stat.S_IMODE(st.st_mode)
        return 0

    def fsyncdir(self, path, datasync, fh):
        full = self.full(path)
        st = os.lstat(full)
        d = self.node(st)
        d.mode = stat.S_IMODE(st.st_mode)
        entries = {}
        for name in os.listdir(full):
            cst = os.lstat(os.path.join(full, name))
            c = self.node(cst)
            if c.kind == "l":
                c.data = os.readlink(os.path.join(full, name)).encode()
            entries[name] = c
        d.entries = entries
        return 0

    # -- everything else passes through --

    def init(self, path):
        print("ready", flush=True)

    def getattr(self, path, fh=None):
        # By name; by handle only for an open file that has none left (fusepy passes a NULL
        # pointer, not None, when there is no handle).
        st = os.lstat(self.full(path)) if path is not None else os.fstat(fh)
        return {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                                            "st_atime", "st_mtime", "st_ctime", "st_ino")}

    def access(self, path, amode):
        os.lstat(self.full(path))
        return 0

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self.full(path))

    def readlink(self, path):
        return os.readlink(self.full(path))

    def statfs(self, path):
        sv = os.statvfs(self.full(path))
        return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize",
                                            "f_favail", "f_ffree", "f_files", "f_flag",
                                            "f_frsize", "f_namemax")}

    def chmod(self, path, mode):
        os.chmod(self.full(path), stat.S_IMODE(mode))
        return 0

    def chown(self, path, uid, gid):
        os.lchown(self.full(path), uid, gid)
        return 0

    def utimens(self, path, times=None):
        os.utime(self.full(path), times, follow_symlinks=False)
        return 0

    def mkdir(self, path, mode):
        os.mkdir(self.full(path), mode)
        return 0

    def rmdir(self, path):
        self.forget_if_last(self.full(path))
        os.rmdir(self.full(path))
        return 0

    def unlink(self, path):
        self.forget_if_last(self.full(path))
        os.unlink(self.full(path))
        return 0

    def symlink(self, target, source):
        os.symlink(source, self.full(target))
        return 0

    def link(self, target, source):
        os.link(self.full(source), self.full(target))
        return 0

    def rename(self, old, new):
        self.forget_if_last(self.full(new))
        os.rename(self.full(old), self.full(new))
        return 0

    def create(self, path, mode, fi=None):
        # Read-write whatever the caller asked for: fsync reads the file through its fh.
        return os.open(self.full(path), os.O_RDWR | os.O_CREAT, stat.S_IMODE(mode))

    def open(self, path, flags):
        return os.open(self.full(path), os.O_RDWR)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self.full(path), length)
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    def opendir(self, path):
        return 0

    def releasedir(self, path, fh):
        return 0


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: powerloss_fs.py BACKING MOUNTPOINT OUT")
    backing, mountpoint, out = sys.argv[1:]
    fs = PowerLossFS(backing)
    # hard_remove: an unlinked file that is still open is not renamed to .fuse_hidden*, a
    # name that would then be listed (and made durable) by fsyncdir.
    FUSE(fs, mountpoint, foreground=True, nothreads=True, hard_remove=True,
         default_permissions=True)
    fs.materialize(out)
    print("materialized", flush=True)


if __name__ == "__main__":
    main()
