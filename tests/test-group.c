/* test-group.c: jobs counted, awaited and cancelled together
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-test-util.h"

/* Items are numbers. Handlers hold the items listed in @held at @gate, and
 * items from OUTSIDE on at @outside, fail those in @failing, and note the
 * order they ran in; the done callback counts how each item ended, so that
 * a job ending twice shows. */
#define OUTSIDE 1000000

typedef struct
{
  GMutex         lock;
  GHashTable    *held;          /* items that wait at @gate */
  GHashTable    *failing;       /* items whose handler fails */
  GHashTable    *ends;          /* item → done callbacks seen */
  GArray        *ran;           /* items in the order their handlers started */
  KdTestGate     gate;
  KdTestGate     outside;
  KdTestCounter  arrived;       /* held items that reached a gate */
  KdTestCounter  ended;         /* done callbacks */
  gint           completed;
  gint           failed;
  gint           cancelled;
  gint           saw_group_cancelled;  /* held handlers that left with their group cancelled */
  KdGroup       *wait_in_handler;      /* a group a handler tries to wait for */
  GError        *wait_error;           /* what that wait said */
} Fixture;

static gboolean
fixture_handler (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  Fixture *f = user_data;
  gpointer item = kd_job_get_item (job);
  GCancellable *group_cancellable = kd_job_get_group_cancellable (job);
  gboolean hold, fail;
  guint n = GPOINTER_TO_UINT (item);

  kd_mutex_lock (&f->lock);
  hold = g_hash_table_contains (f->held, item);
  fail = g_hash_table_contains (f->failing, item);
  g_array_append_val (f->ran, n);
  kd_mutex_unlock (&f->lock);

  if (f->wait_in_handler != NULL && f->wait_error == NULL)
    g_assert_false (kd_group_wait (f->wait_in_handler, &f->wait_error));

  if (n >= OUTSIDE)
    {
      kd_test_counter_add (&f->arrived, 1);
      g_assert_true (kd_test_gate_wait (&f->outside));
    }
  else if (hold)
    {
      kd_test_counter_add (&f->arrived, 1);
      g_assert_true (kd_test_gate_wait (&f->gate));
      if (group_cancellable != NULL && g_cancellable_is_cancelled (group_cancellable))
        g_atomic_int_inc (&f->saw_group_cancelled);
    }

  if (fail)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_FAILED, "item %u failed", n);
      return FALSE;
    }
  return TRUE;
}

static void
fixture_done (KdJob        *job,
              const GError *error,
              gpointer      user_data)
{
  Fixture *f = user_data;
  gpointer item = kd_job_get_item (job);

  kd_mutex_lock (&f->lock);
  g_hash_table_insert (f->ends, item,
                       GUINT_TO_POINTER (GPOINTER_TO_UINT (g_hash_table_lookup (f->ends, item)) + 1));
  kd_mutex_unlock (&f->lock);

  if (error == NULL)
    g_atomic_int_inc (&f->completed);
  else if (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
    g_atomic_int_inc (&f->cancelled);
  else
    g_atomic_int_inc (&f->failed);
  kd_test_counter_add (&f->ended, 1);
}

static KdDispatcher *
fixture_init (Fixture *f,
              guint    n_workers)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (n_workers, fixture_handler, f, NULL);

  memset (f, 0, sizeof *f);
  g_mutex_init (&f->lock);
  f->held = g_hash_table_new (NULL, NULL);
  f->failing = g_hash_table_new (NULL, NULL);
  f->ends = g_hash_table_new (NULL, NULL);
  f->ran = g_array_new (FALSE, FALSE, sizeof (guint));
  kd_test_gate_init (&f->gate);
  kd_test_gate_init (&f->outside);
  kd_test_counter_init (&f->arrived);
  kd_test_counter_init (&f->ended);
  kd_dispatcher_set_done_func (dispatcher, fixture_done, f, NULL);
  return dispatcher;
}

static void
fixture_clear (Fixture *f)
{
  g_hash_table_unref (f->held);
  g_hash_table_unref (f->failing);
  g_hash_table_unref (f->ends);
  g_array_unref (f->ran);
  kd_test_gate_clear (&f->gate);
  kd_test_gate_clear (&f->outside);
  kd_test_counter_clear (&f->arrived);
  kd_test_counter_clear (&f->ended);
  g_clear_error (&f->wait_error);
  g_mutex_clear (&f->lock);
}

