/* test-values.c: items that are values, as language bindings submit them
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-sync-private.h"
#include "kd-test-util.h"

#define N_KEYS 8

/* The objects a test submits: each carries its key and its number within
 * the key (from 1, or 0 for an unkeyed one), and counts its finalization,
 * so that a value freed twice (a critical from g_object_unref()) or never
 * (a count short at the end) fails the test. */
typedef struct
{
  GMutex  lock;
  guint   next[N_KEYS + 1];   /* per key: the number its last job had */
  gint    out_of_order;
  gint    overlap;
  gboolean busy[N_KEYS + 1];
  gint    finalized;
  gint    values_seen;        /* handlers that found a value */
  gint    pointers_seen;      /* handlers that found a pointer and no value */
  gint    freed_pointers;     /* the item-free function's calls */
  gint    done_with_value;    /* done callbacks that found the job's value */
  gint    cancelled;
  KdTestHold hold;            /* handlers of key 0's first job wait here, if set */
  gboolean   holding;
  KdTestCounter emitted;      /* emits an ordered stage made */
  KdTestCounter ran;          /* object_handler's runs */
} Fixture;

static Fixture *fixture_for_free;

static void
fixture_init (Fixture *f)
{
  memset (f, 0, sizeof *f);
  g_mutex_init (&f->lock);
  kd_test_hold_init (&f->hold);
  kd_test_counter_init (&f->emitted);
  kd_test_counter_init (&f->ran);
  fixture_for_free = f;
}

static void
fixture_clear (Fixture *f)
{
  kd_test_hold_clear (&f->hold);
  kd_test_counter_clear (&f->emitted);
  kd_test_counter_clear (&f->ran);
  g_mutex_clear (&f->lock);
  fixture_for_free = NULL;
}

static void
on_finalized (gpointer  data,
              GObject  *where_the_object_was)
{
  Fixture *f = data;

  g_atomic_int_inc (&f->finalized);
}

static GObject *
thing_new (Fixture *f,
           guint    key,
           guint    number)
{
  GObject *thing = g_object_new (G_TYPE_OBJECT, NULL);

  g_object_set_data (thing, "key", GUINT_TO_POINTER (key));
  g_object_set_data (thing, "number", GUINT_TO_POINTER (number));
  g_object_weak_ref (thing, on_finalized, f);
  return thing;
}

static char *
key_name (guint key)
{
  return key < N_KEYS ? g_strdup_printf ("k%u", key) : NULL;
}

/* Checks one job of @key with @number: its key's order, and no overlap. */
static void
check_turn (Fixture *f,
            guint    key,
            guint    number,
            gboolean entering)
{
  kd_mutex_lock (&f->lock);
  if (key < N_KEYS)
    {
      if (entering)
        {
          if (number != f->next[key] + 1)
            f->out_of_order++;
          f->next[key] = number;
          if (f->busy[key])
            f->overlap++;
        }
      f->busy[key] = entering;
    }
  kd_mutex_unlock (&f->lock);
}

/* A job's number, from its object value or its pointer item
 * (key * 100000 + number). */
static gboolean
object_handler (KdJob    *job,
                gpointer  user_data,
                GError  **error)
{
  Fixture *f = user_data;
  const GValue *value = kd_job_get_value (job);
  guint key, number;

  if (value != NULL)
    {
      GObject *thing;

      g_assert_true (G_VALUE_HOLDS_OBJECT (value));
      g_assert_true (kd_job_get_item (job) == (gpointer) value);
      thing = g_value_get_object (value);
      key = GPOINTER_TO_UINT (g_object_get_data (thing, "key"));
      number = GPOINTER_TO_UINT (g_object_get_data (thing, "number"));
      g_atomic_int_inc (&f->values_seen);
    }
  else
    {
      guint item = GPOINTER_TO_UINT (kd_job_get_item (job));

      key = item / 100000;
      number = item % 100000;
      g_atomic_int_inc (&f->pointers_seen);
    }

  {
    g_autofree char *name = key_name (key);

    g_assert_cmpstr (kd_job_get_key (job), ==, name);
  }
  check_turn (f, key, number, TRUE);
  if (f->holding && key == 0 && number == 1)
    g_assert_true (kd_test_hold_enter (&f->hold));
  check_turn (f, key, number, FALSE);
  kd_test_counter_add (&f->ran, 1);
  return TRUE;
}

