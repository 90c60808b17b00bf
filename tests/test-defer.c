/* test-defer.c: jobs that end when the application returns them
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-sync-private.h"
#include "kd-test-util.h"

#define N_KEYS 16

/* Items: key * 100000 + number within the key (from 1); key N_KEYS: no
 * key. The handler checks each key's order and that no two of a key's jobs
 * are out at once, then defers the job to @out, for the test or a returner
 * thread; items listed in @fail_first fail their first attempts. */
typedef struct
{
  GMutex         lock;
  KdDispatcher  *dispatcher;
  GAsyncQueue   *out;
  guint          next[N_KEYS];
  gboolean       busy[N_KEYS];
  gint           out_of_order;
  gint           overlap;
  gint           in_handler_returns;  /* 1: return success inside the handler; 2: an error */
  KdTestGate    *returned_gate;       /* the handler waits here after handing the job out */
  guint          fail_attempts;       /* the returner fails attempts below this */
  KdTestCounter  deferred;
  KdTestCounter  ended;
  gint           completed;
  gint           failed;
  gint           cancelled;
  gint           started_key0;        /* jobs of key 0 whose handler started */
  GThread       *done_thread;         /* where the last done callback ran */
  GThread       *handler_thread;      /* where the last handler ran */
} Fixture;

static char *
key_of (guint item)
{
  return item / 100000 < N_KEYS ? g_strdup_printf ("k%u", item / 100000) : NULL;
}

static gboolean
handler (KdJob    *job,
         gpointer  user_data,
         GError  **error)
{
  Fixture *f = user_data;
  guint item = GPOINTER_TO_UINT (kd_job_get_item (job));
  guint key = item / 100000;

  if (key < N_KEYS)
    {
      kd_mutex_lock (&f->lock);
      if (kd_job_get_attempt (job) == 1)
        {
          if (item % 100000 != f->next[key] + 1)
            f->out_of_order++;
          f->next[key] = item % 100000;
        }
      if (f->busy[key])
        f->overlap++;
      f->busy[key] = TRUE;
      if (key == 0)
        f->started_key0++;
      kd_mutex_unlock (&f->lock);
    }

  g_atomic_pointer_set (&f->handler_thread, g_thread_self ());
  kd_job_defer (job);
  kd_test_counter_add (&f->deferred, 1);
  if (f->in_handler_returns == 1)
    kd_job_return_success (job);
  else if (f->in_handler_returns == 2)
    kd_job_return_error_literal (job, G_IO_ERROR, G_IO_ERROR_FAILED, "failed at once");
  else
    {
      /* Handed over through GLib's queue, which TSan does not see. */
      kd_tsan_release (job);
      g_async_queue_push (f->out, job);
    }
  if (f->returned_gate != NULL)
    g_assert_true (kd_test_gate_wait (f->returned_gate));
  return TRUE;
}

