/* test-pipeline.c: the guarantees of KdPipeline
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-dispatcher-private.h"
#include "kd-job-private.h"
#include "kd-pipeline-private.h"
#include "kd-reorder-private.h"
#include "kd-test-util.h"

/* ------------------------------------------------------------------------ */
/* Items: every item is accounted for, freed exactly once                  */

typedef struct
{
  guint id;
  guint key;
  guint seq;        /* position among its key's items */
} Item;

typedef struct
{
  gint        allocated;
  gint        freed;
  gint        max_live;
  gint       *frees;       /* per id, when tracked */
  guint       n_ids;
  gint        trigger_at;  /* opens @triggered when this many were allocated */
  KdTestGate  triggered;
} Ledger;

static Ledger ledger;

static void
ledger_reset (guint n_ids)
{
  g_free (ledger.frees);
  ledger.allocated = ledger.freed = ledger.max_live = 0;
  ledger.n_ids = n_ids;
  ledger.frees = g_new0 (gint, MAX (n_ids, 1));
  ledger.trigger_at = G_MAXINT;
  kd_test_gate_clear (&ledger.triggered);
  kd_test_gate_init (&ledger.triggered);
}

static Item *
item_new (guint id,
          guint key,
          guint seq)
{
  Item *item = g_new (Item, 1);
  gint allocated = g_atomic_int_add (&ledger.allocated, 1) + 1;
  gint live = allocated - g_atomic_int_get (&ledger.freed);
  gint max = g_atomic_int_get (&ledger.max_live);

  if (allocated == g_atomic_int_get (&ledger.trigger_at))
    kd_test_gate_open (&ledger.triggered);

  while (live > max && !g_atomic_int_compare_and_exchange (&ledger.max_live, max, live))
    max = g_atomic_int_get (&ledger.max_live);

  item->id = id;
  item->key = key;
  item->seq = seq;
  return item;
}

static void
item_free (gpointer data)
{
  Item *item = data;

  if (item->id < ledger.n_ids)
    g_atomic_int_inc (&ledger.frees[item->id]);
  g_atomic_int_inc (&ledger.freed);
  g_free (item);
}

static void
ledger_check_all_freed_once (void)
{
  guint i;

  g_assert_cmpint (ledger.freed, ==, ledger.allocated);
  for (i = 0; i < ledger.n_ids; i++)
    if (ledger.frees[i] != 1)
      g_error ("item %u freed %d times", i, ledger.frees[i]);
}

static char *
key_name (guint key)
{
  return g_strdup_printf ("client-%u", key);
}

static guint
key_number (const char *key)
{
  g_assert_nonnull (key);
  g_assert_true (g_str_has_prefix (key, "client-"));
  return (guint) g_ascii_strtoull (key + 7, NULL, 10);
}

/* ------------------------------------------------------------------------ */
/* Per-key order end to end                                                 */

#define ORDER_KEYS 50

typedef struct
{
  guint    next_at_aggregate[ORDER_KEYS];
  guint    next_at_sink[ORDER_KEYS];
  gint     aggregate_violations;
  gint     sink_violations;
  gint     reached_sink;
  gint     overtaken;      /* items that finished parsing before an older one */
  KdTestCounter parsed;
} Order;

/* Item 0 finishes parsing only after this many others. */
#define ORDER_OVERTAKERS 8

static gboolean
parse_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  Order *order = user_data;
  Item *item = kd_job_get_item (job);
  guint32 rng = item->id * 2654435761u + 1;

  /* Random lengths, and the first item waits for others: items finish out
   * of order even where threads take turns (under valgrind). */
  kd_test_spin (kd_test_xorshift (&rng) % 20000);
  if (item->id == 0)
    g_assert_true (kd_test_counter_wait (&order->parsed, ORDER_OVERTAKERS));
  if (item->id + 1 < kd_test_counter_add (&order->parsed, 1))
    g_atomic_int_inc (&order->overtaken);

  g_assert_cmpuint (key_number (kd_job_get_key (job)), ==, item->key);
  return kd_job_emit (job, kd_job_get_key (job), item, error);
}

static gboolean
format_handler (KdJob    *job,
                gpointer  user_data,
                GError  **error)
{
  Item *item = kd_job_get_item (job);
  guint32 rng = item->id * 2246822519u + 3;

  kd_test_spin (kd_test_xorshift (&rng) % 20000);
  return kd_job_emit (job, kd_job_get_key (job), item, error);
}

static gboolean
aggregate_handler (KdJob    *job,
                   gpointer  user_data,
                   GError  **error)
{
  Order *order = user_data;
  Item *item = kd_job_get_item (job);

  /* A keyed stage: one item of a key at a time, so no lock. */
  if (order->next_at_aggregate[item->key] != item->seq)
    g_atomic_int_inc (&order->aggregate_violations);
  order->next_at_aggregate[item->key] = item->seq + 1;

  return kd_job_emit (job, kd_job_get_key (job), item, error);
}

static void
order_sink (const char *key,
            gpointer    data,
            gpointer    user_data)
{
  Order *order = user_data;
  Item *item = data;

  g_assert_cmpuint (key_number (key), ==, item->key);
  if (order->next_at_sink[item->key] != item->seq)
    g_atomic_int_inc (&order->sink_violations);
  order->next_at_sink[item->key] = item->seq + 1;
  g_atomic_int_inc (&order->reached_sink);
  item_free (item);
}

static KdPipeline *
order_pipeline_new (Order *order)
{
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *parse, *aggregate, *format;

  parse = kd_pipeline_add_stage (pipeline, "parse", 4, parse_handler, order, NULL);
  kd_pipeline_set_stage_mode (pipeline, parse, KD_STAGE_ORDERED);
  kd_dispatcher_set_capacity (parse, 64);
  kd_dispatcher_set_item_free (parse, item_free);

  aggregate = kd_pipeline_add_stage (pipeline, "aggregate", 2, aggregate_handler, order, NULL);
  kd_dispatcher_set_capacity (aggregate, 64);
  kd_dispatcher_set_item_free (aggregate, item_free);

  format = kd_pipeline_add_stage (pipeline, "format", 3, format_handler, order, NULL);
  kd_pipeline_set_stage_mode (pipeline, format, KD_STAGE_ORDERED);
  kd_dispatcher_set_capacity (format, 32);
  kd_dispatcher_set_item_free (format, item_free);

  kd_pipeline_set_sink (pipeline, order_sink, order, NULL);
  return pipeline;
}

static void
test_order_end_to_end (void)
{
  Order order = { 0 };
  KdPipeline *pipeline;
  guint n_items = kd_test_size (20000, 400000);
  guint seq[ORDER_KEYS] = { 0 };
  guint i;

  g_test_summary ("Per-key order holds end to end through an ordered parallel stage, "
                  "a keyed stage and another ordered parallel stage, while items "
                  "overtake each other inside the parallel stages");

  ledger_reset (n_items);
  kd_test_counter_init (&order.parsed);
  pipeline = order_pipeline_new (&order);

  for (i = 0; i < n_items; i++)
    {
      guint key = (i * 7919u) % ORDER_KEYS;
      char *name = key_name (key);

      g_assert_true (kd_pipeline_submit (pipeline, name, item_new (i, key, seq[key]++), NULL));
      g_free (name);
    }
  kd_pipeline_wait (pipeline);

  g_assert_cmpint (order.reached_sink, ==, n_items);
  g_assert_cmpint (order.aggregate_violations, ==, 0);
  g_assert_cmpint (order.sink_violations, ==, 0);
  /* The parallel stages really ran items out of order. */
  g_assert_cmpint (order.overtaken, >, 0);
  for (i = 0; i < ORDER_KEYS; i++)
    g_assert_cmpuint (order.next_at_sink[i], ==, seq[i]);

  g_object_unref (pipeline);
  ledger_check_all_freed_once ();
  kd_test_counter_clear (&order.parsed);
}

static void
test_order_submit_many (void)
{
  Order order = { 0 };
  KdPipeline *pipeline;
  guint n_items = kd_test_size (20000, 400000);
  guint seq[ORDER_KEYS] = { 0 };
  char *names[ORDER_KEYS];
  /* More than ORDER_KEYS: a batch holds several items of some keys. */
  const char *keys[64];
  gpointer items[64];
  GError *error = NULL;
  guint i, j, n;

  g_test_summary ("Items submitted in batches keep their per-key order end to end, "
                  "inside and across batches; a batch after close takes nothing, "
                  "fails with CLOSED and leaves every item the caller's");

  ledger_reset (n_items + 2);
  kd_test_counter_init (&order.parsed);
  pipeline = order_pipeline_new (&order);
  for (i = 0; i < ORDER_KEYS; i++)
    names[i] = key_name (i);

  for (i = 0; i < n_items; i += n)
    {
      n = MIN (G_N_ELEMENTS (items), n_items - i);
      for (j = 0; j < n; j++)
        {
          guint key = ((i + j) * 7919u) % ORDER_KEYS;

          keys[j] = names[key];
          items[j] = item_new (i + j, key, seq[key]++);
        }
      g_assert_cmpuint (kd_pipeline_submit_many (pipeline, keys, items, n, &error), ==, n);
      g_assert_no_error (error);
    }
  kd_pipeline_wait (pipeline);

  g_assert_cmpint (order.reached_sink, ==, n_items);
  g_assert_cmpint (order.aggregate_violations, ==, 0);
  g_assert_cmpint (order.sink_violations, ==, 0);
  for (i = 0; i < ORDER_KEYS; i++)
    g_assert_cmpuint (order.next_at_sink[i], ==, seq[i]);

  kd_pipeline_close (pipeline);
  items[0] = item_new (n_items, 0, 0);
  items[1] = item_new (n_items + 1, 0, 0);
  g_assert_cmpuint (kd_pipeline_submit_many (pipeline, NULL, items, 2, &error), ==, 0);
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);
  item_free (items[0]);
  item_free (items[1]);

  g_object_unref (pipeline);
  ledger_check_all_freed_once ();
  kd_test_counter_clear (&order.parsed);
  for (i = 0; i < ORDER_KEYS; i++)
    g_free (names[i]);
}

/* ------------------------------------------------------------------------ */
/* An ordered stage holds a key back, not the other keys                    */

typedef struct
{
  KdTestGate  slow_may_end;   /* opened once the other key reached the sink */
  GPtrArray  *arrivals;       /* ids in sink order */
  GMutex      lock;
} HeadOfLine;

static gboolean
hol_handler (KdJob    *job,
             gpointer  user_data,
             GError  **error)
{
  HeadOfLine *hol = user_data;
  Item *item = kd_job_get_item (job);

  /* Item 0 (key a) is slow; until it ends, item 1 (key a) must wait in
   * the reorder, and item 2 (key b) must not. */
  if (item->id == 0)
    g_assert_true (kd_test_gate_wait (&hol->slow_may_end));
  return kd_job_emit (job, kd_job_get_key (job), item, error);
}

