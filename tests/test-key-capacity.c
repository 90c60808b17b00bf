/* test-key-capacity.c: the bound on each key's pending jobs
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-dispatcher-private.h"
#include "kd-test-util.h"

#define KEY_CAPACITY 3

/* Items are (key << 16 | seq) + 1; the first job of key "hot" holds. */
#define ITEM(key, seq) GUINT_TO_POINTER ((((key) << 16) | (seq)) + 1)

typedef struct
{
  KdTestRecorder recorder;
  KdTestCounter  freed;
} Run;

static Run *run_for_free;

static void
count_free (gpointer item)
{
  kd_test_counter_add (&run_for_free->freed, 1);
}

static KdDispatcher *
run_dispatcher_new (Run *run)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (2, kd_test_recorder_handler, &run->recorder, NULL);

  kd_test_recorder_init (&run->recorder);
  run->recorder.hold_only = ITEM (0, 0);
  kd_test_counter_init (&run->freed);
  run_for_free = run;

  kd_dispatcher_set_capacity (dispatcher, 64);
  kd_dispatcher_set_key_capacity (dispatcher, KEY_CAPACITY);
  kd_dispatcher_set_item_free (dispatcher, count_free);
  g_assert_cmpuint (kd_dispatcher_get_key_capacity (dispatcher), ==, KEY_CAPACITY);
  return dispatcher;
}

static void
run_clear (Run *run)
{
  kd_test_recorder_clear (&run->recorder);
  kd_test_counter_clear (&run->freed);
}

typedef struct
{
  GMainLoop *loop;
  GError    *error;
} AsyncOutcome;

static void
async_done_cb (GObject      *source,
               GAsyncResult *result,
               gpointer      user_data)
{
  AsyncOutcome *outcome = user_data;

  g_assert_false (kd_dispatcher_submit_finish (KD_DISPATCHER (source), result, &outcome->error));
  g_main_loop_quit (outcome->loop);
}

