/* kd-dispatcher-failure.c: what happens when a handler fails
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * run_job() hands a handler's failure here (kd_dispatcher_job_failed()),
 * and the dispatcher's failure settings decide:
 *
 *  - Retry (kd_dispatcher_set_retry()): a job that fails with attempts
 *    left does not end, and its unit stays taken. A keyed job goes back to
 *    the head of its mailbox with the jobs of its batch behind it, and the
 *    mailbox, out of the scheduler, waits in the scheduler's timer until
 *    the retry is due (kd_dispatcher_retry_later(), by the job's worker or
 *    the thread that returned it deferred) (kd_dispatcher_retry_due_time(): the initial delay,
 *    doubled at each attempt, at most the maximum), so the key keeps its
 *    order and no worker waits; an unkeyed job waits there alone, but for
 *    an ordered stage's, which waits on its worker (see run_task()),
 *    unless it was returned after its deferring handler returned (nothing
 *    of its key waits for room then).
 *  - A job that failed for good goes to the dead-letter function, then
 *    ends failed.
 *  - With KD_FAILURE_PARK its key parks: the mailbox, with the rest of its
 *    batch put back, stays in the key table out of the scheduler and
 *    enters the parked keys (KdParkedKeys, kd-parked-keys.c) before the
 *    failed job ends and its unit is released. Whoever takes it out of
 *    parking (resume, drop, cancellation, the last unref) becomes its
 *    runner: it schedules it, or reaps it if it is empty (unpark()).
 *    Cancellation hurries the timer and drops the parked keys, so every
 *    job still ends.
 */

#include "config.h"

#include "kd-dispatcher-internal.h"
#include "kd-trace-private.h"

static gboolean park_begin (KdDispatcher *self,
                            KdMailbox    *mailbox);

/* @job's handler failed with *@error (never NULL, see
 * kd_dispatcher_handler_outcome()): the failure policy decides. On
 * JOB_RETRY the error was dropped and the job does not end; otherwise it
 * goes to the dead-letter function, and on JOB_PARK its key parks (*@parked
 * tells whether it did, see park_begin()) with @behind back in its
 * mailbox. */
JobOutcome
kd_dispatcher_job_failed (KdDispatcher   *self,
                          KdWorkerStats  *stats,
                          KdJob          *job,
                          GError        **error,
                          KdJob         **behind,
                          guint           n_behind,
                          gboolean       *parked)
{
  /* Not once the dispatcher is cancelled, nor once the handler passed its
   * item on: a retry would run without it. */
  if (job->attempt < self->max_attempts && job->item_kind != KD_ITEM_HANDED_OVER &&
      !g_cancellable_is_cancelled (self->cancellable))
    {
      g_debug ("dispatcher %p: attempt %u of a job failed, retrying: %s",
               (gpointer) self, job->attempt, (*error)->message);
      KD_TRACE4 (job_retry, self->name, KD_TRACE_KEY (job), job, job->attempt);
      g_clear_error (error);
      kd_dispatcher_count (self, stats, &stats->retried);
      return JOB_RETRY;
    }

  if (self->dead_letter != NULL)
    self->dead_letter (job, *error, self->dead_letter_data);

  /* Parked before the job ends: its done callback sees the key parked,
   * and may resume or drop it. */
  if (job->mailbox != NULL && self->failure_policy == KD_FAILURE_PARK)
    {
      kd_key_table_put_back (self->keys, job->mailbox, behind, n_behind);
      *parked = park_begin (self, job->mailbox);
      return JOB_PARK;
    }

  return JOB_ENDED;
}

/* When a job that failed on its attempt runs again: the initial delay,
 * doubled at each attempt, at most the maximum. */
gint64
kd_dispatcher_retry_due_time (KdDispatcher *self,
                              KdJob        *job)
{
  gint64 delay = self->retry_initial_us;
  guint i;

  for (i = 1; i < job->attempt && delay > 0 && delay < self->retry_max_us; i++)
    delay = delay > self->retry_max_us / 2 ? self->retry_max_us : delay * 2;

  return kd_due_time_after (MIN (delay, self->retry_max_us));
}

/* A job that failed with attempts left, @jobs[0], waits for its retry:
 * keyed, back at the head of its @mailbox with the rest of @jobs (its
 * batch behind it) ahead of the key's later jobs, the mailbox out of the
 * scheduler, in its timer until the retry is due, so the key keeps its
 * order and no worker waits; unkeyed, alone in the timer. By the job's
 * runner: its worker, or the thread that returned it deferred. */
