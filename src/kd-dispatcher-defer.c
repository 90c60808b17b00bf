/* kd-dispatcher-defer.c: jobs that end later than their handler returns
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A handler that starts asynchronous work (a socket write, a D-Bus call)
 * calls kd_job_defer() and returns: the job does not end then, and its
 * worker goes on with other tasks. The job ends when the application
 * returns it (kd_job_return_success() or _error(), from any thread), as a
 * handler's return would have ended it: the failure policy judges an
 * error, then the done callback, the item-free and the release of its
 * unit. Until then it is pending: its unit counts in the bound, wait()
 * waits for it, and its key stays held (the mailbox waits out of the
 * scheduler with the rest of its batch put back, as for a retry).
 *
 * The handler's return and the application's can come in either order,
 * on different threads: each sets its bit in the job's @defer word, and
 * whoever sets the second ends the job (all_done()). A job that went to
 * the handler context has a third party, its handler there, whose return
 * sets a bit too: the job ends only once its worker let go of it (its
 * batch's rest back in the mailbox), its handler in the context returned,
 * and it was returned (by that handler's outcome, or, if that handler
 * deferred it, by the application), so a handler that returns its job
 * before it returns still has it. A job returned before its handler
 * returned ends on its worker, as any job does; one returned later ends
 * on the returning thread (end_returned()). There its key's mailbox is
 * scheduled again carrying the job's unit, which the next worker to run
 * it releases once the mailbox was reaped or its next jobs taken
 * (run_mailbox()), so that a wait() that returns never sees the key live;
 * an unkeyed job's unit is released at once. A retry puts the job back at
 * the head of its key (or alone) in the scheduler's timer.
 *
 * A returning thread may hold no reference to the dispatcher, whose last
 * unref waits for every pending job: the return counts itself in
 * @n_returning before the job's unit can be released, and the shutdown
 * waits for it to finish touching the dispatcher
 * (kd_dispatcher_wait_returners()). A last unref that still finds
 * deferred jobs out after two seconds says so in a warning, and goes on
 * waiting.
 *
 * In a pipeline's stage, a deferred job may emit until it is returned,
 * from any thread; those emits must not block there (kd-pipeline.c keeps
 * them with the job), and its end may pass items on, which blocks at the
 * next stage's bound: so a stage's returned job ends on a worker. The
 * return schedules the job itself (KD_TASK_RETURNED), and the worker that
 * takes it ends it as end_returned() says.
 *
 * A handler context (kd-dispatcher-context.c) defers every job: its worker
 * hands it to the context, whose handler's outcome returns it, unless that
 * handler deferred it in turn (KD_DEFER_BY_HANDLER: the application
 * returns it).
 */

#include "config.h"

#include "kd-dispatcher-internal.h"

/* The dispatcher whose returned job this thread is ending, if any: its
 * last unref or a wait there would wait for that job (see
 * kd_dispatcher_dispose()). */
static KD_THREAD_LOCAL KdDispatcher *returning_for;

gboolean
kd_dispatcher_returning_here (KdDispatcher *self)
{
  return returning_for == self;
}

/* Whether @defer is a job a handler deferred, which the application
 * returns: counted in n_deferred, for the last unref's warning, from the
 * handler's kd_job_defer() (not the jobs a handler context runs for us). */
static inline gboolean
deferred_by_handler (gint defer)
{
  return !(defer & KD_DEFER_ON_CONTEXT) || (defer & KD_DEFER_BY_HANDLER);
}

/* @job ends: no longer deferred, nor counted as out. */
static void
uncount_deferred (KdDispatcher *self,
                  KdJob        *job)
{
  if (deferred_by_handler (job->defer))
    g_atomic_int_add (&self->n_deferred, -1);
  job->defer = 0;
}

/* A thread that ends a returned job, or hands it on, counts itself while it
 * touches the dispatcher: the shutdown waits for it
 * (kd_dispatcher_wait_returners()). The count goes down under the lock, so
 * that the shutdown cannot see it reach zero and free the dispatcher while
 * this thread still holds the lock. */
static void
returner_enter (KdDispatcher *self)
{
  kd_mutex_lock (&self->returning_lock);
  self->n_returning++;
  kd_mutex_unlock (&self->returning_lock);
}

static void
returner_leave (KdDispatcher *self)
{
  kd_mutex_lock (&self->returning_lock);
  if (--self->n_returning == 0)
    g_cond_broadcast (&self->returning_cond);
  kd_mutex_unlock (&self->returning_lock);
}

/* The application returned @job after its handler returned: it ends here,
 * on the returning thread. */
