/* test-submit-many.c: batches of jobs in one call
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-dispatcher-private.h"
#include "kd-test-util.h"

#define N_KEYS 7

/* Items are 1-based indices (never NULL); item_free counts them. */
static gint freed;
static gint *freed_items;   /* per item: how many times it was freed */

static void
item_free (gpointer item)
{
  g_atomic_int_inc (&freed);
  g_atomic_int_inc (&freed_items[GPOINTER_TO_UINT (item)]);
}

static void
freed_reset (guint n_items)
{
  g_free (freed_items);
  freed_items = g_new0 (gint, n_items + 1);
  freed = 0;
}

static gint
freed_count_of (guint item)
{
  return g_atomic_int_get (&freed_items[item]);
}

static KdDispatcher *
recorder_dispatcher_new (KdTestRecorder *recorder,
                         guint           n_workers,
                         guint           capacity)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (n_workers, kd_test_recorder_handler,
                                                recorder, NULL);

  kd_test_recorder_init (recorder);
  kd_dispatcher_set_capacity (dispatcher, capacity);
  kd_dispatcher_set_done_func (dispatcher, kd_test_recorder_done, recorder, NULL);
  kd_dispatcher_set_item_free (dispatcher, item_free);
  return dispatcher;
}

/* @key's items ran in submission order (items are numbered in it). */
static void
assert_in_order (KdTestRecorder *recorder,
                 const char     *key,
                 guint           expected_count)
{
  GPtrArray *items = kd_test_recorder_items_of (recorder, key);
  guint i;

  g_assert_cmpuint (items->len, ==, expected_count);
  for (i = 1; i < items->len; i++)
    g_assert_cmpuint (GPOINTER_TO_UINT (items->pdata[i - 1]), <,
                      GPOINTER_TO_UINT (items->pdata[i]));
  g_ptr_array_unref (items);
}

static void
test_order (void)
{
  KdTestRecorder recorder;
  KdDispatcher *dispatcher = recorder_dispatcher_new (&recorder, 4, 16);
  guint n_batches = kd_test_size (200, 2000), batch = 37;
  guint per_key[N_KEYS] = { 0 }, unkeyed = 0, next = 1, b, i, k;
  char names[N_KEYS][8];
  KdStats stats;

  g_test_summary ("A batch's keyed items run in array order, after the key's earlier "
                  "jobs and before its later ones, across batches and single submits; "
                  "unkeyed items (a NULL key) run once each; every item is counted once");

  recorder.hold_only = GUINT_TO_POINTER (G_MAXUINT);   /* nobody holds */
  freed_reset (n_batches * (batch + 1));
  for (k = 0; k < N_KEYS; k++)
    g_snprintf (names[k], sizeof names[k], "k%u", k);

  for (b = 0; b < n_batches; b++)
    {
      const char *keys[64];
      gpointer items[64];
      GError *error = NULL;

      for (i = 0; i < batch; i++)
        {
          /* Every eighth item unkeyed; the keys cycle with a stride that
           * gives a key several items per batch. */
          k = (b * 3 + i * 5) % N_KEYS;
          keys[i] = i % 8 == 7 ? NULL : names[k];
          if (keys[i] != NULL)
            per_key[k]++;
          else
            unkeyed++;
          items[i] = GUINT_TO_POINTER (next++);
        }
      g_assert_cmpuint (kd_dispatcher_submit_many (dispatcher, keys, items, batch, &error),
                        ==, batch);
      g_assert_no_error (error);

      /* A single submit between batches keeps its place too. */
      k = b % N_KEYS;
      per_key[k]++;
      g_assert_true (kd_dispatcher_submit (dispatcher, names[k], GUINT_TO_POINTER (next++),
                                           NULL));
    }
  kd_dispatcher_wait (dispatcher);

  for (k = 0; k < N_KEYS; k++)
    assert_in_order (&recorder, names[k], per_key[k]);
  {
    GPtrArray *items = kd_test_recorder_items_of (&recorder, NULL);

    g_assert_cmpuint (items->len, ==, unkeyed);
    g_ptr_array_unref (items);
  }

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, next - 1);
  g_assert_cmpuint (stats.completed, ==, next - 1);
  g_assert_cmpuint (stats.rejected, ==, 0);
  g_assert_cmpuint (stats.live_keys, ==, 0);
  g_assert_cmpint (freed, ==, (gint) (next - 1));
  for (i = 1; i < next; i++)
    g_assert_cmpint (freed_count_of (i), ==, 1);

  g_object_unref (dispatcher);
  kd_test_recorder_clear (&recorder);
}