static void
done (KdJob        *job,
      const GError *error,
      gpointer      user_data)
{
  Fixture *f = user_data;

  g_atomic_pointer_set (&f->done_thread, g_thread_self ());

  if (error == NULL)
    g_atomic_int_inc (&f->completed);
  else if (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
    g_atomic_int_inc (&f->cancelled);
  else
    g_atomic_int_inc (&f->failed);
  kd_test_counter_add (&f->ended, 1);
}

static void
fixture_init (Fixture *f,
              guint    n_workers,
              guint    capacity)
{
  memset (f, 0, sizeof *f);
  g_mutex_init (&f->lock);
  f->out = g_async_queue_new ();
  kd_test_counter_init (&f->deferred);
  kd_test_counter_init (&f->ended);
  f->dispatcher = kd_dispatcher_new (n_workers, handler, f, NULL);
  kd_dispatcher_set_capacity (f->dispatcher, capacity);
  kd_dispatcher_set_done_func (f->dispatcher, done, f, NULL);
}

static void
fixture_clear (Fixture *f)
{
  g_clear_object (&f->dispatcher);
  g_assert_cmpint (g_async_queue_length (f->out), ==, 0);
  g_async_queue_unref (f->out);
  kd_test_counter_clear (&f->deferred);
  kd_test_counter_clear (&f->ended);
  g_mutex_clear (&f->lock);
}

static void
submit (Fixture *f,
        guint    item)
{
  g_autofree char *key = key_of (item);

  g_assert_true (kd_dispatcher_submit (f->dispatcher, key, GUINT_TO_POINTER (item), NULL));
}

/* Returns one job the handler handed out: its key is free again. */
static void
return_job (Fixture *f,
            KdJob   *job,
            GError  *error)
{
  guint item = GPOINTER_TO_UINT (kd_job_get_item (job));

  if (item / 100000 < N_KEYS)
    {
      kd_mutex_lock (&f->lock);
      f->busy[item / 100000] = FALSE;
      kd_mutex_unlock (&f->lock);
    }
  if (error != NULL)
    kd_job_return_error (job, error);
  else
    kd_job_return_success (job);
}

static KdJob *
pop_out (Fixture *f)
{
  KdJob *job = g_async_queue_timeout_pop (f->out, KD_TEST_DEADLINE_US);

  g_assert_nonnull (job);
  kd_tsan_acquire (job);
  return job;
}

static void
test_worker_free (void)
{
  Fixture f;
  KdStats stats;
  guint k;

  g_test_summary ("With one worker, the jobs of 16 keys are all deferred at once: a deferred job "
                  "holds no worker; they are pending until returned, then end completed");

  fixture_init (&f, 1, 64);
  for (k = 0; k < N_KEYS; k++)
    submit (&f, k * 100000 + 1);
  g_assert_true (kd_test_counter_wait (&f.deferred, N_KEYS));
  kd_dispatcher_get_stats (f.dispatcher, &stats);
  g_assert_cmpuint (stats.pending, ==, N_KEYS);
  g_assert_cmpuint (stats.completed, ==, 0);
  g_assert_false (kd_dispatcher_wait_until (f.dispatcher, g_get_monotonic_time ()));

  for (k = 0; k < N_KEYS; k++)
    return_job (&f, pop_out (&f), NULL);
  kd_dispatcher_wait (f.dispatcher);
  kd_dispatcher_get_stats (f.dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, N_KEYS);
  g_assert_cmpuint (stats.pending, ==, 0);
  g_assert_cmpuint (stats.live_keys, ==, 0);
  g_assert_cmpint (f.completed, ==, N_KEYS);
  fixture_clear (&f);
}

typedef struct
{
  Fixture *f;
  guint    total;
} Returner;

/* Returns the jobs handed out, a few at a time in reverse order. */
static gpointer
returner_main (gpointer data)
{
  Returner *r = data;
  guint returned = 0;

  while (returned < r->total)
    {
      KdJob *batch[8];
      guint n = 0, i;

      batch[n++] = pop_out (r->f);
      while (n < G_N_ELEMENTS (batch) && (batch[n] = g_async_queue_try_pop (r->f->out)) != NULL)
        kd_tsan_acquire (batch[n++]);
      for (i = n; i > 0; i--)
        {
          KdJob *job = batch[i - 1];
          GError *error = NULL;

          if (kd_job_get_attempt (job) < r->f->fail_attempts)
            error = g_error_new_literal (G_IO_ERROR, G_IO_ERROR_FAILED, "not yet");
          else
            returned++;
          return_job (r->f, job, error);
        }
    }
  return NULL;
}

static void
run_with_returner (guint fail_attempts)
{
  Fixture f;
  Returner r;
  GThread *thread;
  guint n_per_key = kd_test_size (100, 1000), i, k;
  KdStats stats;

  fixture_init (&f, 2, 256);
  f.fail_attempts = fail_attempts;
  if (fail_attempts > 0)
    kd_dispatcher_set_retry (f.dispatcher, fail_attempts, 0, 0);
  r.f = &f;
  r.total = (N_KEYS + 1) * n_per_key;
  thread = g_thread_new ("returner", returner_main, &r);

  for (i = 1; i <= n_per_key; i++)
    for (k = 0; k < N_KEYS; k++)
      {
        submit (&f, k * 100000 + i);
        if (k == 0)
          submit (&f, N_KEYS * 100000 + i);   /* unkeyed */
      }
  kd_dispatcher_wait (f.dispatcher);
  g_thread_join (thread);

  g_assert_cmpint (f.out_of_order, ==, 0);
  g_assert_cmpint (f.overlap, ==, 0);
  g_assert_cmpint (f.completed, ==, (gint) r.total);
  g_assert_cmpint (f.failed, ==, 0);
  kd_dispatcher_get_stats (f.dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, r.total);
  g_assert_cmpuint (stats.retried, ==, (guint64) r.total * (fail_attempts > 0 ? fail_attempts - 1 : 0));
  g_assert_cmpuint (stats.pending, ==, 0);
  g_assert_cmpuint (stats.live_keys, ==, 0);
  fixture_clear (&f);
}

static void
test_returned_from_thread (void)
{
  g_test_summary ("Keyed and unkeyed jobs deferred and returned from another thread, several "
                  "at a time in reverse order: each key's jobs still run one at a time in order, "
                  "every job ends once, and the counters add up");
  run_with_returner (0);
}

static void
test_retry (void)
{
  g_test_summary ("A deferred job returned with an error is retried by the failure policy, in its "
                  "key's order: with 3 attempts, each job fails twice and completes the third time");
  run_with_returner (3);
}

static void
test_key_held (void)
{
  Fixture f;
  KdJob *first;
  guint i;

  g_test_summary ("A key stays held until its deferred job is returned: its next job does not "
                  "start while 100 jobs of other keys, submitted after it, run; it runs once the "
                  "first is returned");

  fixture_init (&f, 2, 256);
  submit (&f, 1);   /* key 0, job 1 */
  first = pop_out (&f);
  submit (&f, 2);   /* key 0, job 2: waits */
  for (i = 1; i <= 100; i++)
    {
      submit (&f, 100000 + i);   /* key 1 */
      return_job (&f, pop_out (&f), NULL);
    }
  g_assert_true (kd_test_counter_wait (&f.ended, 100));
  g_assert_cmpint (g_atomic_int_get (&f.started_key0), ==, 1);

  return_job (&f, first, NULL);
  return_job (&f, pop_out (&f), NULL);
  kd_dispatcher_wait (f.dispatcher);
  g_assert_cmpint (f.started_key0, ==, 2);
  g_assert_cmpint (f.out_of_order, ==, 0);
  g_assert_cmpint (f.overlap, ==, 0);
  g_assert_cmpint (f.completed, ==, 102);
  fixture_clear (&f);
}

static void
test_bound (void)
{
  Fixture f;
  g_autoptr (GError) error = NULL;

  g_test_summary ("A deferred job holds its unit of the bound: at capacity 2 with two deferred, "
                  "a try_submit is refused with KD_ERROR_FULL; once one is returned, a submit "
                  "gets its room");

  fixture_init (&f, 1, 2);
  submit (&f, 1);
  submit (&f, N_KEYS * 100000 + 1);
  g_assert_true (kd_test_counter_wait (&f.deferred, 2));
  g_assert_false (kd_dispatcher_try_submit (f.dispatcher, "k2", GUINT_TO_POINTER (200001), &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);

  return_job (&f, pop_out (&f), NULL);
  g_assert_true (kd_dispatcher_submit_timeout (f.dispatcher, "k2", GUINT_TO_POINTER (200001),
                                               KD_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);
  return_job (&f, pop_out (&f), NULL);
  return_job (&f, pop_out (&f), NULL);
  kd_dispatcher_wait (f.dispatcher);
  g_assert_cmpint (f.completed, ==, 3);
  fixture_clear (&f);
}

static void
test_returned_in_handler (void)
{
  Fixture f;
  KdStats stats;

  g_test_summary ("A job returned inside its handler, before the handler returned, ends once when "
                  "the handler returns, with the outcome it was returned with");

  fixture_init (&f, 1, 16);
  f.in_handler_returns = 1;
  submit (&f, 1);
  submit (&f, 2);
  kd_dispatcher_wait (f.dispatcher);
  f.in_handler_returns = 2;
  submit (&f, 3);
  kd_dispatcher_wait (f.dispatcher);
  kd_dispatcher_get_stats (f.dispatcher, &stats);
  g_assert_cmpint (f.completed, ==, 2);
  g_assert_cmpint (f.failed, ==, 1);
  g_assert_cmpuint (stats.completed, ==, 2);
  g_assert_cmpuint (stats.failed, ==, 1);
  fixture_clear (&f);
}

typedef struct
{
  Fixture    *f;
  KdTestGate *gate;
} EarlyReturner;

static gpointer
early_returner_main (gpointer data)
{
  EarlyReturner *r = data;

  return_job (r->f, pop_out (r->f), NULL);
  kd_test_gate_open (r->gate);
  return NULL;
}

static void
test_returned_while_handler_runs (void)
{
  Fixture f;
  KdTestGate gate;
  EarlyReturner r = { &f, &gate };
  GThread *thread;

  g_test_summary ("A job returned by another thread while its handler still runs ends once, on "
                  "its worker, after the handler returned");

  fixture_init (&f, 1, 16);
  kd_test_gate_init (&gate);
  f.returned_gate = &gate;
  thread = g_thread_new ("early-returner", early_returner_main, &r);
  submit (&f, 1);
  g_thread_join (thread);
  kd_dispatcher_wait (f.dispatcher);
  g_assert_cmpint (f.completed, ==, 1);
  g_assert_cmpuint (kd_test_counter_get (&f.ended), ==, 1);
  g_assert_true (f.done_thread == f.handler_thread);
  f.returned_gate = NULL;
  fixture_clear (&f);
  kd_test_gate_clear (&gate);
}

static void
test_cancel (void)
{
  Fixture f;
  KdJob *first;
  KdStats stats;

  g_test_summary ("Cancelling the dispatcher while a job is deferred leaves the job to its return, "
                  "still pending; the key's later jobs end cancelled after it");

  fixture_init (&f, 2, 16);
  submit (&f, 1);
  first = pop_out (&f);
  submit (&f, 2);
  submit (&f, 3);
  g_cancellable_cancel (kd_dispatcher_get_cancellable (f.dispatcher));
  /* Cancelled, the deferred job is still pending, its key still held. */
  g_assert_false (kd_dispatcher_wait_until (f.dispatcher, g_get_monotonic_time ()));
  g_assert_cmpint (g_atomic_int_get (&f.started_key0), ==, 1);

  return_job (&f, first, g_error_new_literal (G_IO_ERROR, G_IO_ERROR_CANCELLED, "gave up"));
  kd_dispatcher_wait (f.dispatcher);
  kd_dispatcher_get_stats (f.dispatcher, &stats);
  g_assert_cmpint (f.cancelled, ==, 3);
  g_assert_cmpint (f.started_key0, ==, 1);
  g_assert_cmpuint (stats.cancelled, ==, 2);
  g_assert_cmpuint (stats.failed, ==, 1);
  fixture_clear (&f);
}

static KdTestGate *warned;

/* The warning of a last unref that waits for a deferred job (not fatal
 * here: the test expects it). */
static void
on_unref_warning (const gchar    *log_domain,
                  GLogLevelFlags  log_level,
                  const gchar    *message,
                  gpointer        user_data)
{
  if (strstr (message, "still waits for 1 deferred jobs") != NULL)
    kd_test_gate_open (warned);
  else
    g_error ("unexpected warning: %s", message);
}

static gpointer
unref_main (gpointer data)
{
  g_object_unref (data);
  return NULL;
}

static void
test_last_unref_warns (void)
{
  Fixture f;
  KdTestGate gate;
  GThread *thread;
  KdJob *job;
  GLogLevelFlags fatal;
  guint handler_id;

  g_test_summary ("A last unref with a deferred job still out after a while says so in a "
                  "warning, and goes on waiting for the job's return; the job ends and the unref "
                  "completes");

  fixture_init (&f, 1, 16);
  kd_test_gate_init (&gate);
  warned = &gate;
  fatal = g_log_set_always_fatal (G_LOG_FATAL_MASK | G_LOG_LEVEL_CRITICAL);
  handler_id = g_log_set_handler ("kdispatch", G_LOG_LEVEL_WARNING, on_unref_warning, NULL);
  submit (&f, 1);
  job = pop_out (&f);
  thread = g_thread_new ("unref", unref_main, g_steal_pointer (&f.dispatcher));
  g_assert_true (kd_test_gate_wait (&gate));
  /* The unref waits: nothing ended yet. */
  g_assert_cmpuint (kd_test_counter_get (&f.ended), ==, 0);
  return_job (&f, job, NULL);
  g_thread_join (thread);
  g_log_remove_handler ("kdispatch", handler_id);
  g_log_set_always_fatal (fatal);
  g_assert_cmpint (f.completed, ==, 1);
  fixture_clear (&f);
  kd_test_gate_clear (&gate);
}


static KdTestGate *destroyed;

static void
open_destroyed (gpointer data)
{
  kd_test_gate_open (destroyed);
}

static void
unref_in_done (KdJob        *job,
               const GError *error,
               gpointer      user_data)
{
  Fixture *f = user_data;

  g_clear_object (&f->dispatcher);
}

static void
test_last_unref_while_returning (void)
{
  Fixture f;
  KdTestGate gate;
  KdJob *job;

  g_test_summary ("The last unref in the done callback of a job returned on the application's "
                  "thread does not wait for that job: the return comes back, and the shutdown "
                  "finishes elsewhere");

  fixture_init (&f, 1, 16);
  kd_test_gate_init (&gate);
  destroyed = &gate;
  g_clear_object (&f.dispatcher);
  f.dispatcher = kd_dispatcher_new (1, handler, &f, open_destroyed);
  kd_dispatcher_set_done_func (f.dispatcher, unref_in_done, &f, NULL);
  submit (&f, 1);
  submit (&f, 100001);
  job = pop_out (&f);
  /* Its worker is done with it once it ran the next job's handler: the
   * return ends it on this thread, whose done callback drops the last
   * reference (and a wait there would wait for itself). */
  g_assert_true (kd_test_counter_wait (&f.deferred, 2));
  return_job (&f, job, NULL);
  g_assert_null (f.dispatcher);
  return_job (&f, pop_out (&f), NULL);
  g_assert_true (kd_test_gate_wait (&gate));
  fixture_clear (&f);
  kd_test_gate_clear (&gate);
}

/* ---- Deferred jobs in a pipeline's stages -------------------------------- */

/* Items: key * 1000 + number within the key (from 1). The first stage
 * defers every job to @out; a returner thread returns them, a few at a
 * time in reverse, after emitting item * 10 + 1 and item * 10 + 2 from its
 * own thread; the second stage passes its items on from its workers; the
 * sink checks each key's order. */
#define STAGE_KEYS 4

typedef struct
{
  GAsyncQueue  *out;
  guint         total;        /* jobs the returner returns, then it stops */
  gboolean      cancel_after; /* the returner cancels @cancellable halfway, */
  KdTestGate    submitted;    /* once every item was submitted */
  GCancellable *cancellable;
  gint          emitted;      /* emits the pipeline took */
  gint          refused;      /* emits it refused (cancelled) */
  GMutex        lock;
  guint         last[STAGE_KEYS];
  gint          received;
  gint          out_of_order;
  gint          second_done;  /* the second stage's done callbacks */
  guint         per_item;     /* emits per item (from 1 to 9), if not 2 */
} StageDefer;

static gboolean
defer_to_returner (KdJob    *job,
                   gpointer  user_data,
                   GError  **error)
{
  StageDefer *sd = user_data;

  kd_job_defer (job);
  /* Handed over through GLib's queue, which TSan does not see. */
  kd_tsan_release (job);
  g_async_queue_push (sd->out, job);
  return TRUE;
}

static void
emit_two (StageDefer *sd,
          KdJob      *job)
{
  guint item = GPOINTER_TO_UINT (kd_job_get_item (job));
  guint i;

  for (i = 1; i <= 2; i++)
    {
      GError *error = NULL;

      if (kd_job_emit (job, kd_job_get_key (job), GUINT_TO_POINTER (item * 10 + i), &error))
        g_atomic_int_inc (&sd->emitted);
      else
        g_atomic_int_inc (&sd->refused);
      g_clear_error (&error);
    }
}

/* What the test pushes to @out once the pipeline drained: the returner
 * stops there. */
static char stop_returning;

static gpointer
stage_returner (gpointer data)
{
  StageDefer *sd = data;
  guint returned = 0;

  for (;;)
    {
      KdJob *batch[3];
      guint n = 0;

      batch[n] = g_async_queue_timeout_pop (sd->out, KD_TEST_DEADLINE_US);
      g_assert_nonnull (batch[n]);
      if (batch[n] == (gpointer) &stop_returning)
        return NULL;
      kd_tsan_acquire (batch[n]);
      n++;
      while (n < G_N_ELEMENTS (batch) && (batch[n] = g_async_queue_try_pop (sd->out)) != NULL)
        {
          if (batch[n] == (gpointer) &stop_returning)
            {
              /* Not yet: it goes back behind the jobs. */
              g_async_queue_push (sd->out, batch[n]);
              break;
            }
          kd_tsan_acquire (batch[n]);
          n++;
        }
      /* The newest first: the stage's order must not depend on the returns'. */
      while (n > 0)
        {
          KdJob *job = batch[--n];

          /* Halfway, cancelled before this job's emits, which fail. */
          if (++returned == sd->total / 2 && sd->cancel_after)
            {
              g_assert_true (kd_test_gate_wait (&sd->submitted));
              g_cancellable_cancel (sd->cancellable);
            }
          emit_two (sd, job);
          kd_job_return_success (job);
        }
    }
}

static gboolean
pass_own (KdJob    *job,
          gpointer  user_data,
          GError  **error)
{
  return kd_job_emit (job, kd_job_get_key (job), kd_job_get_item (job), error);
}

static void
stage_sink (const char *key,
            gpointer    item,
            gpointer    user_data)
{
  StageDefer *sd = user_data;
  guint n = GPOINTER_TO_UINT (item);
  guint k = n / 10000;
  /* Each key's emits in order: item 1's, then item 2's, ... */
  guint rank = (n / 10 % 1000 - 1) * (sd->per_item != 0 ? sd->per_item : 2) + n % 10;

  kd_mutex_lock (&sd->lock);
  if (rank != sd->last[k] + 1)
    sd->out_of_order++;
  sd->last[k] = rank;
  g_atomic_int_inc (&sd->received);
  kd_mutex_unlock (&sd->lock);
}

static void
count_second_done (KdJob        *job,
                   const GError *error,
                   gpointer      user_data)
{
  StageDefer *sd = user_data;

  g_atomic_int_inc (&sd->second_done);
}

static KdPipeline *
stage_defer_pipeline (StageDefer  *sd,
                      KdStageMode  mode,
                      guint        capacity)
{
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *first, *second;

  first = kd_pipeline_add_stage (pipeline, "deferring", 2, defer_to_returner, sd, NULL);
  kd_pipeline_set_stage_mode (pipeline, first, mode);
  kd_dispatcher_set_capacity (first, capacity);
  second = kd_pipeline_add_stage (pipeline, "passing", 2, pass_own, sd, NULL);
  kd_dispatcher_set_capacity (second, capacity);
  kd_dispatcher_set_done_func (second, count_second_done, sd, NULL);
  kd_pipeline_set_sink (pipeline, stage_sink, sd, NULL);
  if (sd->cancellable != NULL)
    kd_pipeline_set_cancellable (pipeline, sd->cancellable);
  return pipeline;
}

static void
test_stage_deferred (void)
{
  KdStageMode modes[] = { KD_STAGE_ORDERED, KD_STAGE_KEYED };
  guint per_key = kd_test_size (300, 60);
  guint m;

  g_test_summary ("A pipeline stage's jobs, deferred and returned out of order by another "
                  "thread that emits for them first, pass on what they emitted in each key's "
                  "order, in an ordered and a keyed stage, at a bound of 4 that the emits "
                  "overrun without a deadlock");

  for (m = 0; m < G_N_ELEMENTS (modes); m++)
    {
      StageDefer sd = { 0 };
      KdPipeline *pipeline;
      GThread *returner;
      guint i, k;

      g_mutex_init (&sd.lock);
      sd.out = g_async_queue_new ();
      sd.total = per_key * STAGE_KEYS;
      pipeline = stage_defer_pipeline (&sd, modes[m], 4);
      returner = g_thread_new ("returner", stage_returner, &sd);

      for (i = 1; i <= per_key; i++)
        for (k = 0; k < STAGE_KEYS; k++)
          {
            g_autofree char *key = g_strdup_printf ("k%u", k);
            GError *error = NULL;

            g_assert_true (kd_pipeline_submit (pipeline, key, GUINT_TO_POINTER (k * 1000 + i),
                                               &error));
            g_assert_no_error (error);
          }
      kd_pipeline_close (pipeline);
      kd_pipeline_wait (pipeline);
      g_async_queue_push (sd.out, &stop_returning);
      g_thread_join (returner);

      g_assert_cmpint (sd.emitted, ==, 2 * sd.total);
      g_assert_cmpint (sd.refused, ==, 0);
      g_assert_cmpint (sd.received, ==, 2 * sd.total);
      g_assert_cmpint (sd.out_of_order, ==, 0);
      g_assert_cmpint (sd.second_done, ==, 2 * sd.total);

      g_object_unref (pipeline);
      g_async_queue_unref (sd.out);
      g_mutex_clear (&sd.lock);
    }
}

static void
test_stage_deferred_cancel (void)
{
  guint per_key = kd_test_size (200, 50);
  StageDefer sd = { 0 };
  KdPipeline *pipeline;
  GThread *returner;
  guint i, k;

  g_test_summary ("A pipeline cancelled while its ordered stage's deferred jobs emit: every "
                  "emit the pipeline took ends exactly once, at the sink or through the next "
                  "stage's done callback, and the emits after the cancellation are refused");

  g_mutex_init (&sd.lock);
  kd_test_gate_init (&sd.submitted);
  sd.out = g_async_queue_new ();
  sd.cancellable = g_cancellable_new ();
  sd.cancel_after = TRUE;
  sd.total = per_key * STAGE_KEYS;
  /* Room for every item: none is refused, and the returner cancels once
   * it returned half. */
  pipeline = stage_defer_pipeline (&sd, KD_STAGE_ORDERED, sd.total);
  returner = g_thread_new ("returner", stage_returner, &sd);

  for (i = 1; i <= per_key; i++)
    for (k = 0; k < STAGE_KEYS; k++)
      {
        g_autofree char *key = g_strdup_printf ("k%u", k);

        g_assert_true (kd_pipeline_submit (pipeline, key, GUINT_TO_POINTER (k * 1000 + i), NULL));
      }
  kd_test_gate_open (&sd.submitted);
  kd_pipeline_close (pipeline);
  kd_pipeline_wait (pipeline);
  g_async_queue_push (sd.out, &stop_returning);
  g_thread_join (returner);

  /* The jobs that had not started when it was cancelled ended cancelled,
   * never deferred, so they emitted nothing. */
  g_assert_cmpint (sd.emitted + sd.refused, <=, 2 * sd.total);
  g_assert_cmpint (sd.emitted, >=, sd.total - 2);   /* the jobs before the halfway one */
  g_assert_cmpint (sd.refused, >, 0);
  g_assert_cmpint (sd.second_done, ==, sd.emitted);
  g_assert_cmpint (sd.received, <=, sd.emitted);
  g_assert_cmpint (sd.out_of_order, ==, 0);

  g_object_unref (pipeline);
  g_object_unref (sd.cancellable);
  g_async_queue_unref (sd.out);
  kd_test_gate_clear (&sd.submitted);
  g_mutex_clear (&sd.lock);
}

/* The first stage's done callbacks, counted for a test to wait on. */
static void
count_first_done (KdJob        *job,
                  const GError *error,
                  gpointer      user_data)
{
  kd_test_counter_add (user_data, 1);
}

static void
test_stage_deferred_overrun (void)
{
  StageDefer sd = { 0 };
  KdTestCounter first_done;
  KdPipeline *pipeline;
  KdJob *jobs[4];
  guint i, j;

  g_test_summary ("In an ordered stage whose head is deferred, the items behind it, returned "
                  "first, pass what they emitted into the stage's buffer beyond its bound "
                  "rather than wait for room on the stage's only two workers, which the head's "
                  "end needs");

  g_mutex_init (&sd.lock);
  kd_test_counter_init (&first_done);
  sd.out = g_async_queue_new ();
  sd.per_item = 8;
  pipeline = stage_defer_pipeline (&sd, KD_STAGE_ORDERED, 4);
  kd_dispatcher_set_done_func (kd_pipeline_get_stage (pipeline, 0), count_first_done, &first_done,
                               NULL);

  for (i = 1; i <= 4; i++)
    g_assert_true (kd_pipeline_submit (pipeline, "k0", GUINT_TO_POINTER (i), NULL));
  for (i = 0; i < 4; i++)
    {
      jobs[i] = g_async_queue_timeout_pop (sd.out, KD_TEST_DEADLINE_US);
      g_assert_nonnull (jobs[i]);
      kd_tsan_acquire (jobs[i]);
    }
  /* By item: two workers pushed them in any order. */
  for (i = 0; i < 4; i++)
    while (GPOINTER_TO_UINT (kd_job_get_item (jobs[i])) != i + 1)
      {
        guint to = GPOINTER_TO_UINT (kd_job_get_item (jobs[i])) - 1;
        KdJob *other = jobs[to];

        jobs[to] = jobs[i];
        jobs[i] = other;
      }

  /* Items 4, 3 and 2 emit 8 each (the stage's room is far smaller), and end
   * behind the head. */
  for (i = 3; i >= 1; i--)
    {
      guint item = GPOINTER_TO_UINT (kd_job_get_item (jobs[i]));

      for (j = 1; j <= 8; j++)
        g_assert_true (kd_job_emit (jobs[i], "k0", GUINT_TO_POINTER (item * 10 + j), NULL));
      kd_job_return_success (jobs[i]);
    }
  g_assert_true (kd_test_counter_wait (&first_done, 3));

  for (j = 1; j <= 8; j++)
    g_assert_true (kd_job_emit (jobs[0], "k0", GUINT_TO_POINTER (10 + j), NULL));
  kd_job_return_success (jobs[0]);
  kd_pipeline_close (pipeline);
  kd_pipeline_wait (pipeline);

  /* Item 1's eight, then item 2's, ...: ranks 1 to 32 in order. */
  g_assert_cmpint (sd.received, ==, 32);
  g_assert_cmpint (sd.out_of_order, ==, 0);

  g_object_unref (pipeline);
  g_async_queue_unref (sd.out);
  kd_test_counter_clear (&first_done);
  g_mutex_clear (&sd.lock);
}

/* One stage's deferred jobs, handed to the test through @out. */
typedef struct
{
  GAsyncQueue *out;
  GMutex       lock;
  GArray      *received;   /* the sink's items, in order */
  gint         freed;      /* the stage's item-free calls */
  gboolean     emit_on_retry; /* a second attempt emits 2 on its worker */
} OneStage;

static gboolean
one_stage_handler (KdJob    *job,
                   gpointer  user_data,
                   GError  **error)
{
  OneStage *os = user_data;

  if (kd_job_get_attempt (job) > 1 && os->emit_on_retry)
    return kd_job_emit (job, kd_job_get_key (job), GUINT_TO_POINTER (2), error);
  kd_job_defer (job);
  kd_tsan_release (job);
  g_async_queue_push (os->out, job);
  return TRUE;
}

static void
one_stage_sink (const char *key,
                gpointer    item,
                gpointer    user_data)
{
  OneStage *os = user_data;
  guint n = GPOINTER_TO_UINT (item);

  kd_mutex_lock (&os->lock);
  g_array_append_val (os->received, n);
  kd_mutex_unlock (&os->lock);
}

static OneStage *one_stage_freeing;

static void
one_stage_free (gpointer item)
{
  g_atomic_int_inc (&one_stage_freeing->freed);
}

static KdPipeline *
one_stage_pipeline (OneStage    *os,
                    KdStageMode  mode)
{
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *stage = kd_pipeline_add_stage (pipeline, "only", 2, one_stage_handler, os, NULL);

  g_mutex_init (&os->lock);
  os->out = g_async_queue_new ();
  os->received = g_array_new (FALSE, FALSE, sizeof (guint));
  one_stage_freeing = os;
  kd_pipeline_set_stage_mode (pipeline, stage, mode);
  kd_dispatcher_set_item_free (stage, one_stage_free);
  kd_pipeline_set_sink (pipeline, one_stage_sink, os, NULL);
  return pipeline;
}

static void
one_stage_clear (OneStage *os)
{
  g_async_queue_unref (os->out);
  g_array_unref (os->received);
  g_mutex_clear (&os->lock);
}

static KdJob *
pop_job (GAsyncQueue *out)
{
  KdJob *job = g_async_queue_timeout_pop (out, KD_TEST_DEADLINE_US);

  g_assert_nonnull (job);
  kd_tsan_acquire (job);
  return job;
}

static void
test_stage_deferred_last_cancelled (void)
{
  OneStage os = { 0 };
  KdPipeline *pipeline = one_stage_pipeline (&os, KD_STAGE_ORDERED);
  KdJob *first, *second;

  g_test_summary ("In a pipeline's last stage, ordered, what a deferred job behind its key's "
                  "head emitted before the pipeline was cancelled still reaches the sink, which "
                  "owns it; the stage's item-free frees only the stage's own items");

  g_assert_true (kd_pipeline_submit (pipeline, "k", GUINT_TO_POINTER (1), NULL));
  g_assert_true (kd_pipeline_submit (pipeline, "k", GUINT_TO_POINTER (2), NULL));
  first = pop_job (os.out);
  second = pop_job (os.out);
  if (GPOINTER_TO_UINT (kd_job_get_item (first)) == 2)
    {
      KdJob *swap = first;

      first = second;
      second = swap;
    }

  g_assert_true (kd_job_emit (second, "k", GUINT_TO_POINTER (200), NULL));
  g_cancellable_cancel (kd_pipeline_get_cancellable (pipeline));
  kd_job_return_success (second);
  kd_job_return_success (first);
  kd_pipeline_wait (pipeline);

  g_assert_cmpuint (os.received->len, ==, 1);
  g_assert_cmpuint (g_array_index (os.received, guint, 0), ==, 200);
  g_assert_cmpint (os.freed, ==, 2);

  g_object_unref (pipeline);
  one_stage_clear (&os);
}

typedef struct
{
  KdJob *job;
  guint  from;
  guint  n;
} Emitter;

static gpointer
emit_for_job (gpointer data)
{
  Emitter *e = data;
  guint i;

  for (i = 0; i < e->n; i++)
    g_assert_true (kd_job_emit (e->job, kd_job_get_key (e->job),
                                e->from == 0 ? kd_job_get_item (e->job)
                                             : GUINT_TO_POINTER (e->from + i),
                                NULL));
  return NULL;
}

static void
test_stage_deferred_emitters (void)
{
  OneStage os = { 0 };
  KdPipeline *pipeline = one_stage_pipeline (&os, KD_STAGE_KEYED);
  Emitter own = { NULL, 0, 1 }, many = { NULL, 1000, 1000 };
  GThread *a, *b;
  KdJob *job;

  g_test_summary ("Two threads emit for one deferred stage job at once, one of them the job's "
                  "own item: all of it reaches the sink, and the job's item is handed over, "
                  "not freed by the stage (ThreadSanitizer sees no race on the job)");

  g_assert_true (kd_pipeline_submit (pipeline, "k", GUINT_TO_POINTER (7), NULL));
  job = pop_job (os.out);
  own.job = many.job = job;
  a = g_thread_new ("own", emit_for_job, &own);
  b = g_thread_new ("many", emit_for_job, &many);
  g_thread_join (a);
  g_thread_join (b);
  kd_job_return_success (job);
  kd_pipeline_wait (pipeline);

  g_assert_cmpuint (os.received->len, ==, 1001);
  g_assert_cmpint (os.freed, ==, 0);

  g_object_unref (pipeline);
  one_stage_clear (&os);
}

static void
test_stage_deferred_retry (void)
{
  OneStage os = { 0 };
  KdPipeline *pipeline = one_stage_pipeline (&os, KD_STAGE_ORDERED);
  KdJob *job;

  g_test_summary ("A deferred stage job that emits away and is returned with an error is "
                  "retried after what it emitted went on: its second attempt's emits follow");

  os.emit_on_retry = TRUE;
  kd_dispatcher_set_retry (kd_pipeline_get_stage (pipeline, 0), 3, 0, 0);
  g_assert_true (kd_pipeline_submit (pipeline, "k", GUINT_TO_POINTER (9), NULL));
  job = pop_job (os.out);
  g_assert_true (kd_job_emit (job, "k", GUINT_TO_POINTER (1), NULL));
  kd_job_return_error_literal (job, G_IO_ERROR, G_IO_ERROR_FAILED, "first attempt");
  kd_pipeline_wait (pipeline);

  g_assert_cmpuint (os.received->len, ==, 2);
  g_assert_cmpuint (g_array_index (os.received, guint, 0), ==, 1);
  g_assert_cmpuint (g_array_index (os.received, guint, 1), ==, 2);

  g_object_unref (pipeline);
  one_stage_clear (&os);
}

/* A stage whose handlers run in a main context: odd items emit there and
 * end; even ones are deferred and returned from an idle of the context,
 * which emits first. */
typedef struct
{
  StageDefer   sd;
  GMainContext *context;
  GThread      *context_thread;
  gint          wrong_thread;
  guint         per_key;
} StageContext;

typedef struct
{
  StageContext *sc;
  KdJob        *job;
} Later;

static gboolean
emit_and_return (gpointer data)
{
  Later *later = data;

  emit_two (&later->sc->sd, later->job);
  kd_job_return_success (later->job);
  g_free (later);
  return G_SOURCE_REMOVE;
}

static gboolean
context_stage_handler (KdJob    *job,
                       gpointer  user_data,
                       GError  **error)
{
  StageContext *sc = user_data;
  guint item = GPOINTER_TO_UINT (kd_job_get_item (job));
  Later *later;
  GSource *idle;

  if (g_thread_self () != sc->context_thread)
    sc->wrong_thread++;
  if (item % 2 == 1)
    {
      emit_two (&sc->sd, job);
      return TRUE;
    }
  kd_job_defer (job);
  later = g_new (Later, 1);
  later->sc = sc;
  later->job = job;
  idle = g_idle_source_new ();
  g_source_set_callback (idle, emit_and_return, later, NULL);
  g_source_attach (idle, sc->context);
  g_source_unref (idle);
  return TRUE;
}

static gpointer
submit_stage_items (gpointer data)
{
  KdPipeline *pipeline = data;
  StageContext *sc = g_object_get_data (G_OBJECT (pipeline), "sc");
  guint i, k;

  for (i = 1; i <= sc->per_key; i++)
    for (k = 0; k < STAGE_KEYS; k++)
      {
        g_autofree char *key = g_strdup_printf ("k%u", k);

        g_assert_true (kd_pipeline_submit (pipeline, key, GUINT_TO_POINTER (k * 1000 + i), NULL));
      }
  kd_pipeline_close (pipeline);
  return NULL;
}

static gboolean
all_received (gpointer data)
{
  StageContext *sc = data;

  return g_atomic_int_get (&sc->sd.received) == (gint) (2 * sc->sd.total);
}

static void
test_stage_context (void)
{
  KdStageMode modes[] = { KD_STAGE_ORDERED, KD_STAGE_KEYED };
  guint m;

  g_test_summary ("Two pipeline stages' handlers run in one main context, the first emitting "
                  "there and from the context's idles for the jobs it deferred: the context "
                  "never blocks at the next stage's bound of 4, and each key's emits leave in "
                  "order");

  for (m = 0; m < G_N_ELEMENTS (modes); m++)
    {
      StageContext sc = { { 0 } };
      KdPipeline *pipeline;
      KdDispatcher *first, *second;
      GCancellable *cancellable = g_cancellable_new ();
      GThread *producer;

      g_mutex_init (&sc.sd.lock);
      sc.per_key = kd_test_size (300, 60);
      sc.sd.total = sc.per_key * STAGE_KEYS;
      sc.context = g_main_context_new ();
      sc.context_thread = g_thread_self ();
      g_main_context_push_thread_default (sc.context);

      pipeline = kd_pipeline_new ();
      kd_pipeline_set_cancellable (pipeline, cancellable);
      first = kd_pipeline_add_stage (pipeline, "on-context", 2, context_stage_handler, &sc, NULL);
      kd_pipeline_set_stage_mode (pipeline, first, modes[m]);
      kd_dispatcher_set_capacity (first, 4);
      kd_dispatcher_set_handler_context (first, sc.context);
      /* The next stage's handlers need the context too: nothing of the
       * first stage may block it. */
      second = kd_pipeline_add_stage (pipeline, "passing", 2, pass_own, &sc.sd, NULL);
      kd_dispatcher_set_capacity (second, 4);
      kd_dispatcher_set_handler_context (second, sc.context);
      kd_pipeline_set_sink (pipeline, stage_sink, &sc.sd, NULL);
      g_object_set_data (G_OBJECT (pipeline), "sc", &sc);

      producer = g_thread_new ("producer", submit_stage_items, pipeline);
      g_assert_true (kd_test_iterate_until (sc.context, all_received, &sc));
      g_thread_join (producer);
      kd_pipeline_wait (pipeline);

      g_assert_cmpint (sc.sd.emitted, ==, 2 * sc.sd.total);
      g_assert_cmpint (sc.sd.out_of_order, ==, 0);
      g_assert_cmpint (sc.wrong_thread, ==, 0);

      g_object_unref (pipeline);
      g_main_context_pop_thread_default (sc.context);
      g_main_context_unref (sc.context);
      g_object_unref (cancellable);
      g_mutex_clear (&sc.sd.lock);
    }
}

/* ---- Handlers in a main context ---------------------------------------- */

/* Items: key * 1000 + number within the key (from 1). Items whose number
 * is a multiple of 3 are deferred and returned from an idle of the same
 * context; item numbers in @fail fail their first attempt. */
typedef struct
{
  GMainContext *context;
  GThread      *thread;          /* the context's */
  guint         next[N_KEYS];
  gint          out_of_order;
  gint          wrong_thread;
  gint          ended;
  gint          failed;
  gboolean      fail_first;
} OnContext;

static gboolean
return_later (gpointer data)
{
  kd_job_return_success (data);
  return G_SOURCE_REMOVE;
}

static gboolean
context_handler (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  OnContext *c = user_data;
  guint item = GPOINTER_TO_UINT (kd_job_get_item (job));
  guint key = item / 1000;

  if (g_thread_self () != c->thread)
    c->wrong_thread++;
  if (c->fail_first && kd_job_get_attempt (job) == 1)
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_FAILED, "first attempt");
      return FALSE;
    }
  if (item % 1000 != c->next[key] + 1)
    c->out_of_order++;
  c->next[key] = item % 1000;
  if (item % 3 == 0)
    {
      GSource *idle = g_idle_source_new ();

      kd_job_defer (job);
      g_source_set_callback (idle, return_later, job, NULL);
      g_source_attach (idle, c->context);
      g_source_unref (idle);
    }
  return TRUE;
}

static void
context_done (KdJob        *job,
              const GError *error,
              gpointer      user_data)
{
  OnContext *c = user_data;

  if (g_thread_self () != c->thread)
    g_atomic_int_inc (&c->wrong_thread);
  if (error != NULL)
    g_atomic_int_inc (&c->failed);
  g_atomic_int_inc (&c->ended);
}

static KdDispatcher *
context_dispatcher (OnContext *c,
                    gboolean   fail_first)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (2, context_handler, c, NULL);

  memset (c, 0, sizeof *c);
  c->context = g_main_context_new ();
  c->thread = g_thread_self ();
  c->fail_first = fail_first;
  kd_dispatcher_set_handler_context (dispatcher, c->context);
  /* Done callbacks there too (a job whose return beats its worker ends on
   * the worker, as any deferred job does). */
  kd_dispatcher_set_main_context (dispatcher, c->context);
  kd_dispatcher_set_done_func (dispatcher, context_done, c, NULL);
  g_assert_true (kd_dispatcher_get_handler_context (dispatcher) == c->context);
  if (fail_first)
    kd_dispatcher_set_retry (dispatcher, 2, 0, 0);
  return dispatcher;
}