static void
end_returned (KdDispatcher *self,
              KdJob        *job)
{
  KdMailbox *mailbox = job->mailbox;
  guint epoch = job->epoch;
  GError *error = g_steal_pointer (&job->error);
  KdScheduler *scheduler = g_atomic_pointer_get (&self->scheduler);
  KdDispatcher *outer = returning_for;
  JobOutcome outcome;

  returner_enter (self);
  returning_for = self;

  /* A stage's job, on a worker: what it emitted goes on first. */
  if (self->stage_hooks.returned != NULL)
    self->stage_hooks.returned (job, self->stage_data);
  uncount_deferred (self, job);
  outcome = kd_dispatcher_job_returned (self, job, error);

  if (outcome == JOB_RETRY)
    kd_dispatcher_retry_later (self, scheduler, mailbox, &job, 1);
  else if (outcome == JOB_ENDED && mailbox != NULL)
    {
      mailbox->carries_unit = TRUE;
      mailbox->carried_epoch = epoch;
      kd_scheduler_push (scheduler, kd_mailbox_get_task (mailbox));
    }
  else
    {
      /* Unkeyed, or its key parked (the mailbox is no longer ours). */
      kd_dispatcher_release_unit (self, KD_ADMISSION_ANY_RELEASER, epoch);
    }

  returning_for = outer;
  returner_leave (self);
}

/* A stage's job returned after its handler returned: a worker ends it
 * (kd_dispatcher_end_returned()). Counted as a returner meanwhile: once the
 * task is pushed, the job may end and the last unref go on while this
 * thread still touches the scheduler. */
static void
end_on_worker (KdDispatcher *self,
               KdJob        *job)
{
  KdScheduler *scheduler = g_atomic_pointer_get (&self->scheduler);

  returner_enter (self);
  job->task.kind = KD_TASK_RETURNED;
  kd_scheduler_push (scheduler, &job->task);
  returner_leave (self);
}

/* By the worker that took a stage's returned job (KD_TASK_RETURNED). */
void
kd_dispatcher_end_returned (KdDispatcher *self,
                            KdJob        *job)
{
  job->task.kind = KD_TASK_JOB;
  end_returned (self, job);
}

/* A handler that deferred its job returned: it must say nothing of the
 * outcome, which is the return's. */
void
kd_dispatcher_deferring_handler_returned (gboolean  completed,
                                          GError   *error)
{
  if (G_UNLIKELY (!completed || error != NULL))
    {
      g_critical ("A kdispatch handler that deferred its job must return TRUE without an error: "
                  "the job ends when it is returned");
      g_clear_error (&error);
    }
}

/* Whether @defer, with the bit just set, is a deferred job every party is
 * done with: its worker, its return, and its handler in the handler
 * context if it went there. */
static inline gboolean
all_done (gint defer)
{
  return (defer & KD_DEFER_HANDLER_DONE) && (defer & KD_DEFER_RETURNED) &&
         (!(defer & KD_DEFER_ON_CONTEXT) || (defer & KD_DEFER_CONTEXT_DONE));
}

/* Ends @job, which its last party (not its worker) let go of: a stage's
 * on a worker, any other's here. */
static void
end_let_go (KdJob *job)
{
  if (job->dispatcher->stage_hooks.ended != NULL)
    end_on_worker (job->dispatcher, job);
  else
    end_returned (job->dispatcher, job);
}

/* By @job's worker once its handler returned, having deferred it, and its
 * key's later jobs are back in the mailbox: FALSE if the job is still out
 * (its return, or its handler in the handler context, will end it, and may
 * schedule the mailbox at once); TRUE if the others were done already,
 * with *@error (transfer full; NULL: completed) set from the return, for
 * the worker to end it. */
gboolean
kd_dispatcher_settle_deferred (KdDispatcher  *self,
                               KdJob         *job,
                               GError       **error)
{
  gint was;

  was = g_atomic_int_or (&job->defer, KD_DEFER_HANDLER_DONE);
  if (!all_done (was | KD_DEFER_HANDLER_DONE))
    return FALSE;

  if (self->stage_hooks.returned != NULL)
    self->stage_hooks.returned (job, self->stage_data);
  uncount_deferred (self, job);
  *error = g_steal_pointer (&job->error);
  return TRUE;
}

/* Before the shutdown lets the workers go and frees the dispatcher: the
 * threads still ending a returned job are done with it. */
void
kd_dispatcher_wait_returners (KdDispatcher *self)
{
  kd_mutex_lock (&self->returning_lock);
  while (self->n_returning > 0)
    kd_cond_wait (&self->returning_cond, &self->returning_lock);
  kd_mutex_unlock (&self->returning_lock);
}

/**
 * kd_job_defer:
 * @job: a job, as passed to its handler
 *
 * Makes the job end later than its handler returns: when it is returned
 * with kd_job_return_success() or kd_job_return_error(), from any thread,
 * exactly once. Call it from the handler, which then returns %TRUE at
 * once, leaving its worker free for other jobs while, say, an asynchronous
 * write or D-Bus call the handler started is under way.
 *
 * Until it is returned the job is pending as if it were running: its key's
 * later jobs wait (per-key order holds), its unit counts in the bound,
 * kd_dispatcher_wait() waits for it, and its item and key state stay
 * valid. Cancelling the dispatcher does not end it: its cancellable
 * (kd_job_get_cancellable()) is cancelled, and the job is returned, say
 * with the %G_IO_ERROR_CANCELLED its operation failed with. The last
 * unref of the dispatcher waits for every deferred job, and says so in a
 * warning if some are still out after two seconds.
 *
 * In a pipeline's stage the job may emit (kd_job_emit()) from any thread
 * until it is returned; those emits never block: they go on when the
 * job ends, on one of the stage's workers (see the Pipelines guide).
 *
 * Since: 0.1
 */
