/* test-properties.c: KdDispatcher's GObject properties
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>

#include "kd-test-util.h"

static gboolean
fail_some_handler (KdJob    *job,
                   gpointer  user_data,
                   GError  **error)
{
  guint id = GPOINTER_TO_UINT (kd_job_get_item (job));

  if (id % 10 == 3)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_FAILED, "job %u fails", id);
      return FALSE;
    }
  return TRUE;
}

/* ------------------------------------------------------------------------ */
/* Configuration                                                            */

typedef struct
{
  guint n_notified;
  char  last[32];
} Notes;

static void
on_notify (GObject    *object,
           GParamSpec *pspec,
           gpointer    user_data)
{
  Notes *notes = user_data;

  notes->n_notified++;
  g_strlcpy (notes->last, g_param_spec_get_name (pspec), sizeof notes->last);
}

static void
test_config (void)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (3, fail_some_handler, NULL, NULL);
  GMainContext *context = g_main_context_new ();
  GCancellable *cancellable = g_cancellable_new ();
  GMainContext *got_context = NULL;
  GCancellable *got_cancellable = NULL;
  char *name = NULL;
  guint n_workers, fanout, capacity;
  Notes notes = { 0 };

  g_test_summary ("Every configuration setter is a property: it reads back, notifies "
                  "once per change (not when set to the same value), and becomes "
                  "read-only at the first submit");

  g_signal_connect (dispatcher, "notify", G_CALLBACK (on_notify), &notes);

  g_object_get (dispatcher, "n-workers", &n_workers, "fanout", &fanout,
                "capacity", &capacity, "name", &name, "main-context", &got_context,
                "cancellable", &got_cancellable, NULL);
  g_assert_cmpuint (n_workers, ==, 3);
  g_assert_cmpuint (fanout, ==, 1);
  g_assert_cmpuint (capacity, ==, 1024);
  g_assert_null (name);
  g_assert_null (got_context);
  g_assert_true (got_cancellable == kd_dispatcher_get_cancellable (dispatcher));
  g_clear_object (&got_cancellable);

  g_object_set (dispatcher, "capacity", 16, NULL);
  g_assert_cmpuint (notes.n_notified, ==, 1);
  g_assert_cmpstr (notes.last, ==, "capacity");
  g_assert_cmpuint (kd_dispatcher_get_capacity (dispatcher), ==, 16);
  kd_dispatcher_set_capacity (dispatcher, 16);
  g_assert_cmpuint (notes.n_notified, ==, 1);

  g_object_set (dispatcher, "fanout", 2, NULL);
  g_assert_cmpstr (notes.last, ==, "fanout");
  g_object_set (dispatcher, "name", "imports", NULL);
  g_assert_cmpstr (notes.last, ==, "name");
  g_assert_cmpstr (kd_dispatcher_get_name (dispatcher), ==, "imports");
  g_object_set (dispatcher, "main-context", context, NULL);
  g_assert_cmpstr (notes.last, ==, "main-context");
  g_assert_true (kd_dispatcher_get_main_context (dispatcher) == context);
  g_object_set (dispatcher, "cancellable", cancellable, NULL);
  g_assert_cmpstr (notes.last, ==, "cancellable");
  g_assert_true (kd_dispatcher_get_cancellable (dispatcher) == cancellable);
  g_assert_cmpuint (notes.n_notified, ==, 5);

  g_object_get (dispatcher, "fanout", &fanout, "name", &name, "main-context", &got_context, NULL);
  g_assert_cmpuint (fanout, ==, 2);
  g_assert_cmpstr (name, ==, "imports");
  g_assert_true (got_context == context);
  g_free (name);
  g_main_context_unref (got_context);

  /* The first submit ends the configuration. */
  g_assert_true (kd_dispatcher_submit (dispatcher, NULL, GUINT_TO_POINTER (1), NULL));
  if (g_test_undefined ())
    {
      g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
      g_object_set (dispatcher, "capacity", 99, NULL);
      g_test_assert_expected_messages ();
      g_assert_cmpuint (kd_dispatcher_get_capacity (dispatcher), ==, 16);
      g_assert_cmpuint (notes.n_notified, ==, 5);
    }

  kd_dispatcher_wait (dispatcher);
  g_signal_handlers_disconnect_by_data (dispatcher, &notes);
  g_object_unref (dispatcher);
  g_object_unref (cancellable);
  g_main_context_unref (context);
}

/* ------------------------------------------------------------------------ */
/* Counters                                                                 */

