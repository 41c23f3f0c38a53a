/*
 * unit.h: the few lines every C unit-test program shares. Each program in spec/unit/ includes
 * the .c files it tests (to reach their statics, as h2o's t/00unit does), defines its tests
 * as `static void test_x(void)` functions using CHECK, lists them in a `tests[]` array and
 * ends with MPH_UNIT_MAIN(tests). Output is TAP, one line per test; a failed CHECK prints its
 * file, line and expression on stderr, which spec/run.py shows next to the failing test.
 */
#ifndef MPH_SPEC_UNIT_H
#define MPH_SPEC_UNIT_H

#include <stdio.h>
#include <string.h>

static int failures_in_test; /* CHECKs failed in the running test */

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);             \
            failures_in_test++;                                                                    \
        }                                                                                          \
    } while (0)

typedef struct {
    const char *name;
    void (*fn)(void);
} mph_unit_test_t;

/* Runs every test of `list` (a static array) and prints TAP named `unit.<program>.<test>`. */
#define MPH_UNIT_MAIN(list)                                                                        \
    int main(int argc, char **argv)                                                                \
    {                                                                                              \
        (void)argc;                                                                                \
        const char *prog = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];            \
        size_t n = sizeof(list) / sizeof(list[0]);                                                 \
        int failed = 0;                                                                            \
        printf("1..%zu\n", n);                                                                     \
        for (size_t i = 0; i < n; i++) {                                                           \
            failures_in_test = 0;                                                                  \
            fprintf(stderr, "# %s\n", list[i].name);                                               \
            list[i].fn();                                                                          \
            printf("%s %zu - %s.%s\n", failures_in_test ? "not ok" : "ok", i + 1, prog,            \
                   list[i].name);                                                                  \
            fflush(stdout);                                                                        \
            failed += failures_in_test != 0;                                                       \
        }                                                                                          \
        return failed ? 1 : 0;                                                                     \
    }

#endif
