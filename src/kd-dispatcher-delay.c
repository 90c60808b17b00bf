/* kd-dispatcher-delay.c: jobs that run later
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * kd_dispatcher_submit_after() and kd_dispatcher_submit_at() accept a job
 * now and let it run once its due time came. Accepted now: it takes its
 * unit of admission at the call (never waiting for one: at the bound the
 * call fails with KD_ERROR_FULL, so a handler can schedule its key's next
 * message, and a main loop can too) and holds it while it waits. The bound
 * therefore limits waiting jobs as it limits every pending job, and with
 * them the memory they take (a job record and a timer entry each): nobody
 * can schedule without limit. A waiting job counts as pending: wait() and
 * the last unref wait for it.
 *
 * While it waits the job is in the scheduler's timer (its thread is made
 * at the first delayed job if retries and idle keys did not make it at the
 * start; if it cannot be, the submit fails with the thread error). When it
 * is due, an unkeyed job joins the scheduler's input; a keyed job joins its
 * key's mailbox (delayed_job_due(), on the timer's thread): it takes its
 * place in its key's order at its due time, behind the key's jobs accepted
 * before then and ahead of those accepted later, as a message an actor
 * sends itself for later. The timer makes calls due at the same time in
 * the order they came, so one key's jobs due together keep their call
 * order. The waiting keyed job keeps its key as a label (kd-label.c) until
 * then.
 *
 * With a per-key bound (kd_dispatcher_set_key_capacity()), a key takes at
 * most that many delayed jobs waiting at once: one more is refused with
 * KD_ERROR_FULL at its call (@delayed_per_key counts them, an entry per key
 * with any waiting, so at most the capacity's worth). A job that comes due
 * joins its key at once, counted against the bound but never waiting for
 * room, which on the timer's thread would hold up every other delayed job
 * and retry: a key then holds at most twice its bound, its own jobs and the
 * delayed ones that came due.
 *
 * Cancelling the dispatcher hurries the timer (kd_scheduler_hurry()): every
 * waiting job is due at once, joins its key without looking at the bound,
 * and ends cancelled as a worker reaches it, like every job that has not
 * started.
 */

#include "config.h"

#include "kd-dispatcher-internal.h"
#include "kd-error.h"
#include "kd-label-private.h"
#include "kd-trace-private.h"

/* With a per-key bound: takes a place among @key's waiting delayed jobs,
 * or fails with KD_ERROR_FULL if they are as many as the bound. */
static gboolean
reserve_key_place (KdDispatcher  *self,
                   const char    *key,
                   GError       **error)
{
  guint waiting;

  kd_mutex_lock (&self->delayed_lock);
  if (self->delayed_per_key == NULL)
    self->delayed_per_key = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  waiting = GPOINTER_TO_UINT (g_hash_table_lookup (self->delayed_per_key, key));
  if (waiting < self->key_capacity)
    g_hash_table_insert (self->delayed_per_key, g_strdup (key), GUINT_TO_POINTER (waiting + 1));
  kd_mutex_unlock (&self->delayed_lock);

  if (waiting < self->key_capacity)
    return TRUE;
  g_set_error (error, KD_ERROR, KD_ERROR_FULL,
               "The key already has %u delayed jobs waiting, its bound", waiting);
  return FALSE;
}

static void
release_key_place (KdDispatcher *self,
                   const char   *key)
{
  guint waiting;

  kd_mutex_lock (&self->delayed_lock);
  waiting = GPOINTER_TO_UINT (g_hash_table_lookup (self->delayed_per_key, key));
  g_assert (waiting > 0);
  if (waiting == 1)
    g_hash_table_remove (self->delayed_per_key, key);
  else
    g_hash_table_insert (self->delayed_per_key, g_strdup (key), GUINT_TO_POINTER (waiting - 1));
  kd_mutex_unlock (&self->delayed_lock);
}

/* On the timer's thread: a delayed keyed job is due, and joins its key
 * (counted against a per-key bound, without waiting for room). */
static void
delayed_job_due (gpointer owner,
                 gpointer data)
{
  KdDispatcher *self = owner;
  KdJob *job = data;
  KdScheduler *scheduler = g_atomic_pointer_get (&self->scheduler);
  char *key = g_steal_pointer (&job->label);
  KdMailbox *mailbox;

  if (self->key_capacity > 0)
    release_key_place (self, key);
  mailbox = kd_key_table_push (self->keys, key, job, self->key_capacity > 0);
  kd_label_unref (key);
  if (mailbox != NULL)
    kd_scheduler_push (scheduler, kd_mailbox_get_task (mailbox));
}

