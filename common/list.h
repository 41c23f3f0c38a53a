/*
 * list.h: the one intrusive doubly linked list, for every list of mphost (STYLE.md, section 3).
 *
 * Intrusive: the list allocates nothing. A struct that goes in a list embeds an mph_list_t
 * (its "node", one per list it can be in at the same time) and is found again from it with
 * mph_list_entry, as libuv's uv__queue and h2o's h2o_linklist_t do. A list is a head, an
 * mph_list_t of its own that is no element; the nodes and the head form a ring, so inserting
 * and removing never tests for an end and never needs the head.
 *
 *     mph_list_t waiting;                  (the head, in its owner; mph_list_init first)
 *     typedef struct {
 *         mph_list_t node;                 (in owner->waiting; first, see below)
 *         ...
 *     } job_t;
 *     mph_list_insert_tail(&owner->waiting, &j->node);
 *     job_t *first = mph_list_entry(mph_list_first(&owner->waiting), job_t, node);
 *
 * Ownership: a list owns nothing. Linking a node does not hand its struct over, removing it
 * frees nothing, and the owner of each struct stays whoever it was (the comment on the head
 * says who that is); freeing a struct that is still linked leaves the list pointing at freed
 * memory, so remove it first. A node is in at most one list at a time.
 *
 * Where the node goes: first in its struct, when a list is what holds the struct (the one
 * pointer to it that outlives a call). The list then points at the struct's start, which
 * valgrind's leak check calls reachable; a pointer into a block's middle leaves it "possibly
 * lost", and a process that ends without freeing what it holds (os.exit in a handler) would
 * be reported for it. A struct in two lists puts first the node of the one that holds it.
 *
 * States of a node: unlinked (both pointers NULL: what mph_xcalloc and mph_list_remove
 * leave, so a zeroed struct needs no init) or linked. A head must be initialised
 * (mph_list_init or MPH_LIST_INIT) before any use, and is empty then; a zeroed head is not
 * a list. Nothing here allocates, fails or calls back.
 *
 * Iteration: mph_list_foreach visits the nodes from first to last and must not remove the
 * one it stands on; mph_list_foreach_safe may remove (or free) that one, but no other: it
 * has read the next node before the body runs. To empty a list while each element may
 * change it, take the elements one at a time with mph_list_pop.
 */
#ifndef MPH_LIST_H
#define MPH_LIST_H

#include <stddef.h>

#include "common/common.h"

typedef struct mph_list_s {
    struct mph_list_s *next; /* a head: its first node (itself when empty); a node: the one
                                after it (the head after the last); NULL when unlinked */
    struct mph_list_s *prev; /* the other way round */
} mph_list_t;

/* A head initialised in its declaration: static mph_list_t all = MPH_LIST_INIT(all); */
#define MPH_LIST_INIT(head)                                                                        \
    {                                                                                              \
        &(head), &(head)                                                                           \
    }

/* The struct of type `type` whose member `field` is node. */
#define mph_list_entry(node, type, field) mph_container_of(node, type, field)

/* for (each node n of head, first to last): the body must not remove n. */
#define mph_list_foreach(n, head) for ((n) = (head)->next; (n) != (head); (n) = (n)->next)

/* The same, where the body may remove or free n (only n): tmp holds the next node. */
#define mph_list_foreach_safe(n, tmp, head)                                                        \
    for ((n) = (head)->next; (n) != (head) && ((tmp) = (n)->next, 1); (n) = (tmp))

/* Makes head an empty list. */
static inline void mph_list_init(mph_list_t *head)
{
    head->next = head->prev = head;
}

static inline int mph_list_empty(const mph_list_t *head)
{
    return head->next == head;
}

/* Whether node is in a list (nodes only: a head is always "linked" to itself). */
static inline int mph_list_is_linked(const mph_list_t *node)
{
    return node->next != NULL;
}

/* Links node (unlinked) after `at`, a head or a linked node. */
static inline void mph_list_insert_after(mph_list_t *at, mph_list_t *node)
{
    node->prev = at;
    node->next = at->next;
    at->next->prev = node;
    at->next = node;
}

/* Links node (unlinked) first in head. */
static inline void mph_list_insert_head(mph_list_t *head, mph_list_t *node)
{
    mph_list_insert_after(head, node);
}

/* Links node (unlinked) last in head. */
static inline void mph_list_insert_tail(mph_list_t *head, mph_list_t *node)
{
    mph_list_insert_after(head->prev, node);
}

/* Unlinks node from its list (it must be linked) and leaves it unlinked. */
static inline void mph_list_remove(mph_list_t *node)
{
    node->prev->next = node->next;
    node->next->prev = node->prev;
    node->next = node->prev = NULL;
}

/* The first node of head, or NULL when it is empty. */
static inline mph_list_t *mph_list_first(const mph_list_t *head)
{
    return head->next == head ? NULL : head->next;
}

/* The last node of head, or NULL when it is empty. */
static inline mph_list_t *mph_list_last(const mph_list_t *head)
{
    return head->prev == head ? NULL : head->prev;
}

/* The node after node in head, or NULL when node is the last. */
static inline mph_list_t *mph_list_next(const mph_list_t *head, const mph_list_t *node)
{
    return node->next == head ? NULL : node->next;
}

/* Unlinks and returns the first node of head, or NULL when it is empty. */
static inline mph_list_t *mph_list_pop(mph_list_t *head)
{
    mph_list_t *node = mph_list_first(head);
    if (node != NULL)
        mph_list_remove(node);
    return node;
}

/* Moves every node of from, in order, to the end of to; from is left empty. */
static inline void mph_list_move(mph_list_t *to, mph_list_t *from)
{
    if (mph_list_empty(from))
        return;
    from->next->prev = to->prev;
    to->prev->next = from->next;
    from->prev->next = to;
    to->prev = from->prev;
    mph_list_init(from);
}

#endif
