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
 * Only one thread passes on a key's items at a time (@flushing), so they
 * leave in order; the others only buffer or mark their ticket ended, and
 * the flushing thread looks again before it stops. The pass function may
 * block (the next stage is full): no lock is held while it runs.
 *
 * Memory stays bounded: at most @max_tickets tickets are out at once, and
 * kd_reorder_enter() blocks past that, which is backpressure on whoever
 * feeds the stage. It cannot deadlock: tickets go back as items end, and an
 * ordered stage's items do not wait for what feeds it. Closing the reorder
 * (on cancellation) makes kd_reorder_enter() fail instead of blocking.
 *
 * If passing an item on fails (the pipeline was cancelled meanwhile), the
 * drop function hands it back, so every emitted item ends exactly once.
 */

#include "config.h"

#include <gio/gio.h>

#include "kd-error.h"
#include "kd-job-private.h"
#include "kd-reorder-private.h"
#include "kd-sync-private.h"

/* One item emitted while its ticket could not pass it on yet. */
typedef struct _Emitted Emitted;

struct _Emitted
{
  Emitted *next;
  char    *key;     /* a kd_label_new() label, or NULL */
  gpointer item;
};

typedef struct _OrderKey OrderKey;

struct _KdTicket
{
  OrderKey *order;
  KdTicket *next;      /* the next ticket of the key */
  gboolean  ended;
  Emitted  *first;     /* buffered, in emit order */
  Emitted  *last;
};

struct _OrderKey
{
  char     *key;       /* a kd_label_new() label, or NULL for unkeyed items */
  KdTicket *head;
  KdTicket *tail;
  gboolean  flushing;  /* a thread is passing this key's items on */
};

struct _KdReorder
{
  /* Immutable */
  KdReorderPassFunc pass;
  KdReorderDropFunc drop;
  gpointer          user_data;
  guint             max_tickets;

  /* Protected by @lock */
  GMutex            lock;
  GCond             room_cond;    /* a ticket went back, or closed */
  GHashTable       *keys;         /* key → OrderKey */
  OrderKey         *unkeyed;      /* NULL-key items' FIFO, or NULL */
  guint             n_tickets;
  gboolean          closed;
};

KdReorder *
kd_reorder_new (guint             max_tickets,
                KdReorderPassFunc pass,
                KdReorderDropFunc drop,
                gpointer          user_data)
{
  KdReorder *self = g_new0 (KdReorder, 1);

  self->pass = pass;
  self->drop = drop;
  self->user_data = user_data;
  self->max_tickets = MAX (max_tickets, 1);
  g_mutex_init (&self->lock);
  g_cond_init (&self->room_cond);
  self->keys = g_hash_table_new (g_str_hash, g_str_equal);

  return self;
}

/* Once every ticket went back. */
void
kd_reorder_free (KdReorder *self)
{
  g_assert (self->n_tickets == 0);
  g_assert (g_hash_table_size (self->keys) == 0 && self->unkeyed == NULL);

  g_hash_table_unref (self->keys);
  g_mutex_clear (&self->lock);
  g_cond_clear (&self->room_cond);
  g_free (self);
}

/* Makes kd_reorder_enter() fail from now on, and wakes those it blocks. */
void
kd_reorder_close (KdReorder *self)
{
  kd_mutex_lock (&self->lock);
  self->closed = TRUE;
  g_cond_broadcast (&self->room_cond);
  kd_mutex_unlock (&self->lock);
}

/*
 * kd_reorder_enter:
 * @key: (nullable): the item's key
 *
 * Takes the ticket of an item entering the stage, behind the tickets of the
 * items of @key that entered before it; blocks while @max_tickets are out.
 * Fails with KD_ERROR_CLOSED once the reorder is closed. Every ticket must go
 * back through kd_reorder_leave().
 */