typedef struct
{
  GThread *context_thread;
  guint    wrong_thread;
  guint    n_completed_notifies;
  guint64  completed;        /* as read in the last notify::completed */
  guint64  failed;
  guint64  submitted;
  guint64  pending;
  guint    live_keys;
} Watch;

static void
on_counter_notify (GObject    *object,
                   GParamSpec *pspec,
                   gpointer    user_data)
{
  Watch *watch = user_data;
  const char *name = g_param_spec_get_name (pspec);

  if (g_thread_self () != watch->context_thread)
    watch->wrong_thread++;

  if (g_str_equal (name, "completed"))
    {
      watch->n_completed_notifies++;
      g_object_get (object, "completed", &watch->completed, NULL);
    }
  else if (g_str_equal (name, "failed"))
    g_object_get (object, "failed", &watch->failed, NULL);
  else if (g_str_equal (name, "submitted"))
    g_object_get (object, "submitted", &watch->submitted, NULL);
  else if (g_str_equal (name, "pending"))
    g_object_get (object, "pending", &watch->pending, NULL);
  else if (g_str_equal (name, "live-keys"))
    g_object_get (object, "live-keys", &watch->live_keys, NULL);
}

typedef struct
{
  Watch   *watch;
  guint64  completed;
  guint64  failed;
} Expect;

static gboolean
watch_reached (gpointer user_data)
{
  Expect *expect = user_data;

  /* Every counter at its final value, live-keys included: a job is counted
   * as ended (pending 0) just before its worker reaps the key's mailbox,
   * so a notify that runs in between sees pending 0 with the key still
   * live, and live-keys notifies 0 only in a later round. */
  return expect->watch->completed == expect->completed &&
         expect->watch->failed == expect->failed &&
         expect->watch->pending == 0 &&
         expect->watch->live_keys == 0 &&
         expect->watch->submitted == expect->completed + expect->failed;
}

typedef struct
{
  KdDispatcher *dispatcher;
  guint         n_jobs;
} Submits;

static gpointer
submit_jobs (gpointer data)
{
  Submits *submits = data;
  guint i;

  for (i = 0; i < submits->n_jobs; i++)
    {
      g_autofree char *key = g_strdup_printf ("k%u", i % 100);

      g_assert_true (kd_dispatcher_submit (submits->dispatcher, key, GUINT_TO_POINTER (i), NULL));
    }

  return NULL;
}

/* Runs @n_jobs keyed jobs (a tenth failing) on a dispatcher created in
 * this thread, whose thread-default context is @context (or whose main
 * context it is, with @set_main_context), and checks the counters'
 * notifications there, iterated by this thread. The jobs are submitted
 * here, or from a thread of their own if @submit_elsewhere, which then
 * makes the counters' notifier at the first change. */
static void
check_counter_notifies (GMainContext *context,
                        gboolean      set_main_context,
                        gboolean      submit_elsewhere,
                        guint         n_jobs)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (2, fail_some_handler, NULL, NULL);
  Watch watch = { 0 };
  Expect expect = { &watch, n_jobs - n_jobs / 10, n_jobs / 10 };
  Submits submits = { dispatcher, n_jobs };
  GThread *submitter = NULL;
  guint64 completed, failed;
  KdStats stats;

  watch.context_thread = g_thread_self ();
  if (set_main_context)
    kd_dispatcher_set_main_context (dispatcher, context);
  g_signal_connect (dispatcher, "notify", G_CALLBACK (on_counter_notify), &watch);

  if (submit_elsewhere)
    submitter = g_thread_new ("submitter", submit_jobs, &submits);
  else
    submit_jobs (&submits);

  g_assert_true (kd_test_iterate_until (context, watch_reached, &expect));
  if (submitter != NULL)
    g_thread_join (submitter);
  g_assert_cmpuint (watch.wrong_thread, ==, 0);
  g_assert_cmpuint (watch.live_keys, ==, 0);
  /* Coalesced, not one notify per job. */
  g_assert_cmpuint (watch.n_completed_notifies, <, n_jobs / 100);

  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_object_get (dispatcher, "completed", &completed, "failed", &failed, NULL);
  g_assert_cmpuint (completed, ==, stats.completed);
  g_assert_cmpuint (failed, ==, stats.failed);

  g_signal_handlers_disconnect_by_data (dispatcher, &watch);
  g_object_unref (dispatcher);
}