static void
submit_per_key (KdDispatcher *dispatcher,
                guint         n_per_key)
{
  guint i, k;

  for (i = 1; i <= n_per_key; i++)
    for (k = 0; k < N_KEYS; k++)
      {
        g_autofree char *key = g_strdup_printf ("k%u", k);

        g_assert_true (kd_dispatcher_submit (dispatcher, key, GUINT_TO_POINTER (k * 1000 + i), NULL));
      }
}

static void
test_context_handlers (void)
{
  OnContext c;
  KdDispatcher *dispatcher = context_dispatcher (&c, FALSE);
  guint n_per_key = 50, total = N_KEYS * n_per_key;
  KdStats stats;

  g_test_summary ("With a handler context, every handler runs in that context's thread, each "
                  "key's jobs in order, and handlers there may defer their jobs and return them "
                  "from the context later; every job ends once");

  submit_per_key (dispatcher, n_per_key);
  while (g_atomic_int_get (&c.ended) < (gint) total)
    g_main_context_iteration (c.context, TRUE);
  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpint (c.wrong_thread, ==, 0);
  g_assert_cmpint (c.out_of_order, ==, 0);
  g_assert_cmpuint (stats.completed, ==, total);
  g_assert_cmpuint (stats.live_keys, ==, 0);
  g_object_unref (dispatcher);
  g_assert_cmpint (c.ended, ==, (gint) total);
  g_main_context_unref (c.context);
}