void
kd_job_defer (KdJob *job)
{
  KdDispatcher *self;

  gint defer;

  g_return_if_fail (job != NULL);
  self = job->dispatcher;
  defer = g_atomic_int_get (&job->defer);
  if (!(defer & KD_DEFER_RUNNING) || (defer & (KD_DEFER_BY_HANDLER | KD_DEFER_RETURNED)) ||
      (defer & (KD_DEFER_ASKED | KD_DEFER_ON_CONTEXT)) == KD_DEFER_ASKED)
    {
      g_critical ("kd_job_defer: only a job's handler may defer it, once");
      return;
    }
  g_atomic_int_inc (&self->n_deferred);
  if (self->stage_hooks.deferring != NULL)
    self->stage_hooks.deferring (job, self->stage_data);
  /* Its handler runs in the handler context: deferred already, for the
   * context to return it; now the application will. */
  if (defer & KD_DEFER_ON_CONTEXT)
    g_atomic_int_or (&job->defer, KD_DEFER_BY_HANDLER);
  else
    g_atomic_int_or (&job->defer, KD_DEFER_ASKED);
}

/* Returns @job with @error (transfer full; NULL: it completed). */
void
kd_dispatcher_return_job (KdJob  *job,
                          GError *error)
{
  gint defer = g_atomic_int_get (&job->defer);
  gint was;

  if (!(defer & KD_DEFER_ASKED) || (defer & KD_DEFER_RETURNED) ||
      ((defer & KD_DEFER_ON_CONTEXT) && !(defer & KD_DEFER_BY_HANDLER)))
    {
      g_critical ("A kdispatch job was returned that was not deferred, or returned twice");
      g_clear_error (&error);
      return;
    }

  /* Published to the handler's worker, or to ourselves, by the atomic or. */
  job->error = error;
  was = g_atomic_int_or (&job->defer, KD_DEFER_RETURNED);
  if (all_done (was | KD_DEFER_RETURNED))
    end_let_go (job);
}

/* The handler of @job returned in the handler context (@completed, and
 * @error, transfer full): unless it deferred the job, that is its return.
 * The job is not to be touched afterwards: it may end at once. */
void
kd_dispatcher_context_handler_returned (KdJob    *job,
                                        gboolean  completed,
                                        GError   *error)
{
  gint defer = g_atomic_int_and (&job->defer, ~KD_DEFER_RUNNING);
  gint done = KD_DEFER_CONTEXT_DONE;
  gint was;

  if (defer & KD_DEFER_BY_HANDLER)
    {
      kd_dispatcher_deferring_handler_returned (completed, error);
    }
  else
    {
      job->error = kd_dispatcher_handler_outcome (completed, error);
      done |= KD_DEFER_RETURNED;
    }
  was = g_atomic_int_or (&job->defer, done);
  if (all_done (was | done))
    end_let_go (job);
}

/**
 * kd_job_return_success:
 * @job: a deferred job (kd_job_defer())
 *
 * Ends a deferred job as completed, as a handler returning %TRUE does: its
 * done callback and item-free run (on this thread, or in the dispatcher's
 * main context; a pipeline stage's job ends on one of the stage's
 * workers), its unit is released, and its key's next job may start.
 * Any thread; once per deferred job. @job is not valid afterwards.
 *
 * Since: 0.1
 */
void
kd_job_return_success (KdJob *job)
{
  g_return_if_fail (job != NULL);

  kd_dispatcher_return_job (job, NULL);
}

/**
 * kd_job_return_error:
 * @job: a deferred job (kd_job_defer())
 * @error: (transfer full): why it failed
 *
 * Ends a deferred job as failed with @error, as a handler returning %FALSE
 * does: the dispatcher's failure policy applies (a retry runs the handler
 * again, in the key's order; a dead letter; a parked key), then the done
 * callback sees @error. Any thread; once per deferred job. @job is not
 * valid afterwards.
 *
 * Since: 0.1
 */
void
kd_job_return_error (KdJob  *job,
                     GError *error)
{
  g_return_if_fail (job != NULL);
  g_return_if_fail (error != NULL);

  kd_dispatcher_return_job (job, error);
}

/**
 * kd_job_return_error_literal:
 * @job: a deferred job (kd_job_defer())
 * @domain: the error's domain
 * @code: its code
 * @message: its message
 *
 * kd_job_return_error() with an error made of @domain, @code and
 * @message, for language bindings.
 *
 * Since: 0.1
 */
void
kd_job_return_error_literal (KdJob      *job,
                             GQuark      domain,
                             gint        code,
                             const char *message)
{
  g_return_if_fail (job != NULL);
  g_return_if_fail (message != NULL);

  kd_dispatcher_return_job (job, g_error_new_literal (domain, code, message));
}
