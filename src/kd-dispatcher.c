/* kd-dispatcher.c: the keyed dispatcher with 2-tier fan-out
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * KdDispatcher is the front door. It runs jobs on a bounded set of worker
 * threads (KdScheduler) and guarantees:
 *
 *  - Jobs with the same key run one at a time, in the order they were
 *    accepted. Each key with work has a mailbox (KdMailbox, its queue of
 *    jobs) in the key table (KdKeyTable, sharded GHashTables); the mailbox,
 *    not a thread, is the key's actor. A ready mailbox is a task of the scheduler: the worker that
 *    takes it runs up to MAILBOX_BUDGET of its jobs, then puts it back if it
 *    still has work, at the end of the input queue, so a hot key cannot
 *    starve the others. A mailbox that
 *    runs empty leaves the table at once, so the table only holds keys with
 *    work and the thread count never depends on the number of keys.
 *  - Unkeyed jobs are tasks themselves and fan out over every worker through
 *    the scheduler's tier-1 input queue and its groups (tier 2).
 *  - At most `capacity` jobs are pending (accepted and not yet ended). The
 *    bound, closing and the wait barrier live in one atomic word
 *    (KdAdmission): a submit that finds the bound reached blocks, fails
 *    with KD_ERROR_FULL or times out, and a closed dispatcher refuses with
 *    KD_ERROR_CLOSED. A refused item stays the caller's: nothing is queued
 *    and no callback runs for it.
 *  - Every accepted job ends exactly once: completed, failed (the handler's
 *    GError reaches the done callback) or cancelled. Then the done callback
 *    runs, then the item-free function, then the job's unit of admission is
 *    released. With a main context set, the done callback and item-free run
 *    there (KdDelivery), in per-key order, and the unit is released as soon
 *    as the handler returned.
 *  - Cancelling the cancellable closes the dispatcher; every job that has
 *    not started yet ends cancelled when a worker reaches it, so queued jobs
 *    are handed back in their per-key order and the accounting still holds.
 *    Running handlers see the cancellable cancelled at once.
 *  - Once the dispatcher is closed and nothing is pending, the workers exit;
 *    wait() and the last unref join them.
 *
 * The life of a keyed job: submit acquires a unit of admission, and the key
 * table appends the job to the key's mailbox under the key's shard lock,
 * creating the mailbox if the key had no work; a new mailbox is handed to
 * the scheduler. A worker pops a batch of the mailbox's jobs and runs them;
 * after the batch, under the shard lock, it reaps the mailbox if it is empty
 * (producers push under the same lock, so no job can slip in unseen), and
 * only then releases the last job's unit, so that live_keys is 0 when
 * wait() returns.
 *
 * Failure: a handler that fails with attempts left (kd_dispatcher_set_retry())
 * does not end its job. A keyed job goes back to the head of its mailbox
 * with the jobs of its batch behind it, and the mailbox, out of the
 * scheduler, waits in the scheduler's timer until the retry is due, so the
 * key keeps its order and no worker waits; an unkeyed job waits there
 * alone. Its unit stays taken. A job that failed for good goes to the
 * dead-letter function, and with KD_FAILURE_PARK its key parks: the
 * mailbox, with the rest of its batch put back, stays in the key table out
 * of the scheduler and enters the @parked table, before the failed job's
 * unit is released. Whoever takes it out of @parked (resume, drop, cancel,
 * the last unref) becomes its runner: it schedules it, or reaps it if it
 * is empty. Cancellation hurries the timer and drops the parked keys, so
 * every job still ends.
 *
 * Key states (kd_dispatcher_set_key_state_funcs()) are made by the runner
 * of a key's first job and freed when its mailbox runs empty, or, with an
 * idle time, kept in the reaped mailbox: one call in the timer, the idle
 * keys' sweep, ends the idle spells as they come due, and the key table
 * bounds how many are idle at once (the runner that passes the bound frees
 * the oldest state of its shard itself; see kd-key-table.c).
 *
 * A per-key bound (kd_dispatcher_set_key_capacity()) is checked after the
 * unit of admission was taken: the key table counts each key's jobs and a
 * submit waits on its shard's condition until its key has room (see
 * kd-key-table.c), or gives the unit back if it gives up.
 *
 * Workers never block on their own dispatcher: a submit from one of its own
 * workers that finds the bound reached fails with KD_ERROR_FULL instead of
 * waiting for a slot that only workers can free.
 *
 * Async submissions (kd_dispatcher_submit_async()) never block either: one
 * that finds the bound reached joins the @waiting FIFO, and whoever releases
 * a unit while submissions wait admits them in call order (release_unit()),
 * queueing each job under @async_lock so that a key's jobs keep their call
 * order. Each holds a KdSubmitResult (and through it the dispatcher); when
 * its job ended, after the done callback and item-free, the result goes
 * through the delivery of the caller's thread-default context, which runs
 * the callback there. Closing refuses the waiting ones with KD_ERROR_CLOSED.
 *
 * Last unref: close, wait for every accepted job to end, join the workers,
 * flush the main-context deliveries, run the destroy notifies. If it happens
 * on one of the dispatcher's own threads (inside a handler, or a done
 * callback on a worker or on the main context) it cannot wait for itself:
 * dispose then closes, drops the parked keys, takes a reference back and
 * hands the rest to kd_shutdown_later(), which finishes it as that worker
 * exits, or on a thread of its own for a main context (see kd-shutdown.c).
 *
 * Threads are made when the workers start (kd_dispatcher_start() or the
 * first submit): the workers, and the timer's if jobs may be retried or key
 * states idle. If one cannot be made, that call fails with the thread
 * error and the dispatcher stays unstarted; nothing later makes a thread
 * that could fail.
 *
 * Locks: a key shard's lock, the scheduler's queue locks, @parked_lock and
 * the admission's sleeping lock are each taken alone, never nested, but for
 * a shard's lock taken under @parked_lock (dropping a key's queued jobs); @async_lock
 * is taken before them (admitting a waiting submission queues its job), and
 * never while one of them is held. No lock is
 * held while user code (handler, done callback, item-free, destroy notify)
 * runs.
 */

#include "config.h"

#include <gio/gio.h>
#include <string.h>

#include "kd-admission-private.h"
#include "kd-cancel-watch-private.h"
#include "kd-delivery-private.h"
#include "kd-dispatcher-private.h"
#include "kd-error.h"
#include "kd-job-private.h"
#include "kd-key-table-private.h"
#include "kd-mailbox-private.h"
#include "kd-notifier-private.h"
#include "kd-scheduler-private.h"
#include "kd-shutdown-private.h"
#include "kd-submit-result-private.h"
#include "kd-sync-private.h"
#include "kd-trace-private.h"

#define DEFAULT_CAPACITY 1024

/* The most keys that keep their state idle at once, by default: a few MiB
 * of mailboxes, plus the application's states. */
#define DEFAULT_MAX_IDLE_KEYS 65536

/* The most jobs of one key a worker runs before other tasks go first. */
#define MAILBOX_BUDGET 64

/* How often get_stats re-reads the counters looking for a quiet moment. */
#define STATS_ATTEMPTS 1000

/* How soon after a change of the counters their properties notify. */
#define NOTIFY_INTERVAL_US (100 * G_TIME_SPAN_MILLISECOND)

/* Counters of the jobs one worker ended. Written only by that worker, read
 * by get_stats; a cache line each so workers do not share lines. The slot
 * after the workers' counts, with atomic additions, what other threads end
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
} JobOutcome;

typedef enum
{
  SHUTDOWN_NONE,
  SHUTDOWN_ASYNC,  /* kd_shutdown_later() finishes the shutdown */
  SHUTDOWN_DONE,
} ShutdownState;

struct _KdDispatcher
{
  GObject parent_instance;

  /* Immutable after construction */
  KdHandlerFunc   handler;
  gpointer        handler_data;
  GDestroyNotify  handler_data_free;
  guint           n_workers;
  KdWorkerStats  *worker_stats;

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
  KdStageHooks    stage_hooks;  /* a pipeline's, when the dispatcher is a stage */
  gpointer        stage_data;

  /* Atomic */
  gint            configured;   /* a submit was made: configuration is over */
  gint            stopped;      /* closed and drained: the workers are told to go */
  gint            sweep_armed;  /* the idle keys' sweep is pending in the timer */
  gint            shutdown_state;
  guint64         submitted;
  guint64         rejected;

  KdAdmission     admission;

  KdKeyTable     *keys;         /* key → KdMailbox, keys with work only */

  /* Set once under @start_lock, then read-only (published atomically).
   * While the workers start (their inits run) @starting is set and
   * @start_lock is not held; other starters wait on @start_cond. */
  GMutex          start_lock;
  GCond           start_cond;
  gboolean        starting;
  KdScheduler    *scheduler;
  KdDelivery     *delivery;
  KdNotifier     *notifier;     /* the counters' notify */

  /* The counters' notify: in @context if set, else in the thread-default
   * context of the thread that created the dispatcher */
  GMainContext   *creation_context;
  KdStats         notified;     /* what was notified last; the notifier's */
  guint           notified_waiting;
  guint           notified_idle_keys;

  /* kd_dispatcher_submit_async(): submissions waiting for room, in call
   * order, and a delivery per caller context with results pending; under
   * @async_lock */
  GMutex          async_lock;
  KdTaskList      waiting;        /* KdSubmitResult tasks */
  gint            n_waiting;      /* atomic copy of waiting.length */
  GPtrArray      *result_deliveries;  /* KdResultDelivery * */

  /* Parked keys, under @parked_lock: the key (its mailbox's) → KdMailbox,
   * in a KdKeyMap, as keys that clients choose may be parked in numbers.
   * Once the dispatcher is cancelled or disposed, no key parks any more:
   * @parking_closed. */
  GMutex          parked_lock;
  KdKeyMap        parked;
  gboolean        parking_closed;
  gint            n_parked;       /* atomic copy of the table's size */
};

/* Where the callbacks of the async submissions made in one main context go.
 * It lives while results are pending for it, and holds the context until
 * then: a context may be freed (a thread's) once nothing is promised to it. */
struct _KdResultDelivery
{
  GMainContext *context;      /* a reference */
  KdDelivery   *delivery;
  guint         pending;      /* results not yet delivered */
};

/**
 * KdDispatcher:
 *
 * Runs jobs on a bounded set of worker threads: jobs with the same key one
 * at a time, in the order they were submitted; jobs without a key in
 * parallel, through one bounded queue fanned out to several dispatchers
 * and their workers.
 *
 * A dispatcher is created with a handler ([ctor@Kd.Dispatcher.new]) and
 * configured before its first submit: the bound on pending jobs
 * ([method@Kd.Dispatcher.set_capacity]), a done callback and the main
 * context it runs in, an item-free function, a cancellable. Jobs are
 * submitted with [method@Kd.Dispatcher.submit] (blocking at the bound),
 * [method@Kd.Dispatcher.try_submit], [method@Kd.Dispatcher.submit_timeout]
 * or, from a main loop, [method@Kd.Dispatcher.submit_async], which never
 * blocks.
 *
 * Every accepted job ends exactly once: completed, failed with the
 * handler's error, or cancelled (handed back through the done callback and
 * the item-free function). [method@Kd.Dispatcher.wait] returns when the
 * jobs accepted before the call have ended; [method@Kd.Dispatcher.close]
 * refuses new ones. See the guides: [Keys and order](keys-and-order.html),
 * [The bound](the-bound.html), [Shutdown and cancellation](shutdown.html)
 * and [Main-loop delivery](main-loop.html).
 *
 * Since: 0.1
 */
G_DEFINE_FINAL_TYPE (KdDispatcher, kd_dispatcher, G_TYPE_OBJECT)

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

static GParamSpec *properties[N_PROPS];


/* Whether the calling thread is one of this dispatcher's workers. */
static gboolean
is_own_worker (KdDispatcher *self)
{
  KdWorker *worker = kd_worker_get_current ();

  return worker != NULL &&
         kd_worker_get_scheduler (worker) == g_atomic_pointer_get (&self->scheduler);
}

/* The dispatcher whose shutdown (shutdown_sync()) runs on this thread, if
 * any: the key-state frees of the parked keys it drops run there. */
static KD_THREAD_LOCAL KdDispatcher *shutting_down;

/* Whether the calling thread is one of this dispatcher's: a worker, its
 * timer's, or the one running its shutdown. */
