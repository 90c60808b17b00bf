/* kd-reorder.c: what a pipeline's ordered stage emits, released in entry order
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * An ordered stage runs its items in parallel, but what they emit must leave
 * in the order the items entered the stage, per key. Each item takes a
 * ticket when it enters (kd_reorder_enter()), in a FIFO per key; the ticket
 * lives until the item ended and everything it emitted has been passed on.
 *
 *  - The ticket at the head of its key's FIFO passes what it emits straight
 *    on (kd_reorder_emit() calls the pass function), so the head never
 *    waits and the stage's downstream bound applies to it as to any stage.
 *  - Any other ticket buffers what it emits.
 *  - When the head's item ends (kd_reorder_leave()), the thread that ended
 *    it passes on what the following tickets buffered, ticket after ticket,
 *    for as long as they have ended too, and stops at the first one still
 *    running, after passing on what that one buffered so far. A ticket goes
 *    back only once everything it emitted has been passed on.
 *
 * A key's items start in ticket order. The ticket holds the item until a
 * job of the stage starts: the stage's jobs are only places in the
 * scheduler, and a job that starts runs the oldest item of its key not yet
 * claimed (kd_reorder_claim()), whatever ticket it was queued with. So when
 * an item runs, every item of its key that entered before it has started,
 * and the head of its key is running (or ended, and being flushed): an
 * item that waits in kd_reorder_emit() always waits for one that runs.
 *
 * Only one thread passes on a key's items at a time (@flushing), so they
 * leave in order; the others only buffer or mark their ticket ended, and
 * the flushing thread looks again before it stops. The pass function may
 * block (the next stage is full): no lock is held while it runs.
 *
 * Memory stays bounded: the tickets out and the items buffered count
 * together against @room (the stage's bound), and both
 * kd_reorder_enter() and a kd_reorder_emit() that must buffer block past it:
 * backpressure on whoever feeds the stage, and on an item that emits much
 * behind a slow head. Waiting for room cannot deadlock, whatever the number
 * of workers: room comes back as heads end and their followers are flushed,
 * heads always run (see above; the stage makes a head that will be retried
 * wait on its worker, not in the timer), or are deferred, and then nothing
 * behind them waits for room (below), and a thread passing items on
 * (the head, or a flush) never waits for room here, only for the next
 * stage, which does not wait for this one. Closing the reorder (on
 * cancellation) makes both fail instead of blocking.
 *
 * A deferred item (kd_job_defer(), or a handler context) is not running:
 * it ends when the application returns it, and then on a worker, which
 * every worker waiting for room behind it would keep busy. So while an
 * item of its key is deferred (kd_reorder_deferred() counts them per key),
 * a ticket buffers what it emits without waiting for room, over the bound
 * if need be; the entries still wait while the room is taken. What is in
 * flight is then the bound plus what the items of such keys emit.
 *
 * If passing an item on fails (the pipeline was cancelled meanwhile), the
 * drop function hands it back, so every emitted item ends exactly once.
 *
 * Threads: the keys are split into N_SHARDS shards by the high bits of
 * their hash, each with its own lock over its keys' FIFOs, so the threads
 * that feed the stage and the stage's workers rarely meet on a lock. The
 * room taken is one atomic counter; only a thread that finds it at the
 * bound takes @room_lock and sleeps. A wake is a system call, and a feeder
 * faster than the stage would otherwise be woken for every ticket that
 * goes back, to take one more and sleep again: room given back wakes the
 * sleepers only once no more than @wake_below is taken, so each wake lets
 * them take @room / 16. The count may never fall that far (the
 * running handlers may wait for the sleeping feeder), so a sleeper also
 * looks for room by itself, as a dispatcher's blocked submitter does
 * (KD_ROOM_RECHECK_MIN_US, doubling up to KD_ROOM_RECHECK_MAX_US).
 *
 * Cost per item: no allocation in the steady state. Each shard recycles
 * tickets and buffered emits through capped free lists, and a key whose
 * tickets are all back stays in its shard's table, dormant, for its next
 * item, up to a bound per shard, the least recently used going first: memory
 * follows the stage bound, not the keys ever seen.
 */

#include "config.h"

#include <string.h>

#include <gio/gio.h>

