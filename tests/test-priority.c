/* test-priority.c: the priority classes of ready work
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>

#include "kd-test-util.h"

/* Items are numbers; a class's items start at its base. The first job
 * holds the only worker at @gate while the test queues the rest, which
 * then run in the order the dispatcher picks; @ran notes it. */
#define HELD    1
#define HIGH    1000
#define DEFAULT 2000
#define LOW     3000

typedef struct
{
  GMutex        lock;
  GArray       *ran;
  KdTestHold    hold;
  KdDispatcher *dispatcher;
  KdGroup      *high;
  KdGroup      *low;
} Fixture;

static gboolean
handler (KdJob    *job,
         gpointer  user_data,
         GError  **error)
{
  Fixture *f = user_data;
  guint item = GPOINTER_TO_UINT (kd_job_get_item (job));

  if (item == HELD)
    g_assert_true (kd_test_hold_enter (&f->hold));
  kd_mutex_lock (&f->lock);
  g_array_append_val (f->ran, item);
  kd_mutex_unlock (&f->lock);
  return TRUE;
}

/* One worker, held by a first job until the test calls run_queued(). */
static void
fixture_init (Fixture *f)
{
  g_mutex_init (&f->lock);
  f->ran = g_array_new (FALSE, FALSE, sizeof (guint));
  kd_test_hold_init (&f->hold);
  f->dispatcher = kd_dispatcher_new (1, handler, f, NULL);
  kd_dispatcher_set_capacity (f->dispatcher, 4096);
  f->high = kd_group_new (f->dispatcher);
  kd_group_set_priority (f->high, G_PRIORITY_HIGH);
  f->low = kd_group_new (f->dispatcher);
  g_object_set (f->low, "priority", G_PRIORITY_LOW, NULL);
  g_assert_true (kd_dispatcher_submit (f->dispatcher, NULL, GUINT_TO_POINTER (HELD), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&f->hold, 1));
}

static void
fixture_clear (Fixture *f)
{
  g_object_unref (f->high);
  g_object_unref (f->low);
  g_object_unref (f->dispatcher);
  kd_test_hold_clear (&f->hold);
  g_array_unref (f->ran);
  g_mutex_clear (&f->lock);
}

static void
submit (Fixture    *f,
        KdGroup    *group,
        const char *key,
        guint       item)
{
  GError *error = NULL;

  if (group != NULL)
    g_assert_true (kd_group_submit (group, key, GUINT_TO_POINTER (item), &error));
  else
    g_assert_true (kd_dispatcher_submit (f->dispatcher, key, GUINT_TO_POINTER (item), &error));
  g_assert_no_error (error);
}

/* Lets the held job go and waits for every job: @ran then holds the
 * order the worker took them in, the held job first. */
static void
run_queued (Fixture *f)
{
  kd_test_hold_release (&f->hold);
  kd_dispatcher_wait (f->dispatcher);
  g_assert_cmpuint (g_array_index (f->ran, guint, 0), ==, HELD);
}

static guint
ran_at (Fixture *f,
        guint    position)
{
  return g_array_index (f->ran, guint, position);
}

/* Jobs of a high-priority group overtake a flood of default ones queued
 * before them, unkeyed and keyed alike. */
static void
test_overtakes_flood (void)
{
  Fixture f;
  KdStats stats;
  guint i;

  fixture_init (&f);
  for (i = 0; i < 200; i++)
    submit (&f, NULL, i % 2 ? "flood" : NULL, DEFAULT + i);
  for (i = 0; i < 3; i++)
    submit (&f, f.high, NULL, HIGH + i);
  submit (&f, f.high, "urgent", HIGH + 3);
  run_queued (&f);

  g_assert_cmpuint (f.ran->len, ==, 205);
  for (i = 0; i < 4; i++)
    g_assert_cmpuint (ran_at (&f, 1 + i), ==, HIGH + i);
  kd_group_get_stats (f.high, &stats);
  g_assert_cmpuint (stats.completed, ==, 4);
  fixture_clear (&f);
}

