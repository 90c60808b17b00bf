/* kd-dispatcher.c: the keyed dispatcher with 2-tier fan-out
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * KdDispatcher is the front door. It runs jobs on a bounded set of worker
 * threads (KdScheduler) and guarantees:
 *
 *  - Jobs with the same key run one at a time, in the order they were
 *    accepted. Each key with work has a mailbox (KdMailbox, its queue of
 *    jobs) in the key table (KdKeyTable, sharded KdKeyMaps); the mailbox,
 *    not a thread, is the key's actor. A ready mailbox is a task of the
 *    scheduler: the worker that takes it runs up to MAILBOX_BUDGET of its
 *    jobs, then puts it back if it still has work, at the end of the input
 *    queue, so a hot key cannot starve the others. A mailbox that runs
 *    empty is reaped: it stays in the table, dormant, for the key's next
 *    job, and the table bounds how many dormant and idle mailboxes it
 *    keeps (see kd-key-table.c); the thread count never depends on the
 *    number of keys.
 *  - Unkeyed jobs fan out over every worker. A plain one (no group, no
 *    async result, no pipeline's label or ticket) travels as its item in
 *    the scheduler's ring of values, and the worker that takes it makes its
 *    record (job_for_value()), so the record stays on the processor that
 *    runs it; with the ring full, or with the job_submit probe on (whose
 *    argument is the record), it is a record from the start. Records are
 *    tasks themselves, through the scheduler's input queue and its worker
 *    groups (kd_dispatcher_set_fanout(); see kd-scheduler.c).
 *  - At most `capacity` jobs are pending (accepted and not yet ended). The
 *    bound, closing and the wait barrier live in one atomic word
 *    (KdAdmission): a submit that finds the bound reached blocks, fails
 *    with KD_ERROR_FULL or times out, and a closed dispatcher refuses with
 *    KD_ERROR_CLOSED. A refused item stays the caller's: nothing is queued
 *    and no callback runs for it.
 *  - Every accepted job ends exactly once: completed, failed (the handler's
 *    GError reaches the done callback) or cancelled; a job its handler
 *    deferred ends when the application returns it, its key held and its
 *    unit taken until then (kd-dispatcher-defer.c). Then the done callback
 *    runs, then the item-free function, then the job's unit of admission is
 *    released. With a main context set, the done callback and item-free run
 *    there (KdDelivery), in per-key order, and the unit is released as soon
 *    as the handler returned.
 *  - Cancelling the cancellable closes the dispatcher; every job that has
 *    not started yet ends cancelled when a worker reaches it, so queued jobs
 *    are handed back in their per-key order and the accounting still holds.
 *    Running handlers see the cancellable cancelled at once.
 *  - Once the dispatcher is closed and nothing is pending, the workers exit;
 *    wait() and the last unref join them.
 *  - A job submitted through a KdGroup is a job like any other that also
 *    tells its group (kd-group-private.h) when it is about to be queued and
 *    when it ended, and ends cancelled, as workers reach it, if its group
 *    was cancelled before it started.
 *
 * The life of a keyed job: submit acquires a unit of admission, and the key
 * table appends the job to the key's mailbox under the key's shard lock,
 * reviving or creating the mailbox if the key had no work; such a mailbox
 * is handed to the scheduler. A worker pops a batch of the mailbox's jobs
 * and runs them (run_job()); after the batch, under the shard lock, it
 * reaps the mailbox if it is empty (producers push under the same lock, so
 * no job can slip in unseen), and only then releases the last job's unit,
 * so that live_keys is 0 when wait() returns.
 *
 * This file holds that path, start, wait, close, cancellation and the last
 * unref. The rest of the dispatcher is in files of its own, listed in
 * kd-dispatcher-internal.h, which the path calls at their seams: run_job()
 * hands a handler's failure to kd-dispatcher-failure.c (retries, dead
 * letters, parked keys), and a deferred job to kd-dispatcher-defer.c
 * (settle_deferred(); run_mailbox() releases the unit a returned one's
 * mailbox carries); run_mailbox() ends a key's state and its idle
 * spells through kd-dispatcher-keys.c; release_unit() admits the async
 * submissions waiting for room through kd-dispatcher-async.c while any
 * wait. A per-key bound (set in kd-dispatcher-keys.c) is the key table's,
 * which push_job() hands it.
 *
 * Workers never block on their own dispatcher: a submit from one of its own
 * workers that finds the bound reached fails with KD_ERROR_FULL instead of
 * waiting for a slot that only workers can free.
 *
 * Last unref: close, wait for every accepted job to end, join the workers,
 * flush the main-context deliveries, run the destroy notifies. If it happens
 * on one of the dispatcher's own threads (inside a handler, or a done
 * callback on a worker or on the main context) it cannot wait for itself:
 * kd_shutdown_dispose() then closes it, drops the parked keys and finishes
 * the rest later, as that worker exits, or on a thread of its own for a
 * main context (see kd-shutdown.c).
 *
 * Threads are made when the workers start (kd_dispatcher_start() or the
 * first submit): the workers, and the timer's if jobs may be retried or key
 * states idle. If one cannot be made, that call fails with the thread
 * error and the dispatcher stays unstarted. Later, a resize makes threads
 * and reports a failure to its caller; a start on demand after idle
 * workers exited costs only parallelism if it fails, since one worker
 * always stays (kd-dispatcher-workers.c); a delayed job's first submit
 * makes the timer's and fails if it cannot; a shutdown finished from a
 * main context makes one, and if it cannot, finishes from an idle source
 * of that context instead (see kd-shutdown.c).
 *
 * Locks. The dispatcher's own are @start_lock (starting the workers,
 * making the delivery and the counters' notifier; taken here, in
 * kd-dispatcher-properties.c and kd-dispatcher-stage.c), @async_lock
 * (the async submissions waiting for room, kd-dispatcher-async.c),
 * @delayed_lock (how many delayed jobs wait for each key, with a per-key
 * bound, kd-dispatcher-delay.c; taken alone) and @returning_lock (the
 * threads ending a returned deferred job, kd-dispatcher-defer.c; taken
 * alone). Its
 * components have theirs; docs/internals.md lists every lock of kdispatch
 * and every nesting. None is held while a handler, a done callback, an
 * item-free or a destroy notify runs. One nesting starts here:
 *
 *  - @async_lock is held while a waiting submission is admitted or
 *    refused: its job is queued (a shard's lock, the scheduler's), its
 *    result is queued (a delivery's), it is counted (the notifier's, and
 *    @start_lock for the first count); a group's submission its key
 *    refuses is taken back from the group (the group's lock). A unit it
 *    gives back is released
 *    once the lock is let go: a release may wake submitters and waiters,
 *    complete an async wait, or stop the dispatcher and so close a
 *    pipeline's next stage. @async_lock is taken under no other lock.
 *
 * cancel() runs in the thread that cancels, under no lock (see
 * kd-cancel-watch.c). Unparking an empty parked key there frees its key
 * state; if that drops the last reference, the dispatcher is disposed in
 * that thread once cancel() returned.
 */

#include "config.h"

#include <gio/gio.h>

#include "kd-dispatcher-internal.h"
#include "kd-error.h"
#include "kd-trace-private.h"

/* The most jobs of one key a worker runs before other tasks go first. */
#define MAILBOX_BUDGET 64

/* How long the last unref waits for deferred jobs before it says so. */
#define DEFERRED_PATIENCE_US (2 * G_TIME_SPAN_SECOND)

/**
 * KdDispatcher:
 *
 * Runs jobs on a bounded set of worker threads: jobs with the same key one
 * at a time, in the order they were submitted; jobs without a key in
 * parallel, through one bounded queue fanned out to several worker groups
 * and their workers.
 *
 * A dispatcher is created with a handler ([ctor@Kd.Dispatcher.new]) and
 * configured before its first submit: the bound on pending jobs
 * ([method@Kd.Dispatcher.set_capacity]), a done callback and the main
 * context it runs in, an item-free function, a cancellable. Jobs are
 * submitted with [method@Kd.Dispatcher.submit] (blocking at the bound),
 * [method@Kd.Dispatcher.try_submit], [method@Kd.Dispatcher.submit_timeout]
 * or, from a main loop, [method@Kd.Dispatcher.submit_async], which never
 * blocks.
 *
 * Every accepted job ends exactly once: completed, failed with the
 * handler's error, or cancelled (handed back through the done callback and
 * the item-free function). [method@Kd.Dispatcher.wait] returns when the
 * jobs accepted before the call have ended; [method@Kd.Dispatcher.close]
 * refuses new ones. See the guides: [Keys and order](keys-and-order.html),
 * [The bound](the-bound.html), [Shutdown and cancellation](shutdown.html)
 * and [Main-loop delivery](main-loop.html).
 *
 * Since: 0.1
 */
G_DEFINE_FINAL_TYPE (KdDispatcher, kd_dispatcher, G_TYPE_OBJECT)

/* The dispatcher whose shutdown (shutdown_sync()) runs on this thread, if
 * any: the key-state frees of the parked keys it drops run there. */
