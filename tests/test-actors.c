/* test-actors.c: a key's actor state and a worker's own state
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-test-util.h"

/* Keys are "k<number>", numbers below MAX_KEYS; each has its own count of
 * live states, so that two keys never share one. */
#define MAX_KEYS (1 << 18)

static gint alive[MAX_KEYS];

typedef struct
{
  char    *key;
  guint    index;
  guint    jobs;      /* jobs that used this state */
  gint     busy;      /* a handler is using it */
} KeyState;

typedef struct
{
  gint     created;
  gint     freed;
  gint     two_alive;       /* a key had two states at once */
  gint     shared;          /* two handlers used one state at once */
  gint     wrong_state;     /* a handler got another key's state, or none */
  gint     state_for_unkeyed;
  gint     jobs_seen;       /* summed over freed states */
  KdTestHold *hold;         /* the job with item 1 waits here */
  KdTestCounter *freed_counter;  /* counts frees too, if set */
} Actors;

static Actors *actors_for_free;

static guint
key_index (const char *key)
{
  guint64 number = g_ascii_strtoull (key + 1, NULL, 10);

  g_assert_cmpuint (number, <, MAX_KEYS);
  return (guint) number;
}

static gpointer
key_state_new (const char *key,
               gpointer    user_data)
{
  Actors *actors = user_data;
  KeyState *state = g_new0 (KeyState, 1);

  state->key = g_strdup (key);
  state->index = key_index (key);
  if (g_atomic_int_add (&alive[state->index], 1) != 0)
    g_atomic_int_inc (&actors->two_alive);
  g_atomic_int_inc (&actors->created);

  return state;
}

static void
key_state_free (gpointer data)
{
  KeyState *state = data;
  Actors *actors = actors_for_free;

  g_atomic_int_add (&alive[state->index], -1);
  g_atomic_int_add (&actors->jobs_seen, (gint) state->jobs);
  g_atomic_int_inc (&actors->freed);
  if (actors->freed_counter != NULL)
    kd_test_counter_add (actors->freed_counter, 1);
  g_free (state->key);
  g_free (state);
}

static gboolean
actor_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  Actors *actors = user_data;
  KeyState *state = kd_job_get_key_state (job);
  const char *key = kd_job_get_key (job);

  if (key == NULL)
    {
      if (state != NULL)
        g_atomic_int_inc (&actors->state_for_unkeyed);
      return TRUE;
    }

  if (state == NULL || g_strcmp0 (state->key, key) != 0)
    {
      g_atomic_int_inc (&actors->wrong_state);
      return TRUE;
    }

  if (!g_atomic_int_compare_and_exchange (&state->busy, 0, 1))
    g_atomic_int_inc (&actors->shared);

  if (GPOINTER_TO_UINT (kd_job_get_item (job)) == 1 && actors->hold != NULL)
    g_assert_true (kd_test_hold_enter (actors->hold));

  state->jobs++;    /* no lock: one job of the key at a time */
  g_atomic_int_set (&state->busy, 0);

  return TRUE;
}

static KdDispatcher *
actors_dispatcher_new (Actors *actors,
                       guint   n_workers,
                       guint   capacity)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (n_workers, actor_handler, actors, NULL);

  memset (actors, 0, sizeof *actors);
  memset (alive, 0, sizeof alive);
  actors_for_free = actors;
  kd_dispatcher_set_capacity (dispatcher, capacity);
  kd_dispatcher_set_key_state_funcs (dispatcher, key_state_new, key_state_free, actors, NULL);

  return dispatcher;
}

static void
submit_key (KdDispatcher *dispatcher,
            guint         key,
            guint         item)
{
  char name[16];

  g_snprintf (name, sizeof name, "k%u", key);
  g_assert_true (kd_dispatcher_submit (dispatcher, name, GUINT_TO_POINTER (item), NULL));
}

static void
test_key_state_lifecycle (void)
{
  Actors actors;
  KdDispatcher *dispatcher = actors_dispatcher_new (&actors, 4, 256);
  guint n_keys = kd_test_size (2000, 4000);
  guint n_rounds = kd_test_size (20, 200);
  guint round, k;
  KdStats stats;

  g_test_summary ("A key's state is made when its first job runs, used by one job "
                  "at a time, never two at once for a key, and freed exactly once, "
                  "before wait() returns");

  for (round = 0; round < n_rounds; round++)
    for (k = 0; k < n_keys; k++)
      submit_key (dispatcher, k, 2 + round);
  for (k = 0; k < 1000; k++)
    g_assert_true (kd_dispatcher_submit (dispatcher, NULL, GUINT_TO_POINTER (2), NULL));
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (actors.created, >=, (gint) n_keys);
  g_assert_cmpint (actors.freed, ==, actors.created);
  g_assert_cmpint (actors.jobs_seen, ==, (gint) (n_keys * n_rounds));
  g_assert_cmpint (actors.two_alive, ==, 0);
  g_assert_cmpint (actors.shared, ==, 0);
  g_assert_cmpint (actors.wrong_state, ==, 0);
  g_assert_cmpint (actors.state_for_unkeyed, ==, 0);
  for (k = 0; k < MAX_KEYS; k++)
    g_assert_cmpint (alive[k], ==, 0);

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.live_keys, ==, 0);
  g_object_unref (dispatcher);
}