static void
test_key_full (void)
{
  Run run;
  KdDispatcher *dispatcher = run_dispatcher_new (&run);
  AsyncOutcome outcome = { g_main_loop_new (NULL, FALSE), NULL };
  GError *error = NULL;
  KdStats stats;
  guint i;

  g_test_summary ("A key at its bound refuses try_submit with FULL, times out "
                  "submit_timeout and refuses async submits, keeping the item, "
                  "while other keys are accepted");

  /* "hot": one running (held) and two queued. */
  for (i = 0; i < KEY_CAPACITY; i++)
    g_assert_true (kd_dispatcher_submit (dispatcher, "hot", ITEM (0, i), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&run.recorder.hold, 1));

  g_assert_false (kd_dispatcher_try_submit (dispatcher, "hot", ITEM (0, 9), &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);
  g_assert_false (kd_dispatcher_submit_timeout (dispatcher, "hot", ITEM (0, 9),
                                                10 * G_TIME_SPAN_MILLISECOND, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_TIMEOUT);
  g_clear_error (&error);
  kd_dispatcher_submit_async (dispatcher, "hot", ITEM (0, 9), NULL, async_done_cb, &outcome);
  g_main_loop_run (outcome.loop);
  g_assert_error (outcome.error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&outcome.error);

  /* Other keys, and unkeyed jobs, are not limited by "hot". */
  for (i = 0; i < KEY_CAPACITY; i++)
    {
      g_assert_true (kd_dispatcher_try_submit (dispatcher, "cold", ITEM (1, i), NULL));
      g_assert_true (kd_dispatcher_try_submit (dispatcher, NULL, ITEM (2, i), NULL));
    }

  /* Refused submits freed nothing and gave their units back. */
  g_assert_cmpuint (kd_test_counter_get (&run.freed), <=, 2 * KEY_CAPACITY);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.rejected, ==, 3);
  g_assert_cmpuint (stats.submitted, ==, 3 * KEY_CAPACITY);

  kd_test_hold_release (&run.recorder.hold);
  kd_dispatcher_wait (dispatcher);
  /* Every unit went back, the refused submits' too. */
  g_assert_cmpuint (kd_dispatcher_get_admitted (dispatcher), ==, 0);
  g_assert_cmpuint (kd_test_counter_get (&run.freed), ==, 3 * KEY_CAPACITY);

  /* Room again once the key's jobs ended. */
  g_assert_true (kd_dispatcher_try_submit (dispatcher, "hot", ITEM (0, 10), NULL));
  kd_dispatcher_wait (dispatcher);

  g_object_unref (dispatcher);
  g_main_loop_unref (outcome.loop);
  run_clear (&run);
}

typedef struct
{
  KdDispatcher *dispatcher;
  guint         first;
  guint         n;
  GError       *error;
  guint         accepted;
} Producer;

static gpointer
produce (gpointer data)
{
  Producer *producer = data;
  guint i;

  for (i = 0; i < producer->n; i++)
    {
      if (!kd_dispatcher_submit (producer->dispatcher, "hot",
                                 ITEM (0, producer->first + i), &producer->error))
        break;
      producer->accepted++;
    }
  return NULL;
}

static void
test_key_blocks (void)
{
  Run run;
  KdDispatcher *dispatcher = run_dispatcher_new (&run);
  Producer producer = { dispatcher, KEY_CAPACITY, 100, NULL, 0 };
  GThread *thread;
  GPtrArray *hot;
  guint i;

  g_test_summary ("A submit to a key at its bound blocks until one of the key's "
                  "jobs ended, then goes in, in order; the key never has more "
                  "pending jobs than its bound");

  for (i = 0; i < KEY_CAPACITY; i++)
    g_assert_true (kd_dispatcher_submit (dispatcher, "hot", ITEM (0, i), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&run.recorder.hold, 1));

  thread = g_thread_new ("producer", produce, &producer);
  kd_dispatcher_wait_blocked_on_key (dispatcher, "hot", 1);
  g_assert_cmpuint (producer.accepted, ==, 0);
  g_assert_cmpuint (kd_dispatcher_get_admitted (dispatcher), <=, KEY_CAPACITY + 1);

  /* Others go on meanwhile. */
  g_assert_true (kd_dispatcher_submit (dispatcher, "cold", ITEM (1, 0), NULL));

  kd_test_hold_release (&run.recorder.hold);
  g_thread_join (thread);
  g_assert_no_error (producer.error);
  g_assert_cmpuint (producer.accepted, ==, 100);
  kd_dispatcher_wait (dispatcher);

  /* "hot" ran in submission order. */
  hot = kd_test_recorder_items_of (&run.recorder, "hot");
  g_assert_cmpuint (hot->len, ==, KEY_CAPACITY + 100);
  for (i = 0; i < hot->len; i++)
    g_assert_true (g_ptr_array_index (hot, i) == ITEM (0, i));
  g_ptr_array_unref (hot);

  g_object_unref (dispatcher);
  run_clear (&run);
}

static void
test_key_blocked_then_closed (void)
{
  Run run;
  KdDispatcher *dispatcher = run_dispatcher_new (&run);
  Producer producer = { dispatcher, KEY_CAPACITY, 1, NULL, 0 };
  GThread *thread;
  KdStats stats;
  guint i;

  g_test_summary ("Closing the dispatcher wakes a submit blocked on its key and "
                  "refuses it with CLOSED; the item stays the caller's");

  for (i = 0; i < KEY_CAPACITY; i++)
    g_assert_true (kd_dispatcher_submit (dispatcher, "hot", ITEM (0, i), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&run.recorder.hold, 1));

  thread = g_thread_new ("producer", produce, &producer);
  kd_dispatcher_wait_blocked_on_key (dispatcher, "hot", 1);
  kd_dispatcher_close (dispatcher);
  g_thread_join (thread);
  g_assert_error (producer.error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&producer.error);
  g_assert_cmpuint (producer.accepted, ==, 0);

  kd_test_hold_release (&run.recorder.hold);
  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, KEY_CAPACITY);
  g_assert_cmpuint (stats.completed, ==, KEY_CAPACITY);
  g_assert_cmpuint (stats.rejected, ==, 1);
  g_assert_cmpuint (kd_test_counter_get (&run.freed), ==, KEY_CAPACITY);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);

  g_object_unref (dispatcher);
  run_clear (&run);
}

