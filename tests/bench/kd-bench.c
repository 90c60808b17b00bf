/* kd-bench.c: the kdispatch benchmark
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Runs the workloads of BENCH.md exactly as written there, each one with
 * kdispatch and with its plain-GLib baseline in the same invocation, and
 * reports medians over the repetitions and the ratio kdispatch / baseline.
 * Every run checks its results (order, counts, xor); a failed check makes the
 * program exit with status 1.
 *
 *   W1  1,000,000 unkeyed jobs, slot[i]++; bound 1024; 2 worker groups x 2 workers
 *       baseline: g_thread_pool_push to a 4-thread pool
 *   W2  1,000,000 jobs over 1,000 keys, per-key sequence check; 4 workers
 *       baseline: a GAsyncQueue mailbox per key, pushed to a 4-thread
 *       GThreadPool each time it goes from empty to non-empty
 *   W3  100,000 keys x 10 jobs (key churn), same job and baseline as W2;
 *       peak RSS, and live keys after wait
 *   W4  20,000 CPU-bound jobs of ~50 us, 2 workers; efficiency against the
 *       serial loop time / 2; baseline: a 2-thread GThreadPool
 *   L1  200,000 keyed jobs over 1,000 keys at 50 % of the measured W2
 *       capacity; submit->start and submit->done latency percentiles
 *   P1  a pipeline of 1,000,000 items over 1,000 keys: an ordered parallel
 *       parse stage, a keyed aggregate stage, an ordered sink stage, 2
 *       workers each; per-key order checked at the aggregate and the sink;
 *       baseline: the same steps in a loop on one thread
 *   W5  W1 with its jobs submitted 64 at a time (kd_dispatcher_submit_many());
 *       W5k W2 the same way; baselines: W1's and W2's, which have no batch
 *   H1  hostile keys: W3's shape with 20,000 keys x 10 jobs, the keys built
 *       to share the hash kdispatch used before (FNV-1a multicollisions,
 *       tests/kd-collide.h), against random keys of the same length;
 *       H1i the same with key states kept for a 30 s idle time. The ratio
 *       is the colliding keys' time over the random keys'.
 *
 * The Go anchor: W1, W2 and W3 are also run by kd-bench-go (W5 and W5k
 * against Go's W1 and W2: Go has no batch send)
 * (tests/bench/go/kd-bench-go.go, standard library only), written as a Go
 * programmer would write them: W1 one channel buffered to 1024 and 4 worker
 * goroutines; W2 and W3 a goroutine and a channel buffered to 64 per key,
 * made at the key's first job, found by the producer in a map. Meson builds
 * it when it finds `go`, and this program runs it as a subprocess in every
 * repetition of those workloads (after kdispatch and the baseline, before
 * them in odd rounds), reads its one result line and reports its median and
 * the ratio kdispatch / Go. Absolute figures on a shared host move by 2x and
 * more from one hour to the next; a ratio measured in the same rounds is the
 * one to compare. --no-go skips it; a failed Go check fails the run too.
 *
 * Timing runs from just before the first submit until every job has ended;
 * creating the dispatcher or pool is outside it. Keys ("k%u") are formatted
 * before timing, and the benchmark allocates nothing per job (the job index
 * is packed into the item pointer). Peak RSS is VmHWM, reset before each run
 * through /proc/self/clear_refs.
 */

#include <kdispatch/kdispatch.h>
#include <malloc.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kd-collide.h"

#define CACHE_LINE 64

typedef struct
{
  gint64 value;
  char   padding[CACHE_LINE - sizeof (gint64)];
} PaddedLast;

typedef struct
{
  double   seconds;
  double   rate;          /* jobs per second */
  guint64  peak_rss_kib;
  gboolean ok;
  char     check[160];    /* what the check found */
  double   efficiency;    /* W4: ideal_seconds / seconds */
  double   ideal_seconds; /* W4: the serial time / 2, measured in the same repetition */
  double   live_keys;     /* W3, kdispatch only */
  /* L1, in microseconds */
  double   start_p50, start_p99, start_p999, start_max;
  double   done_p50, done_p99, done_p999, done_max;
  double   offered_rate;
  /* L1: how often the producer woke late and waited for a processor (see
   * L1_PACE), and the start latency of the jobs submitted on schedule */
  double   stalls;        /* a count, kept as a double for MEDIAN() */
  double   stalled_ms;
  double   run_delay_ms;  /* the producer's time waiting for a processor */
  double   late_share;    /* of the jobs, submitted late */
  double   on_time_p99;
} RunResult;

typedef struct
{
  /* Options */
  guint    n_jobs;        /* 0: the workload's own size */
  guint    n_workers;     /* 0: the workload's own count */
  guint    capacity;
  gboolean baseline;
  const char *go_program;  /* kd-bench-go, or NULL: no Go anchor */

  /* W2's measured kdispatch and baseline capacity, for L1 */
  double   w2_kd_rate;
  double   w2_glib_rate;
  double   l1_rate;       /* jobs/s for L1; 0: half of W2's capacity */
  guint    p1_rounds;     /* P1's parse work per item */
} Bench;

typedef struct
{
  const char *id;
  const char *title;
  gboolean  (*run_kd)   (Bench *bench, RunResult *result);
  gboolean  (*run_glib) (Bench *bench, RunResult *result);
  const char *go_id;       /* the kd-bench-go workload run as its anchor, or NULL */
} Workload;

/* ------------------------------------------------------------------------ */
/* Clocks and memory                                                         */

static inline gint64
now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (gint64) ts.tv_sec * G_GINT64_CONSTANT (1000000000) + ts.tv_nsec;
}

/* Starts @dispatcher's workers before the clock starts, as the baselines'
 * exclusive GThreadPools start theirs when they are made: creating the
 * workers is part of creating the dispatcher, which is not timed. */
static void
start_workers (KdDispatcher *dispatcher)
{
  g_autoptr (GError) error = NULL;

  if (!kd_dispatcher_start (dispatcher, &error))
    g_error ("kd_dispatcher_start: %s", error->message);
}

static void
reset_peak_rss (void)
{
  FILE *file;

  /* Give back what earlier runs freed, then reset VmHWM to the current RSS
   * (writing 5 to clear_refs, Linux >= 4.0). */
  malloc_trim (0);
  file = fopen ("/proc/self/clear_refs", "w");

  if (file != NULL)
    {
      fputs ("5", file);
      fclose (file);
    }
}

static guint64
peak_rss_kib (void)
{
  char *status = NULL;
  guint64 kib = 0;
  char *line;

  if (!g_file_get_contents ("/proc/self/status", &status, NULL, NULL))
    return 0;
  line = strstr (status, "VmHWM:");
  if (line != NULL)
    kib = g_ascii_strtoull (line + 6, NULL, 10);
  g_free (status);

  return kib;
}

/* The keys "k0" ... in one buffer: formatting allocates nothing per key, so
 * allocation counts that scale with the job count are kdispatch's own. */
#define KEY_SIZE 12

static char **
format_keys (guint n_keys)
{
  char **keys = g_new (char *, n_keys + 1);
  char *storage = g_malloc ((gsize) n_keys * KEY_SIZE);
  guint i;

  for (i = 0; i < n_keys; i++)
    {
      keys[i] = storage + (gsize) i * KEY_SIZE;
      g_snprintf (keys[i], KEY_SIZE, "k%u", i);
    }
  keys[n_keys] = NULL;

  return keys;
}

static void
free_keys (char **keys)
{
  g_free (keys[0]);
  g_free (keys);
}

static void
finish_run (RunResult *result,
            gint64     start_ns,
            gint64     end_ns,
            guint      n_jobs)
{
  result->seconds = (double) (end_ns - start_ns) / 1e9;
  result->rate = n_jobs / result->seconds;
  result->peak_rss_kib = peak_rss_kib ();
}

/* ------------------------------------------------------------------------ */
/* The plain-GLib baselines                                                  */

/* Counts ended jobs; the submitter waits for the last one. */
typedef struct
{
  GMutex lock;
  GCond  cond;
  gint   remaining;
} Completion;

static void
completion_init (Completion *completion,
                 guint       n_jobs)
{
  g_mutex_init (&completion->lock);
  g_cond_init (&completion->cond);
  completion->remaining = (gint) n_jobs;
}

static void
completion_clear (Completion *completion)
{
  g_mutex_clear (&completion->lock);
  g_cond_clear (&completion->cond);
}

static inline void
completion_done (Completion *completion)
{
  if (g_atomic_int_dec_and_test (&completion->remaining))
    {
      g_mutex_lock (&completion->lock);
      g_cond_broadcast (&completion->cond);
      g_mutex_unlock (&completion->lock);
    }
}

static void
completion_wait (Completion *completion)
{
  g_mutex_lock (&completion->lock);
  while (g_atomic_int_get (&completion->remaining) > 0)
    g_cond_wait (&completion->cond, &completion->lock);
  g_mutex_unlock (&completion->lock);
}

