/* kd-dispatcher-context.c: handlers that run in a main context
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * With a handler context (kd_dispatcher_set_handler_context()), the
 * workers do not run the handler: they schedule. A worker that reaches a
 * job defers it (kd-dispatcher-defer.c) and hands it to a delivery
 * (KdDelivery) attached to the context, whose thread runs the handler and
 * returns the job with the handler's outcome, unless the handler deferred
 * it itself (then the application returns it later). The rest is a
 * deferred job's life: the key stays held until the job is returned, so one
 * job per key is in the context at a time, in the key's order; the unit
 * counts in the bound; retries, dead letters and parked keys follow the
 * handler's failure. This is what a language whose callbacks must run on
 * one thread (GJS) needs, and what a GTK application whose handlers touch
 * widgets wants. A pipeline stage's jobs end on a worker even then, as
 * every returned stage job does (kd-dispatcher-defer.c), so that what
 * they emitted goes on from there and the context never blocks. The delivery's time slices keep a flood of jobs from
 * starving the context's other sources.
 *
 * wait() and the last unref wait for every pending job, and these need
 * the context: on a thread that can acquire it (its owner, or any while
 * nobody runs it), they run the context themselves until the jobs drained
 * (kd_dispatcher_drain_on_context()), as a nested main loop would, so
 * that a GTK application's wait or last unref on its main thread does not
 * wait for itself. Otherwise the context's owner runs them, and they
 * wait.
 */

#include "config.h"

#include "kd-dispatcher-internal.h"

/* In the handler context's thread: runs the handler of a job a worker
 * handed over, and returns the job with its outcome, unless the handler
 * deferred it. */
static void
run_on_context (KdTask   *task,
                gpointer  user_data)
{
  KdDispatcher *self = user_data;
  KdJob *job = (KdJob *) task;
  GError *error = NULL;
  gboolean completed;

  g_atomic_int_or (&job->defer, KD_DEFER_RUNNING);
  completed = self->handler (job, self->handler_data, &error);
  kd_dispatcher_context_handler_returned (job, completed, error);
}

/* With @start_lock held, as the dispatcher starts: the delivery that runs
 * the handlers in the handler context, if there is one. */
void
kd_dispatcher_ensure_handler_delivery_locked (KdDispatcher *self)
{
  if (self->handler_context != NULL && self->handler_delivery == NULL)
    self->handler_delivery = kd_delivery_new (self->handler_context, "kdispatch handlers",
                                              run_on_context, self);
}

/* By the worker that reached @job, in place of running its handler: the
 * job is deferred and goes to the handler context. The caller settles it
 * (run_job() returns JOB_DEFERRED). */
void
kd_dispatcher_hand_to_context (KdDispatcher *self,
                               KdJob        *job)
{
  g_atomic_int_set (&job->defer, KD_DEFER_ASKED | KD_DEFER_ON_CONTEXT);
  if (self->stage_hooks.deferring != NULL)
    self->stage_hooks.deferring (job, self->stage_data);
  kd_delivery_push (self->handler_delivery, &job->task);
}

static void
on_drained (gpointer user_data)
{
  KdDispatcher *self = user_data;

  g_atomic_int_set (&self->drained_on_context, TRUE);
  g_main_context_wakeup (self->handler_context);
}

/* In wait() or the shutdown: if this thread can acquire the handler
 * context, runs it until every job accepted before the call ended (their
 * handlers need it). */
void
kd_dispatcher_drain_on_context (KdDispatcher *self)
{
  KdDrainWaiter waiter = { NULL, 0, on_drained, self };

  if (self->handler_context == NULL || !g_main_context_acquire (self->handler_context))
    return;

  g_atomic_int_set (&self->drained_on_context, FALSE);
  if (kd_admission_wait_async (&self->admission, &waiter))
    while (!g_atomic_int_get (&self->drained_on_context))
      g_main_context_iteration (self->handler_context, TRUE);
  g_main_context_release (self->handler_context);
}

/**
 * kd_dispatcher_set_handler_context:
 * @self: a dispatcher
 * @context: (nullable): the main context the handler runs in, or %NULL
 *   for the workers
 *
 * Runs the handler in @context's thread rather than on the workers, for a
 * language whose callbacks must run on one thread (JavaScript with GJS),
 * or handlers that touch GTK widgets. The workers then only schedule: each
 * job reaches the context when its key's turn comes, one job per key at a
 * time in the key's order, and ends when its handler returns there, or,
 * if the handler deferred it (kd_job_defer()), when it is returned. Until
 * then its key is held and its unit counts in the bound, as for any
 * running job. The context gets the jobs in batches of at most a few
 * milliseconds, so its other sources (input, redraws) still run.
 *
 * The context must be running (a main loop, or the application iterating
 * it) for jobs to end. kd_dispatcher_wait() and the last unref wait for
 * them: on a thread that can acquire @context (its owner, say the GTK main
 * thread, or any thread while nobody runs it), they run the context
 * themselves until the jobs ended.
 *
 * A pipeline's stage may have one too: what its handlers emit there goes
 * on from the stage's workers once each job ended, so the context never
 * blocks at the next stage's bound. Call before the first submit.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_handler_context (KdDispatcher *self,
                                   GMainContext *context)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC))
    return;
  if (context != NULL)
    g_main_context_ref (context);
  g_clear_pointer (&self->handler_context, g_main_context_unref);
  self->handler_context = context;
}

/**
 * kd_dispatcher_get_handler_context:
 * @self: a dispatcher
 *
 * Gets the context set with kd_dispatcher_set_handler_context().
 *
 * Returns: (transfer none) (nullable): the handler context, or %NULL if
 *   the handler runs on the workers
 *
 * Since: 0.1
 */
GMainContext *
kd_dispatcher_get_handler_context (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), NULL);

  return self->handler_context;
}