static KD_THREAD_LOCAL KdDispatcher *shutting_down;

/* Whether the calling thread is one of this dispatcher's: a worker, its
 * timer's, or the one running its shutdown. */
gboolean
kd_dispatcher_runs_here (KdDispatcher *self)
{
  KdScheduler *scheduler = g_atomic_pointer_get (&self->scheduler);

  return shutting_down == self || (scheduler != NULL && kd_scheduler_runs_here (scheduler));
}

/* Closed and drained, once: the workers may go, and a pipeline closes the
 * stage after this one. */
void
kd_dispatcher_shutdown_scheduler (KdDispatcher *self)
{
  KdScheduler *scheduler = g_atomic_pointer_get (&self->scheduler);

  g_debug ("dispatcher %p (%s): closed and drained, stopping workers", (gpointer) self,
           self->name != NULL ? self->name : "unnamed");
  /* Before the timer is hurried: the idle keys' sweep ends every spell. */
  g_atomic_int_set (&self->stopped, TRUE);
  if (scheduler != NULL)
    kd_scheduler_shutdown (scheduler);
  if (self->stage_hooks.drained != NULL)
    self->stage_hooks.drained (self->stage_data);
}

/* Gives back a unit of admission: the last one of a closed dispatcher
 * stops it; otherwise async submissions waiting for room may go in. The
 * release is sequentially consistent and so is the look at @n_waiting: a
 * submission queued meanwhile either is seen here or sees the room itself
 * (see kd_dispatcher_submit_async()). */
static void
release_unit (KdDispatcher *self,
              guint         releaser,
              guint         epoch)
{
  if (kd_admission_release (&self->admission, releaser, epoch))
    kd_dispatcher_shutdown_scheduler (self);
  else if (G_UNLIKELY (__atomic_load_n (&self->n_waiting, __ATOMIC_SEQ_CST) > 0))
    kd_dispatcher_admit_waiting (self);
  kd_dispatcher_counters_changed (self);
}

void
kd_dispatcher_release_unit (KdDispatcher *self,
                            guint         releaser,
                            guint         epoch)
{
  release_unit (self, releaser, epoch);
}

static void
release_job (KdDispatcher *self,
             KdWorker     *worker,
             guint         epoch)
{
  release_unit (self, kd_worker_get_index (worker), epoch);
}

/* Runs the done callback and item-free of an ended job, queues the callback
 * of an async submission, and frees the job. @error: transfer full.
 * Inlined: it is on every job's path. */
G_ALWAYS_INLINE static inline void
finish_job (KdDispatcher *self,
            KdJob        *job,
            GError       *error)
{
  if (self->done != NULL)
    self->done (job, error, self->done_data);

  kd_item_free (job->item_kind, job->item, self->item_free);

  /* A job on its way through a main context holds its mailbox, for the key. */
  if (self->delivery != NULL && job->mailbox != NULL)
    kd_mailbox_unref (job->mailbox);

  if (job->result != NULL)
    kd_submit_result_complete (g_steal_pointer (&job->result), g_steal_pointer (&error));
  if (G_UNLIKELY (error != NULL))
    g_error_free (error);

  kd_job_free (job);
}

/* finish_job(), for the stage's hand-back. */
void
kd_dispatcher_finish_job (KdDispatcher *self,
                          KdJob        *job,
                          GError       *error)
{
  finish_job (self, job, error);
}

/* On the main context's thread. */
static void
deliver_job (KdTask   *task,
             gpointer  user_data)
{
  KdDispatcher *self = user_data;
  KdJob *job = (KdJob *) task;
  KdGroupState *group = job->group;
  GError *error = g_steal_pointer (&job->error);

  KD_TRACE3 (job_deliver, self->name, KD_TRACE_KEY (job), job);
  finish_job (self, job, error);
  /* Its done callback may have looked at the group's cancellable. */
  if (G_UNLIKELY (group != NULL))
    kd_group_state_unref (group);
}

/* Why @job ends without running: @who ("The dispatcher", ...) was
 * cancelled before its first attempt, or while it waited for a retry. */
static GError *
cancelled_error (KdJob      *job,
                 const char *who)
{
  return g_error_new (G_IO_ERROR, G_IO_ERROR_CANCELLED,
                      job->attempt == 0 ? "%s was cancelled before the job ran"
                                        : "%s was cancelled while the job waited for a retry",
                      who);
}

/* How a job that ended counts in its group. */
static KdGroupEnd
group_end (KdWorkerStats *stats,
           guint64       *counter)
{
  return counter == &stats->completed ? KD_GROUP_COMPLETED
         : counter == &stats->failed ? KD_GROUP_FAILED
         : KD_GROUP_CANCELLED;
}

/* One more job ended: in @stats, a worker's own, or (@shared) the
 * dispatcher's @other_stats, for a job returned on another thread. Inlined
 * where the caller says which, so that a worker pays no test. */
G_ALWAYS_INLINE static inline void
count_ended (KdWorkerStats *stats,
             guint64       *counter,
             gboolean       shared)
{
  if (shared)
    __atomic_fetch_add (counter, 1, __ATOMIC_RELEASE);
  else
    kd_dispatcher_count_ended (counter);
}

/* Ends @job: the end probe and hook, its group, its done callback and
 * item-free (or their delivery to the main context), its key's count; a
 * key that parks is settled. @error: transfer full; @shared as for
 * count_ended(). Inlined: it is on every job's path. */
G_ALWAYS_INLINE static inline void
end_job (KdDispatcher  *self,
         KdWorkerStats *stats,
         KdJob         *job,
         GError        *error,
         guint64       *counter,
         JobOutcome     outcome,
         gboolean       parked,
         gboolean       shared)
{
  KdMailbox *mailbox = job->mailbox;
  KdGroupState *group = job->group;

  KD_TRACE4 (job_end, self->name, KD_TRACE_KEY (job), job,
             counter == &stats->completed ? 0 : counter == &stats->failed ? 1 : 2);
  if (self->stage_hooks.ended != NULL)
    self->stage_hooks.ended (job, self->stage_data);
  if (G_UNLIKELY (group != NULL && error != NULL))
    kd_group_state_note_error (group, error);

  if (self->delivery != NULL)
    {
      job->error = error;
      if (job->mailbox != NULL)
        kd_mailbox_ref (job->mailbox);
      count_ended (stats, counter, shared);
      /* Ended for its group once its handler returned; the job keeps its
       * reference to the group's state for its done callback
       * (deliver_job()). */
      if (G_UNLIKELY (group != NULL))
        kd_group_state_job_ended (group, group_end (stats, counter));
      kd_delivery_push (self->delivery, &job->task);
    }
  else
    {
      finish_job (self, job, error);
      count_ended (stats, counter, shared);
      /* Once its done callback ran; then the job's reference goes. */
      if (G_UNLIKELY (group != NULL))
        {
          kd_group_state_job_ended (group, group_end (stats, counter));
          kd_group_state_unref (group);
        }
    }

  /* Before the mailbox can be reaped: its count must be right if a
   * producer revives it. */
  if (mailbox != NULL && self->key_capacity > 0)
    kd_key_table_job_ended (self->keys, mailbox);

  if (outcome == JOB_PARK)
    {
      g_assert (mailbox != NULL);   /* only keyed jobs park */
      kd_dispatcher_park_end (self, mailbox, parked);
    }
}

/* end_job() for a job that ends without running (cancelled), out of line:
 * a second copy of end_job() in run_job() cost every job's run a longer
 * prologue. */
__attribute__ ((noinline)) static void
end_unrun (KdDispatcher  *self,
           KdWorkerStats *stats,
           KdJob         *job,
           GError        *error,
           guint64       *counter)
{
  end_job (self, stats, job, error, counter, JOB_ENDED, FALSE, FALSE);
}

/* @job ran and ended with @error (transfer full; NULL: it completed; see
 * kd_dispatcher_handler_outcome()), which the failure policy judges. Ends
 * it, unless it will be retried; @behind as for run_job(), @shared as for
 * count_ended(). Inlined: it is on every job's path. */
G_ALWAYS_INLINE static inline JobOutcome
job_returned (KdDispatcher  *self,
              KdWorkerStats *stats,
              KdJob         *job,
              GError        *error,
              KdJob        **behind,
              guint          n_behind,
              gboolean       shared)
{
  JobOutcome outcome = JOB_ENDED;
  gboolean parked = FALSE;
  guint64 *counter;

  if (G_LIKELY (error == NULL))
    {
      counter = &stats->completed;
    }
  else
    {
      outcome = kd_dispatcher_job_failed (self, stats, job, &error, behind, n_behind, &parked);
      if (outcome == JOB_RETRY)
        return JOB_RETRY;
      counter = &stats->failed;
    }

  end_job (self, stats, job, error, counter, outcome, parked, shared);
  return outcome;
}

/* job_returned(), for a deferred job's return on another thread
 * (kd-dispatcher-defer.c), counted in @other_stats. */
JobOutcome
kd_dispatcher_job_returned (KdDispatcher  *self,
                            KdJob         *job,
                            GError        *error)
{
  return job_returned (self, self->other_stats, job, error, NULL, 0, TRUE);
}

