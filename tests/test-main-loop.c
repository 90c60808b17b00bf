/* test-main-loop.c: KdDispatcher's done callbacks and item_free on a GMainContext
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-test-util.h"

/* ------------------------------------------------------------------------ */
/* Done callbacks on a GMainContext                                         */

#define CONTEXT_KEYS 50

typedef struct
{
  GThread *context_thread;
  gint     wrong_thread;
  gint     order_violations;
  guint    delivered;
  guint    freed;
  gint     last_seq[CONTEXT_KEYS];
  gint64   done_cost_us;  /* how long each done callback keeps the context busy */
  KdDispatcher *refill;   /* the first done callback submits 64 more jobs to it */
} Delivery;

static void submit_context_jobs (KdDispatcher *dispatcher,
                                 guint         first,
                                 guint         n_jobs);

static Delivery *delivery_for_item_free;

static gboolean
context_handler (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  Delivery *delivery = user_data;

  if (g_thread_self () == delivery->context_thread)
    g_atomic_int_inc (&delivery->wrong_thread);
  return TRUE;
}

static void
context_done (KdJob        *job,
              const GError *error,
              gpointer      user_data)
{
  Delivery *delivery = user_data;
  guint i = GPOINTER_TO_UINT (kd_job_get_item (job)) - 1;
  const char *key = kd_job_get_key (job);
  guint k;

  g_assert_no_error (error);
  if (g_thread_self () != delivery->context_thread)
    delivery->wrong_thread++;

  g_assert_nonnull (key);
  k = (guint) g_ascii_strtoull (key + 1, NULL, 10);
  g_assert_cmpuint (k, ==, i % CONTEXT_KEYS);
  if (delivery->last_seq[k] >= (gint) i)
    delivery->order_violations++;
  delivery->last_seq[k] = (gint) i;
  delivery->delivered++;

  /* Jobs that end while a slice is being delivered queue behind it. */
  if (delivery->refill != NULL)
    {
      KdDispatcher *dispatcher = g_steal_pointer (&delivery->refill);

      submit_context_jobs (dispatcher, 64, 64);
      kd_dispatcher_wait (dispatcher);
    }

  if (delivery->done_cost_us > 0)
    {
      gint64 until = g_get_monotonic_time () + delivery->done_cost_us;

      while (g_get_monotonic_time () < until)
        ;
    }
}

static void
context_item_free (gpointer item)
{
  if (g_thread_self () != delivery_for_item_free->context_thread)
    delivery_for_item_free->wrong_thread++;
  delivery_for_item_free->freed++;
}

static KdDispatcher *
context_dispatcher_new (Delivery     *delivery,
                        GMainContext *context,
                        guint         capacity)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (4, context_handler, delivery, NULL);
  guint i;

  memset (delivery, 0, sizeof *delivery);
  delivery->context_thread = g_thread_self ();
  for (i = 0; i < CONTEXT_KEYS; i++)
    delivery->last_seq[i] = -1;
  delivery_for_item_free = delivery;

  kd_dispatcher_set_capacity (dispatcher, capacity);
  kd_dispatcher_set_main_context (dispatcher, context);
  kd_dispatcher_set_done_func (dispatcher, context_done, delivery, NULL);
  kd_dispatcher_set_item_free (dispatcher, context_item_free);

  return dispatcher;
}

static void
submit_context_jobs (KdDispatcher *dispatcher,
                     guint         first,
                     guint         n_jobs)
{
  guint i;

  for (i = first; i < first + n_jobs; i++)
    {
      char key[8];

      g_snprintf (key, sizeof key, "k%u", i % CONTEXT_KEYS);
      g_assert_true (kd_dispatcher_submit (dispatcher, key, GUINT_TO_POINTER (i + 1), NULL));
    }
}