/* The plain-GLib actor: a GAsyncQueue mailbox per key, pushed to a
 * GThreadPool each time it goes from empty to non-empty. */
typedef struct _GlibActors GlibActors;

typedef struct
{
  GAsyncQueue *queue;
  gboolean     scheduled;   /* protected by the queue's lock */
  GlibActors  *actors;
} GlibMailbox;

typedef void (*GlibJobFunc) (guint index, gpointer user_data);

struct _GlibActors
{
  GMutex        lock;        /* protects table */
  GHashTable   *table;       /* key → GlibMailbox */
  GThreadPool  *pool;
  GlibJobFunc   func;
  gpointer      user_data;
  Completion    completion;
};

static void
glib_mailbox_free (gpointer data)
{
  GlibMailbox *mailbox = data;

  g_async_queue_unref (mailbox->queue);
  g_free (mailbox);
}

static void
glib_actor_run (gpointer data,
                gpointer user_data)
{
  GlibMailbox *mailbox = data;
  GlibActors *actors = mailbox->actors;

  for (;;)
    {
      gpointer item;

      g_async_queue_lock (mailbox->queue);
      item = g_async_queue_try_pop_unlocked (mailbox->queue);
      if (item == NULL)
        {
          mailbox->scheduled = FALSE;
          g_async_queue_unlock (mailbox->queue);
          return;
        }
      g_async_queue_unlock (mailbox->queue);

      actors->func (GPOINTER_TO_UINT (item) - 1, actors->user_data);
      completion_done (&actors->completion);
    }
}

static void
glib_actors_init (GlibActors  *actors,
                  guint        n_workers,
                  guint        n_jobs,
                  GlibJobFunc  func,
                  gpointer     user_data)
{
  g_mutex_init (&actors->lock);
  actors->table = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, glib_mailbox_free);
  actors->pool = g_thread_pool_new (glib_actor_run, actors, (gint) n_workers, TRUE, NULL);
  actors->func = func;
  actors->user_data = user_data;
  completion_init (&actors->completion, n_jobs);
}

static void
glib_actors_submit (GlibActors *actors,
                    const char *key,
                    guint       index)
{
  GlibMailbox *mailbox;
  gboolean schedule;

  g_mutex_lock (&actors->lock);
  mailbox = g_hash_table_lookup (actors->table, key);
  if (mailbox == NULL)
    {
      mailbox = g_new0 (GlibMailbox, 1);
      mailbox->queue = g_async_queue_new ();
      mailbox->actors = actors;
      g_hash_table_insert (actors->table, g_strdup (key), mailbox);
    }
  g_mutex_unlock (&actors->lock);

  g_async_queue_lock (mailbox->queue);
  g_async_queue_push_unlocked (mailbox->queue, GUINT_TO_POINTER (index + 1));
  schedule = !mailbox->scheduled;
  mailbox->scheduled = TRUE;
  g_async_queue_unlock (mailbox->queue);

  if (schedule)
    g_thread_pool_push (actors->pool, mailbox, NULL);
}

static void
glib_actors_clear (GlibActors *actors)
{
  g_thread_pool_free (actors->pool, FALSE, TRUE);
  g_hash_table_unref (actors->table);
  g_mutex_clear (&actors->lock);
  completion_clear (&actors->completion);
}

/* ------------------------------------------------------------------------ */
/* W1: unkeyed fan-out                                                       */

#define W1_JOBS 1000000

typedef struct
{
  guint8     *slots;
  Completion  completion;
} W1;

static gboolean
w1_handler (KdJob    *job,
            gpointer  user_data,
            GError  **error)
{
  W1 *w1 = user_data;

  w1->slots[GPOINTER_TO_UINT (kd_job_get_item (job))]++;
  return TRUE;
}

static void
w1_pool_func (gpointer data,
              gpointer user_data)
{
  W1 *w1 = user_data;

  w1->slots[GPOINTER_TO_UINT (data) - 1]++;
  completion_done (&w1->completion);
}

static gboolean
w1_check (W1        *w1,
          guint      n_jobs,
          RunResult *result)
{
  guint bad = 0;
  guint i;

  for (i = 0; i < n_jobs; i++)
    bad += w1->slots[i] != 1;
  g_snprintf (result->check, sizeof result->check, "%u of %u slots != 1", bad, n_jobs);
  return bad == 0;
}

static gboolean
w1_run_kd (Bench     *bench,
           RunResult *result)
{
  guint n_jobs = bench->n_jobs ? bench->n_jobs : W1_JOBS;
  W1 w1 = { g_new0 (guint8, n_jobs) };
  KdDispatcher *dispatcher;
  gint64 start;
  guint i;

  dispatcher = kd_dispatcher_new (bench->n_workers ? bench->n_workers : 4, w1_handler, &w1, NULL);
  kd_dispatcher_set_fanout (dispatcher, 2);
  kd_dispatcher_set_capacity (dispatcher, bench->capacity ? bench->capacity : 1024);
  start_workers (dispatcher);
  reset_peak_rss ();

  start = now_ns ();
  for (i = 0; i < n_jobs; i++)
    kd_dispatcher_submit (dispatcher, NULL, GUINT_TO_POINTER (i), NULL);
  kd_dispatcher_wait (dispatcher);
  finish_run (result, start, now_ns (), n_jobs);

  g_object_unref (dispatcher);
  result->ok = w1_check (&w1, n_jobs, result);
  g_free (w1.slots);
  return result->ok;
}

static gboolean
w1_run_glib (Bench     *bench,
             RunResult *result)
{
  guint n_jobs = bench->n_jobs ? bench->n_jobs : W1_JOBS;
  W1 w1 = { g_new0 (guint8, n_jobs) };
  GThreadPool *pool;
  gint64 start;
  guint i;

  completion_init (&w1.completion, n_jobs);
  pool = g_thread_pool_new (w1_pool_func, &w1, bench->n_workers ? (gint) bench->n_workers : 4,
                            TRUE, NULL);
  reset_peak_rss ();

  start = now_ns ();
  for (i = 0; i < n_jobs; i++)
    g_thread_pool_push (pool, GUINT_TO_POINTER (i + 1), NULL);
  completion_wait (&w1.completion);
  finish_run (result, start, now_ns (), n_jobs);

  g_thread_pool_free (pool, FALSE, TRUE);
  completion_clear (&w1.completion);
  result->ok = w1_check (&w1, n_jobs, result);
  g_free (w1.slots);
  return result->ok;
}

/* W5: W1's jobs submitted W5_BATCH at a time. The item array is filled
 * inside the timing: it is the producer's part of the work. */
#define W5_BATCH 64

static gboolean
w5_run_kd (Bench     *bench,
           RunResult *result)
{
  guint n_jobs = bench->n_jobs ? bench->n_jobs : W1_JOBS;
  W1 w1 = { g_new0 (guint8, n_jobs) };
  gpointer items[W5_BATCH];
  KdDispatcher *dispatcher;
  gint64 start;
  guint i, j, n;

  dispatcher = kd_dispatcher_new (bench->n_workers ? bench->n_workers : 4, w1_handler, &w1, NULL);
  kd_dispatcher_set_fanout (dispatcher, 2);
  kd_dispatcher_set_capacity (dispatcher, bench->capacity ? bench->capacity : 1024);
  start_workers (dispatcher);
  reset_peak_rss ();

  start = now_ns ();
  for (i = 0; i < n_jobs; i += n)
    {
      n = MIN (W5_BATCH, n_jobs - i);
      for (j = 0; j < n; j++)
        items[j] = GUINT_TO_POINTER (i + j);
      kd_dispatcher_submit_many (dispatcher, NULL, items, n, NULL);
    }
  kd_dispatcher_wait (dispatcher);
  finish_run (result, start, now_ns (), n_jobs);

  g_object_unref (dispatcher);
  result->ok = w1_check (&w1, n_jobs, result);
  g_free (w1.slots);
  return result->ok;
}

/* ------------------------------------------------------------------------ */
/* W2 and W3: keyed                                                          */

typedef struct
{
  guint       n_keys;
  guint       n_jobs;
  char      **keys;
  gboolean    own_keys;    /* H1's: a g_strfreev() vector, not format_keys()'s */
  gint64      idle_us;     /* H1i: keep key states idle this long */
  guint       batch;       /* W5k: items per submit_many(); 0: one submit each */
  PaddedLast *last;
  gint        violations;
} Keyed;

static inline void
keyed_job (Keyed *keyed,
           guint  i)
{
  guint key = i % keyed->n_keys;
  gint64 seq = i / keyed->n_keys;

  if (keyed->last[key].value != seq - 1)
    g_atomic_int_inc (&keyed->violations);
  keyed->last[key].value = seq;
}