/* A handler's return (@completed, and @error, transfer full) as the job's
 * outcome: NULL if it completed, else its error. The two mistakes a
 * handler can make are said in a critical: TRUE with an error (dropped),
 * FALSE without one (a generic one stands in). */
GError *
kd_dispatcher_handler_outcome (gboolean  completed,
                               GError   *error)
{
  if (completed && G_UNLIKELY (error != NULL))
    {
      g_critical ("A kdispatch handler returned TRUE but set an error: %s", error->message);
      g_clear_error (&error);
    }
  else if (!completed && G_UNLIKELY (error == NULL))
    {
      g_critical ("A kdispatch handler returned FALSE without setting an error");
      error = g_error_new_literal (G_IO_ERROR, G_IO_ERROR_FAILED, "The handler failed without saying why");
    }
  return error;
}

/* @job's handler deferred it, and what its key needs is done (the rest of
 * its batch put back): unless it was returned already, it is out, and
 * whoever returns it ends it (JOB_DEFERRED). If it was, it ends here, as
 * if its handler had returned so. */
__attribute__ ((noinline)) static JobOutcome
settle_deferred (KdDispatcher  *self,
                 KdWorkerStats *stats,
                 KdJob         *job)
{
  GError *error = NULL;

  if (!kd_dispatcher_settle_deferred (self, job, &error))
    return JOB_DEFERRED;
  return job_returned (self, stats, job, error, NULL, 0, FALSE);
}

/* Runs @job's handler, or ends it cancelled if the dispatcher was cancelled
 * before it started; then ends it, unless it will be retried or its handler
 * deferred it (JOB_DEFERRED: the caller settles it, see settle_deferred()).
 * @behind: the jobs of @job's batch after it, which go back to the mailbox
 * if the key parks. The caller releases its unit of admission (saved
 * beforehand: @job may be gone on return) unless it will be retried or is
 * deferred. */
static JobOutcome
run_job (KdDispatcher  *self,
         KdWorkerStats *stats,
         KdJob         *job,
         KdJob        **behind,
         guint          n_behind)
{
  KdGroupState *group = job->group;
  GError *error = NULL;
  guint64 *counter;
  gboolean completed;

  /* The cancellable itself, not our handler's flag: cancellation counts
   * from the moment g_cancellable_cancel() marks it, even while other
   * ::cancelled handlers run before ours. */
  if (G_UNLIKELY (g_cancellable_is_cancelled (self->cancellable)))
    {
      error = cancelled_error (job, "The dispatcher");
      counter = &stats->cancelled;
    }
  else if (G_UNLIKELY (job->result != NULL && kd_submit_result_is_cancelled (job->result)))
    {
      error = g_error_new_literal (G_IO_ERROR, G_IO_ERROR_CANCELLED,
                                   "The submission was cancelled before the job ran");
      counter = &stats->cancelled;
    }
  else if (G_UNLIKELY (group != NULL && kd_group_state_is_cancelled (group)))
    {
      error = cancelled_error (job, "The job's group");
      counter = &stats->cancelled;
    }
  else if (G_UNLIKELY (job->dropped))
    {
      error = g_error_new_literal (G_IO_ERROR, G_IO_ERROR_CANCELLED,
                                   "The job's key was dropped while it was parked");
      counter = &stats->cancelled;
    }
  else
    {
      /* A key's actor state is made when the key's first job runs. */
      if (self->key_state_new != NULL && job->mailbox != NULL && !job->mailbox->has_state)
        {
          job->mailbox->state = self->key_state_new (kd_mailbox_get_key (job->mailbox),
                                                     self->key_state_data);
          job->mailbox->has_state = TRUE;
        }

      job->attempt++;
      KD_TRACE4 (job_start, self->name, KD_TRACE_KEY (job), job, job->attempt);
      /* Its handler runs in the handler context: the job is deferred to
       * it (kd-dispatcher-context.c). */
      if (G_UNLIKELY (self->handler_context != NULL))
        {
          kd_dispatcher_hand_to_context (self, job);
          return JOB_DEFERRED;
        }
      /* The defer word is this thread's until the handler defers the job
       * (kd_job_defer(), on this thread): until then no other thread
       * reads or writes it, and relaxed accesses do. */
      __atomic_store_n (&stats->running, 1, __ATOMIC_RELAXED);
      __atomic_store_n (&job->defer, KD_DEFER_RUNNING, __ATOMIC_RELAXED);
      completed = self->handler (job, self->handler_data, &error);
      __atomic_store_n (&stats->running, 0, __ATOMIC_RELAXED);

      /* Deferred: it ends when returned (the caller settles it). */
      if (G_UNLIKELY (__atomic_load_n (&job->defer, __ATOMIC_RELAXED) != KD_DEFER_RUNNING))
        {
          g_atomic_int_and (&job->defer, ~KD_DEFER_RUNNING);
          kd_dispatcher_deferring_handler_returned (completed, error);
          return JOB_DEFERRED;
        }
      __atomic_store_n (&job->defer, 0, __ATOMIC_RELAXED);

      return job_returned (self, stats, job, kd_dispatcher_handler_outcome (completed, error),
                           behind, n_behind, FALSE);
    }

  end_unrun (self, stats, job, error, counter);
  return JOB_ENDED;
}

/* After run_mailbox() ran jobs[@i] of its batch of *@n, which did not end
 * (@outcome): FALSE if the mailbox is no longer the caller's (the job is
 * deferred, retried or its key parked); TRUE if the job, deferred, was
 * returned already and ended, and the batch ends with it (*@n). Out of
 * line: the common path only tests @outcome. */
__attribute__ ((noinline)) static gboolean
run_job_aftermath (KdDispatcher  *self,
                   KdWorker      *worker,
                   KdWorkerStats *stats,
                   KdMailbox     *mailbox,
                   KdJob        **jobs,
                   guint          i,
                   guint         *n,
                   JobOutcome     outcome,
                   guint          epoch)
{
  if (outcome == JOB_DEFERRED)
    {
      /* The key waits for the job's return, holding its unit, with the
       * rest of the batch back in the mailbox, out of the scheduler: the
       * return schedules it again. Returned already, it ended here, and
       * the batch ends with it (a retry or a park as below). */
      kd_key_table_put_back (self->keys, mailbox, jobs + i + 1, *n - i - 1);
      outcome = settle_deferred (self, stats, jobs[i]);
      if (outcome == JOB_DEFERRED)
        return FALSE;
      *n = i + 1;
    }
  if (outcome == JOB_RETRY)
    {
      kd_dispatcher_retry_later (self, kd_worker_get_scheduler (worker), mailbox, jobs + i, *n - i);
      return FALSE;
    }
  if (outcome == JOB_PARK)
    {
      /* The rest of the batch went back to the parked mailbox, which is
       * no longer ours. */
      release_job (self, worker, epoch);
      return FALSE;
    }
  return TRUE;
}

/* Holds @mailbox: runs its jobs in order, up to MAILBOX_BUDGET, then reaps
 * it if it ran empty or puts it back in the scheduler if not. */
static void
run_mailbox (KdDispatcher  *self,
             KdWorker      *worker,
             KdWorkerStats *stats,
             KdMailbox     *mailbox)
{
  KdJob *jobs[MAILBOX_BUDGET];
  guint n = kd_key_table_pop (self->keys, mailbox, jobs, MAILBOX_BUDGET);
  guint ran = 0;
  guint last_epoch = 0;

  /* Scheduled by the return of its deferred job, whose unit it carries:
   * released now if jobs keep the key pending, or after the reaping. */
  if (G_UNLIKELY (mailbox->carries_unit))
    {
      mailbox->carries_unit = FALSE;
      if (n > 0)
        release_job (self, worker, mailbox->carried_epoch);
      else
        last_epoch = mailbox->carried_epoch;
    }

  for (;;)
    {
      gboolean reaped, keep_state;
      KdMailbox *evicted;
      gpointer evicted_state = NULL;
      guint i;

      for (i = 0; i < n; i++)
        {
          guint epoch = jobs[i]->epoch;
          JobOutcome outcome = run_job (self, stats, jobs[i], jobs + i + 1, n - i - 1);

          if (G_UNLIKELY (outcome != JOB_ENDED) &&
              !run_job_aftermath (self, worker, stats, mailbox, jobs, i, &n, outcome, epoch))
            return;

          /* The batch's last unit goes after the reaping, below. */
          if (i + 1 < n)
            release_job (self, worker, epoch);
          else
            last_epoch = epoch;
        }
      ran += n;

      /* A key's state goes when its mailbox ran empty. With an idle time
       * the reaped mailbox keeps it instead, for the key's next job, until
       * the timer's sweep ends the idle spell (or the bound on idle keys
       * ends another one early: its state is freed here). */
      keep_state = mailbox->has_state && self->key_idle_us > 0;
      if (!keep_state && mailbox->has_state)
        kd_dispatcher_end_key_state (self, mailbox);

      /* Reap or take more in one locked step, and only then release the
       * last job's unit: once wait() returns, its keys have left the table
       * and their states are freed (unless idle). A reaped or rescheduled
       * mailbox is not ours to touch any more. */
      n = kd_key_table_next (self->keys, mailbox, jobs, MAILBOX_BUDGET - ran, keep_state,
                             &reaped, &evicted, &evicted_state);
      if (keep_state && reaped)
        kd_dispatcher_arm_idle_sweep (self, kd_worker_get_scheduler (worker));
      if (G_UNLIKELY (evicted != NULL))
        kd_dispatcher_end_idle_spell (self, evicted, evicted_state);
      release_job (self, worker, last_epoch);

      if (reaped)
        return;

      /* Back to the end of the input queue, behind every task that
       * arrived meanwhile: a key that never runs dry cannot starve them. */
      if (n == 0)
        {
          kd_scheduler_push (kd_worker_get_scheduler (worker), kd_mailbox_get_task (mailbox));
          return;
        }
    }
}