static void
hol_sink (const char *key,
          gpointer    data,
          gpointer    user_data)
{
  HeadOfLine *hol = user_data;
  Item *item = data;

  kd_mutex_lock (&hol->lock);
  g_ptr_array_add (hol->arrivals, GUINT_TO_POINTER (item->id));
  kd_mutex_unlock (&hol->lock);
  if (item->id == 2)
    kd_test_gate_open (&hol->slow_may_end);
  item_free (item);
}

static void
test_ordered_per_key (void)
{
  HeadOfLine hol;
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *stage;

  g_test_summary ("An ordered stage holds back what a key's later items emit until "
                  "its earlier items are done, but lets other keys through");

  ledger_reset (3);
  kd_test_gate_init (&hol.slow_may_end);
  g_mutex_init (&hol.lock);
  hol.arrivals = g_ptr_array_new ();

  stage = kd_pipeline_add_stage (pipeline, "ordered", 3, hol_handler, &hol, NULL);
  kd_pipeline_set_stage_mode (pipeline, stage, KD_STAGE_ORDERED);
  kd_dispatcher_set_item_free (stage, item_free);
  kd_pipeline_set_sink (pipeline, hol_sink, &hol, NULL);

  g_assert_true (kd_pipeline_submit (pipeline, "a", item_new (0, 0, 0), NULL));
  g_assert_true (kd_pipeline_submit (pipeline, "a", item_new (1, 0, 1), NULL));
  g_assert_true (kd_pipeline_submit (pipeline, "b", item_new (2, 1, 0), NULL));
  kd_pipeline_wait (pipeline);

  /* b first (a's slow item held a back, not b), then a in order. */
  g_assert_cmpuint (hol.arrivals->len, ==, 3);
  g_assert_cmpuint (GPOINTER_TO_UINT (g_ptr_array_index (hol.arrivals, 0)), ==, 2);
  g_assert_cmpuint (GPOINTER_TO_UINT (g_ptr_array_index (hol.arrivals, 1)), ==, 0);
  g_assert_cmpuint (GPOINTER_TO_UINT (g_ptr_array_index (hol.arrivals, 2)), ==, 1);

  g_object_unref (pipeline);
  ledger_check_all_freed_once ();
  g_ptr_array_unref (hol.arrivals);
  g_mutex_clear (&hol.lock);
  kd_test_gate_clear (&hol.slow_may_end);
}

/* ------------------------------------------------------------------------ */
/* Backpressure                                                             */

static gboolean
pass_handler (KdJob    *job,
              gpointer  user_data,
              GError  **error)
{
  return kd_job_emit (job, kd_job_get_key (job), kd_job_get_item (job), error);
}

static void
slow_sink (const char *key,
           gpointer    data,
           gpointer    user_data)
{
  kd_test_spin (30000);
  item_free (data);
}

static void
check_backpressure (guint first_capacity)
{
  KdPipeline *pipeline = kd_pipeline_new ();
  guint capacities[3] = { first_capacity, 4, 6 };
  KdStageMode modes[3] = { KD_STAGE_ORDERED, KD_STAGE_KEYED, KD_STAGE_PARALLEL };
  guint n_items = kd_test_size (2000, 20000);
  guint i;

  ledger_reset (n_items);
  for (i = 0; i < 3; i++)
    {
      KdDispatcher *stage = kd_pipeline_add_stage (pipeline, NULL, 2, pass_handler, NULL, NULL);

      kd_pipeline_set_stage_mode (pipeline, stage, modes[i]);
      kd_dispatcher_set_capacity (stage, capacities[i]);
      kd_dispatcher_set_item_free (stage, item_free);
    }
  kd_pipeline_set_sink (pipeline, slow_sink, NULL, NULL);

  for (i = 0; i < n_items; i++)
    {
      char *name = key_name (i % 5);

      g_assert_true (kd_pipeline_submit (pipeline, name, item_new (i, i % 5, i / 5), NULL));
      g_free (name);
    }
  kd_pipeline_wait (pipeline);

  /* One more: the item in the producer's hand. */
  g_assert_cmpint (ledger.max_live, <=, first_capacity + 4 + 6 + 1);
  g_object_unref (pipeline);
  ledger_check_all_freed_once ();
}

static void
test_backpressure (void)
{
  g_test_summary ("A slow sink holds back every stage up to the producer: the items "
                  "in flight never exceed the sum of the stage bounds");

  /* An ordered stage's producer sleeps when the stage's tickets run out,
   * and is woken once a sixteenth of them came back (at least one). */
  check_backpressure (8);
  check_backpressure (48);
}

/* ------------------------------------------------------------------------ */
/* Fan-out and filtering; a stage that fails some items                     */

typedef struct
{
  gint  reached[10];
  gint  failures;
  gint  wrong_errors;
  gint  next_id;
} Fan;

static gboolean
fan_handler (KdJob    *job,
             gpointer  user_data,
             GError  **error)
{
  Fan *fan = user_data;
  Item *item = kd_job_get_item (job);
  guint copies = item->id % 4;
  guint c;

  /* 0 copies filters the item out; its stage frees it. */
  for (c = 0; c < copies; c++)
    {
      Item *copy = item_new (g_atomic_int_add (&fan->next_id, 1), item->key, item->seq);

      if (!kd_job_emit (job, kd_job_get_key (job), copy, error))
        {
          item_free (copy);
          return FALSE;
        }
    }
  return TRUE;
}

#define FAIL_ERROR (g_quark_from_static_string ("kd-test-fail"))

static gboolean
failing_stage_handler (KdJob    *job,
                       gpointer  user_data,
                       GError  **error)
{
  Item *item = kd_job_get_item (job);

  /* A failing item emits nothing; the pipeline goes on. */
  if (item->id % 5 == 0)
    {
      g_set_error (error, FAIL_ERROR, 7, "item %u failed", item->id);
      return FALSE;
    }
  return kd_job_emit (job, kd_job_get_key (job), item, error);
}

static void
failing_stage_done (KdJob        *job,
                    const GError *error,
                    gpointer      user_data)
{
  Fan *fan = user_data;
  Item *item = kd_job_get_item (job);

  if (error == NULL)
    return;
  if (g_error_matches (error, FAIL_ERROR, 7) && item != NULL && item->id % 5 == 0)
    g_atomic_int_inc (&fan->failures);
  else
    g_atomic_int_inc (&fan->wrong_errors);
}

static void
fan_sink (const char *key,
          gpointer    data,
          gpointer    user_data)
{
  Fan *fan = user_data;
  Item *item = data;

  g_atomic_int_inc (&fan->reached[item->key]);
  item_free (item);
}

static void
test_fan_out_filter_fail (void)
{
  Fan fan = { 0 };
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *split, *check;
  guint n_items = 400;
  gint expected_copies = 0, expected_failures = 0;
  gint expected_reached[10] = { 0 };
  guint i;

  g_test_summary ("A handler may emit many items or none; a stage that fails an item "
                  "reports its GError through the stage's done callback, emits "
                  "nothing for it, and the pipeline goes on");

  ledger_reset (0);
  fan.next_id = 1000000;
  split = kd_pipeline_add_stage (pipeline, "split", 3, fan_handler, &fan, NULL);
  kd_pipeline_set_stage_mode (pipeline, split, KD_STAGE_ORDERED);
  kd_dispatcher_set_item_free (split, item_free);
  check = kd_pipeline_add_stage (pipeline, "check", 2, failing_stage_handler, &fan, NULL);
  kd_dispatcher_set_item_free (check, item_free);
  kd_dispatcher_set_done_func (check, failing_stage_done, &fan, NULL);
  kd_pipeline_set_sink (pipeline, fan_sink, &fan, NULL);

  for (i = 0; i < n_items; i++)
    {
      char *name = key_name (i % 10);
      guint c;

      g_assert_true (kd_pipeline_submit (pipeline, name, item_new (i, i % 10, i / 10), NULL));
      g_free (name);
      for (c = 0; c < i % 4; c++)
        {
          guint copy_id = 1000000 + (guint) expected_copies++;

          if (copy_id % 5 == 0)
            expected_failures++;
          else
            expected_reached[i % 10]++;
        }
    }
  kd_pipeline_wait (pipeline);

  g_assert_cmpint (fan.failures, ==, expected_failures);
  g_assert_cmpint (fan.wrong_errors, ==, 0);
  /* Which copy ids fail depends on emit order across keys, so compare the
   * totals, and every key got its share of copies. */
  {
    gint total = 0, expected_total = 0;

    for (i = 0; i < 10; i++)
      {
        total += fan.reached[i];
        expected_total += expected_reached[i];
      }
    g_assert_cmpint (total, ==, expected_total);
  }

  g_object_unref (pipeline);
  g_assert_cmpint (ledger.freed, ==, ledger.allocated);
  g_assert_cmpint (ledger.allocated, ==, (gint) n_items + expected_copies);
}

/* ------------------------------------------------------------------------ */
/* close drains stage by stage                                              */

typedef struct
{
  KdTestHold     hold;         /* items 0 and 1 */
  KdPipeline    *pipeline;
  gint           emitted_after_close;
  gint           reached;
} Drain;

static gboolean
drain_first (KdJob    *job,
             gpointer  user_data,
             GError  **error)
{
  Drain *drain = user_data;
  Item *item = kd_job_get_item (job);
  gboolean held = item->id < 2;

  if (held)
    g_assert_true (kd_test_hold_enter (&drain->hold));
  /* Once emitted, the item is the next stage's: do not touch it again. */
  if (!kd_job_emit (job, kd_job_get_key (job), item, error))
    return FALSE;
  if (held)
    g_atomic_int_inc (&drain->emitted_after_close);
  return TRUE;
}

static void
drain_sink (const char *key,
            gpointer    data,
            gpointer    user_data)
{
  Drain *drain = user_data;

  g_atomic_int_inc (&drain->reached);
  item_free (data);
}

