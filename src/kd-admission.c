/* kd-admission.c: the admission bound, closing and the wait barrier
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * Every accepted job holds one unit of admission from the moment a submit
 * accepts it until it ends. The admission keeps its hot state in one 64-bit
 * word, so that accepting a job is a single compare-and-swap and ending one
 * is, while nobody waits, a single compare-and-swap too:
 *
 *   bits  0..27  jobs pending that joined the current epoch
 *   bits 28..55  jobs pending that joined a sealed epoch
 *   bits 56..60  the current epoch's slot in the ring (0..31)
 *   bit  61      CLOSED: nothing more is accepted
 *   bit  62      ROOM_WAITERS: a submitter sleeps until a job ends
 *   bit  63      DRAIN_WAITERS: a barrier waiter sleeps until epochs drain
 *
 * The bound holds because a job is counted in the same compare-and-swap that
 * checks the sum of both counters against the capacity, and that also checks
 * CLOSED: a closed admission refuses even when it is also full, and once
 * close() returned nothing more is accepted.
 *
 * The barrier (kd_admission_wait) is epoch-based, like user-space RCU's
 * grace periods. Each accepted job remembers the slot of the epoch it joined.
 * A waiter seals the current epoch: in one compare-and-swap it moves the
 * epoch's count into the sealed counter and makes the next slot current, so
 * later jobs join the new epoch; then it adds the count to that slot's
 * counter in @sealed_jobs. A job that ends checks whether its slot is still
 * current; if not, it also decrements its slot's counter. The waiter returns
 * once its epoch and every older one have drained. Jobs accepted by any
 * thread after the seal cannot delay it, and waiters do not wait for each
 * other's later jobs: any number of them can overlap, each sealing its own
 * epoch.
 *
 * The ring has 32 slots. A slot is reused only once its old epoch drained
 * (a sealer waits for that), so a job's slot is current again only if its
 * epoch is: slot equality is epoch equality. A job's end may reach its slot
 * counter before the sealer's addition, so the counters are signed and go
 * briefly below zero; they are read only under @lock, where every addition
 * is complete.
 *
 * Sleeping uses @lock and two GConds. A sleeper sets its waiter bit in the
 * word, then checks its condition again, then sleeps; the thread that
 * changes the condition first changes it, then looks at the bit, and takes
 * @lock to clear it and broadcast. One of the two always sees the other, so
 * no wake-up is lost, and the fast paths never touch @lock.
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

#define COUNT_BITS         28
#define COUNT_MASK         ((G_GUINT64_CONSTANT (1) << COUNT_BITS) - 1)
#define SEALED_SHIFT       COUNT_BITS
#define SLOT_SHIFT         56
#define SLOT_MASK          (G_GUINT64_CONSTANT (KD_ADMISSION_EPOCHS - 1) << SLOT_SHIFT)
#define CLOSED_BIT         (G_GUINT64_CONSTANT (1) << 61)
#define ROOM_WAITERS_BIT   (G_GUINT64_CONSTANT (1) << 62)
#define DRAIN_WAITERS_BIT  (G_GUINT64_CONSTANT (1) << 63)

G_STATIC_ASSERT (KD_ADMISSION_CAPACITY_MAX == COUNT_MASK);
G_STATIC_ASSERT (KD_ADMISSION_EPOCHS == 32);

/* How long a blocked submitter sleeps before it looks for room by itself. */
#define ROOM_RECHECK_MIN_US (1 * G_TIME_SPAN_MILLISECOND)
#define ROOM_RECHECK_MAX_US (16 * G_TIME_SPAN_MILLISECOND)

static inline guint
current_of (guint64 word)
{
  return (guint) (word & COUNT_MASK);
}

static inline guint
sealed_of (guint64 word)
{
  return (guint) ((word >> SEALED_SHIFT) & COUNT_MASK);
}

static inline guint
total_of (guint64 word)
{
  return current_of (word) + sealed_of (word);
}

static inline guint
slot_of (guint64 word)
{
  return (guint) ((word & SLOT_MASK) >> SLOT_SHIFT);
}

static inline guint
room_of (KdAdmission *self,
         guint64      word)
{
  return self->capacity - MIN (total_of (word), self->capacity);
}

