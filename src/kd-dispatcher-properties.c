/* kd-dispatcher-properties.c: a dispatcher's properties, configuration and counters
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * What can be set and read of a KdDispatcher from outside: the GObject
 * properties, the configuration setters and getters that have no file of
 * their own (failure policies, key states and async submission keep
 * theirs there; kd_dispatcher_start() is the core's), and the counters.
 *
 * Configuration happens before the first submit, from the thread that
 * configures the dispatcher; then it is final (kd_dispatcher_check_configurable()),
 * so the workers read it without locks.
 *
 * The counters live where they change: each worker counts the jobs it
 * ended on a cache line of its own (KdWorkerStats), the submitters count
 * what they submitted and what was refused. kd_dispatcher_get_stats() sums
 * them, re-reading until no job ended meanwhile, so that every snapshot
 * adds up. Their properties notify in the dispatcher's main context (or
 * its creator's thread-default one), never on a worker: a change arms a
 * KdNotifier, which notifies the counters that changed NOTIFY_INTERVAL_US
 * later (see kd-notifier.c).
 */

#include "config.h"

#include <string.h>

#include "kd-dispatcher-internal.h"
#include "kd-dispatcher-private.h"

/* How often get_stats re-reads the counters looking for a quiet moment. */
#define STATS_ATTEMPTS 1000

/* How soon after a change of the counters their properties notify. */
#define NOTIFY_INTERVAL_US (100 * G_TIME_SPAN_MILLISECOND)

GParamSpec *kd_dispatcher_properties[N_PROPS];

static void notify_counters (GObject *object);

/* The notifier of the counters, created at the first change, when the
 * configuration (the main context) is final. */
KdNotifier *
kd_dispatcher_ensure_notifier (KdDispatcher *self)
{
  KdNotifier *notifier;

  kd_mutex_lock (&self->start_lock);
  notifier = self->notifier;
  if (notifier == NULL)
    {
      notifier = kd_notifier_new (G_OBJECT (self),
                                  self->context != NULL ? self->context : self->creation_context,
                                  NOTIFY_INTERVAL_US, notify_counters);
      g_atomic_pointer_set (&self->notifier, notifier);
    }
  kd_mutex_unlock (&self->start_lock);

  return notifier;
}

/* Configuration calls are refused, loudly, once jobs were submitted: the
 * workers read the configuration without locks. */
gboolean
kd_dispatcher_check_configurable (KdDispatcher *self,
                                  const char   *function)
{
  if (G_LIKELY (!g_atomic_int_get (&self->configured)))
    return TRUE;

  g_critical ("%s: a dispatcher is configured before its first submit; "
              "this setting is ignored", function);
  return FALSE;
}

/* In the notifier's context: notifies the counters that changed since the
 * last time. */
static void
notify_counters (GObject *object)
{
  KdDispatcher *self = KD_DISPATCHER (object);
  guint waiting = (guint) __atomic_load_n (&self->n_waiting, __ATOMIC_RELAXED);
  guint idle_keys = kd_key_table_count_idle (self->keys);
  static const guint counters[] = {
    PROP_SUBMITTED, PROP_COMPLETED, PROP_FAILED, PROP_CANCELLED, PROP_REJECTED,
    PROP_PENDING, PROP_RUNNING, PROP_LIVE_KEYS, PROP_WAITING, PROP_IDLE_KEYS,
  };
  gboolean changed[G_N_ELEMENTS (counters)];
  gboolean any = FALSE;
  KdStats now;
  guint i;

  kd_dispatcher_get_stats (self, &now);
  changed[0] = now.submitted != self->notified.submitted;
  changed[1] = now.completed != self->notified.completed;
  changed[2] = now.failed != self->notified.failed;
  changed[3] = now.cancelled != self->notified.cancelled;
  changed[4] = now.rejected != self->notified.rejected;
  changed[5] = now.pending != self->notified.pending;
  changed[6] = now.running != self->notified.running;
  changed[7] = now.live_keys != self->notified.live_keys;
  changed[8] = waiting != self->notified_waiting;
  changed[9] = idle_keys != self->notified_idle_keys;
  self->notified = now;
  self->notified_waiting = waiting;
  self->notified_idle_keys = idle_keys;

  g_object_freeze_notify (object);
  for (i = 0; i < G_N_ELEMENTS (counters); i++)
    if (changed[i])
      {
        g_object_notify_by_pspec (object, kd_dispatcher_properties[counters[i]]);
        any = TRUE;
      }
  g_object_thaw_notify (object);

  /* Look once more, after a quiet spell (see kd-notifier.c). */
  if (any)
    kd_dispatcher_counters_changed (self);
}

