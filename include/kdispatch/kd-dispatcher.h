/* kd-dispatcher.h: the keyed dispatcher with 2-tier fan-out
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#if !defined(KD_INSIDE) && !defined(KDISPATCH_COMPILATION)
# error "Only <kdispatch/kdispatch.h> can be included directly."
#endif

#include <gio/gio.h>

#include "kd-job.h"
#include "kd-version.h"

G_BEGIN_DECLS

#define KD_TYPE_DISPATCHER (kd_dispatcher_get_type ())

/**
 * KD_DISPATCHER_MAX_WORKERS:
 *
 * The most worker threads a dispatcher, or a pipeline stage, may have.
 * kd_dispatcher_new() refuses more; one worker per processor (0) is
 * clamped to it.
 *
 * Since: 0.1
 */
#define KD_DISPATCHER_MAX_WORKERS 1024

KD_AVAILABLE_IN_ALL
G_DECLARE_FINAL_TYPE (KdDispatcher, kd_dispatcher, KD, DISPATCHER, GObject)

/**
 * KdHandlerFunc:
 * @job: the job to run, borrowed for the duration of the call
 * @user_data: the data given to kd_dispatcher_new()
 * @error: return location for the reason the job failed
 *
 * Runs one job on a worker thread. Jobs of one key never run at the same
 * time and run in submission order.
 *
 * Returns: %TRUE if the job completed, %FALSE with @error set if it failed
 *
 * Since: 0.1
 */
typedef gboolean (*KdHandlerFunc) (KdJob    *job,
                                   gpointer  user_data,
                                   GError  **error);

/**
 * KdDoneFunc:
 * @job: the job that ended, borrowed for the duration of the call
 * @error: (nullable): %NULL if the job completed; the handler's error if it
 *   failed; %G_IO_ERROR_CANCELLED if it ended by cancellation without
 *   running (or, see kd_dispatcher_set_retry(), while it waited for a
 *   retry)
 * @user_data: the data given to kd_dispatcher_set_done_func()
 *
 * Called exactly once for every accepted job, when it ends, before the item
 * is freed.
 *
 * Since: 0.1
 */
typedef void (*KdDoneFunc) (KdJob        *job,
                            const GError *error,
                            gpointer      user_data);

/**
 * KdStats:
 * @submitted: jobs accepted
 * @completed: jobs whose handler returned %TRUE
 * @failed: jobs whose handler returned %FALSE
 * @cancelled: jobs that ended by cancellation: they never ran, or a retry
 *   of theirs never did
 * @rejected: submit calls refused (closed, full or timed out)
 * @pending: jobs accepted and not yet ended
 * @running: handlers running right now
 * @live_keys: keys with work, or parked
 * @retried: failed attempts that were to run again, counted when the retry
 *   is scheduled (see kd_dispatcher_set_retry())
 * @parked_keys: keys parked after a failure (see #KdFailurePolicy)
 * @threads: worker threads running now (fewer than n-workers once idle ones
 *   exited, see kd_dispatcher_set_worker_idle_time(); 0 before the start
 *   and after the shutdown)
 *
 * A snapshot of a dispatcher's counters, filled by kd_dispatcher_get_stats().
 * In every snapshot @submitted == @completed + @failed + @cancelled + @pending.
 *
 * The structure keeps its size and the offsets of its fields in every
 * version of the library: a new counter takes the place of a reserved slot
 * (see the README's "API and ABI"), so a program built against an older
 * version may pass one to a newer library.
 *
 * Since: 0.1
 */
typedef struct
{
  guint64 submitted;
  guint64 completed;
  guint64 failed;
  guint64 cancelled;
  guint64 rejected;
  guint64 pending;
  guint   running;
  guint   live_keys;
  guint64 retried;
  guint   parked_keys;
  guint   threads;

  /*< private >*/
  guint64 reserved[8];
} KdStats;

/**
 * KdFailurePolicy:
 * @KD_FAILURE_CONTINUE: the key's next job runs as if nothing happened
 * @KD_FAILURE_PARK: the key parks: its later jobs, and those submitted
 *   meanwhile, stay queued and untouched until
 *   kd_dispatcher_resume_key() or kd_dispatcher_drop_key()
 *
 * What a key does once one of its jobs ended failed (after its last
 * attempt, see kd_dispatcher_set_retry()). Unkeyed jobs always continue.
 *
 * Since: 0.1
 */
typedef enum
{
  KD_FAILURE_CONTINUE,
  KD_FAILURE_PARK,
} KdFailurePolicy;

/**
 * KdDeadLetterFunc:
 * @job: the job that failed, borrowed for the duration of the call
 * @error: the handler's error from the last attempt
 * @user_data: the data given to kd_dispatcher_set_dead_letter_func()
 *
 * Receives every job that ended failed after its last attempt, on the
 * worker that ran it, before the done callback: the place to store it for
 * later inspection or replay (copy what is needed; the item is freed after
 * the done callback as usual). kd_job_get_attempt() tells how many times it
 * ran.
 *
 * Since: 0.1
 */
