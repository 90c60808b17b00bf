/* test-wait.c: waiting with a deadline, and without blocking
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-test-util.h"

/* Handlers hold the items listed in @held until the test releases them;
 * other items end at once. */
typedef struct
{
  GMutex        lock;
  GHashTable   *held;      /* items that wait at @gate */
  KdTestGate    gate;
  KdTestCounter arrived;   /* held items that reached the gate */
  KdTestCounter ended;     /* jobs whose done callback ran */
} Holder;

static gboolean
holding_handler (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  Holder *holder = user_data;
  gboolean hold;

  kd_mutex_lock (&holder->lock);
  hold = g_hash_table_contains (holder->held, kd_job_get_item (job));
  kd_mutex_unlock (&holder->lock);

  if (hold)
    {
      kd_test_counter_add (&holder->arrived, 1);
      g_assert_true (kd_test_gate_wait (&holder->gate));
    }
  return TRUE;
}

static void
holder_done (KdJob        *job,
             const GError *error,
             gpointer      user_data)
{
  Holder *holder = user_data;

  kd_test_counter_add (&holder->ended, 1);
}

static KdDispatcher *
holder_dispatcher_new (Holder *holder,
                       guint   n_workers)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (n_workers, holding_handler, holder, NULL);

  g_mutex_init (&holder->lock);
  holder->held = g_hash_table_new (NULL, NULL);
  kd_test_gate_init (&holder->gate);
  kd_test_counter_init (&holder->arrived);
  kd_test_counter_init (&holder->ended);
  kd_dispatcher_set_done_func (dispatcher, holder_done, holder, NULL);
  return dispatcher;
}

static void
holder_clear (Holder *holder)
{
  g_hash_table_unref (holder->held);
  kd_test_gate_clear (&holder->gate);
  kd_test_counter_clear (&holder->arrived);
  kd_test_counter_clear (&holder->ended);
  g_mutex_clear (&holder->lock);
}

static void
hold (Holder *holder,
      guint   item)
{
  kd_mutex_lock (&holder->lock);
  g_hash_table_add (holder->held, GUINT_TO_POINTER (item));
  kd_mutex_unlock (&holder->lock);
}

static void
submit (KdDispatcher *dispatcher,
        const char   *key,
        guint         item)
{
  g_assert_true (kd_dispatcher_submit (dispatcher, key, GUINT_TO_POINTER (item), NULL));
}

static void
test_until (void)
{
  Holder holder;
  KdDispatcher *dispatcher = holder_dispatcher_new (&holder, 2);
  gint64 end_time;

  g_test_summary ("wait_until returns FALSE, not before its end time, while a job "
                  "accepted before the call runs, and TRUE once every such job ended; "
                  "an end time in the past only looks");

  g_assert_true (kd_dispatcher_wait_until (dispatcher, 0));

  hold (&holder, 1);
  submit (dispatcher, "k", 1);
  submit (dispatcher, "k", 2);
  g_assert_true (kd_test_counter_wait (&holder.arrived, 1));

  end_time = g_get_monotonic_time () + 2 * G_TIME_SPAN_MILLISECOND;
  g_assert_false (kd_dispatcher_wait_until (dispatcher, end_time));
  g_assert_cmpint (g_get_monotonic_time (), >=, end_time);
  g_assert_false (kd_dispatcher_wait_until (dispatcher, 0));
  g_assert_cmpint (kd_test_counter_get (&holder.ended), ==, 0);

  kd_test_gate_open (&holder.gate);
  g_assert_true (kd_dispatcher_wait_until (dispatcher,
                                           g_get_monotonic_time () + KD_TEST_DEADLINE_US));
  g_assert_cmpint (kd_test_counter_get (&holder.ended), ==, 2);

  g_object_unref (dispatcher);
  holder_clear (&holder);
}

/* An async wait's outcome, seen in its callback. */
typedef struct
{
  GThread *thread;     /* where the callback ran */
  gboolean called;
  gboolean waited;     /* wait_finish()'s result */
  GError  *error;
  gint     ended;      /* jobs ended when the callback ran */
  Holder  *holder;
} Waited;

