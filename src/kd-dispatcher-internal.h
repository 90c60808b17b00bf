/* kd-dispatcher-internal.h: what the dispatcher's own files share
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * KdDispatcher is one object written in several files, each holding one
 * idea; only they include this header:
 *
 *   kd-dispatcher.c             the core: submit, run, start, wait, close,
 *                               cancel, dispose
 *   kd-dispatcher-properties.c  properties, configuration setters and
 *                               getters, the counters (stats and notify)
 *   kd-dispatcher-failure.c     retries, dead letters, parked keys
 *   kd-dispatcher-keys.c        key states, idle expiry, the per-key bound
 *   kd-dispatcher-async.c       kd_dispatcher_submit_async() and its
 *                               waiting FIFO; kd_dispatcher_wait_async()
 *   kd-dispatcher-delay.c       delayed jobs: kd_dispatcher_submit_after()
 *                               and kd_dispatcher_submit_at()
 *   kd-dispatcher-stage.c       what a pipeline reaches of a stage
 *                               (kd-dispatcher-stage-private.h)
 *
 * The submits of a KdGroup (kd-group.c) come in through its own door, in
 * kd-dispatcher.c and kd-dispatcher-async.c (kd-group-private.h).
 */

#pragma once

#include <gio/gio.h>

#include "kd-admission-private.h"
#include "kd-cancel-watch-private.h"
#include "kd-delivery-private.h"
#include "kd-dispatcher-stage-private.h"
#include "kd-group-private.h"
#include "kd-job-private.h"
#include "kd-key-table-private.h"
#include "kd-mailbox-private.h"
#include "kd-notifier-private.h"
#include "kd-parked-keys-private.h"
#include "kd-scheduler-private.h"
#include "kd-shutdown-private.h"
#include "kd-submit-result-private.h"
#include "kd-slots-private.h"
#include "kd-sync-private.h"

G_BEGIN_DECLS

#define DEFAULT_CAPACITY 1024

/* The most keys that keep their state idle at once, by default: a few MiB
 * of mailboxes, plus the application's states. */
#define DEFAULT_MAX_IDLE_KEYS 65536

/* Counters of the jobs one worker ended. Written only by that worker, read
 * by get_stats; a cache line each so workers do not share lines. One more
 * (@other_stats) counts, with atomic additions, what other threads end
 * (items a pipeline hands back, see kd_dispatcher_hand_back()). */
typedef struct
{
  guint64 completed;
  guint64 failed;
  guint64 cancelled;
  guint64 retried;
  gint    running;
} __attribute__ ((aligned (64))) KdWorkerStats;

/* How a run of a job's handler turned out for its key and its unit. */
typedef enum
{
  JOB_ENDED,   /* it ended: its unit may be released */
  JOB_RETRY,   /* it failed with attempts left: it waits and runs again */
  JOB_PARK,    /* it ended failed, and its key parks */
  JOB_DEFERRED, /* its handler deferred it: it ends when returned, holding
                 * its key and its unit until then */
} JobOutcome;

struct _KdDispatcher
{
  GObject parent_instance;

  /* Immutable after construction */
  KdHandlerFunc   handler;
  gpointer        handler_data;
  GDestroyNotify  handler_data_free;
  KdSlots         worker_stats;   /* KdWorkerStats by worker index; grows with resizes */
  KdWorkerStats  *other_stats;

  /* n-workers (the scheduler's once it started), changed under
   * @resize_lock; the idle workers' exit, under @start_lock (see
   * kd-dispatcher-workers.c) */
  GMutex          resize_lock;
  guint           n_workers;
  gint64          worker_idle_us;    /* 0: idle workers stay */
  guint           min_workers;       /* workers kept when idle, at least 1 */

