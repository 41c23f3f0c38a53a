/*
 * linebuf.c: lines read into a fixed buffer (linebuf.h). A line taken stays where it is (the
 * caller reads it there) until the next call, which first drops it by moving the rest down.
 */
#include "linebuf.h"

#include <assert.h>
#include <string.h>

void mph_linebuf_init(mph_linebuf_t *lb, char *data, size_t size)
{
    assert(size >= 2);
    lb->data = data;
    lb->size = size;
    lb->len = lb->taken = 0;
    data[0] = '\0';
}

/* Drops the line taken last, with its newline. */
static void drop_taken(mph_linebuf_t *lb)
{
    if (lb->taken == 0)
        return;
    memmove(lb->data, lb->data + lb->taken, lb->len - lb->taken + 1); /* and the NUL */
    lb->len -= lb->taken;
    lb->taken = 0;
}

char *mph_linebuf_room(mph_linebuf_t *lb, size_t *room)
{
    drop_taken(lb);
    *room = lb->size - 1 - lb->len;
    return lb->data + lb->len;
}

void mph_linebuf_added(mph_linebuf_t *lb, size_t n)
{
    assert(lb->taken == 0 && n <= lb->size - 1 - lb->len); /* into mph_linebuf_room's room */
    lb->len += n;
    lb->data[lb->len] = '\0';
}

char *mph_linebuf_take(mph_linebuf_t *lb)
{
    drop_taken(lb);
    char *nl = strchr(lb->data, '\n');
    if (nl == NULL)
        return NULL;
    *nl = '\0';
    lb->taken = (size_t)(nl + 1 - lb->data);
    return lb->data;
}

int mph_linebuf_full(const mph_linebuf_t *lb)
{
    return lb->len - lb->taken == lb->size - 1;
}