void
kd_dispatcher_retry_later (KdDispatcher *self,
                           KdScheduler  *scheduler,
                           KdMailbox    *mailbox,
                           KdJob       **jobs,
                           guint         n)
{
  gint64 due_time = kd_dispatcher_retry_due_time (self, jobs[0]);

  if (mailbox != NULL)
    {
      kd_key_table_put_back (self->keys, mailbox, jobs, n);
      kd_scheduler_push_at (scheduler, kd_mailbox_get_task (mailbox), due_time);
    }
  else
    {
      kd_scheduler_push_at (scheduler, &jobs[0]->task, due_time);
    }
}

/* Takes a parked mailbox out of parking, which makes the caller its runner:
 * if it has jobs (if @drop, marked to end cancelled) it is scheduled; if
 * not it is reaped here. */
static void
unpark (KdDispatcher *self,
        KdMailbox    *mailbox,
        gboolean      drop)
{
  if (mailbox->has_state)
    kd_dispatcher_end_key_state (self, mailbox);

  if (kd_key_table_unpark (self->keys, mailbox, drop))
    return;

  /* It has jobs, so their units keep the workers alive. */
  kd_scheduler_push (g_atomic_pointer_get (&self->scheduler), kd_mailbox_get_task (mailbox));
}

/* By the runner of @mailbox, whose job failed for good, before the job
 * ends: the key parks (as finishing, until kd_dispatcher_park_end()).
 * FALSE if keys no longer park. */
static gboolean
park_begin (KdDispatcher *self,
            KdMailbox    *mailbox)
{
  if (!kd_parked_keys_add (&self->parked, mailbox))
    return FALSE;

  g_debug ("dispatcher %p: key \"%s\" parked after a failure", (gpointer) self,
           kd_mailbox_get_key (mailbox));
  KD_TRACE2 (key_park, self->name, kd_mailbox_get_key (mailbox));
  return TRUE;
}

/* By the same runner once the failed job ended: the key stays parked, or
 * (if it was resumed or dropped meanwhile, or keys no longer park) the
 * runner unparks it itself: without a main context, the key's next job
 * never starts before the failed one's done callback returned (with one,
 * the job "ended" once its callback was queued for the context). */
void
kd_dispatcher_park_end (KdDispatcher *self,
                        KdMailbox    *mailbox,
                        gboolean      parked)
{
  guint request = parked ? kd_parked_keys_settle (&self->parked, mailbox) : KD_PARK_DROP;

  if (request != KD_PARK_NONE)
    unpark (self, mailbox, request == KD_PARK_DROP);
}

/* Takes @key out of parking, to resume it or (@drop) drop its jobs. FALSE
 * if it was not parked. */
static gboolean
take_parked (KdDispatcher *self,
             const char   *key,
             gboolean      drop)
{
  KdMailbox *mailbox;

  if (!kd_parked_keys_take (&self->parked, self->keys, key, drop, &mailbox))
    return FALSE;

  /* NULL: its runner still ends the failed job, and unparks it after. */
  if (mailbox != NULL)
    unpark (self, mailbox, drop);
  return TRUE;
}

/* Cancelled or disposing: no key parks any more, and the parked ones are
 * dropped, so that every job ends. */
void
kd_dispatcher_drop_parked (KdDispatcher *self)
{
  GPtrArray *parked = kd_parked_keys_close (&self->parked);
  guint i;

  for (i = 0; i < parked->len; i++)
    unpark (self, parked->pdata[i], TRUE);
  g_ptr_array_unref (parked);
}