  /* Configuration: set before the first submit, read-only afterwards */
  guint           fanout;
  GDestroyNotify  item_free;
  KdDoneFunc      done;
  gpointer        done_data;
  GDestroyNotify  done_data_free;
  KdKeyStateNewFunc key_state_new;
  GDestroyNotify  key_state_free;
  gpointer        key_state_data;
  GDestroyNotify  key_state_data_free;
  guint           key_capacity;      /* 0: no per-key bound */
  gint64          key_idle_us;       /* how long an idle key keeps its state */
  guint           max_idle_keys;     /* how many keys may keep theirs at once */
  guint           max_waiting;       /* async submissions waiting for room; 0: capacity */
  guint           max_attempts;      /* 1: no retry */
  gint64          retry_initial_us;
  gint64          retry_max_us;
  KdFailurePolicy failure_policy;
  KdDeadLetterFunc dead_letter;
  gpointer        dead_letter_data;
  GDestroyNotify  dead_letter_data_free;
  KdWorkerInitFunc     worker_init;
  KdWorkerFinalizeFunc worker_finalize;
  gpointer        worker_data;
  GDestroyNotify  worker_data_free;
  GCancellable   *cancellable;
  KdCancelWatch  *cancel_watch;
  GMainContext   *context;
  char           *name;
  GMainContext   *handler_context;  /* the handler runs there, if set */
  KdStageHooks    stage_hooks;  /* a pipeline's, when the dispatcher is a stage */
  gpointer        stage_data;

  /* Atomic */
  gint            configured;   /* a submit was made: configuration is over */
  gint            stopped;      /* closed and drained: the workers are told to go */
  gint            sweep_armed;  /* the idle keys' sweep is pending in the timer */
  guint64         submitted;
  guint64         rejected;

  KdShutdown      shutdown;
  KdAdmission     admission;

  KdKeyTable     *keys;         /* key → KdMailbox: keys with work, dormant and idle ones */

  /* Set once under @start_lock, then read-only (published atomically).
   * While the workers start (their inits run) @starting is set and
   * @start_lock is not held; other starters wait on @start_cond. */
  GMutex          start_lock;
  GCond           start_cond;
  gboolean        starting;
  KdScheduler    *scheduler;
  KdDelivery     *delivery;
  KdDelivery     *handler_delivery;  /* with @handler_context: runs the handlers */
  KdNotifier     *notifier;     /* the counters' notify */

  /* The counters' notify: in @context if set, else in the thread-default
   * context of the thread that created the dispatcher */
  GMainContext   *creation_context;
  KdStats         notified;     /* what was notified last; the notifier's */
  guint           notified_waiting;
  guint           notified_idle_keys;

  /* kd_dispatcher_submit_async(): submissions waiting for room, in call
   * order, under @async_lock; and a delivery per caller context with
   * results pending (its own lock) */
  GMutex          async_lock;
  KdTaskList      waiting;        /* KdSubmitResult tasks */
  gint            n_waiting;      /* atomic copy of waiting.length */
  KdResultRegistry *results;

  /* Keys parked after a failure (its own lock) */
  KdParkedKeys    parked;

  /* With a per-key bound: how many delayed jobs wait for each key (key →
   * count, made at the first), under @delayed_lock (kd-dispatcher-delay.c) */
  GMutex          delayed_lock;
  GHashTable     *delayed_per_key;

  /* Deferred jobs (kd-dispatcher-defer.c): how many are out (atomic), and
   * the threads that return one, which the shutdown waits for (under
   * @returning_lock) */
  gint            n_deferred;
  gint            drained_on_context;  /* atomic: kd_dispatcher_drain_on_context()'s */
  GMutex          returning_lock;
  GCond           returning_cond;
  guint           n_returning;
};

/* A job's key, or the key its item carries in a pipeline stage, for the
 * probes (see kd-trace-private.h). */
#define KD_TRACE_KEY(job) ((job)->mailbox != NULL ? kd_mailbox_get_key ((job)->mailbox) : (job)->label)

/* The dispatcher's properties (kd-dispatcher-properties.c). */
enum
{
  PROP_0,
  /* Configuration */
  PROP_N_WORKERS,
  PROP_FANOUT,
  PROP_CAPACITY,
  PROP_NAME,
  PROP_CANCELLABLE,
  PROP_MAIN_CONTEXT,
  PROP_MAX_IDLE_KEYS,
  PROP_MAX_WAITING,
  /* Counters */
  PROP_SUBMITTED,
  PROP_COMPLETED,
  PROP_FAILED,
  PROP_CANCELLED,
  PROP_REJECTED,
  PROP_PENDING,
  PROP_RUNNING,
  PROP_LIVE_KEYS,
  PROP_WAITING,
  PROP_IDLE_KEYS,
  N_PROPS
};

extern GParamSpec *kd_dispatcher_properties[N_PROPS];

/* kd-dispatcher.c */
gboolean    kd_dispatcher_ensure_started      (KdDispatcher      *self,
                                               GError           **error);