static gboolean
runs_on_own_thread (KdDispatcher *self)
{
  KdScheduler *scheduler = g_atomic_pointer_get (&self->scheduler);

  return shutting_down == self || (scheduler != NULL && kd_scheduler_runs_here (scheduler));
}

static void notify_counters (GObject *object);

/* The notifier of the counters, created at the first change, when the
 * configuration (the main context) is final. */
static KdNotifier *
ensure_notifier (KdDispatcher *self)
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

/* After a counter changed (stored): its property notifies soon, in the
 * main context. Cheap when it is already due. */
static inline void
counters_changed (KdDispatcher *self)
{
  KdNotifier *notifier = g_atomic_pointer_get (&self->notifier);

  if (G_UNLIKELY (notifier == NULL))
    notifier = ensure_notifier (self);
  kd_notifier_arm (notifier);
}

static void
count_rejected (KdDispatcher *self)
{
  __atomic_fetch_add (&self->rejected, 1, __ATOMIC_RELAXED);
  counters_changed (self);
}

/* The bound on waiting async submissions: the capacity unless set. */
static guint
get_max_waiting (KdDispatcher *self)
{
  return self->max_waiting != 0 ? self->max_waiting : self->admission.capacity;
}

/* Configuration calls are refused, loudly, once jobs were submitted: the
 * workers read the configuration without locks. */
static gboolean
check_configurable (KdDispatcher *self,
                    const char   *function)
{
  if (G_LIKELY (!g_atomic_int_get (&self->configured)))
    return TRUE;

  g_critical ("%s: a dispatcher is configured before its first submit; "
              "this setting is ignored", function);
  return FALSE;
}

static inline void
count_ended (guint64 *counter)
{
  /* Only the owning worker writes; the release store publishes the count
   * before the job's unit of admission is released. */
  __atomic_store_n (counter, *counter + 1, __ATOMIC_RELEASE);
}

/* Closed and drained, once: the workers may go, and a pipeline closes the
 * stage after this one. */
static void
shutdown_scheduler (KdDispatcher *self)
{
  KdScheduler *scheduler = g_atomic_pointer_get (&self->scheduler);

  g_debug ("dispatcher %p (%s): closed and drained, stopping workers", (gpointer) self,
           self->name != NULL ? self->name : "unnamed");
  /* Before the timer is hurried: the idle keys' sweep ends every spell. */
  g_atomic_int_set (&self->stopped, TRUE);
  if (scheduler != NULL)
    kd_scheduler_shutdown (scheduler);
  if (self->stage_hooks.drained != NULL)
    self->stage_hooks.drained (self->stage_data);
}

static void admit_waiting  (KdDispatcher *self);
static void refuse_waiting (KdDispatcher *self);

/* Gives back a unit of admission: the last one of a closed dispatcher
 * stops it; otherwise async submissions waiting for room may go in. The
 * release is sequentially consistent and so is the look at @n_waiting: a
 * submission queued meanwhile either is seen here or sees the room itself
 * (see kd_dispatcher_submit_async()). */
static void
release_unit (KdDispatcher *self,
              guint         releaser,
              guint         epoch)
{
  if (kd_admission_release (&self->admission, releaser, epoch))
    shutdown_scheduler (self);
  else if (G_UNLIKELY (__atomic_load_n (&self->n_waiting, __ATOMIC_SEQ_CST) > 0))
    admit_waiting (self);
  counters_changed (self);
}

static void
release_job (KdDispatcher *self,
             KdWorker     *worker,
             guint         epoch)
{
  release_unit (self, kd_worker_get_index (worker), epoch);
}

/* Runs the done callback and item-free of an ended job, queues the callback
 * of an async submission, and frees the job. @error: transfer full.
 * Inlined: it is on every job's path. */
G_ALWAYS_INLINE static inline void
finish_job (KdDispatcher *self,
            KdJob        *job,
            GError       *error)
{
  if (self->done != NULL)
    self->done (job, error, self->done_data);

  if (self->item_free != NULL && !job->handed_over)
    self->item_free (job->item);

  /* A job on its way through a main context holds its mailbox, for the key. */
  if (self->delivery != NULL && job->mailbox != NULL)
    kd_mailbox_unref (job->mailbox);

  if (job->result != NULL)
    kd_submit_result_complete (g_steal_pointer (&job->result), g_steal_pointer (&error));
  if (G_UNLIKELY (error != NULL))
    g_error_free (error);

  kd_job_free (job);
}

/* A job's key, or the key its item carries in a pipeline stage, for the
 * probes (see kd-trace-private.h). */
#define TRACE_KEY(job) ((job)->mailbox != NULL ? kd_mailbox_get_key ((job)->mailbox) : (job)->label)

/* On the main context's thread. */
static void
deliver_job (KdTask   *task,
             gpointer  user_data)
{
  KdDispatcher *self = user_data;
  KdJob *job = (KdJob *) task;
  GError *error = g_steal_pointer (&job->error);

  KD_TRACE3 (job_deliver, self->name, TRACE_KEY (job), job);
  finish_job (self, job, error);
}

static gboolean park_begin (KdDispatcher *self,
                            KdMailbox    *mailbox);
static void     park_end   (KdDispatcher *self,
                            KdMailbox    *mailbox,
                            gboolean      parked);

/* @job's handler failed with *@error: the failure policy decides. On
 * JOB_RETRY the error was dropped and the job does not end; otherwise it
 * goes to the dead-letter function, and on JOB_PARK its key parks (*@parked
 * tells whether it did, see park_begin()) with @behind back in its
 * mailbox. Out of line: the common path of run_job() stays short. */
static G_GNUC_NO_INLINE JobOutcome
job_failed (KdDispatcher   *self,
            KdWorkerStats  *stats,
            KdJob          *job,
            GError        **error,
            KdJob         **behind,
            guint           n_behind,
            gboolean       *parked)
{
  if (G_UNLIKELY (*error == NULL))
    {
      g_critical ("A kdispatch handler returned FALSE without setting an error");
      *error = g_error_new_literal (G_IO_ERROR, G_IO_ERROR_FAILED,
                                    "The handler failed without saying why");
    }

  /* Not once the dispatcher is cancelled, nor once the handler passed its
   * item on: a retry would run without it. */
  if (job->attempt < self->max_attempts && !job->handed_over &&
      !g_cancellable_is_cancelled (self->cancellable))
    {
      g_debug ("dispatcher %p: attempt %u of a job failed, retrying: %s",
               (gpointer) self, job->attempt, (*error)->message);
      KD_TRACE4 (job_retry, self->name, TRACE_KEY (job), job, job->attempt);
      g_clear_error (error);
      count_ended (&stats->retried);
      return JOB_RETRY;
    }

  if (self->dead_letter != NULL)
    self->dead_letter (job, *error, self->dead_letter_data);

  /* Parked before the job ends: its done callback sees the key parked,
   * and may resume or drop it. */
  if (job->mailbox != NULL && self->failure_policy == KD_FAILURE_PARK)
    {
      kd_key_table_put_back (self->keys, job->mailbox, behind, n_behind);
      *parked = park_begin (self, job->mailbox);
      return JOB_PARK;
    }

  return JOB_ENDED;
}

/* Runs @job's handler, or ends it cancelled if the dispatcher was cancelled
 * before it started; then ends it, unless it will be retried. @behind: the
 * jobs of @job's batch after it, which go back to the mailbox if the key
 * parks. The caller releases its unit of admission (saved beforehand: @job
 * may be gone on return) unless it will be retried. */
static JobOutcome
run_job (KdDispatcher  *self,
         KdWorkerStats *stats,
         KdJob         *job,
         KdJob        **behind,
         guint          n_behind)
{
  KdMailbox *mailbox = job->mailbox;
  JobOutcome outcome = JOB_ENDED;
  gboolean parked = FALSE;
  GError *error = NULL;
  guint64 *counter;

  /* The cancellable itself, not our handler's flag: cancellation counts
   * from the moment g_cancellable_cancel() marks it, even while other
   * ::cancelled handlers run before ours. */
  if (G_UNLIKELY (g_cancellable_is_cancelled (self->cancellable)))
    {
      error = g_error_new_literal (G_IO_ERROR, G_IO_ERROR_CANCELLED,
                                   job->attempt == 0
                                     ? "The dispatcher was cancelled before the job ran"
                                     : "The dispatcher was cancelled while the job waited "
                                       "for a retry");
      counter = &stats->cancelled;
    }
  else if (G_UNLIKELY (job->result != NULL && kd_submit_result_is_cancelled (job->result)))
    {
      error = g_error_new_literal (G_IO_ERROR, G_IO_ERROR_CANCELLED,
                                   "The submission was cancelled before the job ran");
      counter = &stats->cancelled;
    }
  else if (G_UNLIKELY (job->dropped))
    {
      error = g_error_new_literal (G_IO_ERROR, G_IO_ERROR_CANCELLED,
                                   "The job's key was dropped while it was parked");
      counter = &stats->cancelled;
    }
  else
    {
      gboolean completed;

      /* A key's actor state is made when the key's first job runs. */
      if (self->key_state_new != NULL && job->mailbox != NULL && !job->mailbox->has_state)
        {
          job->mailbox->state = self->key_state_new (kd_mailbox_get_key (job->mailbox),
                                                     self->key_state_data);
          job->mailbox->has_state = TRUE;
        }

      job->attempt++;
      KD_TRACE4 (job_start, self->name, TRACE_KEY (job), job, job->attempt);
      __atomic_store_n (&stats->running, 1, __ATOMIC_RELAXED);
      completed = self->handler (job, self->handler_data, &error);
      __atomic_store_n (&stats->running, 0, __ATOMIC_RELAXED);

      if (completed)
        {
          if (G_UNLIKELY (error != NULL))
            {
              g_critical ("A kdispatch handler returned TRUE but set an error: %s",
                          error->message);
              g_clear_error (&error);
            }
          counter = &stats->completed;
        }
      else
        {
          outcome = job_failed (self, stats, job, &error, behind, n_behind, &parked);
          if (outcome == JOB_RETRY)
            return JOB_RETRY;
          counter = &stats->failed;
        }
    }

  KD_TRACE4 (job_end, self->name, TRACE_KEY (job), job,
             counter == &stats->completed ? 0 : counter == &stats->failed ? 1 : 2);
  if (self->stage_hooks.ended != NULL)
    self->stage_hooks.ended (job, self->stage_data);

  if (self->delivery != NULL)
    {
      job->error = error;
      if (job->mailbox != NULL)
        kd_mailbox_ref (job->mailbox);
      count_ended (counter);
      kd_delivery_push (self->delivery, &job->task);
    }
  else
    {
      finish_job (self, job, error);
      count_ended (counter);
    }

  /* Before the mailbox can be reaped: its count must be right if a
   * producer revives it. */
  if (mailbox != NULL && self->key_capacity > 0)
    kd_key_table_job_ended (self->keys, mailbox);

  if (outcome == JOB_PARK)
    {
      g_assert (mailbox != NULL);   /* only keyed jobs park */
      park_end (self, mailbox, parked);
    }

  return outcome;
}

/* @time plus @delay_us, at most G_MAXINT64: never. */
static gint64
time_after (gint64 time,
            gint64 delay_us)
{
  return delay_us > G_MAXINT64 - time ? G_MAXINT64 : time + delay_us;
}

/* Now plus @delay_us, at most G_MAXINT64: never. */
static gint64
due_time_after (gint64 delay_us)
{
  return time_after (g_get_monotonic_time (), delay_us);
}

/* When a job that failed on its attempt runs again: the initial delay,
 * doubled at each attempt, at most the maximum. */
static gint64
retry_due_time (KdDispatcher *self,
                KdJob        *job)
{
  gint64 delay = self->retry_initial_us;
  guint i;

  for (i = 1; i < job->attempt && delay > 0 && delay < self->retry_max_us; i++)
    delay = delay > self->retry_max_us / 2 ? self->retry_max_us : delay * 2;

  return due_time_after (MIN (delay, self->retry_max_us));
}

/* By the runner of @mailbox, whose key has no job left: frees the key's
 * state, before the mailbox can be reaped and revived by a producer, so a
 * key never has two states. A job that arrives meanwhile runs with a new
 * one. */
static void
free_key_state (KdDispatcher *self,
                KdMailbox    *mailbox)
{
  gpointer state = g_steal_pointer (&mailbox->state);

  mailbox->has_state = FALSE;
  if (self->key_state_free != NULL)
    self->key_state_free (state);
}