static void
on_waited (GObject      *source,
           GAsyncResult *result,
           gpointer      user_data)
{
  Waited *waited = user_data;

  g_assert_false (waited->called);
  waited->called = TRUE;
  waited->thread = g_thread_self ();
  waited->waited = kd_dispatcher_wait_finish (KD_DISPATCHER (source), result, &waited->error);
  if (waited->holder != NULL)
    waited->ended = kd_test_counter_get (&waited->holder->ended);
}

static gboolean
waited_called (gpointer user_data)
{
  return ((Waited *) user_data)->called;
}

static void
test_async (void)
{
  GMainContext *context = g_main_context_new ();
  Holder holder;
  KdDispatcher *dispatcher = holder_dispatcher_new (&holder, 2);
  Waited waited = { 0 }, empty = { 0 };

  g_test_summary ("wait_async completes in the caller's context once the jobs accepted "
                  "before the call ended, not while one runs, and a job accepted after "
                  "the call does not delay it; with nothing pending it completes on the "
                  "next iteration, never inside the call");

  g_main_context_push_thread_default (context);
  waited.holder = &holder;

  kd_dispatcher_wait_async (dispatcher, NULL, on_waited, &empty);
  g_assert_false (empty.called);
  g_assert_true (kd_test_iterate_until (context, waited_called, &empty));
  g_assert_true (empty.waited);

  hold (&holder, 1);
  hold (&holder, 3);
  submit (dispatcher, "a", 1);
  submit (dispatcher, "a", 2);
  g_assert_true (kd_test_counter_wait (&holder.arrived, 1));
  kd_dispatcher_wait_async (dispatcher, NULL, on_waited, &waited);
  /* Accepted after the call, held: must not delay it. */
  submit (dispatcher, "b", 3);
  g_assert_true (kd_test_counter_wait (&holder.arrived, 2));

  while (g_main_context_iteration (context, FALSE))
    ;
  g_assert_false (waited.called);

  /* Item 3 is held on the same gate: open it, the wait ends with items 1
   * and 2, whatever 3 does. */
  kd_test_gate_open (&holder.gate);
  g_assert_true (kd_test_iterate_until (context, waited_called, &waited));
  g_assert_true (waited.waited);
  g_assert_no_error (waited.error);
  g_assert_true (waited.thread == g_thread_self ());
  g_assert_cmpint (waited.ended, >=, 2);

  kd_dispatcher_wait (dispatcher);
  g_object_unref (dispatcher);
  holder_clear (&holder);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
test_async_not_delayed (void)
{
  GMainContext *context = g_main_context_new ();
  Holder holder;
  KdDispatcher *dispatcher = holder_dispatcher_new (&holder, 2);
  Waited waited = { 0 };

  g_test_summary ("A job accepted after wait_async was called and still running does "
                  "not delay the wait");

  g_main_context_push_thread_default (context);
  submit (dispatcher, "a", 1);
  kd_dispatcher_wait_async (dispatcher, NULL, on_waited, &waited);
  hold (&holder, 2);
  submit (dispatcher, "b", 2);
  g_assert_true (kd_test_counter_wait (&holder.arrived, 1));

  g_assert_true (kd_test_iterate_until (context, waited_called, &waited));
  g_assert_true (waited.waited);
  g_assert_cmpint (kd_test_counter_get (&holder.ended), ==, 1);

  kd_test_gate_open (&holder.gate);
  kd_dispatcher_wait (dispatcher);
  g_object_unref (dispatcher);
  holder_clear (&holder);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
test_async_cancel (void)
{
  GMainContext *context = g_main_context_new ();
  Holder holder;
  KdDispatcher *dispatcher = holder_dispatcher_new (&holder, 1);
  GCancellable *cancellable = g_cancellable_new ();
  GCancellable *cancelled = g_cancellable_new ();
  Waited waited = { 0 }, early = { 0 };
  KdStats stats;

  g_test_summary ("Cancelling an async wait completes it at once with CANCELLED, in "
                  "the caller's context, and touches no job; a wait given a cancelled "
                  "cancellable is cancelled at once");

  g_main_context_push_thread_default (context);
  hold (&holder, 1);
  submit (dispatcher, NULL, 1);
  g_assert_true (kd_test_counter_wait (&holder.arrived, 1));

  kd_dispatcher_wait_async (dispatcher, cancellable, on_waited, &waited);
  g_cancellable_cancel (cancellable);
  g_assert_true (kd_test_iterate_until (context, waited_called, &waited));
  g_assert_false (waited.waited);
  g_assert_error (waited.error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_clear_error (&waited.error);
  g_assert_true (waited.thread == g_thread_self ());

  g_cancellable_cancel (cancelled);
  kd_dispatcher_wait_async (dispatcher, cancelled, on_waited, &early);
  g_assert_true (kd_test_iterate_until (context, waited_called, &early));
  g_assert_error (early.error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_clear_error (&early.error);

  kd_test_gate_open (&holder.gate);
  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, 1);
  g_assert_cmpuint (stats.cancelled, ==, 0);
  /* No second callback came. */
  while (g_main_context_iteration (context, FALSE))
    ;

  g_object_unref (dispatcher);
  g_object_unref (cancellable);
  g_object_unref (cancelled);
  holder_clear (&holder);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

/* More async waits than the admission has epochs, each with its own job. */
#define MANY_WAITS 100

static gboolean
all_called (gpointer user_data)
{
  Waited *waited = user_data;
  guint i;

  for (i = 0; i < MANY_WAITS; i++)
    if (!waited[i].called)
      return FALSE;
  return TRUE;
}

static void
test_async_many (void)
{
  GMainContext *context = g_main_context_new ();
  Holder holder;
  KdDispatcher *dispatcher = holder_dispatcher_new (&holder, 2);
  GCancellable *cancellable = g_cancellable_new ();
  Waited *waited = g_new0 (Waited, MANY_WAITS);
  guint i;

  g_test_summary ("A hundred async waits, more than the admission's epochs, each after a "
                  "held job: none completes while the first job is held, every one "
                  "completes once the jobs end, cancelled ones with CANCELLED");

  g_main_context_push_thread_default (context);
  hold (&holder, 1);
  for (i = 0; i < MANY_WAITS; i++)
    {
      submit (dispatcher, "k", i + 1);
      kd_dispatcher_wait_async (dispatcher, i % 10 == 9 ? cancellable : NULL, on_waited,
                                &waited[i]);
    }
  g_assert_true (kd_test_counter_wait (&holder.arrived, 1));
  while (g_main_context_iteration (context, FALSE))
    ;
  for (i = 0; i < MANY_WAITS; i++)
    g_assert_false (waited[i].called);

  g_cancellable_cancel (cancellable);
  kd_test_gate_open (&holder.gate);
  g_assert_true (kd_test_iterate_until (context, all_called, waited));
  for (i = 0; i < MANY_WAITS; i++)
    {
      /* A cancelled one may have drained first. */
      if (i % 10 == 9 && !waited[i].waited)
        g_assert_error (waited[i].error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
      else
        g_assert_true (waited[i].waited);
      g_clear_error (&waited[i].error);
    }

  kd_dispatcher_wait (dispatcher);
  g_object_unref (dispatcher);
  g_object_unref (cancellable);
  g_free (waited);
  holder_clear (&holder);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

/* Items that end one at a time, as the test lets them: item i waits
 * until @released reached i. */
typedef struct
{
  KdTestCounter released;
  KdTestCounter ended;
} LockStep;

static gboolean
lock_step_handler (KdJob    *job,
                   gpointer  user_data,
                   GError  **error)
{
  LockStep *step = user_data;

  g_assert_true (kd_test_counter_wait (&step->released,
                                       GPOINTER_TO_UINT (kd_job_get_item (job))));
  return TRUE;
}

static void
lock_step_done (KdJob        *job,
                const GError *error,
                gpointer      user_data)
{
  kd_test_counter_add (&((LockStep *) user_data)->ended, 1);
}

/* An async wait in the lock step: when its callback ran, how many items
 * had ended. */
typedef struct
{
  LockStep *step;
  gint      ended_then;   /* -1 until called */
} StepWait;

static void
on_step_waited (GObject      *source,
                GAsyncResult *result,
                gpointer      user_data)
{
  StepWait *wait = user_data;

  g_assert_true (kd_dispatcher_wait_finish (KD_DISPATCHER (source), result, NULL));
  g_assert_cmpint (wait->ended_then, ==, -1);
  wait->ended_then = kd_test_counter_get (&wait->step->ended);
}

#define STEP_ITEMS 80

static gboolean
all_steps_called (gpointer user_data)
{
  StepWait *waits = user_data;
  guint i;

  for (i = 0; i < STEP_ITEMS; i++)
    if (waits[i].ended_then < 0)
      return FALSE;
  return TRUE;
}

static void
test_async_never_early (void)
{
  GMainContext *context = g_main_context_new ();
  LockStep step;
  KdDispatcher *dispatcher = kd_dispatcher_new (2, lock_step_handler, &step, NULL);
  StepWait waits[STEP_ITEMS];
  guint i;

  g_test_summary ("Eighty async waits, each after one more item of one key, more than the "
                  "admission has epochs, with the items ending one at a time: no wait "
                  "completes before every item accepted before it ended, and all complete");

  g_main_context_push_thread_default (context);
  kd_test_counter_init (&step.released);
  kd_test_counter_init (&step.ended);
  kd_dispatcher_set_capacity (dispatcher, 2 * STEP_ITEMS);
  kd_dispatcher_set_done_func (dispatcher, lock_step_done, &step, NULL);

  for (i = 0; i < STEP_ITEMS; i++)
    {
      g_assert_true (kd_dispatcher_submit (dispatcher, "k", GUINT_TO_POINTER (i + 1), NULL));
      waits[i].step = &step;
      waits[i].ended_then = -1;
      kd_dispatcher_wait_async (dispatcher, NULL, on_step_waited, &waits[i]);
    }

  for (i = 1; i <= STEP_ITEMS; i++)
    {
      kd_test_counter_add (&step.released, 1);
      g_assert_true (kd_test_counter_wait (&step.ended, i));
      while (g_main_context_iteration (context, FALSE))
        ;
    }
  g_assert_true (kd_test_iterate_until (context, all_steps_called, waits));
  for (i = 0; i < STEP_ITEMS; i++)
    g_assert_cmpint (waits[i].ended_then, >=, (gint) i + 1);

  kd_dispatcher_wait (dispatcher);
  g_object_unref (dispatcher);
  kd_test_counter_clear (&step.released);
  kd_test_counter_clear (&step.ended);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
on_finalized (gpointer  user_data,
              GObject  *where_the_object_was)
{
  kd_test_gate_open (user_data);
}

static void
test_async_holds_dispatcher (void)
{
  GMainContext *context = g_main_context_new ();
  Holder holder;
  KdDispatcher *dispatcher = holder_dispatcher_new (&holder, 1);
  KdTestGate finalized;
  Waited waited = { 0 };

  g_test_summary ("An async wait holds the dispatcher: the caller may drop its reference "
                  "at once, the callback still comes with the dispatcher alive");

  g_main_context_push_thread_default (context);
  kd_test_gate_init (&finalized);
  hold (&holder, 1);
  submit (dispatcher, NULL, 1);
  kd_dispatcher_wait_async (dispatcher, NULL, on_waited, &waited);
  g_object_weak_ref (G_OBJECT (dispatcher), on_finalized, &finalized);
  g_object_unref (dispatcher);
  g_assert_false (kd_test_gate_wait_for (&finalized, 0));

  kd_test_gate_open (&holder.gate);
  g_assert_true (kd_test_iterate_until (context, waited_called, &waited));
  g_assert_true (waited.waited);
  /* The task was the last holder: it goes after the callback, on this
   * thread or on the worker that saw the jobs end. */
  g_assert_true (kd_test_gate_wait (&finalized));
  kd_test_gate_clear (&finalized);

  holder_clear (&holder);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

int
main (int    argc,
      char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/wait/until", test_until);
  g_test_add_func ("/kd/wait/async", test_async);
  g_test_add_func ("/kd/wait/async-not-delayed", test_async_not_delayed);
  g_test_add_func ("/kd/wait/async-cancel", test_async_cancel);
  g_test_add_func ("/kd/wait/async-many", test_async_many);
  g_test_add_func ("/kd/wait/async-never-early", test_async_never_early);
  g_test_add_func ("/kd/wait/async-holds-dispatcher", test_async_holds_dispatcher);

  return g_test_run ();
}