static void
test_unkeyed (void)
{
  KdTestRecorder recorder;
  KdDispatcher *dispatcher = recorder_dispatcher_new (&recorder, 3, 8);
  guint n = kd_test_size (5000, 50000), i;
  gpointer *items = g_new (gpointer, n);
  KdStats stats;

  g_test_summary ("A batch with no keys array runs every item once, more items than "
                  "the bound in one call");

  recorder.hold_only = GUINT_TO_POINTER (G_MAXUINT);
  freed_reset (n);
  for (i = 0; i < n; i++)
    items[i] = GUINT_TO_POINTER (i + 1);
  g_assert_cmpuint (kd_dispatcher_submit_many (dispatcher, NULL, items, n, NULL), ==, n);
  kd_dispatcher_wait (dispatcher);

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, n);
  g_assert_cmpint (recorder.completed, ==, (gint) n);
  for (i = 1; i <= n; i++)
    g_assert_cmpint (freed_count_of (i), ==, 1);

  g_object_unref (dispatcher);
  kd_test_recorder_clear (&recorder);
  g_free (items);
}

/* A thread that submits one batch and records what it got. */
typedef struct
{
  KdDispatcher *dispatcher;
  const char  **keys;
  gpointer     *items;
  guint         n_items;
  gint64        timeout_us;  /* < 0: the blocking call */
  guint         taken;
  GError       *error;
} Batch;

static gpointer
submit_batch_thread (gpointer data)
{
  Batch *batch = data;

  if (batch->timeout_us < 0)
    batch->taken = kd_dispatcher_submit_many (batch->dispatcher, batch->keys, batch->items,
                                              batch->n_items, &batch->error);
  else
    batch->taken = kd_dispatcher_submit_many_timeout (batch->dispatcher, batch->keys,
                                                      batch->items, batch->n_items,
                                                      batch->timeout_us, &batch->error);
  return NULL;
}

static void
fill_items (gpointer *items,
            guint     n)
{
  guint i;

  for (i = 0; i < n; i++)
    items[i] = GUINT_TO_POINTER (i + 1);
}

static void
test_bound_blocks (void)
{
  KdTestRecorder recorder;
  KdDispatcher *dispatcher = recorder_dispatcher_new (&recorder, 2, 4);
  const char *keys[20];
  gpointer items[20];
  Batch batch = { dispatcher, keys, items, 20, -1, 0, NULL };
  GThread *thread;
  guint i;

  g_test_summary ("A blocking batch larger than the bound takes what fits, waits at the "
                  "bound for room (never holding more units than the bound), and goes on "
                  "until every item is taken, in order");

  freed_reset (20);
  fill_items (items, 20);
  for (i = 0; i < 20; i++)
    keys[i] = i % 2 == 0 ? "even" : NULL;

  thread = g_thread_new ("batch", submit_batch_thread, &batch);
  /* Two held handlers and two queued jobs fill the bound of 4. */
  g_assert_true (kd_test_hold_wait_arrived (&recorder.hold, 2));
  kd_dispatcher_wait_blocked_submitters (dispatcher, 1);
  g_assert_cmpuint (kd_dispatcher_get_admitted (dispatcher), ==, 4);
  g_assert_cmpint (g_atomic_int_get (&freed), ==, 0);

  kd_test_hold_release (&recorder.hold);
  g_thread_join (thread);
  g_assert_cmpuint (batch.taken, ==, 20);
  g_assert_no_error (batch.error);

  kd_dispatcher_wait (dispatcher);
  assert_in_order (&recorder, "even", 10);
  g_assert_cmpint (recorder.completed, ==, 20);
  g_assert_cmpint (freed, ==, 20);

  g_object_unref (dispatcher);
  kd_test_recorder_clear (&recorder);
}

