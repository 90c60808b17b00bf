/* test-delay.c: jobs that run later
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-dispatcher-private.h"
#include "kd-test-util.h"

#define HOUR_US (3600 * G_TIME_SPAN_SECOND)

/* Items are numbers: the handler notes when each started and ended and in
 * which order they ran; item HELD waits at @gate; item SIGNAL opens
 * @signalled. */
#define HELD   1
#define SIGNAL 2

typedef struct
{
  GMutex         lock;
  GArray        *ran;          /* items, in the order their handlers started */
  gint64         started[64];
  gint64         finished[64]; /* when each handler returned */
  gint           ends[64];     /* done callbacks per item */
  gint           cancelled;
  KdTestGate     gate;
  KdTestGate     signalled;
  KdTestCounter  arrived;      /* HELD at the gate */
  KdTestCounter  ended;        /* done callbacks */
  KdDispatcher  *dispatcher;
  guint          chain;        /* > 0: the handler schedules item + 1 on its key */
} Fixture;

static gboolean
handler (KdJob    *job,
         gpointer  user_data,
         GError  **error)
{
  Fixture *f = user_data;
  guint item = GPOINTER_TO_UINT (kd_job_get_item (job));

  kd_mutex_lock (&f->lock);
  g_array_append_val (f->ran, item);
  f->started[item] = g_get_monotonic_time ();
  kd_mutex_unlock (&f->lock);

  if (item == HELD)
    {
      kd_test_counter_add (&f->arrived, 1);
      g_assert_true (kd_test_gate_wait (&f->gate));
    }
  if (item == SIGNAL)
    kd_test_gate_open (&f->signalled);
  if (f->chain > 0 && item >= 10 && item < 10 + f->chain)
    g_assert_true (kd_dispatcher_submit_after (f->dispatcher, kd_job_get_key (job),
                                               GUINT_TO_POINTER (item + 1), 100, NULL));

  kd_mutex_lock (&f->lock);
  f->finished[item] = g_get_monotonic_time ();
  kd_mutex_unlock (&f->lock);
  return TRUE;
}

static void
done (KdJob        *job,
      const GError *error,
      gpointer      user_data)
{
  Fixture *f = user_data;
  guint item = GPOINTER_TO_UINT (kd_job_get_item (job));

  g_atomic_int_inc (&f->ends[item]);
  if (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
    g_atomic_int_inc (&f->cancelled);
  kd_test_counter_add (&f->ended, 1);
}

static KdDispatcher *
fixture_init (Fixture *f,
              guint    n_workers)
{
  memset (f, 0, sizeof *f);
  g_mutex_init (&f->lock);
  f->ran = g_array_new (FALSE, FALSE, sizeof (guint));
  kd_test_gate_init (&f->gate);
  kd_test_gate_init (&f->signalled);
  kd_test_counter_init (&f->arrived);
  kd_test_counter_init (&f->ended);
  f->dispatcher = kd_dispatcher_new (n_workers, handler, f, NULL);
  kd_dispatcher_set_done_func (f->dispatcher, done, f, NULL);
  return f->dispatcher;
}

static void
fixture_clear (Fixture *f)
{
  g_array_unref (f->ran);
  kd_test_gate_clear (&f->gate);
  kd_test_gate_clear (&f->signalled);
  kd_test_counter_clear (&f->arrived);
  kd_test_counter_clear (&f->ended);
  g_mutex_clear (&f->lock);
}

static guint
ran_at (Fixture *f,
        guint    i)
{
  return g_array_index (f->ran, guint, i);
}

static void
test_not_before_due (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  gint64 due;
  KdStats stats;

  g_test_summary ("A delayed job, keyed or not, runs no earlier than its due time; it is "
                  "pending while it waits, and wait() waits for it");

  due = g_get_monotonic_time () + 5 * G_TIME_SPAN_MILLISECOND;
  g_assert_true (kd_dispatcher_submit_at (dispatcher, "k", GUINT_TO_POINTER (10), due, NULL));
  g_assert_true (kd_dispatcher_submit_at (dispatcher, NULL, GUINT_TO_POINTER (11), due, NULL));
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, 2);
  g_assert_cmpuint (stats.completed + stats.pending, ==, 2);

  kd_dispatcher_wait (dispatcher);
  g_assert_cmpint (f.ends[10], ==, 1);
  g_assert_cmpint (f.ends[11], ==, 1);
  g_assert_cmpint (f.started[10], >=, due);
  g_assert_cmpint (f.started[11], >=, due);

  g_object_unref (dispatcher);
  fixture_clear (&f);
}

