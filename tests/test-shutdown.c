/* test-shutdown.c: how KdDispatcher's jobs end: the accounting, wait, close,
 * cancel and the last unref
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-dispatcher-private.h"
#include "kd-test-util.h"

/* ------------------------------------------------------------------------ */
/* wait is a reusable barrier                                               */

static gboolean
count_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  g_atomic_int_inc ((gint *) user_data);
  return TRUE;
}

static void
test_wait_batches (void)
{
  KdDispatcher *dispatcher;
  gint ran = 0;
  guint n_batches = kd_test_size (1000, 10000);
  guint batch;

  g_test_summary ("wait returns once the batch submitted before it has ended, "
                  "1,000 batches in a row on one dispatcher");

  dispatcher = kd_dispatcher_new (4, count_handler, &ran, NULL);
  kd_dispatcher_set_fanout (dispatcher, 2);

  for (batch = 0; batch < n_batches; batch++)
    {
      KdStats stats;
      guint i;

      for (i = 0; i < 20; i++)
        {
          char key[16];

          g_snprintf (key, sizeof key, "k%u", (batch + i) % 7);
          g_assert_true (kd_dispatcher_submit (dispatcher, (i % 3) ? key : NULL, NULL, NULL));
        }
      kd_dispatcher_wait (dispatcher);

      g_assert_cmpint (g_atomic_int_get (&ran), ==, (batch + 1) * 20);
      kd_dispatcher_get_stats (dispatcher, &stats);
      g_assert_cmpuint (stats.pending, ==, 0);
      g_assert_cmpuint (stats.live_keys, ==, 0);
    }

  /* A wait with nothing pending returns at once, any number of times. */
  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_wait (dispatcher);

  g_object_unref (dispatcher);
}

typedef struct
{
  KdDispatcher  *dispatcher;
  KdTestGate     early_gate;   /* holds the last job of the early batch */
  KdTestGate     late_gate;    /* holds the late jobs until the wait returned */
  KdTestCounter  late_submitted;
  gint           early_done;
  gint           late_done;
  gint           late_gate_timeouts;
  gint           stop;
  GThread       *late_thread;
} Barrier;

#define EARLY_JOBS 50

static gboolean
barrier_handler (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  Barrier *barrier = user_data;
  const char *kind = kd_job_get_item (job);

  if (g_str_equal (kind, "early-last"))
    {
      g_assert_true (kd_test_gate_wait (&barrier->early_gate));
      g_atomic_int_inc (&barrier->early_done);
    }
  else if (g_str_equal (kind, "early"))
    {
      g_atomic_int_inc (&barrier->early_done);
    }
  else
    {
      /* Late jobs stay pending until the test saw the wait return; a wait
       * that waited for them would leave them here until the deadline. */
      if (g_strcmp0 (kd_job_get_key (job), "late") == 0 &&
          !kd_test_gate_wait_for (&barrier->late_gate, 10 * G_TIME_SPAN_SECOND))
        g_atomic_int_inc (&barrier->late_gate_timeouts);
      g_atomic_int_inc (&barrier->late_done);
    }

  return TRUE;
}

static gpointer
late_submitter (gpointer data)
{
  Barrier *barrier = data;

  while (!g_atomic_int_get (&barrier->stop))
    {
      g_assert_true (kd_dispatcher_submit (barrier->dispatcher, "late", "late", NULL));
      g_assert_true (kd_dispatcher_submit (barrier->dispatcher, NULL, "late", NULL));
      kd_test_counter_add (&barrier->late_submitted, 2);
    }

  return NULL;
}

/* Called inside the wait, once the jobs it waits for are fixed. */
static void
barrier_sealed (gpointer user_data)
{
  Barrier *barrier = user_data;

  barrier->late_thread = g_thread_new ("late-submitter", late_submitter, barrier);
  g_assert_true (kd_test_counter_wait (&barrier->late_submitted, 200));
  kd_test_gate_open (&barrier->early_gate);
}

static void
test_wait_not_delayed (void)
{
  Barrier barrier = { 0 };
  KdStats stats;
  guint i;

  g_test_summary ("wait is not delayed by jobs another thread keeps submitting "
                  "during the call");

  kd_test_gate_init (&barrier.early_gate);
  kd_test_gate_init (&barrier.late_gate);
  kd_test_counter_init (&barrier.late_submitted);

  barrier.dispatcher = kd_dispatcher_new (4, barrier_handler, &barrier, NULL);
  kd_dispatcher_set_capacity (barrier.dispatcher, 1 << 20);

  for (i = 0; i < EARLY_JOBS; i++)
    g_assert_true (kd_dispatcher_submit (barrier.dispatcher, (i % 2) ? "early" : NULL,
                                         "early", NULL));
  g_assert_true (kd_dispatcher_submit (barrier.dispatcher, "early", "early-last", NULL));

  kd_dispatcher_wait_sealed (barrier.dispatcher, barrier_sealed, &barrier);

  /* Every early job ended; the late ones held by the gate are still pending. */
  g_assert_cmpint (g_atomic_int_get (&barrier.early_done), ==, EARLY_JOBS + 1);
  kd_dispatcher_get_stats (barrier.dispatcher, &stats);
  g_assert_cmpuint (stats.pending, >, 0);
  g_assert_cmpint (g_atomic_int_get (&barrier.late_gate_timeouts), ==, 0);

  g_atomic_int_set (&barrier.stop, TRUE);
  kd_test_gate_open (&barrier.late_gate);
  g_thread_join (barrier.late_thread);
  kd_dispatcher_wait (barrier.dispatcher);

  g_assert_cmpint (barrier.late_done, ==, kd_test_counter_get (&barrier.late_submitted));
  g_assert_cmpint (barrier.late_gate_timeouts, ==, 0);

  g_object_unref (barrier.dispatcher);
  kd_test_gate_clear (&barrier.early_gate);
  kd_test_gate_clear (&barrier.late_gate);
  kd_test_counter_clear (&barrier.late_submitted);
}