/* Takes a parked mailbox out of parking, which makes the caller its runner:
 * if it has jobs (if @drop, marked to end cancelled) it is scheduled; if
 * not it is reaped here. */
static void
unpark (KdDispatcher *self,
        KdMailbox    *mailbox,
        gboolean      drop)
{
  if (mailbox->has_state && kd_key_table_is_empty (self->keys, mailbox))
    free_key_state (self, mailbox);

  if (kd_key_table_unpark (self->keys, mailbox, drop))
    return;

  /* It has jobs, so their units keep the workers alive. */
  kd_scheduler_push (g_atomic_pointer_get (&self->scheduler), kd_mailbox_get_task (mailbox));
}

/* By the runner of @mailbox, whose job failed for good, before the job
 * ends: the key parks (as finishing, until park_end()). FALSE if keys no
 * longer park. */
static gboolean
park_begin (KdDispatcher *self,
            KdMailbox    *mailbox)
{
  gboolean parked;

  kd_mutex_lock (&self->parked_lock);
  parked = !self->parking_closed;
  if (parked)
    {
      mailbox->park_state = KD_PARK_FINISHING;
      mailbox->park_request = KD_PARK_NONE;
      kd_key_map_insert (&self->parked, &mailbox->key, mailbox);
      g_atomic_int_inc (&self->n_parked);
    }
  kd_mutex_unlock (&self->parked_lock);

  if (parked)
    {
      g_debug ("dispatcher %p: key \"%s\" parked after a failure", (gpointer) self,
               kd_mailbox_get_key (mailbox));
      KD_TRACE2 (key_park, self->name, kd_mailbox_get_key (mailbox));
    }

  return parked;
}

/* By the same runner once the failed job ended: the key stays parked, or
 * (if it was resumed or dropped meanwhile, or keys no longer park) the
 * runner unparks it itself: without a main context, the key's next job
 * never starts before the failed one's done callback returned (with one,
 * the job "ended" once its callback was queued for the context). */
static void
park_end (KdDispatcher *self,
          KdMailbox    *mailbox,
          gboolean      parked)
{
  guint request = KD_PARK_DROP;

  if (parked)
    {
      kd_mutex_lock (&self->parked_lock);
      request = mailbox->park_request;
      mailbox->park_state = request == KD_PARK_NONE ? KD_PARK_PARKED : KD_PARK_NONE;
      mailbox->park_request = KD_PARK_NONE;
      kd_mutex_unlock (&self->parked_lock);
    }

  if (request != KD_PARK_NONE)
    unpark (self, mailbox, request == KD_PARK_DROP);
}

/* Takes @key out of parking, to resume it or (@drop) drop its jobs. FALSE
 * if it was not parked. */
static gboolean
take_parked (KdDispatcher *self,
             const char   *key,
             gboolean      drop)
{
  KdKey probe = { 0, 0, key };
  KdMailbox *mailbox;
  gboolean finishing;

  probe.hash = kd_key_hash (key, &probe.length);
  kd_mutex_lock (&self->parked_lock);
  mailbox = kd_key_map_lookup (&self->parked, &probe);
  if (mailbox == NULL)
    {
      kd_mutex_unlock (&self->parked_lock);
      return FALSE;
    }
  kd_key_map_remove (&self->parked, &mailbox->key);
  g_atomic_int_add (&self->n_parked, -1);
  /* Its runner still ends the failed job: it unparks the key after. The
   * jobs queued now are dropped now (before the runner can see the
   * request), not those submitted after this call. */
  finishing = mailbox->park_state == KD_PARK_FINISHING;
  if (finishing && drop)
    kd_key_table_drop_queued (self->keys, mailbox);
  if (finishing)
    mailbox->park_request = KD_PARK_RESUME;
  else
    mailbox->park_state = KD_PARK_NONE;
  kd_mutex_unlock (&self->parked_lock);

  if (!finishing)
    unpark (self, mailbox, drop);
  return TRUE;
}

/* Cancelled or disposing: no key parks any more, and the parked ones are
 * dropped, so that every job ends. */
static void
drop_parked (KdDispatcher *self)
{
  GPtrArray *parked = g_ptr_array_new ();
  gpointer value;
  guint i = 0;

  kd_mutex_lock (&self->parked_lock);
  self->parking_closed = TRUE;
  while (kd_key_map_next (&self->parked, &i, &value))
    {
      KdMailbox *mailbox = value;

      if (mailbox->park_state == KD_PARK_FINISHING)
        {
          mailbox->park_request = KD_PARK_DROP;
        }
      else
        {
          mailbox->park_state = KD_PARK_NONE;
          g_ptr_array_add (parked, mailbox);
        }
    }
  kd_key_map_remove_all (&self->parked);
  g_atomic_int_set (&self->n_parked, 0);
  kd_mutex_unlock (&self->parked_lock);

  for (i = 0; i < parked->len; i++)
    unpark (self, parked->pdata[i], TRUE);
  g_ptr_array_unref (parked);
}

/* How many idle spells the sweep ends per look at the key table. */
#define EXPIRE_BATCH 64

/* Ends the idle spell the key table handed out (by the sweep, or early by
 * the bound on idle keys): frees its @state, then lets the mailbox go on. */
static void
end_idle_spell (KdDispatcher *self,
                KdMailbox    *mailbox,
                gpointer      state)
{
  if (self->key_state_free != NULL)
    self->key_state_free (state);
  kd_key_table_expire_end (self->keys, mailbox);
}

/* Frees the states of the idle spells of the keys reaped before
 * @reaped_before. */
static void
expire_idle_states (KdDispatcher *self,
                    gint64        reaped_before)
{
  KdMailbox *mailboxes[EXPIRE_BATCH];
  gpointer states[EXPIRE_BATCH];
  guint n, i;

  do
    {
      n = kd_key_table_take_expired (self->keys, reaped_before, mailboxes, states, EXPIRE_BATCH);
      for (i = 0; i < n; i++)
        end_idle_spell (self, mailboxes[i], states[i]);
    }
  while (n == EXPIRE_BATCH);
}

/* On the timer's thread, while keys are idle: ends the idle spells that
 * are due (all of them once the dispatcher is cancelled or stopped), then
 * comes back when the next one is. One such call is pending whenever a key
 * is idle (@sweep_armed). */
static void
sweep_idle_keys (gpointer owner,
                 gpointer data)
{
  KdDispatcher *self = owner;
  KdScheduler *scheduler = data;
  gboolean all = g_atomic_int_get (&self->stopped) || g_cancellable_is_cancelled (self->cancellable);
  gint64 now = g_get_monotonic_time ();
  gint64 oldest;

  expire_idle_states (self, all ? G_MAXINT64 : now - self->key_idle_us + 1);
  counters_changed (self);

  oldest = kd_key_table_oldest_idle (self->keys);
  if (oldest == G_MAXINT64)
    {
      /* A key made idle meanwhile either found the sweep armed and left
       * its spell to it, or finds it disarmed now and arms it: look once
       * more after disarming (the shard locks order the two). */
      __atomic_store_n (&self->sweep_armed, FALSE, __ATOMIC_SEQ_CST);
      oldest = kd_key_table_oldest_idle (self->keys);
      if (oldest == G_MAXINT64 || __atomic_exchange_n (&self->sweep_armed, TRUE, __ATOMIC_SEQ_CST))
        return;
    }
  /* The scheduler may have shut down since the look at @stopped: nothing
   * is pending any more, so every spell ends now. */
  if (!kd_scheduler_call_at (scheduler, all ? now : time_after (oldest, self->key_idle_us),
                             sweep_idle_keys, self, scheduler))
    expire_idle_states (self, G_MAXINT64);
}

/* After a key was made idle: the sweep comes when its spell is due, unless
 * it is already armed (for an earlier spell). */
static void
arm_idle_sweep (KdDispatcher *self,
                KdScheduler  *scheduler)
{
  /* From a worker that still holds a unit of admission, so the scheduler
   * has not shut down. */
  if (!__atomic_load_n (&self->sweep_armed, __ATOMIC_RELAXED) &&
      !__atomic_exchange_n (&self->sweep_armed, TRUE, __ATOMIC_SEQ_CST) &&
      !kd_scheduler_call_at (scheduler, due_time_after (self->key_idle_us), sweep_idle_keys, self,
                             scheduler))
    g_assert_not_reached ();
}

/* Holds @mailbox: runs its jobs in order, up to MAILBOX_BUDGET, then reaps
 * it if it ran empty or puts it back in the scheduler if not. */
static void
run_mailbox (KdDispatcher  *self,
             KdWorker      *worker,
             KdWorkerStats *stats,
             KdMailbox     *mailbox)
{
  KdJob *jobs[MAILBOX_BUDGET];
  guint n = kd_key_table_pop (self->keys, mailbox, jobs, MAILBOX_BUDGET);
  guint ran = 0;

  for (;;)
    {
      gboolean reaped, keep_state;
      KdMailbox *evicted;
      gpointer evicted_state = NULL;
      guint last_epoch = 0;
      guint i;

      for (i = 0; i < n; i++)
        {
          guint epoch = jobs[i]->epoch;
          JobOutcome outcome = run_job (self, stats, jobs[i], jobs + i + 1, n - i - 1);

          if (G_UNLIKELY (outcome == JOB_RETRY))
            {
              /* The job goes back to the head of its key, the key's later
               * jobs wait behind it, and no worker waits with them: the
               * mailbox leaves the scheduler until the retry is due. */
              gint64 due_time = retry_due_time (self, jobs[i]);

              kd_key_table_put_back (self->keys, mailbox, jobs + i, n - i);
              kd_scheduler_push_at (kd_worker_get_scheduler (worker),
                                    kd_mailbox_get_task (mailbox), due_time);
              return;
            }
          if (G_UNLIKELY (outcome == JOB_PARK))
            {
              /* The rest of the batch went back to the parked mailbox,
               * which is no longer ours. */
              release_job (self, worker, epoch);
              return;
            }

          /* The batch's last unit goes after the reaping, below. */
          if (i + 1 < n)
            release_job (self, worker, epoch);
          else
            last_epoch = epoch;
        }
      ran += n;

      /* A key's state goes when its mailbox ran empty. With an idle time
       * the reaped mailbox keeps it instead, for the key's next job, until
       * the timer's sweep ends the idle spell (or the bound on idle keys
       * ends another one early: its state is freed here). */
      keep_state = mailbox->has_state && self->key_idle_us > 0;
      if (!keep_state && mailbox->has_state && kd_key_table_is_empty (self->keys, mailbox))
        free_key_state (self, mailbox);

      /* Reap or take more in one locked step, and only then release the
       * last job's unit: once wait() returns, its keys have left the table
       * and their states are freed (unless idle). A reaped or rescheduled
       * mailbox is not ours to touch any more. */
      n = kd_key_table_next (self->keys, mailbox, jobs, MAILBOX_BUDGET - ran, keep_state,
                             &reaped, &evicted, &evicted_state);
      if (keep_state && reaped)
        arm_idle_sweep (self, kd_worker_get_scheduler (worker));
      if (G_UNLIKELY (evicted != NULL))
        end_idle_spell (self, evicted, evicted_state);
      release_job (self, worker, last_epoch);

      if (reaped)
        return;

      /* Back to the end of the input queue, behind every task that
       * arrived meanwhile: a key that never runs dry cannot starve them. */
      if (n == 0)
        {
          kd_scheduler_push (kd_worker_get_scheduler (worker), kd_mailbox_get_task (mailbox));
          return;
        }
    }
}

static void
run_task (KdTask   *task,
          KdWorker *worker,
          gpointer  user_data)
{
  KdDispatcher *self = user_data;
  KdWorkerStats *stats = &self->worker_stats[kd_worker_get_index (worker)];
  KdMailbox *mailbox = kd_mailbox_from_task (task);

  if (mailbox != NULL)
    {
      run_mailbox (self, worker, stats, mailbox);
    }
  else
    {
      KdJob *job = (KdJob *) task;
      guint epoch;

      if (G_UNLIKELY (job->ticket != NULL && job->attempt == 0))
        self->stage_hooks.claim (job, self->stage_data);
      epoch = job->epoch;

      while (G_UNLIKELY (run_job (self, stats, job, NULL, 0) == JOB_RETRY))
        {
          KdScheduler *scheduler = kd_worker_get_scheduler (worker);

          if (job->ticket == NULL)
            {
              kd_scheduler_push_at (scheduler, task, retry_due_time (self, job));
              return;
            }
          /* An ordered stage's job waits for its retry here: the items of
           * its key that entered after it may wait for it to end (their
           * emits wait for room in the stage), so it must never wait for
           * a worker (see kd-reorder.c). */
          kd_scheduler_sleep_until (scheduler, retry_due_time (self, job));
        }
      release_job (self, worker, epoch);
    }
}

