/* test-failure.c: retry with backoff, dead letters, parked keys
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-test-util.h"

#define FAIL_ALWAYS G_MAXUINT
#define LONG_DELAY_US G_MAXINT64   /* never, and no overflow */

/* An item: which key and place it has, and how many of its attempts fail. */
typedef struct
{
  guint key;
  guint seq;
  guint failing_attempts;
} Item;

/* What one handler run or one ending saw. */
typedef struct
{
  guint  key;
  guint  seq;
  guint  attempt;
  gint64 time;
  gint   error_code;   /* -1: none */
} Event;

typedef struct
{
  GMutex         lock;
  GArray        *runs;          /* Event, in the order handlers ran */
  GArray        *ends;          /* Event, in the order done callbacks ran */
  GArray        *dead;          /* Event, dead letters */
  guint          freed;
  gint           running[8];    /* per key: handlers running now */
  gint           overlaps;      /* a key ran two handlers at once */
  KdTestCounter  ended;
  KdDispatcher  *dispatcher;    /* for resume/drop from a done callback */
  gboolean       resume_in_done;
  gboolean       resume_in_done_result;
  gboolean       drop_in_done;         /* ...then submit the key's next job */
  KdTestGate    *gate;                 /* if set, jobs with seq 0 wait here */
} Log;

static Item *
item_new (guint key,
          guint seq,
          guint failing_attempts)
{
  Item *item = g_new (Item, 1);

  item->key = key;
  item->seq = seq;
  item->failing_attempts = failing_attempts;
  return item;
}

static void
log_event (Log    *log,
           GArray *events,
           KdJob  *job,
           const GError *error)
{
  Item *item = kd_job_get_item (job);
  Event event = { item->key, item->seq, kd_job_get_attempt (job), g_get_monotonic_time (),
                  error != NULL ? error->code : -1 };

  kd_mutex_lock (&log->lock);
  g_array_append_val (events, event);
  kd_mutex_unlock (&log->lock);
}

static gboolean
failing_handler (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  Log *log = user_data;
  Item *item = kd_job_get_item (job);
  gboolean keyed = kd_job_get_key (job) != NULL;
  gboolean ok;

  if (keyed && g_atomic_int_add (&log->running[item->key], 1) != 0)
    g_atomic_int_inc (&log->overlaps);

  log_event (log, log->runs, job, NULL);
  if (item->seq == 0 && log->gate != NULL)
    g_assert_true (kd_test_gate_wait (log->gate));

  ok = kd_job_get_attempt (job) > item->failing_attempts;
  if (!ok)
    g_set_error (error, G_IO_ERROR, G_IO_ERROR_FAILED, "item %u/%u failed on attempt %u",
                 item->key, item->seq, kd_job_get_attempt (job));

  if (keyed)
    g_atomic_int_add (&log->running[item->key], -1);
  return ok;
}

static void
log_done (KdJob        *job,
          const GError *error,
          gpointer      user_data)
{
  Log *log = user_data;

  log_event (log, log->ends, job, error);
  if (log->resume_in_done && error != NULL && error->code == G_IO_ERROR_FAILED)
    log->resume_in_done_result = kd_dispatcher_resume_key (log->dispatcher,
                                                           kd_job_get_key (job));
  if (log->drop_in_done && error != NULL && error->code == G_IO_ERROR_FAILED)
    {
      Item *item = kd_job_get_item (job);

      g_assert_true (kd_dispatcher_drop_key (log->dispatcher, kd_job_get_key (job)));
      g_assert_true (kd_dispatcher_try_submit (log->dispatcher, kd_job_get_key (job),
                                               item_new (item->key, 100, 0), NULL));
    }
  kd_test_counter_add (&log->ended, 1);
}

static void
log_dead_letter (KdJob        *job,
                 const GError *error,
                 gpointer      user_data)
{
  Log *log = user_data;

  g_assert_true (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_FAILED));
  log_event (log, log->dead, job, error);
}

static Log *log_for_free;

static void
item_free (gpointer data)
{
  kd_mutex_lock (&log_for_free->lock);
  log_for_free->freed++;
  kd_mutex_unlock (&log_for_free->lock);
  g_free (data);
}