static void
test_counters_notify (void)
{
  GMainContext *context = g_main_context_new ();

  g_test_summary ("The counters are properties that notify in the dispatcher's main "
                  "context, never on a worker, coalesced, and always end with the "
                  "final values");

  check_counter_notifies (context, TRUE, FALSE, 20000);
  g_main_context_unref (context);
}

static void
test_counters_notify_submitted_elsewhere (void)
{
  GMainContext *context = g_main_context_new ();

  g_test_summary ("The counters notify in the dispatcher's main context when another "
                  "thread submits the jobs and so makes the notifier");

  check_counter_notifies (context, TRUE, TRUE, 20000);
  g_main_context_unref (context);
}

static gpointer
creator_thread (gpointer data)
{
  GMainContext *context = g_main_context_new ();

  g_main_context_push_thread_default (context);
  check_counter_notifies (context, FALSE, FALSE, 20000);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);

  return NULL;
}

static void
test_counters_creation_context (void)
{
  g_test_summary ("Without a main context, the counters notify in the thread-default "
                  "context of the thread that created the dispatcher");

  g_thread_join (g_thread_new ("creator", creator_thread, NULL));
}

static void
count_callback (GObject      *source,
                GAsyncResult *result,
                gpointer      user_data)
{
  guint *n_called = user_data;

  (*n_called)++;
}

static gboolean
five_called (gpointer user_data)
{
  return *(guint *) user_data == 5;
}