/* With @start_lock held: the delivery of done callbacks to the main
 * context, created when the first job is accepted or handed back. */
static KdDelivery *
ensure_delivery_locked (KdDispatcher *self)
{
  if (self->delivery == NULL)
    g_atomic_pointer_set (&self->delivery,
                          kd_delivery_new (self->context, "kdispatch done delivery",
                                           deliver_job, self));
  return self->delivery;
}

/* The dispatcher whose worker init runs on this thread, if any. */
static KD_THREAD_LOCAL KdDispatcher *initializing;

/* On a new worker's thread: the application's worker init. */
static gboolean
start_worker (KdWorker  *worker,
              gpointer   user_data,
              GError   **error)
{
  KdDispatcher *self = user_data;
  GError *local_error = NULL;
  gpointer data;

  initializing = self;
  data = self->worker_init (self, kd_worker_get_index (worker), self->worker_data, &local_error);
  initializing = NULL;
  if (local_error != NULL)
    {
      g_propagate_error (error, local_error);
      return FALSE;
    }

  kd_worker_set_data (worker, data);
  return TRUE;
}

/* On an exiting worker's thread: the application's worker finalize. */
static void
stop_worker (KdWorker *worker,
             gpointer  user_data)
{
  KdDispatcher *self = user_data;

  self->worker_finalize (self, kd_worker_get_index (worker), kd_worker_get_data (worker),
                         self->worker_data);
}

/* Whether jobs or key states will wait for their time: failed jobs for
 * their retry, idle key states for their expiry. */
static gboolean
needs_timer (KdDispatcher *self)
{
  return self->max_attempts > 1 || (self->key_idle_us > 0 && self->key_state_new != NULL);
}

/* Creates the workers (and the main-context delivery, and the timer if
 * needed) once, when the configuration is final: at kd_dispatcher_start()
 * or before the first job is admitted. Fails if the dispatcher is closed,
 * a thread could not be made or a worker's init failed; the workers may
 * then be started again later. */
static gboolean
ensure_started (KdDispatcher  *self,
                GError       **error)
{
  KdScheduler *scheduler;

  if (G_LIKELY (g_atomic_pointer_get (&self->scheduler) != NULL))
    return TRUE;

  /* The workers start only once every init returned. */
  if (G_UNLIKELY (initializing == self))
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK,
                           "A worker's init cannot use its own dispatcher, which "
                           "starts once every init returned");
      return FALSE;
    }

  if (!g_atomic_int_get (&self->configured))
    g_atomic_int_set (&self->configured, TRUE);

  kd_mutex_lock (&self->start_lock);
  while (self->starting)
    kd_cond_wait (&self->start_cond, &self->start_lock);
  scheduler = self->scheduler;
  if (scheduler == NULL && kd_admission_is_closed (&self->admission))
    {
      g_set_error_literal (error, KD_ERROR, KD_ERROR_CLOSED, "The dispatcher is closed");
    }
  else if (scheduler == NULL)
    {
      if (self->context != NULL)
        ensure_delivery_locked (self);
      kd_key_table_set_max_idle (self->keys, self->max_idle_keys);
      self->starting = TRUE;

      /* Not under the lock: the inits (and finalizes, if one failed) are
       * the application's code. */
      kd_mutex_unlock (&self->start_lock);
      scheduler = kd_scheduler_new (self->n_workers, self->fanout, needs_timer (self), run_task,
                                    self->worker_init != NULL ? start_worker : NULL,
                                    self->worker_finalize != NULL ? stop_worker : NULL,
                                    self, error);
      kd_mutex_lock (&self->start_lock);

      if (scheduler != NULL)
        g_debug ("dispatcher %p: started %u workers in %u groups, capacity %u",
                 (gpointer) self, self->n_workers, kd_dispatcher_get_fanout (self),
                 self->admission.capacity);
      g_atomic_pointer_set (&self->scheduler, scheduler);
      self->starting = FALSE;
      g_cond_broadcast (&self->start_cond);
    }
  kd_mutex_unlock (&self->start_lock);

  return scheduler != NULL;
}

/* Once g_cancellable_cancel() marked the cancellable, a submit is refused
 * with KD_ERROR_CLOSED, even before the ::cancelled emission reaches our
 * handler (another handler of a shared cancellable may run first, and a
 * second g_cancellable_cancel() returns at once): closes, idempotently.
 * The handler does the rest when it runs. */
static inline void
refuse_if_cancelled (KdDispatcher *self)
{
  if (G_UNLIKELY (g_cancellable_is_cancelled (self->cancellable)) &&
      !kd_admission_is_closed (&self->admission))
    kd_dispatcher_close (self);
}

/* The first half of a submit: a unit of admission, in @epoch. On FALSE
 * nothing was taken. Inlined, as push_job() is: both are on every submit's
 * path, and the calls cost a tenth of an unkeyed job's instructions. */
G_ALWAYS_INLINE static inline gboolean
admit_job (KdDispatcher  *self,
           KdAdmitMode    mode,
           gint64         deadline,
           guint         *epoch,
           GError       **error)
{
  if (G_UNLIKELY (!ensure_started (self, error)))
    {
      count_rejected (self);
      return FALSE;
    }

  refuse_if_cancelled (self);
  if (!kd_admission_acquire (&self->admission, mode, deadline, epoch, error))
    {
      count_rejected (self);
      return FALSE;
    }

  return TRUE;
}

/* The second half: queues @item as a job holding the unit admit_job() took
 * in @epoch. @label (transfer full) (nullable): a kd_label_new() label the
 * job keeps for a pipeline: for an unkeyed job, the key it carries without
 * being ordered by it; for a keyed job, a copy of @key that the job's
 * handler can pass on without copying it again. */
/* The mode of a submit: a worker waiting for room that only workers can
 * free could wait forever, so on its own dispatcher a worker never
 * blocks. */
static KdAdmitMode
submit_mode (KdDispatcher *self,
             KdAdmitMode   mode)
{
  return mode != KD_ADMIT_TRY && is_own_worker (self) ? KD_ADMIT_TRY : mode;
}

/* The per-key bound a keyed submit waits for, in @bound; NULL if none. */
static const KdKeyBound *
key_bound (KdDispatcher *self,
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

/* The second half: queues @item as a job holding the unit admit_job() took
 * in @epoch, after waiting for room in its key if there is a per-key
 * @bound. FALSE with @error set if it gave up waiting: nothing was queued
 * and the caller still holds the unit. @label (transfer full) (nullable):
 * a kd_label_new() label the job keeps for a pipeline: for an unkeyed job,
 * the key it carries without being ordered by it; for a keyed job, a copy
 * of @key that the job's handler can pass on without copying it again.
 * Never with both a @label and a @bound. */
G_ALWAYS_INLINE static inline gboolean
push_job (KdDispatcher      *self,
          const char        *key,
          char              *label,
          gpointer           ticket,
          KdSubmitResult    *result,
          gpointer           item,
          guint              epoch,
          const KdKeyBound  *bound,
          GError           **error)
{
  KdScheduler *scheduler;
  KdMailbox *mailbox;
  KdJob *job;

  /* Every way in started the workers before it took the unit. */
  scheduler = g_atomic_pointer_get (&self->scheduler);
  job = kd_job_new (self, item, epoch);
  job->ticket = ticket;
  job->label = label;
  job->result = result;
  KD_TRACE3 (job_submit, self->name, key != NULL ? key : label, job);

  if (G_UNLIKELY (bound != NULL))
    {
      /* Counted there once it found room, before it can end. */
      if (!kd_key_table_push_bounded (self->keys, key, job, bound, &self->submitted,
                                      &mailbox, error))
        {
          job->result = NULL;
          kd_job_free (job);
          return FALSE;
        }
      counters_changed (self);
    }
  else
    {
      /* Counted before the job can end, so a stats snapshot never sees it
       * end before it was submitted. */
      __atomic_fetch_add (&self->submitted, 1, __ATOMIC_RELAXED);
      counters_changed (self);

      if (key == NULL)
        {
          kd_scheduler_push (scheduler, &job->task);
          return TRUE;
        }
      mailbox = kd_key_table_push (self->keys, key, job, self->key_capacity > 0);
    }

  /* A mailbox in the table is always scheduled or running; only its
   * creator schedules it. */
  if (mailbox != NULL)
    kd_scheduler_push (scheduler, kd_mailbox_get_task (mailbox));
  return TRUE;
}

static gboolean
submit_job (KdDispatcher  *self,
            const char    *key,
            gpointer       item,
            KdAdmitMode    mode,
            gint64         deadline,
            GError       **error)
{
  KdKeyBound bound;
  guint epoch;

  /* Made by g_object_new() rather than kd_dispatcher_new(). */
  g_return_val_if_fail (self->handler != NULL, FALSE);

  mode = submit_mode (self, mode);
  if (!admit_job (self, mode, deadline, &epoch, error))
    return FALSE;

  if (!push_job (self, key, NULL, NULL, NULL, item, epoch,
                 key_bound (self, key, mode, deadline, &bound), error))
    {
      kd_dispatcher_unadmit (self, epoch);
      return FALSE;
    }
  return TRUE;
}

/* Every job not started ends cancelled: the queued ones as workers reach
 * them, those waiting for a retry at once, those of parked keys too. */
static void
cancel (KdDispatcher *self)
{
  KdScheduler *scheduler;

  g_debug ("dispatcher %p: cancelled", (gpointer) self);
  kd_dispatcher_close (self);

  scheduler = g_atomic_pointer_get (&self->scheduler);
  if (scheduler != NULL)
    kd_scheduler_hurry (scheduler);
  drop_parked (self);
}

static void
on_cancelled (gpointer user_data)
{
  cancel (user_data);
}

/* Close, let every accepted job end, join the workers, deliver what waits
 * for the main context. Not on one of the dispatcher's own threads. */
static void
shutdown_sync (KdDispatcher *self)
{
  KdDispatcher *outer = shutting_down;
  KdScheduler *scheduler;

  shutting_down = self;

  /* No counter notify runs from now on (one in progress ends first). */
  if (g_atomic_pointer_get (&self->notifier) != NULL)
    kd_notifier_detach (self->notifier);

  kd_dispatcher_close (self);
  /* Nobody can resume a parked key any more. */
  drop_parked (self);
  kd_admission_wait (&self->admission, NULL, NULL);

  /* Closed and drained. (Telling the workers again is harmless, and needed
   * if they were started by kd_dispatcher_start() while the close that
   * drained the dispatcher was looking for them.) */
  scheduler = g_atomic_pointer_get (&self->scheduler);
  if (scheduler != NULL)
    {
      kd_scheduler_shutdown (scheduler);
      kd_scheduler_join (scheduler);
    }

  if (self->delivery != NULL)
    kd_delivery_flush (self->delivery);

  g_clear_pointer (&self->cancel_watch, kd_cancel_watch_free);

  g_debug ("dispatcher %p: shut down", (gpointer) self);
  shutting_down = outer;
}

/* The rest of a shutdown that began on one of our own threads. */
static void
shutdown_later (GObject *object)
{
  KdDispatcher *self = KD_DISPATCHER (object);

  shutdown_sync (self);
  g_atomic_int_set (&self->shutdown_state, SHUTDOWN_DONE);
}

/* The main context whose dispatch of our delivery or our counters' notify
 * runs on this thread, if any. */
static GMainContext *
dispatching_here (KdDispatcher *self)
{
  if (self->delivery != NULL && kd_delivery_is_dispatching (self->delivery))
    return self->context;
  if (g_atomic_pointer_get (&self->notifier) != NULL && kd_notifier_notifying_here (self->notifier))
    return self->context != NULL ? self->context : self->creation_context;
  return NULL;
}

static void
kd_dispatcher_dispose (GObject *object)
{
  KdDispatcher *self = KD_DISPATCHER (object);
  GMainContext *dispatching;

  switch (g_atomic_int_get (&self->shutdown_state))
    {
    case SHUTDOWN_NONE:
      dispatching = dispatching_here (self);
      if (dispatching != NULL || runs_on_own_thread (self))
        {
          /* The last reference went away on one of our own threads (a
           * worker, the timer's freeing an idle key state, a main context
           * delivering), which cannot wait for itself. Keep the object
           * alive, closed and with no key parked, so that it drains, and
           * finish the shutdown where it can wait (see kd-shutdown.c). */
          g_debug ("dispatcher %p: last unref on its own thread, shutting down "
                   "in the background", (gpointer) self);
          g_atomic_int_set (&self->shutdown_state, SHUTDOWN_ASYNC);
          kd_dispatcher_close (self);
          drop_parked (self);
          kd_shutdown_later (object, dispatching, shutdown_later);
        }
      else
        {
          shutdown_sync (self);
          g_atomic_int_set (&self->shutdown_state, SHUTDOWN_DONE);
        }
      break;

    case SHUTDOWN_ASYNC:
    case SHUTDOWN_DONE:
      break;

    default:
      g_assert_not_reached ();
    }

  G_OBJECT_CLASS (kd_dispatcher_parent_class)->dispose (object);
}

static void
kd_dispatcher_finalize (GObject *object)
{
  KdDispatcher *self = KD_DISPATCHER (object);

  g_assert (g_atomic_int_get (&self->shutdown_state) == SHUTDOWN_DONE);

  if (self->scheduler != NULL)
    kd_scheduler_free (self->scheduler);
  if (self->delivery != NULL)
    kd_delivery_destroy (self->delivery);
  if (self->notifier != NULL)
    kd_notifier_destroy (self->notifier);
  g_main_context_unref (self->creation_context);

  /* Every submission's result holds a reference until it was delivered:
   * none is waiting or pending any more. */
  g_assert (self->waiting.length == 0);
  g_assert (self->result_deliveries->len == 0);
  g_ptr_array_unref (self->result_deliveries);
  g_mutex_clear (&self->async_lock);

  kd_key_map_clear (&self->parked);
  g_mutex_clear (&self->parked_lock);
  kd_key_table_free (self->keys);
  kd_admission_clear (&self->admission);
  g_mutex_clear (&self->start_lock);
  g_cond_clear (&self->start_cond);
  g_clear_object (&self->cancellable);
  g_clear_pointer (&self->context, g_main_context_unref);
  g_free (self->name);
  g_aligned_free (self->worker_stats);

  /* Last: once the application's notifies run, the dispatcher holds
   * nothing of the application's any more (its context, its cancellable),
   * so a notify may drop the last reference to them, or let another thread
   * do it. */
  if (self->done_data_free != NULL)
    self->done_data_free (self->done_data);
  if (self->key_state_data_free != NULL)
    self->key_state_data_free (self->key_state_data);
  if (self->worker_data_free != NULL)
    self->worker_data_free (self->worker_data);
  if (self->dead_letter_data_free != NULL)
    self->dead_letter_data_free (self->dead_letter_data);
  if (self->handler_data_free != NULL)
    self->handler_data_free (self->handler_data);

  G_OBJECT_CLASS (kd_dispatcher_parent_class)->finalize (object);
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
        g_object_notify_by_pspec (object, properties[counters[i]]);
        any = TRUE;
      }
  g_object_thaw_notify (object);

  /* Look once more, after a quiet spell (see kd-notifier.c). */
  if (any)
    counters_changed (self);
}

