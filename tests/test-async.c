/* test-async.c: the guarantees of kd_dispatcher_submit_async()
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-test-util.h"

/* ------------------------------------------------------------------------ */
/* Submissions and what became of them                                      */

typedef enum
{
  OUTCOME_NONE,
  OUTCOME_COMPLETED,
  OUTCOME_FAILED,
  OUTCOME_CANCELLED,
  OUTCOME_CLOSED,
  OUTCOME_FULL,
  OUTCOME_OTHER,
} Outcome;

typedef struct _Run Run;

/* One async submission: its item and its callback's data. */
typedef struct
{
  Run          *run;
  guint         id;
  guint         key;
  guint         seq;          /* position among its key's submissions */
  GCancellable *cancellable;  /* nullable */
  Outcome       outcome;      /* set by the callback */
  gint          ran;          /* atomic: the handler ran it */
  gint          freed;        /* atomic: item_free ran on it */
  gint          done_error;   /* atomic: the done callback's error code + 1, or 0 */
} Call;

struct _Run
{
  KdDispatcher *dispatcher;
  GThread      *callback_thread;  /* where the callbacks must run */
  Call         *calls;
  guint         n_calls;
  guint         n_keys;
  gboolean      in_submit;        /* the callback thread is inside submit_async */

  /* The callback thread's alone */
  guint         n_called;
  guint        *next_seq;         /* per key, in callback order */
  guint         order_violations;
  guint         sync_calls;
  guint         wrong_thread;
  GArray       *callback_order;   /* ids */

  /* The handlers' */
  guint        *next_run_seq;     /* per key; one job of a key at a time */
  gint          run_violations;   /* atomic */
  gint          fail_every;       /* fail the submissions whose seq % fail_every == 1 */
  KdTestHold    hold;             /* id 0 waits here when @hold_first */
  gboolean      hold_first;
  GMutex        run_order_lock;
  GArray       *run_order;        /* ids, in the order the handlers started */
};

static gboolean
run_handler (KdJob    *job,
             gpointer  user_data,
             GError  **error)
{
  Run *run = user_data;
  Call *call = kd_job_get_item (job);

  g_atomic_int_inc (&call->ran);
  kd_mutex_lock (&run->run_order_lock);
  g_array_append_val (run->run_order, call->id);
  kd_mutex_unlock (&run->run_order_lock);

  if (kd_job_get_key (job) != NULL)
    {
      if (run->next_run_seq[call->key] != call->seq)
        g_atomic_int_inc (&run->run_violations);
      run->next_run_seq[call->key] = call->seq + 1;
    }

  if (run->hold_first && call->id == 0 && !kd_test_hold_enter (&run->hold))
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT, "never released");
      return FALSE;
    }

  if (run->fail_every > 0 && call->seq % run->fail_every == 1)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND, "call %u fails", call->id);
      return FALSE;
    }

  return TRUE;
}

static void
call_free (gpointer data)
{
  Call *call = data;

  g_atomic_int_inc (&call->freed);
}

static void
run_done (KdJob        *job,
          const GError *error,
          gpointer      user_data)
{
  Call *call = kd_job_get_item (job);

  g_atomic_int_set (&call->done_error, error != NULL ? error->code + 1 : 0);
}