static void
test_key_state_one_per_run (void)
{
  Actors actors;
  KdDispatcher *dispatcher = actors_dispatcher_new (&actors, 2, 64);
  KdTestHold hold;
  guint i;

  g_test_summary ("The jobs a key has queued while it runs share one state; once "
                  "the key ran empty its state is freed, and its next job gets a "
                  "new one");

  kd_test_hold_init (&hold);
  actors.hold = &hold;

  /* Ten jobs of k7 queue behind the first, which holds. */
  submit_key (dispatcher, 7, 1);
  g_assert_true (kd_test_hold_wait_arrived (&hold, 1));
  for (i = 0; i < 9; i++)
    submit_key (dispatcher, 7, 10 + i);
  g_assert_cmpint (g_atomic_int_get (&actors.created), ==, 1);
  kd_test_hold_release (&hold);
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (actors.created, ==, 1);
  g_assert_cmpint (actors.freed, ==, 1);
  g_assert_cmpint (actors.jobs_seen, ==, 10);

  /* The key comes back: a new state. */
  for (i = 0; i < 5; i++)
    submit_key (dispatcher, 7, 20 + i);
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (actors.created, >=, 2);
  g_assert_cmpint (actors.freed, ==, actors.created);
  g_assert_cmpint (actors.jobs_seen, ==, 15);
  g_assert_cmpint (actors.two_alive, ==, 0);
  g_assert_cmpint (actors.wrong_state, ==, 0);

  g_object_unref (dispatcher);
  kd_test_hold_clear (&hold);
}

static void
test_key_state_cancelled (void)
{
  Actors actors;
  KdDispatcher *dispatcher = actors_dispatcher_new (&actors, 1, 64);  /* held: nothing else runs */
  KdTestHold hold;
  KdStats stats;
  guint i;

  g_test_summary ("Jobs that never run make no state; the state of the job that "
                  "ran is freed when its key ends cancelled");

  kd_test_hold_init (&hold);
  actors.hold = &hold;

  submit_key (dispatcher, 3, 1);
  g_assert_true (kd_test_hold_wait_arrived (&hold, 1));
  for (i = 0; i < 4; i++)
    submit_key (dispatcher, 3, 10 + i);
  for (i = 0; i < 4; i++)
    submit_key (dispatcher, 100 + i, 10 + i);
  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  kd_test_hold_release (&hold);
  kd_dispatcher_wait (dispatcher);

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, 1);
  g_assert_cmpuint (stats.cancelled, ==, 8);
  g_assert_cmpint (actors.created, ==, 1);
  g_assert_cmpint (actors.freed, ==, 1);
  g_assert_cmpint (actors.jobs_seen, ==, 1);

  g_object_unref (dispatcher);
  kd_test_hold_clear (&hold);
}

static void
test_key_state_none (void)
{
  Actors actors;
  KdDispatcher *dispatcher = actors_dispatcher_new (&actors, 2, 64);

  g_test_summary ("Without key-state functions, handlers see no state");

  kd_dispatcher_set_key_state_funcs (dispatcher, NULL, NULL, NULL, NULL);
  submit_key (dispatcher, 1, 2);
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (actors.wrong_state, ==, 1);
  g_assert_cmpint (actors.created, ==, 0);
  g_object_unref (dispatcher);
}

static void
test_key_idle_keeps_state (void)
{
  Actors actors;
  KdDispatcher *dispatcher = actors_dispatcher_new (&actors, 2, 64);
  KdStats stats;
  guint i;

  g_test_summary ("With an idle time, a key whose jobs come one at a time keeps "
                  "one state across them; it is not a live key meanwhile, and its "
                  "state is freed once when the dispatcher stops");

  /* Forever (and no overflow in the due time). */
  kd_dispatcher_set_key_idle_time (dispatcher, G_MAXINT64);
  for (i = 0; i < 10; i++)
    {
      submit_key (dispatcher, 7, 2 + i);
      submit_key (dispatcher, 8, 2 + i);
      kd_dispatcher_wait (dispatcher);
      kd_dispatcher_get_stats (dispatcher, &stats);
      g_assert_cmpuint (stats.live_keys, ==, 0);
    }
  g_assert_cmpint (g_atomic_int_get (&actors.created), ==, 2);
  g_assert_cmpint (g_atomic_int_get (&actors.freed), ==, 0);

  kd_dispatcher_close (dispatcher);
  kd_dispatcher_wait (dispatcher);
  g_assert_cmpint (actors.freed, ==, 2);
  g_assert_cmpint (actors.jobs_seen, ==, 20);
  g_assert_cmpint (actors.two_alive, ==, 0);
  g_assert_cmpint (actors.wrong_state, ==, 0);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  g_object_unref (dispatcher);
  g_assert_cmpint (actors.freed, ==, 2);
}

static void
test_key_idle_expires (void)
{
  Actors actors;
  KdDispatcher *dispatcher = actors_dispatcher_new (&actors, 2, 64);
  KdTestCounter freed;

  g_test_summary ("A key idle for longer than the idle time loses its state; its "
                  "next job gets a new one");

  kd_test_counter_init (&freed);
  actors.freed_counter = &freed;
  kd_dispatcher_set_key_idle_time (dispatcher, 5 * G_TIME_SPAN_MILLISECOND);

  submit_key (dispatcher, 3, 2);
  kd_dispatcher_wait (dispatcher);
  g_assert_true (kd_test_counter_wait (&freed, 1));
  g_assert_cmpint (actors.created, ==, 1);

  submit_key (dispatcher, 3, 3);
  kd_dispatcher_wait (dispatcher);
  g_assert_true (kd_test_counter_wait (&freed, 2));
  g_assert_cmpint (actors.created, ==, 2);
  g_assert_cmpint (actors.jobs_seen, ==, 2);
  g_assert_cmpint (actors.two_alive, ==, 0);

  g_object_unref (dispatcher);
  g_assert_cmpint (actors.freed, ==, 2);
  kd_test_counter_clear (&freed);
}