static void
kd_dispatcher_constructed (GObject *object)
{
  KdDispatcher *self = KD_DISPATCHER (object);

  G_OBJECT_CLASS (kd_dispatcher_parent_class)->constructed (object);

  if (self->n_workers == 0)
    self->n_workers = MIN (g_get_num_processors (), KD_DISPATCHER_MAX_WORKERS);
  self->worker_stats = g_aligned_alloc0 (self->n_workers + 1, sizeof (KdWorkerStats),
                                         G_ALIGNOF (KdWorkerStats));
  /* Each worker counts the jobs it ends on a cache line of its own. */
  kd_admission_set_releasers (&self->admission, self->n_workers);
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
      g_value_set_uint (value, self->n_workers);
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
      g_value_set_uint (value, get_max_waiting (self));
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
      self->n_workers = g_value_get_uint (value);
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

static void
kd_dispatcher_class_init (KdDispatcherClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);
  GParamFlags config = G_PARAM_READWRITE | G_PARAM_EXPLICIT_NOTIFY | G_PARAM_STATIC_STRINGS;
  GParamFlags counter = G_PARAM_READABLE | G_PARAM_EXPLICIT_NOTIFY | G_PARAM_STATIC_STRINGS;

  object_class->constructed = kd_dispatcher_constructed;
  object_class->get_property = kd_dispatcher_get_property;
  object_class->set_property = kd_dispatcher_set_property;
  object_class->dispose = kd_dispatcher_dispose;
  object_class->finalize = kd_dispatcher_finalize;

  /**
   * KdDispatcher:n-workers:
   *
   * The number of worker threads, at most %KD_DISPATCHER_MAX_WORKERS; 0 at
   * construction means one per processor (at most
   * %KD_DISPATCHER_MAX_WORKERS).
   *
   * Since: 0.1
   */
  properties[PROP_N_WORKERS] =
    g_param_spec_uint ("n-workers", NULL, NULL, 0, KD_DISPATCHER_MAX_WORKERS, 0,
                       G_PARAM_READWRITE | G_PARAM_CONSTRUCT_ONLY | G_PARAM_STATIC_STRINGS);

  /**
   * KdDispatcher:fanout:
   *
   * The number of tier-1 dispatchers (see kd_dispatcher_set_fanout()), from
   * 1 to %KD_DISPATCHER_MAX_WORKERS. Writable until the first submit.
   *
   * Since: 0.1
   */
  properties[PROP_FANOUT] =
    g_param_spec_uint ("fanout", NULL, NULL, 1, KD_DISPATCHER_MAX_WORKERS, 1, config);

  /**
   * KdDispatcher:capacity:
   *
   * The admission bound (see kd_dispatcher_set_capacity()). Writable until
   * the first submit.
   *
   * Since: 0.1
   */
  properties[PROP_CAPACITY] =
    g_param_spec_uint ("capacity", NULL, NULL, 1, KD_ADMISSION_CAPACITY_MAX, DEFAULT_CAPACITY,
                       config);

  /**
   * KdDispatcher:name:
   *
   * The name in debug messages. Writable until the first submit.
   *
   * Since: 0.1
   */
  properties[PROP_NAME] = g_param_spec_string ("name", NULL, NULL, NULL, config);

  /**
   * KdDispatcher:cancellable:
   *
   * The cancellable that shuts the dispatcher down (see
   * kd_dispatcher_set_cancellable()). Writable until the first submit.
   *
   * Since: 0.1
   */
  properties[PROP_CANCELLABLE] =
    g_param_spec_object ("cancellable", NULL, NULL, G_TYPE_CANCELLABLE, config);

  /**
   * KdDispatcher:main-context:
   *
   * Where done callbacks run, and where the counters notify (see
   * kd_dispatcher_set_main_context()). Writable until the first submit.
   *
   * Since: 0.1
   */
  properties[PROP_MAIN_CONTEXT] =
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
  properties[PROP_SUBMITTED] = counter_param ("submitted", NULL);

  /**
   * KdDispatcher:completed:
   *
   * Jobs whose handler returned %TRUE.
   *
   * Since: 0.1
   */
  properties[PROP_COMPLETED] = counter_param ("completed", NULL);

  /**
   * KdDispatcher:failed:
   *
   * Jobs whose handler returned %FALSE.
   *
   * Since: 0.1
   */
  properties[PROP_FAILED] = counter_param ("failed", NULL);

  /**
   * KdDispatcher:cancelled:
   *
   * Jobs that ended without running.
   *
   * Since: 0.1
   */
  properties[PROP_CANCELLED] = counter_param ("cancelled", NULL);

  /**
   * KdDispatcher:rejected:
   *
   * Submissions refused (closed, full or timed out).
   *
   * Since: 0.1
   */
  properties[PROP_REJECTED] = counter_param ("rejected", NULL);

  /**
   * KdDispatcher:pending:
   *
   * Jobs accepted and not yet ended.
   *
   * Since: 0.1
   */
  properties[PROP_PENDING] = counter_param ("pending", NULL);

  /**
   * KdDispatcher:running:
   *
   * Handlers running right now.
   *
   * Since: 0.1
   */
  properties[PROP_RUNNING] = g_param_spec_uint ("running", NULL, NULL, 0, G_MAXUINT, 0, counter);

  /**
   * KdDispatcher:live-keys:
   *
   * Keys with jobs pending.
   *
   * Since: 0.1
   */
  properties[PROP_LIVE_KEYS] = g_param_spec_uint ("live-keys", NULL, NULL, 0, G_MAXUINT, 0, counter);

  /**
   * KdDispatcher:waiting:
   *
   * Async submissions waiting for room (see kd_dispatcher_submit_async()).
   *
   * Since: 0.1
   */
  properties[PROP_WAITING] = g_param_spec_uint ("waiting", NULL, NULL, 0, G_MAXUINT, 0, counter);

  /**
   * KdDispatcher:max-idle-keys:
   *
   * The most keys that keep their state while idle (see
   * kd_dispatcher_set_max_idle_keys()). Writable until the first submit.
   *
   * Since: 0.1
   */
  properties[PROP_MAX_IDLE_KEYS] =
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
  properties[PROP_MAX_WAITING] =
    g_param_spec_uint ("max-waiting", NULL, NULL, 1, G_MAXINT32, DEFAULT_CAPACITY, config);

  /**
   * KdDispatcher:idle-keys:
   *
   * Keys with no work that keep their state for the idle time (see
   * kd_dispatcher_set_key_idle_time()).
   *
   * Since: 0.1
   */
  properties[PROP_IDLE_KEYS] = g_param_spec_uint ("idle-keys", NULL, NULL, 0, G_MAXUINT, 0, counter);

  g_object_class_install_properties (object_class, N_PROPS, properties);
}

static void
kd_dispatcher_init (KdDispatcher *self)
{
  self->fanout = 1;
  self->max_attempts = 1;
  self->max_idle_keys = DEFAULT_MAX_IDLE_KEYS;
  self->failure_policy = KD_FAILURE_CONTINUE;
  g_mutex_init (&self->parked_lock);
  kd_key_map_init (&self->parked);
  kd_admission_init (&self->admission, DEFAULT_CAPACITY, 0);
  g_mutex_init (&self->start_lock);
  g_cond_init (&self->start_cond);
  self->keys = kd_key_table_new ();
  self->cancellable = g_cancellable_new ();
  self->cancel_watch = kd_cancel_watch_new (self->cancellable, on_cancelled, self);
  g_mutex_init (&self->async_lock);
  self->result_deliveries = g_ptr_array_new ();
  self->creation_context = g_main_context_ref_thread_default ();
}

/**
 * kd_dispatcher_new:
 * @n_workers: the number of worker threads, at most
 *   %KD_DISPATCHER_MAX_WORKERS; 0 for one per processor
 * @handler: (scope notified) (closure user_data) (destroy user_data_free):
 *   runs each job on a worker thread
 * @user_data: data for @handler
 * @user_data_free: (nullable): frees @user_data once the dispatcher is
 *   finalized, after every handler returned
 *
 * Creates a dispatcher. Configure it with the `kd_dispatcher_set_*()` calls,
 * then submit jobs from any thread. The worker threads start at the first
 * accepted job (or at kd_dispatcher_start()).
 *
 * Returns: (transfer full): a new dispatcher, or %NULL (with a critical
 *   message) if @n_workers is above %KD_DISPATCHER_MAX_WORKERS
 *
 * Since: 0.1
 */
KdDispatcher *
kd_dispatcher_new (guint           n_workers,
                   KdHandlerFunc   handler,
                   gpointer        user_data,
                   GDestroyNotify  user_data_free)
{
  KdDispatcher *self;

  g_return_val_if_fail (handler != NULL, NULL);
  g_return_val_if_fail (n_workers <= KD_DISPATCHER_MAX_WORKERS, NULL);

  self = g_object_new (KD_TYPE_DISPATCHER, "n-workers", n_workers, NULL);
  self->handler = handler;
  self->handler_data = user_data;
  self->handler_data_free = user_data_free;

  return self;
}