static void
run_task (KdTask   *task,
          KdWorker *worker,
          gpointer  user_data)
{
  KdDispatcher *self = user_data;
  KdWorkerStats *stats = KD_SLOTS_GET (&self->worker_stats, kd_worker_get_index (worker),
                                       KdWorkerStats);
  KdMailbox *mailbox = kd_mailbox_from_task (task);

  if (mailbox != NULL)
    {
      run_mailbox (self, worker, stats, mailbox);
    }
  else if (G_UNLIKELY (task->kind == KD_TASK_RETURNED))
    {
      kd_dispatcher_end_returned (self, (KdJob *) task);
    }
  else
    {
      KdJob *job = (KdJob *) task;
      JobOutcome outcome;
      guint epoch;

      if (G_UNLIKELY (job->ticket != NULL && job->attempt == 0))
        self->stage_hooks.claim (job, self->stage_data);
      epoch = job->epoch;

      for (;;)
        {
          KdScheduler *scheduler;

          outcome = run_job (self, stats, job, NULL, 0);
          if (G_LIKELY (outcome == JOB_ENDED))
            break;
          if (outcome == JOB_DEFERRED)
            outcome = settle_deferred (self, stats, job);
          if (outcome != JOB_RETRY)
            break;

          scheduler = kd_worker_get_scheduler (worker);
          if (job->ticket == NULL)
            {
              kd_dispatcher_retry_later (self, scheduler, NULL, &job, 1);
              return;
            }
          /* An ordered stage's job waits for its retry here: the items of
           * its key that entered after it may wait for it to end (their
           * emits wait for room in the stage), so it must never wait for
           * a worker (see kd-reorder.c). */
          kd_scheduler_sleep_until (scheduler, kd_dispatcher_retry_due_time (self, job));
        }
      /* A deferred job keeps its unit until it is returned. */
      if (G_LIKELY (outcome != JOB_DEFERRED))
        release_job (self, worker, epoch);
    }
}

/* A plain unkeyed job in the scheduler's ring of values: its item, and a
 * tag of its epoch and its item's kind. */
#define VALUE_TAG(epoch, kind) ((guint32) (epoch) | (guint32) (kind) << 8)
G_STATIC_ASSERT (KD_ADMISSION_EPOCHS <= 256);

/* On the worker that took it from the ring: the job's record, made here,
 * where it runs and where it goes back to the pool. */
static KdTask *
job_for_value (gpointer  item,
               guint32   tag,
               KdWorker *worker,
               gpointer  user_data)
{
  KdJob *job = kd_job_new (user_data, item, tag & 0xff);

  job->item_kind = tag >> 8;
  return &job->task;
}

/* With @start_lock held: the delivery of done callbacks to the main
 * context, created when the first job is accepted or handed back. */
KdDelivery *
kd_dispatcher_ensure_delivery_locked (KdDispatcher *self)
{
  if (self->delivery == NULL)
    g_atomic_pointer_set (&self->delivery,
                          kd_delivery_new (self->context, "kdispatch done delivery",
                                           deliver_job, self));
  return self->delivery;
}

/* The dispatcher whose worker init runs on this thread, if any; and the
 * one whose worker finalize does. */
static KD_THREAD_LOCAL KdDispatcher *initializing;
static KD_THREAD_LOCAL KdDispatcher *finalizing;

/* Whether one of @self's worker inits or finalizes runs on this thread. */
gboolean
kd_dispatcher_in_worker_hook (KdDispatcher *self)
{
  return initializing == self || finalizing == self;
}

/* On a new worker's thread: the application's worker init. */
static gboolean
start_worker (KdWorker  *worker,
              gpointer   user_data,
              GError   **error)
{
  KdDispatcher *self = user_data;
  GError *local_error = NULL;
  gpointer data;

  initializing = self;
  data = self->worker_init (self, kd_worker_get_index (worker), self->worker_data, &local_error);
  initializing = NULL;
  if (local_error != NULL)
    {
      g_propagate_error (error, local_error);
      return FALSE;
    }

  kd_worker_set_data (worker, data);
  return TRUE;
}

/* On an exiting worker's thread: the application's worker finalize. */
static void
stop_worker (KdWorker *worker,
             gpointer  user_data)
{
  KdDispatcher *self = user_data;

  finalizing = self;
  self->worker_finalize (self, kd_worker_get_index (worker), kd_worker_get_data (worker),
                         self->worker_data);
  finalizing = NULL;
}

/* Whether jobs or key states will wait for their time: failed jobs for
 * their retry, idle key states for their expiry. */
static gboolean
needs_timer (KdDispatcher *self)
{
  return self->max_attempts > 1 || (self->key_idle_us > 0 && self->key_state_new != NULL);
}

/* Creates the workers (and the main-context delivery, and the timer if
 * needed) once, when the configuration is final: at kd_dispatcher_start()
 * or before the first job is admitted. Fails if the dispatcher is closed,
 * a thread could not be made or a worker's init failed; the workers may
 * then be started again later. */
static gboolean
ensure_started (KdDispatcher  *self,
                GError       **error)
{
  KdScheduler *scheduler;
  guint n_workers;

  if (G_LIKELY (g_atomic_pointer_get (&self->scheduler) != NULL))
    return TRUE;

  /* The workers start only once every init returned. */
  if (G_UNLIKELY (initializing == self))
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK,
                           "A worker's init cannot use its own dispatcher, which "
                           "starts once every init returned");
      return FALSE;
    }

  if (!g_atomic_int_get (&self->configured))
    g_atomic_int_set (&self->configured, TRUE);

  kd_mutex_lock (&self->start_lock);
  while (self->starting)
    kd_cond_wait (&self->start_cond, &self->start_lock);
  scheduler = self->scheduler;
  if (scheduler == NULL && kd_admission_is_closed (&self->admission))
    {
      g_set_error_literal (error, KD_ERROR, KD_ERROR_CLOSED, "The dispatcher is closed");
    }
  else if (scheduler == NULL)
    {
      if (self->context != NULL)
        kd_dispatcher_ensure_delivery_locked (self);
      kd_dispatcher_ensure_handler_delivery_locked (self);
      kd_key_table_set_max_idle (self->keys, self->max_idle_keys);
      self->starting = TRUE;

      /* Not under the lock: the inits (and finalizes, if one failed) are
       * the application's code. Under @resize_lock: n-workers holds still
       * until the scheduler is published (a resize meanwhile waits, and
       * then resizes it). */
      kd_mutex_unlock (&self->start_lock);
      kd_mutex_lock (&self->resize_lock);
      n_workers = self->n_workers;
      self->fanout = MIN (self->fanout, n_workers);
      kd_dispatcher_add_worker_slots (self, n_workers);
      scheduler = kd_scheduler_new (n_workers, self->fanout, needs_timer (self), run_task,
                                    job_for_value, self->admission.capacity,
                                    self->worker_init != NULL ? start_worker : NULL,
                                    self->worker_finalize != NULL ? stop_worker : NULL,
                                    self, error);
      kd_mutex_lock (&self->start_lock);

      /* The idle exit, as last set (under @start_lock, see
       * kd_dispatcher_set_worker_idle_time()). */
      if (scheduler != NULL)
        kd_scheduler_set_idle_exit (scheduler, self->worker_idle_us, self->min_workers);

      if (scheduler != NULL)
        g_debug ("dispatcher %p: started %u workers in %u groups, capacity %u",
                 (gpointer) self, n_workers, self->fanout, self->admission.capacity);
      g_atomic_pointer_set (&self->scheduler, scheduler);
      self->starting = FALSE;
      g_cond_broadcast (&self->start_cond);
      /* Published: a resize waiting meanwhile now resizes it. */
      kd_mutex_unlock (&self->resize_lock);
    }
  kd_mutex_unlock (&self->start_lock);

  return scheduler != NULL;
}

/* The first half of a submit: a unit of admission, in @epoch. On FALSE
 * nothing was taken. Inlined, as push_job() is: both are on every submit's
 * path, and the calls cost a tenth of an unkeyed job's instructions. */