typedef struct
{
  KdTestGate gates[3];      /* one per job: a, b, c */
  gint       late_timeouts; /* c waited out its deadline */
} Overlapping;

static gboolean
overlapping_handler (KdJob    *job,
                     gpointer  user_data,
                     GError  **error)
{
  Overlapping *ov = user_data;
  guint which = GPOINTER_TO_UINT (kd_job_get_item (job));

  if (!kd_test_gate_wait_for (&ov->gates[which], which == 2 ? 10 * G_TIME_SPAN_SECOND
                                                              : KD_TEST_DEADLINE_US))
    g_atomic_int_inc (&ov->late_timeouts);
  return TRUE;
}

typedef struct
{
  KdDispatcher  *dispatcher;
  KdTestCounter *sealed;
  KdTestGate     returned;
  GThread       *thread;
} OverlapWaiter;

static void
overlap_sealed (gpointer user_data)
{
  kd_test_counter_add (user_data, 1);
}

static gpointer
overlap_wait_thread (gpointer data)
{
  OverlapWaiter *waiter = data;

  kd_dispatcher_wait_sealed (waiter->dispatcher, overlap_sealed, waiter->sealed);
  kd_test_gate_open (&waiter->returned);
  return NULL;
}

static void
overlap_waiter_start (OverlapWaiter *waiter,
                      KdDispatcher  *dispatcher,
                      KdTestCounter *sealed)
{
  guint before = kd_test_counter_get (sealed);

  waiter->dispatcher = dispatcher;
  waiter->sealed = sealed;
  kd_test_gate_init (&waiter->returned);
  waiter->thread = g_thread_new ("waiter", overlap_wait_thread, waiter);
  g_assert_true (kd_test_counter_wait (sealed, before + 1));
}

static void
test_wait_overlapping (void)
{
  Overlapping ov = { 0 };
  OverlapWaiter first, second;
  KdTestCounter sealed;
  KdDispatcher *dispatcher;
  guint i;

  g_test_summary ("Two overlapping waits from different threads each return once "
                  "the jobs accepted before their own call ended, not delayed by a "
                  "job accepted after the second call");

  for (i = 0; i < 3; i++)
    kd_test_gate_init (&ov.gates[i]);
  kd_test_counter_init (&sealed);
  dispatcher = kd_dispatcher_new (3, overlapping_handler, &ov, NULL);

  g_assert_true (kd_dispatcher_submit (dispatcher, "a", GUINT_TO_POINTER (0), NULL));
  overlap_waiter_start (&first, dispatcher, &sealed);
  g_assert_true (kd_dispatcher_submit (dispatcher, "b", GUINT_TO_POINTER (1), NULL));
  overlap_waiter_start (&second, dispatcher, &sealed);
  g_assert_true (kd_dispatcher_submit (dispatcher, "c", GUINT_TO_POINTER (2), NULL));

  kd_test_gate_open (&ov.gates[1]);
  kd_test_gate_open (&ov.gates[0]);
  g_assert_true (kd_test_gate_wait (&first.returned));
  g_assert_true (kd_test_gate_wait (&second.returned));
  g_assert_cmpuint (kd_dispatcher_get_admitted (dispatcher), ==, 1);
  g_assert_cmpint (g_atomic_int_get (&ov.late_timeouts), ==, 0);

  kd_test_gate_open (&ov.gates[2]);
  g_thread_join (first.thread);
  g_thread_join (second.thread);
  kd_dispatcher_wait (dispatcher);
  g_assert_cmpint (ov.late_timeouts, ==, 0);

  g_object_unref (dispatcher);
  kd_test_gate_clear (&first.returned);
  kd_test_gate_clear (&second.returned);
  kd_test_counter_clear (&sealed);
  for (i = 0; i < 3; i++)
    kd_test_gate_clear (&ov.gates[i]);
}

/* ------------------------------------------------------------------------ */
/* close                                                                    */

static void
closing_item_free (gpointer item)
{
  g_atomic_int_inc ((gint *) item);
}

typedef struct
{
  KdDispatcher *dispatcher;
  gint         *item;
  gboolean      accepted;
  GError       *error;
} ClosedSubmit;