static inline guint64
load_word (KdAdmission *self)
{
  return __atomic_load_n (&self->word, __ATOMIC_SEQ_CST);
}

/* Sets @bit in the word; the caller checks its condition again afterwards,
 * before it sleeps. Called with @lock held. */
static void
announce_sleeper_locked (KdAdmission *self,
                         guint64      bit)
{
  __atomic_fetch_or (&self->word, bit, __ATOMIC_SEQ_CST);
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
kd_admission_init (KdAdmission *self,
                   guint        capacity)
{
  guint i;

  self->word = 0;
  for (i = 0; i < KD_ADMISSION_EPOCHS; i++)
    self->sealed_jobs[i] = 0;
  self->sealed_seq = 0;
  self->drained_seq = 0;
  self->n_sleeping = 0;
  kd_admission_set_capacity (self, capacity);
  g_mutex_init (&self->lock);
  g_cond_init (&self->room_cond);
  g_cond_init (&self->drained_cond);
  g_cond_init (&self->sleepers_cond);
}

void
kd_admission_clear (KdAdmission *self)
{
  g_assert_cmpuint (total_of (self->word), ==, 0);
  g_assert_cmpuint (self->n_sleeping, ==, 0);

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
      gint64 now;
      gint64 until;

      word = load_word (self);
      if ((word & CLOSED_BIT) || total_of (word) < self->capacity)
        break;
      if (!(word & ROOM_WAITERS_BIT))
        {
          announce_sleeper_locked (self, ROOM_WAITERS_BIT);
          continue;
        }

      now = g_get_monotonic_time ();
      if (deadline != 0 && deadline <= now)
        {
          in_time = FALSE;
          break;
        }
      until = now + recheck_us;
      if (deadline != 0)
        until = MIN (until, deadline);
      if (!kd_cond_wait_until (&self->room_cond, &self->lock, until))
        recheck_us = MIN (recheck_us * 2, ROOM_RECHECK_MAX_US);
    }

  self->n_sleeping--;
  g_cond_broadcast (&self->sleepers_cond);
  kd_mutex_unlock (&self->lock);

  return in_time;
}

/*
 * kd_admission_acquire:
 * @epoch: (out): the slot of the epoch the job joined; pass it to release
 *
 * Accepts one job, or refuses: KD_ERROR_CLOSED when closed (even if also
 * full), KD_ERROR_FULL for KD_ADMIT_TRY, KD_ERROR_TIMEOUT when @deadline
 * (monotonic time) passed with the bound still reached.
 */