static void
test_key_idle_revived (void)
{
  Actors actors;
  KdDispatcher *dispatcher = actors_dispatcher_new (&actors, 2, 64);
  KdTestHold hold;

  g_test_summary ("The end of an idle period that the key's return interrupted "
                  "leaves the state to the running job; the state is freed once");

  kd_test_hold_init (&hold);
  actors.hold = &hold;
  kd_dispatcher_set_key_idle_time (dispatcher, 3600 * G_TIME_SPAN_SECOND);

  submit_key (dispatcher, 4, 2);
  kd_dispatcher_wait (dispatcher);

  /* Back, and held while its old idle period is ended early by the cancel. */
  submit_key (dispatcher, 4, 1);
  g_assert_true (kd_test_hold_wait_arrived (&hold, 1));
  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  g_assert_cmpint (g_atomic_int_get (&actors.freed), ==, 0);
  kd_test_hold_release (&hold);
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (actors.created, ==, 1);
  g_assert_cmpint (actors.freed, ==, 1);
  g_assert_cmpint (actors.jobs_seen, ==, 2);
  g_assert_cmpint (actors.wrong_state, ==, 0);
  g_object_unref (dispatcher);
  kd_test_hold_clear (&hold);
}

static void
test_key_idle_bounded (void)
{
  Actors actors;
  KdDispatcher *dispatcher = actors_dispatcher_new (&actors, 4, 256);
  guint n_keys = kd_test_size (20000, 200000);
  guint max_idle = 100, idle_keys = G_MAXUINT;
  guint i;

  g_test_summary ("Keys that churn faster than their idle time expires (an hour: never) keep at "
                  "most max-idle-keys states: past the bound the least recently idle ones are "
                  "freed early, once each; the others stay and are freed at the last unref");

  kd_dispatcher_set_key_idle_time (dispatcher, 3600 * G_TIME_SPAN_SECOND);
  kd_dispatcher_set_max_idle_keys (dispatcher, max_idle);
  g_assert_cmpuint (kd_dispatcher_get_max_idle_keys (dispatcher), ==, max_idle);

  for (i = 0; i < n_keys; i++)
    {
      submit_key (dispatcher, i, 2);
      /* Never more states than the idle ones, plus one per worker and one
       * per pending job (each may be between its reaping and the eviction
       * it causes). */
      if (i % 997 == 0)
        g_assert_cmpint (g_atomic_int_get (&actors.created) - g_atomic_int_get (&actors.freed), <=,
                         (gint) (max_idle + 4 + 256));
    }
  kd_dispatcher_wait (dispatcher);

  g_object_get (dispatcher, "idle-keys", &idle_keys, NULL);
  g_assert_cmpuint (idle_keys, ==, max_idle);
  g_assert_cmpint (actors.created, ==, (gint) n_keys);
  g_assert_cmpint (actors.created - actors.freed, ==, (gint) max_idle);
  g_assert_cmpint (actors.two_alive, ==, 0);
  g_assert_cmpint (actors.wrong_state, ==, 0);

  g_object_unref (dispatcher);
  g_assert_cmpint (actors.freed, ==, (gint) n_keys);
  g_assert_cmpint (actors.jobs_seen, ==, (gint) n_keys);
}

static void
test_key_idle_bounded_revived (void)
{
  Actors actors;
  KdDispatcher *dispatcher = actors_dispatcher_new (&actors, 4, 64);
  guint rounds = kd_test_size (50, 500);
  guint r, k;

  g_test_summary ("With more keys than max-idle-keys coming back in turn, a key's state is kept "
                  "or freed early but never doubled, and every job sees its own key's state");

  kd_dispatcher_set_key_idle_time (dispatcher, 3600 * G_TIME_SPAN_SECOND);
  kd_dispatcher_set_max_idle_keys (dispatcher, 40);
  for (r = 0; r < rounds; r++)
    for (k = 0; k < 64; k++)
      submit_key (dispatcher, k, 2);
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (actors.two_alive, ==, 0);
  g_assert_cmpint (actors.shared, ==, 0);
  g_assert_cmpint (actors.wrong_state, ==, 0);
  g_assert_cmpint (actors.created - actors.freed, <=, 40);
  g_object_unref (dispatcher);
  g_assert_cmpint (actors.created, ==, actors.freed);
  g_assert_cmpint (actors.jobs_seen, ==, (gint) (rounds * 64));
}

/* The last reference dropped by a state's free on the timer thread. */
typedef struct
{
  KdDispatcher  *dispatcher;
  KdTestCounter  finalized;
} LastRef;

static gpointer
ref_state_new (const char *key,
               gpointer    user_data)
{
  LastRef *last = user_data;

  return g_object_ref (last->dispatcher);
}

static void
ref_state_free (gpointer state)
{
  g_object_unref (state);
}

/* The handler data's destroy notify: the dispatcher's finalize runs it
 * last, after every thread of its but the one finalizing was joined. */
static void
dispatcher_finalized (gpointer user_data)
{
  LastRef *last = user_data;

  kd_test_counter_add (&last->finalized, 1);
}

static void
test_key_idle_last_unref (void)
{
  LastRef last;

  g_test_summary ("An idle key's state that holds the last reference to its "
                  "dispatcher frees it on the timer thread: the dispatcher shuts "
                  "down on a thread of its own instead of joining the timer from "
                  "itself");

  kd_test_counter_init (&last.finalized);
  last.dispatcher = kd_dispatcher_new (2, kd_test_noop_handler, &last, dispatcher_finalized);
  kd_dispatcher_set_key_state_funcs (last.dispatcher, ref_state_new, ref_state_free, &last, NULL);
  kd_dispatcher_set_key_idle_time (last.dispatcher, G_TIME_SPAN_MILLISECOND);

  g_assert_true (kd_dispatcher_submit (last.dispatcher, "k", NULL, NULL));
  kd_dispatcher_wait (last.dispatcher);
  g_object_unref (last.dispatcher);   /* the state holds the last reference */

  g_assert_true (kd_test_counter_wait (&last.finalized, 1));
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  kd_test_counter_clear (&last.finalized);
}

/* A key state whose free waits for its dispatcher, which is refused. */
typedef struct
{
  KdDispatcher  *dispatcher;
  const char    *waiting_key;   /* the key whose state's free waits */
  KdTestCounter  freed;
} WaitingFree;

