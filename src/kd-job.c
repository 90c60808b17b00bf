/* kd-job.c: what a handler and a done callback see of a job
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include "kd-job-pool-private.h"
#include "kd-job-private.h"
#include "kd-mailbox-private.h"

KdJob *
kd_job_new (KdDispatcher *dispatcher,
            gpointer      item,
            guint         epoch)
{
  KdJob *job = kd_job_pool_alloc ();

  job->task.next = NULL;
  job->task.kind = KD_TASK_JOB;
  job->dispatcher = dispatcher;
  job->mailbox = NULL;
  job->item = item;
  job->error = NULL;
  job->epoch = epoch;

  return job;
}

void
kd_job_free (KdJob *job)
{
  g_assert (job->error == NULL);
  kd_job_pool_free (job);
}

/**
 * kd_job_get_key:
 * @job: a job, as passed to a handler or done callback
 *
 * Gets the key the job was submitted with. The string belongs to the
 * dispatcher and stays valid while the handler or done callback runs.
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

  return job->mailbox != NULL ? kd_mailbox_get_key (job->mailbox) : NULL;
}

/**
 * kd_job_get_item:
 * @job: a job, as passed to a handler or done callback
 *
 * Gets the item the job was submitted with. It still belongs to the
 * dispatcher: it is freed with the item-free function after the done
 * callback returned.
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