static void
test_close_drains (void)
{
  Drain drain = { 0 };
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *first, *second;
  GError *error = NULL;
  guint n_items = 100;
  guint threads_before = kd_test_threads_settle (0);
  Item *refused;
  KdStats stats;
  guint i;

  g_test_summary ("close stops new items but lets every accepted one through: a "
                  "stage stays open until the one before it has drained, then closes");

  ledger_reset (n_items + 1);
  kd_test_hold_init (&drain.hold);
  first = kd_pipeline_add_stage (pipeline, "first", 2, drain_first, &drain, NULL);
  kd_pipeline_set_stage_mode (pipeline, first, KD_STAGE_PARALLEL);
  kd_dispatcher_set_item_free (first, item_free);
  second = kd_pipeline_add_stage (pipeline, "second", 2, pass_handler, NULL, NULL);
  kd_dispatcher_set_item_free (second, item_free);
  kd_pipeline_set_sink (pipeline, drain_sink, &drain, NULL);

  for (i = 0; i < n_items; i++)
    g_assert_true (kd_pipeline_submit (pipeline, "k", item_new (i, 0, i), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&drain.hold, 2));

  kd_pipeline_close (pipeline);
  kd_pipeline_close (pipeline);

  refused = item_new (n_items, 0, 0);
  g_assert_false (kd_pipeline_submit (pipeline, "k", refused, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);
  item_free (refused);

  /* The held items emit into the second stage after close: still open. */
  kd_test_hold_release (&drain.hold);
  kd_pipeline_wait (pipeline);

  g_assert_cmpint (drain.emitted_after_close, ==, 2);
  g_assert_cmpint (drain.reached, ==, n_items);
  kd_dispatcher_get_stats (second, &stats);
  g_assert_cmpuint (stats.completed, ==, n_items);
  g_assert_cmpuint (stats.cancelled, ==, 0);
  /* Both stages closed and drained: their workers are gone. */
  g_assert_cmpuint (kd_test_threads_settle (threads_before), ==, threads_before);

  g_object_unref (pipeline);
  ledger_check_all_freed_once ();
  kd_test_hold_clear (&drain.hold);
}

/* wait_until and wait_async: the barrier with a deadline, and without
 * blocking. */
typedef struct
{
  gboolean called;
  gboolean waited;
  GError  *error;
  gint     reached;   /* items at the sink when the callback ran */
  Drain   *drain;
} PipelineWaited;

static void
on_pipeline_waited (GObject      *source,
                    GAsyncResult *result,
                    gpointer      user_data)
{
  PipelineWaited *waited = user_data;

  g_assert_false (waited->called);
  waited->called = TRUE;
  waited->waited = kd_pipeline_wait_finish (KD_PIPELINE (source), result, &waited->error);
  waited->reached = g_atomic_int_get (&waited->drain->reached);
}

static gboolean
pipeline_waited_called (gpointer user_data)
{
  return ((PipelineWaited *) user_data)->called;
}

static void
test_wait_until_and_async (void)
{
  GMainContext *context = g_main_context_new ();
  Drain drain = { 0 };
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *first, *second;
  GCancellable *cancellable = g_cancellable_new ();
  PipelineWaited waited = { 0 }, cancelled = { 0 };
  guint n_items = 20;
  gint64 end_time;
  guint i;

  g_test_summary ("A pipeline's wait_until gives up, not early, while an item is held "
                  "in its first stage; its wait_async completes in the caller's context "
                  "only once every item reached the sink, and a cancelled one completes "
                  "with CANCELLED at once");

  g_main_context_push_thread_default (context);
  ledger_reset (n_items);
  kd_test_hold_init (&drain.hold);
  waited.drain = cancelled.drain = &drain;
  first = kd_pipeline_add_stage (pipeline, "first", 2, drain_first, &drain, NULL);
  kd_pipeline_set_stage_mode (pipeline, first, KD_STAGE_PARALLEL);
  kd_dispatcher_set_item_free (first, item_free);
  second = kd_pipeline_add_stage (pipeline, "second", 2, pass_handler, NULL, NULL);
  kd_dispatcher_set_item_free (second, item_free);
  kd_pipeline_set_sink (pipeline, drain_sink, &drain, NULL);

  for (i = 0; i < n_items; i++)
    g_assert_true (kd_pipeline_submit (pipeline, "k", item_new (i, 0, i), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&drain.hold, 2));

  end_time = g_get_monotonic_time () + 2 * G_TIME_SPAN_MILLISECOND;
  g_assert_false (kd_pipeline_wait_until (pipeline, end_time));
  g_assert_cmpint (g_get_monotonic_time (), >=, end_time);

  kd_pipeline_wait_async (pipeline, NULL, on_pipeline_waited, &waited);
  kd_pipeline_wait_async (pipeline, cancellable, on_pipeline_waited, &cancelled);
  g_cancellable_cancel (cancellable);
  g_assert_true (kd_test_iterate_until (context, pipeline_waited_called, &cancelled));
  g_assert_error (cancelled.error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_clear_error (&cancelled.error);
  g_assert_false (waited.called);

  kd_test_hold_release (&drain.hold);
  g_assert_true (kd_test_iterate_until (context, pipeline_waited_called, &waited));
  g_assert_true (waited.waited);
  g_assert_no_error (waited.error);
  g_assert_cmpint (waited.reached, ==, n_items);
  g_assert_true (kd_pipeline_wait_until (pipeline, g_get_monotonic_time () + KD_TEST_DEADLINE_US));

  g_object_unref (pipeline);
  g_object_unref (cancellable);
  ledger_check_all_freed_once ();
  kd_test_hold_clear (&drain.hold);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

/* ------------------------------------------------------------------------ */
/* What an ordered stage's items emit behind the head counts                */

typedef struct
{
  guint       bound;          /* the ordered stage's capacity */
  guint       per_item;       /* what the emitting items emit each */
  KdTestGate  release_head;   /* lets item 0 end */
  gint        emitted;        /* atomic: emits that returned TRUE */
  gint        sunk;           /* atomic */
  guint       next_seq[4];    /* at the sink, per key (one call at a time per key) */
  gint        violations;
  GRand      *rand;           /* the stress's: which items fail, and how much they emit */
  guint       fail_first_of;  /* the stress: items with id % this == 1 fail their first attempt */
  GMutex      sink_lock;
} Emits;

static gboolean
emits_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  Emits *emits = user_data;
  Item *item = kd_job_get_item (job);
  guint n = item->seq == 0 ? 1 : emits->per_item, i;

  if (item->id == 0 && kd_job_get_attempt (job) == 1 && emits->per_item > 1000)
    g_assert_true (kd_test_gate_wait (&emits->release_head));

  if (emits->fail_first_of > 0 && item->id % emits->fail_first_of == 1 &&
      kd_job_get_attempt (job) == 1)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_FAILED, "item %u fails once", item->id);
      return FALSE;
    }

  for (i = 0; i < n; i++)
    {
      Item *out = item_new (item->id, item->key, item->seq * 100000 + i);
      gint in_flight;

      if (!kd_job_emit (job, kd_job_get_key (job), out, error))
        {
          item_free (out);
          return FALSE;
        }
      /* What this stage emitted and the sink has not seen waits in the
       * stage: never more than its bound. */
      in_flight = g_atomic_int_add (&emits->emitted, 1) + 1 - g_atomic_int_get (&emits->sunk);
      if (in_flight > (gint) emits->bound)
        g_error ("%d items emitted and not yet at the sink, for a bound of %u", in_flight,
                 emits->bound);
    }
  return TRUE;
}

static void
emits_sink (const char *key,
            gpointer    data,
            gpointer    user_data)
{
  Emits *emits = user_data;
  Item *item = data;

  /* An ordered stage before a sink: the thread that passes a key's items
   * on calls the sink, one at a time per key, in order. */
  if (item->seq < emits->next_seq[item->key])
    g_atomic_int_inc (&emits->violations);
  emits->next_seq[item->key] = item->seq;
  g_atomic_int_inc (&emits->sunk);
  item_free (item);
}

static KdPipeline *
emits_pipeline (Emits *emits,
                guint  n_workers,
                guint  bound)
{
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *stage = kd_pipeline_add_stage (pipeline, "ordered", n_workers, emits_handler,
                                               emits, NULL);

  emits->bound = bound;
  kd_pipeline_set_stage_mode (pipeline, stage, KD_STAGE_ORDERED);
  kd_dispatcher_set_capacity (stage, bound);
  kd_dispatcher_set_item_free (stage, item_free);
  kd_pipeline_set_sink (pipeline, emits_sink, emits, NULL);
  return pipeline;
}

static void
test_ordered_emit_bounded (void)
{
  Emits emits = { 0 };
  KdPipeline *pipeline;

  g_test_summary ("An item of an ordered stage that emits 200,000 items behind a head that is "
                  "still running holds no more of them than the stage's bound: its emit waits, "
                  "and everything reaches the sink in order once the head ended");

  ledger_reset (0);
  kd_test_gate_init (&emits.release_head);
  emits.per_item = kd_test_size (200000, 2000000);
  pipeline = emits_pipeline (&emits, 2, 4);

  g_assert_true (kd_pipeline_submit (pipeline, "k", item_new (0, 0, 0), NULL));
  g_assert_true (kd_pipeline_submit (pipeline, "k", item_new (1, 0, 1), NULL));
  /* The second item waits for room, having emitted what the bound allows
   * (the handler checks it after each emit). */
  kd_pipeline_wait_ticket_sleepers (pipeline, kd_pipeline_get_stage (pipeline, 0), 1);
  g_assert_cmpint (g_atomic_int_get (&emits.emitted), <=, 4);
  g_assert_cmpint (g_atomic_int_get (&emits.sunk), ==, 0);

  kd_test_gate_open (&emits.release_head);
  kd_pipeline_wait (pipeline);
  g_assert_cmpint (emits.sunk, ==, (gint) emits.per_item + 1);
  g_assert_cmpint (emits.violations, ==, 0);

  g_object_unref (pipeline);
  ledger_check_all_freed_once ();
  g_assert_cmpint (ledger.max_live, <=, 4 + 2 + 2);
  kd_test_gate_clear (&emits.release_head);
}

static void
test_ordered_emit_stress (void)
{
  guint rounds = kd_test_size (12, 60);
  guint r;

  g_test_summary ("Ordered stages of 1 to 3 workers and bounds of 2 to 8, whose items emit up to "
                  "300 items each over 3 keys, some failing once and retried: nothing waits for "
                  "ever, every emitted item reaches the sink in per-key order, and no more than "
                  "the bound waits in the stage");

  for (r = 0; r < rounds; r++)
    {
      Emits emits = { 0 };
      KdPipeline *pipeline;
      guint n_items = 60, i, expected = 0;
      guint *per_key_seq = g_new0 (guint, 3);

      ledger_reset (0);
      kd_test_gate_init (&emits.release_head);
      emits.per_item = 1 + r * 25 % 300;
      emits.fail_first_of = r % 2 == 0 ? 7 : 0;
      pipeline = emits_pipeline (&emits, 1 + r % 3, 2 + r % 7);
      if (emits.fail_first_of > 0)
        kd_dispatcher_set_retry (kd_pipeline_get_stage (pipeline, 0), 2, 100, 100);

      for (i = 0; i < n_items; i++)
        {
          guint key = (i * 7 + r) % 3;

          g_assert_true (kd_pipeline_submit (pipeline, (const char *[]) { "a", "b", "c" }[key],
                                             item_new (i, key, per_key_seq[key]++), NULL));
          expected += per_key_seq[key] == 1 ? 1 : emits.per_item;
        }
      kd_pipeline_wait (pipeline);
      g_assert_cmpint (emits.sunk, ==, (gint) expected);
      g_assert_cmpint (emits.violations, ==, 0);
      g_object_unref (pipeline);
      ledger_check_all_freed_once ();
      kd_test_gate_clear (&emits.release_head);
      g_free (per_key_seq);
    }
}

