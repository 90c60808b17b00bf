/* kd-timer.c: tasks that wait for their time, on one thread
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A job that failed and will be retried waits out its backoff here, not on
 * a worker, and so does the expiry of a key's idle state: the timer holds
 * calls (a function and its data: the scheduler's push of the job, or of
 * its key's mailbox with the job back at its head; the dispatcher's check
 * of an idle key) in a binary min-heap ordered by due time, and its one
 * thread sleeps until the earliest is due, then makes the call outside the
 * lock. Calls due at the same time are made in the order they came.
 *
 * kd_timer_hurry() makes every call due now, and every call added later
 * too: once a dispatcher is cancelled, its waiting retries end (cancelled)
 * at once, and once it stops, idle key states go. kd_timer_stop() lets the
 * thread exit once the heap is empty and kd_timer_free() joins it; the
 * owner stops it only when nothing can be added any more.
 */

#include "config.h"

#include "kd-sync-private.h"
#include "kd-timer-private.h"

typedef struct
{
  gint64       due_time;   /* g_get_monotonic_time() */
  guint64      sequence;   /* ties: first come, first out */
  KdTimerFunc  func;
  gpointer     owner;
  gpointer     data;
} Entry;

struct _KdTimer
{
  GThread     *thread;

  /* Protected by @lock */
  GMutex       lock;
  GCond        cond;
  GArray      *heap;       /* Entry, a binary min-heap */
  guint64      sequence;
  gboolean     hurried;    /* everything is due now */
  gboolean     stopping;   /* exit once the heap is empty */
};

static gboolean
entry_before (const Entry *a,
              const Entry *b)
{
  return a->due_time < b->due_time ||
         (a->due_time == b->due_time && a->sequence < b->sequence);
}

static void
heap_push (GArray *heap,
           Entry  *entry)
{
  guint i;

  g_array_append_val (heap, *entry);
  for (i = heap->len - 1; i > 0; )
    {
      guint parent = (i - 1) / 2;
      Entry *child = &g_array_index (heap, Entry, i);
      Entry *up = &g_array_index (heap, Entry, parent);
      Entry swap;

      if (!entry_before (child, up))
        break;
      swap = *child;
      *child = *up;
      *up = swap;
      i = parent;
    }
}

static Entry
heap_pop (GArray *heap)
{
  Entry top = g_array_index (heap, Entry, 0);
  guint i = 0;

  g_array_index (heap, Entry, 0) = g_array_index (heap, Entry, heap->len - 1);
  g_array_set_size (heap, heap->len - 1);

  for (;;)
    {
      guint left = 2 * i + 1, right = left + 1, least = i;
      Entry swap;

      if (left < heap->len &&
          entry_before (&g_array_index (heap, Entry, left), &g_array_index (heap, Entry, least)))
        least = left;
      if (right < heap->len &&
          entry_before (&g_array_index (heap, Entry, right), &g_array_index (heap, Entry, least)))
        least = right;
      if (least == i)
        break;
      swap = g_array_index (heap, Entry, i);
      g_array_index (heap, Entry, i) = g_array_index (heap, Entry, least);
      g_array_index (heap, Entry, least) = swap;
      i = least;
    }

  return top;
}

static gpointer
timer_main (gpointer data)
{
  KdTimer *self = data;

  kd_mutex_lock (&self->lock);
  for (;;)
    {
      Entry *first;

      if (self->heap->len == 0)
        {
          if (self->stopping)
            break;
          kd_cond_wait (&self->cond, &self->lock);
          continue;
        }

      first = &g_array_index (self->heap, Entry, 0);
      if (!self->hurried && first->due_time > g_get_monotonic_time ())
        {
          kd_cond_wait_until (&self->cond, &self->lock, first->due_time);
          continue;
        }

      {
        Entry due = heap_pop (self->heap);

        kd_mutex_unlock (&self->lock);
        due.func (due.owner, due.data);
        kd_mutex_lock (&self->lock);
      }
    }
  kd_mutex_unlock (&self->lock);

  return NULL;
}

KdTimer *
kd_timer_new (const char *thread_name)
{
  KdTimer *self = g_new0 (KdTimer, 1);

  self->heap = g_array_new (FALSE, FALSE, sizeof (Entry));
  g_mutex_init (&self->lock);
  g_cond_init (&self->cond);
  self->thread = g_thread_new (thread_name, timer_main, self);

  return self;
}

/* Any thread: calls @func (@owner, @data) on the timer's thread once
 * g_get_monotonic_time() reached @due_time. */
void
kd_timer_add (KdTimer     *self,
              gint64       due_time,
              KdTimerFunc  func,
              gpointer     owner,
              gpointer     data)
{
  Entry entry;

  kd_mutex_lock (&self->lock);
  g_assert (!self->stopping);
  entry.due_time = due_time;
  entry.sequence = self->sequence++;
  entry.func = func;
  entry.owner = owner;
  entry.data = data;
  heap_push (self->heap, &entry);
  /* Only a new earliest call changes how long the thread sleeps. */
  if (g_array_index (self->heap, Entry, 0).sequence == entry.sequence)
    g_cond_signal (&self->cond);
  kd_mutex_unlock (&self->lock);
}

/* Any thread, idempotent: every task is due now, and so is every task
 * added later. */
void
kd_timer_hurry (KdTimer *self)
{
  kd_mutex_lock (&self->lock);
  self->hurried = TRUE;
  g_cond_signal (&self->cond);
  kd_mutex_unlock (&self->lock);
}

/* Any thread, idempotent: the thread exits once no task waits. */
void
kd_timer_stop (KdTimer *self)
{
  kd_mutex_lock (&self->lock);
  self->stopping = TRUE;
  g_cond_signal (&self->cond);
  kd_mutex_unlock (&self->lock);
}

/* Whether the calling thread is the timer's. */
gboolean
kd_timer_runs_here (KdTimer *self)
{
  return g_thread_self () == self->thread;
}

/* After kd_timer_stop(): joins the thread. */
void
kd_timer_free (KdTimer *self)
{
  g_thread_join (self->thread);
  g_assert (self->heap->len == 0);
  g_array_unref (self->heap);
  g_cond_clear (&self->cond);
  g_mutex_clear (&self->lock);
  g_free (self);
}