static void
test_context_retry (void)
{
  OnContext c;
  KdDispatcher *dispatcher = context_dispatcher (&c, TRUE);
  guint n_per_key = 10, total = N_KEYS * n_per_key;
  KdStats stats;

  g_test_summary ("A handler in the context that fails is retried by the failure policy, in its "
                  "key's order; a wait on the thread that can run the context runs it");

  submit_per_key (dispatcher, n_per_key);
  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpint (c.out_of_order, ==, 0);
  g_assert_cmpint (c.failed, ==, 0);
  g_assert_cmpuint (stats.completed, ==, total);
  g_assert_cmpuint (stats.retried, ==, total);
  g_object_unref (dispatcher);
  g_assert_cmpint (c.ended, ==, (gint) total);
  g_main_context_unref (c.context);
}

static void
test_context_last_unref (void)
{
  OnContext c;
  KdDispatcher *dispatcher = context_dispatcher (&c, FALSE);
  guint n_per_key = 20, total = N_KEYS * n_per_key;

  g_test_summary ("The last unref on the thread that can run the handler context (nobody runs "
                  "it) runs it itself until every job ended, rather than waiting for itself");

  submit_per_key (dispatcher, n_per_key);
  g_object_unref (dispatcher);
  g_assert_cmpint (c.ended, ==, (gint) total);
  g_assert_cmpint (c.out_of_order, ==, 0);
  g_assert_cmpint (c.wrong_thread, ==, 0);
  g_main_context_unref (c.context);
}