static void
test_ordered_retry_waits_on_worker (void)
{
  Emits emits = { 0 };
  KdPipeline *pipeline;
  guint i;

  g_test_summary ("An ordered stage's head that fails and will be retried keeps its worker while "
                  "it waits: with 2 workers and 3 items behind it that emit more than the bound, "
                  "the retry still runs and everything drains (a retry waiting for a free worker "
                  "would wait for ever)");

  ledger_reset (0);
  kd_test_gate_init (&emits.release_head);
  emits.per_item = 1000;
  emits.fail_first_of = 1000;   /* item 1 fails once: the head after item 0 */
  pipeline = emits_pipeline (&emits, 2, 4);
  kd_dispatcher_set_retry (kd_pipeline_get_stage (pipeline, 0), 2, 20 * G_TIME_SPAN_MILLISECOND,
                           20 * G_TIME_SPAN_MILLISECOND);

  for (i = 0; i < 5; i++)
    g_assert_true (kd_pipeline_submit (pipeline, "k", item_new (i, 0, i), NULL));
  kd_pipeline_wait (pipeline);
  g_assert_cmpint (emits.sunk, ==, 1 + 4 * 1000);
  g_assert_cmpint (emits.violations, ==, 0);

  g_object_unref (pipeline);
  ledger_check_all_freed_once ();
  kd_test_gate_clear (&emits.release_head);
}

/* ------------------------------------------------------------------------ */
/* A feeder waiting for a ticket finds a small gap by itself                */

#define GAP_TICKETS 64

typedef struct
{
  KdPipeline *pipeline;
  KdTestGate  release_head;    /* lets item 0 end */
  KdTestGate  feeder_done;     /* opened once the last submit returned */
  gint        waited_for_feeder;
  gint        refused;
  gint        reached;
} Gap;

static gboolean
gap_handler (KdJob    *job,
             gpointer  user_data,
             GError  **error)
{
  Gap *gap = user_data;
  Item *item = kd_job_get_item (job);

  if (item->id == 0)
    g_assert_true (kd_test_gate_wait (&gap->release_head));
  else if (item->id == 2 && kd_test_gate_wait (&gap->feeder_done))
    g_atomic_int_set (&gap->waited_for_feeder, TRUE);
  /* Only these emit: what the others emitted behind item 0 would take the
   * room the feeder waits for (and item 2 waits for the feeder). */
  if (item->id != 0 && item->id != 2 && item->id != GAP_TICKETS)
    return TRUE;
  return kd_job_emit (job, kd_job_get_key (job), item, error);
}

/* The items that reach the sink, in order. */
static const guint gap_reaching[] = { 0, 2, GAP_TICKETS };

static void
gap_sink (const char *key,
          gpointer    data,
          gpointer    user_data)
{
  Gap *gap = user_data;
  Item *item = data;

  /* Only the thread that passes the stage's items on calls the sink. */
  if (gap->reached >= (gint) G_N_ELEMENTS (gap_reaching) || item->seq != gap_reaching[gap->reached])
    g_error ("item %u reached the sink as number %d", item->seq, gap->reached);
  gap->reached++;
  item_free (item);
}

static gpointer
gap_feeder (gpointer data)
{
  Gap *gap = data;
  guint i;

  for (i = 0; i <= GAP_TICKETS; i++)
    {
      Item *item = item_new (i, 0, i);

      if (!kd_pipeline_submit (gap->pipeline, "k", item, NULL))
        {
          g_atomic_int_inc (&gap->refused);
          item_free (item);
        }
    }
  kd_test_gate_open (&gap->feeder_done);
  return NULL;
}

static void
run_ordered_small_gap (gboolean close_while_waiting)
{
  Gap gap = { 0 };
  KdDispatcher *stage;
  GThread *feeder;
  KdStats stats;

  ledger_reset (GAP_TICKETS + 1);
  kd_test_gate_init (&gap.release_head);
  kd_test_gate_init (&gap.feeder_done);
  gap.pipeline = kd_pipeline_new ();
  stage = kd_pipeline_add_stage (gap.pipeline, "ordered", 4, gap_handler, &gap, NULL);
  kd_pipeline_set_stage_mode (gap.pipeline, stage, KD_STAGE_ORDERED);
  kd_dispatcher_set_capacity (stage, GAP_TICKETS);
  kd_dispatcher_set_item_free (stage, item_free);
  kd_pipeline_set_sink (gap.pipeline, gap_sink, &gap, NULL);

  /* Items 0 and 2 hold; the others end but keep their tickets behind
   * item 0, so the feeder's last item waits for a ticket... */
  feeder = g_thread_new ("feeder", gap_feeder, &gap);
  kd_pipeline_wait_ticket_sleepers (gap.pipeline, stage, 1);

  /* (That item was admitted before the close: it is accepted.) */
  if (close_while_waiting)
    kd_pipeline_close (gap.pipeline);

  /* ...and gets one once item 0 (and 1) give theirs back: two tickets,
   * fewer than a wake-up takes, and item 2 waits for the feeder. */
  kd_test_gate_open (&gap.release_head);
  g_thread_join (feeder);

  kd_pipeline_close (gap.pipeline);
  kd_pipeline_wait (gap.pipeline);
  g_assert_true (g_atomic_int_get (&gap.waited_for_feeder));
  g_assert_cmpint (gap.refused, ==, 0);
  g_assert_cmpint (gap.reached, ==, G_N_ELEMENTS (gap_reaching));
  kd_dispatcher_get_stats (stage, &stats);
  g_assert_cmpuint (stats.submitted, ==, GAP_TICKETS + 1);
  g_assert_cmpuint (stats.completed, ==, GAP_TICKETS + 1);

  g_object_unref (gap.pipeline);
  ledger_check_all_freed_once ();
  kd_test_gate_clear (&gap.release_head);
  kd_test_gate_clear (&gap.feeder_done);
}

static void
test_ordered_small_gap (void)
{
  g_test_summary ("a feeder asleep for one of an ordered stage's tickets takes one as "
                  "soon as one is back, even when too few come back to wake it and "
                  "the stage's running items wait for that feeder");
  run_ordered_small_gap (FALSE);
}

static void
test_ordered_close_while_waiting (void)
{
  g_test_summary ("an item admitted into an ordered stage before close is accepted "
                  "even if it still waits for its ticket when close comes: the stage "
                  "does not count as drained before it, and it reaches the end in order");
  run_ordered_small_gap (TRUE);
}

/* ------------------------------------------------------------------------ */
/* Stages fed directly, and items handed back on a stage's main context      */

static void
count_sink (const char *key,
            gpointer    data,
            gpointer    user_data)
{
  gint *reached = user_data;

  (*reached)++;   /* the last stage is keyed, one key: one call at a time */
  item_free (data);
}

static void
test_direct_stage_submit (void)
{
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *first, *ordered;
  gint reached = 0;
  guint i;

  g_test_summary ("Items submitted to a stage's own dispatcher (kd_pipeline_get_stage()) "
                  "flow on through an ordered stage after it like any others");

  ledger_reset (10);
  first = kd_pipeline_add_stage (pipeline, "first", 1, pass_handler, NULL, NULL);
  kd_dispatcher_set_item_free (first, item_free);
  ordered = kd_pipeline_add_stage (pipeline, "ordered", 2, pass_handler, NULL, NULL);
  kd_pipeline_set_stage_mode (pipeline, ordered, KD_STAGE_ORDERED);
  kd_dispatcher_set_item_free (ordered, item_free);
  kd_pipeline_add_stage (pipeline, "last", 1, pass_handler, NULL, NULL);
  kd_pipeline_set_sink (pipeline, count_sink, &reached, NULL);

  for (i = 0; i < 10; i++)
    g_assert_true (kd_dispatcher_submit (kd_pipeline_get_stage (pipeline, 0), "k",
                                         item_new (i, 0, i), NULL));
  kd_pipeline_wait (pipeline);
  g_assert_cmpint (reached, ==, 10);

  g_object_unref (pipeline);
  ledger_check_all_freed_once ();
}

typedef struct
{
  KdTestHold    head;          /* item 0 */
  KdTestCounter emitted;
  GThread      *context_thread;
  guint         done_calls;
  guint         wrong_thread;
  gboolean      closed_error;
} HandBack;

static gboolean
hand_back_first (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  HandBack *hb = user_data;
  Item *item = kd_job_get_item (job);

  if (item->id == 0)
    g_assert_true (kd_test_hold_enter (&hb->head));
  if (!kd_job_emit (job, kd_job_get_key (job), item, error))
    return FALSE;
  kd_test_counter_add (&hb->emitted, 1);
  return TRUE;
}

static void
hand_back_done (KdJob        *job,
                const GError *error,
                gpointer      user_data)
{
  HandBack *hb = user_data;

  if (g_thread_self () != hb->context_thread)
    hb->wrong_thread++;
  hb->closed_error = g_error_matches (error, KD_ERROR, KD_ERROR_CLOSED);
  hb->done_calls++;
}

static gboolean
hand_back_delivered (gpointer user_data)
{
  HandBack *hb = user_data;

  return hb->done_calls == 1;
}

static void
test_hand_back_on_context (void)
{
  GMainContext *context = g_main_context_new ();
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *first, *second;
  HandBack hb = { 0 };

  g_test_summary ("An item an ordered stage buffered for a next stage that was "
                  "cancelled meanwhile is handed back through that stage's done "
                  "callback in the stage's main context, like any of its jobs");

  ledger_reset (2);
  kd_test_hold_init (&hb.head);
  kd_test_counter_init (&hb.emitted);
  hb.context_thread = g_thread_self ();

  first = kd_pipeline_add_stage (pipeline, "first", 2, hand_back_first, &hb, NULL);
  kd_pipeline_set_stage_mode (pipeline, first, KD_STAGE_ORDERED);
  kd_dispatcher_set_item_free (first, item_free);
  second = kd_pipeline_add_stage (pipeline, "second", 1, pass_handler, NULL, NULL);
  kd_dispatcher_set_item_free (second, item_free);
  kd_dispatcher_set_main_context (second, context);
  kd_dispatcher_set_done_func (second, hand_back_done, &hb, NULL);

  /* Item 1 emits behind item 0, which holds; then everything is cancelled
   * and item 0 ends: item 1's emit finds the second stage closed. Item 0
   * must be running at the cancel: had it not started, the cancel would
   * end it in the first stage and let item 1 into the second stage before
   * that one heard of the cancel, to end there cancelled instead. */
  g_assert_true (kd_pipeline_submit (pipeline, "k", item_new (0, 0, 0), NULL));
  g_assert_true (kd_pipeline_submit (pipeline, "k", item_new (1, 0, 1), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&hb.head, 1));
  g_assert_true (kd_test_counter_wait (&hb.emitted, 1));
  g_cancellable_cancel (kd_pipeline_get_cancellable (pipeline));
  kd_test_hold_release (&hb.head);
  kd_pipeline_wait (pipeline);

  /* Not on the worker that flushed it: in the context, once iterated. */
  g_assert_cmpuint (hb.done_calls, ==, 0);
  g_assert_true (kd_test_iterate_until (context, hand_back_delivered, &hb));
  g_assert_cmpuint (hb.wrong_thread, ==, 0);
  g_assert_true (hb.closed_error);

  g_object_unref (pipeline);
  ledger_check_all_freed_once ();
  kd_test_hold_clear (&hb.head);
  kd_test_counter_clear (&hb.emitted);
  g_main_context_unref (context);
}