#include "kd-error.h"
#include "kd-job-private.h"
#include "kd-lru-private.h"
#include "kd-key-map-private.h"
#include "kd-mailbox-private.h"
#include "kd-reorder-private.h"
#include "kd-sync-private.h"

#define SHARD_BITS        4
#define N_SHARDS          (1u << SHARD_BITS)
#define SPARE_TICKETS_MAX 64
#define SPARE_EMITTED_MAX 64

/* One item emitted while its ticket could not pass it on yet. */
typedef struct _Emitted Emitted;

struct _Emitted
{
  Emitted *next;
  char      *key;   /* a kd_label_new() label, or NULL */
  gpointer   item;
  KdItemKind kind;
};

typedef struct _Shard    Shard;

struct _KdTicket
{
  KdOrderKey *order;
  KdTicket   *next;      /* the next ticket of the key, or the next spare */
  gboolean    ended;
  Emitted    *first;     /* buffered, in emit order; each holds room */
  Emitted    *last;

  /* Its item waits for room in kd_reorder_emit() (under the shard lock),
   * and may stop waiting, as its turn came (atomic) */
  gboolean    waiting;
  gint        turn;

  /* The item, until a job claims it (kd_reorder_claim()) */
  gboolean    claimed;
  gpointer    item;
  KdItemKind  kind;
  gboolean    deferred;  /* its job was deferred (kd_reorder_deferred()) */
  char       *label;     /* a kd_label_new() label, or NULL */
  guint       epoch;     /* of the stage's admission unit it holds */
};

/* A key's FIFO of tickets. Protected by its shard's lock. */
struct _KdOrderKey
{
  KdKey     key;       /* key.string: a kd_label_new() label, or NULL for unkeyed items */
  Shard    *shard;
  KdTicket *head;
  KdTicket *tail;
  KdTicket *unclaimed; /* the oldest ticket whose item no job claimed yet */
  gboolean  flushing;  /* a thread is passing this key's items on */
  gint      n_deferred;  /* atomic: its tickets whose jobs were deferred */
  gboolean  dormant;   /* idle, kept in the table for the key's next item */
  KdLruLink dormant_link;  /* in the shard's dormant list */
};

/* Shards have cache lines of their own, so threads working on keys of
 * different shards do not share one. */
struct _Shard
{
  GMutex      lock;
  KdKeyMap    map;          /* KdKey (inside its KdOrderKey) → KdOrderKey *, active or dormant */
  KdTicket   *spare_tickets;
  Emitted    *spare_emitted;
  KdLru       dormant;      /* dormant keys, least recently used first */
  guint       n_spare_tickets;
  guint       n_spare_emitted;
} __attribute__ ((aligned (64)));

G_STATIC_ASSERT (sizeof (Shard) % 64 == 0);

struct _KdReorder
{
  /* Immutable */
  KdReorderPassFunc pass;
  KdReorderDropFunc drop;
  gpointer          user_data;
  guint             room;          /* tickets out and items buffered, together */
  guint             dormant_max;   /* per shard */
  guint             wake_below;    /* room given back wakes sleepers from this count down */

  /* Atomic */
  gint              taken;         /* of @room */
  gint              sleepers;      /* someone sleeps in kd_reorder_enter(), or is about to */
  gint              closed;

  GMutex            room_lock;
  GCond             room_cond;     /* a ticket went back, or closed */
  GCond             sleepers_cond; /* @n_sleeping changed */
  guint             n_sleeping;    /* protected by @room_lock */

  KdOrderKey       *unkeyed;       /* NULL-key items' FIFO, under shards[0]'s lock */

  Shard             shards[N_SHARDS];
};

static void
free_order_key (KdOrderKey *order)
{
  kd_label_unref ((char *) order->key.string);
  g_free (order);
}

static void
link_dormant_locked (Shard      *shard,
                     KdOrderKey *order)
{
  order->dormant = TRUE;
  kd_lru_push_newest (&shard->dormant, &order->dormant_link);
}

static void
unlink_dormant_locked (Shard      *shard,
                       KdOrderKey *order)
{
  order->dormant = FALSE;
  kd_lru_remove (&shard->dormant, &order->dormant_link);
}

