/* kd-dispatcher-workers.c: a running dispatcher's set of worker threads
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * n-workers is the number of worker threads a busy dispatcher runs. Before
 * the workers start it is configuration; once they run,
 * kd_dispatcher_set_n_workers() resizes them (kd_scheduler_resize()):
 * growing starts the new threads at once and reports a failure to make
 * one or a failed worker init; shrinking lets each worker above the count
 * finish the task it runs (a key's batch) and exit, leaving its queued
 * tasks to the others. No job moves out of its key's order: tasks stay in
 * the queues they were in, and a key's batch always runs on one thread.
 *
 * Idle workers may exit (kd_dispatcher_set_worker_idle_time()): one that
 * slept that long with no task goes, running its worker finalize, while
 * more than the minimum are ready; a submit that finds no parked worker
 * and fewer threads than n-workers starts one again, whose worker init
 * runs anew. At least one worker always stays ready, so an accepted job
 * never waits for a thread that cannot be made: a start on demand that
 * fails costs parallelism only (a warning says so, and no start on demand
 * is tried again until the next resize).
 *
 * Worker indices (the worker functions')
 * stay below the largest n-workers the dispatcher had; each index has at
 * most one thread at a time, so per-worker state indexed by it stays the
 * worker's own. The per-worker counters (KdWorkerStats, the admission's
 * releasers) live in KdSlots, made for every index before its first
 * thread starts and never moved, so readers need no lock while a resize
 * adds more. @resize_lock orders the resizes among themselves and with the
 * start (whose worker inits run while it is held, and may not resize);
 * @start_lock orders the idle settings with the start, which hands them
 * to the scheduler.
 */

#include "config.h"

#include <gio/gio.h>

#include "kd-dispatcher-internal.h"
#include "kd-dispatcher-private.h"
#include "kd-error.h"

/* Under @resize_lock: counters for workers 0 to @n_workers - 1, before any
 * of them starts. */
void
kd_dispatcher_add_worker_slots (KdDispatcher *self,
                                guint         n_workers)
{
  kd_slots_grow (&self->worker_stats, n_workers);
  kd_admission_add_releasers (&self->admission, n_workers);
}

static guint
workers_for (guint n_workers)
{
  return n_workers > 0 ? n_workers : MIN (g_get_num_processors (), KD_DISPATCHER_MAX_WORKERS);
}

/**
 * kd_dispatcher_set_n_workers:
 * @self: a dispatcher
 * @n_workers: the number of worker threads, at most
 *   %KD_DISPATCHER_MAX_WORKERS; 0 for one per processor
 * @error: return location for a #GError
 *
 * Sets how many worker threads the dispatcher runs. Before the workers
 * start this is configuration, like #KdDispatcher:n-workers. On a running
 * dispatcher it resizes it without losing or reordering a job: growing
 * starts the new workers at once (their worker init runs, see
 * kd_dispatcher_set_worker_funcs()) and returns once each started (those
 * that idle workers left below the old count start again on demand);
 * shrinking returns at once and starts nothing, and each worker above the
 * new count exits once the task it runs ended (a key's batch), its worker
 * finalize run, leaving its queued jobs to the others.
 *
 * If a thread cannot be made or a worker init fails, the dispatcher keeps
 * the workers that started (n-workers stops after the last of them),
 * starts none on demand until the next call, and the call fails with that
 * error. A closed dispatcher refuses with
 * %KD_ERROR_CLOSED. Calling it from a worker init or finalize fails with
 * %G_IO_ERROR_WOULD_BLOCK: the resize could wait for that very worker.
 *
 * Worker indices stay below the largest n-workers the dispatcher had.
 *
 * Returns: %TRUE if the dispatcher runs @n_workers workers (or will)
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_set_n_workers (KdDispatcher  *self,
                             guint          n_workers,
                             GError       **error)
{
  KdScheduler *scheduler;
  gboolean ok = TRUE;

  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (n_workers <= KD_DISPATCHER_MAX_WORKERS, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (kd_dispatcher_in_worker_hook (self))
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK,
                           "A worker's init or finalize cannot resize its own dispatcher");
      return FALSE;
    }
  n_workers = workers_for (n_workers);

  kd_mutex_lock (&self->resize_lock);
  scheduler = g_atomic_pointer_get (&self->scheduler);
  if (kd_admission_is_closed (&self->admission))
    {
      g_set_error_literal (error, KD_ERROR, KD_ERROR_CLOSED, "The dispatcher is closed");
      ok = FALSE;
    }
  else if (scheduler == NULL)
    {
      self->n_workers = n_workers;
    }
  else
    {
      kd_dispatcher_add_worker_slots (self, n_workers);
      ok = kd_scheduler_resize (scheduler, n_workers, error);
      self->n_workers = kd_scheduler_get_n_workers (scheduler);
      g_debug ("dispatcher %p: resized to %u workers", (gpointer) self, self->n_workers);
    }
  kd_mutex_unlock (&self->resize_lock);

  g_object_notify_by_pspec (G_OBJECT (self), kd_dispatcher_properties[PROP_N_WORKERS]);
  return ok;
}

/* The n-workers property: at construction, configuration; later, a resize
 * with nobody to report an error to but a warning. */