static void
count_freed_pointer (gpointer item)
{
  g_atomic_int_inc (&fixture_for_free->freed_pointers);
}

static void
object_done (KdJob        *job,
             const GError *error,
             gpointer      user_data)
{
  Fixture *f = user_data;
  const GValue *value = kd_job_get_value (job);

  if (value != NULL && G_VALUE_HOLDS_OBJECT (value) && g_value_get_object (value) != NULL)
    g_atomic_int_inc (&f->done_with_value);
  if (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
    g_atomic_int_inc (&f->cancelled);
}

static KdDispatcher *
object_dispatcher (Fixture *f,
                   guint    n_workers,
                   guint    capacity)
{
  KdDispatcher *d = kd_dispatcher_new (n_workers, object_handler, f, NULL);

  kd_dispatcher_set_capacity (d, capacity);
  kd_dispatcher_set_item_free (d, count_freed_pointer);
  kd_dispatcher_set_done_func (d, object_done, f, NULL);
  return d;
}

static void
test_dispatcher_objects (void)
{
  guint per_key = kd_test_size (400, 80);
  Fixture f;
  KdDispatcher *d;
  guint key, i, n_values = 0, n_pointers = 0;
  KdStats stats;

  g_test_summary ("Objects submitted as values reach the handler and the done callback, in "
                  "their keys' order among pointer items of the same keys, and each copy is "
                  "freed exactly once, never by the item-free function");

  fixture_init (&f);
  d = object_dispatcher (&f, 4, 16);

  for (i = 1; i <= per_key; i++)
    for (key = 0; key <= N_KEYS; key++)
      {
        g_autofree char *name = key_name (key);
        GError *error = NULL;

        /* Every third job of a key is a pointer; unkeyed jobs count from 0. */
        if (i % 3 == 0)
          {
            g_assert_true (kd_dispatcher_submit (d, name, GUINT_TO_POINTER (key * 100000 + i),
                                                 &error));
            n_pointers++;
          }
        else
          {
            g_auto (GValue) value = G_VALUE_INIT;
            GObject *thing = thing_new (&f, key, i);

            g_value_init (&value, G_TYPE_OBJECT);
            g_value_take_object (&value, thing);
            g_assert_true (kd_dispatcher_submit_value (d, name, &value, &error));
            n_values++;
          }
        g_assert_no_error (error);
      }

  kd_dispatcher_wait (d);
  kd_dispatcher_get_stats (d, &stats);
  g_assert_cmpuint (stats.completed, ==, n_values + n_pointers);
  g_assert_cmpint (f.values_seen, ==, n_values);
  g_assert_cmpint (f.pointers_seen, ==, n_pointers);
  g_assert_cmpint (f.done_with_value, ==, n_values);
  g_assert_cmpint (f.freed_pointers, ==, n_pointers);
  g_assert_cmpint (f.out_of_order, ==, 0);
  g_assert_cmpint (f.overlap, ==, 0);
  /* The test's own references went at submit: the jobs' copies were the last. */
  g_assert_cmpint (g_atomic_int_get (&f.finalized), ==, n_values);

  g_object_unref (d);
  fixture_clear (&f);
}

/* A handler for values of any type: checks what each holds. */
static gboolean
typed_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  KdTestCounter *seen = user_data;
  const GValue *value = kd_job_get_value (job);
  const char *key = kd_job_get_key (job);

  g_assert_nonnull (value);
  if (g_str_equal (key, "string"))
    g_assert_cmpstr (g_value_get_string (value), ==, "a string");
  else if (g_str_equal (key, "variant"))
    g_assert_cmpint (g_variant_get_int32 (g_value_get_variant (value)), ==, 42);
  else if (g_str_equal (key, "boxed"))
    g_assert_cmpstr (((char **) g_value_get_boxed (value))[1], ==, "two");
  else
    g_assert_cmpint (g_value_get_int (value), ==, 7);
  kd_test_counter_add (seen, 1);
  return TRUE;
}