static void
kd_dispatcher_get_property (GObject    *object,
                            guint       prop_id,
                            GValue     *value,
                            GParamSpec *pspec)
{
  KdDispatcher *self = KD_DISPATCHER (object);
  KdStats stats;

  if (prop_id >= PROP_SUBMITTED && prop_id <= PROP_LIVE_KEYS)
    kd_dispatcher_get_stats (self, &stats);

  switch (prop_id)
    {
    case PROP_N_WORKERS:
      g_value_set_uint (value, kd_dispatcher_get_n_workers (self));
      break;
    case PROP_FANOUT:
      g_value_set_uint (value, kd_dispatcher_get_fanout (self));
      break;
    case PROP_CAPACITY:
      g_value_set_uint (value, kd_dispatcher_get_capacity (self));
      break;
    case PROP_NAME:
      g_value_set_string (value, self->name);
      break;
    case PROP_CANCELLABLE:
      g_value_set_object (value, self->cancellable);
      break;
    case PROP_MAIN_CONTEXT:
      g_value_set_boxed (value, self->context);
      break;
    case PROP_MAX_IDLE_KEYS:
      g_value_set_uint (value, self->max_idle_keys);
      break;
    case PROP_MAX_WAITING:
      g_value_set_uint (value, kd_dispatcher_get_max_waiting (self));
      break;
    case PROP_SUBMITTED:
      g_value_set_uint64 (value, stats.submitted);
      break;
    case PROP_COMPLETED:
      g_value_set_uint64 (value, stats.completed);
      break;
    case PROP_FAILED:
      g_value_set_uint64 (value, stats.failed);
      break;
    case PROP_CANCELLED:
      g_value_set_uint64 (value, stats.cancelled);
      break;
    case PROP_REJECTED:
      g_value_set_uint64 (value, stats.rejected);
      break;
    case PROP_PENDING:
      g_value_set_uint64 (value, stats.pending);
      break;
    case PROP_RUNNING:
      g_value_set_uint (value, stats.running);
      break;
    case PROP_LIVE_KEYS:
      g_value_set_uint (value, stats.live_keys);
      break;
    case PROP_WAITING:
      g_value_set_uint (value, (guint) __atomic_load_n (&self->n_waiting, __ATOMIC_RELAXED));
      break;
    case PROP_IDLE_KEYS:
      g_value_set_uint (value, kd_key_table_count_idle (self->keys));
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
kd_dispatcher_set_property (GObject      *object,
                            guint         prop_id,
                            const GValue *value,
                            GParamSpec   *pspec)
{
  KdDispatcher *self = KD_DISPATCHER (object);

  switch (prop_id)
    {
    case PROP_N_WORKERS:
      kd_dispatcher_set_n_workers_property (self, g_value_get_uint (value));
      break;
    case PROP_FANOUT:
      kd_dispatcher_set_fanout (self, g_value_get_uint (value));
      break;
    case PROP_CAPACITY:
      kd_dispatcher_set_capacity (self, g_value_get_uint (value));
      break;
    case PROP_NAME:
      kd_dispatcher_set_name (self, g_value_get_string (value));
      break;
    case PROP_CANCELLABLE:
      /* NULL at construction: keep the dispatcher's own. */
      if (g_value_get_object (value) != NULL)
        kd_dispatcher_set_cancellable (self, g_value_get_object (value));
      break;
    case PROP_MAIN_CONTEXT:
      kd_dispatcher_set_main_context (self, g_value_get_boxed (value));
      break;
    case PROP_MAX_IDLE_KEYS:
      kd_dispatcher_set_max_idle_keys (self, g_value_get_uint (value));
      break;
    case PROP_MAX_WAITING:
      kd_dispatcher_set_max_waiting (self, g_value_get_uint (value));
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static GParamSpec *
counter_param (const char *name,
               const char *blurb)
{
  return g_param_spec_uint64 (name, NULL, blurb, 0, G_MAXUINT64, 0,
                              G_PARAM_READABLE | G_PARAM_EXPLICIT_NOTIFY | G_PARAM_STATIC_STRINGS);
}

/* From the class init: the properties, and the functions that read and
 * write them. */
void
kd_dispatcher_install_properties (GObjectClass *object_class)
{
  GParamFlags config = G_PARAM_READWRITE | G_PARAM_EXPLICIT_NOTIFY | G_PARAM_STATIC_STRINGS;
  GParamFlags counter = G_PARAM_READABLE | G_PARAM_EXPLICIT_NOTIFY | G_PARAM_STATIC_STRINGS;

  object_class->get_property = kd_dispatcher_get_property;
  object_class->set_property = kd_dispatcher_set_property;

  /**
   * KdDispatcher:n-workers:
   *
   * The number of worker threads, at most %KD_DISPATCHER_MAX_WORKERS; 0
   * means one per processor (at most %KD_DISPATCHER_MAX_WORKERS).
   * Writable at any time: on a running dispatcher, setting it is
   * kd_dispatcher_set_n_workers(), with a warning if that fails.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_N_WORKERS] =
    g_param_spec_uint ("n-workers", NULL, NULL, 0, KD_DISPATCHER_MAX_WORKERS, 0,
                       G_PARAM_READWRITE | G_PARAM_EXPLICIT_NOTIFY | G_PARAM_STATIC_STRINGS);

  /**
   * KdDispatcher:fanout:
   *
   * The number of worker groups the input queue fans out to (see
   * kd_dispatcher_set_fanout()), from 1 to %KD_DISPATCHER_MAX_WORKERS.
   * Writable until the first submit.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_FANOUT] =
    g_param_spec_uint ("fanout", NULL, NULL, 1, KD_DISPATCHER_MAX_WORKERS, 1, config);

  /**
   * KdDispatcher:capacity:
   *
   * The admission bound (see kd_dispatcher_set_capacity()). Writable until
   * the first submit.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_CAPACITY] =
    g_param_spec_uint ("capacity", NULL, NULL, 1, KD_ADMISSION_CAPACITY_MAX, DEFAULT_CAPACITY,
                       config);

  /**
   * KdDispatcher:name:
   *
   * The name in debug messages. Writable until the first submit.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_NAME] = g_param_spec_string ("name", NULL, NULL, NULL, config);

  /**
   * KdDispatcher:cancellable:
   *
   * The cancellable that shuts the dispatcher down (see
   * kd_dispatcher_set_cancellable()). Writable until the first submit.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_CANCELLABLE] =
    g_param_spec_object ("cancellable", NULL, NULL, G_TYPE_CANCELLABLE, config);

  /**
   * KdDispatcher:main-context:
   *
   * Where done callbacks run, and where the counters notify (see
   * kd_dispatcher_set_main_context()). Writable until the first submit.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_MAIN_CONTEXT] =
    g_param_spec_boxed ("main-context", NULL, NULL, G_TYPE_MAIN_CONTEXT, config);

  /**
   * KdDispatcher:submitted:
   *
   * Jobs accepted so far. Like every counter property it notifies in the
   * dispatcher's main context (#KdDispatcher:main-context, or else the
   * thread-default context of the thread that created the dispatcher),
   * never on a worker: at most every 100 ms while it changes, and once more
   * after the last change.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_SUBMITTED] = counter_param ("submitted", NULL);

  /**
   * KdDispatcher:completed:
   *
   * Jobs whose handler returned %TRUE.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_COMPLETED] = counter_param ("completed", NULL);

  /**
   * KdDispatcher:failed:
   *
   * Jobs whose handler returned %FALSE.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_FAILED] = counter_param ("failed", NULL);

  /**
   * KdDispatcher:cancelled:
   *
   * Jobs that ended without running.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_CANCELLED] = counter_param ("cancelled", NULL);

  /**
   * KdDispatcher:rejected:
   *
   * Submissions refused (closed, full or timed out).
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_REJECTED] = counter_param ("rejected", NULL);

  /**
   * KdDispatcher:pending:
   *
   * Jobs accepted and not yet ended.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_PENDING] = counter_param ("pending", NULL);

  /**
   * KdDispatcher:running:
   *
   * Handlers running right now.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_RUNNING] = g_param_spec_uint ("running", NULL, NULL, 0, G_MAXUINT, 0, counter);

  /**
   * KdDispatcher:live-keys:
   *
   * Keys with jobs pending.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_LIVE_KEYS] = g_param_spec_uint ("live-keys", NULL, NULL, 0, G_MAXUINT, 0, counter);

  /**
   * KdDispatcher:waiting:
   *
   * Async submissions waiting for room (see kd_dispatcher_submit_async()).
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_WAITING] = g_param_spec_uint ("waiting", NULL, NULL, 0, G_MAXUINT, 0, counter);

  /**
   * KdDispatcher:max-idle-keys:
   *
   * The most keys that keep their state while idle (see
   * kd_dispatcher_set_max_idle_keys()). Writable until the first submit.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_MAX_IDLE_KEYS] =
    g_param_spec_uint ("max-idle-keys", NULL, NULL, 1, G_MAXINT32, DEFAULT_MAX_IDLE_KEYS, config);

  /**
   * KdDispatcher:max-waiting:
   *
   * The most async submissions that may wait for room (see
   * kd_dispatcher_set_max_waiting()); the capacity unless set. Writable
   * until the first submit.
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_MAX_WAITING] =
    g_param_spec_uint ("max-waiting", NULL, NULL, 1, G_MAXINT32, DEFAULT_CAPACITY, config);

  /**
   * KdDispatcher:idle-keys:
   *
   * Keys with no work that keep their state for the idle time (see
   * kd_dispatcher_set_key_idle_time()).
   *
   * Since: 0.1
   */
  kd_dispatcher_properties[PROP_IDLE_KEYS] = g_param_spec_uint ("idle-keys", NULL, NULL, 0, G_MAXUINT, 0, counter);

  g_object_class_install_properties (object_class, N_PROPS, kd_dispatcher_properties);
}

/**
 * kd_dispatcher_set_fanout:
 * @self: a dispatcher
 * @n_groups: the number of worker groups, from 1 to
 *   %KD_DISPATCHER_MAX_WORKERS
 *
 * Sets how many worker groups the input queue fans out to (the second
 * tier of the 2-tier fan-out): the workers are split among them as evenly
 * as possible, and each group has a queue of its own, which its workers
 * feed from the input queue in batches. More groups mean less contention
 * on one group's queue with many workers; an idle worker takes work from
 * another group's queue, so no job waits behind a busy group. A value
 * above the number of workers is clamped to it. The default is 1.
 *
 * The groups carry ready keys, jobs of a #KdGroup, async submissions,
 * retries and a pipeline's items. A plain unkeyed job (kd_dispatcher_submit()
 * and the like with a %NULL key) waits in a queue of its own that every
 * worker takes from directly, one job at a time, taking from it and from
 * its group in turn; that queue holds as many jobs as the capacity, up to
 * 16,384; beyond that, or when the queue refuses for a moment (a worker
 * that took a job's slot is preempted before it gives the slot back),
 * they go through the groups too.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_fanout (KdDispatcher *self,
                          guint         n_groups)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (n_groups > 0 && n_groups <= KD_DISPATCHER_MAX_WORKERS);

  if (kd_dispatcher_check_configurable (self, G_STRFUNC) && self->fanout != n_groups)
    {
      self->fanout = n_groups;
      g_object_notify_by_pspec (G_OBJECT (self), kd_dispatcher_properties[PROP_FANOUT]);
    }
}

/**
 * kd_dispatcher_get_fanout:
 * @self: a dispatcher
 *
 * Gets the number of worker groups, after clamping to the number of
 * workers (the number when the workers started, once they did: a resize
 * keeps the groups).
 *
 * Returns: the fan-out
 *
 * Since: 0.1
 */
guint
kd_dispatcher_get_fanout (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  return g_atomic_pointer_get (&self->scheduler) != NULL
         ? self->fanout
         : MIN (self->fanout, kd_dispatcher_get_n_workers (self));
}


/**
 * kd_dispatcher_set_capacity:
 * @self: a dispatcher
 * @capacity: the most jobs that may be pending at once, at least 1
 *
 * Sets the admission bound: jobs accepted and not yet ended, running ones
 * included. A submit that finds it reached blocks; kd_dispatcher_try_submit()
 * fails with %KD_ERROR_FULL and kd_dispatcher_submit_timeout() with
 * %KD_ERROR_TIMEOUT. Values above 2^31 - 1 are clamped. The default is 1024.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_capacity (KdDispatcher *self,
                            guint         capacity)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (capacity > 0);

  if (kd_dispatcher_check_configurable (self, G_STRFUNC) && self->admission.capacity != capacity)
    {
      kd_admission_set_capacity (&self->admission, capacity);
      g_object_notify_by_pspec (G_OBJECT (self), kd_dispatcher_properties[PROP_CAPACITY]);
    }
}

/**
 * kd_dispatcher_get_capacity:
 * @self: a dispatcher
 *
 * Gets the admission bound.
 *
 * Returns: the most jobs that may be pending at once
 *
 * Since: 0.1
 */
guint
kd_dispatcher_get_capacity (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  return self->admission.capacity;
}

/**
 * kd_dispatcher_set_item_free:
 * @self: a dispatcher
 * @item_free: (nullable): frees an item once its job ended
 *
 * Sets the function that frees each accepted job's item, exactly once, after
 * the job's done callback returned, %NULL items included (as GLib's
 * containers do). It never runs for items whose submit was refused: those
 * stay the caller's. Nor for values (kd_dispatcher_submit_value()), which
 * the dispatcher frees itself.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_item_free (KdDispatcher   *self,
                             GDestroyNotify  item_free)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (kd_dispatcher_check_configurable (self, G_STRFUNC))
    self->item_free = item_free;
}

/**
 * kd_dispatcher_set_done_func:
 * @self: a dispatcher
 * @done: (nullable) (scope notified) (closure user_data) (destroy user_data_free):
 *   called once for every accepted job when it ends
 * @user_data: data for @done
 * @user_data_free: (nullable): frees @user_data once the dispatcher is finalized
 *
 * Sets the callback that sees every job end: with a %NULL error if the
 * handler completed it, with the handler's error if it failed, with
 * %G_IO_ERROR_CANCELLED if it never ran. It runs on the worker that ended the
 * job, or in the main context set with kd_dispatcher_set_main_context(),
 * and in per-key order in both cases.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_done_func (KdDispatcher   *self,
                             KdDoneFunc      done,
                             gpointer        user_data,
                             GDestroyNotify  user_data_free)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC))
    return;

  if (self->done_data_free != NULL)
    self->done_data_free (self->done_data);

  self->done = done;
  self->done_data = user_data;
  self->done_data_free = user_data_free;
}

/**
 * kd_dispatcher_set_worker_funcs:
 * @self: a dispatcher
 * @init: (nullable) (scope notified) (closure user_data) (destroy user_data_free):
 *   prepares each worker thread
 * @finalize: (nullable) (scope forever): cleans up each worker thread
 * @user_data: data for @init and @finalize
 * @user_data_free: (nullable): frees @user_data once the dispatcher is
 *   finalized
 *
 * Gives each worker thread its own data: @init runs once on each worker
 * thread when the workers start, before it runs any job, and what it returns
 * is what that worker's handlers get from kd_job_get_worker_data() (a
 * database connection per worker, for example; used without locks, as only
 * that thread sees it). @finalize runs on each worker thread as it exits,
 * with that data.
 *
 * If @init fails on one worker, no job runs: every worker exits (those
 * whose @init succeeded run @finalize) and the call that started the
 * workers fails with @init's error, leaving the dispatcher unstarted. Start
 * the workers with kd_dispatcher_start() to learn of the failure before
 * submitting; otherwise the first submit starts them and fails with the
 * error, the item staying the caller's.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_worker_funcs (KdDispatcher         *self,
                                KdWorkerInitFunc      init,
                                KdWorkerFinalizeFunc  finalize,
                                gpointer              user_data,
                                GDestroyNotify        user_data_free)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC))
    return;

  if (self->worker_data_free != NULL)
    self->worker_data_free (self->worker_data);

  self->worker_init = init;
  self->worker_finalize = finalize;
  self->worker_data = user_data;
  self->worker_data_free = user_data_free;
}

/**
 * kd_dispatcher_set_cancellable:
 * @self: a dispatcher
 * @cancellable: the cancellable that shuts the dispatcher down
 *
 * Replaces the dispatcher's own cancellable, for example to share one among
 * several dispatchers. Cancelling it closes the dispatcher, ends every job
 * that has not started with %G_IO_ERROR_CANCELLED (through the done callback
 * and the item-free function) and lets running handlers see it through
 * kd_job_get_cancellable(). If @cancellable is already cancelled, the
 * dispatcher is closed at once.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_cancellable (KdDispatcher *self,
                               GCancellable *cancellable)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (G_IS_CANCELLABLE (cancellable));

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC) || cancellable == self->cancellable)
    return;

  g_clear_pointer (&self->cancel_watch, kd_cancel_watch_free);
  g_set_object (&self->cancellable, cancellable);
  self->cancel_watch = kd_cancel_watch_new (cancellable, kd_dispatcher_on_cancelled, self);
  g_object_notify_by_pspec (G_OBJECT (self), kd_dispatcher_properties[PROP_CANCELLABLE]);
}

/**
 * kd_dispatcher_get_cancellable:
 * @self: a dispatcher
 *
 * Gets the cancellable that shuts the dispatcher down. Thread-safe once
 * configuration is over.
 *
 * Returns: (transfer none): the cancellable, never %NULL
 *
 * Since: 0.1
 */
GCancellable *
kd_dispatcher_get_cancellable (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), NULL);

  return self->cancellable;
}

/**
 * kd_dispatcher_set_main_context:
 * @self: a dispatcher
 * @context: (nullable): where done callbacks run, or %NULL for the workers
 *
 * Makes done callbacks (and the item-free function) run in @context, in
 * per-key order, for example the GTK main loop's. They are delivered in
 * slices of at most 5 ms, between which the context's other sources run. A job delivered there has
 * ended as soon as its handler returned: it no longer counts against the
 * bound, and kd_dispatcher_wait() does not wait for its delivery, so the
 * thread that iterates @context may itself submit. The last unref delivers
 * what is still queued before it returns: if a thread is iterating @context,
 * that thread delivers them and the unref waits for it; if no thread owns
 * @context, the unref acquires it, as GLib lets any thread that owns a
 * context dispatch it, and runs them in its own thread. So drop the last
 * reference from the context's thread if the callbacks must run there.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_main_context (KdDispatcher *self,
                                GMainContext *context)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC) || context == self->context)
    return;

  if (context != NULL)
    g_main_context_ref (context);
  g_clear_pointer (&self->context, g_main_context_unref);
  self->context = context;
  g_object_notify_by_pspec (G_OBJECT (self), kd_dispatcher_properties[PROP_MAIN_CONTEXT]);
}

/**
 * kd_dispatcher_get_main_context:
 * @self: a dispatcher
 *
 * Gets the main context done callbacks run in.
 *
 * Returns: (transfer none) (nullable): the context, or %NULL if done
 *   callbacks run on the workers
 *
 * Since: 0.1
 */
GMainContext *
kd_dispatcher_get_main_context (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), NULL);

  return self->context;
}

