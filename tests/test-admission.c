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
  guint epoch;
  guint i;

  g_test_summary ("Exactly capacity units can be held; the next try fails with FULL "
                  "and a deadline in the past fails with TIMEOUT");

  kd_admission_init (&admission, 5, 0);
  for (i = 0; i < 5; i++)
    {
      g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &epoch, &error));
      g_assert_no_error (error);
      g_assert_cmpuint (epoch, ==, 0);
    }
  g_assert_cmpuint (kd_admission_get_pending (&admission), ==, 5);

  g_assert_false (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &epoch, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);

  g_assert_false (kd_admission_acquire (&admission, KD_ADMIT_DEADLINE,
                                        g_get_monotonic_time () - 1, &epoch, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_TIMEOUT);
  g_clear_error (&error);

  g_assert_false (kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, 0));
  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &epoch, &error));

  for (i = 0; i < 5; i++)
    g_assert_false (kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, 0));
  g_assert_cmpuint (kd_admission_get_pending (&admission), ==, 0);
  kd_admission_clear (&admission);
}

static void
test_capacity_clamped (void)
{
  KdAdmission admission;

  g_test_summary ("A capacity beyond what the word can count is clamped");

  kd_admission_init (&admission, G_MAXUINT, 0);
  g_assert_cmpuint (admission.capacity, ==, KD_ADMISSION_CAPACITY_MAX);
  kd_admission_clear (&admission);
}

static void
test_close_drain (void)
{
  KdAdmission admission;
  GError *error = NULL;
  guint epoch;

  g_test_summary ("Closed refuses even when full; exactly one of close and the last "
                  "release reports the drain");

  kd_admission_init (&admission, 2, 0);
  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &epoch, NULL));
  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &epoch, NULL));

  g_assert_false (kd_admission_close (&admission));
  g_assert_false (kd_admission_close (&admission));
  g_assert_true (kd_admission_is_closed (&admission));

  g_assert_false (kd_admission_acquire (&admission, KD_ADMIT_BLOCK, 0, &epoch, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_CLOSED);
  g_clear_error (&error);

  g_assert_false (kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, 0));
  g_assert_true (kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, 0));
  kd_admission_clear (&admission);

  kd_admission_init (&admission, 2, 0);
  g_assert_true (kd_admission_close (&admission));
  g_assert_false (kd_admission_close (&admission));
  kd_admission_clear (&admission);
}

typedef struct
{
  KdAdmission *admission;
  GError      *error;
  gboolean     accepted;
  guint        epoch;
} Acquirer;

static gpointer
acquire_blocking (gpointer data)
{
  Acquirer *acquirer = data;

  acquirer->accepted = kd_admission_acquire (acquirer->admission, KD_ADMIT_BLOCK, 0,
                                             &acquirer->epoch, &acquirer->error);
  return NULL;
}

static void
test_blocked_wake (void)
{
  KdAdmission admission;
  Acquirer acquirers[3] = { 0 };
  GThread *threads[3];
  guint epoch;
  guint i;

  g_test_summary ("Blocked acquirers sleep until a release makes room, and close wakes "
                  "the ones still asleep");

  kd_admission_init (&admission, 1, 0);
  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &epoch, NULL));

  for (i = 0; i < 3; i++)
    {
      acquirers[i].admission = &admission;
      threads[i] = g_thread_new ("acquirer", acquire_blocking, &acquirers[i]);
    }
  kd_admission_wait_sleepers (&admission, 3);

  /* One release: exactly one sleeper gets the unit. */
  kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, 0);
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

  g_assert_true (kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, 0));
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
                  "ones acquired after it sealed its epoch, and is reusable");

  kd_admission_init (&admission, 100, 0);
  kd_test_counter_init (&waiter.sealed);
  waiter.admission = &admission;

  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &early, NULL));
  thread = g_thread_new ("waiter", wait_thread, &waiter);
  g_assert_true (kd_test_counter_wait (&waiter.sealed, 1));

  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &late, NULL));
  g_assert_cmpuint (late, !=, early);

  /* Releasing the early unit ends the wait although the late one is held. */
  kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, early);
  g_thread_join (thread);
  g_assert_true (waiter.returned);
  g_assert_cmpuint (kd_admission_get_pending (&admission), ==, 1);

  /* The next wait waits for the late unit. */
  waiter.returned = FALSE;
  thread = g_thread_new ("waiter", wait_thread, &waiter);
  g_assert_true (kd_test_counter_wait (&waiter.sealed, 2));
  kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, late);
  g_thread_join (thread);
  g_assert_true (waiter.returned);

  /* Many rounds on one admission. */
  for (i = 0; i < 1000; i++)
    {
      guint epoch;

      g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &epoch, NULL));
      kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, epoch);
      kd_admission_wait (&admission, NULL, NULL);
    }

  kd_test_counter_clear (&waiter.sealed);
  kd_admission_clear (&admission);
}