/**
 * kd_dispatcher_set_fanout:
 * @self: a dispatcher
 * @n_dispatchers: the number of tier-1 dispatchers, from 1 to
 *   %KD_DISPATCHER_MAX_WORKERS
 *
 * Sets how many tier-1 dispatchers share the input queue; the workers are
 * split among them as evenly as possible, and each feeds its own workers.
 * More dispatchers mean less contention on the input queue with many
 * workers. A value above the number of workers is clamped to it. The
 * default is 1.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_fanout (KdDispatcher *self,
                          guint         n_dispatchers)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (n_dispatchers > 0 && n_dispatchers <= KD_DISPATCHER_MAX_WORKERS);

  if (check_configurable (self, G_STRFUNC) && self->fanout != n_dispatchers)
    {
      self->fanout = n_dispatchers;
      g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_FANOUT]);
    }
}

/**
 * kd_dispatcher_get_fanout:
 * @self: a dispatcher
 *
 * Gets the number of tier-1 dispatchers, after clamping to the number of
 * workers.
 *
 * Returns: the fan-out
 *
 * Since: 0.1
 */
guint
kd_dispatcher_get_fanout (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  return MIN (self->fanout, self->n_workers);
}

/**
 * kd_dispatcher_get_n_workers:
 * @self: a dispatcher
 *
 * Gets the number of worker threads the dispatcher runs jobs on.
 *
 * Returns: the number of workers
 *
 * Since: 0.1
 */
guint
kd_dispatcher_get_n_workers (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  return self->n_workers;
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

  if (check_configurable (self, G_STRFUNC) && self->admission.capacity != capacity)
    {
      kd_admission_set_capacity (&self->admission, capacity);
      g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_CAPACITY]);
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
 * stay the caller's.
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

  if (check_configurable (self, G_STRFUNC))
    self->item_free = item_free;
}

/**
 * kd_dispatcher_set_done_func:
 * @self: a dispatcher
 * @done: (nullable) (scope notified) (closure user_data) (destroy destroy):
 *   called once for every accepted job when it ends
 * @user_data: data for @done
 * @destroy: (nullable): frees @user_data once the dispatcher is finalized
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
                             GDestroyNotify  destroy)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!check_configurable (self, G_STRFUNC))
    return;

  if (self->done_data_free != NULL)
    self->done_data_free (self->done_data);

  self->done = done;
  self->done_data = user_data;
  self->done_data_free = destroy;
}

/**
 * kd_dispatcher_set_key_state_funcs:
 * @self: a dispatcher
 * @state_new: (nullable) (scope notified) (closure user_data) (destroy user_data_free):
 *   creates a key's state
 * @state_free: (nullable) (scope forever): frees a
 *   state @state_new made
 * @user_data: data for @state_new
 * @user_data_free: (nullable): frees @user_data once the dispatcher is
 *   finalized
 *
 * Gives each key an actor state: @state_new makes it on the worker about to
 * run the key's first job, handlers of the key get it with
 * kd_job_get_key_state() and use it without locks (a key's jobs run one at
 * a time), and @state_free frees it on the worker that ran the key's last
 * job, once the key has no job left (a parked key's, see %KD_FAILURE_PARK,
 * on the thread that resumes, drops or cancels it or drops the last
 * reference; an idle key's on the dispatcher's timer thread, or on a worker
 * when the bound on idle keys ends its idle time early, see
 * kd_dispatcher_set_key_idle_time()). @state_free
 * must not wait for the dispatcher. A key has at most one state at a time:
 * the next job of a key whose state was freed gets a new one. Jobs that
 * never run (cancelled) make no state. Every state is freed before
 * kd_dispatcher_wait() returns for the jobs that used it, unless an idle
 * time keeps it longer (kd_dispatcher_set_key_idle_time()).
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_key_state_funcs (KdDispatcher      *self,
                                   KdKeyStateNewFunc  state_new,
                                   GDestroyNotify     state_free,
                                   gpointer           user_data,
                                   GDestroyNotify     user_data_free)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!check_configurable (self, G_STRFUNC))
    return;

  if (self->key_state_data_free != NULL)
    self->key_state_data_free (self->key_state_data);

  self->key_state_new = state_new;
  self->key_state_free = state_free;
  self->key_state_data = user_data;
  self->key_state_data_free = user_data_free;
}

/**
 * kd_dispatcher_set_key_capacity:
 * @self: a dispatcher
 * @capacity: the most pending jobs one key may have; 0 for no such bound
 *
 * Bounds each key's pending jobs (queued, waiting for a retry, parked or
 * running), so that one flooding client cannot take the whole bound of the
 * dispatcher (kd_dispatcher_set_capacity()) from the others. A submit to a
 * key at its bound behaves as at the dispatcher's bound:
 * kd_dispatcher_submit() blocks until one of the key's jobs ended,
 * kd_dispatcher_try_submit() fails with %KD_ERROR_FULL,
 * kd_dispatcher_submit_timeout() fails with %KD_ERROR_TIMEOUT at its
 * deadline, and closing the dispatcher refuses blocked submits with
 * %KD_ERROR_CLOSED; the item stays the caller's. A submit blocked on its
 * key holds one unit of the dispatcher's bound meanwhile (it counts as
 * pending, and kd_dispatcher_wait() called meanwhile waits for it), so a
 * key holds at most @capacity units plus one per thread blocked on it.
 * kd_dispatcher_submit_async() does not wait for a key: a submission to a
 * key at its bound is refused with %KD_ERROR_FULL. Jobs that a pipeline's
 * stage emits into the next are not bounded per key.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_key_capacity (KdDispatcher *self,
                                guint         capacity)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!check_configurable (self, G_STRFUNC))
    return;

  self->key_capacity = capacity;
}

/**
 * kd_dispatcher_get_key_capacity:
 * @self: a dispatcher
 *
 * Gets the bound on each key's pending jobs.
 *
 * Returns: the most pending jobs one key may have; 0 for no such bound
 *
 * Since: 0.1
 */
guint
kd_dispatcher_get_key_capacity (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  return self->key_capacity;
}

/**
 * kd_dispatcher_set_retry:
 * @self: a dispatcher
 * @max_attempts: how many times a job may run, at least 1 (1: no retry)
 * @initial_delay_us: the wait before the first retry, in microseconds
 * @max_delay_us: the longest wait between two attempts, at least
 *   @initial_delay_us
 *
 * Retries failed jobs: a job whose handler fails runs again after
 * @initial_delay_us, then after twice that, and so on (at most
 * @max_delay_us), until it completes or ran @max_attempts times; only then
 * does it end (failed: the done callback and the dead-letter function get
 * the last attempt's error). The handler learns which attempt it runs with
 * kd_job_get_attempt(); the errors of earlier attempts are dropped.
 *
 * A keyed job keeps its place: the key's later jobs wait behind its retry,
 * so its order holds, while other keys run on. A waiting retry holds no
 * worker thread (a timer thread holds it), but it still counts as pending
 * against the bound and for kd_dispatcher_wait(). Unkeyed jobs are retried
 * the same way, each on its own, but in a pipeline's %KD_STAGE_ORDERED
 * stage, where a retry waits on its worker: the items of its key that
 * entered after it may be waiting for it to end (see
 * kd_pipeline_set_stage_mode()).
 *
 * Once the dispatcher is cancelled no job is retried: those waiting for a
 * retry end at once with %G_IO_ERROR_CANCELLED. A job whose handler passed
 * its item on with kd_job_emit() is not retried either; in a pipeline
 * stage, a retried handler emits again what it emitted before it failed.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_retry (KdDispatcher *self,
                         guint         max_attempts,
                         gint64        initial_delay_us,
                         gint64        max_delay_us)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (max_attempts >= 1);
  g_return_if_fail (initial_delay_us >= 0);
  g_return_if_fail (max_delay_us >= initial_delay_us);

  if (!check_configurable (self, G_STRFUNC))
    return;

  self->max_attempts = max_attempts;
  self->retry_initial_us = initial_delay_us;
  self->retry_max_us = max_delay_us;
}

/**
 * kd_dispatcher_set_failure_policy:
 * @self: a dispatcher
 * @policy: what a key does after one of its jobs failed
 *
 * Chooses what happens to a key once one of its jobs ended failed (after
 * its last attempt). With %KD_FAILURE_PARK the key parks: its later jobs,
 * and those submitted meanwhile, stay queued untouched (still pending, so
 * kd_dispatcher_wait() waits for them) until kd_dispatcher_resume_key()
 * runs them or kd_dispatcher_drop_key() ends them cancelled. Other keys run
 * on. Cancelling the dispatcher, or dropping its last reference, drops
 * every parked key. The default, %KD_FAILURE_CONTINUE, runs the key's next
 * job. In a pipeline stage, a parked key keeps the stage, and so
 * kd_pipeline_close() and kd_pipeline_wait(), from draining until it is
 * resumed or dropped.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_failure_policy (KdDispatcher    *self,
                                  KdFailurePolicy  policy)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (policy == KD_FAILURE_CONTINUE || policy == KD_FAILURE_PARK);

  if (!check_configurable (self, G_STRFUNC))
    return;

  self->failure_policy = policy;
}

/**
 * kd_dispatcher_get_failure_policy:
 * @self: a dispatcher
 *
 * Gets what a key does after one of its jobs failed, as set by
 * kd_dispatcher_set_failure_policy().
 *
 * Returns: the failure policy
 *
 * Since: 0.1
 */
KdFailurePolicy
kd_dispatcher_get_failure_policy (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), KD_FAILURE_CONTINUE);

  return self->failure_policy;
}

/**
 * kd_dispatcher_set_dead_letter_func:
 * @self: a dispatcher
 * @func: (nullable) (scope notified) (closure user_data) (destroy destroy):
 *   receives each job that failed for good
 * @user_data: data for @func
 * @destroy: (nullable): frees @user_data once the dispatcher is finalized
 *
 * Sets the function that receives every job that ended failed after its
 * last attempt, on the worker that ran it, before the done callback (see
 * #KdDeadLetterFunc). Jobs that end cancelled never reach it.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_dead_letter_func (KdDispatcher     *self,
                                    KdDeadLetterFunc  func,
                                    gpointer          user_data,
                                    GDestroyNotify    destroy)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!check_configurable (self, G_STRFUNC))
    return;

  if (self->dead_letter_data_free != NULL)
    self->dead_letter_data_free (self->dead_letter_data);

  self->dead_letter = func;
  self->dead_letter_data = user_data;
  self->dead_letter_data_free = destroy;
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

  if (!check_configurable (self, G_STRFUNC))
    return;

  if (self->worker_data_free != NULL)
    self->worker_data_free (self->worker_data);

  self->worker_init = init;
  self->worker_finalize = finalize;
  self->worker_data = user_data;
  self->worker_data_free = user_data_free;
}

/**
 * kd_dispatcher_start:
 * @self: a dispatcher
 * @error: return location for a #GError
 *
 * Starts the worker threads now rather than at the first submit, and ends
 * the configuration. With worker functions
 * (kd_dispatcher_set_worker_funcs()) it returns once every worker ran its
 * init, so an init failure is reported here: no worker is left running and
 * the dispatcher stays unstarted, so the call may be retried (the settings
 * stay final). Does nothing if the workers already run.
 *
 * Returns: %TRUE if the workers run; %FALSE with the first init error, or
 *   %KD_ERROR_CLOSED if the dispatcher was closed before it started
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_start (KdDispatcher  *self,
                     GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);
  g_return_val_if_fail (self->handler != NULL, FALSE);

  return ensure_started (self, error);
}

/**
 * kd_dispatcher_set_key_idle_time:
 * @self: a dispatcher
 * @idle_us: how long a key keeps its state after its last job, in
 *   microseconds; 0 to free it at once
 *
 * Lets a key's actor state (kd_dispatcher_set_key_state_funcs()) outlive
 * the key's last job for @idle_us: a job of the key that arrives within
 * that time finds the same state, so a client that sends one message at a
 * time does not pay for a new state each time. Once the key stayed idle for
 * @idle_us its state is freed, on the dispatcher's timer thread. The state
 * is still used by one job at a time, without locks.
 *
 * With an idle time, states outlive kd_dispatcher_wait() (an idle key is
 * not counted in live-keys, but in #KdDispatcher:idle-keys); every one left
 * is freed when the dispatcher stops (when it is closed and its jobs ended,
 * so before wait() returns on a closed dispatcher and before the last unref
 * returns) or is cancelled.
 *
 * However fast keys come and go, at most kd_dispatcher_set_max_idle_keys()
 * of them keep their state at once: past that bound, the worker that makes
 * one more key idle frees the state of the least recently idle key of its
 * shard of the key table (keys spread evenly over 32 shards, so this is
 * about the least recently idle key of all) before it goes on. The timer
 * thread ends the idle spells that are due at a cost per key that does not
 * depend on how many are idle.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_key_idle_time (KdDispatcher *self,
                                 gint64        idle_us)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (idle_us >= 0);

  if (!check_configurable (self, G_STRFUNC))
    return;

  self->key_idle_us = idle_us;
}

/**
 * kd_dispatcher_set_max_idle_keys:
 * @self: a dispatcher
 * @max_keys: the most keys that keep their state while idle, from 1 to
 *   %G_MAXINT32
 *
 * Bounds the keys whose state outlives their last job for the idle time
 * (kd_dispatcher_set_key_idle_time()): past the bound, the least recently
 * idle state is freed early. The default is 65,536.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_max_idle_keys (KdDispatcher *self,
                                 guint         max_keys)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (max_keys >= 1 && max_keys <= G_MAXINT32);

  if (check_configurable (self, G_STRFUNC) && self->max_idle_keys != max_keys)
    {
      self->max_idle_keys = max_keys;
      g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_MAX_IDLE_KEYS]);
    }
}

/**
 * kd_dispatcher_get_max_idle_keys:
 * @self: a dispatcher
 *
 * Gets the bound on idle keys (see kd_dispatcher_set_max_idle_keys()).
 *
 * Returns: the most keys that keep their state while idle
 *
 * Since: 0.1
 */