static gpointer
waiting_state_new (const char *key,
                   gpointer    user_data)
{
  return g_strdup (key);
}

static WaitingFree *waiting_free;

static void
waiting_state_free (gpointer state)
{
  /* It would wait for a job whose retry the timer (this thread) holds,
   * or for its own shutdown. */
  if (g_str_equal (state, waiting_free->waiting_key))
    kd_dispatcher_wait (waiting_free->dispatcher);
  g_free (state);
  kd_test_counter_add (&waiting_free->freed, 1);
}

static gboolean
fail_first_of_r (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  if (g_str_equal (kd_job_get_key (job), "r") && kd_job_get_attempt (job) == 1)
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_FAILED, "the first attempt of r fails");
      return FALSE;
    }
  return TRUE;
}

static void
test_wait_from_timer (void)
{
  WaitingFree w = { .waiting_key = "s" };
  KdStats stats;

  g_test_summary ("kd_dispatcher_wait() from a key state's free on the timer thread, while a "
                  "retry waits in that timer, logs a critical and returns instead of waiting "
                  "for ever");
  if (!g_test_undefined ())
    return;

  kd_test_counter_init (&w.freed);
  waiting_free = &w;
  w.dispatcher = kd_dispatcher_new (2, fail_first_of_r, NULL, NULL);
  kd_dispatcher_set_key_state_funcs (w.dispatcher, waiting_state_new, waiting_state_free, NULL, NULL);
  kd_dispatcher_set_key_idle_time (w.dispatcher, G_TIME_SPAN_MILLISECOND);
  kd_dispatcher_set_retry (w.dispatcher, 2, 200 * G_TIME_SPAN_MILLISECOND, 200 * G_TIME_SPAN_MILLISECOND);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*own threads*");
  g_assert_true (kd_dispatcher_submit (w.dispatcher, "r", NULL, NULL));   /* waits for its retry */
  g_assert_true (kd_dispatcher_submit (w.dispatcher, "s", NULL, NULL));   /* idle, then freed */
  g_assert_true (kd_test_counter_wait (&w.freed, 1));
  kd_dispatcher_wait (w.dispatcher);
  g_test_assert_expected_messages ();

  kd_dispatcher_get_stats (w.dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, 2);
  g_assert_cmpuint (stats.retried, ==, 1);
  g_object_unref (w.dispatcher);
  g_assert_cmpuint (kd_test_counter_get (&w.freed), ==, 2);
  kd_test_counter_clear (&w.freed);
}

static gboolean
fail_p (KdJob    *job,
        gpointer  user_data,
        GError  **error)
{
  g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_FAILED, "p fails");
  return FALSE;
}

static void
test_wait_from_shutdown (void)
{
  WaitingFree w = { .waiting_key = "p" };

  g_test_summary ("kd_dispatcher_wait() from the free of a parked key's state, which the last "
                  "unref's shutdown drops, logs a critical and returns");
  if (!g_test_undefined ())
    return;

  kd_test_counter_init (&w.freed);
  waiting_free = &w;
  w.dispatcher = kd_dispatcher_new (2, fail_p, NULL, NULL);
  kd_dispatcher_set_key_state_funcs (w.dispatcher, waiting_state_new, waiting_state_free, NULL, NULL);
  kd_dispatcher_set_failure_policy (w.dispatcher, KD_FAILURE_PARK);

  g_assert_true (kd_dispatcher_submit (w.dispatcher, "p", NULL, NULL));
  kd_dispatcher_wait (w.dispatcher);
  g_assert_cmpuint (kd_test_counter_get (&w.freed), ==, 0);   /* parked, with its state */

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*own threads*");
  g_object_unref (w.dispatcher);
  g_test_assert_expected_messages ();
  g_assert_cmpuint (kd_test_counter_get (&w.freed), ==, 1);
  kd_test_counter_clear (&w.freed);
}

/* ---- The idle keys' sweep meeting the shutdown ------------------------ */

typedef struct
{
  KdTestGate    release;      /* lets the free of "a" go on */
  KdTestCounter entered;      /* the free of "a" began */
  KdTestCounter finalized;    /* workers that ran their finalize */
  gint          freed;
} SlowFree;

static SlowFree *slow_free;

static gpointer
slow_state_new (const char *key,
                gpointer    user_data)
{
  return g_strdup (key);
}

static void
slow_state_free (gpointer state)
{
  if (g_str_equal (state, "a"))
    {
      kd_test_counter_add (&slow_free->entered, 1);
      g_assert_true (kd_test_gate_wait (&slow_free->release));
    }
  g_atomic_int_inc (&slow_free->freed);
  g_free (state);
}

static gpointer
count_init (KdDispatcher  *dispatcher,
            guint          worker_index,
            gpointer       user_data,
            GError       **error)
{
  return NULL;
}

static void
count_finalize (KdDispatcher *dispatcher,
                guint         worker_index,
                gpointer      worker_data,
                gpointer      user_data)
{
  kd_test_counter_add (&slow_free->finalized, 1);
}

static gpointer
unref_in_thread (gpointer data)
{
  g_object_unref (data);
  return NULL;
}

