/* kd-pipeline.c: stages chained with backpressure, per-key order and one shutdown
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A pipeline is an ordered list of stages, each a KdDispatcher with its own
 * handler, workers and bound. Items enter the first stage through
 * kd_pipeline_submit(); a handler passes items on with kd_job_emit(), which
 * submits them to the next stage, or, after the last stage, gives them to
 * the sink. The stages share one cancellable.
 *
 * Backpressure: emitting is a blocking submit into the next stage, so a full
 * stage holds back the stage before it, and so on up to kd_pipeline_submit():
 * no queue grows without limit. What an ordered stage's item emits while an
 * earlier item of its key still runs waits in the stage's reorder, where it
 * counts against the stage's bound too, so the items in flight are at most
 * the sum of the stage bounds, each ordered stage's counted twice (its
 * items, and what they emitted that waits), but for what waits behind a
 * deferred item of its key, which does not wait for room (kd-reorder.c).
 * Emitting cannot deadlock: a stage's workers only ever wait for stages
 * after it, or, in an ordered stage, for an earlier item of their key,
 * which runs (see kd-reorder.c), and the sink runs on the last stage's
 * worker.
 *
 * A deferred job (or one in a handler context) emits from wherever its
 * work completes: those emits never block there. The job keeps them (an
 * Away list), and its worker passes them on, in order, when the job was
 * returned, before its outcome is judged.
 *
 * Order: a KD_STAGE_KEYED stage is a keyed dispatcher (one job of a key at a
 * time, in order), so what it emits for a key leaves in order. A
 * KD_STAGE_PARALLEL or KD_STAGE_ORDERED stage runs every item as an unkeyed
 * job that still carries its key (kd_job_get_key() returns it). An ordered
 * stage adds a KdReorder: each item takes a ticket as it enters, and what it
 * emits is released downstream in ticket order, per key. So "parse in
 * parallel, then aggregate per client in order" is correct. An ordered
 * stage's job is a place in the scheduler: it runs the oldest item of its
 * key not yet started (stage_claim()), and a job that will be retried
 * waits for it on its worker, so the earliest item of a key always runs,
 * unless it was deferred: then nothing of its key waits for room
 * (kd-reorder.c), and a returned job's retry waits in the timer.
 *
 * Shutdown: kd_pipeline_close() closes the first stage; when a closed stage
 * has drained, it closes the next one (the dispatcher's drained hook), so
 * everything accepted still flows to the end, stage by stage. Cancelling the
 * cancellable closes every stage at once: items not yet run end cancelled in
 * their stage (its done callback and item-free), running handlers see the
 * cancellable, and emitting fails with KD_ERROR_CLOSED, the item staying the
 * handler's. An item an ordered stage had buffered for a stage that is gone
 * is handed back through that stage's done callback and item-free.
 *
 * Ownership: an emitted item belongs to the next stage (freed by its
 * item-free when its job ends there), or to the sink. Emitting a job's own
 * item hands it over: the emitting stage does not free it. A value
 * (kd-item.c) travels with its kind, the pipeline frees it, and the value
 * sink only borrows it.
 *
 * Last unref: closes, lets every stage drain in turn, and drops the stages.
 * From one of the stages' own threads it cannot wait for itself: the
 * shutdown is finished later, as a dispatcher's (see kd-shutdown.c).
 */

#include "config.h"

#include <gio/gio.h>

#include "kd-cancel-watch-private.h"
#include "kd-dispatcher-stage-private.h"
#include "kd-error.h"
#include "kd-job-private.h"
#include "kd-pipeline-private.h"
#include "kd-reorder-private.h"
#include "kd-shutdown-private.h"
#include "kd-sync-private.h"

/* The source tag of kd_pipeline_wait_async()'s tasks. */
#define PIPELINE_WAIT_TAG ((gpointer) (guintptr) kd_pipeline_wait_async)

typedef struct
{
  KdPipeline   *pipeline;     /* not a reference: the pipeline outlives its stages' jobs */
  guint         index;
  KdDispatcher *dispatcher;
  KdStageMode   mode;
  KdReorder    *reorder;      /* KD_STAGE_ORDERED, once configured */
} Stage;


struct _KdPipeline
{
  GObject parent_instance;

  /* Configuration: before the first submit */
  GPtrArray      *stages;        /* Stage * */
  KdSinkFunc      sink;
  gpointer        sink_data;
  GDestroyNotify  sink_destroy;
  KdValueSinkFunc value_sink;
  gpointer        value_sink_data;
  GDestroyNotify  value_sink_destroy;
  GCancellable   *cancellable;
  KdCancelWatch  *cancel_watch;

  /* Set once under @start_lock */
  GMutex          start_lock;
  gint            configured;    /* atomic: the configuration is final */
  gint            started;       /* atomic: every stage's workers run */

  KdShutdown      shutdown;
};

/**
 * KdPipeline:
 *
 * Stages chained by bounded queues, with backpressure from the last
 * stage back to the first producer.
 *
 * Each stage is a [class@Kd.Dispatcher] added with
 * [method@Kd.Pipeline.add_stage]. Its handler passes zero, one or many
 * items to the next stage with [method@Kd.Job.emit]; what the last stage
 * emits goes to the sink ([method@Kd.Pipeline.set_sink]). An emit blocks
 * while the next stage is at its bound, so no queue grows without limit.
 *
 * A stage is keyed (per-key order), parallel, or ordered: an ordered stage
 * runs its items in parallel but releases what they emit in the order the
 * items entered it, per key ([method@Kd.Pipeline.set_stage_mode]).
 *
 * [method@Kd.Pipeline.close] drains the stages one after the other;
 * cancelling the pipeline's cancellable stops every stage, and every item
 * in flight ends exactly once, handed back through its stage's done
 * callback and item-free function. See the [Pipelines](pipelines.html)
 * guide.
 *
 * Since: 0.1
 */