/* Forgets the least recently used dormant key. */
static void
forget_oldest_locked (Shard *shard)
{
  KdOrderKey *oldest = KD_LRU_ENTRY (shard->dormant.oldest, KdOrderKey, dormant_link);

  unlink_dormant_locked (shard, oldest);
  kd_key_map_remove (&shard->map, &oldest->key);
  free_order_key (oldest);
}

KdReorder *
kd_reorder_new (guint             room,
                KdReorderPassFunc pass,
                KdReorderDropFunc drop,
                gpointer          user_data)
{
  KdReorder *self = g_aligned_alloc0 (1, sizeof (KdReorder), G_ALIGNOF (KdReorder));
  guint i;

  self->pass = pass;
  self->drop = drop;
  self->user_data = user_data;
  self->room = MAX (room, 1);
  self->dormant_max = MAX (self->room / (N_SHARDS / 2), 8);
  self->wake_below = self->room - MAX (self->room / 16, 1);
  g_mutex_init (&self->room_lock);
  g_cond_init (&self->room_cond);
  g_cond_init (&self->sleepers_cond);

  for (i = 0; i < N_SHARDS; i++)
    {
      g_mutex_init (&self->shards[i].lock);
      kd_key_map_init (&self->shards[i].map);
    }

  return self;
}

/* Once every ticket went back. */
void
kd_reorder_free (KdReorder *self)
{
  guint i;

  g_assert (self->taken == 0);

  for (i = 0; i < N_SHARDS; i++)
    {
      Shard *shard = &self->shards[i];

      g_assert (kd_key_map_size (&shard->map) == shard->dormant.length);
      while (shard->dormant.length > 0)
        forget_oldest_locked (shard);
      while (shard->spare_tickets != NULL)
        {
          KdTicket *next = shard->spare_tickets->next;

          g_free (shard->spare_tickets);
          shard->spare_tickets = next;
        }
      while (shard->spare_emitted != NULL)
        {
          Emitted *next = shard->spare_emitted->next;

          g_free (shard->spare_emitted);
          shard->spare_emitted = next;
        }
      kd_key_map_clear (&shard->map);
      g_mutex_clear (&shard->lock);
    }
  g_clear_pointer (&self->unkeyed, free_order_key);

  g_mutex_clear (&self->room_lock);
  g_cond_clear (&self->room_cond);
  g_cond_clear (&self->sleepers_cond);
  g_aligned_free (self);
}

/* Makes kd_reorder_enter() fail from now on, and wakes those it blocks. */
void
kd_reorder_close (KdReorder *self)
{
  __atomic_store_n (&self->closed, TRUE, __ATOMIC_SEQ_CST);
  kd_mutex_lock (&self->room_lock);
  g_cond_broadcast (&self->room_cond);
  kd_mutex_unlock (&self->room_lock);
}

typedef enum
{
  ROOM_TAKEN,
  ROOM_TURN,     /* no room taken: the waiting ticket may pass its items on */
  ROOM_CLOSED,
  ROOM_NONE,     /* no room, and the caller would not wait */
} RoomResult;

/* Takes room for a ticket or a buffered item; blocks while there is none
 * (@room taken), unless not @may_wait. With @waiting, also returns (taking
 * nothing) once that ticket's turn came: it is its key's head and nobody
 * flushes the key. */
