/* kd-admission.c: the admission bound, closing and the wait barrier
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * Every accepted job holds one unit of admission from the moment a submit
 * accepts it until it ends. The admission keeps all of its state in one
 * 64-bit word, so that accepting a job is a single compare-and-swap and
 * ending one is a single atomic subtraction:
 *
 *   bits  0..29  jobs pending in phase 0
 *   bits 30..59  jobs pending in phase 1
 *   bit  60      the current phase: new jobs join it
 *   bit  61      CLOSED: nothing more is accepted
 *   bit  62      ROOM_WAITERS: a submitter sleeps until a job ends
 *   bit  63      DRAIN_WAITER: the barrier waiter sleeps until its phase drains
 *
 * The bound holds because a job is counted in the same compare-and-swap that
 * checks the sum of both counters against the capacity, and that also checks
 * CLOSED: a closed admission refuses even when it is also full, and once
 * close() returned nothing more is accepted.
 *
 * The barrier (kd_admission_wait) is a reusable two-phase epoch, the scheme
 * user-space RCU uses for grace periods: the waiter flips the current phase,
 * so jobs accepted after that join the other counter, and it sleeps until
 * the counter of the old phase reaches zero. Jobs accepted by other threads
 * during the wait cannot delay it. Waiters are serialized by @barrier_lock,
 * which is what makes two counters enough: when a waiter flips back to a
 * phase, the waiter before it has seen that phase drain, and no job can have
 * joined it since.
 *
 * Sleeping uses a GMutex and two GConds. A sleeper sets its waiter bit with a
 * compare-and-swap that also re-checks its condition, under @lock; the thread
 * that changes the condition sees the bit in the value its atomic operation
 * returned, and takes @lock to clear it and broadcast. So the fast paths
 * never touch @lock, and no wake-up is lost.
 *
 * Waking a sleeping submitter costs a futex call and, on a busy machine, a
 * worker's time slice; doing it for every job that ends while a producer is
 * held back costs CPU-bound work a sixth of its throughput. So a release
 * wakes blocked submitters only once a share of the bound is free (@slack,
 * 1/16 of the capacity; bounds under 32 wake at the first free slot). A
 * submitter asleep behind a smaller gap still notices it by itself: it sleeps
 * at most ROOM_RECHECK_MIN_US at first, doubling up to ROOM_RECHECK_MAX_US
 * while nothing changes, so room is never left unused for long even when
 * every running handler waits for that submitter.
 */

#include "config.h"

#include <gio/gio.h>

#include "kd-admission-private.h"
#include "kd-error.h"
#include "kd-sync-private.h"

#define COUNT_BITS        30
#define COUNT_MASK        ((G_GUINT64_CONSTANT (1) << COUNT_BITS) - 1)
#define PHASE_BIT         (G_GUINT64_CONSTANT (1) << 60)
#define CLOSED_BIT        (G_GUINT64_CONSTANT (1) << 61)
#define ROOM_WAITERS_BIT  (G_GUINT64_CONSTANT (1) << 62)
#define DRAIN_WAITER_BIT  (G_GUINT64_CONSTANT (1) << 63)

G_STATIC_ASSERT (KD_ADMISSION_CAPACITY_MAX == COUNT_MASK);

/* How long a blocked submitter sleeps before it looks for room by itself. */
#define ROOM_RECHECK_MIN_US (1 * G_TIME_SPAN_MILLISECOND)
#define ROOM_RECHECK_MAX_US (16 * G_TIME_SPAN_MILLISECOND)

static inline guint64
one_job (guint phase)
{
  return G_GUINT64_CONSTANT (1) << (phase * COUNT_BITS);
}

static inline guint
count_of (guint64 word,
          guint   phase)
{
  return (guint) ((word >> (phase * COUNT_BITS)) & COUNT_MASK);
}

static inline guint
total_of (guint64 word)
{
  return count_of (word, 0) + count_of (word, 1);
}

static inline guint
room_of (KdAdmission *self,
         guint64      word)
{
  return self->capacity - MIN (total_of (word), self->capacity);
}

static inline guint
phase_of (guint64 word)
{
  return (word & PHASE_BIT) ? 1 : 0;
}

static inline guint64
load_word (KdAdmission *self)
{
  return __atomic_load_n (&self->word, __ATOMIC_ACQUIRE);
}

/* Sets @bit in @word, the value the caller just checked; fails if the word
 * changed since, and then the caller must check again. Called with @lock
 * held. */