static gpointer
submit_until_closed (gpointer data)
{
  ClosedSubmit *submit = data;

  submit->accepted = kd_dispatcher_submit (submit->dispatcher, NULL, submit->item,
                                           &submit->error);
  return NULL;
}

static void
test_close (void)
{
  KdTestRecorder recorder;
  KdDispatcher *dispatcher;
  ClosedSubmit blocked = { 0 };
  GThread *thread;
  GError *error = NULL;
  gint refused_item = 0;
  gint accepted_item = 0;
  guint threads_before = kd_test_threads_settle (0);
  KdStats stats;
  guint i;

  g_test_summary ("close is idempotent; submits afterwards fail with CLOSED (even when "
                  "full, and wake blocked submitters), the item untouched and no "
                  "callback run; accepted jobs still run; then the workers exit");

  kd_test_recorder_init (&recorder);
  dispatcher = kd_dispatcher_new (2, kd_test_recorder_handler, &recorder, NULL);
  kd_dispatcher_set_capacity (dispatcher, 4);
  kd_dispatcher_set_done_func (dispatcher, kd_test_recorder_done, &recorder, NULL);
  kd_dispatcher_set_item_free (dispatcher, closing_item_free);

  for (i = 0; i < 4; i++)
    g_assert_true (kd_dispatcher_submit (dispatcher, (i % 2) ? "k" : NULL, &accepted_item, NULL));
  g_assert_true (kd_test_hold_wait_arrived (&recorder.hold, 2));

  blocked.dispatcher = dispatcher;
  blocked.item = &refused_item;
  thread = g_thread_new ("blocked", submit_until_closed, &blocked);
  kd_dispatcher_wait_blocked_submitters (dispatcher, 1);

  kd_dispatcher_close (dispatcher);
  kd_dispatcher_close (dispatcher);

  g_thread_join (thread);
  g_assert_false (blocked.accepted);
  g_assert_error (blocked.error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&blocked.error);

  /* Full and closed: closed wins, and the timed submit does not wait. */
  g_assert_false (kd_dispatcher_submit (dispatcher, "k", &refused_item, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);
  g_assert_false (kd_dispatcher_try_submit (dispatcher, NULL, &refused_item, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);
  g_assert_false (kd_dispatcher_submit_timeout (dispatcher, "k", &refused_item,
                                                G_TIME_SPAN_HOUR, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);

  kd_test_hold_release (&recorder.hold);
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (refused_item, ==, 0);
  g_assert_cmpint (accepted_item, ==, 4);
  g_assert_cmpint (recorder.completed, ==, 4);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, 4);
  g_assert_cmpuint (stats.completed, ==, 4);
  g_assert_cmpuint (stats.rejected, ==, 4);
  g_assert_cmpuint (stats.pending, ==, 0);

  /* Closed and drained: wait joined the workers. */
  g_assert_cmpuint (kd_test_threads_settle (threads_before), ==, threads_before);

  kd_dispatcher_close (dispatcher);
  g_object_unref (dispatcher);
  g_assert_cmpint (refused_item, ==, 0);
  kd_test_recorder_clear (&recorder);
}

/* ------------------------------------------------------------------------ */
/* Cancellation                                                             */

#define CANCEL_BLOCKERS 2
#define CANCEL_QUEUED   300
#define CANCEL_KEYS     10

typedef struct
{
  KdTestCounter  started;
  gint           saw_cancelled;
  gint           completed;
  gint           cancelled_done;
  gint           other_errors;
  gint           order_violations;
  gint           freed[CANCEL_BLOCKERS + CANCEL_QUEUED];
  gint           last_seq[CANCEL_KEYS];
  GThread       *main_thread;
} Cancel;

static void
wake_on_cancel (GCancellable *cancellable,
                gpointer      user_data)
{
  KdTestGate *gate = user_data;

  kd_test_gate_open (gate);
}

static gboolean
cancel_handler (KdJob    *job,
                gpointer  user_data,
                GError  **error)
{
  Cancel *cancel = user_data;
  guint i = GPOINTER_TO_UINT (kd_job_get_item (job)) - 1;

  if (i < CANCEL_BLOCKERS)
    {
      GCancellable *cancellable = kd_job_get_cancellable (job);
      KdTestGate gate;
      gulong id;

      /* Runs until the dispatcher is cancelled, as a long job would. */
      kd_test_gate_init (&gate);
      id = g_cancellable_connect (cancellable, G_CALLBACK (wake_on_cancel), &gate, NULL);
      kd_test_counter_add (&cancel->started, 1);
      g_assert_true (kd_test_gate_wait (&gate));
      g_cancellable_disconnect (cancellable, id);
      kd_test_gate_clear (&gate);

      if (g_cancellable_is_cancelled (cancellable))
        g_atomic_int_inc (&cancel->saw_cancelled);
      g_cancellable_set_error_if_cancelled (cancellable, error);
      return FALSE;
    }

  g_atomic_int_inc (&cancel->completed);
  return TRUE;
}

static void
cancel_done (KdJob        *job,
             const GError *error,
             gpointer      user_data)
{
  Cancel *cancel = user_data;
  guint i = GPOINTER_TO_UINT (kd_job_get_item (job)) - 1;
  const char *key = kd_job_get_key (job);

  if (!g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
    {
      g_atomic_int_inc (&cancel->other_errors);
      return;
    }

  if (i >= CANCEL_BLOCKERS)
    g_atomic_int_inc (&cancel->cancelled_done);

  /* Handed back in per-key order. */
  if (key != NULL && i >= CANCEL_BLOCKERS)
    {
      guint k = (guint) g_ascii_strtoull (key + 1, NULL, 10);
      gint seq = (gint) (i - CANCEL_BLOCKERS);

      if (cancel->last_seq[k] >= seq)
        g_atomic_int_inc (&cancel->order_violations);
      cancel->last_seq[k] = seq;
    }
}

static Cancel *cancel_for_item_free;

static void
cancel_item_free (gpointer item)
{
  /* The item is an index + 1. */
  g_atomic_int_inc (&cancel_for_item_free->freed[GPOINTER_TO_UINT (item) - 1]);
}

static void
test_cancel (void)
{
  Cancel cancel = { 0 };
  KdDispatcher *dispatcher;
  GError *error = NULL;
  guint threads_before = kd_test_threads_settle (0);
  KdStats stats;
  guint i;

  g_test_summary ("Cancelling the cancellable hands back every queued job with "
                  "G_IO_ERROR_CANCELLED through the done callback and item_free, in "
                  "per-key order; running handlers see it; the accounting holds; no "
                  "thread of the dispatcher is left");

  kd_test_counter_init (&cancel.started);
  cancel_for_item_free = &cancel;
  for (i = 0; i < CANCEL_KEYS; i++)
    cancel.last_seq[i] = -1;

  dispatcher = kd_dispatcher_new (CANCEL_BLOCKERS, cancel_handler, &cancel, NULL);
  kd_dispatcher_set_done_func (dispatcher, cancel_done, &cancel, NULL);
  kd_dispatcher_set_item_free (dispatcher, cancel_item_free);

  for (i = 0; i < CANCEL_BLOCKERS; i++)
    g_assert_true (kd_dispatcher_submit (dispatcher, NULL, GUINT_TO_POINTER (i + 1), NULL));
  g_assert_true (kd_test_counter_wait (&cancel.started, CANCEL_BLOCKERS));

  /* Both workers are busy: these all stay queued. */
  for (i = CANCEL_BLOCKERS; i < CANCEL_BLOCKERS + CANCEL_QUEUED; i++)
    {
      char key[8];

      g_snprintf (key, sizeof key, "k%u", i % CANCEL_KEYS);
      g_assert_true (kd_dispatcher_submit (dispatcher, (i % 4) ? key : NULL,
                                           GUINT_TO_POINTER (i + 1), NULL));
    }

  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));

  g_assert_false (kd_dispatcher_submit (dispatcher, "k1", GUINT_TO_POINTER (1), &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);

  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (cancel.saw_cancelled, ==, CANCEL_BLOCKERS);
  g_assert_cmpint (cancel.completed, ==, 0);
  g_assert_cmpint (cancel.cancelled_done, ==, CANCEL_QUEUED);
  g_assert_cmpint (cancel.other_errors, ==, 0);
  g_assert_cmpint (cancel.order_violations, ==, 0);
  for (i = 0; i < CANCEL_BLOCKERS + CANCEL_QUEUED; i++)
    g_assert_cmpint (cancel.freed[i], ==, 1);

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, CANCEL_BLOCKERS + CANCEL_QUEUED);
  g_assert_cmpuint (stats.failed, ==, CANCEL_BLOCKERS);
  g_assert_cmpuint (stats.cancelled, ==, CANCEL_QUEUED);
  g_assert_cmpuint (stats.completed, ==, 0);
  g_assert_cmpuint (stats.pending, ==, 0);
  g_assert_cmpuint (stats.submitted, ==,
                    stats.completed + stats.failed + stats.cancelled + stats.pending);
  g_assert_cmpuint (stats.live_keys, ==, 0);

  /* No thread of the dispatcher is left. */
  g_assert_cmpuint (kd_test_threads_settle (threads_before), ==, threads_before);

  g_object_unref (dispatcher);
  cancel_for_item_free = NULL;
  kd_test_counter_clear (&cancel.started);
}

static void
held_cancelled_handler (GCancellable *cancellable,
                        gpointer      user_data)
{
  g_assert_true (kd_test_hold_enter (user_data));
}

static gpointer
cancel_thread (gpointer data)
{
  g_cancellable_cancel (data);
  return NULL;
}

static void
test_cancel_marked_first (void)
{
  GCancellable *cancellable = g_cancellable_new ();
  KdDispatcher *dispatcher = kd_dispatcher_new (2, kd_test_noop_handler, NULL, NULL);
  GError *error = NULL;
  KdTestHold hold;
  GThread *thread;
  KdStats stats;

  g_test_summary ("Once the shared cancellable reads cancelled, submits are refused "
                  "with CLOSED, even while an earlier ::cancelled handler delays the "
                  "dispatcher's own");

  kd_test_hold_init (&hold);
  g_signal_connect (cancellable, "cancelled", G_CALLBACK (held_cancelled_handler), &hold);
  kd_dispatcher_set_cancellable (dispatcher, cancellable);
  g_assert_true (kd_dispatcher_submit (dispatcher, "k", NULL, NULL));
  kd_dispatcher_wait (dispatcher);

  thread = g_thread_new ("canceller", cancel_thread, cancellable);
  g_assert_true (kd_test_hold_wait_arrived (&hold, 1));
  g_assert_true (g_cancellable_is_cancelled (cancellable));

  g_assert_false (kd_dispatcher_submit (dispatcher, "k", NULL, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);
  g_assert_false (kd_dispatcher_try_submit (dispatcher, NULL, NULL, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);

  kd_test_hold_release (&hold);
  g_thread_join (thread);
  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, 1);
  g_assert_cmpuint (stats.rejected, ==, 2);
  g_object_unref (dispatcher);
  g_object_unref (cancellable);
  kd_test_hold_clear (&hold);
}

static void
test_cancel_before_submit (void)
{
  GCancellable *cancellable = g_cancellable_new ();
  KdDispatcher *dispatcher;
  GError *error = NULL;
  gint ran = 0;
  guint threads_before = kd_test_threads_settle (0);

  g_test_summary ("A dispatcher given an already cancelled cancellable refuses "
                  "every submit and never starts a thread");

  g_cancellable_cancel (cancellable);
  dispatcher = kd_dispatcher_new (2, count_handler, &ran, NULL);
  kd_dispatcher_set_cancellable (dispatcher, cancellable);
  g_assert_true (kd_dispatcher_get_cancellable (dispatcher) == cancellable);

  g_assert_false (kd_dispatcher_submit (dispatcher, "k", NULL, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);
  kd_dispatcher_wait (dispatcher);
  g_assert_cmpuint (kd_test_threads_settle (threads_before), ==, threads_before);
  g_assert_cmpint (ran, ==, 0);

  g_object_unref (dispatcher);
  g_object_unref (cancellable);
}

/* ------------------------------------------------------------------------ */
/* A failing handler's error                                                */

#define TEST_ERROR (g_quark_from_static_string ("kd-test-error"))

typedef struct
{
  GError *raised[100];
  gint    matched;
  gint    completed;
} Failing;

static gboolean
failing_handler (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  Failing *failing = user_data;
  guint i = GPOINTER_TO_UINT (kd_job_get_item (job));

  if (i % 2 == 0)
    return TRUE;

  g_set_error (error, TEST_ERROR, 40 + (gint) i, "job %u failed", i);
  failing->raised[i] = *error;
  return FALSE;
}

static void
failing_done (KdJob        *job,
              const GError *error,
              gpointer      user_data)
{
  Failing *failing = user_data;
  guint i = GPOINTER_TO_UINT (kd_job_get_item (job));
  char *message;

  if (i % 2 == 0)
    {
      g_assert_no_error (error);
      g_atomic_int_inc (&failing->completed);
      return;
    }

  /* The very error the handler set: same object, domain, code and message. */
  message = g_strdup_printf ("job %u failed", i);
  g_assert_true (error == failing->raised[i]);
  g_assert_error (error, TEST_ERROR, 40 + (gint) i);
  g_assert_cmpstr (error->message, ==, message);
  g_free (message);
  g_atomic_int_inc (&failing->matched);
}

static void
test_handler_error (void)
{
  Failing failing = { 0 };
  KdDispatcher *dispatcher;
  KdStats stats;
  guint i;

  g_test_summary ("A failing handler's GError reaches the done callback unchanged "
                  "and is freed afterwards");

  dispatcher = kd_dispatcher_new (3, failing_handler, &failing, NULL);
  kd_dispatcher_set_done_func (dispatcher, failing_done, &failing, NULL);

  for (i = 0; i < 100; i++)
    g_assert_true (kd_dispatcher_submit (dispatcher, (i % 3) ? "k" : NULL,
                                         GUINT_TO_POINTER (i), NULL));
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (failing.matched, ==, 50);
  g_assert_cmpint (failing.completed, ==, 50);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.failed, ==, 50);
  g_assert_cmpuint (stats.completed, ==, 50);

  g_object_unref (dispatcher);
}

static gboolean
silent_failure_handler (KdJob    *job,
                        gpointer  user_data,
                        GError  **error)
{
  return FALSE;
}

static void
record_error_code (KdJob        *job,
                   const GError *error,
                   gpointer      user_data)
{
  *(gint *) user_data = error != NULL ? error->code : -1;
}

static void
test_handler_error_missing (void)
{
  KdDispatcher *dispatcher;
  gint code = -2;

  g_test_summary ("A handler that fails without setting an error is reported, and "
                  "its job still ends failed with an error");

  dispatcher = kd_dispatcher_new (1, silent_failure_handler, NULL, NULL);
  kd_dispatcher_set_done_func (dispatcher, record_error_code, &code, NULL);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*FALSE without setting an error*");
  g_assert_true (kd_dispatcher_submit (dispatcher, NULL, NULL, NULL));
  kd_dispatcher_wait (dispatcher);
  g_test_assert_expected_messages ();

  g_assert_cmpint (code, ==, G_IO_ERROR_FAILED);
  g_object_unref (dispatcher);
}

/* ------------------------------------------------------------------------ */
/* Last unref                                                               */

typedef struct
{
  KdTestGate     gate;
  KdTestGate     finalized;    /* opened by the user_data destroy notify */
  KdTestCounter  started;
  gint           ran;
  gint           done_calls;
  gint           freed;
  gint           done_destroyed;
  KdDispatcher  *dispatcher;   /* the reference a handler drops */
  gint           unref_in;     /* 0: a thread; 1: handler; 2: done callback */
} Unref;

static Unref *unref_for_item_free;

static gboolean
unref_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  Unref *unref = user_data;

  kd_test_counter_add (&unref->started, 1);
  if (GPOINTER_TO_UINT (kd_job_get_item (job)) == 1)
    {
      g_assert_true (kd_test_gate_wait (&unref->gate));
      if (unref->unref_in == 1)
        g_object_unref (g_steal_pointer (&unref->dispatcher));
    }
  g_atomic_int_inc (&unref->ran);
  return TRUE;
}

static void
unref_done (KdJob        *job,
            const GError *error,
            gpointer      user_data)
{
  Unref *unref = user_data;

  g_assert_no_error (error);
  g_atomic_int_inc (&unref->done_calls);
  if (unref->unref_in == 2 && GPOINTER_TO_UINT (kd_job_get_item (job)) == 1)
    g_object_unref (g_steal_pointer (&unref->dispatcher));
}

static void
unref_item_free (gpointer item)
{
  g_atomic_int_inc (&unref_for_item_free->freed);
}

static void
unref_user_data_free (gpointer user_data)
{
  Unref *unref = user_data;

  kd_test_gate_open (&unref->finalized);
}

static void
unref_done_destroy (gpointer user_data)
{
  Unref *unref = user_data;

  g_atomic_int_inc (&unref->done_destroyed);
}

static void
unref_setup (Unref *unref,
             gint   unref_in)
{
  guint i;

  memset (unref, 0, sizeof *unref);
  kd_test_gate_init (&unref->gate);
  kd_test_gate_init (&unref->finalized);
  kd_test_counter_init (&unref->started);
  unref->unref_in = unref_in;
  unref_for_item_free = unref;

  unref->dispatcher = kd_dispatcher_new (2, unref_handler, unref, unref_user_data_free);
  kd_dispatcher_set_done_func (unref->dispatcher, unref_done, unref, unref_done_destroy);
  kd_dispatcher_set_item_free (unref->dispatcher, unref_item_free);

  /* Job 1 blocks on the gate; the others queue behind it on its key and
   * run on the other worker. */
  for (i = 1; i <= 200; i++)
    g_assert_true (kd_dispatcher_submit (unref->dispatcher, (i % 2) ? "k" : NULL,
                                         GUINT_TO_POINTER (i), NULL));
  g_assert_true (kd_test_counter_wait (&unref->started, 1));
}

static void
unref_check_and_clear (Unref *unref)
{
  g_assert_cmpint (unref->ran, ==, 200);
  g_assert_cmpint (unref->done_calls, ==, 200);
  g_assert_cmpint (unref->freed, ==, 200);
  g_assert_cmpint (unref->done_destroyed, ==, 1);
  g_assert_null (unref->dispatcher);

  kd_test_gate_clear (&unref->gate);
  kd_test_gate_clear (&unref->finalized);
  kd_test_counter_clear (&unref->started);
  unref_for_item_free = NULL;
}

static gpointer
unref_thread (gpointer data)
{
  Unref *unref = data;

  g_object_unref (g_steal_pointer (&unref->dispatcher));

  /* When the last unref returns, every job ended and every notify ran. */
  g_assert_cmpint (g_atomic_int_get (&unref->freed), ==, 200);
  g_assert_cmpint (g_atomic_int_get (&unref->done_destroyed), ==, 1);
  g_assert_true (kd_test_gate_wait_for (&unref->finalized, 0));
  return NULL;
}

static void
test_unref_other_thread (void)
{
  Unref unref;
  GThread *thread;

  g_test_summary ("The last unref from another thread while jobs run closes, lets "
                  "every accepted job end and joins the workers, without deadlock");

  unref_setup (&unref, 0);
  thread = g_thread_new ("unref", unref_thread, &unref);
  kd_test_gate_open (&unref.gate);
  g_thread_join (thread);
  unref_check_and_clear (&unref);
}

static void
check_unref_inside (gint unref_in)
{
  Unref unref;

  unref_setup (&unref, unref_in);
  kd_test_gate_open (&unref.gate);

  /* The unref inside returned at once; the shutdown completes on its own. */
  g_assert_true (kd_test_gate_wait (&unref.finalized));
  unref_check_and_clear (&unref);
}

static void
test_unref_in_handler (void)
{
  g_test_summary ("The last unref from inside a handler returns at once and the "
                  "shutdown completes on its own: every job ends, every notify runs");

  check_unref_inside (1);
}

static void
test_unref_in_done (void)
{
  g_test_summary ("The last unref from inside a done callback on a worker completes "
                  "the shutdown on its own");

  check_unref_inside (2);
}

typedef struct
{
  KdDispatcher *dispatcher;
  GMainContext *context;
  GThread      *context_thread;
  guint         delivered;
  gint          finalized;
  gint          finalized_inside_unref;
  gint          finalized_on_context_thread;
  KdTestGate    notified;     /* the done notify returned */
} ContextUnref;

static void
unref_in_context_done (KdJob        *job,
                       const GError *error,
                       gpointer      user_data)
{
  ContextUnref *cu = user_data;

  if (++cu->delivered == 1)
    {
      g_object_unref (g_steal_pointer (&cu->dispatcher));
      /* The unref returned at once: the dispatcher cannot be finalized
       * while its deliveries are still running on this thread. */
      if (g_atomic_int_get (&cu->finalized))
        cu->finalized_inside_unref = TRUE;
    }
}

static void
context_unref_finalized (gpointer user_data)
{
  ContextUnref *cu = user_data;

  if (g_thread_self () == cu->context_thread)
    g_atomic_int_set (&cu->finalized_on_context_thread, TRUE);

  /* Runs on the shutdown thread: wake the loop that waits for it. The test
   * keeps its context until the gate opens. */
  g_atomic_int_set (&cu->finalized, TRUE);
  g_main_context_wakeup (cu->context);
  kd_test_gate_open (&cu->notified);
}

static void
test_unref_in_context_done (void)
{
  GMainContext *context = g_main_context_new ();
  ContextUnref cu = { 0 };
  gint ran = 0;
  guint i;

  g_test_summary ("The last unref from inside a done callback on the main context "
                  "returns at once; the remaining deliveries still arrive there");

  cu.context = context;
  cu.context_thread = g_thread_self ();
  kd_test_gate_init (&cu.notified);
  cu.dispatcher = kd_dispatcher_new (2, count_handler, &ran, NULL);
  kd_dispatcher_set_main_context (cu.dispatcher, context);
  kd_dispatcher_set_done_func (cu.dispatcher, unref_in_context_done, &cu,
                               context_unref_finalized);
  for (i = 0; i < 100; i++)
    g_assert_true (kd_dispatcher_submit (cu.dispatcher, "k", NULL, NULL));
  kd_dispatcher_wait (cu.dispatcher);

  while (!g_atomic_int_get (&cu.finalized))
    g_main_context_iteration (context, TRUE);

  g_assert_null (cu.dispatcher);
  g_assert_cmpuint (cu.delivered, ==, 100);
  g_assert_cmpint (ran, ==, 100);
  g_assert_false (cu.finalized_inside_unref);
  g_assert_false (cu.finalized_on_context_thread);

  /* The dispatcher dropped its reference to the context before the notify
   * ran: this one is the last. */
  g_assert_true (kd_test_gate_wait (&cu.notified));
  g_main_context_unref (context);
  kd_test_gate_clear (&cu.notified);
}

/* ------------------------------------------------------------------------ */
/* Last unref inside a ::cancelled handler                                  */

typedef struct
{
  KdDispatcher   *dispatcher;
  KdTestRecorder  recorder;
} CancelUnref;

static void
drop_dispatcher_on_cancel (GCancellable *cancellable,
                           gpointer      user_data)
{
  CancelUnref *cu = user_data;

  /* The running job must be able to finish while we wait in the unref. */
  kd_test_hold_release (&cu->recorder.hold);
  g_object_unref (g_steal_pointer (&cu->dispatcher));
}

static void
check_unref_in_cancel_handler (gboolean ours_first)
{
  CancelUnref cu = { 0 };
  GCancellable *cancellable = g_cancellable_new ();
  gulong id = 0;
  guint i;

  kd_test_recorder_init (&cu.recorder);

  /* Handlers run in the order they were connected: ours before or after
   * the dispatcher's own. */
  if (ours_first)
    id = g_cancellable_connect (cancellable, G_CALLBACK (drop_dispatcher_on_cancel), &cu, NULL);
  cu.dispatcher = kd_dispatcher_new (1, kd_test_recorder_handler, &cu.recorder, NULL);
  kd_dispatcher_set_cancellable (cu.dispatcher, cancellable);
  kd_dispatcher_set_done_func (cu.dispatcher, kd_test_recorder_done, &cu.recorder, NULL);
  if (!ours_first)
    id = g_cancellable_connect (cancellable, G_CALLBACK (drop_dispatcher_on_cancel), &cu, NULL);

  for (i = 0; i < 50; i++)
    g_assert_true (kd_dispatcher_submit (cu.dispatcher, (i % 2) ? "k" : NULL, NULL, NULL));
  g_assert_true (kd_test_hold_wait_arrived (&cu.recorder.hold, 1));

  g_cancellable_cancel (cancellable);

  g_assert_null (cu.dispatcher);
  g_assert_cmpint (cu.recorder.completed, ==, 1);
  g_assert_cmpint (cu.recorder.cancelled, ==, 49);

  g_cancellable_disconnect (cancellable, id);
  g_object_unref (cancellable);
  kd_test_recorder_clear (&cu.recorder);
}

static void
test_unref_in_cancel_handler (void)
{
  g_test_summary ("The last unref from inside another ::cancelled handler of the "
                  "dispatcher's cancellable does not deadlock, whichever handler runs "
                  "first, and queued jobs still end cancelled");

  check_unref_in_cancel_handler (TRUE);
  check_unref_in_cancel_handler (FALSE);
}

/* ------------------------------------------------------------------------ */
/* Accounting in every stats snapshot                                       */

typedef struct
{
  KdDispatcher *dispatcher;
  guint         capacity;
  guint         n_workers;
  gint          stop;
  gint          bad_snapshots;
  guint         snapshots;
} Monitor;

static gpointer
monitor_thread (gpointer data)
{
  Monitor *monitor = data;
  KdStats last = { 0 };

  while (!g_atomic_int_get (&monitor->stop))
    {
      KdStats stats;

      kd_dispatcher_get_stats (monitor->dispatcher, &stats);
      monitor->snapshots++;
      if (stats.submitted != stats.completed + stats.failed + stats.cancelled + stats.pending ||
          stats.pending > monitor->capacity ||
          stats.running > monitor->n_workers ||
          stats.submitted < last.submitted ||
          stats.completed < last.completed)
        g_atomic_int_inc (&monitor->bad_snapshots);
      last = stats;

      /* Let the producer and workers run: under valgrind only one thread
       * runs at a time, and a monitor that never yields starves them. */
      g_thread_yield ();
    }

  return NULL;
}

static gboolean
mixed_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  guint i = GPOINTER_TO_UINT (kd_job_get_item (job));

  kd_test_spin (i % 500);
  if (i % 7 == 0)
    {
      g_set_error_literal (error, TEST_ERROR, 1, "every seventh job fails");
      return FALSE;
    }
  return TRUE;
}

