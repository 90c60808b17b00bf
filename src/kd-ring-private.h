/* kd-ring-private.h: a bounded ring of values, any thread in, any thread out
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * A fixed array of slots, each a pointer and a 32-bit tag, taken in
 * order by any number of pushers and poppers (Dmitry Vyukov's bounded MPMC
 * queue). Each slot has a sequence number that says whose turn it is: a
 * pusher may fill the slot at position p when its sequence is p, a popper
 * may empty it when it is p + 1, and emptying it makes it p + size, the
 * next lap's push. A pusher claims its position with one compare-and-swap
 * on @tail, a popper with one on @head (kd_ring_claim()); the two are on
 * lines of their own,
 * so pushers and poppers do not fight over one. The values themselves are
 * 16 bytes, four to a cache line.
 *
 * Values leave in the order their positions were claimed: a pusher that
 * claimed a position and has not filled it yet (it was preempted between
 * the two) holds back the values behind it until it runs again. Nobody
 * waits for it by spinning: the slot is not ready (kd_ring_has_ready()),
 * so poppers look elsewhere or sleep, and its fill wakes them.
 *
 * Positions are 32-bit and wrap; they are compared by their signed
 * difference, which is right while the ring holds fewer than 2^31 values.
 */

#pragma once

#include <glib.h>

G_BEGIN_DECLS

typedef struct
{
  guint32  seq;   /* atomic: whose turn, see above */
  guint32  tag;
  gpointer value;
} KdRingSlot;

typedef struct
{
  KdRingSlot *slots;
  guint32     mask;   /* size - 1; the size is a power of two */
  guint32     head __attribute__ ((aligned (64)));  /* atomic: the next position to pop */
  guint32     tail __attribute__ ((aligned (64)));  /* atomic: the next position to push */
} __attribute__ ((aligned (64))) KdRing;

/* @size: a power of two. */
static inline void
kd_ring_init (KdRing *self,
              guint32 size)
{
  guint32 i;

  g_assert (size > 0 && (size & (size - 1)) == 0);
  self->slots = g_new (KdRingSlot, size);
  for (i = 0; i < size; i++)
    self->slots[i].seq = i;
  self->mask = size - 1;
  self->head = 0;
  self->tail = 0;
}

static inline void
kd_ring_clear (KdRing *self)
{
  g_clear_pointer (&self->slots, g_free);
}

/* Claims the position @counter points at (the tail for a push, the head
 * for a pop), once the slot there is @ready ahead of it in sequence (0:
 * free, for a push; 1: filled, for a pop): returns the slot, its position
 * in *@position; NULL if the slot is not ready (the ring is full, or has
 * nothing ready). The claim publishes nothing: the slot's sequence, stored
 * once the slot is filled or emptied, does. */