static void
test_key_order (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  gint64 now = g_get_monotonic_time ();

  g_test_summary ("A delayed keyed job joins its key at its due time: behind the key's "
                  "jobs accepted before, ahead of those accepted after; one not yet due "
                  "lets the key's later jobs run; jobs due together keep their order");

  /* HELD runs on key k; 20 and 21, due now, join k behind it, in call
   * order; SIGNAL (unkeyed, due after them) shows the timer passed them. */
  g_assert_true (kd_dispatcher_submit (dispatcher, "k", GUINT_TO_POINTER (HELD), NULL));
  g_assert_true (kd_test_counter_wait (&f.arrived, 1));
  g_assert_true (kd_dispatcher_submit_at (dispatcher, "k", GUINT_TO_POINTER (20), now, NULL));
  g_assert_true (kd_dispatcher_submit_at (dispatcher, "k", GUINT_TO_POINTER (21), now, NULL));
  g_assert_true (kd_dispatcher_submit_at (dispatcher, NULL, GUINT_TO_POINTER (SIGNAL), now + 1,
                                          NULL));
  g_assert_true (kd_test_gate_wait (&f.signalled));
  /* Accepted after 20 and 21 joined; 30 is not due for an hour. */
  g_assert_true (kd_dispatcher_submit (dispatcher, "k", GUINT_TO_POINTER (22), NULL));
  g_assert_true (kd_dispatcher_submit_after (dispatcher, "k", GUINT_TO_POINTER (30), HOUR_US,
                                             NULL));
  g_assert_true (kd_dispatcher_submit (dispatcher, "k", GUINT_TO_POINTER (23), NULL));
  kd_test_gate_open (&f.gate);

  /* 23 ran without waiting for 30: six jobs ended. */
  g_assert_true (kd_test_counter_wait (&f.ended, 6));

  kd_mutex_lock (&f.lock);
  g_assert_cmpuint (f.ran->len, ==, 6);
  g_assert_cmpuint (ran_at (&f, 0), ==, HELD);
  kd_mutex_unlock (&f.lock);
  {
    guint expected[] = { HELD, 20, 21, 22, 23 };
    guint i, k = 0;

    kd_mutex_lock (&f.lock);
    for (i = 0; i < f.ran->len; i++)
      if (ran_at (&f, i) != SIGNAL)
        g_assert_cmpuint (ran_at (&f, i), ==, expected[k++]);
    kd_mutex_unlock (&f.lock);
    g_assert_cmpuint (k, ==, G_N_ELEMENTS (expected));
  }
  g_assert_cmpint (f.ends[30], ==, 0);

  /* Cancelling ends the waiting job at once. */
  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  g_assert_true (kd_dispatcher_wait_until (dispatcher,
                                           g_get_monotonic_time () + KD_TEST_DEADLINE_US));
  g_assert_cmpint (f.ends[30], ==, 1);
  g_assert_cmpint (f.cancelled, ==, 1);
  g_assert_cmpint (f.started[30], ==, 0);

  g_object_unref (dispatcher);
  fixture_clear (&f);
}

static void
test_cancel_at_once (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  guint i;

  g_test_summary ("Cancelling the dispatcher ends every waiting delayed job at once, "
                  "cancelled, each exactly once, keyed or not; the last unref then does "
                  "not wait for their due times");

  for (i = 10; i < 40; i++)
    g_assert_true (kd_dispatcher_submit_after (dispatcher, i % 3 == 0 ? NULL : i % 3 == 1 ? "a" : "b",
                                               GUINT_TO_POINTER (i), HOUR_US, NULL));
  g_assert_false (kd_dispatcher_wait_until (dispatcher, 0));
  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  g_assert_true (kd_dispatcher_wait_until (dispatcher,
                                           g_get_monotonic_time () + KD_TEST_DEADLINE_US));
  for (i = 10; i < 40; i++)
    g_assert_cmpint (f.ends[i], ==, 1);
  g_assert_cmpint (f.cancelled, ==, 30);
  g_assert_cmpuint (f.ran->len, ==, 0);

  g_object_unref (dispatcher);
  fixture_clear (&f);
}

