/*
 * accesslog.h: the access log (--access-log): one line per HTTP request, appended to a file
 * (or stderr) by a writer thread, so that the loop never waits on the disk. Lines wait in a
 * bounded buffer; when the disk falls behind, lines that do not fit are dropped and counted
 * (the count goes to the server log), rather than block the loop or grow without bound.
 * The file is opened O_APPEND and each write(2) carries whole lines only, so several
 * processes (workers) appending to the same file never interleave within a line.
 */
#ifndef MPH_ACCESSLOG_H
#define MPH_ACCESSLOG_H

#include <stddef.h>

typedef struct mph_accesslog_s mph_accesslog_t;

/* The most bytes of lines waiting for the writer; more are dropped. */
#define MPH_ACCESSLOG_MAX_PENDING ((size_t)4 << 20)

/* Opens path for appending ("-": stderr) and starts the writer thread. 0, or MPH_EIO with a
 * message in err. path is copied. */
int mph_accesslog_open(mph_accesslog_t **out, const char *path, char *err, size_t errlen);

/* Queues one line (len bytes, ending in '\n'); never waits on the disk. From one thread
 * (the loop's). */
void mph_accesslog_append(mph_accesslog_t *a, const char *line, size_t len);

/* Asks the writer to open the path again (a rotation renamed the file: SIGUSR1). Lines
 * queued before go to the old file or the new one, none is lost. No-op for stderr. */
void mph_accesslog_reopen(mph_accesslog_t *a);

/* Writes what is queued, stops the thread, closes the file and frees a. NULL is fine. */
void mph_accesslog_close(mph_accesslog_t *a);

#endif