KdDelivery *kd_dispatcher_ensure_delivery_locked (KdDispatcher   *self);
gboolean    kd_dispatcher_admit_job           (KdDispatcher      *self,
                                               KdAdmitMode        mode,
                                               gint64             deadline,
                                               guint             *epoch,
                                               GError           **error);
gboolean    kd_dispatcher_push_job            (KdDispatcher      *self,
                                               const char        *key,
                                               char              *label,
                                               gpointer           ticket,
                                               KdSubmitResult    *result,
                                               KdGroupState      *group,
                                               gpointer           item,
                                               KdItemKind         item_kind,
                                               guint              epoch,
                                               const KdKeyBound  *bound,
                                               GError           **error);
void        kd_dispatcher_finish_job          (KdDispatcher      *self,
                                               KdJob             *job,
                                               GError            *error);
void        kd_dispatcher_release_unit        (KdDispatcher      *self,
                                               guint              releaser,
                                               guint              epoch);
JobOutcome  kd_dispatcher_job_returned        (KdDispatcher      *self,
                                               KdJob             *job,
                                               GError            *error);
GError     *kd_dispatcher_handler_outcome     (gboolean           completed,
                                               GError            *error);
void        kd_dispatcher_shutdown_scheduler  (KdDispatcher      *self);
void        kd_dispatcher_on_cancelled        (gpointer           user_data);
gboolean    kd_dispatcher_in_worker_hook      (KdDispatcher      *self);

/* kd-dispatcher-workers.c */
void        kd_dispatcher_add_worker_slots    (KdDispatcher      *self,
                                               guint              n_workers);
void        kd_dispatcher_set_n_workers_property (KdDispatcher   *self,
                                                  guint           n_workers);
guint       kd_dispatcher_count_threads       (KdDispatcher      *self);

/* kd-dispatcher-properties.c */
void        kd_dispatcher_install_properties  (GObjectClass      *object_class);
gboolean    kd_dispatcher_check_configurable  (KdDispatcher      *self,
                                               const char        *function);
KdNotifier *kd_dispatcher_ensure_notifier     (KdDispatcher      *self);

/* kd-dispatcher-failure.c */
JobOutcome  kd_dispatcher_job_failed          (KdDispatcher      *self,
                                               KdWorkerStats     *stats,
                                               KdJob             *job,
                                               GError           **error,
                                               KdJob            **behind,
                                               guint              n_behind,
                                               gboolean          *parked);
gint64      kd_dispatcher_retry_due_time      (KdDispatcher      *self,
                                               KdJob             *job);
void        kd_dispatcher_retry_later         (KdDispatcher      *self,
                                               KdScheduler       *scheduler,
                                               KdMailbox         *mailbox,
                                               KdJob            **jobs,
                                               guint              n);
void        kd_dispatcher_park_end            (KdDispatcher      *self,
                                               KdMailbox         *mailbox,
                                               gboolean           parked);
void        kd_dispatcher_drop_parked         (KdDispatcher      *self);

/* kd-dispatcher-keys.c */
void        kd_dispatcher_end_key_state       (KdDispatcher      *self,
                                               KdMailbox         *mailbox);
void        kd_dispatcher_end_idle_spell      (KdDispatcher      *self,
                                               KdMailbox         *mailbox,
                                               gpointer           state);
void        kd_dispatcher_arm_idle_sweep      (KdDispatcher      *self,
                                               KdScheduler       *scheduler);

/* kd-dispatcher-defer.c */
void        kd_dispatcher_end_returned        (KdDispatcher      *self,
                                               KdJob             *job);
gboolean    kd_dispatcher_settle_deferred     (KdDispatcher      *self,
                                               KdJob             *job,
                                               GError           **error);
void        kd_dispatcher_deferring_handler_returned (gboolean    completed,
                                                      GError     *error);
void        kd_dispatcher_wait_returners      (KdDispatcher      *self);
gboolean    kd_dispatcher_returning_here      (KdDispatcher      *self);
void        kd_dispatcher_context_handler_returned (KdJob        *job,
                                                    gboolean      completed,
                                                    GError       *error);
void        kd_dispatcher_return_job          (KdJob             *job,
                                               GError            *error);

/* kd-dispatcher-context.c */
void        kd_dispatcher_ensure_handler_delivery_locked (KdDispatcher *self);
void        kd_dispatcher_hand_to_context     (KdDispatcher      *self,
                                               KdJob             *job);
