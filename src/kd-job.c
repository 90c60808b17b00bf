/* kd-job.c: what a handler and a done callback see of a job
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include "kd-dispatcher-stage-private.h"
#include "kd-group-private.h"
#include "kd-job-pool-private.h"
#include "kd-job-private.h"
#include "kd-mailbox-private.h"

/**
 * KdJob:
 *
 * One submitted job, as its handler and the done callback see it: its key,
 * its item, the dispatcher's cancellable, and, in a pipeline stage,
 * [method@Kd.Job.emit] to pass items on.
 *
 * A job belongs to the dispatcher; it is valid only during the handler or
 * the done callback it was given to, or, once its handler deferred it
 * ([method@Kd.Job.defer]), until it is returned.
 *
 * Since: 0.1
 */

KdJob *
kd_job_new (KdDispatcher *dispatcher,
            gpointer      item,
            guint         epoch)
{
  KdJob *job = kd_job_pool_alloc ();

  job->task.next = NULL;
  job->task.kind = KD_TASK_JOB;
  job->task.band = KD_BAND_DEFAULT;
  job->dispatcher = dispatcher;
  job->mailbox = NULL;
  job->label = NULL;
  job->ticket = NULL;
  job->result = NULL;
  job->outbox = NULL;
  job->group = NULL;
  job->item = item;
  job->item_kind = KD_ITEM_POINTER;
  job->dropped = FALSE;
  job->defer = 0;
  job->attempt = 0;
  job->error = NULL;
  job->epoch = epoch;

  return job;
}

void
kd_job_free (KdJob *job)
{
  g_assert (job->error == NULL);
  g_clear_pointer (&job->label, kd_label_unref);
  kd_job_pool_free (job);
}

/**
 * kd_job_get_key:
 * @job: a job, as passed to a handler or done callback
 *
 * Gets the key the job was submitted with (in a pipeline's parallel or
 * ordered stage, the key its item carries, though it does not order it).
 * The string belongs to the dispatcher and stays valid while the handler or
 * done callback runs.
 *
 * Thread-safe while @job is valid.
 *
 * Returns: (nullable): the job's key, or %NULL for an unkeyed job
 *
 * Since: 0.1
 */
const char *
kd_job_get_key (KdJob *job)
{
  g_return_val_if_fail (job != NULL, NULL);

  return job->mailbox != NULL ? kd_mailbox_get_key (job->mailbox) : job->label;
}

/**
 * kd_job_get_item:
 * @job: a job, as passed to a handler or done callback
 *
 * Gets the item the job was submitted with. It still belongs to the
 * dispatcher: it is freed with the item-free function after the done
 * callback returned. (A job submitted with a value carries a #GValue
 * pointer here, which kd_job_get_value() returns typed.)
 *
 * Thread-safe while @job is valid.
 *
 * Returns: (transfer none) (nullable): the job's item
 *
 * Since: 0.1
 */
gpointer
kd_job_get_item (KdJob *job)
{
  g_return_val_if_fail (job != NULL, NULL);

  return job->item;
}

/**
 * kd_job_get_value:
 * @job: a job, as passed to a handler or done callback
 *
 * Gets the value a job was submitted with (kd_dispatcher_submit_value()
 * and the other value calls, or kd_job_emit_value() into a pipeline
 * stage). It belongs to the dispatcher, which frees it after the done
 * callback returned (or, once kd_job_emit() handed the job's item over,
 * the pipeline does, at any time); copy it (or take a reference to what it
 * holds) to keep it longer. From Python, this is the object that was
 * submitted.
 *
 * Thread-safe while @job is valid.
 *
 * Returns: (transfer none) (nullable): the job's value, or %NULL if the
 *   job carries a pointer instead (or passed its value on with
 *   kd_job_emit())
 *
 * Since: 0.1
 */
const GValue *
kd_job_get_value (KdJob *job)
{
  g_return_val_if_fail (job != NULL, NULL);

  return job->item_kind == KD_ITEM_VALUE ? job->item : NULL;
}

/**
 * kd_job_get_cancellable:
 * @job: a job, as passed to a handler or done callback
 *
 * Gets the dispatcher's cancellable. A running handler can poll it with
 * g_cancellable_is_cancelled(), or pass it to GIO calls, to stop early when
 * the dispatcher is cancelled.
 *
 * Thread-safe while @job is valid.
 *
 * Returns: (transfer none): the dispatcher's cancellable, never %NULL
 *
 * Since: 0.1
 */
GCancellable *
kd_job_get_cancellable (KdJob *job)
{
  g_return_val_if_fail (job != NULL, NULL);

  return kd_dispatcher_get_cancellable (job->dispatcher);
}

/**
 * kd_job_get_group_cancellable:
 * @job: a job, as passed to a handler or done callback
 *
 * Gets the cancellable of the group the job was submitted through
 * (kd_group_submit() and its variants; see kd_group_get_cancellable()). A
 * handler can poll it, or pass it to GIO calls, to stop early when the
 * group is cancelled or, in fail-fast mode, another of its jobs failed. It
 * stays valid while the job is, even if the application dropped the group.
 *
 * Thread-safe while @job is valid.
 *
 * Returns: (transfer none) (nullable): the cancellable of the job's group,
 *   or %NULL if it was not submitted through one
 *
 * Since: 0.1
 */
GCancellable *
kd_job_get_group_cancellable (KdJob *job)
{
  g_return_val_if_fail (job != NULL, NULL);

  return job->group != NULL ? kd_group_state_get_cancellable (job->group) : NULL;
}