static gboolean
keyed_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  keyed_job (user_data, GPOINTER_TO_UINT (kd_job_get_item (job)));
  return TRUE;
}

static void
keyed_glib_func (guint    index,
                 gpointer user_data)
{
  keyed_job (user_data, index);
}

static void
keyed_init (Keyed *keyed,
            guint  n_keys,
            guint  n_jobs)
{
  guint i;

  keyed->n_keys = n_keys;
  keyed->n_jobs = n_jobs;
  keyed->keys = format_keys (n_keys);
  keyed->own_keys = FALSE;
  keyed->idle_us = 0;
  keyed->batch = 0;
  keyed->last = g_new (PaddedLast, n_keys);
  for (i = 0; i < n_keys; i++)
    keyed->last[i].value = -1;
  keyed->violations = 0;
}

static gboolean
keyed_check (Keyed     *keyed,
             RunResult *result)
{
  gint64 expected = keyed->n_jobs / keyed->n_keys - 1;
  guint wrong = 0;
  guint i;

  for (i = 0; i < keyed->n_keys; i++)
    wrong += keyed->last[i].value != expected;
  g_snprintf (result->check, sizeof result->check,
              "%d violations, %u keys with last != %" G_GINT64_FORMAT,
              keyed->violations, wrong, expected);
  return keyed->violations == 0 && wrong == 0;
}

static void
keyed_clear (Keyed *keyed)
{
  if (keyed->own_keys)
    g_strfreev (keyed->keys);
  else
    free_keys (keyed->keys);
  g_free (keyed->last);
}

/* H1i's key state: nothing, but a state all the same, kept while idle. */
static gpointer
h1_state_new (const char *key,
              gpointer    user_data)
{
  return GUINT_TO_POINTER (1);
}

static void
h1_state_free (gpointer state)
{
}

/* Runs @keyed (initialized) through a dispatcher. */
static gboolean
keyed_run_kd_with (Bench     *bench,
                   RunResult *result,
                   Keyed     *keyed)
{
  guint n_keys = keyed->n_keys, n_jobs = keyed->n_jobs;
  const char *keys[W5_BATCH];
  gpointer items[W5_BATCH];
  KdDispatcher *dispatcher;
  KdStats stats;
  gint64 start;
  guint i, j, n;

  dispatcher = kd_dispatcher_new (bench->n_workers ? bench->n_workers : 4, keyed_handler,
                                  keyed, NULL);
  if (bench->capacity)
    kd_dispatcher_set_capacity (dispatcher, bench->capacity);
  if (keyed->idle_us > 0)
    {
      kd_dispatcher_set_key_state_funcs (dispatcher, h1_state_new, h1_state_free, NULL, NULL);
      kd_dispatcher_set_key_idle_time (dispatcher, keyed->idle_us);
    }
  start_workers (dispatcher);
  reset_peak_rss ();

  start = now_ns ();
  if (keyed->batch == 0)
    for (i = 0; i < n_jobs; i++)
      kd_dispatcher_submit (dispatcher, keyed->keys[i % n_keys], GUINT_TO_POINTER (i), NULL);
  else
    for (i = 0; i < n_jobs; i += n)
      {
        n = MIN (keyed->batch, n_jobs - i);
        for (j = 0; j < n; j++)
          {
            keys[j] = keyed->keys[(i + j) % n_keys];
            items[j] = GUINT_TO_POINTER (i + j);
          }
        kd_dispatcher_submit_many (dispatcher, keys, items, n, NULL);
      }
  kd_dispatcher_wait (dispatcher);
  finish_run (result, start, now_ns (), n_jobs);

  kd_dispatcher_get_stats (dispatcher, &stats);
  result->live_keys = stats.live_keys;
  g_object_unref (dispatcher);

  result->ok = keyed_check (keyed, result);
  if (stats.live_keys != 0)
    {
      result->ok = FALSE;
      g_strlcat (result->check, ", live keys after wait != 0", sizeof result->check);
    }
  keyed_clear (keyed);
  return result->ok;
}

static gboolean
keyed_run_kd (Bench     *bench,
              RunResult *result,
              guint      n_keys,
              guint      n_jobs)
{
  Keyed keyed;

  keyed_init (&keyed, n_keys, n_jobs);
  return keyed_run_kd_with (bench, result, &keyed);
}

static gboolean
keyed_run_glib (Bench     *bench,
                RunResult *result,
                guint      n_keys,
                guint      n_jobs)
{
  Keyed keyed;
  GlibActors actors;
  gint64 start;
  guint i;

  keyed_init (&keyed, n_keys, n_jobs);
  glib_actors_init (&actors, bench->n_workers ? bench->n_workers : 4, n_jobs,
                    keyed_glib_func, &keyed);
  reset_peak_rss ();

  start = now_ns ();
  for (i = 0; i < n_jobs; i++)
    glib_actors_submit (&actors, keyed.keys[i % n_keys], i);
  completion_wait (&actors.completion);
  finish_run (result, start, now_ns (), n_jobs);

  glib_actors_clear (&actors);
  result->ok = keyed_check (&keyed, result);
  keyed_clear (&keyed);
  return result->ok;
}

#define W2_KEYS 1000
#define W2_JOBS 1000000
#define W3_KEYS 100000
#define W3_ROUNDS 10

static gboolean
w2_run_kd (Bench     *bench,
           RunResult *result)
{
  return keyed_run_kd (bench, result, W2_KEYS, bench->n_jobs ? bench->n_jobs : W2_JOBS);
}

static gboolean
w5k_run_kd (Bench     *bench,
            RunResult *result)
{
  Keyed keyed;

  keyed_init (&keyed, W2_KEYS, bench->n_jobs ? bench->n_jobs : W2_JOBS);
  keyed.batch = W5_BATCH;
  return keyed_run_kd_with (bench, result, &keyed);
}

static gboolean
w2_run_glib (Bench     *bench,
             RunResult *result)
{
  return keyed_run_glib (bench, result, W2_KEYS, bench->n_jobs ? bench->n_jobs : W2_JOBS);
}

static guint
w3_keys (Bench *bench)
{
  return bench->n_jobs ? MAX (1, bench->n_jobs / W3_ROUNDS) : W3_KEYS;
}

static gboolean
w3_run_kd (Bench     *bench,
           RunResult *result)
{
  return keyed_run_kd (bench, result, w3_keys (bench), w3_keys (bench) * W3_ROUNDS);
}

static gboolean
w3_run_glib (Bench     *bench,
             RunResult *result)
{
  return keyed_run_glib (bench, result, w3_keys (bench), w3_keys (bench) * W3_ROUNDS);
}

/* ------------------------------------------------------------------------ */
/* H1: hostile keys                                                          */

#define H1_KEYS 20000
#define H1_ROUNDS 10
#define H1_PREFIX "client-"
#define H1_IDLE_US (30 * G_TIME_SPAN_SECOND)

static guint
h1_keys (Bench *bench)
{
  return bench->n_jobs ? MAX (1, bench->n_jobs / H1_ROUNDS) : H1_KEYS;
}

/* W3's shape over @keys (taken). */
static gboolean
h1_run (Bench     *bench,
        RunResult *result,
        char     **keys,
        gint64     idle_us)
{
  guint n_keys = g_strv_length (keys);
  Keyed keyed;

  keyed_init (&keyed, n_keys, n_keys * H1_ROUNDS);
  free_keys (keyed.keys);
  keyed.keys = keys;
  keyed.own_keys = TRUE;
  keyed.idle_us = idle_us;
  return keyed_run_kd_with (bench, result, &keyed);
}

/* The colliding keys, and random ones of the same length: made before the
 * clock starts, as W3's are. */
static char **
h1_colliding (Bench *bench)
{
  return kd_collide_keys (H1_PREFIX, h1_keys (bench));
}

static char **
h1_random (Bench *bench)
{
  guint n = h1_keys (bench);

  return kd_collide_random_keys (H1_PREFIX, n, kd_collide_key_length (H1_PREFIX, n), 42);
}

static gboolean
h1_run_colliding (Bench     *bench,
                  RunResult *result)
{
  return h1_run (bench, result, h1_colliding (bench), 0);
}

static gboolean
h1_run_random (Bench     *bench,
               RunResult *result)
{
  return h1_run (bench, result, h1_random (bench), 0);
}

static gboolean
h1i_run_colliding (Bench     *bench,
                   RunResult *result)
{
  return h1_run (bench, result, h1_colliding (bench), H1_IDLE_US);
}

static gboolean
h1i_run_random (Bench     *bench,
                RunResult *result)
{
  return h1_run (bench, result, h1_random (bench), H1_IDLE_US);
}

/* ------------------------------------------------------------------------ */
/* W4: CPU-bound                                                             */

#define W4_JOBS 20000
#define W4_ROUNDS 34700
#define W4_XOR G_GUINT64_CONSTANT (0x74be789cf6d47e06)

