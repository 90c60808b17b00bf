/* test-actors.c: a key's actor state
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-test-util.h"

#define MAX_KEYS 4096

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
  gint     alive[MAX_KEYS];
  gint     two_alive;       /* a key had two states at once */
  gint     shared;          /* two handlers used one state at once */
  gint     wrong_state;     /* a handler got another key's state, or none */
  gint     state_for_unkeyed;
  gint     jobs_seen;       /* summed over freed states */
  KdTestHold *hold;         /* the job with item 1 waits here */
} Actors;

static Actors *actors_for_free;

static guint
key_index (const char *key)
{
  return (guint) g_ascii_strtoull (key + 1, NULL, 10) % MAX_KEYS;
}

static gpointer
key_state_new (const char *key,
               gpointer    user_data)
{
  Actors *actors = user_data;
  KeyState *state = g_new0 (KeyState, 1);

  state->key = g_strdup (key);
  state->index = key_index (key);
  if (g_atomic_int_add (&actors->alive[state->index], 1) != 0)
    g_atomic_int_inc (&actors->two_alive);
  g_atomic_int_inc (&actors->created);

  return state;
}

static void
key_state_free (gpointer data)
{
  KeyState *state = data;
  Actors *actors = actors_for_free;

  g_atomic_int_add (&actors->alive[state->index], -1);
  g_atomic_int_add (&actors->jobs_seen, (gint) state->jobs);
  g_atomic_int_inc (&actors->freed);
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
    g_assert_cmpint (actors.alive[k], ==, 0);

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

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/actors/key-state-lifecycle", test_key_state_lifecycle);
  g_test_add_func ("/kd/actors/key-state-one-per-run", test_key_state_one_per_run);
  g_test_add_func ("/kd/actors/key-state-cancelled", test_key_state_cancelled);
  g_test_add_func ("/kd/actors/key-state-none", test_key_state_none);

  return g_test_run ();
}