typedef struct
{
  KdAdmission   *admission;
  KdTestCounter *sealed;
  KdTestGate     returned;
  GThread       *thread;
} Overlap;

static void
count_sealed (gpointer user_data)
{
  kd_test_counter_add (user_data, 1);
}

static gpointer
overlap_thread (gpointer data)
{
  Overlap *overlap = data;

  kd_admission_wait (overlap->admission, count_sealed, overlap->sealed);
  kd_test_gate_open (&overlap->returned);
  return NULL;
}

static void
spawn_waiter (Overlap       *overlap,
              KdAdmission   *admission,
              KdTestCounter *sealed)
{
  overlap->admission = admission;
  overlap->sealed = sealed;
  kd_test_gate_init (&overlap->returned);
  overlap->thread = g_thread_new ("waiter", overlap_thread, overlap);
}

/* Starts a waiter and returns once it sealed its epoch. */
static void
start_waiter (Overlap       *overlap,
              KdAdmission   *admission,
              KdTestCounter *sealed)
{
  guint before = kd_test_counter_get (sealed);

  spawn_waiter (overlap, admission, sealed);
  g_assert_true (kd_test_counter_wait (sealed, before + 1));
}

static void
join_waiter (Overlap *overlap)
{
  g_thread_join (overlap->thread);
  kd_test_gate_clear (&overlap->returned);
}

static void
test_overlapping_waiters (void)
{
  KdAdmission admission;
  KdTestCounter sealed;
  Overlap first, second;
  guint a, b, c;

  g_test_summary ("Two waiters that overlap each wait only for the units acquired "
                  "before their own call, not for one acquired after the second "
                  "waiter sealed its epoch");

  kd_admission_init (&admission, 100, 0);
  kd_test_counter_init (&sealed);

  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &a, NULL));
  start_waiter (&first, &admission, &sealed);
  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &b, NULL));
  start_waiter (&second, &admission, &sealed);
  g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &c, NULL));
  g_assert_cmpuint (a, !=, b);
  g_assert_cmpuint (b, !=, c);

  /* The second waiter's epoch drains first, but the first's is older. */
  kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, b);
  g_assert_false (kd_test_gate_wait_for (&second.returned, 0));
  kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, a);

  /* Both return although the unit acquired after them is still held. */
  g_assert_true (kd_test_gate_wait (&first.returned));
  g_assert_true (kd_test_gate_wait (&second.returned));
  join_waiter (&first);
  join_waiter (&second);
  g_assert_cmpuint (kd_admission_get_pending (&admission), ==, 1);

  kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, c);
  kd_test_counter_clear (&sealed);
  kd_admission_clear (&admission);
}

#define MANY_WAITERS (3 * KD_ADMISSION_EPOCHS)