/* The last reference to a pipeline goes in a stage's done callback, in
 * that stage's main context, while an item is still held in the first
 * stage. */
typedef struct
{
  KdTestHold  hold;          /* item 0, in the first stage */
  KdPipeline *pipeline;      /* the test's reference, dropped in the callback */
  gboolean    unref_returned;
  KdTestGate  finished;      /* the sink's data freed: the shutdown finished */
} LastUnref;

static gboolean
last_unref_first (KdJob    *job,
                  gpointer  user_data,
                  GError  **error)
{
  LastUnref *lu = user_data;
  Item *item = kd_job_get_item (job);

  if (item->id == 0)
    g_assert_true (kd_test_hold_enter (&lu->hold));
  return kd_job_emit (job, kd_job_get_key (job), item, error);
}

static void
last_unref_done (KdJob        *job,
                 const GError *error,
                 gpointer      user_data)
{
  LastUnref *lu = user_data;

  if (lu->pipeline != NULL)
    {
      g_clear_object (&lu->pipeline);
      lu->unref_returned = TRUE;
    }
}

static void
last_unref_finished (gpointer user_data)
{
  kd_test_gate_open (user_data);
}

static void
last_unref_sink (const char *key,
                 gpointer    data,
                 gpointer    user_data)
{
  item_free (data);
}

static gboolean
last_unref_returned (gpointer user_data)
{
  return ((LastUnref *) user_data)->unref_returned;
}

static void
test_last_unref_in_stage_context (void)
{
  GMainContext *context = g_main_context_new ();
  LastUnref lu = { 0 };
  KdDispatcher *first, *second;

  g_test_summary ("The pipeline's last unref in a stage's done callback, in that stage's "
                  "main context, returns at once while an item is still held: the "
                  "shutdown finishes elsewhere, and every item still reaches the sink");

  ledger_reset (2);
  kd_test_hold_init (&lu.hold);
  kd_test_gate_init (&lu.finished);
  lu.pipeline = kd_pipeline_new ();
  first = kd_pipeline_add_stage (lu.pipeline, "first", 2, last_unref_first, &lu, NULL);
  kd_pipeline_set_stage_mode (lu.pipeline, first, KD_STAGE_PARALLEL);
  kd_dispatcher_set_item_free (first, item_free);
  second = kd_pipeline_add_stage (lu.pipeline, "second", 1, pass_handler, NULL, NULL);
  kd_dispatcher_set_item_free (second, item_free);
  kd_dispatcher_set_main_context (second, context);
  kd_dispatcher_set_done_func (second, last_unref_done, &lu, NULL);
  kd_pipeline_set_sink (lu.pipeline, last_unref_sink, &lu.finished, last_unref_finished);

  g_assert_true (kd_pipeline_submit (lu.pipeline, "a", item_new (0, 0, 0), NULL));
  g_assert_true (kd_pipeline_submit (lu.pipeline, "b", item_new (1, 1, 0), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&lu.hold, 1));

  /* Item 1's done callback drops the last reference; item 0 is held until
   * the iteration that ran it returns. */
  g_assert_true (kd_test_iterate_until (context, last_unref_returned, &lu));
  g_assert_false (kd_test_gate_wait_for (&lu.finished, 0));

  kd_test_hold_release (&lu.hold);
  g_assert_true (kd_test_gate_wait (&lu.finished));
  ledger_check_all_freed_once ();

  kd_test_hold_clear (&lu.hold);
  kd_test_gate_clear (&lu.finished);
  g_main_context_unref (context);
}

/* ------------------------------------------------------------------------ */
/* Cancel at random moments                                                 */

typedef struct
{
  KdPipeline *pipeline;
  guint       n_submitted;
  guint       next_child;
  gint        refused_emits;
  gint        stop;
  guint32     seed;
} Chaos;

static gboolean
chaos_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  Chaos *chaos = user_data;
  Item *item = kd_job_get_item (job);
  guint32 rng = item->id * 2654435761u + chaos->seed;
  guint what = kd_test_xorshift (&rng) % 10;

  kd_test_spin (kd_test_xorshift (&rng) % 3000);

  if (what == 0)
    {
      g_set_error_literal (error, FAIL_ERROR, 1, "random failure");
      return FALSE;
    }
  if (what == 1)
    return TRUE;  /* filtered: the stage frees it */

  if (what == 2)
    {
      /* A child as well: it must be accounted for too. */
      Item *child = item_new (G_MAXUINT, item->key, 0);

      if (!kd_job_emit (job, kd_job_get_key (job), child, NULL))
        {
          g_atomic_int_inc (&chaos->refused_emits);
          item_free (child);
        }
    }

  if (!kd_job_emit (job, kd_job_get_key (job), item, NULL))
    g_atomic_int_inc (&chaos->refused_emits);  /* still the job's: its stage frees it */
  return TRUE;
}

static void
chaos_sink (const char *key,
            gpointer    data,
            gpointer    user_data)
{
  item_free (data);
}

static gpointer
chaos_producer (gpointer data)
{
  Chaos *chaos = data;
  guint i;

  for (i = 0; !g_atomic_int_get (&chaos->stop); i++)
    {
      char *name = key_name (i % 20);
      Item *item = item_new (i, i % 20, i / 20);

      if (!kd_pipeline_submit (chaos->pipeline, name, item, NULL))
        {
          item_free (item);  /* refused: still ours */
          g_free (name);
          break;
        }
      g_free (name);
    }
  chaos->n_submitted = i;
  return NULL;
}

static void
chaos_round (guint32 seed)
{
  KdStageMode modes[3] = { KD_STAGE_ORDERED, KD_STAGE_KEYED, KD_STAGE_PARALLEL };
  Chaos chaos = { 0 };
  GThread *producer;
  guint32 rng = seed;
  guint cancel_after;
  guint i;

  ledger_reset (0);
  chaos.seed = seed;
  chaos.pipeline = kd_pipeline_new ();
  for (i = 0; i < 3; i++)
    {
      KdDispatcher *stage = kd_pipeline_add_stage (chaos.pipeline, NULL, 2, chaos_handler,
                                                   &chaos, NULL);

      kd_pipeline_set_stage_mode (chaos.pipeline, stage, modes[(i + seed) % 3]);
      kd_dispatcher_set_capacity (stage, 4 + kd_test_xorshift (&rng) % 30);
      kd_dispatcher_set_item_free (stage, item_free);
    }
  kd_pipeline_set_sink (chaos.pipeline, chaos_sink, NULL, NULL);

  /* Cancel once a random number of items were allocated, wherever they are. */
  cancel_after = 50 + kd_test_xorshift (&rng) % 2000;
  g_atomic_int_set (&ledger.trigger_at, (gint) cancel_after);
  producer = g_thread_new ("chaos", chaos_producer, &chaos);
  g_assert_true (kd_test_gate_wait (&ledger.triggered));
  g_cancellable_cancel (kd_pipeline_get_cancellable (chaos.pipeline));
  g_atomic_int_set (&chaos.stop, TRUE);
  g_thread_join (producer);

  kd_pipeline_wait (chaos.pipeline);

  /* Every item ever allocated, by the producer or a handler, was freed
   * exactly once: by a stage, the sink, or the code that was refused. */
  g_assert_cmpint (g_atomic_int_get (&ledger.freed), ==, g_atomic_int_get (&ledger.allocated));

  for (i = 0; i < 3; i++)
    {
      KdStats stats;

      kd_dispatcher_get_stats (kd_pipeline_get_stage (chaos.pipeline, i), &stats);
      g_assert_cmpuint (stats.pending, ==, 0);
      g_assert_cmpuint (stats.submitted, ==, stats.completed + stats.failed + stats.cancelled);
    }

  g_object_unref (chaos.pipeline);
  g_assert_cmpint (ledger.freed, ==, ledger.allocated);
}

static void
test_cancel_accounting (void)
{
  guint n_rounds = kd_test_size (30, 500);
  guint round;

  g_test_summary ("Cancelling at random moments, with random failures, filters and "
                  "children: every item anywhere in flight ends exactly once and "
                  "every stage's accounting holds");

  for (round = 0; round < n_rounds; round++)
    {
      guint32 seed = 0x9e3779b9u * (round + 1);

      g_test_message ("round %u, seed %u", round, seed);
      chaos_round (seed);
    }
}

/* ------------------------------------------------------------------------ */
/* Emitting after cancellation                                              */

typedef struct
{
  KdTestHold  hold;
  GError     *emit_errors[2];
  gint        emitted;
} Late;

static gboolean
late_handler (KdJob    *job,
              gpointer  user_data,
              GError  **error)
{
  Late *late = user_data;
  Item *item = kd_job_get_item (job);

  g_assert_true (kd_test_hold_enter (&late->hold));
  if (kd_job_emit (job, kd_job_get_key (job), item, &late->emit_errors[item->id]))
    g_atomic_int_inc (&late->emitted);
  return TRUE;
}

static void
test_emit_after_cancel (void)
{
  Late late = { 0 };
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *first, *second;
  guint i;

  g_test_summary ("Emitting after the pipeline was cancelled fails with "
                  "KD_ERROR_CLOSED, and the item stays the job's (its stage frees "
                  "it), also for an ordered stage's job that would have buffered it");

  ledger_reset (2);
  kd_test_hold_init (&late.hold);
  first = kd_pipeline_add_stage (pipeline, "first", 2, late_handler, &late, NULL);
  kd_pipeline_set_stage_mode (pipeline, first, KD_STAGE_ORDERED);
  kd_dispatcher_set_item_free (first, item_free);
  second = kd_pipeline_add_stage (pipeline, "second", 1, pass_handler, NULL, NULL);
  kd_dispatcher_set_item_free (second, item_free);

  /* Two items of one key running at once: the second is not the head of
   * the ordered stage, so its emit would be buffered. */
  g_assert_true (kd_pipeline_submit (pipeline, "k", item_new (0, 0, 0), NULL));
  g_assert_true (kd_pipeline_submit (pipeline, "k", item_new (1, 0, 1), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&late.hold, 2));
  g_cancellable_cancel (kd_pipeline_get_cancellable (pipeline));
  kd_test_hold_release (&late.hold);
  kd_pipeline_wait (pipeline);

  g_assert_cmpint (late.emitted, ==, 0);
  for (i = 0; i < 2; i++)
    {
      g_assert_error (late.emit_errors[i], KD_ERROR, KD_ERROR_CLOSED);
      g_clear_error (&late.emit_errors[i]);
    }

  g_object_unref (pipeline);
  ledger_check_all_freed_once ();
  kd_test_hold_clear (&late.hold);
}