/* A key's jobs run in their order whatever their priorities: a
 * high-priority job of a key that already waits at the default class runs
 * after its key's earlier jobs, and the key keeps its place. */
static void
test_key_order_holds (void)
{
  Fixture f;
  guint i, next = DEFAULT;

  fixture_init (&f);
  for (i = 0; i < 5; i++)
    submit (&f, NULL, "k", DEFAULT + i);
  submit (&f, f.high, "k", DEFAULT + 5);
  submit (&f, f.low, "k", DEFAULT + 6);
  submit (&f, f.high, "h", HIGH);
  run_queued (&f);

  /* "h" became ready at the high class: first. */
  g_assert_cmpuint (ran_at (&f, 1), ==, HIGH);
  for (i = 2; i < f.ran->len; i++)
    g_assert_cmpuint (ran_at (&f, i), ==, next++);
  g_assert_cmpuint (next, ==, DEFAULT + 7);
  fixture_clear (&f);
}

/* No class starves: with the default class flooded, a worker takes one
 * idle-class job in every 24 tasks; with the high class flooded, one
 * default job in every 24. */
static void
assert_served (Fixture *f,
               guint    base,
               guint    from,
               guint    until)
{
  guint i, since = 0;

  for (i = from; i < until; i++)
    {
      if (ran_at (f, i) >= base && ran_at (f, i) < base + 1000)
        since = 0;
      else
        g_assert_cmpuint (++since, <, 24);
    }
}

static void
test_no_starvation (void)
{
  Fixture f;
  guint i;

  fixture_init (&f);
  for (i = 0; i < 50; i++)
    submit (&f, f.low, NULL, LOW + i);
  for (i = 0; i < 300; i++)
    submit (&f, NULL, NULL, DEFAULT + i);
  run_queued (&f);
  /* While both classes have jobs: the first 300 default ones and the
   * idle ones among them. */
  assert_served (&f, LOW, 1, 300);
  fixture_clear (&f);

  fixture_init (&f);
  for (i = 0; i < 300; i++)
    submit (&f, f.high, NULL, HIGH + i);
  for (i = 0; i < 50; i++)
    submit (&f, NULL, NULL, DEFAULT + i);
  run_queued (&f);
  assert_served (&f, DEFAULT, 1, 300);
  fixture_clear (&f);
}

/* Every priority on GLib's scale falls in one of the three classes, and
 * the property and the setter agree. */
static void
test_priority_values (void)
{
  static const gint values[] = { G_MININT, G_PRIORITY_HIGH, -1, G_PRIORITY_DEFAULT, 99,
                                 G_PRIORITY_HIGH_IDLE, G_PRIORITY_DEFAULT_IDLE, G_PRIORITY_LOW,
                                 G_MAXINT };
  KdDispatcher *dispatcher = kd_dispatcher_new (1, kd_test_noop_handler, NULL, NULL);
  KdGroup *group = kd_group_new (dispatcher);
  guint i;

  g_assert_cmpint (kd_group_get_priority (group), ==, G_PRIORITY_DEFAULT);
  for (i = 0; i < G_N_ELEMENTS (values); i++)
    {
      gint read = 0;

      kd_group_set_priority (group, values[i]);
      g_object_get (group, "priority", &read, NULL);
      g_assert_cmpint (read, ==, values[i]);
      g_assert_true (kd_group_submit (group, NULL, GUINT_TO_POINTER (i), NULL));
    }
  g_assert_true (kd_group_wait (group, NULL));
  g_object_unref (group);
  g_object_unref (dispatcher);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/priority/overtakes-flood", test_overtakes_flood);
  g_test_add_func ("/priority/key-order-holds", test_key_order_holds);
  g_test_add_func ("/priority/no-starvation", test_no_starvation);
  g_test_add_func ("/priority/values", test_priority_values);

  return g_test_run ();
}