static void
test_value_types (void)
{
  const char *strv[] = { "one", "two", NULL };
  KdTestCounter seen;
  KdDispatcher *d;
  GValue value = G_VALUE_INIT;
  GVariant *variant = g_variant_ref_sink (g_variant_new_int32 (42));
  GError *error = NULL;

  g_test_summary ("A string, a GVariant, a boxed type and a plain integer travel as values, "
                  "each copied at submit and freed by the dispatcher");

  kd_test_counter_init (&seen);
  d = kd_dispatcher_new (2, typed_handler, &seen, NULL);

  g_value_init (&value, G_TYPE_STRING);
  g_value_set_string (&value, "a string");
  g_assert_true (kd_dispatcher_submit_value (d, "string", &value, &error));
  g_value_unset (&value);

  g_value_init (&value, G_TYPE_VARIANT);
  g_value_set_variant (&value, variant);
  g_assert_true (kd_dispatcher_submit_value (d, "variant", &value, &error));
  g_value_unset (&value);

  g_value_init (&value, G_TYPE_STRV);
  g_value_set_boxed (&value, strv);
  g_assert_true (kd_dispatcher_try_submit_value (d, "boxed", &value, &error));
  g_value_unset (&value);

  g_value_init (&value, G_TYPE_INT);
  g_value_set_int (&value, 7);
  g_assert_true (kd_dispatcher_submit_value (d, "int", &value, &error));
  g_value_unset (&value);
  g_assert_no_error (error);

  kd_dispatcher_wait (d);
  g_assert_cmpuint (kd_test_counter_get (&seen), ==, 4);
  /* The dispatcher's copy was a reference, dropped once: ours is the last
   * (a second drop would have freed it under us). */
  g_variant_unref (variant);

  g_object_unref (d);
  kd_test_counter_clear (&seen);
}

static gboolean
error_set (gpointer user_data)
{
  return *(GError **) user_data != NULL;
}

static void
on_value_submitted (GObject      *source,
                    GAsyncResult *result,
                    gpointer      user_data)
{
  GError **error = user_data;

  kd_dispatcher_submit_value_finish (KD_DISPATCHER (source), result, error);
  if (*error == NULL)
    g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_EXISTS, "completed");
}

