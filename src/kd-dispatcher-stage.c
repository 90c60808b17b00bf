/* kd-dispatcher-stage.c: what a pipeline reaches of a dispatcher it uses as a stage
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A KdPipeline runs each stage on a dispatcher of its own and reaches it
 * only through kd-dispatcher-stage-private.h: hooks the dispatcher calls
 * (an emit, an ordered stage's claim, each job's end, the stage drained),
 * a submit in two halves (kd_dispatcher_admit(), then
 * kd_dispatcher_push_admitted() or kd_dispatcher_unadmit()), so that an
 * ordered stage takes its ticket only once the job is sure to be
 * accepted, and the hand-back of items that never entered the stage, so
 * that they end through its done callback like its jobs.
 */

#include "config.h"

#include "kd-dispatcher-internal.h"

/* The pipeline's hooks for this stage; before the first submit. */
void
kd_dispatcher_set_stage_hooks (KdDispatcher       *self,
                               const KdStageHooks *hooks,
                               gpointer            user_data)
{
  self->stage_hooks = *hooks;
  self->stage_data = user_data;
}

/* A pipeline stage's submit, in two steps, so that the stage can take a
 * ticket of its own only once the job is sure to be accepted: a blocking
 * admission first, as kd_dispatcher_submit() (@error: KD_ERROR_CLOSED)... */
gboolean
kd_dispatcher_admit (KdDispatcher  *self,
                     guint         *epoch,
                     GError       **error)
{
  return kd_dispatcher_admit_job (self, kd_dispatcher_submit_mode (self, KD_ADMIT_BLOCK), 0, epoch,
                                  error);
}

/* ...then either the job, which keeps @label (transfer full, a
 * kd_label_new() label, nullable) and @ticket; a @keyed job is ordered by
 * @label, any other carries it as its key... */
void
kd_dispatcher_push_admitted (KdDispatcher *self,
                             gboolean      keyed,
                             char         *label,
                             gpointer      item,
                             KdItemKind    kind,
                             gpointer      ticket,
                             guint         epoch)
{
  /* A stage's key bound does not apply to what the stage before emits. */
  kd_dispatcher_push_job (self, keyed ? label : NULL, label, ticket, NULL, NULL, item, kind, epoch,
                          NULL, NULL);
}

/* ...or the unit given back: the submit is refused after all (counted as
 * rejected) and the item stays the caller's. */
void
kd_dispatcher_unadmit (KdDispatcher *self,
                       guint         epoch)
{
  kd_dispatcher_count_rejected (self);
  kd_dispatcher_release_unit (self, KD_ADMISSION_ANY_RELEASER, epoch);
}

/* Frees @item of @kind: a pointer with the item-free function, if any. */
void
kd_dispatcher_free_item (KdDispatcher *self,
                         gpointer      item,
                         KdItemKind    kind)
{
  kd_item_free (kind, item, self->item_free);
}

/* Ends an item that was meant for this stage but never entered it (a
 * pipeline could not pass it on): the done callback sees @error, then the
 * item-free function runs, and the stats count it as submitted and
 * cancelled. Any thread. */
void
kd_dispatcher_hand_back (KdDispatcher *self,
                         const char   *key,
                         gpointer      item,
                         KdItemKind    kind,
                         const GError *error)
{
  KdWorkerStats *others = self->other_stats;
  KdDelivery *delivery = NULL;
  KdJob *job = kd_job_new (self, item, 0);

  job->item_kind = kind;
  job->label = kd_label_new (key);
  __atomic_fetch_add (&self->submitted, 1, __ATOMIC_RELAXED);

  if (self->context != NULL)
    {
      kd_mutex_lock (&self->start_lock);
      delivery = kd_dispatcher_ensure_delivery_locked (self);
      kd_mutex_unlock (&self->start_lock);
    }

  /* It ends like any job of the stage: with a main context, there. */
  if (delivery != NULL)
    {
      job->error = g_error_copy (error);
      __atomic_fetch_add (&others->cancelled, 1, __ATOMIC_RELEASE);
      kd_delivery_push (delivery, &job->task);
    }
  else
    {
      kd_dispatcher_finish_job (self, job, g_error_copy (error));
      __atomic_fetch_add (&others->cancelled, 1, __ATOMIC_RELEASE);
    }
  kd_dispatcher_counters_changed (self);
}

/* kd_job_emit(): what the stage's pipeline does with an emitted item. */
gboolean
kd_dispatcher_emit_job (KdJob       *job,
                        const char  *key,
                        gpointer     item,
                        KdItemKind   kind,
                        GError     **error)
{
  KdDispatcher *self = job->dispatcher;

  gint defer = g_atomic_int_get (&job->defer);
  gboolean away;

  if (self->stage_hooks.emit == NULL)
    {
      g_critical ("kd_job_emit: the job's dispatcher is not a pipeline stage");
      return FALSE;
    }
  if (!(defer & (KD_DEFER_RUNNING | KD_DEFER_ASKED)) || (defer & KD_DEFER_RETURNED))
    {
      g_critical ("kd_job_emit: the job's handler returned without deferring it, or the job "
                  "was returned: nothing takes what it emits now");
      return FALSE;
    }

  /* Its handler, running on its worker, may block there; anyone else (the
   * application's thread once the job is deferred, the handler context)
   * must not, and once the job is deferred even its handler's emits wait
   * with the others, in order, for the job's end. */
  away = (defer & (KD_DEFER_ASKED | KD_DEFER_ON_CONTEXT)) != 0;
  /* A job in the handler context that its handler there did not defer is
   * as a worker's: only that handler, on the context's thread, emits for
   * it. */
  if ((defer & (KD_DEFER_ON_CONTEXT | KD_DEFER_BY_HANDLER)) == KD_DEFER_ON_CONTEXT
        ? !g_main_context_is_owner (self->handler_context)
        : !away && !kd_dispatcher_is_own_worker (self))
    {
      g_critical ("kd_job_emit: called from another thread while the job's handler runs: "
                  "defer the job (kd_job_defer()) to emit from elsewhere");
      return FALSE;
    }
  return self->stage_hooks.emit (job, key, item, kind, away, error, self->stage_data);
}

/* The calling worker's data, if it is one of this dispatcher's workers. */
gpointer
kd_dispatcher_get_worker_data (KdDispatcher *self)
{
  return kd_dispatcher_is_own_worker (self) ? kd_worker_get_data (kd_worker_get_current ()) : NULL;
}
