/*
 * linebuf.h: lines read from a stream into a fixed buffer, for the one-line-at-a-time
 * exchanges between our own processes: a worker's report socket (host/cli/supervisor.c) and
 * the control socket (host/cli/control.c). It reads nothing itself and knows nothing of
 * libuv: the caller reads into mph_linebuf_room (from libuv's alloc callback, or read(2)),
 * says how much came with mph_linebuf_added, then takes each whole line with
 * mph_linebuf_take.
 *
 *   static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
 *   {
 *       size_t room;
 *       char *at = mph_linebuf_room(&x->lines, &room);
 *       *buf = uv_buf_init(at, (unsigned)room);
 *   }
 *   (in the read callback, nread > 0)
 *       mph_linebuf_added(&x->lines, (size_t)nread);
 *       while ((line = mph_linebuf_take(&x->lines)) != NULL)
 *           ...
 *
 * Limits: a buffer of `size` bytes holds at most size - 1 bytes of lines not taken yet (a
 * NUL follows them). When that much has come without a newline the line is too long:
 * mph_linebuf_full says so, and the room is 0 (libuv then calls the read callback with
 * UV_ENOBUFS). A NUL byte ends what is searched for a newline: a line that carries one never
 * completes (it can only fill the buffer).
 */
#ifndef MPH_LINEBUF_H
#define MPH_LINEBUF_H

#include <stddef.h>

typedef struct {
    char *data;   /* borrowed: size bytes; NUL-terminated after len */
    size_t size;  /* bytes of data */
    size_t len;   /* bytes read and not dropped */
    size_t taken; /* bytes at the front already taken (the last line and its newline),
                     dropped at the next call */
} mph_linebuf_t;

/* Starts lb empty on data (borrowed, size >= 2 bytes). Also empties it again. */
void mph_linebuf_init(mph_linebuf_t *lb, char *data, size_t size);

/* Where the next bytes read go: returns the place, *room the bytes that fit there (0 when
 * the buffer is full). Invalidates a line taken before. */
char *mph_linebuf_room(mph_linebuf_t *lb, size_t *room);

/* n bytes (at most the room) were read into the room. */
void mph_linebuf_added(mph_linebuf_t *lb, size_t n);

/* Takes the first whole line: returns it without its newline, NUL-terminated (in lb's
 * buffer: valid until the next call on lb), or NULL when no whole line is there yet. */
char *mph_linebuf_take(mph_linebuf_t *lb);

/* Whether the buffer is full without a whole line in it: the line is too long. */
int mph_linebuf_full(const mph_linebuf_t *lb);

#endif