typedef struct
{
  guint64    *res;
  guint       n_jobs;
  Completion  completion;
} W4;

static G_GNUC_NO_INLINE guint64
w4_job (guint i)
{
  guint64 x = ((guint64) i + 1) * G_GUINT64_CONSTANT (0x9E3779B97F4A7C15);
  guint r;

  for (r = 0; r < W4_ROUNDS; r++)
    {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
    }
  return x;
}

static gboolean
w4_handler (KdJob    *job,
            gpointer  user_data,
            GError  **error)
{
  W4 *w4 = user_data;
  guint i = GPOINTER_TO_UINT (kd_job_get_item (job));

  w4->res[i] = w4_job (i);
  return TRUE;
}

static void
w4_pool_func (gpointer data,
              gpointer user_data)
{
  W4 *w4 = user_data;
  guint i = GPOINTER_TO_UINT (data) - 1;

  w4->res[i] = w4_job (i);
  completion_done (&w4->completion);
}

/* The serial time of the same jobs, halved: the ideal time on 2 workers.
 * Measured in every repetition, since the machine's speed drifts. */
static double
w4_ideal_seconds (guint n_jobs)
{
  volatile guint64 sink = 0;
  gint64 start = now_ns ();
  guint i;

  for (i = 0; i < n_jobs; i++)
    sink ^= w4_job (i);
  (void) sink;

  return (double) (now_ns () - start) / 1e9 / 2;
}

static gboolean
w4_check (W4        *w4,
          RunResult *result)
{
  guint64 x = 0;
  guint i;
  gboolean full = w4->n_jobs == W4_JOBS;

  for (i = 0; i < w4->n_jobs; i++)
    x ^= w4->res[i];
  result->ideal_seconds = w4_ideal_seconds (w4->n_jobs);
  result->efficiency = result->ideal_seconds / result->seconds;

  /* The reference xor is for the full 20,000 jobs; a smaller run checks
   * against the serial results instead. */
  if (!full)
    {
      guint64 expected = 0;

      for (i = 0; i < w4->n_jobs; i++)
        expected ^= w4_job (i);
      g_snprintf (result->check, sizeof result->check, "xor %016" G_GINT64_MODIFIER "x, serial %016"
                  G_GINT64_MODIFIER "x", x, expected);
      return x == expected;
    }

  g_snprintf (result->check, sizeof result->check, "xor %016" G_GINT64_MODIFIER "x, expected %016"
              G_GINT64_MODIFIER "x", x, W4_XOR);
  return x == W4_XOR;
}

static gboolean
w4_run_kd (Bench     *bench,
           RunResult *result)
{
  W4 w4 = { 0 };
  KdDispatcher *dispatcher;
  gint64 start;
  guint i;

  w4.n_jobs = bench->n_jobs ? MIN (bench->n_jobs, W4_JOBS) : W4_JOBS;
  w4.res = g_new0 (guint64, w4.n_jobs);
  dispatcher = kd_dispatcher_new (bench->n_workers ? bench->n_workers : 2, w4_handler, &w4, NULL);
  if (bench->capacity)
    kd_dispatcher_set_capacity (dispatcher, bench->capacity);
  start_workers (dispatcher);
  reset_peak_rss ();

  start = now_ns ();
  for (i = 0; i < w4.n_jobs; i++)
    kd_dispatcher_submit (dispatcher, NULL, GUINT_TO_POINTER (i), NULL);
  kd_dispatcher_wait (dispatcher);
  finish_run (result, start, now_ns (), w4.n_jobs);

  g_object_unref (dispatcher);
  result->ok = w4_check (&w4, result);
  g_free (w4.res);
  return result->ok;
}

static gboolean
w4_run_glib (Bench     *bench,
             RunResult *result)
{
  W4 w4 = { 0 };
  GThreadPool *pool;
  gint64 start;
  guint i;

  w4.n_jobs = bench->n_jobs ? MIN (bench->n_jobs, W4_JOBS) : W4_JOBS;
  w4.res = g_new0 (guint64, w4.n_jobs);
  completion_init (&w4.completion, w4.n_jobs);
  pool = g_thread_pool_new (w4_pool_func, &w4, bench->n_workers ? (gint) bench->n_workers : 2,
                            TRUE, NULL);
  reset_peak_rss ();

  start = now_ns ();
  for (i = 0; i < w4.n_jobs; i++)
    g_thread_pool_push (pool, GUINT_TO_POINTER (i + 1), NULL);
  completion_wait (&w4.completion);
  finish_run (result, start, now_ns (), w4.n_jobs);

  g_thread_pool_free (pool, FALSE, TRUE);
  completion_clear (&w4.completion);
  result->ok = w4_check (&w4, result);
  g_free (w4.res);
  return result->ok;
}

/* ------------------------------------------------------------------------ */
/* L1: latency at 50 % load                                                  */

#define L1_JOBS 200000
#define L1_KEYS 1000
#define L1_STALL_NS 200000  /* see L1_PACE */

typedef struct
{
  Keyed   keyed;
  gint64 *submit_ns;
  gint64 *start_ns;
  gint64 *done_ns;
  /* The schedule (job i is due at pace_start + i * interval_ns), and the
   * producer's wake-ups that came more than L1_STALL_NS late */
  gint64  pace_start;
  double  interval_ns;
  guint   stalls;
  gint64  stalled_ns;
  gint64  run_delay_ns;
} L1;

/* When job @i is due, by the schedule */
static inline gint64
l1_due_ns (const L1 *l1,
           guint     i)
{
  return l1->pace_start + (gint64) (i * l1->interval_ns);
}

static gboolean
l1_handler (KdJob    *job,
            gpointer  user_data,
            GError  **error)
{
  L1 *l1 = user_data;
  guint i = GPOINTER_TO_UINT (kd_job_get_item (job));

  l1->start_ns[i] = now_ns ();
  keyed_job (&l1->keyed, i);
  return TRUE;
}

static void
l1_done (KdJob        *job,
         const GError *error,
         gpointer      user_data)
{
  L1 *l1 = user_data;

  l1->done_ns[GPOINTER_TO_UINT (kd_job_get_item (job))] = now_ns ();
}

static void
l1_glib_func (guint    index,
              gpointer user_data)
{
  L1 *l1 = user_data;

  l1->start_ns[index] = now_ns ();
  keyed_job (&l1->keyed, index);
  l1->done_ns[index] = now_ns ();
}

static void
l1_init (L1    *l1,
         guint  n_jobs)
{
  guint i;

  keyed_init (&l1->keyed, L1_KEYS, n_jobs);
  l1->submit_ns = g_new (gint64, n_jobs);
  l1->start_ns = g_new (gint64, n_jobs);
  l1->done_ns = g_new (gint64, n_jobs);
  /* Written here, so that no page of them faults in while the clock runs */
  for (i = 0; i < n_jobs; i++)
    l1->submit_ns[i] = l1->start_ns[i] = l1->done_ns[i] = -1;
}

static int
compare_gint64 (gconstpointer a,
                gconstpointer b)
{
  gint64 x = *(const gint64 *) a;
  gint64 y = *(const gint64 *) b;

  return (x > y) - (x < y);
}

static void
percentiles (gint64 *samples,
             guint   n,
             double *p50,
             double *p99,
             double *p999,
             double *max)
{
  qsort (samples, n, sizeof (gint64), compare_gint64);
  *p50 = samples[(gsize) (n * 0.50)] / 1e3;
  *p99 = samples[MIN (n - 1, (gsize) (n * 0.99))] / 1e3;
  *p999 = samples[MIN (n - 1, (gsize) (n * 0.999))] / 1e3;
  *max = samples[n - 1] / 1e3;
}

static gboolean
l1_finish (L1        *l1,
           RunResult *result)
{
  guint n = l1->keyed.n_jobs;
  gint64 *delay = g_new (gint64, n);
  guint i;

  result->ok = keyed_check (&l1->keyed, result);

  for (i = 0; i < n; i++)
    delay[i] = l1->start_ns[i] - l1->submit_ns[i];
  percentiles (delay, n, &result->start_p50, &result->start_p99, &result->start_p999,
               &result->start_max);
  for (i = 0; i < n; i++)
    delay[i] = l1->done_ns[i] - l1->submit_ns[i];
  percentiles (delay, n, &result->done_p50, &result->done_p99, &result->done_p999,
               &result->done_max);

  /* The jobs whose submit began within L1_STALL_NS of their due time */
  {
    guint on_time = 0;
    double ignored;

    for (i = 0; i < n; i++)
      if (l1->submit_ns[i] - l1_due_ns (l1, i) <= L1_STALL_NS)
        delay[on_time++] = l1->start_ns[i] - l1->submit_ns[i];
    result->late_share = (double) (n - on_time) / n;
    result->on_time_p99 = 0;
    if (on_time > 0)
      percentiles (delay, on_time, &ignored, &result->on_time_p99, &ignored, &ignored);
    result->stalls = l1->stalls;
    result->stalled_ms = l1->stalled_ns / 1e6;
    result->run_delay_ms = l1->run_delay_ns / 1e6;
  }

  g_free (delay);
  g_free (l1->submit_ns);
  g_free (l1->start_ns);
  g_free (l1->done_ns);
  keyed_clear (&l1->keyed);
  return result->ok;
}