G_ALWAYS_INLINE static inline gboolean
admit_job (KdDispatcher  *self,
           KdAdmitMode    mode,
           gint64         deadline,
           guint         *epoch,
           GError       **error)
{
  if (G_UNLIKELY (!ensure_started (self, error)))
    {
      kd_dispatcher_count_rejected (self);
      return FALSE;
    }

  kd_dispatcher_refuse_if_cancelled (self);
  if (!kd_admission_acquire (&self->admission, mode, deadline, epoch, error))
    {
      kd_dispatcher_count_rejected (self);
      return FALSE;
    }

  return TRUE;
}

/* The second half: queues @item as a job holding the unit admit_job() took
 * in @epoch, after waiting for room in its key if there is a per-key
 * @bound, and counts it in its @group, if any. FALSE with @error set if it
 * gave up waiting: nothing was queued and the caller still holds the unit. @label (transfer full) (nullable):
 * a kd_label_new() label the job keeps for a pipeline: for an unkeyed job,
 * the key it carries without being ordered by it; for a keyed job, a copy
 * of @key that the job's handler can pass on without copying it again.
 * Never with both a @label and a @bound. */
G_ALWAYS_INLINE static inline gboolean
push_job (KdDispatcher      *self,
          const char        *key,
          char              *label,
          gpointer           ticket,
          KdSubmitResult    *result,
          KdGroupState      *group,
          gpointer           item,
          KdItemKind         item_kind,
          guint              epoch,
          const KdKeyBound  *bound,
          GError           **error)
{
  KdScheduler *scheduler;
  KdMailbox *mailbox;
  KdJob *job;

  /* Every way in started the workers before it took the unit. */
  scheduler = g_atomic_pointer_get (&self->scheduler);

  /* A plain unkeyed job travels as its item, and a worker makes its
   * record (job_for_value()), unless the ring is full. */
  if (key == NULL && label == NULL && ticket == NULL && result == NULL && group == NULL &&
      !KD_TRACING (job_submit))
    {
      __atomic_fetch_add (&self->submitted, 1, __ATOMIC_RELAXED);
      kd_dispatcher_counters_changed (self);
      if (G_LIKELY (kd_scheduler_push_value (scheduler, item, VALUE_TAG (epoch, item_kind))))
        return TRUE;
      job = kd_job_new (self, item, epoch);
      job->item_kind = item_kind;
      kd_scheduler_push (scheduler, &job->task);
      return TRUE;
    }

  job = kd_job_new (self, item, epoch);
  job->item_kind = item_kind;
  job->ticket = ticket;
  job->label = label;
  job->result = result;
  if (G_UNLIKELY (group != NULL))
    {
      job->group = group;
      job->task.band = kd_group_state_get_band (group);
      kd_group_state_enter (group);
    }
  KD_TRACE3 (job_submit, self->name, key != NULL ? key : label, job);

  if (G_UNLIKELY (bound != NULL))
    {
      /* Counted there once it found room, before it can end. */
      if (!kd_key_table_push_bounded (self->keys, key, job, bound, &self->submitted,
                                      &mailbox, error))
        {
          job->result = NULL;
          kd_job_free (job);
          if (group != NULL)
            {
              kd_group_state_unqueued (group);
              kd_group_state_unref (group);
            }
          return FALSE;
        }
      kd_dispatcher_counters_changed (self);
    }
  else
    {
      /* Counted before the job can end, so a stats snapshot never sees it
       * end before it was submitted. */
      __atomic_fetch_add (&self->submitted, 1, __ATOMIC_RELAXED);
      kd_dispatcher_counters_changed (self);

      if (key == NULL)
        {
          kd_scheduler_push (scheduler, &job->task);
          return TRUE;
        }
      mailbox = kd_key_table_push (self->keys, key, job, self->key_capacity > 0);
    }

  /* A mailbox in the table is always scheduled or running; only its
   * creator schedules it. */
  if (mailbox != NULL)
    kd_scheduler_push (scheduler, kd_mailbox_get_task (mailbox));
  return TRUE;
}

/* The two halves for the other ways in (async, a pipeline's stage), which
 * are not the hot path. */
gboolean
kd_dispatcher_ensure_started (KdDispatcher  *self,
                              GError       **error)
{
  return ensure_started (self, error);
}

gboolean
kd_dispatcher_admit_job (KdDispatcher  *self,
                         KdAdmitMode    mode,
                         gint64         deadline,
                         guint         *epoch,
                         GError       **error)
{
  return admit_job (self, mode, deadline, epoch, error);
}

gboolean
kd_dispatcher_push_job (KdDispatcher      *self,
                        const char        *key,
                        char              *label,
                        gpointer           ticket,
                        KdSubmitResult    *result,
                        KdGroupState      *group,
                        gpointer           item,
                        KdItemKind         item_kind,
                        guint              epoch,
                        const KdKeyBound  *bound,
                        GError           **error)
{
  return push_job (self, key, label, ticket, result, group, item, item_kind, epoch, bound, error);
}

/* Inlined: on the hot path, @group is NULL at compile time. */
G_ALWAYS_INLINE static inline gboolean
submit_job (KdDispatcher  *self,
            KdGroupState  *group,
            const char    *key,
            gpointer       item,
            KdItemKind     item_kind,
            KdAdmitMode    mode,
            gint64         deadline,
            GError       **error)
{
  KdKeyBound bound;
  guint epoch;

  /* Made by g_object_new() rather than kd_dispatcher_new(). */
  g_return_val_if_fail (self->handler != NULL, FALSE);

  mode = kd_dispatcher_submit_mode (self, mode);
  if (!admit_job (self, mode, deadline, &epoch, error))
    return FALSE;

  if (!push_job (self, key, NULL, NULL, NULL, group, item, item_kind, epoch,
                 kd_dispatcher_key_bound (self, key, mode, deadline, &bound), error))
    {
      kd_dispatcher_count_rejected (self);
      release_unit (self, KD_ADMISSION_ANY_RELEASER, epoch);
      return FALSE;
    }
  return TRUE;
}

/* kd_group_submit() and its variants: a submit counted in @group too. A
 * cancelled group refuses, counted as any refusal. */
gboolean
kd_dispatcher_submit_in_group (KdDispatcher  *self,
                               KdGroupState  *group,
                               const char    *key,
                               gpointer       item,
                               KdItemKind     item_kind,
                               KdAdmitMode    mode,
                               gint64         deadline,
                               GError       **error)
{
  if (!kd_group_state_check_open (group, error))
    kd_dispatcher_count_rejected (self);
  else if (submit_job (self, group, key, item, item_kind, mode, deadline, error))
    return TRUE;

  kd_group_state_count_rejected (group);
  return FALSE;
}

/* The second half of a batch: queues @n_items items as jobs, each holding
 * one of the @n_items units taken in @epoch. Keyed items join their keys'
 * mailboxes in order; the unkeyed jobs and the mailboxes that became
 * active reach the scheduler together, in one push. Returns how many were
 * queued: fewer only if a per-key bound gave up on one (with @error set),
 * and the caller still holds the units of those not queued. */
static guint
push_jobs (KdDispatcher       *self,
           const char * const *keys,
           gpointer           *items,
           guint               n_items,
           guint               epoch,
           KdAdmitMode         mode,
           gint64              deadline,
           GError            **error)
{
  KdTask *newest = NULL, *oldest = NULL;
  guint i;

  /* Waiting for room in a key: one by one, each job reaching the scheduler
   * before the next one may wait (the key it waits for may be this
   * batch's). */
  if (G_UNLIKELY (self->key_capacity > 0 && keys != NULL))
    {
      for (i = 0; i < n_items; i++)
        {
          KdKeyBound bound;

          if (!push_job (self, keys[i], NULL, NULL, NULL, NULL, items[i], KD_ITEM_POINTER, epoch,
                         kd_dispatcher_key_bound (self, keys[i], mode, deadline, &bound),
                         error))
            return i;
        }
      return n_items;
    }

  /* Counted before any of them can end. */
  __atomic_fetch_add (&self->submitted, n_items, __ATOMIC_RELAXED);
  kd_dispatcher_counters_changed (self);

  /* Plain unkeyed items travel as themselves (see push_job()), as many as
   * the ring has room for; the rest as records. */
  i = 0;
  if (keys == NULL && !KD_TRACING (job_submit))
    i = kd_scheduler_push_values (g_atomic_pointer_get (&self->scheduler), items, n_items,
                                  VALUE_TAG (epoch, KD_ITEM_POINTER));

  for (; i < n_items; i++)
    {
      const char *key = keys != NULL ? keys[i] : NULL;
      KdJob *job = kd_job_new (self, items[i], epoch);
      KdTask *task;

      KD_TRACE3 (job_submit, self->name, key, job);
      if (key == NULL)
        {
          task = &job->task;
        }
      else
        {
          KdMailbox *mailbox = kd_key_table_push (self->keys, key, job, FALSE);

          /* Active already: scheduled or running. */
          if (mailbox == NULL)
            continue;
          task = kd_mailbox_get_task (mailbox);
        }

      task->next = newest;
      newest = task;
      if (oldest == NULL)
        oldest = task;
    }

  if (newest != NULL)
    kd_scheduler_push_chain (g_atomic_pointer_get (&self->scheduler), newest, oldest);
  return n_items;
}