/**
 * kd_dispatcher_get_stats:
 * @self: a dispatcher
 * @stats: (out caller-allocates): where to store the counters
 *
 * Takes a snapshot of the dispatcher's counters. In every snapshot
 * `submitted == completed + failed + cancelled + pending`. The counters are
 * read when no job is ending, if such a moment comes within a few
 * attempts; under a heavy load @pending may count a job that ended while
 * the snapshot was being taken.
 *
 * Thread-safe.
 *
 * Since: 0.1
 */
void
kd_dispatcher_get_stats (KdDispatcher *self,
                         KdStats      *stats)
{
  guint64 ended_before = 0;
  guint attempt;
  guint i, n_slots;

  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (stats != NULL);

  n_slots = kd_slots_length (&self->worker_stats);

  for (attempt = 0; attempt < STATS_ATTEMPTS; attempt++)
    {
      guint64 ended_after = 0;

      memset (stats, 0, sizeof *stats);
      for (i = 0; i <= n_slots; i++)
        {
          KdWorkerStats *worker = i < n_slots ? KD_SLOTS_GET (&self->worker_stats, i, KdWorkerStats)
                                              : self->other_stats;

          stats->completed += __atomic_load_n (&worker->completed, __ATOMIC_ACQUIRE);
          stats->failed += __atomic_load_n (&worker->failed, __ATOMIC_ACQUIRE);
          stats->cancelled += __atomic_load_n (&worker->cancelled, __ATOMIC_ACQUIRE);
          stats->running += (guint) __atomic_load_n (&worker->running, __ATOMIC_RELAXED);
        }
      /* Read after the ended counters: every job counted as ended was
       * counted as submitted before, so pending cannot go negative. */
      stats->submitted = __atomic_load_n (&self->submitted, __ATOMIC_ACQUIRE);

      for (i = 0; i <= n_slots; i++)
        {
          KdWorkerStats *worker = i < n_slots ? KD_SLOTS_GET (&self->worker_stats, i, KdWorkerStats)
                                              : self->other_stats;

          ended_after += __atomic_load_n (&worker->completed, __ATOMIC_ACQUIRE) +
                         __atomic_load_n (&worker->failed, __ATOMIC_ACQUIRE) +
                         __atomic_load_n (&worker->cancelled, __ATOMIC_ACQUIRE);
        }

      ended_before = stats->completed + stats->failed + stats->cancelled;
      if (ended_after == ended_before)
        break;
    }

  stats->pending = stats->submitted - ended_before;
  stats->rejected = __atomic_load_n (&self->rejected, __ATOMIC_RELAXED);

  stats->live_keys = kd_key_table_count (self->keys);
  for (i = 0; i < n_slots; i++)
    stats->retried += __atomic_load_n (&KD_SLOTS_GET (&self->worker_stats, i, KdWorkerStats)->retried,
                                       __ATOMIC_RELAXED);
  stats->retried += __atomic_load_n (&self->other_stats->retried, __ATOMIC_RELAXED);
  stats->parked_keys = kd_parked_keys_count (&self->parked);
  stats->threads = kd_dispatcher_count_threads (self);
}