static void
test_main_context (void)
{
  GMainContext *context = g_main_context_new ();
  Delivery delivery;
  KdDispatcher *dispatcher;
  guint n_jobs = 5000;
  KdStats stats;

  g_test_summary ("With a main context, done callbacks and item_free run in the "
                  "context's thread, in per-key order; jobs waiting for delivery "
                  "no longer count against the bound");

  /* Capacity 8 and 5,000 jobs submitted without iterating the context: a
   * job waiting for delivery has ended, so the submits never block for good. */
  dispatcher = context_dispatcher_new (&delivery, context, 8);
  submit_context_jobs (dispatcher, 0, n_jobs);
  kd_dispatcher_wait (dispatcher);

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, n_jobs);
  g_assert_cmpuint (stats.pending, ==, 0);

  /* Nothing is delivered before the context is iterated. */
  g_assert_cmpuint (delivery.delivered, ==, 0);
  g_assert_cmpuint (delivery.freed, ==, 0);
  g_assert_cmpint (delivery.wrong_thread, ==, 0);

  while (delivery.delivered < n_jobs)
    g_main_context_iteration (context, TRUE);

  g_assert_cmpuint (delivery.delivered, ==, n_jobs);
  g_assert_cmpuint (delivery.freed, ==, n_jobs);
  g_assert_cmpint (delivery.wrong_thread, ==, 0);
  g_assert_cmpint (delivery.order_violations, ==, 0);

  g_object_unref (dispatcher);
  g_main_context_unref (context);
  delivery_for_item_free = NULL;
}

typedef struct
{
  Delivery *delivery;
  guint     delivered_when_run;
  gboolean  ran;
} LowPriority;

static gboolean
low_priority_ran (gpointer user_data)
{
  LowPriority *low = user_data;

  low->ran = TRUE;
  low->delivered_when_run = low->delivery->delivered;
  return G_SOURCE_REMOVE;
}

static gboolean
all_delivered (gpointer user_data)
{
  Delivery *delivery = user_data;

  return delivery->delivered == delivery->freed && delivery->freed == 2 * 64;
}

static void
test_main_context_slices (void)
{
  GMainContext *context = g_main_context_new ();
  Delivery delivery;
  KdDispatcher *dispatcher;
  LowPriority low = { &delivery, 0, FALSE };
  GSource *source;

  g_test_summary ("Done callbacks that keep the main context busy are delivered "
                  "in time slices: a source of lower priority runs before the "
                  "queue is empty, and the key's order holds across slices and "
                  "jobs that end meanwhile");

  dispatcher = context_dispatcher_new (&delivery, context, 256);
  delivery.done_cost_us = 1000;

  /* 64 callbacks of 1 ms each: far more than one slice. */
  submit_context_jobs (dispatcher, 0, 64);
  kd_dispatcher_wait (dispatcher);

  source = g_idle_source_new ();
  g_source_set_priority (source, G_PRIORITY_LOW);
  g_source_set_callback (source, low_priority_ran, &low, NULL);
  g_source_attach (source, context);
  g_source_unref (source);

  /* One iteration delivers one slice, during which 64 more jobs end: they
   * must queue behind what the slice leaves. */
  delivery.refill = dispatcher;
  g_main_context_iteration (context, TRUE);
  g_assert_null (delivery.refill);
  g_assert_cmpuint (delivery.delivered, >, 0);
  g_assert_cmpuint (delivery.delivered, <, 64);

  g_assert_true (kd_test_iterate_until (context, all_delivered, &delivery));
  g_assert_true (low.ran);
  g_assert_cmpuint (low.delivered_when_run, <, 64);
  g_assert_cmpint (delivery.order_violations, ==, 0);
  g_assert_cmpint (delivery.wrong_thread, ==, 0);

  g_object_unref (dispatcher);
  g_main_context_unref (context);
  delivery_for_item_free = NULL;
}

static void
test_main_context_unref_delivers (void)
{
  GMainContext *context = g_main_context_new ();
  Delivery delivery;
  KdDispatcher *dispatcher;
  guint n_jobs = 500;

  g_test_summary ("The last unref delivers the done callbacks still waiting for the "
                  "main context before it returns");

  dispatcher = context_dispatcher_new (&delivery, context, 64);
  submit_context_jobs (dispatcher, 0, n_jobs);
  g_object_unref (dispatcher);

  g_assert_cmpuint (delivery.delivered, ==, n_jobs);
  g_assert_cmpuint (delivery.freed, ==, n_jobs);
  g_assert_cmpint (delivery.wrong_thread, ==, 0);
  g_assert_cmpint (delivery.order_violations, ==, 0);
  g_assert_false (g_main_context_pending (context));

  g_main_context_unref (context);
  delivery_for_item_free = NULL;
}

int
main (int    argc,
      char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/dispatcher/main-context", test_main_context);
  g_test_add_func ("/kd/dispatcher/main-context-unref-delivers", test_main_context_unref_delivers);
  g_test_add_func ("/kd/dispatcher/main-context-slices", test_main_context_slices);

  return g_test_run ();
}