/* ------------------------------------------------------------------------ */
/* No sink; the last unref                                                  */

static void
test_no_sink (void)
{
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *only;
  guint i;

  g_test_summary ("Without a sink, what the last stage emits is freed with that "
                  "stage's item-free function, once");

  ledger_reset (50);
  only = kd_pipeline_add_stage (pipeline, "only", 2, pass_handler, NULL, NULL);
  kd_dispatcher_set_item_free (only, item_free);
  for (i = 0; i < 50; i++)
    g_assert_true (kd_pipeline_submit (pipeline, NULL, item_new (i, 0, 0), NULL));
  kd_pipeline_wait (pipeline);

  g_assert_cmpuint (kd_pipeline_get_n_stages (pipeline), ==, 1);
  g_assert_true (kd_pipeline_get_stage (pipeline, 0) == only);
  g_object_unref (pipeline);
  ledger_check_all_freed_once ();
}

typedef struct
{
  KdPipeline *pipeline;
  KdTestGate  submitted;   /* the test is done with its reference */
  KdTestGate  finalized;
  gint        reached;
} Dropper;

static gboolean
dropping_handler (KdJob    *job,
                  gpointer  user_data,
                  GError  **error)
{
  Dropper *dropper = user_data;
  Item *item = kd_job_get_item (job);

  if (item->id == 0)
    {
      g_assert_true (kd_test_gate_wait (&dropper->submitted));
      g_object_unref (g_steal_pointer (&dropper->pipeline));
    }
  return kd_job_emit (job, kd_job_get_key (job), item, error);
}

static void
dropper_sink (const char *key,
              gpointer    data,
              gpointer    user_data)
{
  Dropper *dropper = user_data;

  g_atomic_int_inc (&dropper->reached);
  item_free (data);
}

static void
dropper_finalized (gpointer user_data)
{
  Dropper *dropper = user_data;

  kd_test_gate_open (&dropper->finalized);
}

static void
test_unref_in_handler (void)
{
  Dropper dropper = { 0 };
  KdDispatcher *stage;
  guint i;

  g_test_summary ("The last unref of a pipeline from inside one of its handlers "
                  "returns at once; the pipeline drains and finalizes on its own");

  ledger_reset (200);
  kd_test_gate_init (&dropper.submitted);
  kd_test_gate_init (&dropper.finalized);
  dropper.pipeline = kd_pipeline_new ();
  stage = kd_pipeline_add_stage (dropper.pipeline, "first", 2, pass_handler, NULL, NULL);
  kd_dispatcher_set_item_free (stage, item_free);
  stage = kd_pipeline_add_stage (dropper.pipeline, "dropping", 1, dropping_handler, &dropper, NULL);
  kd_dispatcher_set_item_free (stage, item_free);
  kd_pipeline_set_sink (dropper.pipeline, dropper_sink, &dropper, dropper_finalized);

  /* Item 0 goes first through the single-worker keyed stage, and drops the
   * only reference once the test is done with it. */
  for (i = 0; i < 200; i++)
    g_assert_true (kd_pipeline_submit (dropper.pipeline, "k", item_new (i, 0, i), NULL));
  kd_test_gate_open (&dropper.submitted);

  g_assert_true (kd_test_gate_wait (&dropper.finalized));
  g_assert_cmpint (dropper.reached, ==, 200);
  ledger_check_all_freed_once ();
  kd_test_gate_clear (&dropper.submitted);
  kd_test_gate_clear (&dropper.finalized);
}

/* ------------------------------------------------------------------------ */
/* The caller's cancellable; replacing the sink                             */

typedef struct
{
  KdTestHold  hold;
  GError     *emit_error;   /* item 0's */
} Stopper;

static gboolean
stop_handler (KdJob    *job,
              gpointer  user_data,
              GError  **error)
{
  Stopper *stopper = user_data;
  Item *item = kd_job_get_item (job);

  if (item->id != 0)
    return kd_job_emit (job, kd_job_get_key (job), item, error);

  /* A failed emit leaves the item with the job: its stage frees it. */
  g_assert_true (kd_test_hold_enter (&stopper->hold));
  kd_job_emit (job, kd_job_get_key (job), item, &stopper->emit_error);
  return TRUE;
}

static void
test_set_cancellable (void)
{
  Stopper stopper = { 0 };
  GCancellable *cancellable = g_cancellable_new ();
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *first, *second;
  KdStats stats;
  gint reached = 0;
  guint i;

  g_test_summary ("kd_pipeline_set_cancellable() gives the caller's cancellable to "
                  "every stage, added before or after; cancelling it ends the "
                  "queued items cancelled and makes emitting fail with "
                  "KD_ERROR_CLOSED, so nothing reaches the sink");

  ledger_reset (5);
  kd_test_hold_init (&stopper.hold);
  first = kd_pipeline_add_stage (pipeline, "first", 1, stop_handler, &stopper, NULL);
  kd_dispatcher_set_item_free (first, item_free);
  kd_pipeline_set_cancellable (pipeline, cancellable);
  second = kd_pipeline_add_stage (pipeline, "second", 1, pass_handler, NULL, NULL);
  kd_dispatcher_set_item_free (second, item_free);
  kd_pipeline_set_sink (pipeline, count_sink, &reached, NULL);

  g_assert_true (kd_pipeline_get_cancellable (pipeline) == cancellable);
  g_assert_true (kd_dispatcher_get_cancellable (first) == cancellable);
  g_assert_true (kd_dispatcher_get_cancellable (second) == cancellable);

  /* One key and one worker: items 1 to 4 queue behind item 0, held. */
  for (i = 0; i < 5; i++)
    g_assert_true (kd_pipeline_submit (pipeline, "k", item_new (i, 0, i), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&stopper.hold, 1));
  g_cancellable_cancel (cancellable);
  kd_test_hold_release (&stopper.hold);
  kd_pipeline_wait (pipeline);

  g_assert_error (stopper.emit_error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&stopper.emit_error);
  kd_dispatcher_get_stats (first, &stats);
  g_assert_cmpuint (stats.completed, ==, 1);
  g_assert_cmpuint (stats.cancelled, ==, 4);
  g_assert_cmpint (reached, ==, 0);

  g_object_unref (pipeline);
  g_object_unref (cancellable);
  ledger_check_all_freed_once ();
  kd_test_hold_clear (&stopper.hold);
}

typedef struct
{
  gint reached;
  gint destroyed;
} SinkCount;

static void
sink_count_item (const char *key,
                 gpointer    data,
                 gpointer    user_data)
{
  SinkCount *count = user_data;

  g_atomic_int_inc (&count->reached);
  item_free (data);
}

static void
sink_count_destroy (gpointer user_data)
{
  SinkCount *count = user_data;

  g_atomic_int_inc (&count->destroyed);
}

static void
test_sink_replaced (void)
{
  SinkCount old_sink = { 0 }, new_sink = { 0 };
  KdPipeline *pipeline = kd_pipeline_new ();
  KdDispatcher *only;
  guint i;

  g_test_summary ("Setting the sink again frees the previous sink's data at once; "
                  "only the new sink receives items, and its data is freed with "
                  "the pipeline");

  ledger_reset (10);
  only = kd_pipeline_add_stage (pipeline, "only", 2, pass_handler, NULL, NULL);
  kd_dispatcher_set_item_free (only, item_free);
  kd_pipeline_set_sink (pipeline, sink_count_item, &old_sink, sink_count_destroy);
  kd_pipeline_set_sink (pipeline, sink_count_item, &new_sink, sink_count_destroy);
  g_assert_cmpint (old_sink.destroyed, ==, 1);
  g_assert_cmpint (new_sink.destroyed, ==, 0);

  for (i = 0; i < 10; i++)
    g_assert_true (kd_pipeline_submit (pipeline, NULL, item_new (i, 0, 0), NULL));
  kd_pipeline_wait (pipeline);
  g_assert_cmpint (old_sink.reached, ==, 0);
  g_assert_cmpint (new_sink.reached, ==, 10);

  g_object_unref (pipeline);
  g_assert_cmpint (old_sink.destroyed, ==, 1);
  g_assert_cmpint (new_sink.destroyed, ==, 1);
  ledger_check_all_freed_once ();
}

/* ------------------------------------------------------------------------ */
/* The reorder of an ordered stage, on its own                              */

typedef struct
{
  GArray     *passed;          /* item numbers, in the order they went on */
  const char *key;             /* what every item's key must be */
  guint       wrong_keys;
} Passed;

static gboolean
record_pass (const char  *key,
             gpointer     item,
             KdItemKind   kind,
             GError     **error,
             gpointer     user_data)
{
  Passed *passed = user_data;
  guint n = GPOINTER_TO_UINT (item) - 1;

  if (g_strcmp0 (key, passed->key) != 0)
    passed->wrong_keys++;
  g_array_append_val (passed->passed, n);
  return TRUE;
}

static void
unexpected_drop (const char   *key,
                 gpointer      item,
                 KdItemKind    kind,
                 const GError *error,
                 gpointer      user_data)
{
  g_error ("item %u dropped: %s", GPOINTER_TO_UINT (item) - 1,
           error != NULL ? error->message : "no error");
}

static void
reorder_emit_number (KdReorder  *reorder,
                     KdTicket   *ticket,
                     const char *key,
                     guint       n)
{
  GError *error = NULL;

  g_assert_true (kd_reorder_emit (reorder, ticket, kd_label_new (key),
                                  GUINT_TO_POINTER (n + 1), KD_ITEM_POINTER, &error));
  g_assert_no_error (error);
}

/* An item enters, and a job starts with it at once. */
static KdTicket *
enter_and_claim (KdReorder  *reorder,
                 const char *key)
{
  GError *error = NULL;
  KdOrderKey *order = kd_reorder_enter (reorder, key, NULL, KD_ITEM_POINTER, NULL, 0, TRUE,
                                        &error);
  KdItemKind kind;
  gpointer item;
  char *label;
  guint epoch;

  g_assert_no_error (error);
  g_assert_nonnull (order);
  return kd_reorder_claim (reorder, order, &item, &kind, &label, &epoch);
}

#define LONG_GAP 100