static void
test_refused_values (void)
{
  Fixture f;
  KdDispatcher *d;
  GValue value = G_VALUE_INIT;
  GObject *thing;
  GError *error = NULL;
  GError *async_error = NULL;

  g_test_summary ("A refused value submit keeps no copy: blocking, try and async, at the "
                  "bound and once closed; an accepted async one has freed its copy when "
                  "its callback runs");

  fixture_init (&f);
  f.holding = TRUE;
  d = object_dispatcher (&f, 1, 1);
  g_value_init (&value, G_TYPE_OBJECT);

  /* The bound is taken by key 0's first job, held in its handler. */
  thing = thing_new (&f, 0, 1);
  g_value_set_object (&value, thing);
  g_assert_true (kd_dispatcher_submit_value (d, "k0", &value, &error));
  g_assert_no_error (error);
  g_assert_true (kd_test_hold_wait_arrived (&f.hold, 1));
  g_object_unref (thing);

  thing = thing_new (&f, 0, 2);
  g_value_set_object (&value, thing);
  g_assert_false (kd_dispatcher_try_submit_value (d, "k0", &value, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);
  /* Ours and the GValue's: no third. */
  g_assert_cmpuint (thing->ref_count, ==, 2);

  /* Async, accepted when the bound frees: its copy is gone by its callback. */
  kd_dispatcher_submit_value_async (d, "k0", &value, NULL, on_value_submitted, &async_error);
  g_assert_cmpuint (thing->ref_count, ==, 3);
  kd_test_hold_release (&f.hold);
  g_assert_true (kd_test_iterate_until (NULL, error_set, &async_error));
  g_assert_error (async_error, G_IO_ERROR, G_IO_ERROR_EXISTS);
  g_clear_error (&async_error);
  g_assert_cmpuint (thing->ref_count, ==, 2);

  /* Closed: every way in refuses, and keeps nothing. */
  kd_dispatcher_close (d);
  g_assert_false (kd_dispatcher_submit_value (d, "k0", &value, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);
  kd_dispatcher_submit_value_async (d, NULL, &value, NULL, on_value_submitted, &async_error);
  g_assert_true (kd_test_iterate_until (NULL, error_set, &async_error));
  g_assert_error (async_error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&async_error);
  g_assert_cmpuint (thing->ref_count, ==, 2);

  /* A cancelled group and a closed pipeline refuse too. */
  {
    KdGroup *group = kd_group_new (d);
    g_autoptr (KdPipeline) pipeline = kd_pipeline_new ();

    g_cancellable_cancel (kd_group_get_cancellable (group));
    g_assert_false (kd_group_submit_value (group, "k0", &value, &error));
    g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
    g_clear_error (&error);
    g_object_unref (group);

    kd_pipeline_add_stage (pipeline, "any", 1, kd_test_noop_handler, NULL, NULL);
    kd_pipeline_close (pipeline);
    g_assert_false (kd_pipeline_submit_value (pipeline, "k0", &value, &error));
    g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
    g_clear_error (&error);
  }
  g_assert_cmpuint (thing->ref_count, ==, 2);

  g_value_unset (&value);
  g_object_unref (thing);
  kd_dispatcher_wait (d);
  g_object_unref (d);
  g_assert_cmpint (f.finalized, ==, 2);
  fixture_clear (&f);
}

static void
test_cancelled_values (void)
{
  GCancellable *cancellable = g_cancellable_new ();
  guint n = 50, i;
  Fixture f;
  KdDispatcher *d;
  KdGroup *group;

  g_test_summary ("Values of jobs that never ran end cancelled, each seen by its done "
                  "callback and freed once, whether submitted to the dispatcher or a group");

  fixture_init (&f);
  f.holding = TRUE;
  d = object_dispatcher (&f, 1, 2 * n + 1);
  kd_dispatcher_set_cancellable (d, cancellable);
  group = kd_group_new (d);

  for (i = 1; i <= 2 * n + 1; i++)
    {
      g_auto (GValue) value = G_VALUE_INIT;
      GError *error = NULL;

      g_value_init (&value, G_TYPE_OBJECT);
      g_value_take_object (&value, thing_new (&f, 0, i));
      if (i % 2 == 0)
        g_assert_true (kd_group_submit_value (group, "k0", &value, &error));
      else
        g_assert_true (kd_dispatcher_submit_value (d, "k0", &value, &error));
      g_assert_no_error (error);
      if (i == 1)
        g_assert_true (kd_test_hold_wait_arrived (&f.hold, 1));
    }

  g_cancellable_cancel (cancellable);
  kd_test_hold_release (&f.hold);
  kd_dispatcher_wait (d);

  g_assert_cmpint (f.cancelled, ==, 2 * n);
  g_assert_cmpint (f.done_with_value, ==, 2 * n + 1);
  g_assert_cmpint (f.values_seen, ==, 1);
  g_assert_cmpint (g_atomic_int_get (&f.finalized), ==, 2 * n + 1);

  g_object_unref (group);
  g_object_unref (d);
  g_object_unref (cancellable);
  fixture_clear (&f);
}

static gboolean
fail_first_handler (KdJob    *job,
                    gpointer  user_data,
                    GError  **error)
{
  GPtrArray *seen = user_data;
  const GValue *value = kd_job_get_value (job);

  g_assert_nonnull (value);
  g_ptr_array_add (seen, g_value_get_object (value));
  if (kd_job_get_attempt (job) == 1)
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_FAILED, "first attempt");
      return FALSE;
    }
  return TRUE;
}

static void
test_retried_value (void)
{
  GPtrArray *seen = g_ptr_array_new ();
  Fixture f;
  KdDispatcher *d;
  GValue value = G_VALUE_INIT;
  GError *error = NULL;
  GObject *thing;

  g_test_summary ("A retried job runs again with its value, freed once after the last attempt");

  fixture_init (&f);
  d = kd_dispatcher_new (1, fail_first_handler, seen, NULL);
  kd_dispatcher_set_retry (d, 2, 0, 0);
  thing = thing_new (&f, 0, 1);
  g_value_init (&value, G_TYPE_OBJECT);
  g_value_take_object (&value, thing);
  g_assert_true (kd_dispatcher_submit_value (d, "k0", &value, &error));
  g_assert_no_error (error);
  g_value_unset (&value);
  kd_dispatcher_wait (d);

  g_assert_cmpuint (seen->len, ==, 2);
  g_assert_true (seen->pdata[0] == thing && seen->pdata[1] == thing);
  g_assert_cmpint (f.finalized, ==, 1);

  g_object_unref (d);
  g_ptr_array_unref (seen);
  fixture_clear (&f);
}