G_DEFINE_FINAL_TYPE (KdPipeline, kd_pipeline, G_TYPE_OBJECT)

static Stage *
stage_at (KdPipeline *self,
          guint       index)
{
  return g_ptr_array_index (self->stages, index);
}

static Stage *
find_stage (KdPipeline   *self,
            KdDispatcher *dispatcher)
{
  guint i;

  for (i = 0; i < self->stages->len; i++)
    if (stage_at (self, i)->dispatcher == dispatcher)
      return stage_at (self, i);

  return NULL;
}

static gboolean
check_configurable (KdPipeline *self,
                    const char *function)
{
  if (G_LIKELY (!g_atomic_int_get (&self->configured)))
    return TRUE;

  g_critical ("%s: a pipeline is configured before its first submit; "
              "this setting is ignored", function);
  return FALSE;
}

static gboolean ensure_started (KdPipeline  *self,
                                GError     **error);

/* Submits @item into @stage according to its mode. @key (transfer full) is
 * a kd_label_new() label or NULL. On FALSE the item is still the caller's.
 *
 * An ordered stage's ticket is taken only once the job is admitted: a
 * ticket given back by a refused submit would pass on what later tickets
 * buffered, from the refused caller's thread, possibly after the stage
 * counted as drained, into a stage already closed. */
static gboolean
enter_stage (Stage      *stage,
             char       *key,
             gpointer    item,
             KdItemKind  kind,
             GError    **error)
{
  KdOrderKey *order;
  guint epoch;

  /* Not only kd_pipeline_submit() feeds the stages: the application may
   * submit to a stage's dispatcher (kd_pipeline_get_stage()), whose
   * handler then emits into the next one. */
  if (!ensure_started (stage->pipeline, error) ||
      !kd_dispatcher_admit (stage->dispatcher, &epoch, error))
    {
      g_clear_pointer (&key, kd_label_unref);
      return FALSE;
    }

  if (stage->mode == KD_STAGE_ORDERED)
    {
      /* The ticket holds the item; the job is only a place in the
       * scheduler for the key, until it starts (see stage_claim()). A
       * thread of the stage's own (its handler submitting to the pipeline)
       * does not wait for room that only the stage's items can make, as
       * for its admission (kd_dispatcher_admit()). */
      order = kd_reorder_enter (stage->reorder, key, item, kind, key, epoch,
                                !kd_dispatcher_runs_here (stage->dispatcher), error);
      if (order == NULL)
        {
          kd_dispatcher_unadmit (stage->dispatcher, epoch);
          g_clear_pointer (&key, kd_label_unref);
          return FALSE;
        }
      kd_dispatcher_push_admitted (stage->dispatcher, FALSE, NULL, NULL, KD_ITEM_POINTER, order,
                                   epoch);
      return TRUE;
    }

  kd_dispatcher_push_admitted (stage->dispatcher, stage->mode == KD_STAGE_KEYED,
                               key, item, kind, NULL, epoch);
  return TRUE;
}

/* Passes what @stage emitted to the next stage, or to the sink. @key is
 * transfer full (a kd_label_new() label or NULL). A pointer goes to the
 * sink, which owns it; a value to the value sink, which borrows it. */
static gboolean
pass_on (Stage      *stage,
         char       *key,
         gpointer    item,
         KdItemKind  kind,
         GError    **error)
{
  KdPipeline *self = stage->pipeline;

  if (stage->index + 1 < self->stages->len)
    return enter_stage (stage_at (self, stage->index + 1), key, item, kind, error);

  if (kind == KD_ITEM_POINTER && self->sink != NULL)
    {
      self->sink (key, item, self->sink_data);
    }
  else
    {
      if (kind == KD_ITEM_VALUE && self->value_sink != NULL)
        self->value_sink (key, item, self->value_sink_data);
      kd_dispatcher_free_item (stage->dispatcher, item, kind);
    }
  g_clear_pointer (&key, kd_label_unref);

  return TRUE;
}

/* The reorder of an ordered stage passes items on with this. */
static gboolean
reorder_pass (const char  *key,
              gpointer     item,
              KdItemKind   kind,
              GError     **error,
              gpointer     user_data)
{
  return pass_on (user_data, kd_label_ref ((char *) key), item, kind, error);
}

/* ...and hands back, through the next stage, what it could not pass on. */
static void
reorder_drop (const char   *key,
              gpointer      item,
              KdItemKind    kind,
              const GError *error,
              gpointer      user_data)
{
  Stage *stage = user_data;
  KdPipeline *self = stage->pipeline;

  /* The sink never refuses: only a next stage can. */
  g_assert (stage->index + 1 < self->stages->len);
  kd_dispatcher_hand_back (stage_at (self, stage->index + 1)->dispatcher, key, item, kind,
                           error);
}

/* What a deferred job (or one in a handler context) emitted away from its
 * worker: kept with the job, newest first, until it ends on a worker. */
typedef struct _Away Away;