/* How long the calling thread has waited, runnable, for a processor: the
 * kernel's schedstat run_delay (0 where there is none). */
static gint64
thread_run_delay_ns (void)
{
  char *text = NULL;
  gint64 delay = 0;

  if (g_file_get_contents ("/proc/thread-self/schedstat", &text, NULL, NULL))
    {
      char **fields = g_strsplit (g_strstrip (text), " ", -1);

      if (g_strv_length (fields) >= 2)
        delay = g_ascii_strtoll (fields[1], NULL, 10);
      g_strfreev (fields);
    }
  g_free (text);
  return delay;
}

/* Submits job i at start + i / rate. The producer sleeps until each
 * L1_TICK_NS tick and then submits the jobs that are due, so pacing does
 * not take a processor away from the workers; each job's submit time is
 * the moment its submit call began.
 *
 * A producer behind its schedule does not sleep. One that sleeps and wakes
 * more than L1_STALL_NS after its tick was held off, by the guest kernel
 * (the workers held the processors: its schedstat run_delay counts that)
 * or by the host (on a shared VM, its virtual processor did not run); it
 * then submits the jobs it owes at once, a burst the workers queue behind.
 * Such wake-ups are counted, and the start latency is also reported for
 * the jobs submitted within L1_STALL_NS of their due time, so that a run's
 * tail can be told apart from the machine's. (A job is also late when the
 * producer is held back by the admission bound: the offered load is more
 * than the run can take.) */
#define L1_TICK_NS 50000

#define L1_PACE(l1, n_jobs, rate, submit_one)                                  \
  G_STMT_START {                                                               \
    gint64 tick = now_ns ();                                                   \
    guint i = 0;                                                               \
    (l1)->pace_start = tick;                                                   \
    (l1)->interval_ns = 1e9 / (rate);                                          \
    (l1)->stalls = 0;                                                          \
    (l1)->stalled_ns = 0;                                                      \
    (l1)->run_delay_ns = thread_run_delay_ns ();                               \
    while (i < (n_jobs))                                                       \
      {                                                                        \
        struct timespec until;                                                 \
        gint64 late;                                                           \
        tick += L1_TICK_NS;                                                    \
        until.tv_sec = tick / 1000000000;                                      \
        until.tv_nsec = tick % 1000000000;                                     \
        if (tick > now_ns ())                                                  \
          {                                                                    \
            clock_nanosleep (CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL);    \
            late = now_ns () - tick;                                           \
            if (late > L1_STALL_NS)                                            \
              {                                                                \
                (l1)->stalls++;                                                \
                (l1)->stalled_ns += late;                                      \
              }                                                                \
          }                                                                    \
        for (; i < (n_jobs) && l1_due_ns ((l1), i) <= now_ns (); i++)          \
          {                                                                    \
            (l1)->submit_ns[i] = now_ns ();                                    \
            submit_one;                                                        \
          }                                                                    \
      }                                                                        \
    (l1)->run_delay_ns = thread_run_delay_ns () - (l1)->run_delay_ns;          \
  } G_STMT_END

static double
l1_rate (Bench  *bench,
         double  measured)
{
  if (bench->l1_rate > 0)
    return bench->l1_rate;
  return measured / 2;
}

static gboolean
l1_run_kd (Bench     *bench,
           RunResult *result)
{
  guint n_jobs = bench->n_jobs ? bench->n_jobs : L1_JOBS;
  double rate = l1_rate (bench, bench->w2_kd_rate);
  KdDispatcher *dispatcher;
  L1 l1;
  gint64 start;

  l1_init (&l1, n_jobs);
  dispatcher = kd_dispatcher_new (bench->n_workers ? bench->n_workers : 4, l1_handler, &l1, NULL);
  kd_dispatcher_set_done_func (dispatcher, l1_done, &l1, NULL);
  if (bench->capacity)
    kd_dispatcher_set_capacity (dispatcher, bench->capacity);
  start_workers (dispatcher);
  reset_peak_rss ();

  start = now_ns ();
  L1_PACE (&l1, n_jobs, rate,
           kd_dispatcher_submit (dispatcher, l1.keyed.keys[i % L1_KEYS], GUINT_TO_POINTER (i), NULL));
  kd_dispatcher_wait (dispatcher);
  finish_run (result, start, now_ns (), n_jobs);
  result->offered_rate = rate;

  g_object_unref (dispatcher);
  return l1_finish (&l1, result);
}

static gboolean
l1_run_glib (Bench     *bench,
             RunResult *result)
{
  guint n_jobs = bench->n_jobs ? bench->n_jobs : L1_JOBS;
  double rate = l1_rate (bench, bench->w2_glib_rate);
  GlibActors actors;
  L1 l1;
  gint64 start;

  l1_init (&l1, n_jobs);
  glib_actors_init (&actors, bench->n_workers ? bench->n_workers : 4, n_jobs, l1_glib_func, &l1);
  reset_peak_rss ();

  start = now_ns ();
  L1_PACE (&l1, n_jobs, rate, glib_actors_submit (&actors, l1.keyed.keys[i % L1_KEYS], i));
  completion_wait (&actors.completion);
  finish_run (result, start, now_ns (), n_jobs);
  result->offered_rate = rate;

  glib_actors_clear (&actors);
  return l1_finish (&l1, result);
}

/* ------------------------------------------------------------------------ */
/* P1: a pipeline                                                            */

#define P1_JOBS 1000000
#define P1_KEYS 1000

typedef struct
{
  Keyed       keyed;        /* the aggregate stage's per-key check */
  PaddedLast *at_sink;      /* the sink's per-key check */
  gint        sink_violations;
  gint        reached;
  guint       rounds;       /* the parse step's work */
} P1;

#define P1_ROUNDS 16

static G_GNUC_NO_INLINE guint64
p1_parse (guint i,
          guint rounds)
{
  /* A little work per item, as parsing a short record would be: 16
   * rounds take about 10 ns here. */
  guint64 x = (guint64) i * G_GUINT64_CONSTANT (0x9E3779B97F4A7C15);
  guint r;

  for (r = 0; r < rounds; r++)
    x ^= (x << 13) ^ (x >> 7);
  return x;
}

static volatile guint64 p1_sink_hole;

static gboolean
p1_parse_handler (KdJob    *job,
                  gpointer  user_data,
                  GError  **error)
{
  P1 *p1 = user_data;

  p1_sink_hole = p1_parse (GPOINTER_TO_UINT (kd_job_get_item (job)), p1->rounds);
  return kd_job_emit (job, kd_job_get_key (job), kd_job_get_item (job), error);
}

static gboolean
p1_aggregate_handler (KdJob    *job,
                      gpointer  user_data,
                      GError  **error)
{
  P1 *p1 = user_data;

  keyed_job (&p1->keyed, GPOINTER_TO_UINT (kd_job_get_item (job)));
  return kd_job_emit (job, kd_job_get_key (job), kd_job_get_item (job), error);
}

static gboolean
p1_format_handler (KdJob    *job,
                   gpointer  user_data,
                   GError  **error)
{
  return kd_job_emit (job, kd_job_get_key (job), kd_job_get_item (job), error);
}

static inline void
p1_sink_check (P1    *p1,
               guint  i)
{
  guint key = i % P1_KEYS;
  gint64 seq = i / P1_KEYS;

  if (p1->at_sink[key].value != seq - 1)
    g_atomic_int_inc (&p1->sink_violations);
  p1->at_sink[key].value = seq;
  g_atomic_int_inc (&p1->reached);
}

static void
p1_sink (const char *key,
         gpointer    item,
         gpointer    user_data)
{
  p1_sink_check (user_data, GPOINTER_TO_UINT (item));
}

static void
p1_init (P1    *p1,
         Bench *bench,
         guint  n_jobs)
{
  guint i;

  memset (p1, 0, sizeof *p1);
  p1->rounds = bench->p1_rounds ? bench->p1_rounds : P1_ROUNDS;
  keyed_init (&p1->keyed, P1_KEYS, n_jobs);
  p1->at_sink = g_new (PaddedLast, P1_KEYS);
  for (i = 0; i < P1_KEYS; i++)
    p1->at_sink[i].value = -1;
}