static void
test_stats_snapshots (void)
{
  Monitor monitor = { 0 };
  GThread *thread;
  guint n_jobs = kd_test_size (100000, 1000000);
  KdStats stats;
  guint i;

  g_test_summary ("Every stats snapshot taken during a run satisfies submitted == "
                  "completed + failed + cancelled + pending, pending <= capacity and "
                  "running <= n_workers");

  monitor.capacity = 64;
  monitor.n_workers = 4;
  monitor.dispatcher = kd_dispatcher_new (monitor.n_workers, mixed_handler, NULL, NULL);
  kd_dispatcher_set_capacity (monitor.dispatcher, monitor.capacity);
  thread = g_thread_new ("monitor", monitor_thread, &monitor);

  for (i = 0; i < n_jobs; i++)
    {
      char key[8];

      g_snprintf (key, sizeof key, "k%u", i % 100);
      g_assert_true (kd_dispatcher_submit (monitor.dispatcher, (i % 3) ? key : NULL,
                                           GUINT_TO_POINTER (i), NULL));
    }
  kd_dispatcher_wait (monitor.dispatcher);
  g_atomic_int_set (&monitor.stop, TRUE);
  g_thread_join (thread);

  g_assert_cmpuint (monitor.snapshots, >, 0);
  g_assert_cmpint (monitor.bad_snapshots, ==, 0);
  kd_dispatcher_get_stats (monitor.dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, n_jobs);
  g_assert_cmpuint (stats.failed, ==, (n_jobs + 6) / 7);
  g_assert_cmpuint (stats.completed, ==, n_jobs - (n_jobs + 6) / 7);
  g_assert_cmpuint (stats.running, ==, 0);

  g_object_unref (monitor.dispatcher);
}