struct _Away
{
  Away      *next;
  char      *key;    /* a kd_label_new() label, or NULL */
  gpointer   item;
  KdItemKind kind;
};

static void
keep_away (KdJob      *job,
           char       *key,
           gpointer    item,
           KdItemKind  kind)
{
  Away *away = g_new (Away, 1);
  Away *head = __atomic_load_n ((Away **) &job->outbox, __ATOMIC_RELAXED);

  away->key = key;
  away->item = item;
  away->kind = kind;
  do
    away->next = head;
  while (!__atomic_compare_exchange_n ((Away **) &job->outbox, &head, away, TRUE,
                                       __ATOMIC_RELEASE, __ATOMIC_RELAXED));
}

/* What a job emitted away and the pipeline, cancelled, could not pass on
 * (its ordered stage is closed): handed back through the next stage, or,
 * after the last one, given to the sink, which never refuses. @key is
 * borrowed. */
static void
drop_away (Stage        *stage,
           const char   *key,
           gpointer      item,
           KdItemKind    kind,
           const GError *error)
{
  KdPipeline *self = stage->pipeline;

  if (stage->index + 1 < self->stages->len)
    kd_dispatcher_hand_back (stage_at (self, stage->index + 1)->dispatcher, key, item, kind,
                             error);
  else
    pass_on (stage, key != NULL ? kd_label_ref ((char *) key) : NULL, item, kind, NULL);
}

/* On the worker ending @job, before its outcome is judged: passes on what
 * it emitted away, in the order it emitted it, as its handler's emits
 * would have gone (behind its key's head, an ordered stage's ticket
 * buffers it without waiting: the job was deferred, see kd-reorder.c).
 * The job's own item, emitted, is handed over now, by the only thread
 * that touches the job. What cannot go on (the pipeline was cancelled)
 * ends through the next stage's done callback. */
static void
pass_on_away (Stage *stage,
              KdJob *job)
{
  Away *list = __atomic_exchange_n ((Away **) &job->outbox, NULL, __ATOMIC_ACQUIRE);
  Away *ordered = NULL;

  while (list != NULL)
    {
      Away *next = list->next;

      list->next = ordered;
      ordered = list;
      list = next;
    }

  while (ordered != NULL)
    {
      Away *away = ordered;
      char *key = away->key != NULL ? kd_label_ref (away->key) : NULL;
      GError *error = NULL;
      gboolean passed;

      ordered = away->next;
      if (away->item == job->item && job->item_kind != KD_ITEM_HANDED_OVER)
        {
          job->item = NULL;
          job->item_kind = KD_ITEM_HANDED_OVER;
        }
      if (stage->mode == KD_STAGE_ORDERED && job->ticket != NULL)
        passed = kd_reorder_emit (stage->reorder, job->ticket, away->key, away->item, away->kind,
                                  &error);
      else
        passed = pass_on (stage, away->key, away->item, away->kind, &error);
      if (!passed)
        drop_away (stage, key, away->item, away->kind, error);
      g_clear_error (&error);
      g_clear_pointer (&key, kd_label_unref);
      g_free (away);
    }
}

static gboolean
stage_emit (KdJob       *job,
            const char  *key,
            gpointer     item,
            KdItemKind   kind,
            gboolean     away,
            GError     **error,
            gpointer     user_data)
{
  Stage *stage = user_data;
  char *ref;
  gboolean taken;

  if (g_cancellable_is_cancelled (stage->pipeline->cancellable))
    {
      g_set_error_literal (error, KD_ERROR, KD_ERROR_CLOSED,
                           "The pipeline was cancelled");
      return FALSE;
    }

  /* Passing the job's own key on shares its string. */
  if (key != NULL && job->label != NULL && (key == job->label || key == kd_job_get_key (job)))
    ref = kd_label_ref (job->label);
  else
    ref = kd_label_new (key);

  /* A job submitted to the stage's dispatcher directly has no ticket. */
  /* Kept, the job's own item included: it is handed over when the job's
   * worker passes it on (pass_on_away()), as other threads may still read
   * the job's item now. */
  if (away)
    {
      keep_away (job, ref, item, kind);
      return TRUE;
    }

  if (stage->mode == KD_STAGE_ORDERED && job->ticket != NULL)
    {
      taken = kd_reorder_emit (stage->reorder, job->ticket, ref, item, kind, error);
    }
  else
    {
      taken = pass_on (stage, ref, item, kind, error);
    }

  /* The job's own item went on: its stage must not free it. */
  if (taken && item == job->item && job->item_kind != KD_ITEM_HANDED_OVER)
    {
      job->item = NULL;
      job->item_kind = KD_ITEM_HANDED_OVER;
    }

  return taken;
}

/* An ordered stage's job starts with the oldest item of its key that no
 * job took yet, so that a key's items start in the order they entered
 * (kd-reorder.c says why that matters). */
static void
stage_claim (KdJob    *job,
             gpointer  user_data)
{
  Stage *stage = user_data;

  job->ticket = kd_reorder_claim (stage->reorder, job->ticket, &job->item, &job->item_kind,
                                  &job->label, &job->epoch);
}

/* A job of the stage is about to be deferred: in an ordered stage, what
 * the items of its key emit no longer waits for room (kd-reorder.c). */
static void
stage_deferring (KdJob    *job,
                 gpointer  user_data)
{
  Stage *stage = user_data;

  if (stage->reorder != NULL && job->ticket != NULL)
    kd_reorder_deferred (stage->reorder, job->ticket);
}