static inline KdRingSlot *
kd_ring_claim (KdRing  *self,
               guint32 *counter,
               guint32  ready,
               guint32 *position)
{
  guint32 pos = __atomic_load_n (counter, __ATOMIC_RELAXED);

  for (;;)
    {
      KdRingSlot *slot = &self->slots[pos & self->mask];
      gint32 diff = (gint32) (__atomic_load_n (&slot->seq, __ATOMIC_ACQUIRE) - (pos + ready));

      if (diff == 0)
        {
          if (__atomic_compare_exchange_n (counter, &pos, pos + 1, TRUE,
                                           __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            {
              *position = pos;
              return slot;
            }
        }
      else if (diff < 0)
        {
          return NULL;
        }
      else
        {
          pos = __atomic_load_n (counter, __ATOMIC_RELAXED);
        }
    }
}

/* Any thread: appends @value and @tag, or returns FALSE if the ring is full:
 * the slot at the tail is not free yet, because it holds a value, or a
 * popper that took its value (a lap ago) has not given it back yet. The
 * fill is sequentially consistent (see kd_ring_has_ready()). */
static inline gboolean
kd_ring_push (KdRing  *self,
              gpointer value,
              guint32  tag)
{
  guint32 pos;
  KdRingSlot *slot = kd_ring_claim (self, &self->tail, 0, &pos);

  if (slot == NULL)
    return FALSE;
  slot->value = value;
  slot->tag = tag;
  __atomic_store_n (&slot->seq, pos + 1, __ATOMIC_SEQ_CST);
  return TRUE;
}

/* Any thread: appends the first of @values, up to @n, for which there is
 * room, each with @tag, in one compare-and-swap; returns how many. The
 * slots are checked free before the claim: only the pusher that claims a
 * free slot's position can fill it, so they are still free once the claim
 * succeeded. */
static inline guint
kd_ring_push_many (KdRing         *self,
                   gpointer const *values,
                   guint           n,
                   guint32         tag)
{
  guint32 pos = __atomic_load_n (&self->tail, __ATOMIC_RELAXED);
  guint32 k, i;

  if (n == 0)
    return 0;

  for (;;)
    {
      gint32 diff = 0;

      for (k = 0; k < n; k++)
        {
          KdRingSlot *slot = &self->slots[(pos + k) & self->mask];

          diff = (gint32) (__atomic_load_n (&slot->seq, __ATOMIC_ACQUIRE) - (pos + k));
          if (diff != 0)
            break;
        }
      if (k == 0 && diff < 0)
        return 0;
      if (k == 0)
        pos = __atomic_load_n (&self->tail, __ATOMIC_RELAXED);
      else if (__atomic_compare_exchange_n (&self->tail, &pos, pos + k, TRUE,
                                            __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        break;
    }

  /* The first slot last: no popper passes it before it is filled, so the
   * others may be published with a plain release, and the first one's
   * sequentially consistent store publishes them all (see
   * kd_ring_has_ready()). */
  for (i = k; i-- > 0;)
    {
      KdRingSlot *slot = &self->slots[(pos + i) & self->mask];

      slot->value = values[i];
      slot->tag = tag;
      __atomic_store_n (&slot->seq, pos + i + 1, i == 0 ? __ATOMIC_SEQ_CST : __ATOMIC_RELEASE);
    }
  return k;
}

/* Any thread: takes the oldest value and its tag, or returns FALSE if there
 * is none ready. A value whose pusher claimed its position but has not
 * filled it yet is not ready, though the ring is not empty any more. */
static inline gboolean
kd_ring_pop (KdRing   *self,
             gpointer *value,
             guint32  *tag)
{
  guint32 pos;
  KdRingSlot *slot = kd_ring_claim (self, &self->head, 1, &pos);

  if (slot == NULL)
    return FALSE;
  *value = slot->value;
  *tag = slot->tag;
  __atomic_store_n (&slot->seq, pos + self->mask + 1, __ATOMIC_RELEASE);
  return TRUE;
}

/* Any thread: whether the oldest value is ready to pop. Sequentially
 * consistent, as the store that fills a slot is: a pusher that fills the
 * oldest slot and then reads a flag, and a thread that sets the flag and
 * then calls this, cannot both miss each other (the Dekker pattern of the
 * scheduler's wake-ups). A value behind an oldest slot that is claimed but
 * not yet filled is not ready: its pusher's fill of the oldest slot will
 * make both visible. */
static inline gboolean
kd_ring_has_ready (KdRing *self)
{
  for (;;)
    {
      guint32 pos = __atomic_load_n (&self->head, __ATOMIC_SEQ_CST);
      gint32 diff = (gint32) (__atomic_load_n (&self->slots[pos & self->mask].seq,
                                               __ATOMIC_SEQ_CST) - (pos + 1));

      /* Above: popped since @head was read, which has moved on. */
      if (diff <= 0)
        return diff == 0;
    }
}

/* Any thread: whether every position pushed so far was popped. */
static inline gboolean
kd_ring_is_empty (KdRing *self)
{
  return __atomic_load_n (&self->head, __ATOMIC_SEQ_CST) ==
         __atomic_load_n (&self->tail, __ATOMIC_SEQ_CST);
}

G_END_DECLS