static gpointer
emit_from_thread (gpointer data)
{
  return GINT_TO_POINTER (kd_job_emit (data, NULL, GUINT_TO_POINTER (1), NULL));
}

static gboolean
emit_elsewhere_handler (KdJob    *job,
                        gpointer  user_data,
                        GError  **error)
{
  gboolean *emitted = user_data;

  *emitted = GPOINTER_TO_INT (g_thread_join (g_thread_new ("emitter", emit_from_thread, job)));
  return TRUE;
}

static void
emit_in_done (KdJob        *job,
              const GError *error,
              gpointer      user_data)
{
  gboolean *emitted = user_data;

  *emitted = kd_job_emit (job, NULL, GUINT_TO_POINTER (2), NULL);
}

static void
test_stage_emit_refused (void)
{
  gboolean from_thread = TRUE, from_done = TRUE;
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *stage;

  g_test_summary ("Emits nothing would pass on are refused with a critical and FALSE, the "
                  "item staying the caller's: from another thread while a handler that did "
                  "not defer its job runs, on a worker or in a handler context, and from the "
                  "done callback of a job that ended");

  stage = kd_pipeline_add_stage (pipeline, "only", 1, emit_elsewhere_handler, &from_thread, NULL);
  kd_dispatcher_set_done_func (stage, emit_in_done, &from_done, NULL);
  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*another thread while the job's "
                         "handler runs*");
  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*returned without deferring*");
  g_assert_true (kd_pipeline_submit (pipeline, NULL, NULL, NULL));
  kd_pipeline_wait (pipeline);
  g_test_assert_expected_messages ();
  g_assert_false (from_thread);
  g_assert_false (from_done);
  g_object_unref (pipeline);

  /* The same from another thread while a handler in a handler context runs
   * (the pipeline's wait runs the context). */
  from_thread = TRUE;
  pipeline = kd_pipeline_new ();
  stage = kd_pipeline_add_stage (pipeline, "on-context", 1, emit_elsewhere_handler, &from_thread,
                                 NULL);
  kd_dispatcher_set_handler_context (stage, g_main_context_default ());
  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*another thread while the job's "
                         "handler runs*");
  g_assert_true (kd_pipeline_submit (pipeline, NULL, NULL, NULL));
  kd_pipeline_wait (pipeline);
  g_test_assert_expected_messages ();
  g_assert_false (from_thread);
  g_object_unref (pipeline);
}