/* Adds @item to one of @f's sets (@f->held or @f->failing). */
static void
mark (Fixture    *f,
      GHashTable *set,
      guint       item)
{
  kd_mutex_lock (&f->lock);
  g_hash_table_add (set, GUINT_TO_POINTER (item));
  kd_mutex_unlock (&f->lock);
}

#define hold(f, item) mark ((f), (f)->held, (item))
#define fail(f, item) mark ((f), (f)->failing, (item))

/* How many times @item's done callback ran. */
static guint
ends_of (Fixture *f,
         guint    item)
{
  guint n;

  kd_mutex_lock (&f->lock);
  n = GPOINTER_TO_UINT (g_hash_table_lookup (f->ends, GUINT_TO_POINTER (item)));
  kd_mutex_unlock (&f->lock);
  return n;
}

static void
group_submit (KdGroup    *group,
              const char *key,
              guint       item)
{
  g_assert_true (kd_group_submit (group, key, GUINT_TO_POINTER (item), NULL));
}

static gint64
deadline (void)
{
  return g_get_monotonic_time () + KD_TEST_DEADLINE_US;
}

static void
assert_stats (KdGroup *group,
              guint64  submitted,
              guint64  completed,
              guint64  failed,
              guint64  cancelled,
              guint64  rejected)
{
  KdStats stats;

  kd_group_get_stats (group, &stats);
  g_assert_cmpuint (stats.submitted, ==, submitted);
  g_assert_cmpuint (stats.completed, ==, completed);
  g_assert_cmpuint (stats.failed, ==, failed);
  g_assert_cmpuint (stats.cancelled, ==, cancelled);
  g_assert_cmpuint (stats.rejected, ==, rejected);
  g_assert_cmpuint (stats.pending, ==, submitted - completed - failed - cancelled);
}

/* A producer outside the group that floods the dispatcher until told to
 * stop. */
typedef struct
{
  KdDispatcher  *dispatcher;
  gint           stop;
  KdTestCounter  submitted;
} Flood;

static gpointer
flood_thread (gpointer user_data)
{
  Flood *flood = user_data;
  guint n = 0;

  while (!g_atomic_int_get (&flood->stop))
    {
      g_assert_true (kd_dispatcher_submit (flood->dispatcher, NULL,
                                           GUINT_TO_POINTER (100000 + n++ % 1000), NULL));
      kd_test_counter_add (&flood->submitted, 1);
    }
  return NULL;
}

static void
test_own_jobs (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  KdGroup *group = kd_group_new (dispatcher);
  Flood flood = { dispatcher, 0, { { 0 } } };
  guint n = kd_test_size (200, 5000);
  GThread *thread;
  guint i;

  g_test_summary ("A group's wait returns once the group's own jobs ended, while a job "
                  "of the dispatcher outside the group stays held and another producer "
                  "floods the dispatcher; the group's counters count its jobs only");

  kd_dispatcher_set_capacity (dispatcher, 64);
  kd_test_counter_init (&flood.submitted);
  g_assert_true (kd_dispatcher_submit (dispatcher, "outside", GUINT_TO_POINTER (OUTSIDE), NULL));
  g_assert_true (kd_test_counter_wait (&f.arrived, 1));
  /* The flood runs before the group's first submit, and on until the end. */
  thread = g_thread_new ("flood", flood_thread, &flood);
  g_assert_true (kd_test_counter_wait (&flood.submitted, 64));

  for (i = 0; i < n; i++)
    group_submit (group, i % 2 == 0 ? NULL : "g", 10 + i);
  g_assert_true (kd_group_wait_until (group, deadline (), NULL));

  /* Every job submitted through the group before the wait has ended. */
  for (i = 0; i < n; i++)
    g_assert_cmpuint (ends_of (&f, 10 + i), ==, 1);
  g_assert_cmpuint (ends_of (&f, OUTSIDE), ==, 0);
  assert_stats (group, n, n, 0, 0, 0);

  g_atomic_int_set (&flood.stop, TRUE);
  g_thread_join (thread);
  kd_test_counter_clear (&flood.submitted);
  kd_test_gate_open (&f.outside);
  kd_dispatcher_wait (dispatcher);
  assert_stats (group, n, n, 0, 0, 0);

  g_object_unref (group);
  g_object_unref (dispatcher);
  fixture_clear (&f);
}