static KdDispatcher *
log_dispatcher_new (Log   *log,
                    guint  n_workers)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (n_workers, failing_handler, log, NULL);

  memset (log, 0, sizeof *log);
  g_mutex_init (&log->lock);
  log->runs = g_array_new (FALSE, FALSE, sizeof (Event));
  log->ends = g_array_new (FALSE, FALSE, sizeof (Event));
  log->dead = g_array_new (FALSE, FALSE, sizeof (Event));
  kd_test_counter_init (&log->ended);
  log->dispatcher = dispatcher;
  log_for_free = log;

  kd_dispatcher_set_done_func (dispatcher, log_done, log, NULL);
  kd_dispatcher_set_dead_letter_func (dispatcher, log_dead_letter, log, NULL);
  kd_dispatcher_set_item_free (dispatcher, item_free);

  return dispatcher;
}

static void
log_clear (Log *log)
{
  g_array_unref (log->runs);
  g_array_unref (log->ends);
  g_array_unref (log->dead);
  kd_test_counter_clear (&log->ended);
  g_mutex_clear (&log->lock);
}

static void
submit (KdDispatcher *dispatcher,
        gboolean      keyed,
        guint         key,
        guint         seq,
        guint         failing_attempts)
{
  char name[16];

  g_snprintf (name, sizeof name, "key-%u", key);
  g_assert_true (kd_dispatcher_submit (dispatcher, keyed ? name : NULL,
                                       item_new (key, seq, failing_attempts), NULL));
}

/* The seqs of @key's events, in order, as "0 0 1 2". */
static char *
seqs_of (GArray *events,
         guint   key)
{
  GString *seqs = g_string_new (NULL);
  guint i;

  for (i = 0; i < events->len; i++)
    {
      Event *event = &g_array_index (events, Event, i);

      if (event->key == key)
        g_string_append_printf (seqs, "%s%u", seqs->len > 0 ? " " : "", event->seq);
    }
  return g_string_free (seqs, FALSE);
}

static void
assert_seqs (GArray     *events,
             guint       key,
             const char *expected)
{
  char *seqs = seqs_of (events, key);

  g_assert_cmpstr (seqs, ==, expected);
  g_free (seqs);
}

/* Waiting for a counter: a done callback runs before its job is counted as
 * ended, so a test that saw the callback waits for the count through the
 * counters' notify, which comes in this thread's main context. */
typedef struct
{
  KdDispatcher *dispatcher;
  gsize         offset;    /* of a guint64 in KdStats */
  guint64       value;
} StatWait;

static gboolean
stat_reached (gpointer user_data)
{
  StatWait *wait = user_data;
  KdStats stats;

  kd_dispatcher_get_stats (wait->dispatcher, &stats);
  return G_STRUCT_MEMBER (guint64, &stats, wait->offset) == wait->value;
}

#define wait_for_stat(dispatcher, field, expected) \
  G_STMT_START { \
    StatWait wait_ = { dispatcher, G_STRUCT_OFFSET (KdStats, field), expected }; \
    g_assert_true (kd_test_iterate_until (NULL, stat_reached, &wait_)); \
  } G_STMT_END

static void
test_retry_then_success (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 4);
  gint64 initial = 20 * G_TIME_SPAN_MILLISECOND, max = 30 * G_TIME_SPAN_MILLISECOND;
  guint i, n_runs_of_0 = 0;
  gint64 last_time = 0;
  KdStats stats;

  g_test_summary ("A failing keyed job runs again after a doubling backoff, keeps "
                  "its place, and its key's later jobs wait behind it; it ends "
                  "completed, without a dead letter");

  kd_dispatcher_set_retry (dispatcher, 5, initial, max);

  /* Job 0 of key 1 fails three times, then completes. */
  submit (dispatcher, TRUE, 1, 0, 3);
  for (i = 1; i < 10; i++)
    submit (dispatcher, TRUE, 1, i, 0);
  kd_dispatcher_wait (dispatcher);

  assert_seqs (log.runs, 1, "0 0 0 0 1 2 3 4 5 6 7 8 9");
  assert_seqs (log.ends, 1, "0 1 2 3 4 5 6 7 8 9");
  g_assert_cmpuint (log.dead->len, ==, 0);
  g_assert_cmpint (log.overlaps, ==, 0);

  /* Attempts 1..4; the waits are at least 20, 30 (40 capped), 30 ms. */
  for (i = 0; i < log.runs->len; i++)
    {
      Event *event = &g_array_index (log.runs, Event, i);
      gint64 min_wait[] = { 0, 0, initial, max, max };

      if (event->seq != 0)
        continue;
      n_runs_of_0++;
      g_assert_cmpuint (event->attempt, ==, n_runs_of_0);
      if (event->attempt > 1)
        g_assert_cmpint (event->time - last_time, >=, min_wait[event->attempt]);
      last_time = event->time;
    }
  g_assert_cmpuint (n_runs_of_0, ==, 4);
  g_assert_cmpint (g_array_index (log.ends, Event, 0).attempt, ==, 4);
  g_assert_cmpint (g_array_index (log.ends, Event, 0).error_code, ==, -1);

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, 10);
  g_assert_cmpuint (stats.failed, ==, 0);
  g_assert_cmpuint (stats.retried, ==, 3);
  g_assert_cmpuint (stats.pending, ==, 0);
  g_assert_cmpuint (stats.live_keys, ==, 0);

  g_object_unref (dispatcher);
  g_assert_cmpuint (log.freed, ==, 10);
  log_clear (&log);
}