static RoomResult
take_room (KdReorder *self,
           KdTicket  *waiting,
           gboolean   may_wait)
{
  gint n = __atomic_load_n (&self->taken, __ATOMIC_RELAXED);
  gint64 recheck_us;

  for (;;)
    {
      if (__atomic_load_n (&self->closed, __ATOMIC_ACQUIRE))
        return ROOM_CLOSED;

      if ((guint) n < self->room)
        {
          if (__atomic_compare_exchange_n (&self->taken, &n, n + 1, TRUE,
                                           __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            return ROOM_TAKEN;
          continue;
        }

      if (waiting != NULL && __atomic_load_n (&waiting->turn, __ATOMIC_ACQUIRE))
        return ROOM_TURN;
      /* Behind a deferred item, an emit takes room over the bound. */
      if (waiting != NULL && __atomic_load_n (&waiting->order->n_deferred, __ATOMIC_ACQUIRE) > 0)
        {
          __atomic_add_fetch (&self->taken, 1, __ATOMIC_ACQ_REL);
          return ROOM_TAKEN;
        }
      if (!may_wait)
        return ROOM_NONE;

      /* At the bound. Raising @sleepers before looking again pairs with
       * give_back_room(), which lowers the count before looking at
       * @sleepers: one of the two sees the other. */
      kd_mutex_lock (&self->room_lock);
      self->n_sleeping++;
      g_cond_broadcast (&self->sleepers_cond);
      recheck_us = KD_ROOM_RECHECK_MIN_US;
      for (;;)
        {
          __atomic_store_n (&self->sleepers, TRUE, __ATOMIC_SEQ_CST);
          if (__atomic_load_n (&self->closed, __ATOMIC_SEQ_CST) ||
              (guint) __atomic_load_n (&self->taken, __ATOMIC_SEQ_CST) < self->room ||
              (waiting != NULL &&
               (__atomic_load_n (&waiting->turn, __ATOMIC_SEQ_CST) ||
                __atomic_load_n (&waiting->order->n_deferred, __ATOMIC_SEQ_CST) > 0)))
            break;
          if (!kd_cond_wait_until (&self->room_cond, &self->room_lock,
                                   g_get_monotonic_time () + recheck_us))
            recheck_us = MIN (recheck_us * 2, KD_ROOM_RECHECK_MAX_US);
        }
      if (--self->n_sleeping == 0)
        __atomic_store_n (&self->sleepers, FALSE, __ATOMIC_SEQ_CST);
      g_cond_broadcast (&self->sleepers_cond);
      kd_mutex_unlock (&self->room_lock);

      n = __atomic_load_n (&self->taken, __ATOMIC_RELAXED);
    }
}

/*
 * kd_reorder_deferred:
 *
 * The job of @ticket was deferred: until the ticket goes back, what the
 * tickets of its key emit never waits for room (see above). Wakes those
 * that wait. Idempotent; the job's thread.
 */
void
kd_reorder_deferred (KdReorder *self,
                     KdTicket  *ticket)
{
  Shard *shard = ticket->order->shard;
  gboolean first;

  kd_mutex_lock (&shard->lock);
  first = !ticket->deferred;
  if (first)
    {
      ticket->deferred = TRUE;
      __atomic_add_fetch (&ticket->order->n_deferred, 1, __ATOMIC_SEQ_CST);
    }
  kd_mutex_unlock (&shard->lock);

  if (first)
    {
      kd_mutex_lock (&self->room_lock);
      g_cond_broadcast (&self->room_cond);
      kd_mutex_unlock (&self->room_lock);
    }
}

/* With the shard lock held: the head @ticket, whose item waits for room
 * in kd_reorder_emit(), may pass its items on now: wakes it. */
static void
give_turn_locked (KdReorder *self,
                  KdTicket  *ticket)
{
  __atomic_store_n (&ticket->turn, TRUE, __ATOMIC_SEQ_CST);
  kd_mutex_lock (&self->room_lock);
  g_cond_broadcast (&self->room_cond);
  kd_mutex_unlock (&self->room_lock);
}

static void
give_back_room (KdReorder *self)
{
  guint n = __atomic_sub_fetch (&self->taken, 1, __ATOMIC_SEQ_CST);

  /* Once woken, the sleepers take a while to run; they raise @sleepers
   * again only if they must sleep again, so they are woken once. The last
   * one to stop sleeping lowers it. */
  if (n <= self->wake_below && __atomic_load_n (&self->sleepers, __ATOMIC_SEQ_CST))
    {
      kd_mutex_lock (&self->room_lock);
      if (__atomic_load_n (&self->sleepers, __ATOMIC_RELAXED))
        {
          __atomic_store_n (&self->sleepers, FALSE, __ATOMIC_SEQ_CST);
          g_cond_broadcast (&self->room_cond);
        }
      kd_mutex_unlock (&self->room_lock);
    }
}

/* With the shard's lock held: @key's FIFO, found, woken or created. */
static KdOrderKey *
order_key_locked (KdReorder    *self,
                  Shard        *shard,
                  const KdKey  *key)
{
  KdOrderKey *order;

  if (key->string == NULL)
    {
      if (self->unkeyed == NULL)
        {
          self->unkeyed = g_new0 (KdOrderKey, 1);
          self->unkeyed->shard = shard;
        }
      return self->unkeyed;
    }

  order = kd_key_map_lookup (&shard->map, key);
  if (order == NULL)
    {
      order = g_new0 (KdOrderKey, 1);
      order->key = *key;
      order->key.string = kd_label_new (key->string);
      order->shard = shard;
      kd_key_map_insert (&shard->map, &order->key, order);
    }
  else if (order->dormant)
    {
      unlink_dormant_locked (shard, order);
    }

  return order;
}

/*
 * kd_reorder_enter:
 * @key: (nullable): the item's key
 * @item: the item, held by the ticket until a job claims it
 * @kind: what @item is
 * @label: (transfer full) (nullable): the item's label, held likewise
 * @epoch: the epoch of the stage's admission unit the item holds
 * @may_wait: whether to wait for room
 *
 * Takes the ticket of an item entering the stage, behind the tickets of the
 * items of @key that entered before it; while there is no room (see the
 * design above), waits if @may_wait, else fails with KD_ERROR_FULL. Returns
 * the key's queue, from which a job claims the ticket (kd_reorder_claim()):
 * the key stays known while a ticket of it is unclaimed. Fails with
 * KD_ERROR_CLOSED once the reorder is closed. On failure @label and the
 * item are still the caller's. Every ticket must go back through
 * kd_reorder_leave().
 */
KdOrderKey *
kd_reorder_enter (KdReorder   *self,
                  const char  *key,
                  gpointer     item,
                  KdItemKind   kind,
                  char        *label,
                  guint        epoch,
                  gboolean     may_wait,
                  GError     **error)
{
  KdKey probe = { 0, 0, key };
  KdTicket *ticket;
  KdOrderKey *order;
  Shard *shard;

  switch (take_room (self, NULL, may_wait))
    {
    case ROOM_TAKEN:
      break;
    case ROOM_NONE:
      g_set_error_literal (error, KD_ERROR, KD_ERROR_FULL,
                           "The ordered stage is full, and a thread of its own cannot wait "
                           "for room in it");
      return NULL;
    case ROOM_CLOSED:
    default:
      g_set_error_literal (error, KD_ERROR, KD_ERROR_CLOSED,
                           "The pipeline no longer accepts items");
      return NULL;
    }

  if (key != NULL)
    probe.hash = kd_key_hash (key, &probe.length);
  shard = &self->shards[probe.hash >> (32 - SHARD_BITS)];

  kd_mutex_lock (&shard->lock);
  order = order_key_locked (self, shard, &probe);
  ticket = shard->spare_tickets;
  if (ticket != NULL)
    {
      shard->spare_tickets = ticket->next;
      shard->n_spare_tickets--;
      ticket->next = NULL;
    }
  else
    {
      ticket = g_new0 (KdTicket, 1);
    }
  ticket->order = order;
  ticket->item = item;
  ticket->kind = kind;
  ticket->label = label;
  ticket->epoch = epoch;
  if (order->tail != NULL)
    order->tail->next = ticket;
  else
    order->head = ticket;
  order->tail = ticket;
  if (order->unclaimed == NULL)
    order->unclaimed = ticket;
  kd_mutex_unlock (&shard->lock);

  return order;
}

/*
 * kd_reorder_claim:
 * @order: the key queue a job of the stage was queued with
 * @item: (out): the claimed item
 * @kind: (out): what it is
 * @label: (out) (transfer full): its label
 * @epoch: (out): its admission unit's epoch
 *
 * By a job of the stage as it starts: takes the oldest item of the key that
 * no job claimed yet (not always the one the job was queued for), so that
 * a key's items start in the order they entered. Returns its ticket, which
 * the job uses from now on.
 */
KdTicket *
kd_reorder_claim (KdReorder   *self,
                  KdOrderKey  *order,
                  gpointer    *item,
                  KdItemKind  *kind,
                  char       **label,
                  guint       *epoch)
{
  Shard *shard = order->shard;
  KdTicket *ticket;

  kd_mutex_lock (&shard->lock);
  /* One job per ticket, each claiming one: there is always one left. */
  ticket = order->unclaimed;
  if (G_UNLIKELY (ticket == NULL || ticket->claimed))
    g_error ("kd_reorder_claim: a job of an ordered stage found no item left to run");
  ticket->claimed = TRUE;
  order->unclaimed = ticket->next;
  *item = g_steal_pointer (&ticket->item);
  *kind = ticket->kind;
  *label = g_steal_pointer (&ticket->label);
  *epoch = ticket->epoch;
  kd_mutex_unlock (&shard->lock);

  return ticket;
}

/* With the shard's lock held: once @order has no ticket and nobody passes
 * its items on, it goes dormant, and the least recently used dormant key
 * past the bound is forgotten. */
static void
sleep_if_idle_locked (KdReorder  *self,
                      KdOrderKey *order)
{
  Shard *shard = order->shard;

  if (order->head != NULL || order->flushing || order->key.string == NULL)
    return;

  link_dormant_locked (shard, order);
  if (shard->dormant.length > self->dormant_max)
    forget_oldest_locked (shard);
}

/* With the shard's lock held: takes back a passed-on list of buffered
 * emits. */
static void
recycle_emitted_locked (Shard   *shard,
                        Emitted *list)
{
  while (list != NULL)
    {
      Emitted *next = list->next;

      if (shard->n_spare_emitted < SPARE_EMITTED_MAX)
        {
          list->next = shard->spare_emitted;
          shard->spare_emitted = list;
          shard->n_spare_emitted++;
        }
      else
        {
          g_free (list);
        }
      list = next;
    }
}

/* With the shard's lock held: takes back a ticket whose item ended and
 * whose emits were all passed on. */
static void
recycle_ticket_locked (Shard    *shard,
                       KdTicket *ticket)
{
  if (ticket->deferred)
    __atomic_sub_fetch (&ticket->order->n_deferred, 1, __ATOMIC_SEQ_CST);
  if (shard->n_spare_tickets < SPARE_TICKETS_MAX)
    {
      memset (ticket, 0, sizeof *ticket);
      ticket->next = shard->spare_tickets;
      shard->spare_tickets = ticket;
      shard->n_spare_tickets++;
    }
  else
    {
      g_free (ticket);
    }
}

/* Passes @list on, in order; what cannot be passed on is dropped. Each
 * item gives its room back once it left. The records stay, for
 * recycle_emitted_locked(). */
static void
pass_list (KdReorder *self,
           Emitted   *list)
{
  for (; list != NULL; list = list->next)
    {
      GError *error = NULL;

      if (!self->pass (list->key, list->item, list->kind, &error, self->user_data))
        {
          self->drop (list->key, list->item, list->kind, error, self->user_data);
          g_clear_error (&error);
        }
      g_clear_pointer (&list->key, kd_label_unref);
      give_back_room (self);
    }
}

/* With the shard's lock held and @order->flushing set by the caller: passes
 * on what can leave, ticket by ticket from the head, until nothing can;
 * clears @flushing and returns with the lock held. A ticket goes back only
 * once what it emitted was passed on, so the items in flight, in the
 * reorder or in this thread's hands, stay within the ticket bound. */
static void
flush_locked (KdReorder  *self,
              KdOrderKey *order)
{
  Shard *shard = order->shard;

  for (;;)
    {
      KdTicket *head = order->head;
      Emitted *ready;
      gboolean ended;

      if (head == NULL)
        break;

      ready = head->first;
      head->first = head->last = NULL;
      ended = head->ended;
      if (ready == NULL && !ended)
        break;

      if (ready != NULL)
        {
          kd_mutex_unlock (&shard->lock);
          pass_list (self, ready);
          kd_mutex_lock (&shard->lock);
          recycle_emitted_locked (shard, ready);
        }

      /* A head that is still running may have buffered more meanwhile:
       * the loop looks again. One that ended goes back now. */
      if (ended)
        {
          order->head = head->next;
          if (order->head == NULL)
            order->tail = NULL;
          recycle_ticket_locked (shard, head);
          give_back_room (self);
        }
    }

  order->flushing = FALSE;
  if (order->head != NULL && order->head->waiting)
    give_turn_locked (self, order->head);
  sleep_if_idle_locked (self, order);
}

/*
 * kd_reorder_emit:
 * @key: (transfer full) (nullable): the emitted item's key, a kd_label_new() label
 * @item: (transfer full): the emitted item
 * @kind: what @item is
 *
 * Passes on, or keeps until its turn, what the item of @ticket emits.
 * Keeping it takes room, so past the bound this blocks until there is some
 * (or the ticket became the head). Returns what the pass function returned
 * if the item went on at once; TRUE if it was buffered; FALSE with
 * KD_ERROR_CLOSED if the reorder was closed while there was no room. On
 * FALSE the item is still the caller's (and @key was released).
 */
gboolean
kd_reorder_emit (KdReorder   *self,
                 KdTicket    *ticket,
                 char        *key,
                 gpointer     item,
                 KdItemKind   kind,
                 GError     **error)
{
  KdOrderKey *order = ticket->order;
  Shard *shard = order->shard;
  gboolean room = FALSE;
  gboolean passed;

  kd_mutex_lock (&shard->lock);
  while (order->head != ticket || order->flushing)
    {
      Emitted *emitted;

      if (!room)
        {
          RoomResult result;

          /* Not under the shard lock: those who make room take it. The
           * flush that makes this ticket the head gives it its turn. */
          ticket->waiting = TRUE;
          ticket->turn = FALSE;
          kd_mutex_unlock (&shard->lock);
          result = take_room (self, ticket, TRUE);
          kd_mutex_lock (&shard->lock);
          ticket->waiting = FALSE;
          if (result == ROOM_CLOSED)
            {
              kd_mutex_unlock (&shard->lock);
              g_set_error_literal (error, KD_ERROR, KD_ERROR_CLOSED,
                                   "The pipeline was cancelled while the item waited for room");
              kd_label_unref (key);
              return FALSE;
            }
          room = result == ROOM_TAKEN;
          continue;   /* it may be the head by now */
        }

      emitted = shard->spare_emitted;

      if (emitted != NULL)
        {
          shard->spare_emitted = emitted->next;
          shard->n_spare_emitted--;
        }
      else
        {
          emitted = g_new (Emitted, 1);
        }
      emitted->next = NULL;
      emitted->key = key;
      emitted->item = item;
      emitted->kind = kind;
      if (ticket->last != NULL)
        ticket->last->next = emitted;
      else
        ticket->first = emitted;
      ticket->last = emitted;
      kd_mutex_unlock (&shard->lock);
      return TRUE;
    }

  /* The head: straight on, and nobody else passes this key's items on
   * meanwhile. */
  order->flushing = TRUE;
  kd_mutex_unlock (&shard->lock);
  if (room)
    give_back_room (self);

  passed = self->pass (key, item, kind, error, self->user_data);
  g_clear_pointer (&key, kd_label_unref);

  kd_mutex_lock (&shard->lock);
  flush_locked (self, order);
  kd_mutex_unlock (&shard->lock);

  return passed;
}

/*
 * kd_reorder_leave:
 *
 * The item of @ticket ended: everything it emitted may go once the items
 * before it are done. The ticket is not to be used again.
 */
void
kd_reorder_leave (KdReorder *self,
                  KdTicket  *ticket)
{
  KdOrderKey *order = ticket->order;
  Shard *shard = order->shard;

  kd_mutex_lock (&shard->lock);
  ticket->ended = TRUE;
  if (order->head == ticket && !order->flushing)
    {
      order->flushing = TRUE;
      flush_locked (self, order);
    }
  kd_mutex_unlock (&shard->lock);
}

/* For tests: how many keys the shards hold, active or dormant (not the
 * unkeyed items' FIFO). */
guint
kd_reorder_count_keys (KdReorder *self)
{
  guint n = 0;
  guint i;

  for (i = 0; i < N_SHARDS; i++)
    {
      kd_mutex_lock (&self->shards[i].lock);
      n += kd_key_map_size (&self->shards[i].map);
      kd_mutex_unlock (&self->shards[i].lock);
    }

  return n;
}

/* For tests: sleeps until @n_sleeping threads wait for room, in
 * kd_reorder_enter() or kd_reorder_emit(). */
void
kd_reorder_wait_sleepers (KdReorder *self,
                          guint      n_sleeping)
{
  kd_mutex_lock (&self->room_lock);
  while (self->n_sleeping < n_sleeping)
    kd_cond_wait (&self->sleepers_cond, &self->room_lock);
  kd_mutex_unlock (&self->room_lock);
}