static void
test_many_waiters (void)
{
  KdAdmission admission;
  KdTestCounter sealed;
  Overlap *waiters = g_new0 (Overlap, MANY_WAITERS);
  guint held[MANY_WAITERS];
  guint i;

  g_test_summary ("More overlapping waiters than the ring has epochs: the extra ones "
                  "wait for a slot, and every epoch still drains exactly");

  kd_admission_init (&admission, 1000, 0);
  kd_test_counter_init (&sealed);

  /* Each waiter seals an epoch holding one unit. The ones beyond the ring
   * cannot seal until the oldest epochs drain, so start them in order. */
  for (i = 0; i < KD_ADMISSION_EPOCHS - 1; i++)
    {
      g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &held[i], NULL));
      start_waiter (&waiters[i], &admission, &sealed);
    }
  for (i = KD_ADMISSION_EPOCHS - 1; i < MANY_WAITERS; i++)
    {
      /* The ring is full: this waiter cannot seal until the oldest epoch
       * drains, which happens when the oldest waiter's unit ends. */
      guint oldest = i - (KD_ADMISSION_EPOCHS - 1);

      g_assert_true (kd_admission_acquire (&admission, KD_ADMIT_TRY, 0, &held[i], NULL));
      spawn_waiter (&waiters[i], &admission, &sealed);
      g_assert_false (kd_test_gate_wait_for (&waiters[oldest].returned, 0));
      kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, held[oldest]);
      g_assert_true (kd_test_gate_wait (&waiters[oldest].returned));
      g_assert_true (kd_test_counter_wait (&sealed, i + 1));
    }
  for (i = MANY_WAITERS - (KD_ADMISSION_EPOCHS - 1); i < MANY_WAITERS; i++)
    kd_admission_release (&admission, KD_ADMISSION_ANY_RELEASER, held[i]);

  for (i = 0; i < MANY_WAITERS; i++)
    {
      g_assert_true (kd_test_gate_wait (&waiters[i].returned));
      join_waiter (&waiters[i]);
    }
  g_assert_cmpuint (kd_admission_get_pending (&admission), ==, 0);
  g_assert_cmpuint (kd_test_counter_get (&sealed), ==, MANY_WAITERS);

  g_free (waiters);
  kd_test_counter_clear (&sealed);
  kd_admission_clear (&admission);
}

typedef struct
{
  KdAdmission *admission;
  guint        releaser;
  guint        rounds;
  gint        *refused;
} Churner;

static gpointer
churn (gpointer data)
{
  Churner *churner = data;
  guint i;

  for (i = 0; i < churner->rounds; i++)
    {
      GError *error = NULL;
      guint epoch;

      if (kd_admission_acquire (churner->admission, KD_ADMIT_TRY, 0, &epoch, &error))
        kd_admission_release (churner->admission, churner->releaser, epoch);
      else
        {
          g_atomic_int_inc (churner->refused);
          g_clear_error (&error);
        }
    }

  return NULL;
}

static gpointer
keep_waiting (gpointer data)
{
  Churner *churner = data;

  while (!g_atomic_int_get (churner->refused + 1))
    kd_admission_wait (churner->admission, NULL, NULL);
  return NULL;
}

#define CHURNERS 4

static void
test_never_full_below_bound (void)
{
  KdAdmission admission;
  Churner churners[CHURNERS + 1];
  GThread *threads[CHURNERS + 1];
  gint refused[2] = { 0, 0 };
  guint rounds = kd_test_size (200000, 2000000);
  guint i;

  g_test_summary ("Threads that each hold at most one unit, fewer than the capacity, "
                  "are never refused, whatever the interleaving of acquires, releases "
                  "(each thread its own releaser) and seals");

  kd_admission_init (&admission, CHURNERS, CHURNERS);
  for (i = 0; i < CHURNERS; i++)
    {
      churners[i] = (Churner) { &admission, i, rounds, refused };
      threads[i] = g_thread_new ("churn", churn, &churners[i]);
    }
  churners[CHURNERS] = (Churner) { &admission, 0, 0, refused };
  threads[CHURNERS] = g_thread_new ("waiter", keep_waiting, &churners[CHURNERS]);

  for (i = 0; i < CHURNERS; i++)
    g_thread_join (threads[i]);
  g_atomic_int_set (&refused[1], 1);
  g_thread_join (threads[CHURNERS]);

  g_assert_cmpint (refused[0], ==, 0);
  g_assert_cmpuint (kd_admission_get_pending (&admission), ==, 0);
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
  g_test_add_func ("/kd/admission/overlapping-waiters", test_overlapping_waiters);
  g_test_add_func ("/kd/admission/many-waiters", test_many_waiters);
  g_test_add_func ("/kd/admission/never-full-below-bound", test_never_full_below_bound);

  return g_test_run ();
}
