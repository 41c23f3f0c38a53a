/*
 * txn.c: the one place a transaction changes state (internal.h draws the states and their
 * edges). Every change goes through mph__txn_become, which checks the edge against the table
 * below and the new state's invariants (assert_txn_state); code elsewhere says which state
 * comes next, never writes t->state itself.
 */
#include "internal.h"

/* The states each state may become: bit s of edges[from] is set when `from -> s` is drawn in
 * internal.h. RUNNING -> RUNNING is a new attempt of a running call (its last one was void)
 * or the first resume of a fresh attempt. */
#define BIT(s) (1u << (s))
static const unsigned edges[] = {
    [TXN_RUNNING] = BIT(TXN_RUNNING) | BIT(TXN_WAITING) | BIT(TXN_FORWARDING) | BIT(TXN_RELOAD) |
                    BIT(TXN_QUEUED),
    [TXN_WAITING] = BIT(TXN_RUNNING),
    [TXN_FORWARDING] = BIT(TXN_RUNNING),
    [TXN_RELOAD] = BIT(TXN_RUNNING),
    [TXN_QUEUED] = BIT(TXN_COMMITTING) | BIT(TXN_RETRY),
    [TXN_COMMITTING] = BIT(TXN_RETRY),
    [TXN_RETRY] = BIT(TXN_RUNNING),
};

int mph__txn_may_become(mph_txn_state_t from, mph_txn_state_t to)
{
    if ((unsigned)from >= sizeof(edges) / sizeof(edges[0]) || (unsigned)to >= 32)
        return 0;
    return (edges[from] & BIT(to)) != 0;
}

void mph__txn_become(mph_txn_t *t, mph_txn_state_t to)
{
    assert(mph__txn_may_become(t->state, to));
    t->state = to;
}
