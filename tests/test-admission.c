/* test-admission.c: the admission word (bound, closing, wait barrier)
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <gio/gio.h>

#include "kd-admission-private.h"
#include "kd-error.h"
#include "kd-test-util.h"

static void
test_capacity_exact (void)
{
  KdAdmission admission;
  GError *error = NULL;
  guint phase;
  guint i;

  g_test_summary ("Exactly capacity units can be held; the next try fails with FULL "
                  "and a deadline in the past fails with TIMEOUT");

  kd_admission_init (&admission, 5);
  for (i = 0; i < 5; i++)
    {
      g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &phase, &error));
      g_assert_no_error (error);
      g_assert_cmpuint (phase, ==, 0);
    }
  g_assert_cmpuint (kd_admission_get_pending (&admission), ==, 5);

  g_assert_false (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &phase, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);

  g_assert_false (kd_admission_acquire (&admission, KD_ADMIT_DEADLINE,
                                        g_get_monotonic_time () - 1, &phase, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_TIMEOUT);
  g_clear_error (&error);

  g_assert_false (kd_admission_release (&admission, 0));
  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &phase, &error));

  for (i = 0; i < 5; i++)
    g_assert_false (kd_admission_release (&admission, 0));
  g_assert_cmpuint (kd_admission_get_pending (&admission), ==, 0);
  kd_admission_clear (&admission);
}

static void
test_capacity_clamped (void)
{
  KdAdmission admission;

  g_test_summary ("A capacity beyond what the word can count is clamped");

  kd_admission_init (&admission, G_MAXUINT);
  g_assert_cmpuint (admission.capacity, ==, KD_ADMISSION_CAPACITY_MAX);
  kd_admission_clear (&admission);
}

static void
test_close_drain (void)
{
  KdAdmission admission;
  GError *error = NULL;
  guint phase;

  g_test_summary ("Closed refuses even when full; exactly one of close and the last "
                  "release reports the drain");

  kd_admission_init (&admission, 2);
  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &phase, NULL));
  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &phase, NULL));

  g_assert_false (kd_admission_close (&admission));
  g_assert_false (kd_admission_close (&admission));
  g_assert_true (kd_admission_is_closed (&admission));

  g_assert_false (kd_admission_acquire (&admission, KD_ADMIT_BLOCK, 0, &phase, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);

  g_assert_false (kd_admission_release (&admission, 0));
  g_assert_true (kd_admission_release (&admission, 0));
  kd_admission_clear (&admission);

  kd_admission_init (&admission, 2);
  g_assert_true (kd_admission_close (&admission));
  g_assert_false (kd_admission_close (&admission));
  kd_admission_clear (&admission);
}

typedef struct
{
  KdAdmission *admission;
  GError      *error;
  gboolean     accepted;
  guint        phase;
} Acquirer;

static gpointer
acquire_blocking (gpointer data)
{
  Acquirer *acquirer = data;

  acquirer->accepted = kd_admission_acquire (acquirer->admission, KD_ADMIT_BLOCK, 0,
                                             &acquirer->phase, &acquirer->error);
  return NULL;
}

static void
test_blocked_wake (void)
{
  KdAdmission admission;
  Acquirer acquirers[3] = { 0 };
  GThread *threads[3];
  guint phase;
  guint i;

  g_test_summary ("Blocked acquirers sleep until a release makes room, and close wakes "
                  "the ones still asleep");

  kd_admission_init (&admission, 1);
  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &phase, NULL));

  for (i = 0; i < 3; i++)
    {
      acquirers[i].admission = &admission;
      threads[i] = g_thread_new ("acquirer", acquire_blocking, &acquirers[i]);
    }
  kd_admission_wait_sleepers (&admission, 3);

  /* One release: exactly one sleeper gets the unit. */
  kd_admission_release (&admission, 0);
  while (kd_admission_get_pending (&admission) == 0)
    kd_admission_wait_sleepers (&admission, 0);
  kd_admission_wait_sleepers (&admission, 2);
  kd_admission_close (&admission);

  for (i = 0; i < 3; i++)
    g_thread_join (threads[i]);

  {
    guint accepted = 0, closed = 0;

    for (i = 0; i < 3; i++)
      {
        if (acquirers[i].accepted)
          accepted++;
        else if (g_error_matches (acquirers[i].error, KD_ERROR, KD_ERROR_CLOSED))
          closed++;
        g_clear_error (&acquirers[i].error);
      }
    g_assert_cmpuint (accepted, ==, 1);
    g_assert_cmpuint (closed, ==, 2);
  }

  g_assert_true (kd_admission_release (&admission, 0));
  kd_admission_clear (&admission);
}

typedef struct
{
  KdAdmission   *admission;
  KdTestCounter  sealed;
  gboolean       returned;
} Waiter;

static void
on_sealed (gpointer user_data)
{
  Waiter *waiter = user_data;

  kd_test_counter_add (&waiter->sealed, 1);
}

static gpointer
wait_thread (gpointer data)
{
  Waiter *waiter = data;

  kd_admission_wait (waiter->admission, on_sealed, waiter);
  g_atomic_int_set (&waiter->returned, TRUE);
  return NULL;
}

static void
test_barrier_phases (void)
{
  KdAdmission admission;
  Waiter waiter = { 0 };
  GThread *thread;
  guint early, late, i;

  g_test_summary ("The barrier waits for the units acquired before it, not for the "
                  "ones acquired after it sealed its phase, and is reusable");

  kd_admission_init (&admission, 100);
  kd_test_counter_init (&waiter.sealed);
  waiter.admission = &admission;

  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &early, NULL));
  thread = g_thread_new ("waiter", wait_thread, &waiter);
  g_assert_true (kd_test_counter_wait (&waiter.sealed, 1));

  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &late, NULL));
  g_assert_cmpuint (late, !=, early);

  /* Releasing the early unit ends the wait although the late one is held. */
  kd_admission_release (&admission, early);
  g_thread_join (thread);
  g_assert_true (waiter.returned);
  g_assert_cmpuint (kd_admission_get_pending (&admission), ==, 1);

  /* The next wait waits for the late unit. */
  waiter.returned = FALSE;
  thread = g_thread_new ("waiter", wait_thread, &waiter);
  g_assert_true (kd_test_counter_wait (&waiter.sealed, 2));
  kd_admission_release (&admission, late);
  g_thread_join (thread);
  g_assert_true (waiter.returned);

  /* Many rounds on one admission. */
  for (i = 0; i < 1000; i++)
    {
      guint phase;

      g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &phase, NULL));
      kd_admission_release (&admission, phase);
      kd_admission_wait (&admission, NULL, NULL);
    }

  kd_test_counter_clear (&waiter.sealed);
  kd_admission_clear (&admission);
}

int
main (int    argc,
      char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/admission/capacity-exact", test_capacity_exact);
  g_test_add_func ("/kd/admission/capacity-clamped", test_capacity_clamped);
  g_test_add_func ("/kd/admission/close-drain", test_close_drain);
  g_test_add_func ("/kd/admission/blocked-wake", test_blocked_wake);
  g_test_add_func ("/kd/admission/barrier-phases", test_barrier_phases);

  return g_test_run ();
}