static void
on_group_value_submitted (GObject      *source,
                          GAsyncResult *result,
                          gpointer      user_data)
{
  GError **error = user_data;

  kd_group_submit_value_finish (KD_GROUP (source), result, error);
  if (*error == NULL)
    g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_EXISTS, "completed");
}

static void
test_delayed_and_group_async_values (void)
{
  GCancellable *cancellable = g_cancellable_new ();
  Fixture f;
  KdDispatcher *d;
  KdGroup *group;
  GValue value = G_VALUE_INIT;
  GObject *now, *later, *grouped, *refused;
  GError *error = NULL;
  GError *async_error = NULL;

  g_test_summary ("A delayed value job runs with its value, or, still waiting when the "
                  "dispatcher is cancelled, ends cancelled with it; a group's async value "
                  "submission completes or is refused; every copy is freed once");

  fixture_init (&f);
  d = object_dispatcher (&f, 2, 16);
  kd_dispatcher_set_cancellable (d, cancellable);
  group = kd_group_new (d);
  g_value_init (&value, G_TYPE_OBJECT);

  now = thing_new (&f, 1, 1);
  g_value_set_object (&value, now);
  g_assert_true (kd_dispatcher_submit_value_after (d, "k1", &value, 0, &error));
  g_assert_no_error (error);
  later = thing_new (&f, 2, 1);
  g_value_set_object (&value, later);
  g_assert_true (kd_dispatcher_submit_value_after (d, "k2", &value, G_TIME_SPAN_HOUR,
                                                   &error));
  g_assert_no_error (error);

  grouped = thing_new (&f, 4, 1);
  g_value_set_object (&value, grouped);
  kd_group_submit_value_async (group, "k4", &value, NULL, on_group_value_submitted,
                               &async_error);
  g_assert_true (kd_test_iterate_until (NULL, error_set, &async_error));
  g_assert_error (async_error, G_IO_ERROR, G_IO_ERROR_EXISTS);
  g_clear_error (&async_error);

  refused = thing_new (&f, 3, 1);
  g_value_set_object (&value, refused);
  g_cancellable_cancel (kd_group_get_cancellable (group));
  kd_group_submit_value_async (group, NULL, &value, NULL, on_group_value_submitted,
                               &async_error);
  g_assert_true (kd_test_iterate_until (NULL, error_set, &async_error));
  g_assert_error (async_error, G_IO_ERROR, G_IO_ERROR_CANCELLED);
  g_clear_error (&async_error);
  g_assert_cmpuint (refused->ref_count, ==, 2);

  /* The hour-long wait ends now, cancelled, with its value. */
  g_assert_true (kd_test_counter_wait (&f.ran, 2));
  g_cancellable_cancel (cancellable);
  kd_dispatcher_wait (d);
  g_assert_cmpint (f.values_seen, ==, 2);
  g_assert_cmpint (f.cancelled, ==, 1);
  g_assert_cmpint (f.done_with_value, ==, 3);
  g_assert_cmpint (f.out_of_order, ==, 0);

  g_value_unset (&value);
  g_object_unref (now);
  g_object_unref (later);
  g_object_unref (grouped);
  g_object_unref (refused);
  g_object_unref (group);
  g_object_unref (d);
  g_object_unref (cancellable);
  g_assert_cmpint (f.finalized, ==, 4);
  fixture_clear (&f);
}

/* ------------------------------------------------------------------------ */
/* Through a pipeline                                                       */

/* Stage one (keyed) hands its own value over with kd_job_emit(); stage
 * two (ordered) emits a copy of its own value, twice, the second time
 * after the first went on, and a string naming it; stage three (keyed)
 * drops the strings and one of the two copies, and copies the other into
 * a new value. */
static gboolean
hand_over_stage (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  g_assert_nonnull (kd_job_get_value (job));
  if (!kd_job_emit (job, kd_job_get_key (job), kd_job_get_item (job), error))
    return FALSE;
  /* Handed over: the job no longer has it. */
  g_assert_null (kd_job_get_value (job));
  g_assert_null (kd_job_get_item (job));
  return TRUE;
}