static void
stage_returned (KdJob    *job,
                gpointer  user_data)
{
  if (job->outbox != NULL)
    pass_on_away (user_data, job);
}

static void
stage_ended (KdJob    *job,
             gpointer  user_data)
{
  Stage *stage = user_data;

  /* Passed on when the job was returned (stage_returned()); only an emit
   * that raced with the return lands here still. */
  if (G_UNLIKELY (job->outbox != NULL))
    pass_on_away (stage, job);
  if (job->ticket != NULL)
    kd_reorder_leave (stage->reorder, g_steal_pointer (&job->ticket));
}

static void
stage_drained (gpointer user_data)
{
  Stage *stage = user_data;
  KdPipeline *self = stage->pipeline;

  if (stage->index + 1 < self->stages->len)
    kd_dispatcher_close (stage_at (self, stage->index + 1)->dispatcher);
}

static const KdStageHooks stage_hooks = {
  .emit = stage_emit,
  .deferring = stage_deferring,
  .returned = stage_returned,
  .claim = stage_claim,
  .ended = stage_ended,
  .drained = stage_drained,
};

static void
on_cancelled (gpointer user_data)
{
  KdPipeline *self = user_data;
  guint i;

  /* The stages close themselves on the same cancellable; an ordered stage
   * must also stop taking tickets, so nobody blocks for one. */
  for (i = 0; i < self->stages->len; i++)
    if (stage_at (self, i)->reorder != NULL)
      kd_reorder_close (stage_at (self, i)->reorder);
}

/* At the first submit the configuration is final: the ordered stages get
 * their reorders. */
static void
ensure_configured (KdPipeline *self)
{
  guint i;

  if (G_LIKELY (g_atomic_int_get (&self->configured)))
    return;

  kd_mutex_lock (&self->start_lock);
  if (!self->configured)
    {
      for (i = 0; i < self->stages->len; i++)
        {
          Stage *stage = stage_at (self, i);

          /* As many tickets out as the stage admits jobs. */
          if (stage->mode == KD_STAGE_ORDERED)
            stage->reorder = kd_reorder_new (kd_dispatcher_get_capacity (stage->dispatcher),
                                             reorder_pass, reorder_drop, stage);
        }
      self->cancel_watch = kd_cancel_watch_new (self->cancellable, on_cancelled, self);
      g_atomic_int_set (&self->configured, TRUE);
    }
  kd_mutex_unlock (&self->start_lock);
}

/* Before an item enters: every stage's workers run, so that one that
 * cannot start (no thread to be had, a worker init failed) refuses the
 * submit with its error rather than a later emit. Tried again at the next
 * submit until it succeeds. */
static gboolean
ensure_started (KdPipeline  *self,
                GError     **error)
{
  guint i;

  if (G_LIKELY (g_atomic_int_get (&self->started)))
    return TRUE;

  ensure_configured (self);
  for (i = 0; i < self->stages->len; i++)
    if (!kd_dispatcher_start (stage_at (self, i)->dispatcher, error))
      return FALSE;
  g_atomic_int_set (&self->started, TRUE);
  return TRUE;
}

static gboolean
runs_on_a_stage (KdPipeline *self)
{
  guint i;

  for (i = 0; i < self->stages->len; i++)
    if (kd_dispatcher_runs_here (stage_at (self, i)->dispatcher))
      return TRUE;

  return FALSE;
}

/* The main context whose dispatch of a stage's done callbacks (or
 * counters' notify) runs on this thread, if any: a last unref there must
 * not wait for the stages (see kd-shutdown.c). */
static GMainContext *
dispatching_for_a_stage (KdPipeline *self)
{
  GMainContext *context = NULL;
  guint i;

  for (i = 0; i < self->stages->len && context == NULL; i++)
    context = kd_dispatcher_dispatching_here (stage_at (self, i)->dispatcher);

  return context;
}

static void
close_for_shutdown (GObject *object)
{
  kd_pipeline_close (KD_PIPELINE (object));
}

/* Close, let every accepted item end, join the stages' workers. */
static void
finish_shutdown (GObject *object)
{
  KdPipeline *self = KD_PIPELINE (object);

  kd_pipeline_close (self);
  kd_pipeline_wait (self);
  g_clear_pointer (&self->cancel_watch, kd_cancel_watch_free);
}

static void
kd_pipeline_dispose (GObject *object)
{
  KdPipeline *self = KD_PIPELINE (object);

  /* On one of our own threads, which cannot wait for itself, the shutdown
   * finishes later (see kd-shutdown.c). */
  kd_shutdown_dispose (&self->shutdown, object,
                       runs_on_a_stage (self) ? KD_SHUTDOWN_OWN_THREAD : KD_SHUTDOWN_ELSEWHERE,
                       dispatching_for_a_stage (self),
                       close_for_shutdown, finish_shutdown);

  G_OBJECT_CLASS (kd_pipeline_parent_class)->dispose (object);
}

