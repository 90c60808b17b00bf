/* test-timer.c: the timer that holds retries and the idle keys' sweep
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <glib.h>

#include "kd-test-util.h"
#include "kd-timer-private.h"

typedef struct
{
  GMutex  lock;
  GArray *order;    /* the data of the calls made, in order */
  KdTestCounter made;
} Calls;

static void
record_call (gpointer owner,
             gpointer data)
{
  Calls *calls = owner;
  guint n = GPOINTER_TO_UINT (data);

  g_mutex_lock (&calls->lock);
  g_array_append_val (calls->order, n);
  g_mutex_unlock (&calls->lock);
  kd_test_counter_add (&calls->made, 1);
}

static void
calls_init (Calls *calls)
{
  g_mutex_init (&calls->lock);
  calls->order = g_array_new (FALSE, FALSE, sizeof (guint));
  kd_test_counter_init (&calls->made);
}

static void
calls_clear (Calls *calls)
{
  g_mutex_clear (&calls->lock);
  g_array_unref (calls->order);
  kd_test_counter_clear (&calls->made);
}

static void
test_order (void)
{
  GError *error = NULL;
  KdTimer *timer = kd_timer_new ("kd-timer", &error);
  gint64 now = g_get_monotonic_time ();
  Calls calls;
  guint i;

  g_test_summary ("Calls are made in due order, and those due at the same time in the order they "
                  "came (hurried: made at once, in that order)");

  g_assert_no_error (error);
  calls_init (&calls);
  /* Due in an hour, so that all are added before the first is made. */
  for (i = 0; i < 100; i++)
    g_assert_true (kd_timer_add (timer, now + 3600 * G_TIME_SPAN_SECOND + (i % 5) * 1000,
                                 record_call, &calls, GUINT_TO_POINTER (i)));
  g_assert_cmpuint (kd_test_counter_get (&calls.made), ==, 0);
  kd_timer_hurry (timer);
  g_assert_true (kd_test_counter_wait (&calls.made, 100));
  for (i = 1; i < 100; i++)
    {
      guint a = g_array_index (calls.order, guint, i - 1), b = g_array_index (calls.order, guint, i);

      g_assert_true (a % 5 < b % 5 || (a % 5 == b % 5 && a < b));
    }

  kd_timer_stop (timer);
  kd_timer_join (timer);
  kd_timer_free (timer);
  calls_clear (&calls);
}

static void
test_gives_memory_back (void)
{
  GError *error = NULL;
  KdTimer *timer = kd_timer_new ("kd-timer", &error);
  gint64 later = g_get_monotonic_time () + 3600 * G_TIME_SPAN_SECOND;
  guint n = kd_test_size (100000, 1000000);
  Calls calls;
  guint i, peak;

  g_test_summary ("A burst of waiting calls does not keep the heap at its peak size: once they "
                  "were made, its memory went back");

  g_assert_no_error (error);
  calls_init (&calls);
  for (i = 0; i < n; i++)
    g_assert_true (kd_timer_add (timer, later, record_call, &calls, GUINT_TO_POINTER (i)));
  peak = kd_timer_get_allocated (timer);
  g_assert_cmpuint (peak, >=, n);

  kd_timer_hurry (timer);
  g_assert_true (kd_test_counter_wait (&calls.made, n));
  g_test_message ("%u entries at the peak, %u after", peak, kd_timer_get_allocated (timer));
  g_assert_cmpuint (kd_timer_get_allocated (timer), <=, 16);

  kd_timer_stop (timer);
  kd_timer_join (timer);
  kd_timer_free (timer);
  calls_clear (&calls);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/timer/order", test_order);
  g_test_add_func ("/kd/timer/gives-memory-back", test_gives_memory_back);

  return g_test_run ();
}