static void
test_retry_exhausted (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);
  Event *dead;
  KdStats stats;
  guint i;

  g_test_summary ("A job that fails on every attempt ends failed after the last "
                  "one, reaches the dead-letter function and the done callback "
                  "once with the last error, and its key continues");

  kd_dispatcher_set_retry (dispatcher, 3, 0, 0);

  submit (dispatcher, TRUE, 2, 0, 0);
  submit (dispatcher, TRUE, 2, 1, FAIL_ALWAYS);
  submit (dispatcher, TRUE, 2, 2, 0);
  for (i = 0; i < 20; i++)
    submit (dispatcher, FALSE, 3, i, i % 2 == 0 ? 2 : FAIL_ALWAYS);
  kd_dispatcher_wait (dispatcher);

  assert_seqs (log.runs, 2, "0 1 1 1 2");
  assert_seqs (log.ends, 2, "0 1 2");
  g_assert_cmpuint (log.dead->len, ==, 11);
  for (i = 0; i < log.dead->len; i++)
    {
      dead = &g_array_index (log.dead, Event, i);
      g_assert_cmpuint (dead->attempt, ==, 3);
      g_assert_true (dead->key == 2 || dead->seq % 2 == 1);
    }
  for (i = 0; i < log.ends->len; i++)
    {
      Event *end = &g_array_index (log.ends, Event, i);
      gboolean fails = end->key == 2 ? end->seq == 1 : end->seq % 2 == 1;

      g_assert_cmpint (end->error_code, ==, fails ? G_IO_ERROR_FAILED : -1);
      g_assert_cmpuint (end->attempt, ==, fails || end->key == 3 ? 3 : 1);
    }

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, 12);
  g_assert_cmpuint (stats.failed, ==, 11);
  g_assert_cmpuint (stats.retried, ==, 2 + 10 * 2 + 10 * 2);
  g_assert_cmpuint (stats.submitted, ==, 23);

  g_object_unref (dispatcher);
  g_assert_cmpuint (log.freed, ==, 23);
  log_clear (&log);
}

static void
test_retry_holds_no_worker (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 1);
  KdStats stats;
  guint i;

  g_test_summary ("A waiting retry holds no worker: with one worker other keys and "
                  "unkeyed jobs run while it waits; cancelling ends it and the "
                  "jobs behind it at once, cancelled");

  kd_dispatcher_set_retry (dispatcher, 3, LONG_DELAY_US, LONG_DELAY_US);

  submit (dispatcher, TRUE, 1, 0, FAIL_ALWAYS);
  submit (dispatcher, TRUE, 1, 1, 0);
  submit (dispatcher, FALSE, 5, 0, FAIL_ALWAYS);
  for (i = 0; i < 5; i++)
    submit (dispatcher, TRUE, 2, i, 0);
  /* Both failing jobs ran once and wait for their retries: key 1's and
   * the unkeyed one, which may run after key 2's jobs. */
  wait_for_stat (dispatcher, completed, 5);
  wait_for_stat (dispatcher, retried, 2);

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, 5);
  g_assert_cmpuint (stats.pending, ==, 3);
  g_assert_cmpuint (stats.retried, ==, 2);
  g_assert_cmpuint (stats.running, ==, 0);
  kd_mutex_lock (&log.lock);
  assert_seqs (log.ends, 2, "0 1 2 3 4");
  assert_seqs (log.runs, 1, "0");
  kd_mutex_unlock (&log.lock);

  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  kd_dispatcher_wait (dispatcher);

  assert_seqs (log.runs, 1, "0");
  assert_seqs (log.ends, 1, "0 1");
  for (i = 0; i < log.ends->len; i++)
    {
      Event *end = &g_array_index (log.ends, Event, i);

      if (end->key != 2)
        g_assert_cmpint (end->error_code, ==, G_IO_ERROR_CANCELLED);
    }
  g_assert_cmpuint (log.dead->len, ==, 0);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.cancelled, ==, 3);
  g_assert_cmpuint (stats.pending, ==, 0);

  g_object_unref (dispatcher);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  g_assert_cmpuint (log.freed, ==, 8);
  log_clear (&log);
}