static void
kd_pipeline_finalize (GObject *object)
{
  KdPipeline *self = KD_PIPELINE (object);
  static const KdStageHooks no_hooks = { 0 };
  guint i;

  /* Every stage has drained: no job runs any more. Someone may still hold
   * a stage; it must not reach back into this pipeline. */
  for (i = 0; i < self->stages->len; i++)
    {
      Stage *stage = stage_at (self, i);

      kd_dispatcher_set_stage_hooks (stage->dispatcher, &no_hooks, NULL);
      g_object_unref (stage->dispatcher);
      g_clear_pointer (&stage->reorder, kd_reorder_free);
      g_free (stage);
    }
  g_ptr_array_unref (self->stages);

  if (self->sink_destroy != NULL)
    self->sink_destroy (self->sink_data);
  if (self->value_sink_destroy != NULL)
    self->value_sink_destroy (self->value_sink_data);
  g_clear_object (&self->cancellable);
  g_mutex_clear (&self->start_lock);

  G_OBJECT_CLASS (kd_pipeline_parent_class)->finalize (object);
}

static void
kd_pipeline_class_init (KdPipelineClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->dispose = kd_pipeline_dispose;
  object_class->finalize = kd_pipeline_finalize;
}

static void
kd_pipeline_init (KdPipeline *self)
{
  self->stages = g_ptr_array_new ();
  self->cancellable = g_cancellable_new ();
  g_mutex_init (&self->start_lock);
}

/**
 * kd_pipeline_new:
 *
 * Creates an empty pipeline. Add stages with kd_pipeline_add_stage(), then
 * submit items from any thread.
 *
 * Returns: (transfer full): a new pipeline
 *
 * Since: 0.1
 */
KdPipeline *
kd_pipeline_new (void)
{
  return g_object_new (KD_TYPE_PIPELINE, NULL);
}

/**
 * kd_pipeline_add_stage:
 * @self: a pipeline
 * @name: (nullable): the stage's name, for debug messages
 * @n_workers: the stage's worker threads, at most
 *   %KD_DISPATCHER_MAX_WORKERS; 0 for one per processor
 * @handler: (scope notified) (closure user_data) (destroy user_data_free): runs
 *   each item of the stage; passes items on with kd_job_emit()
 * @user_data: data for @handler
 * @user_data_free: (nullable): frees @user_data once the stage is finalized
 *
 * Appends a stage. The returned dispatcher is the stage: configure it
 * (capacity, item-free function, done callback, fan-out) before the first
 * submit. Its cancellable is the pipeline's. A stage is keyed unless
 * kd_pipeline_set_stage_mode() says otherwise.
 *
 * Before the first submit.
 *
 * Returns: (transfer none) (nullable): the stage's dispatcher, owned by the
 *   pipeline; %NULL (with a critical message) if @n_workers is above
 *   %KD_DISPATCHER_MAX_WORKERS or the pipeline already started
 *
 * Since: 0.1
 */
KdDispatcher *
kd_pipeline_add_stage (KdPipeline     *self,
                       const char     *name,
                       guint           n_workers,
                       KdHandlerFunc   handler,
                       gpointer        user_data,
                       GDestroyNotify  user_data_free)
{
  Stage *stage;

  g_return_val_if_fail (KD_IS_PIPELINE (self), NULL);
  g_return_val_if_fail (handler != NULL, NULL);
  g_return_val_if_fail (n_workers <= KD_DISPATCHER_MAX_WORKERS, NULL);

  if (!check_configurable (self, G_STRFUNC))
    return NULL;

  stage = g_new0 (Stage, 1);
  stage->pipeline = self;
  stage->index = self->stages->len;
  stage->mode = KD_STAGE_KEYED;
  stage->dispatcher = kd_dispatcher_new (n_workers, handler, user_data, user_data_free);
  kd_dispatcher_set_name (stage->dispatcher, name);
  kd_dispatcher_set_cancellable (stage->dispatcher, self->cancellable);
  kd_dispatcher_set_stage_hooks (stage->dispatcher, &stage_hooks, stage);
  g_ptr_array_add (self->stages, stage);

  return stage->dispatcher;
}

/**
 * kd_pipeline_set_stage_mode:
 * @self: a pipeline
 * @stage: one of the pipeline's stages
 * @mode: how the stage orders its items
 *
 * Sets how a stage orders its items (see #KdStageMode). Before the first
 * submit.
 *
 * In a %KD_STAGE_ORDERED stage, what an item emits while an earlier item of
 * its key still runs waits in the stage until that one ended, and counts
 * against the stage's bound (kd_dispatcher_set_capacity()) with the items
 * in the stage: once the bound is reached, kd_job_emit() waits for room
 * (or fails with %KD_ERROR_CLOSED on cancellation, the item staying the
 * handler's). This cannot wait for ever, whatever the number of workers:
 * a key's items start in the order they entered, so the item waited for
 * is running (an item that failed and will be retried waits for its retry
 * on its worker, see kd_dispatcher_set_retry()). While an item of a key is
 * deferred (kd_job_defer(), or a handler context), what the items of that
 * key emit does not wait for room: it is buffered beyond the bound.
 *
 * Since: 0.1
 */
void
kd_pipeline_set_stage_mode (KdPipeline   *self,
                            KdDispatcher *stage,
                            KdStageMode   mode)
{
  Stage *found;

  g_return_if_fail (KD_IS_PIPELINE (self));
  g_return_if_fail (mode <= KD_STAGE_ORDERED);

  found = find_stage (self, stage);
  g_return_if_fail (found != NULL);

  if (check_configurable (self, G_STRFUNC))
    found->mode = mode;
}

/**
 * kd_pipeline_get_n_stages:
 * @self: a pipeline
 *
 * Gets how many stages were added with kd_pipeline_add_stage().
 *
 * Returns: the number of stages
 *
 * Since: 0.1
 */