static void
test_reorder_long_gap (void)
{
  const char *keys[] = { NULL, "k" };
  guint k, i;

  g_test_summary ("What a hundred tickets emit behind a head that is still running "
                  "leaves in entry order once the head ends, with and without a "
                  "key, past the caps of the tickets and buffers kept for reuse");

  for (k = 0; k < G_N_ELEMENTS (keys); k++)
    {
      Passed passed = { g_array_new (FALSE, FALSE, sizeof (guint)), keys[k], 0 };
      /* Room for the tickets and what they buffer. */
      KdReorder *reorder = kd_reorder_new (2 * LONG_GAP + 1, record_pass, unexpected_drop,
                                           &passed);
      KdTicket *tickets[LONG_GAP + 1];

      for (i = 0; i <= LONG_GAP; i++)
        tickets[i] = enter_and_claim (reorder, keys[k]);

      /* Behind the head: buffered, however many end. */
      for (i = 1; i <= LONG_GAP; i++)
        {
          reorder_emit_number (reorder, tickets[i], keys[k], i);
          kd_reorder_leave (reorder, tickets[i]);
        }
      g_assert_cmpuint (passed.passed->len, ==, 0);

      /* The head passes its own at once, and the rest once it ends. */
      reorder_emit_number (reorder, tickets[0], keys[k], 0);
      g_assert_cmpuint (passed.passed->len, ==, 1);
      kd_reorder_leave (reorder, tickets[0]);

      g_assert_cmpuint (passed.passed->len, ==, LONG_GAP + 1);
      for (i = 0; i <= LONG_GAP; i++)
        g_assert_cmpuint (g_array_index (passed.passed, guint, i), ==, i);
      g_assert_cmpuint (passed.wrong_keys, ==, 0);

      /* Frees the recycled tickets and buffers; asserts every ticket is back. */
      kd_reorder_free (reorder);
      g_array_unref (passed.passed);
    }
}

static void
test_reorder_claim_order (void)
{
  Passed passed = { g_array_new (FALSE, FALSE, sizeof (guint)), "k", 0 };
  KdReorder *reorder = kd_reorder_new (8, record_pass, unexpected_drop, &passed);
  KdOrderKey *first_queued, *second_queued;
  KdTicket *first, *second;
  GError *error = NULL;
  KdItemKind kind;
  gpointer item;
  char *label;
  guint epoch;

  g_test_summary ("A job of an ordered stage runs the oldest item of its key that no job took "
                  "yet, whatever ticket it was queued with: the key's items start in entry order");

  /* The second one says it is a value: what an item is travels with it. */
  first_queued = kd_reorder_enter (reorder, "k", GUINT_TO_POINTER (1), KD_ITEM_POINTER,
                                   kd_label_new ("k"), 7, TRUE, &error);
  second_queued = kd_reorder_enter (reorder, "k", GUINT_TO_POINTER (2), KD_ITEM_VALUE,
                                    kd_label_new ("k"), 8, TRUE, &error);
  g_assert_no_error (error);
  g_assert_true (first_queued == second_queued);   /* the key's queue */

  /* Whichever job starts first runs the first item. */
  first = kd_reorder_claim (reorder, second_queued, &item, &kind, &label, &epoch);
  g_assert_cmpuint (GPOINTER_TO_UINT (item), ==, 1);
  g_assert_cmpint (kind, ==, KD_ITEM_POINTER);
  g_assert_cmpstr (label, ==, "k");
  g_assert_cmpuint (epoch, ==, 7);
  kd_label_unref (label);

  /* It may end before the other job starts: the key stays known. */
  reorder_emit_number (reorder, first, "k", 0);
  kd_reorder_leave (reorder, first);

  second = kd_reorder_claim (reorder, first_queued, &item, &kind, &label, &epoch);
  g_assert_cmpuint (GPOINTER_TO_UINT (item), ==, 2);
  g_assert_cmpint (kind, ==, KD_ITEM_VALUE);
  g_assert_cmpuint (epoch, ==, 8);
  kd_label_unref (label);
  reorder_emit_number (reorder, second, "k", 1);
  kd_reorder_leave (reorder, second);
  g_assert_cmpuint (passed.passed->len, ==, 2);
  kd_reorder_free (reorder);
  g_array_unref (passed.passed);
}

typedef struct
{
  KdReorder *reorder;
  KdTicket  *ticket;
  guint      from, to;
} Emitter;

static gpointer
emit_numbers (gpointer data)
{
  Emitter *e = data;
  guint i;

  for (i = e->from; i < e->to; i++)
    reorder_emit_number (e->reorder, e->ticket, "k", i);
  return NULL;
}

static void
test_reorder_emit_room (void)
{
  Passed passed = { g_array_new (FALSE, FALSE, sizeof (guint)), "k", 0 };
  KdReorder *reorder = kd_reorder_new (4, record_pass, unexpected_drop, &passed);
  Emitter emitter;
  GThread *thread;
  KdTicket *head;
  guint i;

  g_test_summary ("What an item emits behind a running head counts against the bound with the "
                  "tickets: past it the emit waits (it does not buffer), and goes on in order once "
                  "the head ended");

  head = enter_and_claim (reorder, "k");
  emitter.reorder = reorder;
  emitter.ticket = enter_and_claim (reorder, "k");
  emitter.from = 1;
  emitter.to = 1000;

  /* Two tickets out: room for two buffered items, then the emit waits. */
  thread = g_thread_new ("emitter", emit_numbers, &emitter);
  kd_reorder_wait_sleepers (reorder, 1);
  g_assert_cmpuint (passed.passed->len, ==, 0);

  reorder_emit_number (reorder, head, "k", 0);
  kd_reorder_leave (reorder, head);
  g_thread_join (thread);
  kd_reorder_leave (reorder, emitter.ticket);

  g_assert_cmpuint (passed.passed->len, ==, 1000);
  for (i = 0; i < 1000; i++)
    g_assert_cmpuint (g_array_index (passed.passed, guint, i), ==, i);
  kd_reorder_free (reorder);
  g_array_unref (passed.passed);
}

#define MANY_KEYS 1000

static void
reorder_pass_keys (KdReorder *reorder,
                   Passed    *passed,
                   guint      n_keys)
{
  guint i;

  for (i = 0; i < n_keys; i++)
    {
      char *key = g_strdup_printf ("key-%u", i);
      KdTicket *ticket = enter_and_claim (reorder, key);

      passed->key = key;
      reorder_emit_number (reorder, ticket, key, i);
      kd_reorder_leave (reorder, ticket);
      passed->key = NULL;
      g_free (key);
    }
}

static void
test_reorder_forgets_idle_keys (void)
{
  Passed passed = { g_array_new (FALSE, FALSE, sizeof (guint)), NULL, 0 };
  KdReorder *reorder = kd_reorder_new (8, record_pass, unexpected_drop, &passed);
  guint round, i;

  g_test_summary ("A key whose items all left stays known to the reorder for its "
                  "next item, but only up to a bound: after a thousand keys the "
                  "reorder holds a fraction of them, and keys it forgot work "
                  "again");

  /* A few keys: all kept, dormant. */
  reorder_pass_keys (reorder, &passed, 5);
  g_assert_cmpuint (kd_reorder_count_keys (reorder), ==, 5);
  g_array_set_size (passed.passed, 0);

  /* Twice over many keys: the second round meets keys the first forgot. */
  for (round = 0; round < 2; round++)
    {
      reorder_pass_keys (reorder, &passed, MANY_KEYS);
      g_assert_cmpuint (passed.passed->len, ==, MANY_KEYS);
      for (i = 0; i < MANY_KEYS; i++)
        g_assert_cmpuint (g_array_index (passed.passed, guint, i), ==, i);
      g_assert_cmpuint (passed.wrong_keys, ==, 0);
      g_assert_cmpuint (kd_reorder_count_keys (reorder), >, 0);
      g_assert_cmpuint (kd_reorder_count_keys (reorder), <, MANY_KEYS / 4);
      g_array_set_size (passed.passed, 0);
    }

  kd_reorder_free (reorder);
  g_array_unref (passed.passed);
}

/* ------------------------------------------------------------------------ */
/* Bad input                                                                */

static void
test_bad_input (void)
{
  KdPipeline *pipeline;
  KdPipeline *empty;
  KdDispatcher *stranger;
  KdDispatcher *stage;
  GCancellable *late_cancellable;

  g_test_summary ("Configuration after the first submit, a foreign stage, an empty "
                  "pipeline and kd_job_emit() outside a pipeline are criticals");

  if (!g_test_undefined ())
    return;

  empty = kd_pipeline_new ();
  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*stages->len > 0*");
  g_assert_false (kd_pipeline_submit (empty, "k", NULL, NULL));
  g_test_assert_expected_messages ();
  g_object_unref (empty);

  pipeline = kd_pipeline_new ();
  stage = kd_pipeline_add_stage (pipeline, "only", 1, kd_test_noop_handler, NULL, NULL);
  stranger = kd_dispatcher_new (1, kd_test_noop_handler, NULL, NULL);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*found != NULL*");
  kd_pipeline_set_stage_mode (pipeline, stranger, KD_STAGE_ORDERED);
  g_test_assert_expected_messages ();

  g_assert_true (kd_pipeline_submit (pipeline, "k", NULL, NULL));

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
  g_assert_null (kd_pipeline_add_stage (pipeline, "late", 1, kd_test_noop_handler, NULL, NULL));
  g_test_assert_expected_messages ();

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
  kd_pipeline_set_stage_mode (pipeline, stage, KD_STAGE_PARALLEL);
  g_test_assert_expected_messages ();

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
  kd_pipeline_set_sink (pipeline, NULL, NULL, NULL);
  g_test_assert_expected_messages ();

  late_cancellable = g_cancellable_new ();
  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
  kd_pipeline_set_cancellable (pipeline, late_cancellable);
  g_test_assert_expected_messages ();
  g_assert_true (kd_pipeline_get_cancellable (pipeline) != late_cancellable);
  g_assert_true (kd_dispatcher_get_cancellable (stage) != late_cancellable);
  g_object_unref (late_cancellable);

  kd_pipeline_wait (pipeline);
  g_assert_cmpuint (kd_pipeline_get_n_stages (pipeline), ==, 1);
  g_object_unref (pipeline);
  g_object_unref (stranger);
}

static gboolean
emit_outside_handler (KdJob    *job,
                      gpointer  user_data,
                      GError  **error)
{
  *(gboolean *) user_data = kd_job_emit (job, NULL, NULL, NULL);
  return TRUE;
}

static void
test_emit_outside_pipeline (void)
{
  gboolean emitted = TRUE;
  KdDispatcher *dispatcher;

  g_test_summary ("kd_job_emit() on a job of a plain dispatcher is a critical and "
                  "fails");

  if (!g_test_undefined ())
    return;

  dispatcher = kd_dispatcher_new (1, emit_outside_handler, &emitted, NULL);
  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*not a pipeline stage*");
  g_assert_true (kd_dispatcher_submit (dispatcher, NULL, NULL, NULL));
  kd_dispatcher_wait (dispatcher);
  g_test_assert_expected_messages ();
  g_assert_false (emitted);
  g_object_unref (dispatcher);
}