static gboolean
p1_finish (P1        *p1,
           RunResult *result)
{
  gboolean ok = keyed_check (&p1->keyed, result);
  char more[80];

  g_snprintf (more, sizeof more, "; at the sink %d of %u, %d out of order",
              p1->reached, p1->keyed.n_jobs, p1->sink_violations);
  g_strlcat (result->check, more, sizeof result->check);
  ok = ok && p1->sink_violations == 0 && (guint) p1->reached == p1->keyed.n_jobs;

  keyed_clear (&p1->keyed);
  g_free (p1->at_sink);
  return result->ok = ok;
}

static gboolean
p1_run_kd (Bench     *bench,
           RunResult *result)
{
  guint n_jobs = bench->n_jobs ? bench->n_jobs : P1_JOBS;
  guint workers = bench->n_workers ? bench->n_workers : 2;
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *parse, *aggregate, *format;
  gint64 start;
  P1 p1;
  guint i;

  p1_init (&p1, bench, n_jobs);
  parse = kd_pipeline_add_stage (pipeline, "parse", workers, p1_parse_handler, &p1, NULL);
  kd_pipeline_set_stage_mode (pipeline, parse, KD_STAGE_ORDERED);
  aggregate = kd_pipeline_add_stage (pipeline, "aggregate", workers, p1_aggregate_handler, &p1, NULL);
  format = kd_pipeline_add_stage (pipeline, "sink", workers, p1_format_handler, &p1, NULL);
  kd_pipeline_set_stage_mode (pipeline, format, KD_STAGE_ORDERED);
  kd_pipeline_set_sink (pipeline, p1_sink, &p1, NULL);
  if (bench->capacity)
    {
      kd_dispatcher_set_capacity (parse, bench->capacity);
      kd_dispatcher_set_capacity (aggregate, bench->capacity);
      kd_dispatcher_set_capacity (format, bench->capacity);
    }
  start_workers (parse);
  start_workers (aggregate);
  start_workers (format);
  reset_peak_rss ();

  start = now_ns ();
  for (i = 0; i < n_jobs; i++)
    kd_pipeline_submit (pipeline, p1.keyed.keys[i % P1_KEYS], GUINT_TO_POINTER (i), NULL);
  kd_pipeline_wait (pipeline);
  finish_run (result, start, now_ns (), n_jobs);

  g_object_unref (pipeline);
  return p1_finish (&p1, result);
}

/* The baseline: the same three steps, one item after another, on one
 * thread. */
static gboolean
p1_run_serial (Bench     *bench,
               RunResult *result)
{
  guint n_jobs = bench->n_jobs ? bench->n_jobs : P1_JOBS;
  gint64 start;
  P1 p1;
  guint i;

  p1_init (&p1, bench, n_jobs);
  reset_peak_rss ();

  start = now_ns ();
  for (i = 0; i < n_jobs; i++)
    {
      p1_sink_hole = p1_parse (i, p1.rounds);
      keyed_job (&p1.keyed, i);
      p1_sink_check (&p1, i);
    }
  finish_run (result, start, now_ns (), n_jobs);

  return p1_finish (&p1, result);
}

/* ------------------------------------------------------------------------ */
/* The Go anchor                                                             */

/* The value of " @name=" in kd-bench-go's result line, or NULL. */
static const char *
go_field (const char *line,
          const char *name)
{
  g_autofree char *needle = g_strdup_printf (" %s=", name);
  const char *field = strstr (line, needle);

  return field != NULL ? field + strlen (needle) : NULL;
}

/* Runs @id once in kd-bench-go, with kd-bench's sizes, and reads its line:
 *
 *   W1 seconds=0.030623 jobs=1000000 ok=1 check="0 of 1000000 slots != 1" peak_rss_kib=2872 ...
 *
 * The program times itself, so starting the process is not in the figure. */
static gboolean
go_run (Bench      *bench,
        const char *id,
        RunResult  *result)
{
  g_autoptr (GPtrArray) argv = g_ptr_array_new_with_free_func (g_free);
  g_autofree char *output = NULL;
  g_auto (GStrv) lines = NULL;
  g_autofree char *prefix = g_strconcat (id, " ", NULL);
  g_autoptr (GError) error = NULL;
  const char *line = NULL;
  const char *seconds, *jobs, *ok, *check, *rss;
  gint status = 0;

  g_ptr_array_add (argv, g_strdup (bench->go_program));
  g_ptr_array_add (argv, g_strdup ("-w"));
  g_ptr_array_add (argv, g_strdup (id));
  if (bench->n_jobs)
    g_ptr_array_add (argv, g_strdup_printf ("-j=%u", bench->n_jobs));
  /* W2's and W3's goroutine per key has no worker count or bound to set. */
  if (g_str_equal (id, "W1") && bench->n_workers)
    g_ptr_array_add (argv, g_strdup_printf ("-n=%u", bench->n_workers));
  if (g_str_equal (id, "W1") && bench->capacity)
    g_ptr_array_add (argv, g_strdup_printf ("-c=%u", bench->capacity));
  g_ptr_array_add (argv, NULL);

  result->ok = FALSE;
  if (!g_spawn_sync (NULL, (char **) argv->pdata, NULL, G_SPAWN_DEFAULT, NULL, NULL, &output,
                     NULL, &status, &error))
    {
      g_snprintf (result->check, sizeof result->check, "kd-bench-go: %s", error->message);
      return FALSE;
    }

  lines = g_strsplit (output, "\n", -1);
  for (char **l = lines; *l != NULL && line == NULL; l++)
    if (g_str_has_prefix (*l, prefix))
      line = *l;
  seconds = line != NULL ? go_field (line, "seconds") : NULL;
  jobs = line != NULL ? go_field (line, "jobs") : NULL;
  ok = line != NULL ? go_field (line, "ok") : NULL;
  check = line != NULL ? go_field (line, "check") : NULL;
  rss = line != NULL ? go_field (line, "peak_rss_kib") : NULL;
  if (seconds == NULL || jobs == NULL || ok == NULL || check == NULL || check[0] != '"')
    {
      g_spawn_check_wait_status (status, &error);
      g_snprintf (result->check, sizeof result->check, "no result line from %s (%s)",
                  bench->go_program, error != NULL ? error->message : "exited normally");
      return FALSE;
    }

  result->seconds = g_ascii_strtod (seconds, NULL);
  result->rate = result->seconds > 0 ? g_ascii_strtoull (jobs, NULL, 10) / result->seconds : 0;
  result->peak_rss_kib = rss != NULL ? g_ascii_strtoull (rss, NULL, 10) : 0;
  g_snprintf (result->check, sizeof result->check, "%.*s",
              (int) strcspn (check + 1, "\""), check + 1);
  result->ok = ok[0] == '1' && g_spawn_check_wait_status (status, NULL);
  return result->ok;
}

/* ------------------------------------------------------------------------ */
/* Driver                                                                    */

static const Workload workloads[] = {
  { "W1", "fan-out, 1M unkeyed, bound 1024, 2x2 workers", w1_run_kd, w1_run_glib, "W1" },
  { "W2", "keyed, 1M jobs over 1,000 keys, 4 workers", w2_run_kd, w2_run_glib, "W2" },
  { "W3", "key churn, 100,000 keys x 10, 4 workers", w3_run_kd, w3_run_glib, "W3" },
  { "W4", "CPU-bound, 20,000 x 50 us, 2 workers", w4_run_kd, w4_run_glib },
  { "W5", "W1 submitted in batches of 64", w5_run_kd, w1_run_glib, "W1" },
  { "W5k", "W2 submitted in batches of 64", w5k_run_kd, w2_run_glib, "W2" },
  { "L1", "latency, 200,000 keyed at 50% of W2 capacity", l1_run_kd, l1_run_glib },
  { "P1", "pipeline, ordered parse > keyed > ordered sink", p1_run_kd, p1_run_serial },
  { "H1", "hostile keys, 20,000 x 10 (vs random keys)", h1_run_colliding, h1_run_random },
  { "H1i", "hostile keys, 20,000 x 10, idle 30 s", h1i_run_colliding, h1i_run_random },
};

static int
compare_double (gconstpointer a,
                gconstpointer b)
{
  double x = *(const double *) a;
  double y = *(const double *) b;

  return (x > y) - (x < y);
}

static double
median_of (GArray *runs,
           gsize   offset)
{
  double *values = g_new (double, runs->len);
  double median;
  guint i;

  for (i = 0; i < runs->len; i++)
    memcpy (&values[i], (char *) &g_array_index (runs, RunResult, i) + offset, sizeof (double));
  qsort (values, runs->len, sizeof (double), compare_double);
  median = runs->len % 2 ? values[runs->len / 2]
                         : (values[runs->len / 2 - 1] + values[runs->len / 2]) / 2;
  g_free (values);

  return median;
}

#define MEDIAN(runs, field) median_of ((runs), G_STRUCT_OFFSET (RunResult, field))

typedef struct
{
  const Workload *workload;
  GArray         *kd;    /* RunResult per repetition */
  GArray         *glib;
  GArray         *go;    /* empty if kd-bench-go did not run */
  gboolean        ok;
  char            failed_check[160];
} Summary;