/* Sleeps until @n_blocked submitters are blocked waiting for room. */
void
kd_dispatcher_wait_blocked_submitters (KdDispatcher *self,
                                       guint         n_blocked)
{
  kd_admission_wait_sleepers (&self->admission, n_blocked);
}

/* Sleeps until at least @n_blocked submits wait for room in @key (or in
 * keys that share its shard). */
void
kd_dispatcher_wait_blocked_on_key (KdDispatcher *self,
                                   const char   *key,
                                   guint         n_blocked)
{
  kd_key_table_wait_blocked (self->keys, key, n_blocked);
}

/* How many of @key's jobs count against the per-key bound right now. */
guint
kd_dispatcher_count_key_jobs (KdDispatcher *self,
                              const char   *key)
{
  return kd_key_table_count_jobs (self->keys, key);
}

/* The exact number of jobs holding a unit of admission right now. */
guint
kd_dispatcher_get_admitted (KdDispatcher *self)
{
  return kd_admission_get_pending (&self->admission);
}

/**
 * kd_dispatcher_set_name:
 * @self: a dispatcher
 * @name: (nullable): a name for debug messages, such as a pipeline stage's
 *
 * Names the dispatcher in its debug messages. Call before the first submit.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_name (KdDispatcher *self,
                        const char   *name)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC) || g_strcmp0 (name, self->name) == 0)
    return;

  g_free (self->name);
  self->name = g_strdup (name);
  g_object_notify_by_pspec (G_OBJECT (self), kd_dispatcher_properties[PROP_NAME]);
}

/**
 * kd_dispatcher_get_name:
 * @self: a dispatcher
 *
 * Gets the dispatcher's name.
 *
 * Returns: (nullable): the name, or %NULL
 *
 * Since: 0.1
 */
const char *
kd_dispatcher_get_name (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), NULL);

  return self->name;
}