void
kd_dispatcher_set_n_workers_property (KdDispatcher *self,
                                      guint         n_workers)
{
  GError *error = NULL;

  if (!kd_dispatcher_set_n_workers (self, n_workers, &error))
    {
      g_warning ("Could not set n-workers of a kdispatch dispatcher to %u: %s",
                 n_workers, error->message);
      g_error_free (error);
    }
}

/**
 * kd_dispatcher_get_n_workers:
 * @self: a dispatcher
 *
 * Gets the number of worker threads the dispatcher runs when it is busy
 * (see kd_dispatcher_set_n_workers(); idle ones may have exited, see
 * kd_dispatcher_set_worker_idle_time(), and after a failed start on
 * demand none is started again until the next resize).
 *
 * Returns: the number of workers
 *
 * Since: 0.1
 */
guint
kd_dispatcher_get_n_workers (KdDispatcher *self)
{
  KdScheduler *scheduler;

  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  /* Once started, the scheduler's: a failed grow lowers it. */
  scheduler = g_atomic_pointer_get (&self->scheduler);
  if (scheduler != NULL)
    return kd_scheduler_get_n_workers (scheduler);
  return __atomic_load_n (&self->n_workers, __ATOMIC_RELAXED);
}

/**
 * kd_dispatcher_set_worker_idle_time:
 * @self: a dispatcher
 * @idle_us: how long a worker waits for a job before it exits, in
 *   microseconds; 0 (the default) keeps every worker for the dispatcher's
 *   life
 * @min_workers: how many workers stay however long they idle, at least 1
 *
 * Lets idle worker threads exit, as GThreadPool's idle time does: a worker
 * that waited @idle_us for a job exits, running its worker finalize,
 * while more than @min_workers are left. A job submitted when no worker
 * waits starts one again, up to n-workers, and its worker init runs anew.
 * At any time, from any thread; the workers take the new values at their
 * next wait.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_worker_idle_time (KdDispatcher *self,
                                    gint64        idle_us,
                                    guint         min_workers)
{
  KdScheduler *scheduler;

  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (idle_us >= 0);

  kd_mutex_lock (&self->start_lock);
  self->worker_idle_us = idle_us;
  self->min_workers = MAX (min_workers, 1);
  scheduler = self->scheduler;
  if (scheduler != NULL)
    kd_scheduler_set_idle_exit (scheduler, self->worker_idle_us, self->min_workers);
  kd_mutex_unlock (&self->start_lock);
}

/**
 * kd_dispatcher_get_worker_idle_time:
 * @self: a dispatcher
 * @min_workers: (out) (optional): the workers kept however long they idle
 *
 * Gets what kd_dispatcher_set_worker_idle_time() set.
 *
 * Returns: how long an idle worker waits before it exits, in microseconds;
 *   0 if idle workers stay
 *
 * Since: 0.1
 */
gint64
kd_dispatcher_get_worker_idle_time (KdDispatcher *self,
                                    guint        *min_workers)
{
  gint64 idle_us;

  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  kd_mutex_lock (&self->start_lock);
  idle_us = self->worker_idle_us;
  if (min_workers != NULL)
    *min_workers = self->min_workers;
  kd_mutex_unlock (&self->start_lock);

  return idle_us;
}

/* The worker threads running now (KdStats.threads). */
guint
kd_dispatcher_count_threads (KdDispatcher *self)
{
  KdScheduler *scheduler = g_atomic_pointer_get (&self->scheduler);

  return scheduler != NULL ? kd_scheduler_get_n_threads (scheduler) : 0;
}