static double
max_rss_mib (GArray *runs)
{
  guint64 max = 0;
  guint i;

  for (i = 0; i < runs->len; i++)
    max = MAX (max, g_array_index (runs, RunResult, i).peak_rss_kib);
  return max / 1024.0;
}

static void
print_latency (const char *who,
               GArray     *runs)
{
  g_print ("    %s at %.2f M/s: start p50 %.1f p99 %.1f p99.9 %.1f max %.1f us; "
           "done p50 %.1f p99 %.1f p99.9 %.1f max %.1f us\n",
           who, MEDIAN (runs, offered_rate) / 1e6, MEDIAN (runs, start_p50),
           MEDIAN (runs, start_p99), MEDIAN (runs, start_p999), MEDIAN (runs, start_max),
           MEDIAN (runs, done_p50), MEDIAN (runs, done_p99), MEDIAN (runs, done_p999),
           MEDIAN (runs, done_max));
  g_print ("               producer woke > %d us late %.0f times, %.2f ms in all (waited %.2f ms "
           "for a processor); %.1f %% of jobs submitted late; start p99 of the others %.1f us\n",
           L1_STALL_NS / 1000, MEDIAN (runs, stalls), MEDIAN (runs, stalled_ms),
           MEDIAN (runs, run_delay_ms), 100 * MEDIAN (runs, late_share),
           MEDIAN (runs, on_time_p99));
}

static void
print_table (Summary *summaries,
             guint    n,
             guint    repetitions)
{
  gboolean with_go = FALSE;
  guint i;

  /* The Go columns appear when kd-bench-go ran, with '-' in the rows of
   * the workloads it does not have. */
  for (i = 0; i < n; i++)
    with_go |= summaries[i].go->len > 0;

  g_print ("\n%-3s %-46s %12s %12s %7s", "id", "workload", "kdispatch", "plain GLib", "ratio");
  if (with_go)
    g_print (" %12s %7s", "Go", "kd/Go");
  g_print (" %9s %9s", "kd RSS", "GLib RSS");
  if (with_go)
    g_print (" %9s", "Go RSS");
  g_print ("  %s\n", "check");
  for (i = 0; i < n; i++)
    {
      Summary *s = &summaries[i];
      const char *id = s->workload->id;
      double kd_rate = MEDIAN (s->kd, rate);
      double glib_rate = s->glib->len ? MEDIAN (s->glib, rate) : 0;
      double go_rate = s->go->len ? MEDIAN (s->go, rate) : 0;
      char kd_cell[32], glib_cell[32], ratio_cell[16], glib_rss_cell[16] = "-";
      char go_cell[32] = "-", go_ratio_cell[16] = "-", go_rss_cell[16] = "-";

      if (g_str_equal (id, "W4"))
        {
          g_snprintf (kd_cell, sizeof kd_cell, "%.1f %% eff",
                      100 * MEDIAN (s->kd, ideal_seconds) / MEDIAN (s->kd, seconds));
          g_snprintf (glib_cell, sizeof glib_cell, "%.1f %% eff",
                      s->glib->len ? 100 * MEDIAN (s->glib, ideal_seconds) / MEDIAN (s->glib, seconds) : 0);
        }
      else if (g_str_equal (id, "L1"))
        {
          g_snprintf (kd_cell, sizeof kd_cell, "p99 %.1f us", MEDIAN (s->kd, start_p99));
          g_snprintf (glib_cell, sizeof glib_cell, "p99 %.1f us",
                      s->glib->len ? MEDIAN (s->glib, start_p99) : 0);
        }
      else
        {
          g_snprintf (kd_cell, sizeof kd_cell, "%.2f M/s", kd_rate / 1e6);
          g_snprintf (glib_cell, sizeof glib_cell, "%.2f M/s", glib_rate / 1e6);
        }

      if (g_str_equal (id, "L1"))
        g_snprintf (ratio_cell, sizeof ratio_cell, "%.2fx",
                    s->glib->len ? MEDIAN (s->glib, start_p99) / MEDIAN (s->kd, start_p99) : 0);
      else if (g_str_has_prefix (id, "H1"))
        g_snprintf (ratio_cell, sizeof ratio_cell, "%.2fx", kd_rate > 0 ? glib_rate / kd_rate : 0);
      else
        g_snprintf (ratio_cell, sizeof ratio_cell, "%.2fx", glib_rate > 0 ? kd_rate / glib_rate : 0);

      /* No baseline ran (--no-baseline): its cells say so rather than 0. */
      if (s->glib->len)
        g_snprintf (glib_rss_cell, sizeof glib_rss_cell, "%.1f MiB", max_rss_mib (s->glib));
      else
        g_strlcpy (glib_cell, "-", sizeof glib_cell);

      if (s->go->len)
        {
          g_snprintf (go_cell, sizeof go_cell, "%.2f M/s", go_rate / 1e6);
          g_snprintf (go_ratio_cell, sizeof go_ratio_cell, "%.2fx",
                      go_rate > 0 ? kd_rate / go_rate : 0);
          g_snprintf (go_rss_cell, sizeof go_rss_cell, "%.1f MiB", max_rss_mib (s->go));
        }

      g_print ("%-3s %-46s %12s %12s %7s", id, s->workload->title, kd_cell, glib_cell,
               s->glib->len ? ratio_cell : "-");
      if (with_go)
        g_print (" %12s %7s", go_cell, go_ratio_cell);
      g_print (" %6.1f MiB %9s", max_rss_mib (s->kd), glib_rss_cell);
      if (with_go)
        g_print (" %9s", go_rss_cell);
      g_print ("  %s\n", s->ok ? "ok" : "FAILED");

      if (g_str_equal (id, "L1"))
        {
          print_latency ("kdispatch ", s->kd);
          if (s->glib->len)
            print_latency ("plain GLib", s->glib);
        }
      if (g_str_equal (id, "W4"))
        g_print ("    kdispatch %.2f M/s, plain GLib %.2f M/s\n", kd_rate / 1e6, glib_rate / 1e6);
      if (g_str_has_prefix (id, "H1"))
        g_print ("    both kdispatch: colliding keys %.2f M/s, random keys %.2f M/s; the ratio is "
                 "the colliding keys' time / the random keys'\n", kd_rate / 1e6, glib_rate / 1e6);
      if (!s->ok)
        g_print ("    check failed: %s\n", s->failed_check);
    }
  g_print ("\nmedians of %u repetitions; ratio = kdispatch / plain GLib (for L1: GLib p99 / "
           "kdispatch p99; for H1: colliding / random keys' time)\n", repetitions);
  if (with_go)
    g_print ("kd/Go = kdispatch / Go channels (kd-bench-go, run in the same rounds)\n");
}

static void
json_runs (GString *json,
           GArray  *runs)
{
  guint i;

  g_string_append (json, "[");
  for (i = 0; i < runs->len; i++)
    {
      RunResult *r = &g_array_index (runs, RunResult, i);

      g_string_append_printf (json,
                              "%s{\"seconds\": %.6f, \"jobs_per_s\": %.1f, \"peak_rss_kib\": %"
                              G_GUINT64_FORMAT ", \"ok\": %s, \"efficiency\": %.4f, "
                              "\"start_us\": [%.2f, %.2f, %.2f, %.2f], "
                              "\"done_us\": [%.2f, %.2f, %.2f, %.2f], \"offered_rate\": %.1f, "
                              "\"stalls\": %.0f, \"stalled_ms\": %.3f, \"run_delay_ms\": %.3f, "
                              "\"late_share\": %.4f, \"on_time_start_p99_us\": %.2f}",
                              i ? ", " : "", r->seconds, r->rate, r->peak_rss_kib,
                              r->ok ? "true" : "false", r->efficiency, r->start_p50, r->start_p99,
                              r->start_p999, r->start_max, r->done_p50, r->done_p99, r->done_p999,
                              r->done_max, r->offered_rate, r->stalls, r->stalled_ms,
                              r->run_delay_ms, r->late_share, r->on_time_p99);
    }
  g_string_append (json, "]");
}