static gboolean
annotate_stage (KdJob    *job,
                gpointer  user_data,
                GError  **error)
{
  g_auto (GValue) name = G_VALUE_INIT;
  const GValue *value = kd_job_get_value (job);
  GObject *thing;

  g_assert_nonnull (value);
  thing = g_value_get_object (value);
  g_value_init (&name, G_TYPE_STRING);
  g_value_take_string (&name, g_strdup_printf ("%u",
                                               GPOINTER_TO_UINT (g_object_get_data (thing,
                                                                                    "number"))));
  /* A copy each time: the value stays the job's. */
  if (!kd_job_emit_value (job, kd_job_get_key (job), value, error) ||
      !kd_job_emit_value (job, kd_job_get_key (job), &name, error))
    return FALSE;
  g_assert_true (kd_job_get_value (job) == value);
  return kd_job_emit_value (job, "dropped", value, error);
}

static gboolean
copy_stage (KdJob    *job,
            gpointer  user_data,
            GError  **error)
{
  Fixture *f = user_data;
  const GValue *value = kd_job_get_value (job);
  GObject *thing;
  guint key, number;

  g_assert_nonnull (value);
  if (G_VALUE_HOLDS_STRING (value) || g_strcmp0 (kd_job_get_key (job), "dropped") == 0)
    return TRUE;

  thing = g_value_get_object (value);
  key = GPOINTER_TO_UINT (g_object_get_data (thing, "key"));
  number = GPOINTER_TO_UINT (g_object_get_data (thing, "number"));
  check_turn (f, key, number, TRUE);
  check_turn (f, key, number, FALSE);
  return kd_job_emit_value (job, kd_job_get_key (job), value, error);
}

typedef struct
{
  GMutex  lock;
  guint   next[N_KEYS];
  gint    out_of_order;
  gint    received;
} Sink;

static void
value_sink (const char   *key,
            const GValue *value,
            gpointer      user_data)
{
  Sink *sink = user_data;
  GObject *thing = g_value_get_object (value);
  guint k = GPOINTER_TO_UINT (g_object_get_data (thing, "key"));
  guint number = GPOINTER_TO_UINT (g_object_get_data (thing, "number"));

  kd_mutex_lock (&sink->lock);
  if (number != sink->next[k] + 1)
    sink->out_of_order++;
  sink->next[k] = number;
  sink->received++;
  kd_mutex_unlock (&sink->lock);
}

static void
pointer_sink (const char *key,
              gpointer    item,
              gpointer    user_data)
{
  g_error ("a value reached the pointer sink");
}

static void
test_pipeline_values (void)
{
  guint per_key = kd_test_size (300, 60);
  Sink sink = { 0 };
  Fixture f;
  KdPipeline *pipeline;
  KdDispatcher *ordered;
  guint key, i;

  g_test_summary ("Objects submitted to a pipeline as values pass through a keyed, an "
                  "ordered and a keyed stage, handed over, emitted with their job's own "
                  "item, and copied, reach the value sink in their keys' order, and every "
                  "value and copy is freed exactly once");

  fixture_init (&f);
  g_mutex_init (&sink.lock);
  pipeline = kd_pipeline_new ();
  kd_pipeline_add_stage (pipeline, "hand-over", 3, hand_over_stage, &f, NULL);
  ordered = kd_pipeline_add_stage (pipeline, "annotate", 3, annotate_stage, &f, NULL);
  kd_pipeline_set_stage_mode (pipeline, ordered, KD_STAGE_ORDERED);
  kd_dispatcher_set_capacity (ordered, 8);
  kd_pipeline_add_stage (pipeline, "copy", 3, copy_stage, &f, NULL);
  kd_pipeline_set_value_sink (pipeline, value_sink, &sink, NULL);
  kd_pipeline_set_sink (pipeline, pointer_sink, NULL, NULL);

  for (i = 1; i <= per_key; i++)
    for (key = 0; key < N_KEYS; key++)
      {
        g_autofree char *name = key_name (key);
        g_auto (GValue) value = G_VALUE_INIT;
        GError *error = NULL;

        g_value_init (&value, G_TYPE_OBJECT);
        g_value_take_object (&value, thing_new (&f, key, i));
        g_assert_true (kd_pipeline_submit_value (pipeline, name, &value, &error));
        g_assert_no_error (error);
      }
  kd_pipeline_close (pipeline);
  kd_pipeline_wait (pipeline);

  g_assert_cmpint (sink.received, ==, per_key * N_KEYS);
  g_assert_cmpint (sink.out_of_order, ==, 0);
  g_assert_cmpint (f.out_of_order, ==, 0);
  g_assert_cmpint (f.overlap, ==, 0);
  g_assert_cmpint (g_atomic_int_get (&f.finalized), ==, per_key * N_KEYS);

  g_object_unref (pipeline);
  g_mutex_clear (&sink.lock);
  fixture_clear (&f);
}