int
main (int    argc,
      char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/dispatcher/wait-batches", test_wait_batches);
  g_test_add_func ("/kd/dispatcher/wait-not-delayed", test_wait_not_delayed);
  g_test_add_func ("/kd/dispatcher/wait-overlapping", test_wait_overlapping);
  g_test_add_func ("/kd/dispatcher/close", test_close);
  g_test_add_func ("/kd/dispatcher/cancel", test_cancel);
  g_test_add_func ("/kd/dispatcher/cancel-before-submit", test_cancel_before_submit);
  g_test_add_func ("/kd/dispatcher/cancel-marked-first", test_cancel_marked_first);
  g_test_add_func ("/kd/dispatcher/handler-error", test_handler_error);
  g_test_add_func ("/kd/dispatcher/handler-error-missing", test_handler_error_missing);
  g_test_add_func ("/kd/dispatcher/unref-other-thread", test_unref_other_thread);
  g_test_add_func ("/kd/dispatcher/unref-in-handler", test_unref_in_handler);
  g_test_add_func ("/kd/dispatcher/unref-in-done", test_unref_in_done);
  g_test_add_func ("/kd/dispatcher/unref-in-context-done", test_unref_in_context_done);
  g_test_add_func ("/kd/dispatcher/unref-in-cancel-handler", test_unref_in_cancel_handler);
  g_test_add_func ("/kd/dispatcher/stats-snapshots", test_stats_snapshots);

  return g_test_run ();
}