static void
print_json (Summary *summaries,
            guint    n,
            guint    repetitions)
{
  GString *json = g_string_new (NULL);
  guint i;

  g_string_append_printf (json, "{\"processors\": %u, \"repetitions\": %u, \"workloads\": [",
                          g_get_num_processors (), repetitions);
  for (i = 0; i < n; i++)
    {
      Summary *s = &summaries[i];

      g_string_append_printf (json, "%s{\"id\": \"%s\", \"ok\": %s, \"kdispatch_median_jobs_per_s\": %.1f",
                              i ? ", " : "", s->workload->id, s->ok ? "true" : "false",
                              MEDIAN (s->kd, rate));
      if (s->glib->len)
        g_string_append_printf (json, ", \"glib_median_jobs_per_s\": %.1f, \"ratio\": %.3f",
                                MEDIAN (s->glib, rate), MEDIAN (s->kd, rate) / MEDIAN (s->glib, rate));
      if (s->go->len)
        g_string_append_printf (json, ", \"go_median_jobs_per_s\": %.1f, \"kd_go_ratio\": %.3f",
                                MEDIAN (s->go, rate), MEDIAN (s->kd, rate) / MEDIAN (s->go, rate));
      g_string_append (json, ", \"kdispatch\": ");
      json_runs (json, s->kd);
      g_string_append (json, ", \"glib\": ");
      json_runs (json, s->glib);
      if (s->go->len)
        {
          g_string_append (json, ", \"go\": ");
          json_runs (json, s->go);
        }
      g_string_append (json, "}");
    }
  g_string_append (json, "]}\n");
  g_print ("%s", json->str);
  g_string_free (json, TRUE);
}

int
main (int    argc,
      char **argv)
{
  char *workload_list = NULL;
  gint repetitions = 5;
  gint n_workers = 0;
  gint capacity = 0;
  gint n_jobs = 0;
  gboolean json = FALSE;
  double rate = 0;
  gboolean no_baseline = FALSE;
  gboolean no_go = FALSE;
  gint p1_rounds = 0;
  GOptionEntry entries[] = {
    { "workload", 'w', 0, G_OPTION_ARG_STRING, &workload_list,
      "Workloads to run, comma-separated (W1,W2,W3,W4,W5,W5k,L1,P1,H1,H1i; default all)", "LIST" },
    { "repetitions", 'r', 0, G_OPTION_ARG_INT, &repetitions, "Runs per workload (median reported)", "N" },
    { "workers", 'n', 0, G_OPTION_ARG_INT, &n_workers, "Worker count (default: the workload's)", "N" },
    { "capacity", 'c', 0, G_OPTION_ARG_INT, &capacity, "Admission bound (default: the workload's)", "N" },
    { "jobs", 'j', 0, G_OPTION_ARG_INT, &n_jobs, "Jobs per run (default: the workload's)", "N" },
    { "rate", 0, 0, G_OPTION_ARG_DOUBLE, &rate, "L1's offered load in jobs/s, the same for both (default: half of each one's W2 capacity)", "R" },
    { "parse-rounds", 0, 0, G_OPTION_ARG_INT, &p1_rounds, "P1's work per item in its parse stage, in xorshift rounds (default 16)", "N" },
    { "no-baseline", 0, 0, G_OPTION_ARG_NONE, &no_baseline, "Skip the plain-GLib baseline", NULL },
    { "no-go", 0, 0, G_OPTION_ARG_NONE, &no_go, "Skip the Go anchor (kd-bench-go) in W1, W2 and W3", NULL },
    { "json", 0, 0, G_OPTION_ARG_NONE, &json, "Print JSON instead of a table", NULL },
    { NULL },
  };
  GOptionContext *options = g_option_context_new ("- the kdispatch benchmark");
  GError *error = NULL;
  Bench bench = { 0 };
  Summary summaries[G_N_ELEMENTS (workloads)];
  guint n_summaries = 0;
  gboolean all_ok = TRUE;
  gboolean wants_go = FALSE;
  char **wanted;
  guint w;

  g_option_context_add_main_entries (options, entries, NULL);
  if (!g_option_context_parse (options, &argc, &argv, &error))
    {
      g_printerr ("%s\n", error->message);
      return 2;
    }
  g_option_context_free (options);
  if (repetitions < 1 || n_workers < 0 || capacity < 0 || n_jobs < 0 || rate < 0 || p1_rounds < 0)
    {
      g_printerr ("repetitions must be at least 1; workers, capacity and jobs not negative\n");
      return 2;
    }

  bench.n_jobs = (guint) n_jobs;
  bench.n_workers = (guint) n_workers;
  bench.capacity = (guint) capacity;
  bench.baseline = !no_baseline;
  bench.l1_rate = rate;
  bench.p1_rounds = (guint) p1_rounds;
  wanted = g_strsplit (workload_list != NULL ? workload_list : "W1,W2,W3,W4,W5,W5k,L1,P1,H1,H1i", ",", -1);

  for (char **id = wanted; *id != NULL; id++)
    {
      gboolean known = FALSE;

      for (w = 0; w < G_N_ELEMENTS (workloads); w++)
        known |= g_ascii_strcasecmp (*id, workloads[w].id) == 0;
      if (!known)
        {
          g_printerr ("unknown workload %s\n", *id);
          return 2;
        }
    }

  for (w = 0; w < G_N_ELEMENTS (workloads); w++)
    wants_go |= workloads[w].go_id != NULL && g_strv_contains ((const char * const *) wanted, workloads[w].id);
  if (wants_go && !no_go)
    {
#ifdef KD_BENCH_GO
      if (g_file_test (KD_BENCH_GO, G_FILE_TEST_IS_EXECUTABLE))
        bench.go_program = KD_BENCH_GO;
      else
        g_printerr ("kd-bench: no Go anchor: %s is missing (ninja builds it)\n", KD_BENCH_GO);
#else
      g_printerr ("kd-bench: no Go anchor: go was not found when this build was configured\n");
#endif
    }

  if (!json)
    g_print ("kd-bench: %u processors, %d repetitions\n", g_get_num_processors (), repetitions);

  for (w = 0; w < G_N_ELEMENTS (workloads); w++)
    {
      const Workload *workload = &workloads[w];
      Summary *s;
      gboolean with_go;
      gint r;

      if (!g_strv_contains ((const char * const *) wanted, workload->id))
        continue;

      /* L1 paces at half of W2's capacity: measure W2 first if not asked. */
      if (g_str_equal (workload->id, "L1") && bench.w2_kd_rate == 0 && bench.l1_rate == 0)
        {
          RunResult scratch = { 0 };

          workloads[1].run_kd (&bench, &scratch);
          bench.w2_kd_rate = scratch.rate;
          if (bench.baseline)
            {
              workloads[1].run_glib (&bench, &scratch);
              bench.w2_glib_rate = scratch.rate;
            }
        }

      s = &summaries[n_summaries++];
      s->workload = workload;
      s->kd = g_array_new (FALSE, TRUE, sizeof (RunResult));
      s->glib = g_array_new (FALSE, TRUE, sizeof (RunResult));
      s->go = g_array_new (FALSE, TRUE, sizeof (RunResult));
      s->ok = TRUE;
      with_go = bench.go_program != NULL && workload->go_id != NULL;

      for (r = 0; r < repetitions; r++)
        {
          RunResult kd = { 0 }, glib = { 0 }, go = { 0 };
          char glib_note[48] = "", go_note[48] = "";

          /* Alternate the order, so that none of them always runs on a
           * warmer or cooler machine: kdispatch, the baseline, Go in even
           * rounds, the reverse in odd ones. */
          if (r % 2 == 0)
            workload->run_kd (&bench, &kd);
          else if (with_go)
            go_run (&bench, workload->go_id, &go);
          if (bench.baseline)
            workload->run_glib (&bench, &glib);
          if (r % 2 == 1)
            workload->run_kd (&bench, &kd);
          else if (with_go)
            go_run (&bench, workload->go_id, &go);

          g_array_append_val (s->kd, kd);
          if (bench.baseline)
            g_array_append_val (s->glib, glib);
          if (with_go)
            g_array_append_val (s->go, go);

          if (!kd.ok || (bench.baseline && !glib.ok))
            {
              s->ok = FALSE;
              g_strlcpy (s->failed_check, !kd.ok ? kd.check : glib.check,
                         sizeof s->failed_check);
            }
          else if (with_go && !go.ok)
            {
              s->ok = FALSE;
              g_snprintf (s->failed_check, sizeof s->failed_check, "Go: %s", go.check);
            }
          if (bench.baseline)
            g_snprintf (glib_note, sizeof glib_note, ", plain GLib %.3f s", glib.seconds);
          if (with_go)
            g_snprintf (go_note, sizeof go_note, ", Go %.3f s", go.seconds);
          if (!json)
            g_printerr ("  %s run %d: kdispatch %.3f s%s%s (%s)\n", workload->id, r + 1,
                        kd.seconds, glib_note, go_note, kd.check);
        }
      all_ok &= s->ok;

      /* W2's medians are the capacities L1 paces at. */
      if (g_str_equal (workload->id, "W2"))
        {
          bench.w2_kd_rate = MEDIAN (s->kd, rate);
          if (bench.baseline)
            bench.w2_glib_rate = MEDIAN (s->glib, rate);
        }
    }

  if (json)
    print_json (summaries, n_summaries, (guint) repetitions);
  else
    print_table (summaries, n_summaries, (guint) repetitions);

  g_strfreev (wanted);
  g_free (workload_list);

  return all_ok ? 0 : 1;
}