guint
kd_dispatcher_get_max_idle_keys (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  return self->max_idle_keys;
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

  if (!check_configurable (self, G_STRFUNC) || cancellable == self->cancellable)
    return;

  g_clear_pointer (&self->cancel_watch, kd_cancel_watch_free);
  g_set_object (&self->cancellable, cancellable);
  self->cancel_watch = kd_cancel_watch_new (cancellable, on_cancelled, self);
  g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_CANCELLABLE]);
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

  if (!check_configurable (self, G_STRFUNC) || context == self->context)
    return;

  if (context != NULL)
    g_main_context_ref (context);
  g_clear_pointer (&self->context, g_main_context_unref);
  self->context = context;
  g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_MAIN_CONTEXT]);
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
 * kd_dispatcher_submit:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @error: return location for a #GError
 *
 * Submits a job. Jobs with the same @key run one at a time, in submission
 * order; unkeyed jobs run in parallel on every worker. The key is copied and
 * compared as a byte string; the empty string is a key like any other.
 *
 * If the admission bound is reached, waits until a job ends. Called from
 * one of this dispatcher's own workers, it never waits: it fails with
 * %KD_ERROR_FULL instead, because a worker waiting for a slot that only
 * workers can free could wait forever.
 *
 * On success the dispatcher owns @item until the job ended. On failure
 * (%KD_ERROR_CLOSED once the dispatcher is closed or cancelled) @item is
 * still the caller's and no callback runs for it.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_submit (KdDispatcher  *self,
                      const char    *key,
                      gpointer       item,
                      GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return submit_job (self, key, item, KD_ADMIT_BLOCK, 0, error);
}

/**
 * kd_dispatcher_try_submit:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @error: return location for a #GError
 *
 * Like kd_dispatcher_submit(), but fails with %KD_ERROR_FULL at once if the
 * admission bound is reached.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_try_submit (KdDispatcher  *self,
                          const char    *key,
                          gpointer       item,
                          GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return submit_job (self, key, item, KD_ADMIT_TRY, 0, error);
}

/**
 * kd_dispatcher_submit_timeout:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @timeout_us: how long to wait for room, in microseconds; 0 or less
 *   does not wait
 * @error: return location for a #GError
 *
 * Like kd_dispatcher_submit(), but fails with %KD_ERROR_TIMEOUT if the
 * admission bound is still reached after @timeout_us. A closed dispatcher
 * fails at once with %KD_ERROR_CLOSED. Called from one of this dispatcher's
 * own workers it does not wait, like kd_dispatcher_submit(): it fails with
 * %KD_ERROR_FULL if the bound is reached.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_submit_timeout (KdDispatcher  *self,
                              const char    *key,
                              gpointer       item,
                              gint64         timeout_us,
                              GError       **error)
{
  gint64 now = g_get_monotonic_time ();

  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  /* A deadline past the end of time is no deadline. */
  if (timeout_us > G_MAXINT64 - now)
    return submit_job (self, key, item, KD_ADMIT_BLOCK, 0, error);

  return submit_job (self, key, item, KD_ADMIT_DEADLINE, now + MAX (timeout_us, 0),
                     error);
}

/* The delivery for one more async result in @context, created if none is
 * pending there. */
static KdDelivery *
result_delivery_take (KdDispatcher *self,
                      GMainContext *context)
{
  KdResultDelivery *found = NULL;
  guint i;

  kd_mutex_lock (&self->async_lock);
  for (i = 0; i < self->result_deliveries->len && found == NULL; i++)
    if (((KdResultDelivery *) g_ptr_array_index (self->result_deliveries, i))->context == context)
      found = g_ptr_array_index (self->result_deliveries, i);
  if (found == NULL)
    {
      found = g_new0 (KdResultDelivery, 1);
      found->context = g_main_context_ref (context);
      found->delivery = kd_delivery_new (context, "kdispatch async results",
                                         kd_submit_result_deliver, found);
      g_ptr_array_add (self->result_deliveries, found);
    }
  found->pending++;
  kd_mutex_unlock (&self->async_lock);

  return found->delivery;
}

/* After a result's callback ran, in its context's thread, from the
 * dispatch of @done's delivery: the last one pending lets the delivery and
 * the context go (GLib keeps a source alive while it dispatches). */
void
kd_dispatcher_result_delivered (KdDispatcher     *self,
                                KdResultDelivery *done)
{
  gboolean last;

  kd_mutex_lock (&self->async_lock);
  g_assert (done->pending > 0);
  last = --done->pending == 0;
  if (last)
    g_ptr_array_remove_fast (self->result_deliveries, done);
  kd_mutex_unlock (&self->async_lock);

  if (last)
    {
      kd_delivery_destroy (done->delivery);
      g_main_context_unref (done->context);
      g_free (done);
    }
}

/* A submission that was never accepted: its callback sees @error
 * (transfer full; NULL for KD_ERROR_CLOSED) and the item is still the
 * caller's. */
static void
refuse_result (KdDispatcher   *self,
               KdSubmitResult *result,
               GError         *error)
{
  count_rejected (self);
  if (error == NULL)
    error = g_error_new_literal (KD_ERROR, KD_ERROR_CLOSED,
                                 "The dispatcher was closed before the submission was accepted");
  kd_submit_result_complete (result, error);
}

/* With @async_lock held: admits waiting submissions, first come first
 * served, while there is room. Admitting and queueing under the lock keeps
 * them in call order, hence a key's jobs in order. Once the dispatcher is
 * closed, refuses them all. */
static void
admit_waiting_locked (KdDispatcher *self)
{
  while (self->waiting.length > 0)
    {
      KdSubmitResult *result = kd_submit_result_from_task (self->waiting.head);
      GError *error = NULL;
      KdKeyBound bound;
      KdTask *last;
      guint epoch, n;

      if (!kd_admission_acquire (&self->admission, KD_ADMIT_TRY, 0, &epoch, NULL))
        {
          if (!kd_admission_is_closed (&self->admission))
            return;

          while (self->waiting.length > 0)
            {
              result = kd_submit_result_from_task (kd_task_list_take (&self->waiting, 1,
                                                                      &n, &last));
              refuse_result (self, result, NULL);
            }
          __atomic_store_n (&self->n_waiting, 0, __ATOMIC_SEQ_CST);
          return;
        }

      /* Counted as waiting until queued: a submission made meanwhile by
       * the thread that made this one must not overtake it. */
      kd_task_list_take (&self->waiting, 1, &n, &last);
      if (!push_job (self, kd_submit_result_get_key (result), NULL, NULL, result,
                     kd_submit_result_get_item (result), epoch,
                     key_bound (self, kd_submit_result_get_key (result), KD_ADMIT_TRY, 0, &bound),
                     &error))
        {
          /* Its key is full. (Not release_unit(): we hold @async_lock.) */
          if (kd_admission_release (&self->admission, KD_ADMISSION_ANY_RELEASER, epoch))
            shutdown_scheduler (self);
          refuse_result (self, result, g_steal_pointer (&error));
        }
      __atomic_sub_fetch (&self->n_waiting, 1, __ATOMIC_SEQ_CST);
    }
}

static void
admit_waiting (KdDispatcher *self)
{
  kd_mutex_lock (&self->async_lock);
  admit_waiting_locked (self);
  kd_mutex_unlock (&self->async_lock);
}

static void
refuse_waiting (KdDispatcher *self)
{
  if (__atomic_load_n (&self->n_waiting, __ATOMIC_SEQ_CST) > 0)
    admit_waiting (self);
}

/**
 * kd_dispatcher_set_max_waiting:
 * @self: a dispatcher
 * @max_waiting: the most async submissions that may wait for room, from 1
 *   to %G_MAXINT32
 *
 * Bounds the async submissions (kd_dispatcher_submit_async()) that wait
 * for room while the dispatcher is at its bound. One more is refused: its
 * callback, in a later iteration of the caller's context, gets
 * %KD_ERROR_FULL, and its item is still the caller's. The default is the
 * capacity (kd_dispatcher_set_capacity()).
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_max_waiting (KdDispatcher *self,
                               guint         max_waiting)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (max_waiting >= 1 && max_waiting <= G_MAXINT32);

  if (check_configurable (self, G_STRFUNC) && self->max_waiting != max_waiting)
    {
      self->max_waiting = max_waiting;
      g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_MAX_WAITING]);
    }
}

/**
 * kd_dispatcher_get_max_waiting:
 * @self: a dispatcher
 *
 * Gets the bound on async submissions waiting for room (see
 * kd_dispatcher_set_max_waiting()).
 *
 * Returns: the most async submissions that may wait
 *
 * Since: 0.1
 */
guint
kd_dispatcher_get_max_waiting (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  return get_max_waiting (self);
}

/**
 * kd_dispatcher_submit_async:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @cancellable: (nullable): cancels this submission until its job starts
 * @callback: (scope async) (nullable) (closure user_data): called once the
 *   job has ended, or the submission was refused
 * @user_data: data for @callback
 *
 * Submits a job without ever blocking the calling thread. If the dispatcher
 * is at its bound, the submission waits, without a thread, and is accepted
 * when room frees, after the async submissions made before it; if
 * kd_dispatcher_get_max_waiting() submissions already wait, it is refused
 * with %KD_ERROR_FULL (see kd_dispatcher_set_max_waiting()).
 *
 * @callback runs in the thread-default main context of the calling thread
 * (see g_main_context_push_thread_default()), in a later iteration, never
 * from inside this call. It runs once the job has ended (after the done
 * callback and the item-free function), so for the submissions of one key
 * made from one thread the callbacks come in submission order. Call
 * kd_dispatcher_submit_finish() from it to learn how the job ended.
 *
 * Cancelling @cancellable before the job starts ends the job with
 * %G_IO_ERROR_CANCELLED without running it: it still takes its turn in its
 * key's order (a waiting submission is accepted first), and ends through
 * the done callback and item-free function like any job.
 *
 * If the dispatcher is closed (or cancelled) before the submission was
 * accepted, it is refused with %KD_ERROR_CLOSED: no job was created and
 * @item is still the caller's. A refusal comes through @callback too, in a
 * later iteration: until then, like every call whose callback has not run,
 * it holds a small record (not the item) and a reference to the
 * dispatcher.
 *
 * Thread-safe.
 *
 * Since: 0.1
 */