/* Takes the items in chunks, each as many as there is room for, until all
 * are taken or the admission refuses. Returns how many were taken; @error
 * is set if that is fewer than @n_items, whose items from there on are
 * still the caller's. */
static guint
submit_many (KdDispatcher       *self,
             const char * const *keys,
             gpointer           *items,
             guint               n_items,
             KdAdmitMode         mode,
             gint64              deadline,
             GError            **error)
{
  guint taken = 0;

  g_return_val_if_fail (self->handler != NULL, 0);

  if (n_items == 0)
    return 0;

  mode = kd_dispatcher_submit_mode (self, mode);
  if (!ensure_started (self, error))
    {
      kd_dispatcher_count_rejected_n (self, n_items);
      return 0;
    }

  while (taken < n_items)
    {
      guint epoch, admitted, queued;

      kd_dispatcher_refuse_if_cancelled (self);
      admitted = kd_admission_acquire_many (&self->admission, mode, deadline,
                                            n_items - taken, &epoch, error);
      if (admitted == 0)
        break;

      queued = push_jobs (self, keys != NULL ? keys + taken : NULL, items + taken, admitted,
                          epoch, mode, deadline, error);
      taken += queued;
      if (queued < admitted)
        {
          for (; queued < admitted; queued++)
            release_unit (self, KD_ADMISSION_ANY_RELEASER, epoch);
          break;
        }
    }

  if (taken < n_items)
    kd_dispatcher_count_rejected_n (self, n_items - taken);
  return taken;
}

/* Every job not started ends cancelled: the queued ones as workers reach
 * them, those waiting for a retry at once, those of parked keys too. */
static void
cancel (KdDispatcher *self)
{
  KdScheduler *scheduler;

  g_debug ("dispatcher %p: cancelled", (gpointer) self);
  kd_dispatcher_close (self);

  scheduler = g_atomic_pointer_get (&self->scheduler);
  if (scheduler != NULL)
    kd_scheduler_hurry (scheduler);
  kd_dispatcher_drop_parked (self);
}

/* The cancel watch's function. Dropping a parked key may free its key
 * state, and so run application code that drops the last reference: the
 * dispatcher stays alive until cancel() returned, and is disposed here,
 * outside every lock of kdispatch's, if that was the last one. */
void
kd_dispatcher_on_cancelled (gpointer user_data)
{
  KdDispatcher *self = g_object_ref (user_data);

  cancel (self);
  g_object_unref (self);
}

/* Close, let every accepted job end, join the workers, deliver what waits
 * for the main context. Not on one of the dispatcher's own threads. */
static void
shutdown_sync (KdDispatcher *self)
{
  KdDispatcher *outer = shutting_down;
  KdScheduler *scheduler;
  gint n_deferred;

  shutting_down = self;

  /* No counter notify runs from now on (one in progress ends first). */
  if (g_atomic_pointer_get (&self->notifier) != NULL)
    kd_notifier_detach (self->notifier);

  kd_dispatcher_close (self);
  /* Nobody can resume a parked key any more. */
  kd_dispatcher_drop_parked (self);
  /* Handlers that run in a main context need it: run it here if we can. */
  kd_dispatcher_drain_on_context (self);
  /* Deferred jobs that are still out after a while may never be
   * returned: said, rather than waited for in silence. */
  if (g_atomic_int_get (&self->n_deferred) > 0 &&
      !kd_admission_wait_until (&self->admission, NULL, NULL,
                                g_get_monotonic_time () + DEFERRED_PATIENCE_US) &&
      (n_deferred = g_atomic_int_get (&self->n_deferred)) > 0)
    g_warning ("kdispatch: the last unref of dispatcher %s still waits for %d deferred jobs to "
               "be returned (kd_job_return_success() or kd_job_return_error())",
               self->name != NULL ? self->name : "(unnamed)", n_deferred);
  kd_admission_wait (&self->admission, NULL, NULL);
  /* The threads that returned the last jobs are done with us. */
  kd_dispatcher_wait_returners (self);

  /* Closed and drained. (Telling the workers again is harmless, and needed
   * if they were started by kd_dispatcher_start() while the close that
   * drained the dispatcher was looking for them.) */
  scheduler = g_atomic_pointer_get (&self->scheduler);
  if (scheduler != NULL)
    {
      kd_scheduler_shutdown (scheduler);
      kd_scheduler_join (scheduler);
    }

  if (self->delivery != NULL)
    kd_delivery_flush (self->delivery);

  g_clear_pointer (&self->cancel_watch, kd_cancel_watch_free);

  g_debug ("dispatcher %p: shut down", (gpointer) self);
  shutting_down = outer;
}

/* The start of a shutdown that began on one of our own threads, which
 * cannot wait for itself: closed and with no key parked, the dispatcher
 * drains. */
static void
close_for_shutdown (GObject *object)
{
  KdDispatcher *self = KD_DISPATCHER (object);

  kd_dispatcher_close (self);
  kd_dispatcher_drop_parked (self);
}

static void
finish_shutdown (GObject *object)
{
  shutdown_sync (KD_DISPATCHER (object));
}

/* The main context whose dispatch of our delivery or our counters' notify
 * runs on this thread, if any. */
GMainContext *
kd_dispatcher_dispatching_here (KdDispatcher *self)
{
  if (self->delivery != NULL && kd_delivery_is_dispatching (self->delivery))
    return self->context;
  if (self->handler_delivery != NULL && kd_delivery_is_dispatching (self->handler_delivery))
    return self->handler_context;
  if (g_atomic_pointer_get (&self->notifier) != NULL && kd_notifier_notifying_here (self->notifier))
    return self->context != NULL ? self->context : self->creation_context;
  return NULL;
}

/* The last reference may go on one of our own threads (a worker, the
 * timer's freeing an idle key state, a main context delivering): then the
 * shutdown finishes where it can wait (see kd-shutdown.c). */
static void
kd_dispatcher_dispose (GObject *object)
{
  KdDispatcher *self = KD_DISPATCHER (object);

  kd_shutdown_dispose (&self->shutdown, object,
                       kd_dispatcher_runs_here (self) ? KD_SHUTDOWN_OWN_THREAD :
                       kd_dispatcher_returning_here (self) ? KD_SHUTDOWN_ENDING_A_JOB :
                       KD_SHUTDOWN_ELSEWHERE,
                       kd_dispatcher_dispatching_here (self), close_for_shutdown,
                       finish_shutdown);

  G_OBJECT_CLASS (kd_dispatcher_parent_class)->dispose (object);
}

static void
kd_dispatcher_finalize (GObject *object)
{
  KdDispatcher *self = KD_DISPATCHER (object);

  g_assert (kd_shutdown_is_done (&self->shutdown));

  if (self->scheduler != NULL)
    kd_scheduler_free (self->scheduler);
  if (self->delivery != NULL)
    kd_delivery_destroy (self->delivery);
  if (self->handler_delivery != NULL)
    kd_delivery_destroy (self->handler_delivery);
  if (self->notifier != NULL)
    kd_notifier_destroy (self->notifier);
  g_main_context_unref (self->creation_context);

  /* Every submission's result holds a reference until it was delivered:
   * none is waiting or pending any more. */
  g_assert (self->waiting.length == 0);
  kd_result_registry_free (self->results);
  g_mutex_clear (&self->async_lock);
  g_mutex_clear (&self->delayed_lock);
  g_mutex_clear (&self->returning_lock);
  g_cond_clear (&self->returning_cond);
  g_clear_pointer (&self->delayed_per_key, g_hash_table_unref);

  kd_parked_keys_clear (&self->parked);
  kd_key_table_free (self->keys);
  kd_admission_clear (&self->admission);
  g_mutex_clear (&self->start_lock);
  g_cond_clear (&self->start_cond);
  g_clear_object (&self->cancellable);
  g_clear_pointer (&self->context, g_main_context_unref);
  g_clear_pointer (&self->handler_context, g_main_context_unref);
  g_free (self->name);
  kd_slots_clear (&self->worker_stats);
  g_aligned_free (self->other_stats);
  g_mutex_clear (&self->resize_lock);

  /* Last: once the application's notifies run, the dispatcher holds
   * nothing of the application's any more (its context, its cancellable),
   * so a notify may drop the last reference to them, or let another thread
   * do it. */
  if (self->done_data_free != NULL)
    self->done_data_free (self->done_data);
  if (self->key_state_data_free != NULL)
    self->key_state_data_free (self->key_state_data);
  if (self->worker_data_free != NULL)
    self->worker_data_free (self->worker_data);
  if (self->dead_letter_data_free != NULL)
    self->dead_letter_data_free (self->dead_letter_data);
  if (self->handler_data_free != NULL)
    self->handler_data_free (self->handler_data);

  G_OBJECT_CLASS (kd_dispatcher_parent_class)->finalize (object);
}

