/* kd-timer.c: tasks that wait for their time, on one thread
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A job that failed and will be retried waits out its backoff here, not on
 * a worker, and so do the idle keys' states and delayed jobs: the timer
 * holds calls (a function and its data: the scheduler's push of the job,
 * or of its key's mailbox with the job back at its head; the dispatcher's
 * sweep of its idle keys, one call however many keys are idle; a delayed
 * job's entry into its key) in a binary min-heap
 * ordered by due time, and its one
 * thread sleeps until the earliest is due, then makes the call outside the
 * lock. Calls due at the same time are made in the order they came. The
 * heap gives memory back as it empties (it halves once a quarter full), so
 * a burst of waiting calls does not keep its peak size.
 *
 * The thread is made with the timer, and kd_timer_new() fails with the
 * thread error if it cannot be: its owner makes it where the failure can
 * be reported (when it starts, or at the first delayed job, whose submit
 * then fails), never when a call is added.
 *
 * kd_timer_hurry() makes every call due now, and every call added later
 * too: once a dispatcher is cancelled, its waiting retries end (cancelled)
 * at once, and once it stops, idle key states go. kd_timer_stop() lets the
 * thread exit once the heap is empty, kd_timer_join() joins it, and
 * kd_timer_free() frees a joined timer; the owner stops it only when
 * nothing can be added any more.
 */

#include "config.h"

#include "kd-shutdown-private.h"
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

/* The heap's smallest allocation; below it, it never shrinks. */
#define HEAP_MIN 16

struct _KdTimer
{
  GThread     *thread;

  /* Protected by @lock */
  GMutex       lock;
  GCond        cond;
  Entry       *heap;       /* a binary min-heap of @length entries */
  guint        length;
  guint        allocated;
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
swap_entries (Entry *heap,
              guint  i,
              guint  j)
{
  Entry swap = heap[i];

  heap[i] = heap[j];
  heap[j] = swap;
}

static void
heap_push (KdTimer *self,
           Entry   *entry)
{
  guint i;

  if (self->length == self->allocated)
    {
      self->allocated = MAX (self->allocated * 2, HEAP_MIN);
      self->heap = g_renew (Entry, self->heap, self->allocated);
    }
  self->heap[self->length++] = *entry;

  for (i = self->length - 1; i > 0; )
    {
      guint parent = (i - 1) / 2;

      if (!entry_before (&self->heap[i], &self->heap[parent]))
        break;
      swap_entries (self->heap, i, parent);
      i = parent;
    }
}

/* Takes the earliest entry. The heap gives memory back once it is a
 * quarter full, so a burst of waiting calls does not keep its peak size. */
static Entry
heap_pop (KdTimer *self)
{
  Entry top = self->heap[0];
  guint i = 0;

  self->heap[0] = self->heap[--self->length];
  for (;;)
    {
      guint left = 2 * i + 1, right = left + 1, least = i;

      if (left < self->length && entry_before (&self->heap[left], &self->heap[least]))
        least = left;
      if (right < self->length && entry_before (&self->heap[right], &self->heap[least]))
        least = right;
      if (least == i)
        break;
      swap_entries (self->heap, i, least);
      i = least;
    }

  if (self->allocated > HEAP_MIN && self->length < self->allocated / 4)
    {
      self->allocated /= 2;
      self->heap = g_renew (Entry, self->heap, self->allocated);
    }

  return top;
}

/* The timer running on this thread, until its loop ended. */
static KD_THREAD_LOCAL KdTimer *current_timer;

static gpointer
timer_main (gpointer data)
{
  KdTimer *self = data;

  current_timer = self;
  kd_shutdown_thread_enter ();
  kd_mutex_lock (&self->lock);
  for (;;)
    {
      Entry *first;

      if (self->length == 0)
        {
          if (self->stopping)
            break;
          kd_cond_wait (&self->cond, &self->lock);
          continue;
        }

      first = &self->heap[0];
      if (!self->hurried && first->due_time > g_get_monotonic_time ())
        {
          kd_cond_wait_until (&self->cond, &self->lock, first->due_time);
          continue;
        }

      {
        Entry due = heap_pop (self);

        kd_mutex_unlock (&self->lock);
        due.func (due.owner, due.data);
        kd_mutex_lock (&self->lock);
      }
    }
  kd_mutex_unlock (&self->lock);

  /* Last: a shutdown left to this thread may free the timer, and it does
   * not run on the timer any more. */
  current_timer = NULL;
  kd_shutdown_thread_exit ();
  return NULL;
}

/* Starts the timer's thread; NULL with @error set if it cannot. */
KdTimer *
kd_timer_new (const char  *thread_name,
              GError     **error)
{
  KdTimer *self = g_new0 (KdTimer, 1);

  g_mutex_init (&self->lock);
  g_cond_init (&self->cond);
  self->thread = g_thread_try_new (thread_name, timer_main, self, error);
  if (self->thread == NULL)
    {
      g_mutex_clear (&self->lock);
      g_cond_clear (&self->cond);
      g_free (self);
      return NULL;
    }

  return self;
}

/* Any thread: calls @func (@owner, @data) on the timer's thread once
 * g_get_monotonic_time() reached @due_time. FALSE (and no call) if the
 * timer was stopped: only a call the owner makes from the timer's thread
 * itself can come that late. */
gboolean
kd_timer_add (KdTimer     *self,
              gint64       due_time,
              KdTimerFunc  func,
              gpointer     owner,
              gpointer     data)
{
  Entry entry;

  kd_mutex_lock (&self->lock);
  if (self->stopping)
    {
      g_assert (kd_timer_runs_here (self));
      kd_mutex_unlock (&self->lock);
      return FALSE;
    }
  entry.due_time = due_time;
  entry.sequence = self->sequence++;
  entry.func = func;
  entry.owner = owner;
  entry.data = data;
  heap_push (self, &entry);
  /* Only a new earliest call changes how long the thread sleeps. */
  if (self->heap[0].sequence == entry.sequence)
    g_cond_signal (&self->cond);
  kd_mutex_unlock (&self->lock);

  return TRUE;
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

/* For tests: the entries the heap has room for. */
guint
kd_timer_get_allocated (KdTimer *self)
{
  guint allocated;

  kd_mutex_lock (&self->lock);
  allocated = self->allocated;
  kd_mutex_unlock (&self->lock);

  return allocated;
}

/* Whether the calling thread is the timer's. */
gboolean
kd_timer_runs_here (KdTimer *self)
{
  return current_timer == self;
}

/* After kd_timer_stop(): waits until the thread made its last call and
 * exited, or, from the thread itself (finishing a shutdown as it exits,
 * see kd-shutdown.c), lets it go. Idempotent. */
void
kd_timer_join (KdTimer *self)
{
  GThread *thread = g_steal_pointer (&self->thread);

  if (thread == NULL)
    return;
  if (thread == g_thread_self ())
    g_thread_unref (thread);
  else
    g_thread_join (thread);
}

/* After kd_timer_join(). */
void
kd_timer_free (KdTimer *self)
{
  g_assert (self->thread == NULL);
  g_assert (self->length == 0);
  g_free (self->heap);
  g_cond_clear (&self->cond);
  g_mutex_clear (&self->lock);
  g_free (self);
}