void        kd_dispatcher_drain_on_context    (KdDispatcher      *self);

/* kd-dispatcher-async.c */
void        kd_dispatcher_admit_waiting       (KdDispatcher      *self);
void        kd_dispatcher_refuse_waiting      (KdDispatcher      *self);

/* Whether the calling thread is one of this dispatcher's workers. */
static inline gboolean
kd_dispatcher_is_own_worker (KdDispatcher *self)
{
  KdWorker *worker = kd_worker_get_current ();

  return worker != NULL &&
         kd_worker_get_scheduler (worker) == g_atomic_pointer_get (&self->scheduler);
}

/* After a counter changed (stored): its property notifies soon, in the
 * main context. Cheap when it is already due. */
static inline void
kd_dispatcher_counters_changed (KdDispatcher *self)
{
  KdNotifier *notifier = g_atomic_pointer_get (&self->notifier);

  if (G_UNLIKELY (notifier == NULL))
    notifier = kd_dispatcher_ensure_notifier (self);
  kd_notifier_arm (notifier);
}

/* @n submits refused: a batch counts each item it did not take. */
static inline void
kd_dispatcher_count_rejected_n (KdDispatcher *self,
                                guint         n)
{
  __atomic_fetch_add (&self->rejected, n, __ATOMIC_RELAXED);
  kd_dispatcher_counters_changed (self);
}

static inline void
kd_dispatcher_count_rejected (KdDispatcher *self)
{
  kd_dispatcher_count_rejected_n (self, 1);
}

/* One more job ended, in a worker's own counter. */
static inline void
kd_dispatcher_count_ended (guint64 *counter)
{
  /* Only the owning worker writes; the release store publishes the count
   * before the job's unit of admission is released. */
  __atomic_store_n (counter, *counter + 1, __ATOMIC_RELEASE);
}

/* One more job ended, in @stats: a worker's own, or @other_stats, which
 * other threads add to atomically (a deferred job's return). */
static inline void
kd_dispatcher_count (KdDispatcher  *self,
                     KdWorkerStats *stats,
                     guint64       *counter)
{
  if (G_UNLIKELY (stats == self->other_stats))
    __atomic_fetch_add (counter, 1, __ATOMIC_RELEASE);
  else
    kd_dispatcher_count_ended (counter);
}

/* @time plus @delay_us, at most G_MAXINT64: never. */
static inline gint64
kd_time_after (gint64 time,
               gint64 delay_us)
{
  return delay_us > G_MAXINT64 - time ? G_MAXINT64 : time + delay_us;
}

/* Now plus @delay_us, at most G_MAXINT64: never. */
static inline gint64
kd_due_time_after (gint64 delay_us)
{
  return kd_time_after (g_get_monotonic_time (), delay_us);
}

/* Once g_cancellable_cancel() marked the cancellable, a submit is refused
 * with KD_ERROR_CLOSED, even before the ::cancelled emission reaches our
 * handler (another handler of a shared cancellable may run first, and a
 * second g_cancellable_cancel() returns at once): closes, idempotently.
 * The handler does the rest when it runs. */
static inline void
kd_dispatcher_refuse_if_cancelled (KdDispatcher *self)
{
  if (G_UNLIKELY (g_cancellable_is_cancelled (self->cancellable)) &&
      !kd_admission_is_closed (&self->admission))
    kd_dispatcher_close (self);
}

/* The mode of a submit: a worker waiting for room that only workers can
 * free could wait forever, so on its own dispatcher a worker never
 * blocks. */
static inline KdAdmitMode
kd_dispatcher_submit_mode (KdDispatcher *self,
                           KdAdmitMode   mode)
{
  return mode != KD_ADMIT_TRY && kd_dispatcher_is_own_worker (self) ? KD_ADMIT_TRY : mode;
}

/* The per-key bound a keyed submit waits for, in @bound; NULL if none. */
static inline const KdKeyBound *
kd_dispatcher_key_bound (KdDispatcher *self,
                         const char   *key,
                         KdAdmitMode   mode,
                         gint64        deadline,
                         KdKeyBound   *bound)
{
  if (G_LIKELY (self->key_capacity == 0 || key == NULL))
    return NULL;

  bound->capacity = self->key_capacity;
  bound->mode = mode;
  bound->deadline = deadline;
  bound->admission = &self->admission;
  return bound;
}

G_END_DECLS