static void
test_retry_then_unref (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);

  g_test_summary ("The last unref waits for a retry that is due soon, which then "
                  "completes; the timer thread goes with the workers");

  kd_dispatcher_set_retry (dispatcher, 2, 10 * G_TIME_SPAN_MILLISECOND,
                           10 * G_TIME_SPAN_MILLISECOND);
  submit (dispatcher, TRUE, 1, 0, 1);
  submit (dispatcher, FALSE, 1, 1, 1);
  g_object_unref (dispatcher);

  g_assert_cmpuint (log.ends->len, ==, 2);
  g_assert_cmpint (g_array_index (log.ends, Event, 0).error_code, ==, -1);
  g_assert_cmpint (g_array_index (log.ends, Event, 1).error_code, ==, -1);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  g_assert_cmpuint (log.freed, ==, 2);
  log_clear (&log);
}

static void
test_park_then_resume (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);
  KdStats stats;
  char **parked;
  guint i;

  g_test_summary ("With the park policy a key whose job failed parks: its later "
                  "jobs, and new ones, stay queued and untouched while other keys "
                  "run, until resume runs them in order");

  g_assert_cmpint (kd_dispatcher_get_failure_policy (dispatcher), ==, KD_FAILURE_CONTINUE);
  kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  g_assert_cmpint (kd_dispatcher_get_failure_policy (dispatcher), ==, KD_FAILURE_PARK);

  for (i = 0; i < 10; i++)
    submit (dispatcher, TRUE, 1, i, i == 3 ? 1 : 0);
  /* The key parked before job 3 ended, so once 4 jobs ended it is parked. */
  g_assert_true (kd_test_counter_wait (&log.ended, 4));
  parked = kd_dispatcher_list_parked_keys (dispatcher);
  g_assert_cmpstrv (parked, ((const char *[]) { "key-1", NULL }));
  g_strfreev (parked);

  /* New jobs of the parked key queue; other keys run. */
  submit (dispatcher, TRUE, 1, 10, 0);
  submit (dispatcher, TRUE, 1, 11, 0);
  for (i = 0; i < 5; i++)
    submit (dispatcher, TRUE, 2, i, 0);
  wait_for_stat (dispatcher, pending, 8);

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.parked_keys, ==, 1);
  g_assert_cmpuint (stats.pending, ==, 8);
  g_assert_cmpuint (stats.failed, ==, 1);
  g_assert_cmpuint (stats.live_keys, >=, 1);
  assert_seqs (log.runs, 1, "0 1 2 3");
  g_assert_false (kd_dispatcher_resume_key (dispatcher, "key-2"));
  g_assert_false (kd_dispatcher_drop_key (dispatcher, "key-9"));

  g_assert_true (kd_dispatcher_resume_key (dispatcher, "key-1"));
  g_assert_false (kd_dispatcher_resume_key (dispatcher, "key-1"));
  kd_dispatcher_wait (dispatcher);

  assert_seqs (log.runs, 1, "0 1 2 3 4 5 6 7 8 9 10 11");
  assert_seqs (log.ends, 1, "0 1 2 3 4 5 6 7 8 9 10 11");
  g_assert_cmpint (log.overlaps, ==, 0);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.parked_keys, ==, 0);
  g_assert_cmpuint (stats.live_keys, ==, 0);
  g_assert_cmpuint (stats.completed, ==, 16);
  parked = kd_dispatcher_list_parked_keys (dispatcher);
  g_assert_cmpuint (g_strv_length (parked), ==, 0);
  g_strfreev (parked);

  g_object_unref (dispatcher);
  g_assert_cmpuint (log.freed, ==, 17);
  log_clear (&log);
}