static void
test_waiting (void)
{
  GMainContext *context = g_main_context_new ();
  KdTestRecorder recorder;
  KdDispatcher *dispatcher;
  guint waiting = 0, n_called = 0;
  guint64 rejected = 0;
  guint i;

  g_test_summary ("The waiting property counts async submissions waiting for room; "
                  "close empties it");

  g_main_context_push_thread_default (context);
  kd_test_recorder_init (&recorder);
  dispatcher = kd_dispatcher_new (1, kd_test_recorder_handler, &recorder, NULL);
  kd_dispatcher_set_capacity (dispatcher, 1);
  g_object_set (dispatcher, "max-waiting", 4, NULL);

  for (i = 0; i < 5; i++)
    kd_dispatcher_submit_async (dispatcher, "k", NULL, NULL, count_callback, &n_called);
  g_assert_true (kd_test_hold_wait_arrived (&recorder.hold, 1));
  g_object_get (dispatcher, "waiting", &waiting, NULL);
  g_assert_cmpuint (waiting, ==, 4);

  kd_dispatcher_close (dispatcher);
  g_object_get (dispatcher, "waiting", &waiting, "rejected", &rejected, NULL);
  g_assert_cmpuint (waiting, ==, 0);
  g_assert_cmpuint (rejected, ==, 4);

  kd_test_hold_release (&recorder.hold);
  g_assert_true (kd_test_iterate_until (context, five_called, &n_called));
  g_object_unref (dispatcher);
  kd_test_recorder_clear (&recorder);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static gboolean
complete_handler (KdJob    *job,
                  gpointer  user_data,
                  GError  **error)
{
  return TRUE;
}

/* Runs @call expecting a critical that names @what. */
#define EXPECT_CRITICAL(what, call)                                           \
  G_STMT_START {                                                              \
    g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*" what "*"); \
    call;                                                                     \
    g_test_assert_expected_messages ();                                       \
  } G_STMT_END

static void
test_out_of_range (void)
{
  KdDispatcher *dispatcher;
  KdPipeline *pipeline;
  guint n_workers = 0;
  KdStats stats;

  g_test_summary ("Every count and time a caller passes is range-checked: out of range is a "
                  "critical that leaves the setting as it was (or a documented clamp), never "
                  "a crash later");

  if (!g_test_undefined ())
    return;

  /* Workers: at most KD_DISPATCHER_MAX_WORKERS. */
  EXPECT_CRITICAL ("n_workers <= KD_DISPATCHER_MAX_WORKERS",
                   dispatcher = kd_dispatcher_new ((guint) -1, complete_handler, NULL, NULL));
  g_assert_null (dispatcher);
  EXPECT_CRITICAL ("n_workers <= KD_DISPATCHER_MAX_WORKERS",
                   dispatcher = kd_dispatcher_new (KD_DISPATCHER_MAX_WORKERS + 1, complete_handler,
                                                   NULL, NULL));
  g_assert_null (dispatcher);
  pipeline = kd_pipeline_new ();
  EXPECT_CRITICAL ("n_workers <= KD_DISPATCHER_MAX_WORKERS",
                   g_assert_null (kd_pipeline_add_stage (pipeline, "s", KD_DISPATCHER_MAX_WORKERS + 1,
                                                         complete_handler, NULL, NULL)));
  g_assert_cmpuint (kd_pipeline_get_n_stages (pipeline), ==, 0);
  g_object_unref (pipeline);

  /* Through GObject, the property's range says no, and the default stays. */
  g_test_expect_message ("GLib-GObject", G_LOG_LEVEL_WARNING, "*n-workers*");
  dispatcher = g_object_new (KD_TYPE_DISPATCHER, "n-workers", (guint) -1, NULL);
  g_test_assert_expected_messages ();
  g_object_get (dispatcher, "n-workers", &n_workers, NULL);
  g_assert_cmpuint (n_workers, ==, MIN (g_get_num_processors (), KD_DISPATCHER_MAX_WORKERS));
  g_object_unref (dispatcher);

  dispatcher = kd_dispatcher_new (2, complete_handler, NULL, NULL);
  EXPECT_CRITICAL ("n_groups > 0", kd_dispatcher_set_fanout (dispatcher, 0));
  EXPECT_CRITICAL ("n_groups > 0",
                   kd_dispatcher_set_fanout (dispatcher, KD_DISPATCHER_MAX_WORKERS + 1));
  g_assert_cmpuint (kd_dispatcher_get_fanout (dispatcher), ==, 1);
  kd_dispatcher_set_fanout (dispatcher, KD_DISPATCHER_MAX_WORKERS);   /* clamped */
  g_assert_cmpuint (kd_dispatcher_get_fanout (dispatcher), ==, 2);

  EXPECT_CRITICAL ("capacity > 0", kd_dispatcher_set_capacity (dispatcher, 0));
  g_assert_cmpuint (kd_dispatcher_get_capacity (dispatcher), ==, 1024);
  kd_dispatcher_set_capacity (dispatcher, G_MAXUINT);                 /* clamped */
  g_assert_cmpuint (kd_dispatcher_get_capacity (dispatcher), ==, G_MAXINT32);

  EXPECT_CRITICAL ("max_attempts >= 1", kd_dispatcher_set_retry (dispatcher, 0, 0, 0));
  EXPECT_CRITICAL ("initial_delay_us >= 0", kd_dispatcher_set_retry (dispatcher, 2, -1, 0));
  EXPECT_CRITICAL ("max_delay_us >= initial_delay_us", kd_dispatcher_set_retry (dispatcher, 2, 10, 5));
  EXPECT_CRITICAL ("idle_us >= 0", kd_dispatcher_set_key_idle_time (dispatcher, -1));

  /* The longest times are taken: they mean "never" without overflowing. */
  kd_dispatcher_set_retry (dispatcher, G_MAXUINT, G_MAXINT64, G_MAXINT64);
  kd_dispatcher_set_key_idle_time (dispatcher, G_MAXINT64);
  g_assert_true (kd_dispatcher_submit_timeout (dispatcher, "k", NULL, G_MAXINT64, NULL));
  g_assert_true (kd_dispatcher_submit_timeout (dispatcher, NULL, NULL, G_MININT64, NULL));
  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, 2);
  g_object_unref (dispatcher);
}

static void
test_no_handler (void)
{
  KdDispatcher *dispatcher;

  g_test_summary ("A dispatcher made with g_object_new() has no handler: submitting "
                  "to it is a critical, not a crash");

  if (!g_test_undefined ())
    return;

  dispatcher = g_object_new (KD_TYPE_DISPATCHER, "n-workers", 2, NULL);
  g_assert_cmpuint (kd_dispatcher_get_n_workers (dispatcher), ==, 2);
  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*handler != NULL*");
  g_assert_false (kd_dispatcher_submit (dispatcher, NULL, NULL, NULL));
  g_test_assert_expected_messages ();
  g_object_unref (dispatcher);
}

int
main (int    argc,
      char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/properties/config", test_config);
  g_test_add_func ("/kd/properties/counters-notify", test_counters_notify);
  g_test_add_func ("/kd/properties/counters-notify-submitted-elsewhere",
                   test_counters_notify_submitted_elsewhere);
  g_test_add_func ("/kd/properties/counters-creation-context", test_counters_creation_context);
  g_test_add_func ("/kd/properties/waiting", test_waiting);
  g_test_add_func ("/kd/properties/no-handler", test_no_handler);
  g_test_add_func ("/kd/properties/out-of-range", test_out_of_range);

  return g_test_run ();
}