gboolean
kd_admission_acquire (KdAdmission  *self,
                      KdAdmitMode   mode,
                      gint64        deadline,
                      guint        *epoch,
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
          if (__atomic_compare_exchange_n (&self->word, &word, word + 1, TRUE,
                                           __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
            {
              *epoch = slot_of (word);
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
wake_room_waiters (KdAdmission *self)
{
  kd_mutex_lock (&self->lock);
  __atomic_fetch_and (&self->word, ~ROOM_WAITERS_BIT, __ATOMIC_SEQ_CST);
  g_cond_broadcast (&self->room_cond);
  kd_mutex_unlock (&self->lock);
}

static void
wake_drain_waiters (KdAdmission *self)
{
  kd_mutex_lock (&self->lock);
  __atomic_fetch_and (&self->word, ~DRAIN_WAITERS_BIT, __ATOMIC_SEQ_CST);
  g_cond_broadcast (&self->drained_cond);
  kd_mutex_unlock (&self->lock);
}

/*
 * kd_admission_release:
 *
 * Ends one job of @epoch. Returns TRUE exactly once in the admission's life:
 * when this release leaves it closed with nothing pending.
 */
gboolean
kd_admission_release (KdAdmission *self,
                      guint        epoch)
{
  guint64 word = __atomic_load_n (&self->word, __ATOMIC_RELAXED);
  guint64 next;
  gboolean sealed;

  do
    {
      sealed = slot_of (word) != epoch;
      if (sealed)
        {
          g_assert (sealed_of (word) > 0);
          next = word - (G_GUINT64_CONSTANT (1) << SEALED_SHIFT);
        }
      else
        {
          g_assert (current_of (word) > 0);
          next = word - 1;
        }
    }
  while (!__atomic_compare_exchange_n (&self->word, &word, next, TRUE,
                                       __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));

  /* The last job of a sealed epoch: a waiter may be sleeping on it. The
   * word is read again after the decrement, to see a bit set meanwhile. */
  if (sealed &&
      __atomic_sub_fetch (&self->sealed_jobs[epoch], 1, __ATOMIC_SEQ_CST) == 0 &&
      (load_word (self) & DRAIN_WAITERS_BIT))
    wake_drain_waiters (self);

  if (G_UNLIKELY ((next & ROOM_WAITERS_BIT) && room_of (self, next) >= self->slack))
    wake_room_waiters (self);

  return (next & CLOSED_BIT) && total_of (next) == 0;
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
  guint64 old = __atomic_fetch_or (&self->word, CLOSED_BIT, __ATOMIC_SEQ_CST);

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

/* Moves drained_seq past every sealed epoch that has drained, oldest first.
 * Called with @lock held, so every sealer's addition is complete. */
static void
advance_drained_locked (KdAdmission *self)
{
  while (self->drained_seq < self->sealed_seq &&
         __atomic_load_n (&self->sealed_jobs[self->drained_seq % KD_ADMISSION_EPOCHS],
                          __ATOMIC_SEQ_CST) == 0)
    self->drained_seq++;
}

/* Sleeps on @drained_cond until @done holds; called with @lock held. */
static void
sleep_until_drained_locked (KdAdmission *self,
                            gboolean   (*done) (KdAdmission *self, guint64 seq),
                            guint64      seq)
{
  for (;;)
    {
      advance_drained_locked (self);
      if (done (self, seq))
        return;

      /* Announce first, then look again: a release that emptied an epoch
       * in between saw no bit, but its decrement is visible now. */
      announce_sleeper_locked (self, DRAIN_WAITERS_BIT);
      advance_drained_locked (self);
      if (done (self, seq))
        return;

      kd_cond_wait (&self->drained_cond, &self->lock);
    }
}

/* The slot after the current one is free for a new epoch. */
static gboolean
ring_has_room (KdAdmission *self,
               guint64      seq)
{
  return self->sealed_seq + 1 - self->drained_seq < KD_ADMISSION_EPOCHS;
}

/* The epoch @seq and every older one have drained. */
static gboolean
epoch_drained (KdAdmission *self,
               guint64      seq)
{
  return self->drained_seq > seq;
}

/*
 * kd_admission_wait:
 * @sealed: (nullable): called once the epoch is sealed, before sleeping
 *
 * Returns once every job acquired before the call has been released.
 */
void
kd_admission_wait (KdAdmission  *self,
                   KdSealedFunc  sealed,
                   gpointer      user_data)
{
  guint64 word;
  guint64 next;
  guint64 seq;
  guint joined;

  kd_mutex_lock (&self->lock);

  /* The epoch after ours reuses a slot: wait until its old epoch drained. */
  sleep_until_drained_locked (self, ring_has_room, 0);

  word = __atomic_load_n (&self->word, __ATOMIC_RELAXED);
  do
    {
      joined = current_of (word);
      next = (word & ~(SLOT_MASK | COUNT_MASK)) +
             ((guint64) joined << SEALED_SHIFT) +
             ((guint64) ((slot_of (word) + 1) % KD_ADMISSION_EPOCHS) << SLOT_SHIFT);
    }
  while (!__atomic_compare_exchange_n (&self->word, &word, next, TRUE,
                                       __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));

  seq = self->sealed_seq++;
  g_assert (seq % KD_ADMISSION_EPOCHS == slot_of (word));
  __atomic_add_fetch (&self->sealed_jobs[slot_of (word)], (gint64) joined, __ATOMIC_SEQ_CST);

  kd_mutex_unlock (&self->lock);

  if (sealed != NULL)
    sealed (user_data);

  kd_mutex_lock (&self->lock);
  sleep_until_drained_locked (self, epoch_drained, seq);
  kd_mutex_unlock (&self->lock);
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