static void
kd_dispatcher_constructed (GObject *object)
{
  KdDispatcher *self = KD_DISPATCHER (object);

  G_OBJECT_CLASS (kd_dispatcher_parent_class)->constructed (object);

  /* Each worker counts the jobs it ends, and releases their units, on
   * cache lines of its own: made for the workers that start (and for
   * those a resize adds, kd_dispatcher_add_worker_slots()). */
  kd_slots_init (&self->worker_stats, sizeof (KdWorkerStats));
  self->other_stats = g_aligned_alloc0 (1, sizeof (KdWorkerStats), G_ALIGNOF (KdWorkerStats));
}

static void
kd_dispatcher_class_init (KdDispatcherClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->constructed = kd_dispatcher_constructed;
  object_class->dispose = kd_dispatcher_dispose;
  object_class->finalize = kd_dispatcher_finalize;
  kd_dispatcher_install_properties (object_class);
}

static void
kd_dispatcher_init (KdDispatcher *self)
{
  self->fanout = 1;
  self->n_workers = MIN (g_get_num_processors (), KD_DISPATCHER_MAX_WORKERS);
  self->min_workers = 1;
  g_mutex_init (&self->resize_lock);
  self->max_attempts = 1;
  self->max_idle_keys = DEFAULT_MAX_IDLE_KEYS;
  self->failure_policy = KD_FAILURE_CONTINUE;
  kd_parked_keys_init (&self->parked);
  g_mutex_init (&self->delayed_lock);
  g_mutex_init (&self->returning_lock);
  g_cond_init (&self->returning_cond);
  kd_admission_init (&self->admission, DEFAULT_CAPACITY, 0);
  g_mutex_init (&self->start_lock);
  g_cond_init (&self->start_cond);
  self->keys = kd_key_table_new ();
  self->cancellable = g_cancellable_new ();
  self->cancel_watch = kd_cancel_watch_new (self->cancellable, kd_dispatcher_on_cancelled, self);
  g_mutex_init (&self->async_lock);
  self->results = kd_result_registry_new ();
  self->creation_context = g_main_context_ref_thread_default ();
}

/**
 * kd_dispatcher_new:
 * @n_workers: the number of worker threads, at most
 *   %KD_DISPATCHER_MAX_WORKERS; 0 for one per processor
 * @handler: (scope notified) (closure user_data) (destroy user_data_free):
 *   runs each job on a worker thread
 * @user_data: data for @handler
 * @user_data_free: (nullable): frees @user_data once the dispatcher is
 *   finalized, after every handler returned
 *
 * Creates a dispatcher. Configure it with the `kd_dispatcher_set_*()` calls,
 * then submit jobs from any thread. The worker threads start at the first
 * accepted job (or at kd_dispatcher_start()).
 *
 * Returns: (transfer full): a new dispatcher, or %NULL (with a critical
 *   message) if @n_workers is above %KD_DISPATCHER_MAX_WORKERS
 *
 * Since: 0.1
 */
KdDispatcher *
kd_dispatcher_new (guint           n_workers,
                   KdHandlerFunc   handler,
                   gpointer        user_data,
                   GDestroyNotify  user_data_free)
{
  KdDispatcher *self;

  g_return_val_if_fail (handler != NULL, NULL);
  g_return_val_if_fail (n_workers <= KD_DISPATCHER_MAX_WORKERS, NULL);

  self = g_object_new (KD_TYPE_DISPATCHER, "n-workers", n_workers, NULL);
  self->handler = handler;
  self->handler_data = user_data;
  self->handler_data_free = user_data_free;

  return self;
}

/**
 * kd_dispatcher_start:
 * @self: a dispatcher
 * @error: return location for a #GError
 *
 * Starts the worker threads now rather than at the first submit, and ends
 * the configuration. With worker functions
 * (kd_dispatcher_set_worker_funcs()) it returns once every worker ran its
 * init, so an init failure is reported here: no worker is left running and
 * the dispatcher stays unstarted, so the call may be retried (the settings
 * stay final). Does nothing if the workers already run.
 *
 * Returns: %TRUE if the workers run; %FALSE with the first init error, or
 *   %KD_ERROR_CLOSED if the dispatcher was closed before it started
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_start (KdDispatcher  *self,
                     GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);
  g_return_val_if_fail (self->handler != NULL, FALSE);

  return ensure_started (self, error);
}

/**
 * kd_dispatcher_submit:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @error: return location for a #GError
 *
 * Submits a job. Jobs with the same @key run one at a time, in submission
 * order; unkeyed jobs run in parallel on every worker. The key is copied and
 * compared as a byte string; the empty string is a key like any other.
 *
 * If the admission bound is reached, waits until a job ends. Called from
 * one of this dispatcher's own workers, it never waits: it fails with
 * %KD_ERROR_FULL instead, because a worker waiting for a slot that only
 * workers can free could wait forever.
 *
 * On success the dispatcher owns @item until the job ended. On failure
 * (%KD_ERROR_CLOSED once the dispatcher is closed or cancelled) @item is
 * still the caller's and no callback runs for it.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_submit (KdDispatcher  *self,
                      const char    *key,
                      gpointer       item,
                      GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return submit_job (self, NULL, key, item, KD_ITEM_POINTER, KD_ADMIT_BLOCK, 0, error);
}

/**
 * kd_dispatcher_try_submit:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @error: return location for a #GError
 *
 * Like kd_dispatcher_submit(), but fails with %KD_ERROR_FULL at once if the
 * admission bound is reached.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_try_submit (KdDispatcher  *self,
                          const char    *key,
                          gpointer       item,
                          GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return submit_job (self, NULL, key, item, KD_ITEM_POINTER, KD_ADMIT_TRY, 0, error);
}

/**
 * kd_dispatcher_submit_timeout:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @timeout_us: how long to wait for room, in microseconds; 0 or less
 *   does not wait
 * @error: return location for a #GError
 *
 * Like kd_dispatcher_submit(), but fails with %KD_ERROR_TIMEOUT if the
 * admission bound is still reached after @timeout_us. A closed dispatcher
 * fails at once with %KD_ERROR_CLOSED. Called from one of this dispatcher's
 * own workers it does not wait, like kd_dispatcher_submit(): it fails with
 * %KD_ERROR_FULL if the bound is reached.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_submit_timeout (KdDispatcher  *self,
                              const char    *key,
                              gpointer       item,
                              gint64         timeout_us,
                              GError       **error)
{
  gint64 now = g_get_monotonic_time ();

  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  /* A deadline past the end of time is no deadline. */
  if (timeout_us > G_MAXINT64 - now)
    return submit_job (self, NULL, key, item, KD_ITEM_POINTER, KD_ADMIT_BLOCK, 0, error);

  return submit_job (self, NULL, key, item, KD_ITEM_POINTER, KD_ADMIT_DEADLINE, now + MAX (timeout_us, 0),
                     error);
}

/* The value submits: a copy of @value is the job's item, freed again if
 * the submit is refused. */
static gboolean
submit_value (KdDispatcher  *self,
              const char    *key,
              const GValue  *value,
              KdAdmitMode    mode,
              GError       **error)
{
  GValue *item = kd_item_new_value (value);

  if (submit_job (self, NULL, key, item, KD_ITEM_VALUE, mode, 0, error))
    return TRUE;

  kd_item_free_value (item);
  return FALSE;
}

/**
 * kd_dispatcher_submit_value:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @value: the job's item: any #GValue, copied
 * @error: return location for a #GError
 *
 * Like kd_dispatcher_submit(), with a value for the item: what a language
 * binding passes (a GObject, a #GVariant, a string, a boxed type, or, from
 * Python, any object). The job holds a copy of @value, which the handler
 * and the done callback read with kd_job_get_value(), and which the
 * dispatcher frees itself once the job ended: the item-free function is
 * not called for it. A refused submit keeps no copy.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_submit_value (KdDispatcher  *self,
                            const char    *key,
                            const GValue  *value,
                            GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (G_IS_VALUE (value), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return submit_value (self, key, value, KD_ADMIT_BLOCK, error);
}

/**
 * kd_dispatcher_try_submit_value:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @value: the job's item: any #GValue, copied
 * @error: return location for a #GError
 *
 * Like kd_dispatcher_submit_value(), but fails with %KD_ERROR_FULL at once
 * if the admission bound is reached, as kd_dispatcher_try_submit().
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_try_submit_value (KdDispatcher  *self,
                                const char    *key,
                                const GValue  *value,
                                GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (G_IS_VALUE (value), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return submit_value (self, key, value, KD_ADMIT_TRY, error);
}

/**
 * kd_dispatcher_submit_many:
 * @self: a dispatcher
 * @keys: (array length=n_items) (nullable): the items' keys, one per item
 *   (an element may be %NULL for an unkeyed item), or %NULL if every item
 *   is unkeyed
 * @items: (array length=n_items) (element-type guintptr): the items, one job
 *   each
 * @n_items: how many items
 * @error: return location for a #GError
 *
 * Submits a batch of jobs in one call, as kd_dispatcher_submit() would one
 * by one, in array order: each key's items run in that order, after the
 * key's jobs submitted earlier and before those submitted later. The batch
 * pays the cost of a submit once per chunk rather than once per item: its
 * units of admission are taken as many at a time as there is room for,
 * and its jobs reach the workers together.
 *
 * The bound holds as for single submits: each item takes one unit, and at
 * the bound the call waits for room, again and again until every item is
 * taken (a per-key bound, kd_dispatcher_set_key_capacity(), waits item by
 * item). Called from one of this dispatcher's own workers it never waits,
 * as kd_dispatcher_try_submit_many().
 *
 * The items taken are the first ones of the array, and the return value
 * says how many: the dispatcher owns those until their jobs ended; the
 * rest are still the caller's, and no callback runs for them. Fewer than
 * @n_items are taken only if the dispatcher is closed or cancelled during
 * the call (%KD_ERROR_CLOSED), if a per-key bound gives up, or from a
 * worker (%KD_ERROR_FULL). @error is set exactly when the return value is
 * less than @n_items (a binding that turns errors into exceptions loses
 * the count: read #KdStats:submitted before and after). Each item not
 * taken counts as one refused submit in #KdStats:rejected.
 *
 * Thread-safe.
 *
 * Returns: how many items were taken, from the first one on
 *
 * Since: 0.1
 */