static void
test_park_then_drop (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);
  KdStats stats;
  guint i;

  g_test_summary ("Dropping a parked key ends its queued jobs cancelled, in order, "
                  "without running them; its later jobs run normally");

  kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  kd_dispatcher_set_retry (dispatcher, 2, 0, 0);

  for (i = 0; i < 6; i++)
    submit (dispatcher, TRUE, 1, i, i == 0 ? FAIL_ALWAYS : 0);
  g_assert_true (kd_test_counter_wait (&log.ended, 1));
  g_assert_true (kd_dispatcher_drop_key (dispatcher, "key-1"));
  g_assert_false (kd_dispatcher_drop_key (dispatcher, "key-1"));
  kd_dispatcher_wait (dispatcher);

  assert_seqs (log.runs, 1, "0 0");
  assert_seqs (log.ends, 1, "0 1 2 3 4 5");
  g_assert_cmpint (g_array_index (log.ends, Event, 0).error_code, ==, G_IO_ERROR_FAILED);
  for (i = 1; i < 6; i++)
    {
      g_assert_cmpint (g_array_index (log.ends, Event, i).error_code, ==, G_IO_ERROR_CANCELLED);
      g_assert_cmpuint (g_array_index (log.ends, Event, i).attempt, ==, 0);
    }
  g_assert_cmpuint (log.dead->len, ==, 1);

  /* The key is an ordinary key again. */
  submit (dispatcher, TRUE, 1, 6, 0);
  kd_dispatcher_wait (dispatcher);
  assert_seqs (log.runs, 1, "0 0 6");

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.cancelled, ==, 5);
  g_assert_cmpuint (stats.failed, ==, 1);
  g_assert_cmpuint (stats.completed, ==, 1);
  g_assert_cmpuint (stats.live_keys, ==, 0);
  g_assert_cmpuint (stats.parked_keys, ==, 0);

  g_object_unref (dispatcher);
  g_assert_cmpuint (log.freed, ==, 7);
  log_clear (&log);
}

static void
test_park_resume_in_done (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);
  guint i;

  g_test_summary ("The failed job's done callback sees its key parked and may "
                  "resume it; the key's next job starts after that callback");

  kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  log.resume_in_done = TRUE;

  for (i = 0; i < 200; i++)
    submit (dispatcher, TRUE, 1, i, i % 10 == 0 ? 1 : 0);
  kd_dispatcher_wait (dispatcher);

  g_assert_true (log.resume_in_done_result);
  g_assert_cmpuint (log.ends->len, ==, 200);
  for (i = 0; i < 200; i++)
    {
      g_assert_cmpuint (g_array_index (log.runs, Event, i).seq, ==, i);
      g_assert_cmpuint (g_array_index (log.ends, Event, i).seq, ==, i);
    }
  g_assert_cmpint (log.overlaps, ==, 0);

  g_object_unref (dispatcher);
  log_clear (&log);
}

static void
test_park_drop_in_done (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);
  KdTestGate gate;
  guint i;

  g_test_summary ("Dropping a key from its failed job's done callback drops the "
                  "jobs queued then, not one submitted right after the drop");

  kd_test_gate_init (&gate);
  kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  log.drop_in_done = TRUE;
  log.gate = &gate;     /* jobs 1-3 are queued before job 0 fails */
  for (i = 0; i < 4; i++)
    submit (dispatcher, TRUE, 1, i, i == 0 ? 1 : 0);
  kd_test_gate_open (&gate);
  /* Job 0's done callback submitted job 100 before job 0 ended: a second
   * wait() sees it. */
  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_wait (dispatcher);

  assert_seqs (log.runs, 1, "0 100");
  assert_seqs (log.ends, 1, "0 1 2 3 100");
  g_assert_cmpint (g_array_index (log.ends, Event, 4).error_code, ==, -1);
  for (i = 1; i < 4; i++)
    g_assert_cmpint (g_array_index (log.ends, Event, i).error_code, ==, G_IO_ERROR_CANCELLED);

  g_object_unref (dispatcher);
  g_assert_cmpuint (log.freed, ==, 5);
  log_clear (&log);
  kd_test_gate_clear (&gate);
}