typedef void (*KdDeadLetterFunc) (KdJob        *job,
                                  const GError *error,
                                  gpointer      user_data);

/**
 * KdKeyStateNewFunc:
 * @key: the key whose actor starts
 * @user_data: the data given to kd_dispatcher_set_key_state_funcs()
 *
 * Creates the state of a key's actor, on the worker about to run the key's
 * first job since the key had no work.
 *
 * Returns: (transfer none) (nullable): the key's state, the dispatcher's
 *   until its #GDestroyNotify (kd_dispatcher_set_key_state_funcs()) frees
 *   it
 *
 * Since: 0.1
 */
typedef gpointer (*KdKeyStateNewFunc) (const char *key,
                                       gpointer    user_data);

/**
 * KdWorkerInitFunc:
 * @dispatcher: the dispatcher whose worker starts
 * @worker_index: the worker's index, from 0 to the largest number of
 *   workers the dispatcher had - 1
 * @user_data: the data given to kd_dispatcher_set_worker_funcs()
 * @error: return location for the reason the worker cannot run
 *
 * Prepares one worker thread, on that thread, before it runs any job: opens
 * a database connection for it, for example. A worker started by a resize
 * or again after an idle exit (see kd_dispatcher_set_n_workers() and
 * kd_dispatcher_set_worker_idle_time()) runs it too, only once the
 * finalize of the index's previous worker returned.
 *
 * Returns: (transfer none) (nullable): the worker's data, which its handlers
 *   get with kd_job_get_worker_data(), until the #KdWorkerFinalizeFunc
 *   gets it back; %NULL with @error set if the worker cannot run (%NULL
 *   without an error is valid data)
 *
 * Since: 0.1
 */
typedef gpointer (*KdWorkerInitFunc) (KdDispatcher  *dispatcher,
                                      guint          worker_index,
                                      gpointer       user_data,
                                      GError       **error);

/**
 * KdWorkerFinalizeFunc:
 * @dispatcher: the dispatcher whose worker exits
 * @worker_index: the worker's index
 * @worker_data: (transfer none) (nullable): what the #KdWorkerInitFunc
 *   returned, the finalize's to free
 * @user_data: the data given to kd_dispatcher_set_worker_funcs()
 *
 * Cleans up one worker thread, on that thread, as it exits: at the
 * dispatcher's shutdown, or earlier when a resize or its idle time lets it
 * go.
 *
 * Since: 0.1
 */
typedef void (*KdWorkerFinalizeFunc) (KdDispatcher *dispatcher,
                                      guint         worker_index,
                                      gpointer      worker_data,
                                      gpointer      user_data);

KD_AVAILABLE_IN_ALL
KdDispatcher *kd_dispatcher_new              (guint           n_workers,
                                              KdHandlerFunc   handler,
                                              gpointer        user_data,
                                              GDestroyNotify  user_data_free) G_GNUC_WARN_UNUSED_RESULT;

KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_fanout       (KdDispatcher   *self,
                                              guint           n_groups);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_capacity     (KdDispatcher   *self,
                                              guint           capacity);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_item_free    (KdDispatcher   *self,
                                              GDestroyNotify  item_free);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_done_func    (KdDispatcher   *self,
                                              KdDoneFunc      done,
                                              gpointer        user_data,
                                              GDestroyNotify  user_data_free);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_cancellable  (KdDispatcher   *self,
                                              GCancellable   *cancellable);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_key_state_funcs (KdDispatcher      *self,
                                                 KdKeyStateNewFunc  state_new,
                                                 GDestroyNotify     state_free,
                                                 gpointer           user_data,
                                                 GDestroyNotify     user_data_free);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_key_idle_time (KdDispatcher  *self,
                                               gint64         idle_us);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_max_waiting  (KdDispatcher   *self,
                                              guint           max_waiting);
KD_AVAILABLE_IN_ALL
guint         kd_dispatcher_get_max_waiting  (KdDispatcher   *self);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_max_idle_keys (KdDispatcher *self,
                                               guint         max_keys);
KD_AVAILABLE_IN_ALL
guint         kd_dispatcher_get_max_idle_keys (KdDispatcher *self);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_worker_funcs (KdDispatcher         *self,
                                              KdWorkerInitFunc      init,
                                              KdWorkerFinalizeFunc  finalize,
                                              gpointer              user_data,
                                              GDestroyNotify        user_data_free);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_key_capacity (KdDispatcher   *self,
                                              guint           capacity);
KD_AVAILABLE_IN_ALL
guint         kd_dispatcher_get_key_capacity (KdDispatcher   *self);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_retry        (KdDispatcher   *self,
                                              guint           max_attempts,
                                              gint64          initial_delay_us,
                                              gint64          max_delay_us);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_failure_policy (KdDispatcher    *self,
                                                KdFailurePolicy  policy);
KD_AVAILABLE_IN_ALL
KdFailurePolicy kd_dispatcher_get_failure_policy (KdDispatcher  *self);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_dead_letter_func (KdDispatcher     *self,
                                                  KdDeadLetterFunc  func,
                                                  gpointer          user_data,
                                                  GDestroyNotify    user_data_free);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_main_context (KdDispatcher   *self,
                                              GMainContext   *context);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_handler_context (KdDispatcher *self,
                                                 GMainContext *context);