/* In a handler context, the handler defers its job, returns it at once
 * (emitting first, in a stage), and reads it afterwards, before it
 * returns: the job must still be its. */
typedef struct
{
  gint ended;
  gint wrong_item;
} EarlyReturn;

static gboolean
return_early_handler (KdJob    *job,
                      gpointer  user_data,
                      GError  **error)
{
  EarlyReturn *er = user_data;
  gpointer item = kd_job_get_item (job);

  kd_job_defer (job);
  if (kd_job_get_key (job) != NULL && g_str_has_prefix (kd_job_get_key (job), "stage"))
    g_assert_true (kd_job_emit (job, kd_job_get_key (job), item, NULL));
  kd_job_return_success (job);
  if (kd_job_get_key (job) == NULL || kd_job_get_attempt (job) != 1)
    er->wrong_item++;
  return TRUE;
}

static void
count_early_ended (KdJob        *job,
                   const GError *error,
                   gpointer      user_data)
{
  EarlyReturn *er = user_data;

  if (error == NULL)
    g_atomic_int_inc (&er->ended);
}

static gboolean
early_all_ended (gpointer data)
{
  return g_atomic_int_get (&((EarlyReturn *) data)->ended) == 40;
}

static void
test_context_returned_in_handler (void)
{
  GMainContext *context = g_main_context_new ();
  EarlyReturn er = { 0 }, stage_er = { 0 };
  KdDispatcher *d;
  KdPipeline *pipeline;
  KdDispatcher *stage;
  guint i;

  g_test_summary ("A handler in a handler context that defers its job and returns it at once "
                  "still has the job until it returns, on a dispatcher and in a pipeline stage "
                  "(the job ended, and was freed, while the handler ran)");

  g_main_context_push_thread_default (context);
  d = kd_dispatcher_new (2, return_early_handler, &er, NULL);
  kd_dispatcher_set_handler_context (d, context);
  kd_dispatcher_set_done_func (d, count_early_ended, &er, NULL);
  pipeline = kd_pipeline_new ();
  stage = kd_pipeline_add_stage (pipeline, "early", 2, return_early_handler, &stage_er, NULL);
  kd_dispatcher_set_handler_context (stage, context);
  kd_dispatcher_set_done_func (stage, count_early_ended, &stage_er, NULL);

  for (i = 0; i < 40; i++)
    {
      g_autofree char *key = g_strdup_printf ("k%u", i % 4);
      g_autofree char *stage_key = g_strdup_printf ("stage%u", i % 4);

      g_assert_true (kd_dispatcher_submit (d, key, GUINT_TO_POINTER (i + 1), NULL));
      g_assert_true (kd_pipeline_submit (pipeline, stage_key, GUINT_TO_POINTER (i + 1), NULL));
    }
  g_assert_true (kd_test_iterate_until (context, early_all_ended, &er));
  g_assert_true (kd_test_iterate_until (context, early_all_ended, &stage_er));
  kd_dispatcher_wait (d);
  kd_pipeline_wait (pipeline);
  g_assert_cmpint (er.wrong_item, ==, 0);
  g_assert_cmpint (stage_er.wrong_item, ==, 0);

  g_object_unref (pipeline);
  g_object_unref (d);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/defer/worker-free", test_worker_free);
  g_test_add_func ("/kd/defer/returned-from-thread", test_returned_from_thread);
  g_test_add_func ("/kd/defer/retry", test_retry);
  g_test_add_func ("/kd/defer/key-held", test_key_held);
  g_test_add_func ("/kd/defer/bound", test_bound);
  g_test_add_func ("/kd/defer/returned-in-handler", test_returned_in_handler);
  g_test_add_func ("/kd/defer/returned-while-handler-runs", test_returned_while_handler_runs);
  g_test_add_func ("/kd/defer/cancel", test_cancel);
  g_test_add_func ("/kd/defer/last-unref-warns", test_last_unref_warns);
  g_test_add_func ("/kd/defer/last-unref-while-returning", test_last_unref_while_returning);
  g_test_add_func ("/kd/defer/stage-deferred", test_stage_deferred);
  g_test_add_func ("/kd/defer/stage-deferred-cancel", test_stage_deferred_cancel);
  g_test_add_func ("/kd/defer/stage-deferred-overrun", test_stage_deferred_overrun);
  g_test_add_func ("/kd/defer/stage-deferred-last-cancelled", test_stage_deferred_last_cancelled);
  g_test_add_func ("/kd/defer/stage-deferred-emitters", test_stage_deferred_emitters);
  g_test_add_func ("/kd/defer/stage-deferred-retry", test_stage_deferred_retry);
  g_test_add_func ("/kd/defer/stage-emit-refused", test_stage_emit_refused);
  g_test_add_func ("/kd/defer/stage-context", test_stage_context);
  g_test_add_func ("/kd/defer/context-handlers", test_context_handlers);
  g_test_add_func ("/kd/defer/context-retry", test_context_retry);
  g_test_add_func ("/kd/defer/context-last-unref", test_context_last_unref);
  g_test_add_func ("/kd/defer/context-returned-in-handler", test_context_returned_in_handler);

  return g_test_run ();
}