static void
test_try_partial (void)
{
  KdTestRecorder recorder;
  KdDispatcher *dispatcher = recorder_dispatcher_new (&recorder, 2, 6);
  gpointer items[10];
  GError *error = NULL;
  KdStats stats;
  guint taken, i;

  g_test_summary ("A try batch at a partly full bound takes the first items that fit, "
                  "fails with FULL for the rest and leaves them the caller's: no "
                  "callback, no free; each refused item counts as a rejected submit");

  freed_reset (10);
  fill_items (items, 10);
  /* Two jobs held: 4 units left. */
  g_assert_true (kd_dispatcher_submit (dispatcher, "a", GUINT_TO_POINTER (9), NULL));
  g_assert_true (kd_dispatcher_submit (dispatcher, "b", GUINT_TO_POINTER (10), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&recorder.hold, 2));

  taken = kd_dispatcher_try_submit_many (dispatcher, NULL, items, 8, &error);
  g_assert_cmpuint (taken, ==, 4);
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, 6);
  g_assert_cmpuint (stats.rejected, ==, 4);

  /* Full: nothing taken. */
  taken = kd_dispatcher_try_submit_many (dispatcher, NULL, items + 4, 4, &error);
  g_assert_cmpuint (taken, ==, 0);
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);

  /* And with a deadline: the same, once it passed. */
  taken = kd_dispatcher_submit_many_timeout (dispatcher, NULL, items + 4, 4,
                                             G_TIME_SPAN_MILLISECOND, &error);
  g_assert_cmpuint (taken, ==, 0);
  g_assert_error (error, KD_ERROR, KD_ERROR_TIMEOUT);
  g_clear_error (&error);

  /* An empty batch takes nothing and is no error. */
  g_assert_cmpuint (kd_dispatcher_try_submit_many (dispatcher, NULL, NULL, 0, &error), ==, 0);
  g_assert_no_error (error);

  kd_test_hold_release (&recorder.hold);
  kd_dispatcher_wait (dispatcher);
  g_assert_cmpint (recorder.completed, ==, 6);
  for (i = 1; i <= 4; i++)
    g_assert_cmpint (freed_count_of (i), ==, 1);
  for (i = 5; i <= 8; i++)
    g_assert_cmpint (freed_count_of (i), ==, 0);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.rejected, ==, 12);

  g_object_unref (dispatcher);
  kd_test_recorder_clear (&recorder);
}

static void
test_cancel_midway (void)
{
  KdTestRecorder recorder;
  KdDispatcher *dispatcher = recorder_dispatcher_new (&recorder, 2, 4);
  const char *keys[20];
  gpointer items[20];
  Batch batch = { dispatcher, keys, items, 20, -1, 0, NULL };
  GThread *thread;
  KdStats stats;
  guint i;

  g_test_summary ("Cancelling while a blocking batch waits for room: the call returns "
                  "the items taken so far with CLOSED, those end (the held ones "
                  "complete, the queued ones are cancelled), the rest stay the caller's");

  freed_reset (20);
  fill_items (items, 20);
  for (i = 0; i < 20; i++)
    keys[i] = "k";
  recorder.hold_only = GUINT_TO_POINTER (1);

  thread = g_thread_new ("batch", submit_batch_thread, &batch);
  g_assert_true (kd_test_hold_wait_arrived (&recorder.hold, 1));
  kd_dispatcher_wait_blocked_submitters (dispatcher, 1);

  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  g_thread_join (thread);
  g_assert_cmpuint (batch.taken, ==, 4);
  g_assert_error (batch.error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&batch.error);

  kd_test_hold_release (&recorder.hold);
  kd_dispatcher_wait (dispatcher);
  g_assert_cmpint (recorder.completed, ==, 1);
  g_assert_cmpint (recorder.cancelled, ==, 3);
  for (i = 1; i <= 4; i++)
    g_assert_cmpint (freed_count_of (i), ==, 1);
  for (i = 5; i <= 20; i++)
    g_assert_cmpint (freed_count_of (i), ==, 0);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, 4);
  g_assert_cmpuint (stats.rejected, ==, 16);
  g_assert_cmpuint (stats.pending, ==, 0);

  g_object_unref (dispatcher);
  kd_test_recorder_clear (&recorder);
}