static void
test_key_idle_sweep_meets_shutdown (void)
{
  SlowFree s = { 0 };
  KdDispatcher *dispatcher;
  GThread *unref;

  g_test_summary ("The idle keys' sweep, still freeing a state when the last unref stops the "
                  "timer, finds the timer stopped as it comes back for a key not yet due: it "
                  "frees that state too and the shutdown completes");

  slow_free = &s;
  kd_test_gate_init (&s.release);
  kd_test_counter_init (&s.entered);
  kd_test_counter_init (&s.finalized);
  dispatcher = kd_dispatcher_new (2, kd_test_noop_handler, NULL, NULL);
  kd_dispatcher_set_key_state_funcs (dispatcher, slow_state_new, slow_state_free, NULL, NULL);
  kd_dispatcher_set_key_idle_time (dispatcher, 20 * G_TIME_SPAN_MILLISECOND);
  kd_dispatcher_set_worker_funcs (dispatcher, count_init, count_finalize, NULL, NULL);

  /* "a" expires, and its free holds the sweep; "b" goes idle meanwhile,
   * not due before the sweep is done with "a". */
  g_assert_true (kd_dispatcher_submit (dispatcher, "a", NULL, NULL));
  g_assert_true (kd_test_counter_wait (&s.entered, 1));
  g_assert_true (kd_dispatcher_submit (dispatcher, "b", NULL, NULL));
  kd_dispatcher_wait (dispatcher);

  /* The last unref stops the workers and the timer, and waits for the
   * timer's thread: once only that thread is left, let the sweep go on. */
  unref = g_thread_new ("unref", unref_in_thread, dispatcher);
  g_assert_true (kd_test_counter_wait (&s.finalized, 2));
  g_assert_cmpuint (kd_test_threads_settle (1), ==, 1);
  kd_test_gate_open (&s.release);
  g_thread_join (unref);

  g_assert_cmpint (s.freed, ==, 2);
  kd_test_gate_clear (&s.release);
  kd_test_counter_clear (&s.entered);
  kd_test_counter_clear (&s.finalized);
}

/* A worker init that uses its own dispatcher is refused, not deadlocked. */
static gint init_submit_refused;

static gpointer
submitting_init (KdDispatcher  *dispatcher,
                 guint          worker_index,
                 gpointer       user_data,
                 GError       **error)
{
  GError *local_error = NULL;

  if (!kd_dispatcher_try_submit (dispatcher, "k", NULL, &local_error) &&
      g_error_matches (local_error, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK))
    g_atomic_int_inc (&init_submit_refused);
  g_clear_error (&local_error);
  if (!kd_dispatcher_start (dispatcher, &local_error) &&
      g_error_matches (local_error, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK))
    g_atomic_int_inc (&init_submit_refused);
  g_clear_error (&local_error);

  return NULL;
}

static void
test_worker_init_uses_dispatcher (void)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (2, kd_test_noop_handler, NULL, NULL);
  GError *error = NULL;

  g_test_summary ("A worker init that submits to, or starts, its own dispatcher is "
                  "refused with WOULD_BLOCK instead of waiting for a start that "
                  "waits for it");

  init_submit_refused = 0;
  kd_dispatcher_set_worker_funcs (dispatcher, submitting_init, NULL, NULL, NULL);
  g_assert_true (kd_dispatcher_start (dispatcher, &error));
  g_assert_no_error (error);
  g_assert_cmpint (init_submit_refused, ==, 4);
  g_assert_true (kd_dispatcher_submit (dispatcher, "k", NULL, NULL));
  g_object_unref (dispatcher);
}

/* Per-worker state */

#define N_WORKERS 4

typedef struct
{
  guint    index;
  GThread *thread;
  guint    jobs;
} WorkerData;

typedef struct
{
  gint     inits;
  gint     finalizes;
  gint     wrong_thread;      /* init, finalize or a handler off the worker's thread */
  gint     wrong_data;        /* a handler saw no data or another worker's */
  gint     jobs;              /* summed over finalized workers */
  gint     fail_index;        /* init fails on this worker; -1: never */
  gint     data_freed;
  gint     seen[N_WORKERS];   /* inits per index */
} Workers;

static gpointer
worker_init (KdDispatcher  *dispatcher,
             guint          worker_index,
             gpointer       user_data,
             GError       **error)
{
  Workers *workers = user_data;
  WorkerData *data;

  g_assert_true (KD_IS_DISPATCHER (dispatcher));
  g_assert_cmpuint (worker_index, <, N_WORKERS);
  g_atomic_int_inc (&workers->inits);
  g_atomic_int_inc (&workers->seen[worker_index]);

  if ((gint) worker_index == g_atomic_int_get (&workers->fail_index))
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_CONNECTION_REFUSED,
                   "worker %u cannot connect", worker_index);
      return NULL;
    }

  data = g_new0 (WorkerData, 1);
  data->index = worker_index;
  data->thread = g_thread_self ();
  return data;
}

static void
worker_finalize (KdDispatcher *dispatcher,
                 guint         worker_index,
                 gpointer      worker_data,
                 gpointer      user_data)
{
  Workers *workers = user_data;
  WorkerData *data = worker_data;

  g_assert_true (KD_IS_DISPATCHER (dispatcher));
  if (data->thread != g_thread_self () || data->index != worker_index)
    g_atomic_int_inc (&workers->wrong_thread);
  g_atomic_int_add (&workers->jobs, (gint) data->jobs);
  g_atomic_int_inc (&workers->finalizes);
  g_free (data);
}

static void
workers_data_free (gpointer user_data)
{
  Workers *workers = user_data;

  g_atomic_int_inc (&workers->data_freed);
}

static gboolean
worker_handler (KdJob    *job,
                gpointer  user_data,
                GError  **error)
{
  Workers *workers = user_data;
  WorkerData *data = kd_job_get_worker_data (job);

  if (data == NULL)
    {
      g_atomic_int_inc (&workers->wrong_data);
      return TRUE;
    }
  if (data->thread != g_thread_self ())
    g_atomic_int_inc (&workers->wrong_thread);
  data->jobs++;    /* no lock: only this worker sees its data */

  return TRUE;
}

static KdDispatcher *
workers_dispatcher_new (Workers *workers)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (N_WORKERS, worker_handler, workers, NULL);

  memset (workers, 0, sizeof *workers);
  workers->fail_index = -1;
  kd_dispatcher_set_fanout (dispatcher, 2);
  kd_dispatcher_set_worker_funcs (dispatcher, worker_init, worker_finalize, workers,
                                  workers_data_free);
  return dispatcher;
}