static void
test_deadline (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  KdGroup *group = kd_group_new (dispatcher);
  GError *error = NULL;
  gint64 end_time;

  g_test_summary ("wait_until fails with TIMED_OUT, not before its end time, while a job "
                  "of the group runs, and succeeds once it ended; an empty group's wait "
                  "succeeds at once");

  g_assert_true (kd_group_wait_until (group, 0, NULL));
  g_assert_true (kd_group_wait (group, NULL));

  hold (&f, 1);
  group_submit (group, "k", 1);
  group_submit (group, "k", 2);
  g_assert_true (kd_test_counter_wait (&f.arrived, 1));

  end_time = g_get_monotonic_time () + 2 * G_TIME_SPAN_MILLISECOND;
  g_assert_false (kd_group_wait_until (group, end_time, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT);
  g_clear_error (&error);
  g_assert_cmpint (g_get_monotonic_time (), >=, end_time);
  g_assert_false (kd_group_wait_until (group, 0, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT);
  g_clear_error (&error);
  g_assert_cmpint (kd_test_counter_get (&f.ended), ==, 0);

  kd_test_gate_open (&f.gate);
  g_assert_true (kd_group_wait_until (group, deadline (), &error));
  g_assert_no_error (error);
  g_assert_cmpint (kd_test_counter_get (&f.ended), ==, 2);

  g_object_unref (group);
  g_object_unref (dispatcher);
  fixture_clear (&f);
}

/* An async call's outcome, seen in its callback. */
typedef struct
{
  GThread  *thread;
  GObject  *source;
  gboolean  called;
  gboolean  ok;
  GError   *error;
  gint      ended;      /* done callbacks when the callback ran */
  Fixture  *f;
  guint    *order;      /* where callbacks note their tags, in turn */
  guint    *n_order;
  guint     tag;
} Called;

static void
called_clear (Called *called)
{
  g_clear_error (&called->error);
  g_clear_object (&called->source);
}

static void
note_called (Called       *called,
             GObject      *source)
{
  g_assert_false (called->called);
  called->called = TRUE;
  called->thread = g_thread_self ();
  called->source = g_object_ref (source);
  if (called->f != NULL)
    called->ended = kd_test_counter_get (&called->f->ended);
  if (called->order != NULL)
    called->order[(*called->n_order)++] = called->tag;
}

static void
on_waited (GObject      *source,
           GAsyncResult *result,
           gpointer      user_data)
{
  Called *called = user_data;

  note_called (called, source);
  called->ok = kd_group_wait_finish (KD_GROUP (source), result, &called->error);
}

static void
on_submitted (GObject      *source,
              GAsyncResult *result,
              gpointer      user_data)
{
  Called *called = user_data;

  note_called (called, source);
  called->ok = kd_group_submit_finish (KD_GROUP (source), result, &called->error);
}

static gboolean
was_called (gpointer user_data)
{
  return ((Called *) user_data)->called;
}

static void
test_async (void)
{
  GMainContext *context = g_main_context_new ();
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  KdGroup *group = kd_group_new (dispatcher);
  Called empty = { 0 }, waited = { 0 };

  g_test_summary ("wait_async completes in the caller's context once the group's jobs "
                  "ended, not while one runs nor for a job outside the group; with "
                  "nothing pending it completes on a later iteration, never inside the "
                  "call");

  g_main_context_push_thread_default (context);
  kd_group_wait_async (group, NULL, on_waited, &empty);
  g_assert_false (empty.called);
  g_assert_true (kd_test_iterate_until (context, was_called, &empty));
  g_assert_true (empty.ok);
  g_assert_true (empty.source == G_OBJECT (group));

  hold (&f, 1);
  group_submit (group, "a", 1);
  group_submit (group, "a", 2);
  g_assert_true (kd_dispatcher_submit (dispatcher, "b", GUINT_TO_POINTER (OUTSIDE), NULL));
  g_assert_true (kd_test_counter_wait (&f.arrived, 2));
  waited.f = &f;
  kd_group_wait_async (group, NULL, on_waited, &waited);

  while (g_main_context_iteration (context, FALSE))
    ;
  g_assert_false (waited.called);

  /* Ends the group's item 1, then 2, while the job outside stays held. */
  kd_test_gate_open (&f.gate);
  g_assert_true (kd_test_iterate_until (context, was_called, &waited));
  g_assert_true (waited.ok);
  g_assert_no_error (waited.error);
  g_assert_true (waited.thread == g_thread_self ());
  g_assert_cmpuint (ends_of (&f, 1), ==, 1);
  g_assert_cmpuint (ends_of (&f, 2), ==, 1);
  g_assert_cmpint (waited.ended, ==, 2);

  kd_test_gate_open (&f.outside);
  kd_dispatcher_wait (dispatcher);
  called_clear (&empty);
  called_clear (&waited);
  g_object_unref (group);
  g_object_unref (dispatcher);
  fixture_clear (&f);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
test_async_cancel (void)
{
  GMainContext *context = g_main_context_new ();
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 1);
  KdGroup *group = kd_group_new (dispatcher);
  GCancellable *cancellable = g_cancellable_new ();
  GCancellable *cancelled = g_cancellable_new ();
  Called waited = { 0 }, early = { 0 }, later = { 0 };
  guint i;

  g_test_summary ("Cancelling a group's async wait completes it at once with CANCELLED in "
                  "the caller's context and touches no job; a wait given a cancelled "
                  "cancellable is cancelled at once; many cancelled waits leave a later "
                  "wait working");

  g_main_context_push_thread_default (context);
  hold (&f, 1);
  group_submit (group, NULL, 1);
  g_assert_true (kd_test_counter_wait (&f.arrived, 1));

  kd_group_wait_async (group, cancellable, on_waited, &waited);
  g_cancellable_cancel (cancellable);
  g_assert_true (kd_test_iterate_until (context, was_called, &waited));
  g_assert_false (waited.ok);
  g_assert_error (waited.error, G_IO_ERROR, G_IO_ERROR_CANCELLED);

  g_cancellable_cancel (cancelled);
  kd_group_wait_async (group, cancelled, on_waited, &early);
  g_assert_false (early.called);
  g_assert_true (kd_test_iterate_until (context, was_called, &early));
  g_assert_error (early.error, G_IO_ERROR, G_IO_ERROR_CANCELLED);

  /* Each cancelled wait leaves the group at once (run under valgrind or
   * ASan, a leak or a use after free would show). */
  for (i = 0; i < 100; i++)
    {
      Called one = { 0 };
      GCancellable *c = g_cancellable_new ();

      kd_group_wait_async (group, c, on_waited, &one);
      g_cancellable_cancel (c);
      g_assert_true (kd_test_iterate_until (context, was_called, &one));
      g_assert_error (one.error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
      called_clear (&one);
      g_object_unref (c);
    }

  g_assert_cmpint (kd_test_counter_get (&f.ended), ==, 0);
  kd_group_wait_async (group, NULL, on_waited, &later);
  kd_test_gate_open (&f.gate);
  g_assert_true (kd_test_iterate_until (context, was_called, &later));
  g_assert_true (later.ok);
  g_assert_cmpuint (ends_of (&f, 1), ==, 1);
  g_assert_cmpint (f.completed, ==, 1);

  called_clear (&waited);
  called_clear (&early);
  called_clear (&later);
  g_object_unref (cancellable);
  g_object_unref (cancelled);
  g_object_unref (group);
  g_object_unref (dispatcher);
  fixture_clear (&f);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
test_fail_fast (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 1);
  KdGroup *group = kd_group_new (dispatcher);
  guint n = kd_test_size (50, 1000);
  GError *error = NULL;
  KdStats stats;
  guint i;

  g_test_summary ("In fail-fast mode the group's first failure cancels the group: each "
                  "of its jobs that had not started ends cancelled exactly once, the wait "
                  "reports that failure, later submits through the group are refused with "
                  "the item left to the caller, and jobs outside the group still run");

  kd_group_set_fail_fast (group, TRUE);
  g_assert_true (kd_group_get_fail_fast (group));

  /* One worker: item 1 holds it while the rest queue behind, then fails. */
  hold (&f, 1);
  fail (&f, 1);
  group_submit (group, "a", 1);
  g_assert_true (kd_test_counter_wait (&f.arrived, 1));
  for (i = 0; i < n; i++)
    group_submit (group, i % 3 == 0 ? "a" : i % 3 == 1 ? NULL : "b", 10 + i);
  g_assert_true (kd_dispatcher_submit (dispatcher, "a", GUINT_TO_POINTER (5), NULL));
  kd_test_gate_open (&f.gate);

  g_assert_false (kd_group_wait_until (group, deadline (), &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_FAILED);
  g_assert_cmpstr (error->message, ==, "item 1 failed");
  g_clear_error (&error);
  g_assert_true (g_cancellable_is_cancelled (kd_group_get_cancellable (group)));

  g_assert_cmpuint (ends_of (&f, 1), ==, 1);
  for (i = 0; i < n; i++)
    g_assert_cmpuint (ends_of (&f, 10 + i), ==, 1);
  assert_stats (group, n + 1, 0, 1, n, 0);

  /* Refused, never queued. */
  g_assert_false (kd_group_submit (group, "a", GUINT_TO_POINTER (7), &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_clear_error (&error);
  g_assert_false (kd_group_try_submit (group, NULL, GUINT_TO_POINTER (7), &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_clear_error (&error);
  assert_stats (group, n + 1, 0, 1, n, 2);

  /* The dispatcher's own job ran: only the group was cancelled. */
  kd_dispatcher_wait (dispatcher);
  g_assert_cmpuint (ends_of (&f, 5), ==, 1);
  g_assert_cmpuint (ends_of (&f, 7), ==, 0);
  g_assert_cmpint (f.completed, ==, 1);
  g_assert_cmpint (f.failed, ==, 1);
  g_assert_cmpint ((guint) f.cancelled, ==, n);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.rejected, ==, 2);
  g_assert_false (g_cancellable_is_cancelled (kd_dispatcher_get_cancellable (dispatcher)));

  /* The first error stays. */
  g_assert_false (kd_group_wait (group, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_FAILED);
  g_clear_error (&error);

  g_object_unref (group);
  g_object_unref (dispatcher);
  fixture_clear (&f);
}

static void
test_no_fail_fast (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 1);
  KdGroup *group = kd_group_new (dispatcher);
  GError *error = NULL;

  g_test_summary ("Without fail-fast a failure cancels nothing: every job of the group "
                  "runs, and the wait reports the first failure");

  fail (&f, 2);
  fail (&f, 3);
  group_submit (group, "a", 1);
  group_submit (group, "a", 2);
  group_submit (group, "a", 3);
  group_submit (group, "a", 4);
  g_assert_false (kd_group_wait_until (group, deadline (), &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_FAILED);
  g_assert_cmpstr (error->message, ==, "item 2 failed");
  g_clear_error (&error);
  g_assert_false (g_cancellable_is_cancelled (kd_group_get_cancellable (group)));
  assert_stats (group, 4, 2, 2, 0, 0);

  g_object_unref (group);
  g_object_unref (dispatcher);
  fixture_clear (&f);
}

static void
test_cancel (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 1);
  KdGroup *group = kd_group_new (dispatcher);
  KdGroup *other = kd_group_new (dispatcher);
  GError *error = NULL;

  g_test_summary ("Cancelling a group's cancellable ends its unstarted jobs cancelled, "
                  "once each, lets its running handler see it, and touches neither the "
                  "dispatcher nor another group");

  hold (&f, 1);
  group_submit (group, "a", 1);
  g_assert_true (kd_test_counter_wait (&f.arrived, 1));
  group_submit (group, "a", 2);
  group_submit (group, NULL, 3);
  group_submit (other, "a", 4);
  g_assert_true (kd_dispatcher_submit (dispatcher, "a", GUINT_TO_POINTER (5), NULL));

  g_cancellable_cancel (kd_group_get_cancellable (group));
  kd_test_gate_open (&f.gate);

  g_assert_false (kd_group_wait_until (group, deadline (), &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_clear_error (&error);
  g_assert_true (kd_group_wait_until (other, deadline (), NULL));
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (f.saw_group_cancelled, ==, 1);
  assert_stats (group, 3, 1, 0, 2, 0);
  assert_stats (other, 1, 1, 0, 0, 0);
  g_assert_cmpuint (ends_of (&f, 2), ==, 1);
  g_assert_cmpuint (ends_of (&f, 3), ==, 1);
  g_assert_cmpuint (ends_of (&f, 5), ==, 1);
  g_assert_cmpint (f.completed, ==, 3);
  g_assert_cmpint (f.cancelled, ==, 2);

  g_object_unref (other);
  g_object_unref (group);
  g_object_unref (dispatcher);
  fixture_clear (&f);
}

static void
test_order_across_groups (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  KdGroup *a = kd_group_new (dispatcher);
  KdGroup *b = kd_group_new (dispatcher);
  guint n = kd_test_size (300, 10000);
  guint i;

  g_test_summary ("One key's jobs run in submission order whether they go through one "
                  "group, another or none");

  for (i = 0; i < n; i++)
    {
      if (i % 3 == 0)
        group_submit (a, "k", i + 1);
      else if (i % 3 == 1)
        group_submit (b, "k", i + 1);
      else
        g_assert_true (kd_dispatcher_submit (dispatcher, "k", GUINT_TO_POINTER (i + 1), NULL));
    }
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpuint (f.ran->len, ==, n);
  for (i = 0; i < n; i++)
    g_assert_cmpuint (g_array_index (f.ran, guint, i), ==, i + 1);
  assert_stats (a, (n + 2) / 3, (n + 2) / 3, 0, 0, 0);
  assert_stats (b, (n + 1) / 3, (n + 1) / 3, 0, 0, 0);

  g_object_unref (a);
  g_object_unref (b);
  g_object_unref (dispatcher);
  fixture_clear (&f);
}

static void
test_submit_async (void)
{
  GMainContext *context = g_main_context_new ();
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  KdGroup *group = kd_group_new (dispatcher);
  guint order[8], n_order = 0;
  Called submitted[3] = { { 0 } }, waited = { 0 }, refused = { 0 };
  guint i;

  g_test_summary ("A group's async submissions count in the group, their callbacks come "
                  "in the caller's context with the group as source, before the group's "
                  "async wait made after them; one made once the group is cancelled is "
                  "refused with CANCELLED");

  g_main_context_push_thread_default (context);
  for (i = 0; i < 3; i++)
    {
      submitted[i].order = order;
      submitted[i].n_order = &n_order;
      submitted[i].tag = i;
      kd_group_submit_async (group, "k", GUINT_TO_POINTER (i + 1), NULL, on_submitted,
                             &submitted[i]);
    }
  waited.order = order;
  waited.n_order = &n_order;
  waited.tag = 3;
  kd_group_wait_async (group, NULL, on_waited, &waited);
  g_assert_true (kd_test_iterate_until (context, was_called, &waited));
  g_assert_true (waited.ok);

  /* The dispatcher has no main context: the wait's callback comes after
   * the submissions' made before it, and those of one key in order. */
  g_assert_cmpuint (n_order, ==, 4);
  for (i = 0; i < 4; i++)
    g_assert_cmpuint (order[i], ==, i);
  for (i = 0; i < 3; i++)
    {
      g_assert_true (submitted[i].called);
      g_assert_true (submitted[i].ok);
      g_assert_true (submitted[i].source == G_OBJECT (group));
      g_assert_true (submitted[i].thread == g_thread_self ());
    }
  assert_stats (group, 3, 3, 0, 0, 0);

  g_cancellable_cancel (kd_group_get_cancellable (group));
  kd_group_submit_async (group, "k", GUINT_TO_POINTER (9), NULL, on_submitted, &refused);
  g_assert_true (kd_test_iterate_until (context, was_called, &refused));
  g_assert_false (refused.ok);
  g_assert_error (refused.error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_assert_cmpuint (ends_of (&f, 9), ==, 0);
  assert_stats (group, 3, 3, 0, 0, 1);

  for (i = 0; i < 3; i++)
    called_clear (&submitted[i]);
  called_clear (&waited);
  called_clear (&refused);
  g_object_unref (group);
  g_object_unref (dispatcher);
  fixture_clear (&f);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
test_wait_from_worker (void)
{
  GMainContext *context = g_main_context_new ();
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 1);
  KdGroup *group = kd_group_new (dispatcher);

  g_test_summary ("A blocking wait for a group from its dispatcher's own worker fails "
                  "with WOULD_BLOCK instead of waiting for itself");

  g_main_context_push_thread_default (context);
  f.wait_in_handler = group;
  group_submit (group, NULL, 1);
  g_assert_true (kd_group_wait_until (group, deadline (), NULL));
  g_assert_error (f.wait_error, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK);
  g_assert_cmpint (f.completed, ==, 1);

  g_object_unref (group);
  g_object_unref (dispatcher);
  fixture_clear (&f);
  g_main_context_pop_thread_default (context);
  g_main_context_unref (context);
}

static void
test_refused (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 1);
  KdGroup *group = kd_group_new (dispatcher);
  GError *error = NULL;
  KdStats stats;

  g_test_summary ("A submit through a group refused at the bound, or by its key's bound "
                  "after it took a unit, counts as rejected in the group and the "
                  "dispatcher, leaves no job pending in the group and the item with the "
                  "caller");

  kd_dispatcher_set_capacity (dispatcher, 2);
  kd_dispatcher_set_key_capacity (dispatcher, 1);
  hold (&f, 1);
  group_submit (group, "k", 1);
  g_assert_true (kd_test_counter_wait (&f.arrived, 1));

  /* Key "k" is full: the timed-out submit took a unit, then gave up. */
  g_assert_false (kd_group_submit_timeout (group, "k", GUINT_TO_POINTER (2), 1000, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_TIMEOUT);
  g_clear_error (&error);
  assert_stats (group, 1, 0, 0, 0, 1);

  group_submit (group, "j", 3);
  g_assert_false (kd_group_try_submit (group, NULL, GUINT_TO_POINTER (4), &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);
  assert_stats (group, 2, 0, 0, 0, 2);

  kd_test_gate_open (&f.gate);
  g_assert_true (kd_group_wait_until (group, deadline (), NULL));
  assert_stats (group, 2, 2, 0, 0, 2);
  g_assert_cmpuint (ends_of (&f, 2), ==, 0);
  g_assert_cmpuint (ends_of (&f, 4), ==, 0);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.rejected, ==, 2);

  kd_dispatcher_close (dispatcher);
  g_assert_false (kd_group_submit (group, NULL, GUINT_TO_POINTER (5), &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);
  assert_stats (group, 2, 2, 0, 0, 3);

  g_object_unref (group);
  g_object_unref (dispatcher);
  fixture_clear (&f);
}

/* Object data freed at the end of the object's finalize: notes the thread. */
static void
finalized (gpointer user_data)
{
  *(GThread **) user_data = g_thread_self ();
}

static gpointer
unref_thread (gpointer object)
{
  g_object_unref (object);
  return NULL;
}

static void
test_dropped_early (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  KdGroup *group = kd_group_new (dispatcher);
  GThread *group_gone = NULL, *dispatcher_gone = NULL, *dropper;

  g_test_summary ("The application may drop a group while its jobs are pending: they "
                  "end once each all the same; the group goes at once, and the "
                  "dispatcher's last reference, if the group held it, goes on the thread "
                  "that dropped the group, which waits there for the jobs, never on a "
                  "worker");

  g_object_set_data_full (G_OBJECT (group), "gone", &group_gone, finalized);
  g_object_set_data_full (G_OBJECT (dispatcher), "gone", &dispatcher_gone, finalized);

  hold (&f, 1);
  group_submit (group, "a", 1);
  group_submit (group, "a", 2);
  group_submit (group, NULL, 3);
  g_assert_true (kd_test_counter_wait (&f.arrived, 1));

  /* The group held the dispatcher's last reference: dropping the group on
   * another thread shuts the dispatcher down there, once the jobs ended. */
  g_object_unref (dispatcher);
  dropper = g_thread_new ("dropper", unref_thread, group);
  kd_test_gate_open (&f.gate);
  g_thread_join (dropper);

  g_assert_true (group_gone == dropper);
  g_assert_true (dispatcher_gone == dropper);
  g_assert_cmpuint (ends_of (&f, 1), ==, 1);
  g_assert_cmpuint (ends_of (&f, 2), ==, 1);
  g_assert_cmpuint (ends_of (&f, 3), ==, 1);
  fixture_clear (&f);
}

static void
test_group_gone_first (void)
{
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  KdGroup *group = kd_group_new (dispatcher);
  GThread *group_gone = NULL;

  g_test_summary ("A group dropped while its jobs are pending goes at once; its jobs "
                  "end once each, and their handlers still see the group's "
                  "cancellable");

  g_object_set_data_full (G_OBJECT (group), "gone", &group_gone, finalized);
  hold (&f, 1);
  group_submit (group, "a", 1);
  group_submit (group, "a", 2);
  g_assert_true (kd_test_counter_wait (&f.arrived, 1));
  g_cancellable_cancel (kd_group_get_cancellable (group));
  g_object_unref (group);
  g_assert_true (group_gone == g_thread_self ());

  kd_test_gate_open (&f.gate);
  kd_dispatcher_wait (dispatcher);
  g_assert_cmpint (f.saw_group_cancelled, ==, 1);
  g_assert_cmpuint (ends_of (&f, 1), ==, 1);
  g_assert_cmpuint (ends_of (&f, 2), ==, 1);
  g_assert_cmpint (f.cancelled, ==, 1);

  g_object_unref (dispatcher);
  fixture_clear (&f);
}

/* A done callback in a main context: notes whether the job's group
 * cancellable was there, and cancelled. */
typedef struct
{
  gint seen;
  gint cancelled;
} ContextDone;

static void
context_done (KdJob        *job,
              const GError *error,
              gpointer      user_data)
{
  ContextDone *done = user_data;
  GCancellable *cancellable = kd_job_get_group_cancellable (job);

  g_assert_nonnull (cancellable);
  if (g_cancellable_is_cancelled (cancellable))
    done->cancelled++;
  done->seen++;
}

static gboolean
all_done (gpointer user_data)
{
  return ((ContextDone *) user_data)->seen == 3;
}

static void
test_main_context (void)
{
  GMainContext *context = g_main_context_new ();
  Fixture f;
  KdDispatcher *dispatcher = fixture_init (&f, 2);
  KdGroup *group = kd_group_new (dispatcher);
  ContextDone done = { 0 };

  g_test_summary ("With done callbacks in a main context, a group's wait holds once the "
                  "handlers returned, and the done callbacks, run later, still see the "
                  "group's cancellable though the application dropped the group (run "
                  "under ASan or valgrind: no use after free)");

  kd_dispatcher_set_main_context (dispatcher, context);
  kd_dispatcher_set_done_func (dispatcher, context_done, &done, NULL);
  group_submit (group, "a", 1);
  group_submit (group, "a", 2);
  group_submit (group, NULL, 3);
  g_assert_true (kd_group_wait_until (group, deadline (), NULL));
  g_cancellable_cancel (kd_group_get_cancellable (group));
  g_object_unref (group);
  g_assert_cmpint (done.seen, ==, 0);

  g_assert_true (kd_test_iterate_until (context, all_done, &done));
  g_assert_cmpint (done.cancelled, ==, 3);

  kd_dispatcher_wait (dispatcher);
  g_object_unref (dispatcher);
  fixture_clear (&f);
  g_main_context_unref (context);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/group/own-jobs", test_own_jobs);
  g_test_add_func ("/group/deadline", test_deadline);
  g_test_add_func ("/group/async", test_async);
  g_test_add_func ("/group/async-cancel", test_async_cancel);
  g_test_add_func ("/group/fail-fast", test_fail_fast);
  g_test_add_func ("/group/no-fail-fast", test_no_fail_fast);
  g_test_add_func ("/group/cancel", test_cancel);
  g_test_add_func ("/group/order-across-groups", test_order_across_groups);
  g_test_add_func ("/group/submit-async", test_submit_async);
  g_test_add_func ("/group/wait-from-worker", test_wait_from_worker);
  g_test_add_func ("/group/refused", test_refused);
  g_test_add_func ("/group/dropped-early", test_dropped_early);
  g_test_add_func ("/group/group-gone-first", test_group_gone_first);
  g_test_add_func ("/group/main-context", test_main_context);

  return g_test_run ();
}