/**
 * kd_dispatcher_set_retry:
 * @self: a dispatcher
 * @max_attempts: how many times a job may run, at least 1 (1: no retry)
 * @initial_delay_us: the wait before the first retry, in microseconds
 * @max_delay_us: the longest wait between two attempts, at least
 *   @initial_delay_us
 *
 * Retries failed jobs: a job whose handler fails runs again after
 * @initial_delay_us, then after twice that, and so on (at most
 * @max_delay_us), until it completes or ran @max_attempts times; only then
 * does it end (failed: the done callback and the dead-letter function get
 * the last attempt's error). The handler learns which attempt it runs with
 * kd_job_get_attempt(); the errors of earlier attempts are dropped.
 *
 * A keyed job keeps its place: the key's later jobs wait behind its retry,
 * so its order holds, while other keys run on. A waiting retry holds no
 * worker thread (a timer thread holds it), but it still counts as pending
 * against the bound and for kd_dispatcher_wait(). Unkeyed jobs are retried
 * the same way, each on its own, but in a pipeline's %KD_STAGE_ORDERED
 * stage, where a retry waits on its worker: the items of its key that
 * entered after it may be waiting for it to end (see
 * kd_pipeline_set_stage_mode()). A deferred job returned after its handler
 * returned waits for its retry in the timer there too: nothing of its key
 * waits for room while it is deferred.
 *
 * Once the dispatcher is cancelled no job is retried: those waiting for a
 * retry end at once with %G_IO_ERROR_CANCELLED. A job whose handler passed
 * its item on with kd_job_emit() is not retried either; in a pipeline
 * stage, a retried handler emits again what it emitted before it failed.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_retry (KdDispatcher *self,
                         guint         max_attempts,
                         gint64        initial_delay_us,
                         gint64        max_delay_us)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (max_attempts >= 1);
  g_return_if_fail (initial_delay_us >= 0);
  g_return_if_fail (max_delay_us >= initial_delay_us);

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC))
    return;

  self->max_attempts = max_attempts;
  self->retry_initial_us = initial_delay_us;
  self->retry_max_us = max_delay_us;
}

/**
 * kd_dispatcher_set_failure_policy:
 * @self: a dispatcher
 * @policy: what a key does after one of its jobs failed
 *
 * Chooses what happens to a key once one of its jobs ended failed (after
 * its last attempt). With %KD_FAILURE_PARK the key parks: its later jobs,
 * and those submitted meanwhile, stay queued untouched (still pending, so
 * kd_dispatcher_wait() waits for them) until kd_dispatcher_resume_key()
 * runs them or kd_dispatcher_drop_key() ends them cancelled. Other keys run
 * on. Cancelling the dispatcher, or dropping its last reference, drops
 * every parked key. The default, %KD_FAILURE_CONTINUE, runs the key's next
 * job. In a pipeline stage, a parked key keeps the stage, and so
 * kd_pipeline_close() and kd_pipeline_wait(), from draining until it is
 * resumed or dropped.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_failure_policy (KdDispatcher    *self,
                                  KdFailurePolicy  policy)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (policy == KD_FAILURE_CONTINUE || policy == KD_FAILURE_PARK);

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC))
    return;

  self->failure_policy = policy;
}

/**
 * kd_dispatcher_get_failure_policy:
 * @self: a dispatcher
 *
 * Gets what a key does after one of its jobs failed, as set by
 * kd_dispatcher_set_failure_policy().
 *
 * Returns: the failure policy
 *
 * Since: 0.1
 */
KdFailurePolicy
kd_dispatcher_get_failure_policy (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), KD_FAILURE_CONTINUE);

  return self->failure_policy;
}

/**
 * kd_dispatcher_set_dead_letter_func:
 * @self: a dispatcher
 * @func: (nullable) (scope notified) (closure user_data) (destroy user_data_free):
 *   receives each job that failed for good
 * @user_data: data for @func
 * @user_data_free: (nullable): frees @user_data once the dispatcher is finalized
 *
 * Sets the function that receives every job that ended failed after its
 * last attempt, on the worker that ran it, before the done callback (see
 * #KdDeadLetterFunc). Jobs that end cancelled never reach it.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_dead_letter_func (KdDispatcher     *self,
                                    KdDeadLetterFunc  func,
                                    gpointer          user_data,
                                    GDestroyNotify    user_data_free)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC))
    return;

  if (self->dead_letter_data_free != NULL)
    self->dead_letter_data_free (self->dead_letter_data);

  self->dead_letter = func;
  self->dead_letter_data = user_data;
  self->dead_letter_data_free = user_data_free;
}

/**
 * kd_dispatcher_resume_key:
 * @self: a dispatcher
 * @key: a key parked after a failure
 *
 * Lets a parked key run again (see %KD_FAILURE_PARK): its queued jobs run
 * in their order, from the one after the job that failed.
 *
 * Thread-safe; may be called from a handler or a done callback.
 *
 * Returns: %TRUE if @key was parked
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_resume_key (KdDispatcher *self,
                          const char   *key)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (key != NULL, FALSE);

  return take_parked (self, key, FALSE);
}

/**
 * kd_dispatcher_drop_key:
 * @self: a dispatcher
 * @key: a key parked after a failure
 *
 * Unparks a parked key and hands back its queued jobs: each ends with
 * %G_IO_ERROR_CANCELLED through the done callback and the item-free
 * function, in the key's order, without running. Jobs of the key submitted
 * after this call run normally (a job submitted at the same time may go
 * either way).
 *
 * Thread-safe; may be called from a handler or a done callback.
 *
 * Returns: %TRUE if @key was parked
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_drop_key (KdDispatcher *self,
                        const char   *key)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (key != NULL, FALSE);

  return take_parked (self, key, TRUE);
}

/**
 * kd_dispatcher_list_parked_keys:
 * @self: a dispatcher
 *
 * Lists the keys parked after a failure (see %KD_FAILURE_PARK), in no
 * particular order.
 *
 * Thread-safe.
 *
 * Returns: (transfer full) (array zero-terminated=1): the parked keys; free
 *   with g_strfreev()
 *
 * Since: 0.1
 */
char **
kd_dispatcher_list_parked_keys (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), NULL);

  return kd_parked_keys_list (&self->parked);
}