KD_AVAILABLE_IN_ALL
GMainContext *kd_dispatcher_get_handler_context (KdDispatcher *self);
KD_AVAILABLE_IN_ALL
GCancellable *kd_dispatcher_get_cancellable  (KdDispatcher   *self);
KD_AVAILABLE_IN_ALL
GMainContext *kd_dispatcher_get_main_context (KdDispatcher   *self);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_name         (KdDispatcher   *self,
                                              const char     *name);
KD_AVAILABLE_IN_ALL
const char   *kd_dispatcher_get_name         (KdDispatcher   *self);
KD_AVAILABLE_IN_ALL
guint         kd_dispatcher_get_n_workers    (KdDispatcher   *self);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_set_n_workers    (KdDispatcher   *self,
                                              guint           n_workers,
                                              GError        **error);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_set_worker_idle_time (KdDispatcher *self,
                                                  gint64        idle_us,
                                                  guint         min_workers);
KD_AVAILABLE_IN_ALL
gint64        kd_dispatcher_get_worker_idle_time (KdDispatcher *self,
                                                  guint        *min_workers);
KD_AVAILABLE_IN_ALL
guint         kd_dispatcher_get_fanout       (KdDispatcher   *self);
KD_AVAILABLE_IN_ALL
guint         kd_dispatcher_get_capacity     (KdDispatcher   *self);

KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_start            (KdDispatcher   *self,
                                              GError        **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_submit           (KdDispatcher   *self,
                                              const char     *key,
                                              gpointer        item,
                                              GError        **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_try_submit       (KdDispatcher   *self,
                                              const char     *key,
                                              gpointer        item,
                                              GError        **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_submit_timeout   (KdDispatcher   *self,
                                              const char     *key,
                                              gpointer        item,
                                              gint64          timeout_us,
                                              GError        **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_submit_value     (KdDispatcher   *self,
                                              const char     *key,
                                              const GValue   *value,
                                              GError        **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_try_submit_value (KdDispatcher   *self,
                                              const char     *key,
                                              const GValue   *value,
                                              GError        **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_submit_after     (KdDispatcher   *self,
                                              const char     *key,
                                              gpointer        item,
                                              gint64          delay_us,
                                              GError        **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_submit_at        (KdDispatcher   *self,
                                              const char     *key,
                                              gpointer        item,
                                              gint64          due_time,
                                              GError        **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_submit_value_after (KdDispatcher  *self,
                                                const char    *key,
                                                const GValue  *value,
                                                gint64         delay_us,
                                                GError       **error);
KD_AVAILABLE_IN_ALL
guint         kd_dispatcher_submit_many      (KdDispatcher       *self,
                                              const char * const *keys,
                                              gpointer           *items,
                                              guint               n_items,
                                              GError            **error);
KD_AVAILABLE_IN_ALL
guint         kd_dispatcher_try_submit_many  (KdDispatcher       *self,
                                              const char * const *keys,
                                              gpointer           *items,
                                              guint               n_items,
                                              GError            **error);
KD_AVAILABLE_IN_ALL
guint         kd_dispatcher_submit_many_timeout (KdDispatcher       *self,
                                                 const char * const *keys,
                                                 gpointer           *items,
                                                 guint               n_items,
                                                 gint64              timeout_us,
                                                 GError            **error);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_submit_async     (KdDispatcher        *self,
                                              const char          *key,
                                              gpointer             item,
                                              GCancellable        *cancellable,
                                              GAsyncReadyCallback  callback,
                                              gpointer             user_data);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_submit_value_async (KdDispatcher        *self,
                                                const char          *key,
                                                const GValue        *value,
                                                GCancellable        *cancellable,
                                                GAsyncReadyCallback  callback,
                                                gpointer             user_data);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_submit_value_finish (KdDispatcher  *self,
                                                 GAsyncResult  *result,
                                                 GError       **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_submit_finish    (KdDispatcher   *self,
                                              GAsyncResult   *result,
                                              GError        **error);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_wait             (KdDispatcher   *self);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_wait_until       (KdDispatcher   *self,
                                              gint64          end_time);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_wait_async       (KdDispatcher        *self,
                                              GCancellable        *cancellable,
                                              GAsyncReadyCallback  callback,
                                              gpointer             user_data);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_wait_finish      (KdDispatcher   *self,
                                              GAsyncResult   *result,
                                              GError        **error);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_close            (KdDispatcher   *self);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_resume_key       (KdDispatcher   *self,
                                              const char     *key);
KD_AVAILABLE_IN_ALL
gboolean      kd_dispatcher_drop_key         (KdDispatcher   *self,
                                              const char     *key);
KD_AVAILABLE_IN_ALL
char        **kd_dispatcher_list_parked_keys (KdDispatcher   *self);
KD_AVAILABLE_IN_ALL
void          kd_dispatcher_get_stats        (KdDispatcher   *self,
                                              KdStats        *stats);

G_END_DECLS