static gboolean
announce_sleeper_locked (KdAdmission *self,
                         guint64      word,
                         guint64      bit)
{
  return (word & bit) ||
         __atomic_compare_exchange_n (&self->word, &word, word | bit, FALSE,
                                      __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

void
kd_admission_init (KdAdmission *self,
                   guint        capacity)
{
  self->word = 0;
  self->n_sleeping = 0;
  kd_admission_set_capacity (self, capacity);
  g_mutex_init (&self->barrier_lock);
  g_mutex_init (&self->lock);
  g_cond_init (&self->room_cond);
  g_cond_init (&self->drained_cond);
  g_cond_init (&self->sleepers_cond);
}

/* Before the first acquire. Values above KD_ADMISSION_CAPACITY_MAX are
 * clamped. */
void
kd_admission_set_capacity (KdAdmission *self,
                           guint        capacity)
{
  self->capacity = MIN (capacity, KD_ADMISSION_CAPACITY_MAX);
  self->slack = MAX (1, self->capacity / 16);
}

void
kd_admission_clear (KdAdmission *self)
{
  g_assert_cmpuint (total_of (self->word), ==, 0);
  g_assert_cmpuint (self->n_sleeping, ==, 0);

  g_mutex_clear (&self->barrier_lock);
  g_mutex_clear (&self->lock);
  g_cond_clear (&self->room_cond);
  g_cond_clear (&self->drained_cond);
  g_cond_clear (&self->sleepers_cond);
}

/* Sleeps until the word shows room or CLOSED, or @deadline (monotonic, 0 for
 * none) passed. Returns FALSE if the deadline passed first. */
static gboolean
sleep_until_room (KdAdmission *self,
                  gint64       deadline)
{
  gint64 recheck_us = ROOM_RECHECK_MIN_US;
  gboolean in_time = TRUE;
  guint64 word;

  kd_mutex_lock (&self->lock);
  self->n_sleeping++;
  g_cond_broadcast (&self->sleepers_cond);

  for (;;)
    {
      word = load_word (self);
      if ((word & CLOSED_BIT) || total_of (word) < self->capacity)
        break;
      if (!announce_sleeper_locked (self, word, ROOM_WAITERS_BIT))
        continue;

      {
        gint64 now = g_get_monotonic_time ();
        gint64 until = now + recheck_us;

        if (deadline != 0 && deadline <= now)
          {
            in_time = FALSE;
            break;
          }
        if (deadline != 0)
          until = MIN (until, deadline);
        if (!kd_cond_wait_until (&self->room_cond, &self->lock, until))
          recheck_us = MIN (recheck_us * 2, ROOM_RECHECK_MAX_US);
      }
    }

  self->n_sleeping--;
  g_cond_broadcast (&self->sleepers_cond);
  kd_mutex_unlock (&self->lock);

  return in_time;
}

/*
 * kd_admission_acquire:
 * @phase: (out): the barrier phase the job joined; pass it to release
 *
 * Accepts one job, or refuses: KD_ERROR_CLOSED when closed (even if also
 * full), KD_ERROR_FULL for KD_ADMIT_TRY, KD_ERROR_TIMEOUT when @deadline
 * (monotonic time) passed with the bound still reached.
 */
gboolean
kd_admission_acquire (KdAdmission  *self,
                      KdAdmitMode   mode,
                      gint64        deadline,
                      guint        *phase,
                      GError      **error)
{
  guint64 word = __atomic_load_n (&self->word, __ATOMIC_RELAXED);
  gboolean timed_out = FALSE;

  for (;;)
    {
      if (word & CLOSED_BIT)
        {
          g_set_error_literal (error, KD_ERROR, KD_ERROR_CLOSED,
                               "The dispatcher no longer accepts jobs");
          return FALSE;
        }

      if (total_of (word) < self->capacity)
        {
          guint p = phase_of (word);

          if (__atomic_compare_exchange_n (&self->word, &word, word + one_job (p),
                                           TRUE, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            {
              *phase = p;
              return TRUE;
            }
          continue;
        }

      if (mode == KD_ADMIT_TRY)
        {
          g_set_error (error, KD_ERROR, KD_ERROR_FULL,
                       "The dispatcher already holds %u pending jobs", self->capacity);
          return FALSE;
        }

      if (timed_out || (mode == KD_ADMIT_DEADLINE && g_get_monotonic_time () >= deadline))
        {
          g_set_error (error, KD_ERROR, KD_ERROR_TIMEOUT,
                       "The dispatcher still held %u pending jobs at the deadline",
                       self->capacity);
          return FALSE;
        }

      timed_out = !sleep_until_room (self, mode == KD_ADMIT_DEADLINE ? deadline : 0);
      word = __atomic_load_n (&self->word, __ATOMIC_RELAXED);
    }
}

static void
wake_sleepers (KdAdmission *self,
               guint64      word,
               guint        phase)
{
  kd_mutex_lock (&self->lock);

  if ((word & ROOM_WAITERS_BIT) && room_of (self, word) >= self->slack)
    {
      __atomic_fetch_and (&self->word, ~ROOM_WAITERS_BIT, __ATOMIC_ACQ_REL);
      g_cond_broadcast (&self->room_cond);
    }

  if ((word & DRAIN_WAITER_BIT) && phase_of (word) != phase && count_of (word, phase) == 0)
    {
      __atomic_fetch_and (&self->word, ~DRAIN_WAITER_BIT, __ATOMIC_ACQ_REL);
      g_cond_broadcast (&self->drained_cond);
    }

  kd_mutex_unlock (&self->lock);
}

/*
 * kd_admission_release:
 *
 * Ends one job of @phase. Returns TRUE exactly once in the admission's life:
 * when this release leaves it closed with nothing pending.
 */
gboolean
kd_admission_release (KdAdmission *self,
                      guint        phase)
{
  guint64 old = __atomic_fetch_sub (&self->word, one_job (phase), __ATOMIC_ACQ_REL);
  guint64 word = old - one_job (phase);

  g_assert (count_of (old, phase) > 0);

  if (G_UNLIKELY (word & (ROOM_WAITERS_BIT | DRAIN_WAITER_BIT)))
    {
      if (((word & ROOM_WAITERS_BIT) && room_of (self, word) >= self->slack) ||
          ((word & DRAIN_WAITER_BIT) && phase_of (word) != phase &&
           count_of (word, phase) == 0))
        wake_sleepers (self, word, phase);
    }

  return (word & CLOSED_BIT) && total_of (word) == 0;
}

/*
 * kd_admission_close:
 *
 * Stops accepting; wakes blocked submitters so they fail. Idempotent.
 * Returns TRUE if this call closed the admission while nothing was pending
 * (then no release will ever return TRUE).
 */
gboolean
kd_admission_close (KdAdmission *self)
{
  guint64 old = __atomic_fetch_or (&self->word, CLOSED_BIT, __ATOMIC_ACQ_REL);

  if (old & CLOSED_BIT)
    return FALSE;

  kd_mutex_lock (&self->lock);
  g_cond_broadcast (&self->room_cond);
  kd_mutex_unlock (&self->lock);

  return total_of (old) == 0;
}

gboolean
kd_admission_is_closed (KdAdmission *self)
{
  return (load_word (self) & CLOSED_BIT) != 0;
}

guint
kd_admission_get_pending (KdAdmission *self)
{
  return total_of (load_word (self));
}

/*
 * kd_admission_wait:
 * @sealed: (nullable): called once the phase is sealed, before sleeping
 *
 * Returns once every job acquired before the call has been released.
 */
void
kd_admission_wait (KdAdmission  *self,
                   KdSealedFunc  sealed,
                   gpointer      user_data)
{
  guint64 old;
  guint64 word;
  guint sealed_phase;

  kd_mutex_lock (&self->barrier_lock);

  old = __atomic_fetch_xor (&self->word, PHASE_BIT, __ATOMIC_ACQ_REL);
  sealed_phase = phase_of (old);

  /* The waiter before us saw the phase we now open drain, and nothing could
   * join it since. */
  g_assert_cmpuint (count_of (old, 1 - sealed_phase), ==, 0);

  if (sealed != NULL)
    sealed (user_data);

  kd_mutex_lock (&self->lock);
  for (;;)
    {
      word = load_word (self);
      if (count_of (word, sealed_phase) == 0)
        break;
      if (!announce_sleeper_locked (self, word, DRAIN_WAITER_BIT))
        continue;
      kd_cond_wait (&self->drained_cond, &self->lock);
    }
  kd_mutex_unlock (&self->lock);

  kd_mutex_unlock (&self->barrier_lock);
}

/* Sleeps until at least @n_sleeping submitters are asleep waiting for room.
 * Lets tests observe that a submit really blocks, without sleeping. */
void
kd_admission_wait_sleepers (KdAdmission *self,
                            guint        n_sleeping)
{
  kd_mutex_lock (&self->lock);
  while (self->n_sleeping < n_sleeping)
    kd_cond_wait (&self->sleepers_cond, &self->lock);
  kd_mutex_unlock (&self->lock);
}