guint
kd_pipeline_get_n_stages (KdPipeline *self)
{
  g_return_val_if_fail (KD_IS_PIPELINE (self), 0);

  return self->stages->len;
}

/**
 * kd_pipeline_get_stage:
 * @self: a pipeline
 * @index: a stage's position, from 0
 *
 * Gets the dispatcher of the stage at @index, as kd_pipeline_add_stage()
 * returned it.
 *
 * Returns: (transfer none): the stage's dispatcher
 *
 * Since: 0.1
 */
KdDispatcher *
kd_pipeline_get_stage (KdPipeline *self,
                       guint       index)
{
  g_return_val_if_fail (KD_IS_PIPELINE (self), NULL);
  g_return_val_if_fail (index < self->stages->len, NULL);

  return stage_at (self, index)->dispatcher;
}

/**
 * kd_pipeline_set_sink:
 * @self: a pipeline
 * @sink: (nullable) (scope notified) (closure user_data) (destroy user_data_free):
 *   receives what the last stage emits
 * @user_data: data for @sink
 * @user_data_free: (nullable): frees @user_data once the pipeline is finalized
 *
 * Sets where the last stage's emitted items go. The sink owns each item it
 * receives. Without a sink, they are freed with the last stage's item-free
 * function. Values (kd_job_emit_value()) go to the value sink instead (see
 * kd_pipeline_set_value_sink()). Before the first submit.
 *
 * Since: 0.1
 */
void
kd_pipeline_set_sink (KdPipeline     *self,
                      KdSinkFunc      sink,
                      gpointer        user_data,
                      GDestroyNotify  user_data_free)
{
  g_return_if_fail (KD_IS_PIPELINE (self));

  if (!check_configurable (self, G_STRFUNC))
    return;

  if (self->sink_destroy != NULL)
    self->sink_destroy (self->sink_data);
  self->sink = sink;
  self->sink_data = user_data;
  self->sink_destroy = user_data_free;
}

/**
 * kd_pipeline_set_value_sink:
 * @self: a pipeline
 * @sink: (nullable) (scope notified) (closure user_data) (destroy user_data_free):
 *   receives the values the last stage emits
 * @user_data: data for @sink
 * @user_data_free: (nullable): frees @user_data once the pipeline is finalized
 *
 * Sets where the values the last stage emits go (kd_job_emit_value(), or
 * kd_job_emit() of a job's own value), as kd_pipeline_set_sink() does for
 * pointers. The sink borrows each value for the call: the pipeline frees
 * it when the sink returns, so the sink keeps what it needs (from Python,
 * the object itself). Without a value sink, values are freed unseen.
 * Before the first submit.
 *
 * Since: 0.1
 */
void
kd_pipeline_set_value_sink (KdPipeline      *self,
                            KdValueSinkFunc  sink,
                            gpointer         user_data,
                            GDestroyNotify   user_data_free)
{
  g_return_if_fail (KD_IS_PIPELINE (self));

  if (!check_configurable (self, G_STRFUNC))
    return;

  if (self->value_sink_destroy != NULL)
    self->value_sink_destroy (self->value_sink_data);
  self->value_sink = sink;
  self->value_sink_data = user_data;
  self->value_sink_destroy = user_data_free;
}

/**
 * kd_pipeline_set_cancellable:
 * @self: a pipeline
 * @cancellable: the cancellable that stops every stage
 *
 * Replaces the pipeline's own cancellable, for every stage. Cancelling it
 * stops every stage: items not yet run end cancelled in their stage (done
 * callback, item-free), running handlers see it, and emitting fails with
 * %KD_ERROR_CLOSED. Before the first submit.
 *
 * Since: 0.1
 */
void
kd_pipeline_set_cancellable (KdPipeline   *self,
                             GCancellable *cancellable)
{
  guint i;

  g_return_if_fail (KD_IS_PIPELINE (self));
  g_return_if_fail (G_IS_CANCELLABLE (cancellable));

  if (!check_configurable (self, G_STRFUNC))
    return;

  g_set_object (&self->cancellable, cancellable);
  for (i = 0; i < self->stages->len; i++)
    kd_dispatcher_set_cancellable (stage_at (self, i)->dispatcher, cancellable);
}

/**
 * kd_pipeline_get_cancellable:
 * @self: a pipeline
 *
 * Gets the cancellable that stops every stage: the pipeline's own, or
 * the one given to kd_pipeline_set_cancellable().
 *
 * Returns: (transfer none): the cancellable every stage shares
 *
 * Since: 0.1
 */
GCancellable *
kd_pipeline_get_cancellable (KdPipeline *self)
{
  g_return_val_if_fail (KD_IS_PIPELINE (self), NULL);

  return self->cancellable;
}

/**
 * kd_pipeline_submit:
 * @self: a pipeline
 * @key: (nullable): the item's key
 * @item: (nullable): the item
 * @error: return location for a #GError
 *
 * Submits an item to the first stage; blocks while it is at its bound. On
 * success the pipeline owns @item; on failure (%KD_ERROR_CLOSED once the
 * pipeline is closed or cancelled) it is still the caller's. A submit
 * blocked at the bound when the pipeline closes fails; one the first stage
 * already admitted (an ordered stage's item waiting for its place in the
 * order) is accepted and flows through like any other.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the first stage accepted the item
 *
 * Since: 0.1
 */