static void
test_worker_data (void)
{
  Workers workers;
  KdDispatcher *dispatcher = workers_dispatcher_new (&workers);
  guint n_jobs = kd_test_size (20000, 200000);
  GError *error = NULL;
  KdStats stats;
  guint i;

  g_test_summary ("Each worker runs its init on its own thread before any job and "
                  "its finalize there as it exits; handlers see their worker's data");

  g_assert_true (kd_dispatcher_start (dispatcher, &error));
  g_assert_no_error (error);
  /* start returned once every worker had run its init. */
  g_assert_cmpint (g_atomic_int_get (&workers.inits), ==, N_WORKERS);
  for (i = 0; i < N_WORKERS; i++)
    g_assert_cmpint (workers.seen[i], ==, 1);
  g_assert_cmpuint (kd_test_threads_settle (N_WORKERS), ==, N_WORKERS);
  /* Starting again does nothing. */
  g_assert_true (kd_dispatcher_start (dispatcher, &error));
  g_assert_cmpint (g_atomic_int_get (&workers.inits), ==, N_WORKERS);

  for (i = 0; i < n_jobs; i++)
    {
      char key[16];

      g_snprintf (key, sizeof key, "k%u", i % 97);
      g_assert_true (kd_dispatcher_submit (dispatcher, i % 3 == 0 ? NULL : key, NULL, NULL));
    }
  kd_dispatcher_close (dispatcher);
  kd_dispatcher_wait (dispatcher);

  /* The workers exited, each after its finalize. */
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  g_assert_cmpint (workers.finalizes, ==, N_WORKERS);
  g_assert_cmpint (workers.jobs, ==, (gint) n_jobs);
  g_assert_cmpint (workers.wrong_thread, ==, 0);
  g_assert_cmpint (workers.wrong_data, ==, 0);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, n_jobs);

  g_assert_cmpint (workers.data_freed, ==, 0);
  g_object_unref (dispatcher);
  g_assert_cmpint (workers.data_freed, ==, 1);
  g_assert_cmpint (workers.finalizes, ==, N_WORKERS);
}

typedef struct
{
  GMainLoop *loop;
  GError    *error;
  gboolean   called;
} AsyncOutcome;

static void
async_done_cb (GObject      *source,
               GAsyncResult *result,
               gpointer      user_data)
{
  AsyncOutcome *outcome = user_data;

  outcome->called = TRUE;
  g_assert_false (kd_dispatcher_submit_finish (KD_DISPATCHER (source), result, &outcome->error));
  g_main_loop_quit (outcome->loop);
}

static void
counter_item_free (gpointer item)
{
  kd_test_counter_add (item, 1);
}

