/*
 * scratch.h: scratch directories for the C unit tests that need a data directory. The
 * including file defines _GNU_SOURCE (nftw, mkdtemp) before its first include.
 */
#ifndef MPH_SPEC_UNIT_SCRATCH_H
#define MPH_SPEC_UNIT_SCRATCH_H

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int scratch_remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

/* A new empty directory named NAME-XXXXXX under MPH_TMP (spec/run.py's scratch) or /tmp.
 * New string; scratch_remove frees it. Aborts if none can be made: no test can go on. */
static char *scratch_dir(const char *name)
{
    const char *base = getenv("MPH_TMP");
    if (base == NULL || *base == '\0')
        base = "/tmp";
    size_t size = strlen(base) + strlen(name) + 9;
    char *dir = malloc(size);
    if (dir == NULL)
        abort();
    snprintf(dir, size, "%s/%s-XXXXXX", base, name);
    if (mkdtemp(dir) == NULL)
        abort();
    return dir;
}

/* Removes dir and everything in it (a test may have narrowed its mode), then frees dir. */
static void scratch_remove(char *dir)
{
    chmod(dir, 0700);
    nftw(dir, scratch_remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
}

#endif