static void
on_submitted (GObject      *source,
              GAsyncResult *result,
              gpointer      user_data)
{
  Call *call = user_data;
  Run *run = call->run;
  GObject *source_object;
  GError *error = NULL;

  if (g_thread_self () != run->callback_thread)
    run->wrong_thread++;
  if (run->in_submit)
    run->sync_calls++;

  g_assert_true (source == G_OBJECT (run->dispatcher));
  g_assert_true (g_async_result_is_tagged (result,
                                           (gpointer) (guintptr) kd_dispatcher_submit_async));
  g_assert_true (g_async_result_get_user_data (result) == call);
  source_object = g_async_result_get_source_object (result);
  g_assert_true (source_object == source);
  g_object_unref (source_object);
  g_assert_cmpint (call->outcome, ==, OUTCOME_NONE);

  if (kd_dispatcher_submit_finish (KD_DISPATCHER (source), result, &error))
    call->outcome = OUTCOME_COMPLETED;
  else if (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND))
    call->outcome = OUTCOME_FAILED;
  else if (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
    call->outcome = OUTCOME_CANCELLED;
  else if (g_error_matches (error, KD_ERROR, KD_ERROR_CLOSED))
    call->outcome = OUTCOME_CLOSED;
  else if (g_error_matches (error, KD_ERROR, KD_ERROR_FULL))
    call->outcome = OUTCOME_FULL;
  else
    call->outcome = OUTCOME_OTHER;
  g_clear_error (&error);

  /* A key's callbacks in submission order (a refused one was never a job,
   * so it does not count). */
  if (call->outcome != OUTCOME_CLOSED && call->outcome != OUTCOME_FULL)
    {
      if (run->next_seq[call->key] > call->seq)
        run->order_violations++;
      run->next_seq[call->key] = call->seq + 1;
    }

  g_array_append_val (run->callback_order, call->id);
  run->n_called++;
}

static void
run_init (Run   *run,
          guint  n_workers,
          guint  capacity,
          guint  n_calls,
          guint  n_keys)
{
  guint i;

  memset (run, 0, sizeof *run);
  run->dispatcher = kd_dispatcher_new (n_workers, run_handler, run, NULL);
  kd_dispatcher_set_capacity (run->dispatcher, capacity);
  /* Room for all of them to wait: the bound has a test of its own. */
  kd_dispatcher_set_max_waiting (run->dispatcher, MAX (n_calls, 1));
  kd_dispatcher_set_item_free (run->dispatcher, call_free);
  kd_dispatcher_set_done_func (run->dispatcher, run_done, NULL, NULL);
  run->callback_thread = g_thread_self ();
  run->n_calls = n_calls;
  run->n_keys = n_keys;
  run->calls = g_new0 (Call, n_calls);
  run->next_seq = g_new0 (guint, MAX (n_keys, 1));
  run->next_run_seq = g_new0 (guint, MAX (n_keys, 1));
  run->callback_order = g_array_new (FALSE, FALSE, sizeof (guint));
  run->run_order = g_array_new (FALSE, FALSE, sizeof (guint));
  g_mutex_init (&run->run_order_lock);
  kd_test_hold_init (&run->hold);

  for (i = 0; i < n_calls; i++)
    {
      Call *call = &run->calls[i];

      call->run = run;
      call->id = i;
      call->key = n_keys > 0 ? i % n_keys : 0;
      call->seq = n_keys > 0 ? i / n_keys : i;
    }
}

static void
run_clear (Run *run)
{
  guint i;

  g_clear_object (&run->dispatcher);
  for (i = 0; i < run->n_calls; i++)
    g_clear_object (&run->calls[i].cancellable);
  g_free (run->calls);
  g_free (run->next_seq);
  g_free (run->next_run_seq);
  g_array_unref (run->callback_order);
  g_array_unref (run->run_order);
  g_mutex_clear (&run->run_order_lock);
  kd_test_hold_clear (&run->hold);
}

static char *
key_name (guint key)
{
  return g_strdup_printf ("client-%u", key);
}

/* Submits calls [from, to) from this thread, keyed unless the run has no
 * keys. */
static void
run_submit (Run   *run,
            guint  from,
            guint  to)
{
  guint i;

  for (i = from; i < to; i++)
    {
      Call *call = &run->calls[i];
      g_autofree char *key = run->n_keys > 0 ? key_name (call->key) : NULL;

      run->in_submit = TRUE;
      kd_dispatcher_submit_async (run->dispatcher, key, call, call->cancellable,
                                  on_submitted, call);
      run->in_submit = FALSE;
    }
}

static gboolean
run_all_called (gpointer user_data)
{
  Run *run = user_data;

  return run->n_called == run->n_calls;
}

static guint
run_count (Run     *run,
           Outcome  outcome)
{
  guint i, n = 0;

  for (i = 0; i < run->n_calls; i++)
    n += run->calls[i].outcome == outcome;
  return n;
}