void
kd_dispatcher_submit_async (KdDispatcher        *self,
                            const char          *key,
                            gpointer             item,
                            GCancellable        *cancellable,
                            GAsyncReadyCallback  callback,
                            gpointer             user_data)
{
  KdSubmitResult *result;
  GMainContext *context;
  GError *error = NULL;
  guint epoch;

  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (self->handler != NULL);
  g_return_if_fail (cancellable == NULL || G_IS_CANCELLABLE (cancellable));

  context = g_main_context_ref_thread_default ();
  result = kd_submit_result_new (self, result_delivery_take (self, context), item,
                                 cancellable, callback, user_data);
  g_main_context_unref (context);

  if (G_UNLIKELY (!ensure_started (self, &error)))
    {
      refuse_result (self, result, g_steal_pointer (&error));
      return;
    }

  /* Nobody waits: straight in if there is room. */
  refuse_if_cancelled (self);
  if (__atomic_load_n (&self->n_waiting, __ATOMIC_SEQ_CST) == 0)
    {
      if (kd_admission_acquire (&self->admission, KD_ADMIT_TRY, 0, &epoch, NULL))
        {
          KdKeyBound bound;

          /* A full key does not wait: the submission is refused. */
          if (!push_job (self, key, NULL, NULL, result, item, epoch,
                         key_bound (self, key, KD_ADMIT_TRY, 0, &bound), &error))
            {
              release_unit (self, KD_ADMISSION_ANY_RELEASER, epoch);
              refuse_result (self, result, g_steal_pointer (&error));
            }
          return;
        }
      if (kd_admission_is_closed (&self->admission))
        {
          refuse_result (self, result, NULL);
          return;
        }
    }

  /* Behind those who wait, if there is room among them. Counted before
   * looking for room again: a unit released meanwhile either is seen here
   * or sees this submission (see release_unit()). */
  kd_submit_result_keep_key (result, key);
  kd_mutex_lock (&self->async_lock);
  if (self->waiting.length >= get_max_waiting (self))
    {
      kd_mutex_unlock (&self->async_lock);
      /* Closed before full, as for any submit. */
      refuse_result (self, result,
                     kd_admission_is_closed (&self->admission)
                       ? NULL
                       : g_error_new (KD_ERROR, KD_ERROR_FULL,
                                      "%u async submissions already wait for room (see "
                                      "kd_dispatcher_set_max_waiting())", get_max_waiting (self)));
      return;
    }
  kd_task_list_push (&self->waiting, kd_submit_result_get_task (result));
  __atomic_add_fetch (&self->n_waiting, 1, __ATOMIC_SEQ_CST);
  admit_waiting_locked (self);
  kd_mutex_unlock (&self->async_lock);
  counters_changed (self);
}

/**
 * kd_dispatcher_submit_finish:
 * @self: a dispatcher
 * @result: the #GAsyncResult given to the callback of
 *   kd_dispatcher_submit_async()
 * @error: return location for a #GError
 *
 * Tells how an async submission ended: %TRUE if its handler completed;
 * %FALSE with the handler's error if it failed, %G_IO_ERROR_CANCELLED if the
 * job ended without running (the submission's or the dispatcher's
 * cancellable), or %KD_ERROR_CLOSED if the submission was never accepted
 * (the item then still belongs to the caller).
 *
 * Returns: %TRUE if the job ran and completed
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_submit_finish (KdDispatcher  *self,
                             GAsyncResult  *result,
                             GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (KD_IS_SUBMIT_RESULT (result), FALSE);
  g_return_val_if_fail (g_async_result_is_tagged (result, KD_SUBMIT_RESULT_TAG), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return kd_submit_result_propagate (KD_SUBMIT_RESULT (result), error);
}

/**
 * kd_dispatcher_wait:
 * @self: a dispatcher
 *
 * Returns once every job accepted before the call has ended: its done
 * callback and item-free function ran (with a main context, once its
 * handler returned; the deliveries follow when the context is iterated).
 * Jobs submitted by other threads during the call do not delay it (but for
 * a submit that was blocked on its key's bound before the call, see
 * kd_dispatcher_set_key_capacity()). It can be called any number of times:
 * batch, wait, next batch.
 *
 * If the dispatcher is closed and nothing is pending when the wait ends,
 * its worker threads have exited when it returns.
 *
 * Thread-safe, but not from the dispatcher's own threads: its handlers,
 * done callbacks running on its workers, or key-state frees on its timer
 * or its shutdown (a job cannot wait for itself, nor a retry for the timer
 * that waits in it). From there it logs a critical and returns at once.
 *
 * Since: 0.1
 */
void
kd_dispatcher_wait (KdDispatcher *self)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  kd_dispatcher_wait_sealed (self, NULL, NULL);
}

/* kd_dispatcher_wait(), calling @sealed once the jobs to wait for are fixed:
 * a job accepted after @sealed was called is not waited for. */
void
kd_dispatcher_wait_sealed (KdDispatcher *self,
                           KdSealedFunc  sealed,
                           gpointer      user_data)
{
  KdScheduler *scheduler;

  if (runs_on_own_thread (self))
    {
      g_critical ("kd_dispatcher_wait: called from one of the dispatcher's own "
                  "threads (a worker, its timer or its shutdown), which would wait "
                  "for itself");
      return;
    }

  kd_admission_wait (&self->admission, sealed, user_data);

  scheduler = g_atomic_pointer_get (&self->scheduler);
  if (scheduler != NULL &&
      kd_admission_is_closed (&self->admission) &&
      kd_admission_get_pending (&self->admission) == 0)
    {
      kd_scheduler_shutdown (scheduler);
      kd_scheduler_join (scheduler);
    }
}

/**
 * kd_dispatcher_close:
 * @self: a dispatcher
 *
 * Stops accepting jobs: every later submit fails with %KD_ERROR_CLOSED, and
 * blocked submitters wake up and fail the same way. Jobs already accepted
 * still run. Once they have ended the worker threads exit.
 *
 * Thread-safe and idempotent; may be called from a handler.
 *
 * Since: 0.1
 */
void
kd_dispatcher_close (KdDispatcher *self)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (kd_admission_close (&self->admission))
    shutdown_scheduler (self);
  refuse_waiting (self);
  if (self->key_capacity > 0)
    kd_key_table_wake_bounded (self->keys);
}

/**
 * kd_dispatcher_resume_key:
 * @self: a dispatcher
 * @key: a key parked after a failure
 *
 * Lets a parked key run again (see %KD_FAILURE_PARK): its queued jobs run
 * in their order, from the one after the job that failed.
 *
 * Thread-safe; may be called from a handler or a done callback.
 *
 * Returns: %TRUE if @key was parked
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_resume_key (KdDispatcher *self,
                          const char   *key)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (key != NULL, FALSE);

  return take_parked (self, key, FALSE);
}

/**
 * kd_dispatcher_drop_key:
 * @self: a dispatcher
 * @key: a key parked after a failure
 *
 * Unparks a parked key and hands back its queued jobs: each ends with
 * %G_IO_ERROR_CANCELLED through the done callback and the item-free
 * function, in the key's order, without running. Jobs of the key submitted
 * after this call run normally (a job submitted at the same time may go
 * either way).
 *
 * Thread-safe; may be called from a handler or a done callback.
 *
 * Returns: %TRUE if @key was parked
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_drop_key (KdDispatcher *self,
                        const char   *key)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (key != NULL, FALSE);

  return take_parked (self, key, TRUE);
}

/**
 * kd_dispatcher_list_parked_keys:
 * @self: a dispatcher
 *
 * Lists the keys parked after a failure (see %KD_FAILURE_PARK), in no
 * particular order.
 *
 * Thread-safe.
 *
 * Returns: (transfer full) (array zero-terminated=1): the parked keys; free
 *   with g_strfreev()
 *
 * Since: 0.1
 */
char **
kd_dispatcher_list_parked_keys (KdDispatcher *self)
{
  GPtrArray *keys;
  gpointer mailbox;
  guint i = 0;

  g_return_val_if_fail (KD_IS_DISPATCHER (self), NULL);

  keys = g_ptr_array_new ();
  kd_mutex_lock (&self->parked_lock);
  while (kd_key_map_next (&self->parked, &i, &mailbox))
    g_ptr_array_add (keys, g_strdup (kd_mailbox_get_key (mailbox)));
  kd_mutex_unlock (&self->parked_lock);
  g_ptr_array_add (keys, NULL);

  return (char **) g_ptr_array_free (keys, FALSE);
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
  guint i;

  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (stats != NULL);

  for (attempt = 0; attempt < STATS_ATTEMPTS; attempt++)
    {
      guint64 ended_after = 0;

      memset (stats, 0, sizeof *stats);
      for (i = 0; i <= self->n_workers; i++)
        {
          KdWorkerStats *worker = &self->worker_stats[i];

          stats->completed += __atomic_load_n (&worker->completed, __ATOMIC_ACQUIRE);
          stats->failed += __atomic_load_n (&worker->failed, __ATOMIC_ACQUIRE);
          stats->cancelled += __atomic_load_n (&worker->cancelled, __ATOMIC_ACQUIRE);
          stats->running += (guint) __atomic_load_n (&worker->running, __ATOMIC_RELAXED);
        }
      /* Read after the ended counters: every job counted as ended was
       * counted as submitted before, so pending cannot go negative. */
      stats->submitted = __atomic_load_n (&self->submitted, __ATOMIC_ACQUIRE);

      for (i = 0; i <= self->n_workers; i++)
        {
          KdWorkerStats *worker = &self->worker_stats[i];

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
  for (i = 0; i <= self->n_workers; i++)
    stats->retried += __atomic_load_n (&self->worker_stats[i].retried, __ATOMIC_RELAXED);
  stats->parked_keys = (guint) g_atomic_int_get (&self->n_parked);
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

/* The exact number of jobs holding a unit of admission right now. */
guint
kd_dispatcher_get_admitted (KdDispatcher *self)
{
  return kd_admission_get_pending (&self->admission);
}

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
  return admit_job (self, submit_mode (self, KD_ADMIT_BLOCK), 0, epoch, error);
}

/* ...then either the job, which keeps @label (transfer full, a
 * kd_label_new() label, nullable) and @ticket; a @keyed job is ordered by
 * @label, any other carries it as its key... */
void
kd_dispatcher_push_admitted (KdDispatcher *self,
                             gboolean      keyed,
                             char         *label,
                             gpointer      item,
                             gpointer      ticket,
                             guint         epoch)
{
  /* A stage's key bound does not apply to what the stage before emits. */
  push_job (self, keyed ? label : NULL, label, ticket, NULL, item, epoch, NULL, NULL);
}

/* ...or the unit given back: the submit is refused after all (counted as
 * rejected) and the item stays the caller's. */
void
kd_dispatcher_unadmit (KdDispatcher *self,
                       guint         epoch)
{
  count_rejected (self);
  release_unit (self, KD_ADMISSION_ANY_RELEASER, epoch);
}

/* Frees @item with the item-free function, if any. */
void
kd_dispatcher_free_item (KdDispatcher *self,
                         gpointer      item)
{
  if (self->item_free != NULL)
    self->item_free (item);
}

/* Ends an item that was meant for this stage but never entered it (a
 * pipeline could not pass it on): the done callback sees @error, then the
 * item-free function runs, and the stats count it as submitted and
 * cancelled. Any thread. */
void
kd_dispatcher_hand_back (KdDispatcher *self,
                         const char   *key,
                         gpointer      item,
                         const GError *error)
{
  KdWorkerStats *others = &self->worker_stats[self->n_workers];
  KdDelivery *delivery = NULL;
  KdJob *job = kd_job_new (self, item, 0);

  job->label = kd_label_new (key);
  __atomic_fetch_add (&self->submitted, 1, __ATOMIC_RELAXED);

  if (self->context != NULL)
    {
      kd_mutex_lock (&self->start_lock);
      delivery = ensure_delivery_locked (self);
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
      finish_job (self, job, g_error_copy (error));
      __atomic_fetch_add (&others->cancelled, 1, __ATOMIC_RELEASE);
    }
  counters_changed (self);
}

/* kd_job_emit(): what the stage's pipeline does with an emitted item. */
gboolean
kd_dispatcher_emit_job (KdJob       *job,
                        const char  *key,
                        gpointer     item,
                        GError     **error)
{
  KdDispatcher *self = job->dispatcher;

  if (self->stage_hooks.emit == NULL)
    {
      g_critical ("kd_job_emit: the job's dispatcher is not a pipeline stage");
      return FALSE;
    }

  return self->stage_hooks.emit (job, key, item, error, self->stage_data);
}

/* Whether the calling thread is one of this dispatcher's: a worker, its
 * timer's or the one running its shutdown. */
gboolean
kd_dispatcher_runs_here (KdDispatcher *self)
{
  return runs_on_own_thread (self);
}

/* The calling worker's data, if it is one of this dispatcher's workers. */
gpointer
kd_dispatcher_get_worker_data (KdDispatcher *self)
{
  return is_own_worker (self) ? kd_worker_get_data (kd_worker_get_current ()) : NULL;
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

  if (!check_configurable (self, G_STRFUNC) || g_strcmp0 (name, self->name) == 0)
    return;

  g_free (self->name);
  self->name = g_strdup (name);
  g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_NAME]);
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