gboolean
kd_pipeline_submit (KdPipeline  *self,
                    const char  *key,
                    gpointer     item,
                    GError     **error)
{
  g_return_val_if_fail (KD_IS_PIPELINE (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);
  g_return_val_if_fail (self->stages->len > 0, FALSE);

  return enter_stage (stage_at (self, 0), kd_label_new (key), item, KD_ITEM_POINTER, error);
}

/**
 * kd_pipeline_submit_value:
 * @self: a pipeline
 * @key: (nullable): the item's key
 * @value: the item: any #GValue, copied
 * @error: return location for a #GError
 *
 * Like kd_pipeline_submit(), with a value for the item, as
 * kd_dispatcher_submit_value(): the first stage's job holds a copy of
 * @value, which its handler reads with kd_job_get_value() and passes on
 * with kd_job_emit_value(); a value the last stage emits goes to the value
 * sink (kd_pipeline_set_value_sink()). The pipeline frees every copy
 * itself. A refused submit keeps no copy.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the item was accepted
 *
 * Since: 0.1
 */
gboolean
kd_pipeline_submit_value (KdPipeline    *self,
                          const char    *key,
                          const GValue  *value,
                          GError       **error)
{
  GValue *item;

  g_return_val_if_fail (KD_IS_PIPELINE (self), FALSE);
  g_return_val_if_fail (G_IS_VALUE (value), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);
  g_return_val_if_fail (self->stages->len > 0, FALSE);

  item = kd_item_new_value (value);
  if (enter_stage (stage_at (self, 0), kd_label_new (key), item, KD_ITEM_VALUE, error))
    return TRUE;

  kd_item_free_value (item);
  return FALSE;
}

/**
 * kd_pipeline_submit_many:
 * @self: a pipeline
 * @keys: (array length=n_items) (nullable): the items' keys, one per item
 *   (an element may be %NULL), or %NULL if no item has a key
 * @items: (array length=n_items) (element-type guintptr): the items
 * @n_items: how many items
 * @error: return location for a #GError
 *
 * Submits a batch of items to the first stage, as kd_pipeline_submit()
 * would one after another, in array order (so each key's items keep that
 * order through the pipeline), blocking while the first stage is at its
 * bound. Each item enters the first stage on its own: the batch saves the
 * calls, not the admission of each item.
 *
 * The items taken are the first ones of the array, and the return value
 * says how many: the pipeline owns those; the rest are still the
 * caller's. Fewer than @n_items are taken only if the pipeline is closed
 * or cancelled during the call (%KD_ERROR_CLOSED), or from a thread of
 * the first stage at its bound (%KD_ERROR_FULL); @error is set exactly
 * then.
 *
 * Thread-safe.
 *
 * Returns: how many items were taken, from the first one on
 *
 * Since: 0.1
 */
guint
kd_pipeline_submit_many (KdPipeline          *self,
                         const char * const  *keys,
                         gpointer            *items,
                         guint                n_items,
                         GError             **error)
{
  guint i;

  g_return_val_if_fail (KD_IS_PIPELINE (self), 0);
  g_return_val_if_fail (items != NULL || n_items == 0, 0);
  g_return_val_if_fail (error == NULL || *error == NULL, 0);
  g_return_val_if_fail (self->stages->len > 0, 0);

  for (i = 0; i < n_items; i++)
    if (!enter_stage (stage_at (self, 0), kd_label_new (keys != NULL ? keys[i] : NULL),
                      items[i], KD_ITEM_POINTER, error))
      break;
  return i;
}

/**
 * kd_pipeline_close:
 * @self: a pipeline
 *
 * Stops accepting items, and lets everything accepted flow to the end: the
 * first stage closes now, and each stage closes once the one before it has
 * drained. Does not wait; kd_pipeline_wait() does.
 *
 * Thread-safe and idempotent.
 *
 * Since: 0.1
 */
void
kd_pipeline_close (KdPipeline *self)
{
  g_return_if_fail (KD_IS_PIPELINE (self));

  if (self->stages->len > 0)
    kd_dispatcher_close (stage_at (self, 0)->dispatcher);
}

/**
 * kd_pipeline_wait:
 * @self: a pipeline
 *
 * Returns once every item submitted before the call has left the pipeline:
 * reached the sink, been dropped by a handler that emitted nothing, or
 * ended failed or cancelled in some stage.
 *
 * Thread-safe, but not from the threads of the pipeline's stages (their
 * handlers, done callbacks on their workers, key-state frees on their
 * timers): a stage waiting for the stages before it could wait for ever
 * for one that waits for room in it. From there it logs a critical and
 * returns at once.
 *
 * Since: 0.1
 */
void
kd_pipeline_wait (KdPipeline *self)
{
  guint i;

  g_return_if_fail (KD_IS_PIPELINE (self));

  if (runs_on_a_stage (self))
    {
      g_critical ("kd_pipeline_wait: called from one of the pipeline's own threads, "
                  "which would wait for itself");
      return;
    }

  /* Once a stage's jobs from before the call ended, what they emitted is
   * in the next stage (an ordered stage passes on its buffered items
   * before its last job ends), so waiting stage after stage covers all. */
  for (i = 0; i < self->stages->len; i++)
    kd_dispatcher_wait (stage_at (self, i)->dispatcher);
}

/**
 * kd_pipeline_wait_until:
 * @self: a pipeline
 * @end_time: the monotonic time to give up at, as g_get_monotonic_time()
 *   counts it
 *
 * Like kd_pipeline_wait(), but gives up at @end_time: returns %TRUE once
 * every item submitted before the call has left the pipeline, %FALSE if
 * @end_time came first. Giving up changes nothing for the items.
 *
 * Thread-safe, but not from the threads of the pipeline's stages, as
 * kd_pipeline_wait(): from there it logs a critical and returns %FALSE.
 *
 * Returns: whether every item submitted before the call has left the
 *   pipeline
 *
 * Since: 0.1
 */
gboolean
kd_pipeline_wait_until (KdPipeline *self,
                        gint64      end_time)
{
  guint i;

  g_return_val_if_fail (KD_IS_PIPELINE (self), FALSE);

  if (runs_on_a_stage (self))
    {
      g_critical ("kd_pipeline_wait_until: called from one of the pipeline's own threads, "
                  "which would wait for itself");
      return FALSE;
    }

  /* Stage after stage, as kd_pipeline_wait(). */
  for (i = 0; i < self->stages->len; i++)
    if (!kd_dispatcher_wait_until (stage_at (self, i)->dispatcher, end_time))
      return FALSE;
  return TRUE;
}

static void wait_stage_async (GTask *task);

/* A stage's jobs from before the wait ended: on to the next stage. */
static void
stage_waited (GObject      *source,
              GAsyncResult *result,
              gpointer      user_data)
{
  GTask *task = user_data;
  GMainContext *context = g_task_get_context (task);
  GError *error = NULL;

  if (!kd_dispatcher_wait_finish (KD_DISPATCHER (source), result, &error))
    {
      g_task_return_error (task, error);
      g_object_unref (task);
      return;
    }

  /* The next stage's wait completes in the same context. The push holds
   * it: the task may be gone when wait_stage_async() returns. */
  g_main_context_push_thread_default (context);
  wait_stage_async (task);
  g_main_context_pop_thread_default (context);
}

/* Waits for the stage the task's data numbers, or returns. */
static void
wait_stage_async (GTask *task)
{
  KdPipeline *self = g_task_get_source_object (task);
  guint stage = GPOINTER_TO_UINT (g_task_get_task_data (task));

  if (stage == self->stages->len)
    {
      g_task_return_boolean (task, TRUE);
      g_object_unref (task);
      return;
    }

  g_task_set_task_data (task, GUINT_TO_POINTER (stage + 1), NULL);
  kd_dispatcher_wait_async (stage_at (self, stage)->dispatcher, g_task_get_cancellable (task),
                            stage_waited, task);
}

/**
 * kd_pipeline_wait_async:
 * @self: a pipeline
 * @cancellable: (nullable): stops waiting (the items are not touched)
 * @callback: (scope async) (closure user_data): called in the caller's
 *   thread-default main context once every item submitted before the call
 *   has left the pipeline
 * @user_data: data for @callback
 *
 * The barrier of kd_pipeline_wait() without blocking, stage after stage
 * as kd_dispatcher_wait_async() waits for one dispatcher. Cancelling
 * @cancellable completes it with %G_IO_ERROR_CANCELLED. Finish with
 * kd_pipeline_wait_finish(). Holds a reference to @self until @callback
 * ran.
 *
 * Since: 0.1
 */
void
kd_pipeline_wait_async (KdPipeline          *self,
                        GCancellable        *cancellable,
                        GAsyncReadyCallback  callback,
                        gpointer             user_data)
{
  GTask *task;

  g_return_if_fail (KD_IS_PIPELINE (self));
  g_return_if_fail (cancellable == NULL || G_IS_CANCELLABLE (cancellable));

  task = g_task_new (self, cancellable, callback, user_data);
  g_task_set_source_tag (task, PIPELINE_WAIT_TAG);
  g_task_set_name (task, "kd_pipeline_wait_async");
  g_task_set_task_data (task, GUINT_TO_POINTER (0), NULL);
  wait_stage_async (task);
}

/**
 * kd_pipeline_wait_finish:
 * @self: a pipeline
 * @result: the #GAsyncResult given to the callback of
 *   kd_pipeline_wait_async()
 * @error: return location for a #GError
 *
 * Tells how an async wait ended.
 *
 * Returns: %TRUE once every item it waited for had left the pipeline;
 *   %FALSE with %G_IO_ERROR_CANCELLED if it was cancelled first
 *
 * Since: 0.1
 */
gboolean
kd_pipeline_wait_finish (KdPipeline    *self,
                         GAsyncResult  *result,
                         GError       **error)
{
  g_return_val_if_fail (KD_IS_PIPELINE (self), FALSE);
  g_return_val_if_fail (g_task_is_valid (result, self), FALSE);
  g_return_val_if_fail (g_async_result_is_tagged (result, PIPELINE_WAIT_TAG), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return g_task_propagate_boolean (G_TASK (result), error);
}

/* For tests: sleeps until @n_sleeping threads wait for a ticket of the
 * ordered stage @stage. Ends the configuration, as a submit does. */
void
kd_pipeline_wait_ticket_sleepers (KdPipeline   *self,
                                  KdDispatcher *stage,
                                  guint         n_sleeping)
{
  Stage *found = find_stage (self, stage);

  /* Configuring creates the ordered stages' reorders. */
  ensure_configured (self);
  g_return_if_fail (found != NULL && found->reorder != NULL);
  kd_reorder_wait_sleepers (found->reorder, n_sleeping);
}