/**
 * kd_job_get_key_state:
 * @job: a job, as passed to a handler
 *
 * Gets the state of the job's key, made by the dispatcher's
 * #KdKeyStateNewFunc (see kd_dispatcher_set_key_state_funcs()). Only the
 * key's running job sees it, so the handler reads and writes it without a
 * lock. Valid in the handler only: once the key has no job left the state
 * is freed.
 *
 * Returns: (transfer none) (nullable): the key's state; %NULL for an unkeyed
 *   job or a dispatcher without key states
 *
 * Since: 0.1
 */
gpointer
kd_job_get_key_state (KdJob *job)
{
  g_return_val_if_fail (job != NULL, NULL);

  return job->mailbox != NULL ? job->mailbox->state : NULL;
}

/**
 * kd_job_get_worker_data:
 * @job: a job, as passed to a handler
 *
 * Gets the data of the worker thread running the handler, made by the
 * dispatcher's #KdWorkerInitFunc (see kd_dispatcher_set_worker_funcs()).
 * Only that worker uses it, so the handler needs no lock.
 *
 * Returns: (transfer none) (nullable): the running worker's data; %NULL
 *   off the dispatcher's workers (the callbacks of a deferred job returned
 *   on another thread, a handler in a handler context) or without worker
 *   functions
 *
 * Since: 0.1
 */
gpointer
kd_job_get_worker_data (KdJob *job)
{
  g_return_val_if_fail (job != NULL, NULL);

  return kd_dispatcher_get_worker_data (job->dispatcher);
}

/**
 * kd_job_get_attempt:
 * @job: a job, as passed to a handler, done callback or dead-letter function
 *
 * Tells which attempt at the job this is: 1 the first time its handler
 * runs, 2 for its first retry, and so on (see kd_dispatcher_set_retry()).
 * In a done callback or dead-letter function, how many times the handler
 * ran; 0 for a job that ended without running.
 *
 * Returns: the attempt, counting from 1
 *
 * Since: 0.1
 */
guint
kd_job_get_attempt (KdJob *job)
{
  g_return_val_if_fail (job != NULL, 0);

  return job->attempt;
}

/**
 * kd_job_emit:
 * @job: a job of a pipeline stage, as passed to the stage's handler
 * @key: (nullable): the emitted item's key
 * @item: (transfer none) (nullable): the item to pass on; the pipeline
 *   owns it from then on (the next stage's item-free function, or the
 *   sink, takes it), unless the call fails
 * @error: return location for a #GError
 *
 * Passes @item on to the pipeline's next stage, or to its sink after the
 * last stage. A handler may emit any number of items, or none (the item is
 * then filtered out). Blocks while the next stage is at its bound, which is
 * how backpressure reaches the first producer. In an ordered stage, what a
 * job emits is held back until the jobs that entered the stage before it
 * (with the same key) are done.
 *
 * If @item is the job's own item, the job hands it over: the stage's
 * item-free function will not run for it, and kd_job_get_item() returns
 * %NULL from then on (for an emit a deferred job makes away from its
 * worker: once its worker passed it on, when the job was returned). (The job's own item of a job submitted with a value
 * goes on as that value.)
 *
 * Call from the stage's handler, or, once the handler deferred the job
 * (kd_job_defer()), from any thread until the job is returned. Only the
 * handler of a job it has not deferred, on its worker, blocks for room: an
 * emit anywhere else (a deferred job's, or a handler's in a handler
 * context) never blocks; what it emits goes on, in order, from one of the
 * stage's workers once the job is returned. After that, from a handler
 * that returned without deferring its job, or from another thread while
 * a handler that has not deferred its job runs, the call is refused with
 * a critical warning.
 *
 * Returns: %TRUE if the pipeline took @item; %FALSE with %KD_ERROR_CLOSED if
 *   the pipeline was cancelled, @item still being the caller's
 *
 * Since: 0.1
 */
gboolean
kd_job_emit (KdJob       *job,
             const char  *key,
             gpointer     item,
             GError     **error)
{
  g_return_val_if_fail (job != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return kd_dispatcher_emit_job (job, key, item,
                                 item == job->item && job->item_kind == KD_ITEM_VALUE
                                   ? KD_ITEM_VALUE
                                   : KD_ITEM_POINTER,
                                 error);
}

/**
 * kd_job_emit_value:
 * @job: a job of a pipeline stage, as passed to the stage's handler
 * @key: (nullable): the emitted value's key
 * @value: the value to pass on: any #GValue, copied
 * @error: return location for a #GError
 *
 * Like kd_job_emit(), with a value: the next stage's job holds a copy of
 * @value (kd_job_get_value()), or, after the last stage, the value sink
 * receives it (kd_pipeline_set_value_sink()). The pipeline frees its copy
 * itself. @value stays the caller's, even if it is the job's own value
 * (kd_job_emit() of the job's own item hands that over without a copy).
 *
 * Call from the stage's handler, or from any thread while the job is
 * deferred, as kd_job_emit().
 *
 * Returns: %TRUE if the pipeline took the value; %FALSE with
 *   %KD_ERROR_CLOSED if the pipeline was cancelled (no copy is kept)
 *
 * Since: 0.1
 */
gboolean
kd_job_emit_value (KdJob         *job,
                   const char    *key,
                   const GValue  *value,
                   GError       **error)
{
  GValue *item;

  g_return_val_if_fail (job != NULL, FALSE);
  g_return_val_if_fail (G_IS_VALUE (value), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  item = kd_item_new_value (value);
  if (kd_dispatcher_emit_job (job, key, item, KD_ITEM_VALUE, error))
    return TRUE;

  kd_item_free_value (item);
  return FALSE;
}