KdTicket *
kd_reorder_enter (KdReorder   *self,
                  const char  *key,
                  GError     **error)
{
  KdTicket *ticket;
  OrderKey *order;

  kd_mutex_lock (&self->lock);
  while (!self->closed && self->n_tickets >= self->max_tickets)
    kd_cond_wait (&self->room_cond, &self->lock);

  if (self->closed)
    {
      kd_mutex_unlock (&self->lock);
      g_set_error_literal (error, KD_ERROR, KD_ERROR_CLOSED,
                           "The pipeline no longer accepts items");
      return NULL;
    }

  order = key != NULL ? g_hash_table_lookup (self->keys, key) : self->unkeyed;
  if (order == NULL)
    {
      order = g_new0 (OrderKey, 1);
      if (key != NULL)
        {
          order->key = kd_label_new (key);
          g_hash_table_insert (self->keys, order->key, order);
        }
      else
        {
          self->unkeyed = order;
        }
    }

  ticket = g_new0 (KdTicket, 1);
  ticket->order = order;
  if (order->tail != NULL)
    order->tail->next = ticket;
  else
    order->head = ticket;
  order->tail = ticket;
  self->n_tickets++;
  kd_mutex_unlock (&self->lock);

  return ticket;
}

/* With @lock held: forgets @order once it has no ticket and nobody is
 * passing its items on. */
static void
forget_if_idle_locked (KdReorder *self,
                       OrderKey  *order)
{
  if (order->head != NULL || order->flushing)
    return;

  if (order->key != NULL)
    {
      g_hash_table_remove (self->keys, order->key);
      kd_label_unref (order->key);
    }
  else
    {
      self->unkeyed = NULL;
    }
  g_free (order);
}

/* Passes @list on, in order; what cannot be passed on is dropped. */
static void
pass_list (KdReorder *self,
           Emitted   *list)
{
  while (list != NULL)
    {
      Emitted *next = list->next;
      GError *error = NULL;

      if (!self->pass (list->key, list->item, &error, self->user_data))
        {
          self->drop (list->key, list->item, error, self->user_data);
          g_clear_error (&error);
        }
      g_clear_pointer (&list->key, kd_label_unref);
      g_free (list);
      list = next;
    }
}

/* With @lock held and @order->flushing set by the caller: passes on what
 * can leave, ticket by ticket from the head, until nothing can; clears
 * @flushing and returns with @lock held. A ticket goes back only once what
 * it emitted was passed on, so the items in flight, in the reorder or in
 * this thread's hands, stay within the ticket bound. */
static void
flush_locked (KdReorder *self,
              OrderKey  *order)
{
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

      kd_mutex_unlock (&self->lock);
      pass_list (self, ready);
      kd_mutex_lock (&self->lock);

      /* A head that is still running may have buffered more meanwhile:
       * the loop looks again. One that ended goes back now. */
      if (ended)
        {
          order->head = head->next;
          if (order->head == NULL)
            order->tail = NULL;
          g_free (head);
          self->n_tickets--;
          g_cond_broadcast (&self->room_cond);
        }
    }

  order->flushing = FALSE;
  forget_if_idle_locked (self, order);
}

/*
 * kd_reorder_emit:
 * @key: (transfer full) (nullable): the emitted item's key, a kd_label_new() label
 * @item: (transfer full): the emitted item
 *
 * Passes on, or keeps until its turn, what the item of @ticket emits.
 * Returns what the pass function returned if the item went on at once;
 * TRUE if it was buffered. On FALSE the item is still the caller's (and
 * @key was released).
 */
gboolean
kd_reorder_emit (KdReorder   *self,
                 KdTicket    *ticket,
                 char        *key,
                 gpointer     item,
                 GError     **error)
{
  OrderKey *order = ticket->order;
  gboolean passed;

  kd_mutex_lock (&self->lock);
  if (order->head != ticket || order->flushing)
    {
      Emitted *emitted = g_new (Emitted, 1);

      emitted->next = NULL;
      emitted->key = key;
      emitted->item = item;
      if (ticket->last != NULL)
        ticket->last->next = emitted;
      else
        ticket->first = emitted;
      ticket->last = emitted;
      kd_mutex_unlock (&self->lock);
      return TRUE;
    }

  /* The head: straight on, and nobody else passes this key's items on
   * meanwhile. */
  order->flushing = TRUE;
  kd_mutex_unlock (&self->lock);

  passed = self->pass (key, item, error, self->user_data);
  g_clear_pointer (&key, kd_label_unref);

  kd_mutex_lock (&self->lock);
  flush_locked (self, order);
  kd_mutex_unlock (&self->lock);

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
  OrderKey *order = ticket->order;

  kd_mutex_lock (&self->lock);
  ticket->ended = TRUE;
  if (order->head == ticket && !order->flushing)
    {
      order->flushing = TRUE;
      flush_locked (self, order);
    }
  kd_mutex_unlock (&self->lock);
}