/* The ordered stage's first item waits until the test cancels; what the
 * items behind it emit is buffered meanwhile. */
static gboolean
held_annotate_stage (KdJob    *job,
                     gpointer  user_data,
                     GError  **error)
{
  Fixture *f = user_data;
  GObject *thing = g_value_get_object (kd_job_get_value (job));
  GError *local_error = NULL;

  if (GPOINTER_TO_UINT (g_object_get_data (thing, "number")) == 1)
    {
      /* Once cancelled, the emit fails and its copy is dropped. */
      g_assert_true (kd_test_hold_enter (&f->hold));
      g_assert_false (kd_job_emit_value (job, NULL, kd_job_get_value (job), &local_error));
      g_assert_error (local_error, KD_ERROR, KD_ERROR_CLOSED);
      g_clear_error (&local_error);
      return TRUE;
    }
  /* Behind the held head: buffered in the stage. */
  g_assert_true (kd_job_emit_value (job, NULL, kd_job_get_value (job), NULL));
  kd_test_counter_add (&f->emitted, 1);
  return TRUE;
}

static void
count_cancelled (KdJob        *job,
                 const GError *error,
                 gpointer      user_data)
{
  Fixture *f = user_data;

  if (error != NULL)
    g_atomic_int_inc (&f->cancelled);
}

static void
test_pipeline_cancelled_values (void)
{
  guint n = 40, i;
  Fixture f;
  KdPipeline *pipeline;
  KdDispatcher *ordered, *last;
  GCancellable *cancellable = g_cancellable_new ();

  g_test_summary ("Values buffered in an ordered stage, waiting in a stage, or dropped by a "
                  "cancelled pipeline are each freed exactly once");

  fixture_init (&f);
  pipeline = kd_pipeline_new ();
  kd_pipeline_set_cancellable (pipeline, cancellable);
  ordered = kd_pipeline_add_stage (pipeline, "annotate", 4, held_annotate_stage, &f, NULL);
  kd_pipeline_set_stage_mode (pipeline, ordered, KD_STAGE_ORDERED);
  kd_dispatcher_set_capacity (ordered, 2 * n);
  last = kd_pipeline_add_stage (pipeline, "last", 1, kd_test_noop_handler, NULL, NULL);
  kd_dispatcher_set_done_func (last, count_cancelled, &f, NULL);

  for (i = 1; i <= n; i++)
    {
      g_auto (GValue) value = G_VALUE_INIT;
      GError *error = NULL;

      g_value_init (&value, G_TYPE_OBJECT);
      g_value_take_object (&value, thing_new (&f, 0, i));
      g_assert_true (kd_pipeline_submit_value (pipeline, NULL, &value, &error));
      g_assert_no_error (error);
    }
  /* Every item behind the head has run and emitted, into the buffer. */
  g_assert_true (kd_test_hold_wait_arrived (&f.hold, 1));
  g_assert_true (kd_test_counter_wait (&f.emitted, n - 1));
  g_cancellable_cancel (cancellable);
  kd_test_hold_release (&f.hold);
  kd_pipeline_wait (pipeline);

  g_object_unref (pipeline);
  /* What was buffered came back through the last stage's done callback. */
  g_assert_cmpint (f.cancelled, ==, n - 1);
  g_assert_cmpint (g_atomic_int_get (&f.finalized), ==, n);

  g_object_unref (cancellable);
  fixture_clear (&f);
}

int
main (int    argc,
      char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/values/dispatcher-objects", test_dispatcher_objects);
  g_test_add_func ("/values/types", test_value_types);
  g_test_add_func ("/values/refused", test_refused_values);
  g_test_add_func ("/values/cancelled", test_cancelled_values);
  g_test_add_func ("/values/retried", test_retried_value);
  g_test_add_func ("/values/delayed-and-group-async", test_delayed_and_group_async_values);
  g_test_add_func ("/values/pipeline", test_pipeline_values);
  g_test_add_func ("/values/pipeline-cancelled", test_pipeline_cancelled_values);

  return g_test_run ();
}