static gpointer
wait_thread (gpointer data)
{
  kd_dispatcher_wait (data);
  return NULL;
}

static void
test_retry_waits_race (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);
  GThread *threads[3];
  guint i;

  g_test_summary ("Several threads waiting on a closed dispatcher whose timer ran "
                  "retries, while it is cancelled, all return; nothing is freed twice");

  kd_dispatcher_set_retry (dispatcher, 2, 0, 0);
  for (i = 0; i < 20; i++)
    submit (dispatcher, i % 2 == 0, 1, i, 1);
  kd_dispatcher_close (dispatcher);
  for (i = 0; i < G_N_ELEMENTS (threads); i++)
    threads[i] = g_thread_new ("waiter", wait_thread, dispatcher);
  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  kd_dispatcher_wait (dispatcher);
  for (i = 0; i < G_N_ELEMENTS (threads); i++)
    g_thread_join (threads[i]);

  g_assert_cmpuint (log.ends->len, ==, 20);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  g_object_unref (dispatcher);
  g_assert_cmpuint (log.freed, ==, 20);
  log_clear (&log);
}

static void
test_park_cancel_and_unref (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);
  KdStats stats;
  guint i, k;

  g_test_summary ("Cancelling drops every parked key, so wait() returns with every "
                  "job ended; the last unref does the same without a cancel");

  kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  for (k = 0; k < 4; k++)
    for (i = 0; i < 5; i++)
      submit (dispatcher, TRUE, k, i, i == 0 ? 1 : 0);
  g_assert_true (kd_test_counter_wait (&log.ended, 4));
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.parked_keys, ==, 4);

  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.parked_keys, ==, 0);
  g_assert_cmpuint (stats.cancelled, ==, 16);
  g_assert_cmpuint (stats.failed, ==, 4);
  g_assert_cmpuint (stats.pending, ==, 0);
  g_assert_cmpuint (stats.live_keys, ==, 0);
  g_object_unref (dispatcher);
  g_assert_cmpuint (log.freed, ==, 20);
  log_clear (&log);

  /* No cancel: the last unref drops them. Key 0 parks with no job left. */
  dispatcher = log_dispatcher_new (&log, 2);
  kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  submit (dispatcher, TRUE, 0, 0, 1);
  for (i = 0; i < 5; i++)
    submit (dispatcher, TRUE, 1, i, i == 0 ? 1 : 0);
  g_assert_true (kd_test_counter_wait (&log.ended, 2));
  g_object_unref (dispatcher);
  g_assert_cmpuint (log.ends->len, ==, 6);
  assert_seqs (log.ends, 1, "0 1 2 3 4");
  assert_seqs (log.runs, 1, "0");
  g_assert_cmpuint (log.freed, ==, 6);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  log_clear (&log);
}

/* Key state across a park: the one the failed job used is the one the
 * resumed jobs use; an empty parked key's state is freed when it goes. */
typedef struct
{
  gint made;
  gint freed;
  gint live;
  gint max_live;
  /* If set, state_free() calls it before it frees */
  void (*on_free) (void);
} States;

static States states;

static gpointer
state_new (const char *key,
           gpointer    user_data)
{
  gint live = g_atomic_int_add (&states.live, 1) + 1;
  gint max;

  g_atomic_int_inc (&states.made);
  do
    max = g_atomic_int_get (&states.max_live);
  while (live > max && !g_atomic_int_compare_and_exchange (&states.max_live, max, live));
  return g_strdup (key);
}

static void
state_free (gpointer state)
{
  if (states.on_free != NULL)
    states.on_free ();
  g_atomic_int_add (&states.live, -1);
  g_atomic_int_inc (&states.freed);
  g_free (state);
}