static void
test_worker_init_fails (void)
{
  Workers workers;
  KdDispatcher *dispatcher = workers_dispatcher_new (&workers);
  KdTestCounter freed;
  AsyncOutcome outcome = { NULL, NULL, FALSE };
  GError *error = NULL;
  KdStats stats;

  g_test_summary ("A worker init failing makes the start fail with its error: every "
                  "worker exits (the started ones after their finalize), no job "
                  "runs, a submit is refused with the error and keeps its item; a "
                  "later start may succeed");

  kd_test_counter_init (&freed);
  kd_dispatcher_set_item_free (dispatcher, counter_item_free);
  g_atomic_int_set (&workers.fail_index, 2);

  g_assert_false (kd_dispatcher_start (dispatcher, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CONNECTION_REFUSED);
  g_assert_nonnull (strstr (error->message, "worker 2"));
  g_clear_error (&error);
  g_assert_cmpint (workers.inits, ==, N_WORKERS);
  g_assert_cmpint (workers.finalizes, ==, N_WORKERS - 1);
  g_assert_cmpint (workers.wrong_thread, ==, 0);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);

  /* A submit starts the workers, fails the same way, and keeps the item. */
  g_assert_false (kd_dispatcher_submit (dispatcher, "k", &freed, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CONNECTION_REFUSED);
  g_clear_error (&error);
  g_assert_false (kd_dispatcher_try_submit (dispatcher, NULL, &freed, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CONNECTION_REFUSED);
  g_clear_error (&error);

  outcome.loop = g_main_loop_new (NULL, FALSE);
  kd_dispatcher_submit_async (dispatcher, "k", &freed, NULL, async_done_cb, &outcome);
  g_assert_false (outcome.called);
  g_main_loop_run (outcome.loop);
  g_assert_error (outcome.error, G_IO_ERROR, G_IO_ERROR_CONNECTION_REFUSED);
  g_clear_error (&outcome.error);

  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  g_assert_cmpint (kd_test_counter_get (&freed), ==, 0);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, 0);
  g_assert_cmpuint (stats.rejected, ==, 3);

  /* The cause went away: the next start succeeds. */
  g_atomic_int_set (&workers.fail_index, -1);
  g_assert_true (kd_dispatcher_start (dispatcher, &error));
  g_assert_no_error (error);
  g_assert_true (kd_dispatcher_submit (dispatcher, "k", &freed, &error));
  g_assert_no_error (error);
  kd_dispatcher_wait (dispatcher);
  g_assert_cmpint (kd_test_counter_get (&freed), ==, 1);
  g_assert_cmpint (workers.jobs, ==, 0);   /* counted at finalize */

  g_object_unref (dispatcher);
  g_assert_cmpint (workers.inits, ==, 5 * N_WORKERS);   /* 4 failed starts */
  g_assert_cmpint (workers.finalizes, ==, 5 * N_WORKERS - 4);
  g_assert_cmpint (workers.jobs, ==, 1);
  g_assert_cmpint (workers.data_freed, ==, 1);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  g_main_loop_unref (outcome.loop);
  kd_test_counter_clear (&freed);
}

static void
test_start_closed (void)
{
  Workers workers;
  KdDispatcher *dispatcher = workers_dispatcher_new (&workers);
  GError *error = NULL;

  g_test_summary ("A dispatcher closed before it started never starts its workers");

  kd_dispatcher_close (dispatcher);
  g_assert_false (kd_dispatcher_start (dispatcher, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);
  g_assert_false (kd_dispatcher_submit (dispatcher, NULL, NULL, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);
  g_assert_cmpint (workers.inits, ==, 0);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  g_object_unref (dispatcher);
  g_assert_cmpint (workers.finalizes, ==, 0);
}

/* ---- No thread to be had --------------------------------------------- */

/* Each case runs in a subprocess of its own, where it can lower the
 * process's thread limit (kd_test_limit_threads()). */
static gboolean
in_subprocess (void)
{
  if (g_test_subprocess ())
    return TRUE;
  g_test_trap_subprocess (NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
  g_test_trap_assert_passed ();
  return FALSE;
}

static gint items_freed;

static void
count_item_free (gpointer item)
{
  g_atomic_int_inc (&items_freed);
}

static void
refused_cb (GObject      *source,
            GAsyncResult *result,
            gpointer      user_data)
{
  GError **error = user_data;

  g_assert_false (kd_dispatcher_submit_finish (KD_DISPATCHER (source), result, error));
  g_assert_nonnull (*error);
}

static void
test_thread_limit_start (void)
{
  Workers workers;
  KdDispatcher *dispatcher;
  GError *error = NULL;
  GError *async_error = NULL;
  KdStats stats;

  g_test_summary ("With the thread limit reached after 2 of 4 workers, kd_dispatcher_start(), a "
                  "submit and an async submit fail with G_THREAD_ERROR_AGAIN: the 2 workers made "
                  "ran their init and finalize and were joined, no item changed hands; once "
                  "threads can be made, the dispatcher starts");
  if (!in_subprocess ())
    return;

  dispatcher = workers_dispatcher_new (&workers);
  kd_dispatcher_set_item_free (dispatcher, count_item_free);

  kd_test_limit_threads (2);
  g_assert_false (kd_dispatcher_start (dispatcher, &error));
  g_assert_error (error, G_THREAD_ERROR, G_THREAD_ERROR_AGAIN);
  g_test_message ("%s", error->message);
  g_clear_error (&error);
  g_assert_cmpint (workers.inits, ==, 2);
  g_assert_cmpint (workers.finalizes, ==, 2);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);

  g_assert_false (kd_dispatcher_submit (dispatcher, "k", GUINT_TO_POINTER (1), &error));
  g_assert_error (error, G_THREAD_ERROR, G_THREAD_ERROR_AGAIN);
  g_clear_error (&error);
  kd_dispatcher_submit_async (dispatcher, NULL, GUINT_TO_POINTER (2), NULL, refused_cb, &async_error);
  while (async_error == NULL)
    g_main_context_iteration (NULL, TRUE);
  g_assert_error (async_error, G_THREAD_ERROR, G_THREAD_ERROR_AGAIN);
  g_clear_error (&async_error);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, 0);
  g_assert_cmpuint (stats.rejected, ==, 2);
  g_assert_cmpint (items_freed, ==, 0);
  g_assert_cmpint (workers.inits, ==, 6);      /* each submit tried to start again */
  g_assert_cmpint (workers.finalizes, ==, 6);

  kd_test_unlimit_threads ();
  g_assert_true (kd_dispatcher_start (dispatcher, &error));
  g_assert_no_error (error);
  g_assert_cmpint (workers.inits, ==, 6 + N_WORKERS);
  g_assert_true (kd_dispatcher_submit (dispatcher, "k", GUINT_TO_POINTER (3), NULL));
  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, 1);
  g_object_unref (dispatcher);
  g_assert_cmpint (items_freed, ==, 1);
  g_assert_cmpint (workers.finalizes, ==, 6 + N_WORKERS);
}

static void
test_thread_limit_timer (void)
{
  Workers workers;
  KdDispatcher *dispatcher;
  GError *error = NULL;

  g_test_summary ("A dispatcher that retries needs its timer thread: when it cannot be made, "
                  "the start fails with the thread error before any worker is made");
  if (!in_subprocess ())
    return;

  dispatcher = workers_dispatcher_new (&workers);
  kd_dispatcher_set_retry (dispatcher, 3, G_TIME_SPAN_MILLISECOND, G_TIME_SPAN_SECOND);
  kd_test_limit_threads (0);
  g_assert_false (kd_dispatcher_start (dispatcher, &error));
  g_assert_error (error, G_THREAD_ERROR, G_THREAD_ERROR_AGAIN);
  g_assert_nonnull (strstr (error->message, "timer"));
  g_clear_error (&error);
  g_assert_cmpint (workers.inits, ==, 0);
  kd_test_unlimit_threads ();
  g_assert_true (kd_dispatcher_start (dispatcher, &error));
  g_assert_cmpuint (kd_test_threads_settle (N_WORKERS + 1), ==, N_WORKERS + 1);
  g_object_unref (dispatcher);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
}

static gboolean
pass_on_handler (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  return kd_job_emit (job, kd_job_get_key (job), kd_job_get_item (job), error);
}

static void
count_sink (const char *key,
            gpointer    item,
            gpointer    user_data)
{
  g_atomic_int_inc ((gint *) user_data);
}

static void
test_thread_limit_pipeline (void)
{
  KdPipeline *pipeline;
  GError *error = NULL;
  gint sunk = 0;

  g_test_summary ("A pipeline whose stages cannot all start fails its submit with the thread "
                  "error, the item staying the caller's; it starts at a later submit");
  if (!in_subprocess ())
    return;

  pipeline = kd_pipeline_new ();
  kd_dispatcher_set_item_free (kd_pipeline_add_stage (pipeline, "one", 2, pass_on_handler, NULL, NULL),
                               count_item_free);
  kd_pipeline_add_stage (pipeline, "two", 2, pass_on_handler, NULL, NULL);
  kd_pipeline_set_sink (pipeline, count_sink, &sunk, NULL);

  kd_test_limit_threads (3);   /* the second stage's second worker is one too many */
  g_assert_false (kd_pipeline_submit (pipeline, "k", GUINT_TO_POINTER (1), &error));
  g_assert_error (error, G_THREAD_ERROR, G_THREAD_ERROR_AGAIN);
  g_clear_error (&error);
  g_assert_cmpint (items_freed, ==, 0);

  kd_test_unlimit_threads ();
  g_assert_true (kd_pipeline_submit (pipeline, "k", GUINT_TO_POINTER (2), &error));
  g_assert_no_error (error);
  kd_pipeline_wait (pipeline);
  g_assert_cmpint (sunk, ==, 1);
  g_object_unref (pipeline);
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
}

typedef struct
{
  KdDispatcher  *dispatcher;
  KdTestCounter  finalized;
} Unreffed;

static gboolean
unref_in_handler (KdJob    *job,
                  gpointer  user_data,
                  GError  **error)
{
  Unreffed *u = user_data;

  g_object_unref (u->dispatcher);   /* the last reference */
  return TRUE;
}

static void
unreffed_finalized (gpointer user_data)
{
  Unreffed *u = user_data;

  kd_test_counter_add (&u->finalized, 1);
}

static void
test_thread_limit_unref_in_handler (void)
{
  Unreffed u;
  GError *error = NULL;

  g_test_summary ("The last unref in a handler when no thread can be made: the shutdown "
                  "finishes on the worker as it exits, not on a new thread");
  if (!in_subprocess ())
    return;

  kd_test_counter_init (&u.finalized);
  u.dispatcher = kd_dispatcher_new (2, unref_in_handler, &u, unreffed_finalized);
  g_assert_true (kd_dispatcher_start (u.dispatcher, &error));
  kd_test_limit_threads (0);
  g_assert_true (kd_dispatcher_submit (u.dispatcher, "k", NULL, NULL));
  g_assert_true (kd_test_counter_wait (&u.finalized, 1));
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  kd_test_unlimit_threads ();
  kd_test_counter_clear (&u.finalized);
}

static void
unref_in_done (KdJob        *job,
               const GError *error,
               gpointer      user_data)
{
  Unreffed *u = user_data;

  g_object_unref (u->dispatcher);   /* the last reference, in the main context */
}

static gboolean
noop_job (KdJob    *job,
          gpointer  user_data,
          GError  **error)
{
  return TRUE;
}

static gboolean
unreffed_done (gpointer user_data)
{
  return kd_test_counter_get (user_data) == 1;
}

static void
test_thread_limit_unref_in_context (void)
{
  GMainContext *context;
  Unreffed u;
  GError *error = NULL;

  g_test_summary ("The last unref in a done callback on a main context when no thread can be "
                  "made: the shutdown finishes in that context, from an idle source, once the "
                  "callback returned");
  if (!in_subprocess ())
    return;

  context = g_main_context_new ();
  kd_test_counter_init (&u.finalized);
  u.dispatcher = kd_dispatcher_new (2, noop_job, &u, unreffed_finalized);
  kd_dispatcher_set_main_context (u.dispatcher, context);
  kd_dispatcher_set_done_func (u.dispatcher, unref_in_done, &u, NULL);
  g_assert_true (kd_dispatcher_start (u.dispatcher, &error));
  kd_test_limit_threads (0);
  g_assert_true (kd_dispatcher_submit (u.dispatcher, "k", NULL, NULL));
  g_assert_true (kd_test_iterate_until (context, unreffed_done, &u.finalized));
  g_assert_cmpuint (kd_test_threads_settle (0), ==, 0);
  kd_test_unlimit_threads ();
  kd_test_counter_clear (&u.finalized);
  g_main_context_unref (context);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/actors/key-state-lifecycle", test_key_state_lifecycle);
  g_test_add_func ("/kd/actors/key-state-one-per-run", test_key_state_one_per_run);
  g_test_add_func ("/kd/actors/key-state-cancelled", test_key_state_cancelled);
  g_test_add_func ("/kd/actors/key-state-none", test_key_state_none);
  g_test_add_func ("/kd/actors/key-idle-keeps-state", test_key_idle_keeps_state);
  g_test_add_func ("/kd/actors/key-idle-expires", test_key_idle_expires);
  g_test_add_func ("/kd/actors/key-idle-revived", test_key_idle_revived);
  g_test_add_func ("/kd/actors/key-idle-last-unref", test_key_idle_last_unref);
  g_test_add_func ("/kd/actors/key-idle-bounded", test_key_idle_bounded);
  g_test_add_func ("/kd/actors/key-idle-bounded-revived", test_key_idle_bounded_revived);
  g_test_add_func ("/kd/actors/key-idle-sweep-meets-shutdown", test_key_idle_sweep_meets_shutdown);
  g_test_add_func ("/kd/actors/wait-from-timer", test_wait_from_timer);
  g_test_add_func ("/kd/actors/wait-from-shutdown", test_wait_from_shutdown);
  g_test_add_func ("/kd/actors/worker-init-uses-dispatcher", test_worker_init_uses_dispatcher);
  g_test_add_func ("/kd/actors/worker-data", test_worker_data);
  g_test_add_func ("/kd/actors/worker-init-fails", test_worker_init_fails);
  g_test_add_func ("/kd/actors/start-closed", test_start_closed);
  g_test_add_func ("/kd/actors/thread-limit-start", test_thread_limit_start);
  g_test_add_func ("/kd/actors/thread-limit-timer", test_thread_limit_timer);
  g_test_add_func ("/kd/actors/thread-limit-pipeline", test_thread_limit_pipeline);
  g_test_add_func ("/kd/actors/thread-limit-unref-in-handler", test_thread_limit_unref_in_handler);
  g_test_add_func ("/kd/actors/thread-limit-unref-in-context", test_thread_limit_unref_in_context);

  return g_test_run ();
}