guint
kd_dispatcher_submit_many (KdDispatcher       *self,
                           const char * const *keys,
                           gpointer           *items,
                           guint               n_items,
                           GError            **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);
  g_return_val_if_fail (items != NULL || n_items == 0, 0);
  g_return_val_if_fail (error == NULL || *error == NULL, 0);

  return submit_many (self, keys, items, n_items, KD_ADMIT_BLOCK, 0, error);
}

/**
 * kd_dispatcher_try_submit_many:
 * @self: a dispatcher
 * @keys: (array length=n_items) (nullable): the items' keys, one per item
 *   (an element may be %NULL for an unkeyed item), or %NULL if every item
 *   is unkeyed
 * @items: (array length=n_items) (element-type guintptr): the items, one job
 *   each
 * @n_items: how many items
 * @error: return location for a #GError
 *
 * Like kd_dispatcher_submit_many(), but never waits: takes as many items,
 * from the first one on, as there is room for now, and fails with
 * %KD_ERROR_FULL for the rest. An item whose key is at its per-key bound
 * (kd_dispatcher_set_key_capacity()) ends the batch there, with
 * %KD_ERROR_FULL too.
 *
 * Thread-safe.
 *
 * Returns: how many items were taken, from the first one on
 *
 * Since: 0.1
 */
guint
kd_dispatcher_try_submit_many (KdDispatcher       *self,
                               const char * const *keys,
                               gpointer           *items,
                               guint               n_items,
                               GError            **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);
  g_return_val_if_fail (items != NULL || n_items == 0, 0);
  g_return_val_if_fail (error == NULL || *error == NULL, 0);

  return submit_many (self, keys, items, n_items, KD_ADMIT_TRY, 0, error);
}

/**
 * kd_dispatcher_submit_many_timeout:
 * @self: a dispatcher
 * @keys: (array length=n_items) (nullable): the items' keys, one per item
 *   (an element may be %NULL for an unkeyed item), or %NULL if every item
 *   is unkeyed
 * @items: (array length=n_items) (element-type guintptr): the items, one job
 *   each
 * @n_items: how many items
 * @timeout_us: how long the whole call may wait for room, in microseconds;
 *   0 or less does not wait
 * @error: return location for a #GError
 *
 * Like kd_dispatcher_submit_many(), but gives up once @timeout_us passed:
 * the items taken by then stay taken, and the call fails with
 * %KD_ERROR_TIMEOUT for the rest.
 *
 * Thread-safe.
 *
 * Returns: how many items were taken, from the first one on
 *
 * Since: 0.1
 */
guint
kd_dispatcher_submit_many_timeout (KdDispatcher       *self,
                                   const char * const *keys,
                                   gpointer           *items,
                                   guint               n_items,
                                   gint64              timeout_us,
                                   GError            **error)
{
  gint64 now = g_get_monotonic_time ();

  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);
  g_return_val_if_fail (items != NULL || n_items == 0, 0);
  g_return_val_if_fail (error == NULL || *error == NULL, 0);

  if (timeout_us > G_MAXINT64 - now)
    return submit_many (self, keys, items, n_items, KD_ADMIT_BLOCK, 0, error);

  return submit_many (self, keys, items, n_items, KD_ADMIT_DEADLINE,
                      now + MAX (timeout_us, 0), error);
}

/**
 * kd_dispatcher_wait:
 * @self: a dispatcher
 *
 * Returns once every job accepted before the call has ended: its done
 * callback and item-free function ran (with a main context, once its
 * handler returned; the deliveries follow when the context is iterated).
 * Jobs submitted by other threads during the call do not delay it (but for
 * a submit that was blocked on its key's bound before the call, see
 * kd_dispatcher_set_key_capacity(); and with 31 waits or more of this
 * dispatcher outstanding at once, a wait also covers the jobs accepted
 * until an older wait's jobs ended). It can be called any number of times:
 * batch, wait, next batch.
 *
 * If the dispatcher is closed and nothing is pending when the wait ends,
 * its worker threads have exited when it returns.
 *
 * Thread-safe, but not from the dispatcher's own threads: its handlers,
 * done callbacks running on its workers, or key-state frees on its timer
 * or its shutdown (a job cannot wait for itself, nor a retry for the timer
 * that waits in it). From there it logs a critical and returns at once.
 *
 * Since: 0.1
 */
void
kd_dispatcher_wait (KdDispatcher *self)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  kd_dispatcher_wait_sealed (self, NULL, NULL);
}

/* After a wait: a closed dispatcher with nothing pending has stopped its
 * workers; join them, so that they have exited when the wait returns. */
static void
join_if_drained (KdDispatcher *self)
{
  KdScheduler *scheduler = g_atomic_pointer_get (&self->scheduler);

  if (scheduler != NULL &&
      kd_admission_is_closed (&self->admission) &&
      kd_admission_get_pending (&self->admission) == 0)
    {
      kd_scheduler_shutdown (scheduler);
      kd_scheduler_join (scheduler);
    }
}

/* kd_dispatcher_wait(), calling @sealed once the jobs to wait for are fixed:
 * a job accepted after @sealed was called is not waited for. */
void
kd_dispatcher_wait_sealed (KdDispatcher *self,
                           KdSealedFunc  sealed,
                           gpointer      user_data)
{
  if (kd_dispatcher_runs_here (self) || kd_dispatcher_returning_here (self))
    {
      g_critical ("kd_dispatcher_wait: called from one of the dispatcher's own "
                  "threads (a worker, its timer or its shutdown) or while one of its "
                  "jobs is being returned, which would wait for itself");
      return;
    }

  /* Handlers that run in a main context need it: run it here if we can. */
  if (sealed == NULL)
    kd_dispatcher_drain_on_context (self);
  kd_admission_wait (&self->admission, sealed, user_data);
  join_if_drained (self);
}

/**
 * kd_dispatcher_wait_until:
 * @self: a dispatcher
 * @end_time: the monotonic time to give up at, as g_get_monotonic_time()
 *   counts it
 *
 * Like kd_dispatcher_wait(), but gives up at @end_time: returns %TRUE once
 * every job accepted before the call has ended, %FALSE if @end_time came
 * first (at once if it has passed, unless they had all ended). Giving up
 * changes nothing for the jobs.
 *
 * ```c
 * if (!kd_dispatcher_wait_until (d, g_get_monotonic_time () + 5 * G_TIME_SPAN_SECOND))
 *   g_warning ("still busy after 5 s");
 * ```
 *
 * Thread-safe, but not from the dispatcher's own threads, as
 * kd_dispatcher_wait(): from there it logs a critical and returns %FALSE.
 *
 * Returns: whether every job accepted before the call has ended
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_wait_until (KdDispatcher *self,
                          gint64        end_time)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);

  if (kd_dispatcher_runs_here (self) || kd_dispatcher_returning_here (self))
    {
      g_critical ("kd_dispatcher_wait_until: called from one of the dispatcher's own "
                  "threads (a worker, its timer or its shutdown) or while one of its "
                  "jobs is being returned, which would wait for itself");
      return FALSE;
    }

  /* 0 means "never" below; a time in the past is 1 as well as any. */
  if (!kd_admission_wait_until (&self->admission, NULL, NULL, MAX (end_time, 1)))
    return FALSE;
  join_if_drained (self);
  return TRUE;
}

/**
 * kd_dispatcher_close:
 * @self: a dispatcher
 *
 * Stops accepting jobs: every later submit fails with %KD_ERROR_CLOSED, and
 * blocked submitters wake up and fail the same way. Jobs already accepted
 * still run. Once they have ended the worker threads exit.
 *
 * Thread-safe and idempotent; may be called from a handler.
 *
 * Since: 0.1
 */
void
kd_dispatcher_close (KdDispatcher *self)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (kd_admission_close (&self->admission))
    kd_dispatcher_shutdown_scheduler (self);
  kd_dispatcher_refuse_waiting (self);
  if (self->key_capacity > 0)
    kd_key_table_wake_bounded (self->keys);
}