/* Many producers flood one key and a few others: no key ever has more than
 * its bound pending, and every key's jobs run in each producer's order. */
typedef struct
{
  gint  pending[4];
  gint  over_bound;
} Flood;

static Flood flood;

static gboolean
flood_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  const char *key = kd_job_get_key (job);
  guint k = (guint) (key[1] - '0');

  /* Each of the key's (at most 2) producers may have counted one job it
   * is still submitting. */
  if (g_atomic_int_get (&flood.pending[k]) > KEY_CAPACITY + 2)
    g_atomic_int_inc (&flood.over_bound);
  g_atomic_int_add (&flood.pending[k], -1);
  return TRUE;
}

typedef struct
{
  KdDispatcher *dispatcher;
  guint         key;
  guint         n;
} FloodProducer;

static gpointer
flood_produce (gpointer data)
{
  FloodProducer *producer = data;
  char key[4] = { 'k', (char) ('0' + producer->key), '\0', '\0' };
  guint i;

  for (i = 0; i < producer->n; i++)
    {
      /* Counted before the submit: the job may run before it returns. */
      g_atomic_int_inc (&flood.pending[producer->key]);
      g_assert_true (kd_dispatcher_submit (producer->dispatcher, key, NULL, NULL));
    }
  return NULL;
}

static void
test_key_flood (void)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (2, flood_handler, NULL, NULL);
  FloodProducer producers[6];
  GThread *threads[6];
  guint n = kd_test_size (5000, 100000);
  KdStats stats;
  guint i;

  g_test_summary ("Six producers flood four keys: no key runs a job while more "
                  "than its bound are pending, and every submit gets in");

  memset (&flood, 0, sizeof flood);
  kd_dispatcher_set_capacity (dispatcher, 1024);
  kd_dispatcher_set_key_capacity (dispatcher, KEY_CAPACITY);

  for (i = 0; i < G_N_ELEMENTS (producers); i++)
    {
      producers[i].dispatcher = dispatcher;
      producers[i].key = i % 4;
      producers[i].n = n;
      threads[i] = g_thread_new ("producer", flood_produce, &producers[i]);
    }
  for (i = 0; i < G_N_ELEMENTS (producers); i++)
    g_thread_join (threads[i]);
  kd_dispatcher_wait (dispatcher);

  /* Without the bound a key would run far over it. */
  g_assert_cmpint (flood.over_bound, ==, 0);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, G_N_ELEMENTS (producers) * n);
  g_assert_cmpuint (stats.rejected, ==, 0);
  g_object_unref (dispatcher);
}

static gboolean
stage_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  return TRUE;
}

static void
test_key_pipeline (void)
{
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *stage = kd_pipeline_add_stage (pipeline, "keyed", 2, stage_handler, NULL, NULL);
  guint i;

  g_test_summary ("Jobs a pipeline feeds into a keyed stage with a key bound count "
                  "in their key and leave it when they end: the key has its whole "
                  "room afterwards");

  kd_dispatcher_set_key_capacity (stage, KEY_CAPACITY);
  for (i = 0; i < 50; i++)
    g_assert_true (kd_pipeline_submit (pipeline, "k", GUINT_TO_POINTER (i + 1), NULL));
  kd_pipeline_wait (pipeline);

  for (i = 0; i < KEY_CAPACITY; i++)
    g_assert_true (kd_dispatcher_try_submit (stage, "k", GUINT_TO_POINTER (1), NULL));
  kd_dispatcher_wait (stage);
  for (i = 0; i < KEY_CAPACITY; i++)
    g_assert_true (kd_dispatcher_try_submit (stage, "k", GUINT_TO_POINTER (1), NULL));

  g_object_unref (pipeline);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/key-capacity/full", test_key_full);
  g_test_add_func ("/kd/key-capacity/blocks", test_key_blocks);
  g_test_add_func ("/kd/key-capacity/blocked-then-closed", test_key_blocked_then_closed);
  g_test_add_func ("/kd/key-capacity/flood", test_key_flood);
  g_test_add_func ("/kd/key-capacity/pipeline", test_key_pipeline);

  return g_test_run ();
}
