/*
 * localsock.c: Unix sockets in a directory of our own (localsock.h says why).
 */
#define _GNU_SOURCE
#include "localsock.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/common.h"

/* Opens path (no symbolic link followed) and checks it is a directory of ours that nobody
 * else can enter. created: we just made it, so its mode is set rather than checked (mkdir's
 * mode went through the umask). Returns the descriptor, or a negative code. */
static int open_checked(const char *path, int created, char *err, size_t errlen)
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open the socket directory %s: %s", path,
                 errno == ELOOP || errno == ENOTDIR ? "it is not a directory (or is a link)"
                                                    : strerror(errno));
        return MPH_EIO;
    }
    if (fstat(fd, &st) != 0 || (created && fchmod(fd, 0700) != 0)) {
        snprintf(err, errlen, "cannot use the socket directory %s: %s", path, strerror(errno));
        goto fail;
    }
    if (st.st_uid != geteuid()) {
        snprintf(err, errlen,
                 "the socket directory %s belongs to uid %u, not to uid %u; refusing "
                 "to use it",
                 path, (unsigned)st.st_uid, (unsigned)geteuid());
        goto fail;
    }
    if (!created && (st.st_mode & 077)) {
        snprintf(err, errlen,
                 "the socket directory %s is open to other users (mode %03o); "
                 "refusing to use it",
                 path, (unsigned)(st.st_mode & 0777));
        goto fail;
    }
    return fd;
fail:
    close(fd);
    return MPH_EINVAL;
}

int mph_localsock_dir_open(const char *path, int create, char *err, size_t errlen)
{
    int created = create && mkdir(path, 0700) == 0;
    if (create && !created && errno != EEXIST) {
        snprintf(err, errlen, "cannot create the socket directory %s: %s", path, strerror(errno));
        return MPH_EIO;
    }
    return open_checked(path, created, err, errlen);
}

int mph_localsock_dir_temp(char **path, char *err, size_t errlen)
{
    const char *tmp = getenv("TMPDIR");
    char *p = mph_xmalloc(strlen(tmp && *tmp ? tmp : "/tmp") + 32);
    sprintf(p, "%s/mphost-sockets-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(p) == NULL) {
        snprintf(err, errlen, "cannot create a socket directory in %s: %s",
                 tmp && *tmp ? tmp : "/tmp", strerror(errno));
        free(p);
        return MPH_EIO;
    }
    int fd = open_checked(p, 1, err, errlen);
    if (fd < 0) {
        rmdir(p);
        free(p);
        return fd;
    }
    *path = p;
    return fd;
}

socklen_t mph_localsock_address(int dirfd, const char *name, struct sockaddr_un *sa)
{
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    int n = snprintf(sa->sun_path, sizeof(sa->sun_path), "/proc/self/fd/%d/%s", dirfd, name);
    if (n < 0 || (size_t)n >= sizeof(sa->sun_path))
        return 0;
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (size_t)n + 1);
}

int mph_localsock_listen(int dirfd, const char *name, int backlog)
{
    struct sockaddr_un sa;
    socklen_t len = mph_localsock_address(dirfd, name, &sa);
    if (len == 0)
        return -ENAMETOOLONG;
    /* A file at the name is one of ours (nobody else can write in the directory), left by a
     * process that ended without removing it: bind would refuse the name. */
    mph_localsock_unlink(dirfd, name);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    /* bind gives the socket file 0777 less the umask; every file of ours is 0600. Nobody
     * else can reach it meanwhile: the directory is ours and 0700. */
    if (bind(fd, (struct sockaddr *)&sa, len) != 0 || fchmodat(dirfd, name, 0600, 0) != 0 ||
        listen(fd, backlog) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int mph_localsock_connect(int dirfd, const char *name, int nonblock)
{
    struct sockaddr_un sa;
    socklen_t len = mph_localsock_address(dirfd, name, &sa);
    if (len == 0)
        return -ENAMETOOLONG;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0)
        return -errno;
    if (connect(fd, (struct sockaddr *)&sa, len) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int mph_localsock_peer_allowed(int fd, int root_ok, const char *what)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        mph_log(MPH_LOG_WARN, "%s: cannot read its credentials: %s", what, strerror(errno));
        return 0;
    }
    if (cred.uid == geteuid() || (root_ok && cred.uid == 0))
        return 1;
    static mph_log_limit_t limit; /* the loop's thread only */
    unsigned long held;
    if (mph_log_limit_pass(&limit, MPH_REFUSAL_LOG_MS, &held))
        mph_log(MPH_LOG_WARN,
                "%s: refused: pid %d runs as uid %u, not as ours (%lu more refused since the "
                "last such line)",
                what, (int)cred.pid, (unsigned)cred.uid, held);
    return 0;
}

void mph_localsock_unlink(int dirfd, const char *name)
{
    struct stat st;
    /* Only a socket: the directory holds nothing else of ours, but a mistake must not cost a
     * file. */
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISSOCK(st.st_mode))
        unlinkat(dirfd, name, 0);
}

void mph_localsock_dir_remove(int dirfd, const char *path)
{
    int fd = dup(dirfd); /* fdopendir takes its descriptor over */
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (d == NULL && fd >= 0)
        close(fd);
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            mph_localsock_unlink(dirfd, e->d_name);
    if (d)
        closedir(d);
    close(dirfd);
    rmdir(path); /* fails, harmlessly, if something else is in it */
}