static void
test_park_key_state (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);

  g_test_summary ("A parked key keeps its state until it runs empty after resuming; "
                  "an empty parked key's state is freed once, when it is resumed "
                  "or dropped");

  memset (&states, 0, sizeof states);
  kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  kd_dispatcher_set_key_state_funcs (dispatcher, state_new, state_free, NULL, NULL);

  submit (dispatcher, TRUE, 1, 0, 1);
  submit (dispatcher, TRUE, 1, 1, 0);
  submit (dispatcher, TRUE, 2, 0, 1);   /* parks with no job left */
  submit (dispatcher, TRUE, 3, 0, 1);   /* parks with no job left */
  wait_for_stat (dispatcher, pending, 1);
  g_assert_cmpint (g_atomic_int_get (&states.made), ==, 3);
  g_assert_cmpint (g_atomic_int_get (&states.freed), ==, 0);

  g_assert_true (kd_dispatcher_resume_key (dispatcher, "key-2"));
  g_assert_cmpint (g_atomic_int_get (&states.freed), ==, 1);
  g_assert_true (kd_dispatcher_drop_key (dispatcher, "key-3"));
  g_assert_cmpint (g_atomic_int_get (&states.freed), ==, 2);

  g_assert_true (kd_dispatcher_resume_key (dispatcher, "key-1"));
  kd_dispatcher_wait (dispatcher);
  g_assert_cmpint (states.made, ==, 3);
  g_assert_cmpint (states.freed, ==, 3);

  g_object_unref (dispatcher);
  log_clear (&log);
}

/* A producer that submits to a parked key while it is being resumed. */
static struct
{
  KdDispatcher *dispatcher;
  guint         live_keys;
  gboolean      done;
} racing_producer;

static void
submit_while_freeing (void)
{
  KdStats stats;

  if (racing_producer.done)
    return;
  racing_producer.done = TRUE;
  kd_dispatcher_get_stats (racing_producer.dispatcher, &stats);
  racing_producer.live_keys = stats.live_keys;
  submit (racing_producer.dispatcher, TRUE, 1, 1, 0);
}

static void
test_park_key_state_resume_race (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);
  KdStats stats;

  g_test_summary ("An empty parked key's state is freed before the key leaves the "
                  "table, so a job submitted while it is resumed runs with a new "
                  "state once the old one is gone: a key never has two states");

  memset (&states, 0, sizeof states);
  memset (&racing_producer, 0, sizeof racing_producer);
  kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  kd_dispatcher_set_key_state_funcs (dispatcher, state_new, state_free, NULL, NULL);

  submit (dispatcher, TRUE, 1, 0, 1);   /* parks with no job left */
  /* Its unit goes back once the runner finished parking it: a resume
   * before that is handed back to the runner, on its worker. */
  wait_for_stat (dispatcher, pending, 0);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.parked_keys, ==, 1);

  /* The state's free submits the key's next job. Had the key left the
   * table already, that job would make a new mailbox and run at once,
   * with a second state while the first one is still being freed. */
  racing_producer.dispatcher = dispatcher;
  states.on_free = submit_while_freeing;
  g_assert_true (kd_dispatcher_resume_key (dispatcher, "key-1"));
  g_assert_true (racing_producer.done);
  g_assert_cmpuint (racing_producer.live_keys, ==, 1);

  kd_dispatcher_wait (dispatcher);
  assert_seqs (log.runs, 1, "0 1");
  g_assert_cmpint (states.made, ==, 2);
  g_assert_cmpint (states.freed, ==, 2);
  g_assert_cmpint (states.max_live, ==, 1);

  g_object_unref (dispatcher);
  states.on_free = NULL;
  log_clear (&log);
}

/* The state's free drops the last reference to the dispatcher: the
 * dispatcher is disposed from inside its own cancellation. */
static KdDispatcher *last_ref;

static void
drop_last_ref (void)
{
  g_clear_object (&last_ref);
}

static void
test_park_key_state_last_ref (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);
  GCancellable *cancellable = g_cancellable_new ();
  KdStats stats;

  g_test_summary ("Cancelling drops an empty parked key, whose state's free drops the "
                  "last reference to the dispatcher: the dispatcher is disposed inside "
                  "its own cancellation, in the cancelling thread, without deadlock");

  memset (&states, 0, sizeof states);
  kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  kd_dispatcher_set_key_state_funcs (dispatcher, state_new, state_free, NULL, NULL);
  kd_dispatcher_set_cancellable (dispatcher, cancellable);

  submit (dispatcher, TRUE, 1, 0, 1);   /* parks with no job left */
  wait_for_stat (dispatcher, pending, 0);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.parked_keys, ==, 1);

  last_ref = dispatcher;
  g_object_add_weak_pointer (G_OBJECT (dispatcher), (gpointer *) &dispatcher);
  states.on_free = drop_last_ref;
  g_cancellable_cancel (cancellable);

  g_assert_null (last_ref);
  g_assert_null (dispatcher);
  g_assert_cmpint (states.made, ==, 1);
  g_assert_cmpint (states.freed, ==, 1);
  g_assert_cmpuint (log.ends->len, ==, 1);
  g_assert_cmpuint (log.freed, ==, 1);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);

  states.on_free = NULL;
  g_object_unref (cancellable);
  log_clear (&log);
}