/* Every accepted call's item was freed once, every refused one never. */
static void
run_check_items (Run *run)
{
  guint i;

  for (i = 0; i < run->n_calls; i++)
    {
      Call *call = &run->calls[i];
      gint expected = call->outcome == OUTCOME_CLOSED || call->outcome == OUTCOME_FULL ? 0 : 1;

      if (g_atomic_int_get (&call->freed) != expected)
        g_error ("call %u (outcome %d): item freed %d times", i, call->outcome,
                 g_atomic_int_get (&call->freed));
    }
}

/* The counters once every job released its unit: a callback may run
 * before that. */
static void
run_stats (Run     *run,
           KdStats *stats)
{
  kd_dispatcher_wait (run->dispatcher);
  kd_dispatcher_get_stats (run->dispatcher, stats);
}

/* ------------------------------------------------------------------------ */

static void
test_order (void)
{
  GMainContext *context = g_main_context_new ();
  guint n_keys = 50;
  guint n_calls = kd_test_size (10000, 200000);
  KdStats stats;
  Run run;

  g_test_summary ("Async submissions of many keys under a small bound: the submit "
                  "never blocks nor calls back from inside the call; callbacks run "
                  "in the caller's thread-default context, once per submission, in "
                  "per-key submission order; handlers run in per-key order");

  g_main_context_push_thread_default (context);
  run_init (&run, 4, 16, n_calls, n_keys);

  run_submit (&run, 0, n_calls);
  g_assert_true (kd_test_iterate_until (context, run_all_called, &run));

  g_assert_cmpuint (run_count (&run, OUTCOME_COMPLETED), ==, n_calls);
  g_assert_cmpuint (run.order_violations, ==, 0);
  g_assert_cmpint (run.run_violations, ==, 0);
  g_assert_cmpuint (run.sync_calls, ==, 0);
  g_assert_cmpuint (run.wrong_thread, ==, 0);
  run_check_items (&run);

  run_stats (&run, &stats);
  g_assert_cmpuint (stats.submitted, ==, n_calls);
  g_assert_cmpuint (stats.completed, ==, n_calls);
  g_assert_cmpuint (stats.rejected, ==, 0);

  run_clear (&run);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
test_errors (void)
{
  GMainContext *context = g_main_context_new ();
  guint n_calls = 700;
  KdStats stats;
  Run run;
  guint i;

  g_test_summary ("A handler's error reaches both the done callback and "
                  "kd_dispatcher_submit_finish(); the others complete");

  g_main_context_push_thread_default (context);
  run_init (&run, 2, 64, n_calls, 7);
  run.fail_every = 5;

  run_submit (&run, 0, n_calls);
  g_assert_true (kd_test_iterate_until (context, run_all_called, &run));

  for (i = 0; i < n_calls; i++)
    {
      Call *call = &run.calls[i];
      gboolean fails = call->seq % 5 == 1;

      g_assert_cmpint (call->outcome, ==, fails ? OUTCOME_FAILED : OUTCOME_COMPLETED);
      g_assert_cmpint (call->done_error, ==, fails ? G_IO_ERROR_NOT_FOUND + 1 : 0);
    }
  g_assert_cmpuint (run.order_violations, ==, 0);
  run_check_items (&run);

  run_stats (&run, &stats);
  g_assert_cmpuint (stats.failed, ==, run_count (&run, OUTCOME_FAILED));
  g_assert_cmpuint (stats.failed, >, 0);

  run_clear (&run);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
test_bound_fifo (void)
{
  GMainContext *context = g_main_context_new ();
  guint n_calls = 100;
  KdStats stats;
  Run run;
  guint i;

  g_test_summary ("At the bound an async submission waits without blocking the "
                  "caller, and waiting submissions are accepted in call order as "
                  "room frees");

  g_main_context_push_thread_default (context);
  run_init (&run, 1, 4, n_calls, 0);
  run.hold_first = TRUE;

  /* The first job holds the only worker: 4 are admitted, 96 wait. A submit
   * that blocked would never return (the gate opens below). */
  run_submit (&run, 0, n_calls);
  g_assert_true (kd_test_hold_wait_arrived (&run.hold, 1));
  kd_dispatcher_get_stats (run.dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, 4);
  g_assert_cmpuint (stats.pending, ==, 4);
  g_assert_cmpuint (run.n_called, ==, 0);

  kd_test_hold_release (&run.hold);
  g_assert_true (kd_test_iterate_until (context, run_all_called, &run));

  g_assert_cmpuint (run_count (&run, OUTCOME_COMPLETED), ==, n_calls);
  g_assert_cmpuint (run.run_order->len, ==, n_calls);
  for (i = 0; i < n_calls; i++)
    {
      g_assert_cmpuint (g_array_index (run.run_order, guint, i), ==, i);
      g_assert_cmpuint (g_array_index (run.callback_order, guint, i), ==, i);
    }
  g_assert_cmpuint (run.sync_calls, ==, 0);
  run_check_items (&run);

  run_clear (&run);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
test_cancel_per_call (void)
{
  GMainContext *context = g_main_context_new ();
  KdStats stats;
  Run run;

  g_test_summary ("Cancelling a submission's cancellable before its job starts ends "
                  "the job with G_IO_ERROR_CANCELLED without running it, in its turn "
                  "(admitted or still waiting); after the start it changes nothing");

  g_main_context_push_thread_default (context);
  /* One key, 1 worker, bound 2: call 0 runs and holds, call 1 is queued,
   * calls 2 and 3 wait for room. */
  run_init (&run, 1, 2, 4, 1);
  run.hold_first = TRUE;
  run.calls[0].cancellable = g_cancellable_new ();
  run.calls[1].cancellable = g_cancellable_new ();
  run.calls[2].cancellable = g_cancellable_new ();

  run_submit (&run, 0, 4);
  g_assert_true (kd_test_hold_wait_arrived (&run.hold, 1));
  g_cancellable_cancel (run.calls[0].cancellable);   /* running: too late */
  g_cancellable_cancel (run.calls[1].cancellable);   /* admitted */
  g_cancellable_cancel (run.calls[2].cancellable);   /* waiting */
  kd_test_hold_release (&run.hold);

  g_assert_true (kd_test_iterate_until (context, run_all_called, &run));
  g_assert_cmpint (run.calls[0].outcome, ==, OUTCOME_COMPLETED);
  g_assert_cmpint (run.calls[1].outcome, ==, OUTCOME_CANCELLED);
  g_assert_cmpint (run.calls[2].outcome, ==, OUTCOME_CANCELLED);
  g_assert_cmpint (run.calls[3].outcome, ==, OUTCOME_COMPLETED);
  g_assert_cmpint (run.calls[1].ran, ==, 0);
  g_assert_cmpint (run.calls[2].ran, ==, 0);
  g_assert_cmpint (run.calls[1].done_error, ==, G_IO_ERROR_CANCELLED + 1);
  g_assert_cmpint (run.calls[2].done_error, ==, G_IO_ERROR_CANCELLED + 1);
  g_assert_cmpuint (run.order_violations, ==, 0);
  run_check_items (&run);

  run_stats (&run, &stats);
  g_assert_cmpuint (stats.submitted, ==, 4);
  g_assert_cmpuint (stats.completed, ==, 2);
  g_assert_cmpuint (stats.cancelled, ==, 2);

  run_clear (&run);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static gboolean
two_called (gpointer user_data)
{
  Run *run = user_data;

  return run->n_called >= 2;
}

static void
test_closed (void)
{
  GMainContext *context = g_main_context_new ();
  KdStats stats;
  Run run;

  g_test_summary ("Closing refuses the submissions still waiting for room at once, "
                  "and later ones, with KD_ERROR_CLOSED through their callbacks, "
                  "leaving their items with the caller; accepted jobs still run");

  g_main_context_push_thread_default (context);
  run_init (&run, 1, 1, 4, 0);
  run.hold_first = TRUE;

  run_submit (&run, 0, 3);        /* 0 runs and holds; 1 and 2 wait */
  g_assert_true (kd_test_hold_wait_arrived (&run.hold, 1));
  kd_dispatcher_close (run.dispatcher);

  /* Refused while call 0 still holds. */
  g_assert_true (kd_test_iterate_until (context, two_called, &run));
  g_assert_cmpint (run.calls[1].outcome, ==, OUTCOME_CLOSED);
  g_assert_cmpint (run.calls[2].outcome, ==, OUTCOME_CLOSED);
  g_assert_cmpint (run.calls[0].outcome, ==, OUTCOME_NONE);

  run_submit (&run, 3, 4);        /* after close */
  kd_test_hold_release (&run.hold);
  g_assert_true (kd_test_iterate_until (context, run_all_called, &run));
  g_assert_cmpint (run.calls[0].outcome, ==, OUTCOME_COMPLETED);
  g_assert_cmpint (run.calls[3].outcome, ==, OUTCOME_CLOSED);
  g_assert_cmpuint (run.sync_calls, ==, 0);
  run_check_items (&run);

  run_stats (&run, &stats);
  g_assert_cmpuint (stats.submitted, ==, 1);
  g_assert_cmpuint (stats.rejected, ==, 3);

  run_clear (&run);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
test_dispatcher_cancelled (void)
{
  GMainContext *context = g_main_context_new ();
  Run run;

  g_test_summary ("Cancelling the dispatcher: a queued job ends cancelled, a waiting "
                  "submission is refused with KD_ERROR_CLOSED, the running one ends "
                  "as its handler says");

  g_main_context_push_thread_default (context);
  run_init (&run, 1, 2, 3, 0);
  run.hold_first = TRUE;

  run_submit (&run, 0, 3);        /* 0 runs, 1 queued, 2 waits */
  g_assert_true (kd_test_hold_wait_arrived (&run.hold, 1));
  g_cancellable_cancel (kd_dispatcher_get_cancellable (run.dispatcher));
  kd_test_hold_release (&run.hold);

  g_assert_true (kd_test_iterate_until (context, run_all_called, &run));
  g_assert_cmpint (run.calls[0].outcome, ==, OUTCOME_COMPLETED);
  g_assert_cmpint (run.calls[1].outcome, ==, OUTCOME_CANCELLED);
  g_assert_cmpint (run.calls[2].outcome, ==, OUTCOME_CLOSED);
  run_check_items (&run);

  run_clear (&run);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

/* Each thread submits its share with its own thread-default context and
 * iterates it; its callbacks must run there. */
typedef struct
{
  Run          run;
  KdDispatcher *dispatcher;
  guint        from;
  guint        to;
} Share;

static gboolean
share_all_called (gpointer user_data)
{
  Share *share = user_data;

  return share->run.n_called == share->to - share->from;
}

static gpointer
share_thread (gpointer data)
{
  Share *share = data;
  GMainContext *context = g_main_context_new ();

  g_main_context_push_thread_default (context);
  share->run.callback_thread = g_thread_self ();
  run_submit (&share->run, share->from, share->to);
  g_assert_true (kd_test_iterate_until (context, share_all_called, share));
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);

  return NULL;
}

static gboolean
share_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  Call *call = kd_job_get_item (job);

  return run_handler (job, call->run, error);
}

static void
test_thread_default_contexts (void)
{
  guint n_threads = 3;
  guint per_thread = kd_test_size (3000, 30000);
  KdDispatcher *dispatcher = kd_dispatcher_new (2, share_handler, NULL, NULL);
  Share *shares = g_new0 (Share, n_threads);
  GThread **threads = g_new (GThread *, n_threads);
  guint i;

  g_test_summary ("Threads that submit with their own thread-default contexts each "
                  "get their callbacks in their own thread, in per-key order, while "
                  "they share one dispatcher and its bound");

  kd_dispatcher_set_capacity (dispatcher, 8);
  kd_dispatcher_set_max_waiting (dispatcher, n_threads * per_thread);
  kd_dispatcher_set_item_free (dispatcher, call_free);
  for (i = 0; i < n_threads; i++)
    {
      /* Each share is a run of its own on the shared dispatcher, with the
       * same key names: a key's jobs from the threads interleave, and each
       * thread's still run and call back in its order. */
      run_init (&shares[i].run, 1, 1, per_thread, 10);
      g_object_unref (shares[i].run.dispatcher);
      shares[i].run.dispatcher = g_object_ref (dispatcher);
      shares[i].from = 0;
      shares[i].to = per_thread;
    }
  for (i = 0; i < n_threads; i++)
    threads[i] = g_thread_new ("submitter", share_thread, &shares[i]);
  for (i = 0; i < n_threads; i++)
    g_thread_join (threads[i]);

  for (i = 0; i < n_threads; i++)
    {
      Run *run = &shares[i].run;

      g_assert_cmpuint (run_count (run, OUTCOME_COMPLETED), ==, per_thread);
      g_assert_cmpuint (run->wrong_thread, ==, 0);
      g_assert_cmpuint (run->order_violations, ==, 0);
      run_check_items (run);
    }

  for (i = 0; i < n_threads; i++)
    run_clear (&shares[i].run);
  g_object_unref (dispatcher);
  g_free (threads);
  g_free (shares);
}

static void
test_unref_before_callbacks (void)
{
  GMainContext *context = g_main_context_new ();
  guint n_calls = 500;
  gboolean finalized = FALSE;
  Run run;

  g_test_summary ("Each pending async submission holds the dispatcher: dropping the "
                  "application's reference at once lets every job run and every "
                  "callback arrive, and the dispatcher goes after the last one");

  g_main_context_push_thread_default (context);
  run_init (&run, 2, 8, n_calls, 5);
  run_submit (&run, 0, n_calls);
  g_object_add_weak_pointer (G_OBJECT (run.dispatcher), (gpointer *) &run.dispatcher);
  g_object_unref (run.dispatcher);
  g_assert_nonnull (run.dispatcher);

  g_assert_true (kd_test_iterate_until (context, run_all_called, &run));
  finalized = run.dispatcher == NULL;
  g_assert_true (finalized);
  g_assert_cmpuint (run_count (&run, OUTCOME_COMPLETED), ==, n_calls);
  g_assert_cmpuint (run.order_violations, ==, 0);
  run_check_items (&run);

  run_clear (&run);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

/* A thread that competes with blocking submits for the same small bound. */
typedef struct
{
  KdDispatcher *dispatcher;
  Call         *calls;
  guint         n;
} Blocking;

static gpointer
blocking_thread (gpointer data)
{
  Blocking *blocking = data;
  guint i;

  for (i = 0; i < blocking->n; i++)
    g_assert_true (kd_dispatcher_submit (blocking->dispatcher, NULL, &blocking->calls[i], NULL));
  return NULL;
}

static void
test_room_races (void)
{
  GMainContext *context = g_main_context_new ();
  guint n_calls = kd_test_size (50000, 500000);
  guint n_blocking = kd_test_size (20000, 200000);
  Blocking blocking;
  GThread *thread;
  KdStats stats;
  Run run;
  guint i;

  g_test_summary ("Under a bound of 2, async submissions waiting for room and a "
                  "thread of blocking submits compete; every unit released finds a "
                  "waiting submission that needs it: none is left waiting");

  g_main_context_push_thread_default (context);
  run_init (&run, 2, 2, n_calls, 16);
  blocking.dispatcher = run.dispatcher;
  blocking.calls = g_new0 (Call, n_blocking);
  blocking.n = n_blocking;
  for (i = 0; i < n_blocking; i++)
    {
      blocking.calls[i].run = &run;
      blocking.calls[i].id = G_MAXUINT;
    }

  thread = g_thread_new ("blocking", blocking_thread, &blocking);
  for (i = 0; i < n_calls; i += 100)
    {
      run_submit (&run, i, MIN (i + 100, n_calls));
      g_main_context_iteration (context, FALSE);
    }
  g_assert_true (kd_test_iterate_until (context, run_all_called, &run));
  g_thread_join (thread);

  g_assert_cmpuint (run_count (&run, OUTCOME_COMPLETED), ==, n_calls);
  g_assert_cmpuint (run.order_violations, ==, 0);
  g_assert_cmpint (run.run_violations, ==, 0);
  run_check_items (&run);
  run_stats (&run, &stats);
  g_assert_cmpuint (stats.completed, ==, n_calls + n_blocking);

  run_clear (&run);
  g_free (blocking.calls);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
test_bad_input (void)
{
  KdDispatcher *dispatcher;
  GTask *task;

  g_test_summary ("A NULL dispatcher, and a result that is not the dispatcher's, "
                  "are criticals");

  if (!g_test_undefined ())
    return;

  dispatcher = kd_dispatcher_new (1, run_handler, NULL, NULL);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*KD_IS_DISPATCHER*");
  kd_dispatcher_submit_async (NULL, NULL, NULL, NULL, NULL, NULL);
  g_test_assert_expected_messages ();

  task = g_task_new (dispatcher, NULL, NULL, NULL);
  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*KD_IS_SUBMIT_RESULT*");
  g_assert_false (kd_dispatcher_submit_finish (dispatcher, G_ASYNC_RESULT (task), NULL));
  g_test_assert_expected_messages ();
  g_task_return_boolean (task, TRUE);
  g_object_unref (task);

  g_object_unref (dispatcher);
}

static guint called_target;

static gboolean
run_target_called (gpointer user_data)
{
  Run *run = user_data;

  return run->n_called >= called_target;
}

static void
test_waiting_bounded (void)
{
  GMainContext *context = g_main_context_new ();
  guint n_calls = kd_test_size (2000, 200000);
  guint capacity = 4, max_waiting = 8, waiting = 0, i;
  KdStats stats;
  Run run;

  g_test_summary ("A flood of async submissions against a blocked dispatcher: the capacity's "
                  "worth is accepted, max-waiting wait, every other one is refused at once with "
                  "KD_ERROR_FULL through its callback (in a later iteration), its item still the "
                  "caller's; once room frees, the waiting ones run in order");

  g_main_context_push_thread_default (context);
  run_init (&run, 1, capacity, n_calls, 3);
  kd_dispatcher_set_max_waiting (run.dispatcher, max_waiting);
  g_assert_cmpuint (kd_dispatcher_get_max_waiting (run.dispatcher), ==, max_waiting);
  run.hold_first = TRUE;

  run_submit (&run, 0, n_calls);
  g_object_get (run.dispatcher, "waiting", &waiting, NULL);
  g_assert_cmpuint (waiting, ==, max_waiting);
  /* The refusals come at the next iterations, the others once room frees. */
  g_assert_cmpuint (run.n_called, ==, 0);
  called_target = n_calls - capacity - max_waiting;
  g_assert_true (kd_test_iterate_until (context, run_target_called, &run));
  g_assert_cmpuint (run_count (&run, OUTCOME_FULL), ==, n_calls - capacity - max_waiting);
  for (i = 0; i < capacity + max_waiting; i++)
    g_assert_cmpint (run.calls[i].outcome, ==, OUTCOME_NONE);

  kd_test_hold_release (&run.hold);
  g_assert_true (kd_test_iterate_until (context, run_all_called, &run));
  g_assert_cmpuint (run_count (&run, OUTCOME_COMPLETED), ==, capacity + max_waiting);
  g_assert_cmpuint (run.order_violations, ==, 0);
  g_assert_cmpint (run.run_violations, ==, 0);
  g_assert_cmpuint (run.sync_calls, ==, 0);
  run_check_items (&run);

  run_stats (&run, &stats);
  g_assert_cmpuint (stats.submitted, ==, capacity + max_waiting);
  g_assert_cmpuint (stats.rejected, ==, n_calls - capacity - max_waiting);
  run_clear (&run);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

int
main (int    argc,
      char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/async/order", test_order);
  g_test_add_func ("/kd/async/errors", test_errors);
  g_test_add_func ("/kd/async/bound-fifo", test_bound_fifo);
  g_test_add_func ("/kd/async/waiting-bounded", test_waiting_bounded);
  g_test_add_func ("/kd/async/cancel-per-call", test_cancel_per_call);
  g_test_add_func ("/kd/async/closed", test_closed);
  g_test_add_func ("/kd/async/dispatcher-cancelled", test_dispatcher_cancelled);
  g_test_add_func ("/kd/async/thread-default-contexts", test_thread_default_contexts);
  g_test_add_func ("/kd/async/unref-before-callbacks", test_unref_before_callbacks);
  g_test_add_func ("/kd/async/room-races", test_room_races);
  g_test_add_func ("/kd/async/bad-input", test_bad_input);

  return g_test_run ();
}