static gboolean
submit_delayed (KdDispatcher  *self,
                const char    *key,
                gpointer       item,
                KdItemKind     item_kind,
                gint64         due_time,
                GError       **error)
{
  KdScheduler *scheduler;
  KdJob *job;
  guint epoch;

  /* Made by g_object_new() rather than kd_dispatcher_new(). */
  g_return_val_if_fail (self->handler != NULL, FALSE);

  if (!kd_dispatcher_admit_job (self, KD_ADMIT_TRY, 0, &epoch, error))
    return FALSE;

  scheduler = g_atomic_pointer_get (&self->scheduler);
  if (!kd_scheduler_ensure_timer (scheduler, error) ||
      (key != NULL && self->key_capacity > 0 && !reserve_key_place (self, key, error)))
    {
      kd_dispatcher_count_rejected (self);
      kd_dispatcher_release_unit (self, KD_ADMISSION_ANY_RELEASER, epoch);
      return FALSE;
    }

  job = kd_job_new (self, item, epoch);
  job->item_kind = item_kind;
  KD_TRACE3 (job_submit, self->name, key, job);
  /* Counted before the job can end. */
  __atomic_fetch_add (&self->submitted, 1, __ATOMIC_RELAXED);
  kd_dispatcher_counters_changed (self);

  if (key == NULL)
    {
      kd_scheduler_push_at (scheduler, &job->task, due_time);
    }
  else
    {
      gboolean added;

      job->label = kd_label_new (key);
      added = kd_scheduler_call_at (scheduler, due_time, delayed_job_due, self, job);
      /* The job holds its unit: the scheduler was not shut down. */
      g_assert (added);
    }
  return TRUE;
}

/**
 * kd_dispatcher_submit_at:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @due_time: the monotonic time the job may run from, as
 *   g_get_monotonic_time() counts it; a time past runs it now
 * @error: return location for a #GError
 *
 * Submits a job that runs no earlier than @due_time. It is accepted now:
 * it takes a unit of the bound at once and holds it while it waits, so the
 * bound limits waiting jobs as it limits every pending job. A keyed job
 * joins its key when it is due, behind the key's jobs accepted before then
 * and ahead of those accepted later, as if it had been submitted at its due
 * time; jobs of one key due at the same time keep their call order.
 *
 * Never blocks: at the bound it fails with %KD_ERROR_FULL, so a handler can
 * schedule its key's next job and a main loop can schedule too. A closed
 * dispatcher refuses with %KD_ERROR_CLOSED. On failure @item is still the
 * caller's.
 *
 * A waiting job is pending: kd_dispatcher_wait() and the last unref wait
 * for it. Cancelling the dispatcher ends the waiting jobs at once,
 * cancelled, in their keys' order, through the done callback. With a
 * per-key bound (kd_dispatcher_set_key_capacity()), at most that many
 * delayed jobs of a key wait at once (one more is refused with
 * %KD_ERROR_FULL), and a job that comes due joins its key without waiting
 * for room: the key then holds at most twice its bound.
 *
 * The first delayed job of a dispatcher without retries or idle key states
 * starts the timer's thread; if it cannot be made, the call fails with that
 * error.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_submit_at (KdDispatcher  *self,
                         const char    *key,
                         gpointer       item,
                         gint64         due_time,
                         GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return submit_delayed (self, key, item, KD_ITEM_POINTER, due_time, error);
}

/**
 * kd_dispatcher_submit_after:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @delay_us: how long from now the job waits before it may run, in
 *   microseconds; 0 or less runs it now
 * @error: return location for a #GError
 *
 * kd_dispatcher_submit_at() with a due time @delay_us from now: a session
 * timeout, a retry the application decides, an actor's message to itself
 * for later.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_submit_after (KdDispatcher  *self,
                            const char    *key,
                            gpointer       item,
                            gint64         delay_us,
                            GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return submit_delayed (self, key, item, KD_ITEM_POINTER,
                         kd_due_time_after (MAX (delay_us, 0)), error);
}

/**
 * kd_dispatcher_submit_value_after:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @value: the job's item: any #GValue, copied
 * @delay_us: how long from now the job waits before it may run, in
 *   microseconds; 0 or less runs it now
 * @error: return location for a #GError
 *
 * kd_dispatcher_submit_after() with a value for the item, as
 * kd_dispatcher_submit_value(): the waiting job holds a copy of @value,
 * which the dispatcher frees once the job ended. A refused submit keeps no
 * copy.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_submit_value_after (KdDispatcher  *self,
                                  const char    *key,
                                  const GValue  *value,
                                  gint64         delay_us,
                                  GError       **error)
{
  GValue *item;

  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (G_IS_VALUE (value), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  item = kd_item_new_value (value);
  if (submit_delayed (self, key, item, KD_ITEM_VALUE, kd_due_time_after (MAX (delay_us, 0)),
                      error))
    return TRUE;

  kd_item_free_value (item);
  return FALSE;
}