static void
test_main_context (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 2);
  GMainContext *context = g_main_context_new ();
  guint i;

  g_test_summary ("With a main context, done callbacks of retried and parked jobs "
                  "come there in per-key order");

  kd_dispatcher_set_main_context (dispatcher, context);
  kd_dispatcher_set_retry (dispatcher, 2, 0, 0);
  kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  for (i = 0; i < 50; i++)
    submit (dispatcher, TRUE, 1, i, i == 10 ? 1 : i == 20 ? FAIL_ALWAYS : 0);

  while (kd_test_counter_get (&log.ended) < 21)
    g_main_context_iteration (context, TRUE);
  g_assert_true (kd_dispatcher_resume_key (dispatcher, "key-1"));
  while (kd_test_counter_get (&log.ended) < 50)
    g_main_context_iteration (context, TRUE);

  for (i = 0; i < 50; i++)
    g_assert_cmpuint (g_array_index (log.ends, Event, i).seq, ==, i);
  g_assert_cmpuint (g_array_index (log.ends, Event, 10).attempt, ==, 2);
  g_assert_cmpint (g_array_index (log.ends, Event, 20).error_code, ==, G_IO_ERROR_FAILED);

  g_object_unref (dispatcher);
  g_main_context_unref (context);
  log_clear (&log);
}

static void
test_bad_input (void)
{
  Log log;
  KdDispatcher *dispatcher = log_dispatcher_new (&log, 1);

  g_test_summary ("Bad retry settings are refused with a critical and change nothing");

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*max_attempts >= 1*");
  kd_dispatcher_set_retry (dispatcher, 0, 0, 0);
  g_test_assert_expected_messages ();
  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*max_delay_us >= initial_delay_us*");
  kd_dispatcher_set_retry (dispatcher, 3, 10, 5);
  g_test_assert_expected_messages ();
  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*key != NULL*");
  g_assert_false (kd_dispatcher_resume_key (dispatcher, NULL));
  g_test_assert_expected_messages ();

  /* Still no retry: the job fails once. */
  submit (dispatcher, TRUE, 1, 0, 1);
  kd_dispatcher_wait (dispatcher);
  assert_seqs (log.runs, 1, "0");
  g_assert_cmpuint (log.dead->len, ==, 1);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*configured before its first submit*");
  kd_dispatcher_set_retry (dispatcher, 3, 0, 0);
  g_test_assert_expected_messages ();

  g_object_unref (dispatcher);
  log_clear (&log);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/failure/retry-then-success", test_retry_then_success);
  g_test_add_func ("/kd/failure/retry-exhausted", test_retry_exhausted);
  g_test_add_func ("/kd/failure/retry-holds-no-worker", test_retry_holds_no_worker);
  g_test_add_func ("/kd/failure/retry-then-unref", test_retry_then_unref);
  g_test_add_func ("/kd/failure/park-then-resume", test_park_then_resume);
  g_test_add_func ("/kd/failure/park-then-drop", test_park_then_drop);
  g_test_add_func ("/kd/failure/park-resume-in-done", test_park_resume_in_done);
  g_test_add_func ("/kd/failure/park-drop-in-done", test_park_drop_in_done);
  g_test_add_func ("/kd/failure/retry-waits-race", test_retry_waits_race);
  g_test_add_func ("/kd/failure/park-cancel-and-unref", test_park_cancel_and_unref);
  g_test_add_func ("/kd/failure/park-key-state", test_park_key_state);
  g_test_add_func ("/kd/failure/park-key-state-resume-race", test_park_key_state_resume_race);
  g_test_add_func ("/kd/failure/park-key-state-last-ref", test_park_key_state_last_ref);
  g_test_add_func ("/kd/failure/main-context", test_main_context);
  g_test_add_func ("/kd/failure/bad-input", test_bad_input);

  return g_test_run ();
}