static void
test_bound (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 1);
  GError *error = NULL;
  KdStats stats;
  guint i;

  g_test_summary ("Waiting delayed jobs hold units of the bound: at the bound a delayed "
                  "submit fails with FULL at once and leaves the item to the caller, as "
                  "does any submit; a closed dispatcher refuses with CLOSED");

  kd_dispatcher_set_capacity (dispatcher, 4);
  for (i = 10; i < 14; i++)
    g_assert_true (kd_dispatcher_submit_after (dispatcher, "k", GUINT_TO_POINTER (i), HOUR_US,
                                               NULL));
  g_assert_false (kd_dispatcher_submit_after (dispatcher, "k", GUINT_TO_POINTER (14), HOUR_US,
                                              &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);
  g_assert_false (kd_dispatcher_try_submit (dispatcher, NULL, GUINT_TO_POINTER (15), &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.pending, ==, 4);
  g_assert_cmpuint (stats.rejected, ==, 2);

  kd_dispatcher_close (dispatcher);
  g_assert_false (kd_dispatcher_submit_at (dispatcher, NULL, GUINT_TO_POINTER (16), 0, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);

  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  kd_dispatcher_wait (dispatcher);
  g_assert_cmpint (f.cancelled, ==, 4);
  g_assert_cmpint (f.ends[14] + f.ends[15] + f.ends[16], ==, 0);

  g_object_unref (dispatcher);
  fixture_clear (&f);
}

static void
test_key_bound (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  gint64 now = g_get_monotonic_time ();
  GError *error = NULL;

  g_test_summary ("With a per-key bound of n, at most n delayed jobs of a key wait at once "
                  "(one more is refused FULL, the item left to the caller); one that comes "
                  "due joins its full key at once, never holding up the timer, so the key "
                  "holds at most twice its bound; and it runs after the job before it, even "
                  "once the dispatcher is closed");

  kd_dispatcher_set_key_capacity (dispatcher, 1);

  /* Key w: one delayed job waits (for an hour); a second is refused. */
  g_assert_true (kd_dispatcher_submit_after (dispatcher, "w", GUINT_TO_POINTER (21), HOUR_US,
                                             NULL));
  g_assert_false (kd_dispatcher_submit_after (dispatcher, "w", GUINT_TO_POINTER (22), HOUR_US,
                                              &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);

  /* Key k is full with HELD running; 20 comes due and joins it at once. */
  g_assert_true (kd_dispatcher_submit (dispatcher, "k", GUINT_TO_POINTER (HELD), NULL));
  g_assert_true (kd_test_counter_wait (&f.arrived, 1));
  g_assert_true (kd_dispatcher_submit_at (dispatcher, "k", GUINT_TO_POINTER (20), now, NULL));
  g_assert_true (kd_dispatcher_submit_at (dispatcher, NULL, GUINT_TO_POINTER (SIGNAL), now + 1,
                                          NULL));
  g_assert_true (kd_test_gate_wait (&f.signalled));
  g_assert_cmpuint (kd_dispatcher_count_key_jobs (dispatcher, "k"), ==, 2);
  /* Its place given back: another delayed job of k may wait. */
  g_assert_true (kd_dispatcher_submit_after (dispatcher, "k", GUINT_TO_POINTER (23), HOUR_US,
                                             NULL));

  kd_dispatcher_close (dispatcher);
  kd_test_gate_open (&f.gate);
  g_assert_true (kd_test_counter_wait (&f.ended, 3));
  g_assert_cmpint (f.ends[20], ==, 1);
  g_assert_cmpint (f.started[20], >=, f.finished[HELD]);
  g_assert_cmpint (f.ends[22], ==, 0);

  /* The ones due in an hour end cancelled. */
  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  g_assert_true (kd_dispatcher_wait_until (dispatcher,
                                           g_get_monotonic_time () + KD_TEST_DEADLINE_US));
  g_assert_cmpint (f.cancelled, ==, 2);

  g_object_unref (dispatcher);
  fixture_clear (&f);
}

static void
test_actor_schedules_itself (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  guint i;

  g_test_summary ("A handler schedules its key's next message for later (an actor's "
                  "timer) at the bound's edge: never refused, each runs once, in order");

  kd_dispatcher_set_capacity (dispatcher, 2);
  f.chain = 8;
  g_assert_true (kd_dispatcher_submit (dispatcher, "actor", GUINT_TO_POINTER (10), NULL));
  g_assert_true (kd_test_counter_wait (&f.ended, 9));
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpuint (f.ran->len, ==, 9);
  for (i = 0; i < 9; i++)
    {
      g_assert_cmpuint (ran_at (&f, i), ==, 10 + i);
      g_assert_cmpint (f.ends[10 + i], ==, 1);
    }

  g_object_unref (dispatcher);
  fixture_clear (&f);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/delay/not-before-due", test_not_before_due);
  g_test_add_func ("/delay/key-order", test_key_order);
  g_test_add_func ("/delay/cancel-at-once", test_cancel_at_once);
  g_test_add_func ("/delay/bound", test_bound);
  g_test_add_func ("/delay/key-bound", test_key_bound);
  g_test_add_func ("/delay/actor-schedules-itself", test_actor_schedules_itself);

  return g_test_run ();
}