static gboolean
emit_own_item (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  return kd_job_emit (job, kd_job_get_key (job), kd_job_get_item (job), error);
}

static gboolean
wait_for_pipeline (KdJob    *job,
                   gpointer  user_data,
                   GError  **error)
{
  KdPipeline *pipeline = user_data;

  if (GPOINTER_TO_UINT (kd_job_get_item (job)) == 1)
    {
      /* The first stage's worker now waits for room in this stage, which
       * this job holds: a wait for the first stage would never end. */
      kd_dispatcher_wait_blocked_submitters (kd_pipeline_get_stage (pipeline, 1), 1);
      kd_pipeline_wait (pipeline);
    }
  return TRUE;
}

static void
test_wait_from_stage (void)
{
  KdPipeline *pipeline;
  KdDispatcher *second;
  KdStats stats;

  g_test_summary ("kd_pipeline_wait() from a stage's handler logs a critical and returns, "
                  "rather than waiting for a stage before it that waits for room in its own");
  if (!g_test_undefined ())
    return;

  pipeline = kd_pipeline_new ();
  kd_pipeline_add_stage (pipeline, "first", 1, emit_own_item, NULL, NULL);
  second = kd_pipeline_add_stage (pipeline, "second", 1, wait_for_pipeline, pipeline, NULL);
  kd_dispatcher_set_capacity (second, 1);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*kd_pipeline_wait*own threads*");
  g_assert_true (kd_pipeline_submit (pipeline, "k", GUINT_TO_POINTER (1), NULL));
  g_assert_true (kd_pipeline_submit (pipeline, "k", GUINT_TO_POINTER (2), NULL));
  kd_pipeline_wait (pipeline);
  g_test_assert_expected_messages ();

  kd_dispatcher_get_stats (second, &stats);
  g_assert_cmpuint (stats.completed, ==, 2);
  g_object_unref (pipeline);
}

/* The last reference to a pipeline, held by a key state of its first
 * stage, dropped on that stage's timer as the state's idle time ends. */
typedef struct
{
  KdPipeline   *pipeline;
  KdTestCounter sunk;
  KdTestCounter finalized;
  KdTestGate    unreffed;   /* the test dropped its own reference */
} HeldByState;

static HeldByState *held_by_state;

static gpointer
pipeline_state_new (const char *key,
                    gpointer    user_data)
{
  HeldByState *h = user_data;

  return g_object_ref (h->pipeline);
}

static void
pipeline_state_free (gpointer state)
{
  /* After the test's unref: this one is the last. */
  g_assert_true (kd_test_gate_wait (&held_by_state->unreffed));
  g_object_unref (state);
}

static void
held_sink (const char *key,
           gpointer    item,
           gpointer    user_data)
{
  HeldByState *h = user_data;

  kd_test_counter_add (&h->sunk, 1);
}

static void
held_sink_destroy (gpointer user_data)
{
  HeldByState *h = user_data;

  kd_test_counter_add (&h->finalized, 1);
}

static void
test_unref_on_stage_timer (void)
{
  HeldByState h;
  KdDispatcher *first, *second;

  g_test_summary ("A pipeline whose last reference goes in a key state's free on its first "
                  "stage's timer finishes its shutdown as that timer's thread exits: it waits "
                  "for the later stages (no \"own threads\" refusal) before it finalizes");

  kd_test_counter_init (&h.sunk);
  kd_test_counter_init (&h.finalized);
  kd_test_gate_init (&h.unreffed);
  held_by_state = &h;
  h.pipeline = kd_pipeline_new ();
  first = kd_pipeline_add_stage (h.pipeline, "first", 1, emit_own_item, NULL, NULL);
  kd_dispatcher_set_key_state_funcs (first, pipeline_state_new, pipeline_state_free, &h, NULL);
  kd_dispatcher_set_key_idle_time (first, G_TIME_SPAN_MILLISECOND);
  second = kd_pipeline_add_stage (h.pipeline, "second", 1, emit_own_item, NULL, NULL);
  kd_pipeline_set_stage_mode (h.pipeline, second, KD_STAGE_ORDERED);
  kd_pipeline_set_sink (h.pipeline, held_sink, &h, held_sink_destroy);

  g_assert_true (kd_pipeline_submit (h.pipeline, "k", GUINT_TO_POINTER (1), NULL));
  g_assert_true (kd_test_counter_wait (&h.sunk, 1));   /* the key's state was made */
  g_object_unref (h.pipeline);   /* the key's state holds the last reference */
  kd_test_gate_open (&h.unreffed);

  g_assert_true (kd_test_counter_wait (&h.finalized, 1));
  g_assert_cmpuint (kd_test_counter_get (&h.sunk), ==, 1);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  kd_test_counter_clear (&h.sunk);
  kd_test_counter_clear (&h.finalized);
  kd_test_gate_clear (&h.unreffed);
}

typedef struct
{
  KdPipeline   *pipeline;
  KdTestGate    second_ended;
  GError       *resubmit_error;
} Resubmit;

static gboolean
resubmit_handler (KdJob    *job,
                  gpointer  user_data,
                  GError  **error)
{
  Resubmit *r = user_data;
  guint n = GPOINTER_TO_UINT (kd_job_get_item (job));

  if (n == 1)
    {
      /* The second item emitted behind this one and ended: the stage's
       * room holds two tickets and its emit. */
      g_assert_true (kd_test_gate_wait (&r->second_ended));
      g_assert_false (kd_pipeline_submit (r->pipeline, "k", GUINT_TO_POINTER (3),
                                          &r->resubmit_error));
    }
  return kd_job_emit (job, kd_job_get_key (job), kd_job_get_item (job), error);
}

static void
resubmit_done (KdJob        *job,
               const GError *error,
               gpointer      user_data)
{
  Resubmit *r = user_data;

  if (GPOINTER_TO_UINT (kd_job_get_item (job)) == 2 || kd_job_get_item (job) == NULL)
    kd_test_gate_open (&r->second_ended);
}

static void
count_sunk (const char *key,
            gpointer    item,
            gpointer    user_data)
{
  g_atomic_int_inc ((gint *) user_data);
}

static void
test_ordered_resubmit_from_handler (void)
{
  Resubmit r = { 0 };
  KdDispatcher *stage;
  gint sunk = 0;

  g_test_summary ("A handler of an ordered stage that submits to its own pipeline while the "
                  "stage has no room is refused with KD_ERROR_FULL instead of waiting for room "
                  "that only its own end can make");

  kd_test_gate_init (&r.second_ended);
  r.pipeline = kd_pipeline_new ();
  stage = kd_pipeline_add_stage (r.pipeline, "ordered", 2, resubmit_handler, &r, NULL);
  kd_pipeline_set_stage_mode (r.pipeline, stage, KD_STAGE_ORDERED);
  kd_dispatcher_set_capacity (stage, 3);
  kd_dispatcher_set_done_func (stage, resubmit_done, &r, NULL);
  kd_pipeline_set_sink (r.pipeline, count_sunk, &sunk, NULL);

  g_assert_true (kd_pipeline_submit (r.pipeline, "k", GUINT_TO_POINTER (1), NULL));
  g_assert_true (kd_pipeline_submit (r.pipeline, "k", GUINT_TO_POINTER (2), NULL));
  kd_pipeline_wait (r.pipeline);

  g_assert_error (r.resubmit_error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&r.resubmit_error);
  g_assert_cmpint (sunk, ==, 2);
  g_object_unref (r.pipeline);
  kd_test_gate_clear (&r.second_ended);
}

int
main (int    argc,
      char **argv)
{
  int result;

  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/pipeline/order-end-to-end", test_order_end_to_end);
  g_test_add_func ("/kd/pipeline/order-submit-many", test_order_submit_many);
  g_test_add_func ("/kd/pipeline/ordered-per-key", test_ordered_per_key);
  g_test_add_func ("/kd/pipeline/backpressure", test_backpressure);
  g_test_add_func ("/kd/pipeline/fan-out-filter-fail", test_fan_out_filter_fail);
  g_test_add_func ("/kd/pipeline/close-drains", test_close_drains);
  g_test_add_func ("/kd/pipeline/last-unref-in-stage-context", test_last_unref_in_stage_context);
  g_test_add_func ("/kd/pipeline/wait-until-and-async", test_wait_until_and_async);
  g_test_add_func ("/kd/pipeline/ordered-emit-bounded", test_ordered_emit_bounded);
  g_test_add_func ("/kd/pipeline/ordered-emit-stress", test_ordered_emit_stress);
  g_test_add_func ("/kd/pipeline/ordered-retry-waits-on-worker", test_ordered_retry_waits_on_worker);
  g_test_add_func ("/kd/pipeline/ordered-small-gap", test_ordered_small_gap);
  g_test_add_func ("/kd/pipeline/ordered-close-while-waiting", test_ordered_close_while_waiting);
  g_test_add_func ("/kd/pipeline/direct-stage-submit", test_direct_stage_submit);
  g_test_add_func ("/kd/pipeline/hand-back-on-context", test_hand_back_on_context);
  g_test_add_func ("/kd/pipeline/cancel-accounting", test_cancel_accounting);
  g_test_add_func ("/kd/pipeline/emit-after-cancel", test_emit_after_cancel);
  g_test_add_func ("/kd/pipeline/no-sink", test_no_sink);
  g_test_add_func ("/kd/pipeline/unref-in-handler", test_unref_in_handler);
  g_test_add_func ("/kd/pipeline/set-cancellable", test_set_cancellable);
  g_test_add_func ("/kd/pipeline/sink-replaced", test_sink_replaced);
  g_test_add_func ("/kd/pipeline/reorder-long-gap", test_reorder_long_gap);
  g_test_add_func ("/kd/pipeline/reorder-claim-order", test_reorder_claim_order);
  g_test_add_func ("/kd/pipeline/reorder-emit-room", test_reorder_emit_room);
  g_test_add_func ("/kd/pipeline/reorder-forgets-idle-keys", test_reorder_forgets_idle_keys);
  g_test_add_func ("/kd/pipeline/bad-input", test_bad_input);
  g_test_add_func ("/kd/pipeline/emit-outside-pipeline", test_emit_outside_pipeline);
  g_test_add_func ("/kd/pipeline/wait-from-stage", test_wait_from_stage);
  g_test_add_func ("/kd/pipeline/unref-on-stage-timer", test_unref_on_stage_timer);
  g_test_add_func ("/kd/pipeline/ordered-resubmit-from-handler", test_ordered_resubmit_from_handler);

  kd_test_gate_init (&ledger.triggered);
  result = g_test_run ();
  g_free (ledger.frees);
  kd_test_gate_clear (&ledger.triggered);
  return result;
}