static void
test_key_capacity (void)
{
  KdTestRecorder recorder;
  KdDispatcher *dispatcher = recorder_dispatcher_new (&recorder, 2, 64);
  const char *keys[6] = { "a", "b", "a", "a", "b", "a" };
  gpointer items[6];
  GError *error = NULL;
  guint taken;

  g_test_summary ("With a per-key bound, a try batch stops at the first item whose key "
                  "is full: the items before it are taken, in order");

  freed_reset (6);
  fill_items (items, 6);
  kd_dispatcher_set_key_capacity (dispatcher, 2);

  taken = kd_dispatcher_try_submit_many (dispatcher, keys, items, 6, &error);
  /* a, b, a fit; the third "a" does not. */
  g_assert_cmpuint (taken, ==, 3);
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);
  g_assert_cmpuint (kd_dispatcher_get_admitted (dispatcher), ==, 3);

  kd_test_hold_release (&recorder.hold);
  kd_dispatcher_wait (dispatcher);
  assert_in_order (&recorder, "a", 2);
  g_assert_cmpint (recorder.completed, ==, 3);
  g_assert_cmpint (freed, ==, 3);

  g_object_unref (dispatcher);
  kd_test_recorder_clear (&recorder);
}

/* A handler that submits a batch to its own full dispatcher. */
typedef struct
{
  KdDispatcher *dispatcher;
  KdTestGate    submitted;
  guint         taken;
  GError       *error;
} FromWorker;

static gboolean
submit_from_worker (KdJob    *job,
                    gpointer  user_data,
                    GError  **error)
{
  FromWorker *from = user_data;
  gpointer items[8] = { NULL };

  /* The batch's own items are NULL. */
  if (kd_job_get_item (job) == NULL)
    return TRUE;

  /* Bound 4, this job holds one: 3 fit, and the worker never waits. */
  from->taken = kd_dispatcher_submit_many (from->dispatcher, NULL, items, 8, &from->error);
  kd_test_gate_open (&from->submitted);
  return TRUE;
}

static void
test_from_worker (void)
{
  FromWorker from = { 0 };
  KdDispatcher *dispatcher = kd_dispatcher_new (1, submit_from_worker, &from, NULL);

  g_test_summary ("A blocking batch from one of the dispatcher's own workers never waits: "
                  "it takes what fits and fails with FULL");

  kd_test_gate_init (&from.submitted);
  from.dispatcher = dispatcher;
  kd_dispatcher_set_capacity (dispatcher, 4);
  g_assert_true (kd_dispatcher_submit (dispatcher, NULL, GUINT_TO_POINTER (1), NULL));
  g_assert_true (kd_test_gate_wait (&from.submitted));
  g_assert_cmpuint (from.taken, ==, 3);
  g_assert_error (from.error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&from.error);

  kd_dispatcher_wait (dispatcher);
  g_object_unref (dispatcher);
  kd_test_gate_clear (&from.submitted);
}

static void
test_bad_input (void)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (1, kd_test_noop_handler, NULL, NULL);
  GError *error = NULL;

  g_test_summary ("A batch with items NULL but a count, or to a closed dispatcher, is "
                  "refused with a critical or a CLOSED error, taking nothing");

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*items != NULL*");
  g_assert_cmpuint (kd_dispatcher_submit_many (dispatcher, NULL, NULL, 3, NULL), ==, 0);
  g_test_assert_expected_messages ();

  kd_dispatcher_close (dispatcher);
  {
    gpointer items[2] = { GUINT_TO_POINTER (1), GUINT_TO_POINTER (2) };

    g_assert_cmpuint (kd_dispatcher_submit_many (dispatcher, NULL, items, 2, &error), ==, 0);
    g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
    g_clear_error (&error);
  }

  g_object_unref (dispatcher);
}

int
main (int    argc,
      char **argv)
{
  int status;

  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/submit-many/order", test_order);
  g_test_add_func ("/kd/submit-many/unkeyed", test_unkeyed);
  g_test_add_func ("/kd/submit-many/bound-blocks", test_bound_blocks);
  g_test_add_func ("/kd/submit-many/try-partial", test_try_partial);
  g_test_add_func ("/kd/submit-many/cancel-midway", test_cancel_midway);
  g_test_add_func ("/kd/submit-many/key-capacity", test_key_capacity);
  g_test_add_func ("/kd/submit-many/from-worker", test_from_worker);
  g_test_add_func ("/kd/submit-many/bad-input", test_bad_input);

  status = g_test_run ();
  g_free (freed_items);
  return status;
}
