/* kd-admission.c: the admission bound, closing and the wait barrier
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * Every accepted job holds one unit of admission from the moment a submit
 * accepts it until it ends. The admission is a distributed counter, built so
 * that submitting and ending jobs do not fight over a cache line: that line
 * moving between the submitting thread and the workers on every job cost a
 * third of the unkeyed throughput (measured with kd-bench).
 *
 *  - Acquirers (submitters) own @grant, one 64-bit word:
 *
 *      bits  0..55  units acquired so far (monotonic)
 *      bits 56..60  the current epoch's slot in the ring (0..31)
 *      bit  61      CLOSED: nothing more is accepted
 *
 *    A unit is acquired by one compare-and-swap on @grant, which also checks
 *    CLOSED: a closed admission refuses even when it is also full, and once
 *    close() returned nothing more is accepted. A batch takes as many units
 *    as there is room for in the same one compare-and-swap
 *    (kd_admission_acquire_many()); they are released one by one.
 *
 *  - Releasers (the dispatcher's workers, plus one shared slot for any other
 *    thread) each count their own releases, in total and per epoch slot, on
 *    a cache line nobody else writes (KdReleaser). The workers' counters
 *    are KdSlots: a resize adds more while others read them, and a worker
 *    index keeps its counter when a new thread takes it (one at a time).
 *
 * The bound: pending = acquired - (sum of all releases). An acquirer checks
 * the bound against @released_view, a lower bound of that sum, and adds up
 * the releasers afresh only when the view says the bound is reached. A view
 * that lags only overestimates pending, so the bound always holds.
 *
 * The barrier (kd_admission_wait) is epoch-based, like user-space RCU's
 * grace periods. Each acquired unit remembers the slot of the epoch it
 * joined, and each release is counted under that slot. A waiter seals the
 * current epoch: in one compare-and-swap on @grant it makes the next slot
 * current and reads how many units were acquired so far, which tells how
 * many the sealed epoch holds. The epoch has drained once its slot's
 * releases (since the slot became current) reach that number. A waiter
 * returns once its epoch and every older one have drained: jobs accepted by
 * any thread after the seal cannot delay it, and any number of waiters can
 * overlap, each sealing its own epoch. The ring has 32 slots; a slot is
 * reused only once its old epoch drained, so its release count at reuse is
 * a stable base for the new epoch. A waiter may give up at a deadline
 * (kd_admission_wait_until()): its epoch stays sealed and drains like any.
 * An async waiter (kd_admission_wait_async(), a KdDrainWaiter of the
 * caller's) seals its epoch without sleeping; whoever sees its epoch drain
 * (advance_drained_locked(), in a release) calls its function once the
 * lock is released (unlock_and_notify()). A waiter's epoch is the one
 * current at its call, and any seal of it after the call will do: with
 * the ring full, a waiter waits until someone sealed it or the ring has
 * room, and the first drain that makes room seals it for every async
 * waiter that waits for it. Once every sealed epoch has drained nobody
 * can be waiting, and DRAIN_WAITERS is cleared.
 *
 * Waking sleepers. @flags, read by every release and written only when a
 * sleeper starts or stops waiting, says whether a release has to look
 * further: ROOM_WAITERS (a submitter sleeps until there is room),
 * DRAIN_WAITERS (a waiter sleeps until epochs drain), CLOSED (the release
 * that ends the last unit after close() reports the drain, exactly once).
 * Sleeper and releaser follow the Dekker pattern on sequentially consistent
 * atomics: a sleeper sets its flag, then counts again; a releaser counts its
 * release, then reads the flags. One of the two always sees the other, so
 * no wake-up is lost, and a release nobody waits for touches no shared line.
 *
 * Waking a sleeping submitter costs a futex call and, on a busy machine, a
 * worker's time slice; doing it for every job that ends while a producer is
 * held back costs CPU-bound work a sixth of its throughput. So releases wake
 * blocked submitters only once a share of the bound is free (@slack, 1/16 of
 * the capacity; bounds under 32 wake at the first free slot), and each
 * releaser looks at the room only every @slack / releasers of its releases.
 * The release that wakes them takes ROOM_WAITERS down, and a sleeper sets
 * it again before it counts again, so the releases made while the woken
 * submitters are on their way wake nobody (each wake-up is a system call).
 * A submitter asleep behind a smaller gap still notices it by itself: it
 * sleeps at most KD_ROOM_RECHECK_MIN_US at first, doubling up to
 * KD_ROOM_RECHECK_MAX_US while nothing changes, so room is never left unused for
 * long even when every running handler waits for that submitter.
 */

#include "config.h"

#include <gio/gio.h>
#include <string.h>

#include "kd-admission-private.h"
#include "kd-error.h"
#include "kd-sync-private.h"

enum
{
  FLAG_ROOM_WAITERS  = 1 << 0,
  FLAG_DRAIN_WAITERS = 1 << 1,
  FLAG_CLOSED        = 1 << 2,
};

G_STATIC_ASSERT (KD_ADMISSION_EPOCHS == 32);

static inline guint64
load_grant (KdAdmission *self)
{
  return __atomic_load_n (&self->grant, __ATOMIC_SEQ_CST);
}

static inline gint
load_flags (KdAdmission *self)
{
  return __atomic_load_n (&self->flags, __ATOMIC_SEQ_CST);
}

static inline KdReleaser *
releaser_at (KdAdmission *self,
             guint        index)
{
  return KD_SLOTS_GET (&self->releasers, index, KdReleaser);
}

/* The sum of all releases, as of a moment during the call. Counters only
 * grow, so a sum read while they move is a lower bound. */
static guint64
sum_released (KdAdmission *self)
{
  guint64 sum = 0;
  guint i;

  guint n = kd_slots_length (&self->releasers);

  for (i = 0; i < n; i++)
    sum += __atomic_load_n (&releaser_at (self, i)->released, __ATOMIC_SEQ_CST);
  sum += __atomic_load_n (&self->shared.released, __ATOMIC_SEQ_CST);

  return sum;
}

static guint64
sum_released_in (KdAdmission *self,
                 guint        slot)
{
  guint64 sum = 0;
  guint i;

  guint n = kd_slots_length (&self->releasers);

  for (i = 0; i < n; i++)
    sum += __atomic_load_n (&releaser_at (self, i)->released_in[slot], __ATOMIC_SEQ_CST);
  sum += __atomic_load_n (&self->shared.released_in[slot], __ATOMIC_SEQ_CST);

  return sum;
}

/* Adds up the releases and raises @released_view to the sum. */
static guint64
refresh_view (KdAdmission *self)
{
  guint64 sum = sum_released (self);
  guint64 view = __atomic_load_n (&self->released_view, __ATOMIC_RELAXED);

  while (view < sum &&
         !__atomic_compare_exchange_n (&self->released_view, &view, sum, TRUE,
                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    ;

  return MAX (view, sum);
}

/* Units pending right now, at most: acquired is read after the releases. */
static guint64
pending_at_most (KdAdmission *self)
{
  guint64 released = sum_released (self);

  return acquired_of (load_grant (self)) - released;
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

/* Up to @n_releasers threads get a counter of their own, numbered from 0;
 * any other thread releases as KD_ADMISSION_ANY_RELEASER. At any time, by
 * one caller at a time, before the new releasers release: their counters
 * start at zero, and every sum reads them from then on. Never fewer. */
void
kd_admission_add_releasers (KdAdmission *self,
                            guint        n_releasers)
{
  kd_slots_grow (&self->releasers, n_releasers);
}

void
kd_admission_init (KdAdmission *self,
                   guint        capacity,
                   guint        n_releasers)
{
  self->grant = 0;
  self->released_view = 0;
  self->flags = 0;
  self->drain_claimed = FALSE;
  kd_slots_init (&self->releasers, sizeof (KdReleaser));
  memset (&self->shared, 0, sizeof self->shared);
  kd_admission_add_releasers (self, n_releasers);
  self->n_sleeping = 0;
  self->n_watching = 0;
  self->sealed_seq = 0;
  self->drained_seq = 0;
  self->drain_waiters = NULL;
  self->notify = NULL;
  self->acquired_at_seal = 0;
  memset (self->epoch_jobs, 0, sizeof self->epoch_jobs);
  memset (self->epoch_base, 0, sizeof self->epoch_base);
  kd_admission_set_capacity (self, capacity);
  g_mutex_init (&self->lock);
  g_cond_init (&self->room_cond);
  g_cond_init (&self->drained_cond);
  g_cond_init (&self->sleepers_cond);
}

void
kd_admission_clear (KdAdmission *self)
{
  g_assert_cmpuint (pending_at_most (self), ==, 0);
  g_assert_cmpuint (self->n_sleeping, ==, 0);
  g_assert (self->drain_waiters == NULL && self->notify == NULL);

  kd_slots_clear (&self->releasers);
  g_mutex_clear (&self->lock);
  g_cond_clear (&self->room_cond);
  g_cond_clear (&self->drained_cond);
  g_cond_clear (&self->sleepers_cond);
}

/* Room by the freshest count, with @lock held or not. */
static gboolean
has_room (KdAdmission *self,
          guint64      grant)
{
  return (grant & CLOSED_BIT) ||
         pending_by (acquired_of (grant), refresh_view (self)) < self->capacity;
}

/* With @lock held: n_sleeping changed, which kd_admission_wait_sleepers()
 * may be waiting to see. Only then a broadcast: it is a system call. */
static inline void
announce_sleepers_locked (KdAdmission *self)
{
  if (self->n_watching > 0)
    g_cond_broadcast (&self->sleepers_cond);
}

/* Sleeps until there is room or CLOSED, or @deadline (monotonic, 0 for none)
 * passed. Returns FALSE if the deadline passed first. */
static gboolean
sleep_until_room (KdAdmission *self,
                  gint64       deadline)
{
  gint64 recheck_us = KD_ROOM_RECHECK_MIN_US;
  gboolean in_time = TRUE;

  kd_mutex_lock (&self->lock);
  self->n_sleeping++;
  announce_sleepers_locked (self);

  for (;;)
    {
      gint64 now;
      gint64 until;

      /* Announce first, then count again (see the DESIGN comment). */
      __atomic_fetch_or (&self->flags, FLAG_ROOM_WAITERS, __ATOMIC_SEQ_CST);
      if (has_room (self, load_grant (self)))
        break;

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
        recheck_us = MIN (recheck_us * 2, KD_ROOM_RECHECK_MAX_US);
    }

  self->n_sleeping--;
  if (self->n_sleeping == 0)
    __atomic_fetch_and (&self->flags, ~FLAG_ROOM_WAITERS, __ATOMIC_SEQ_CST);
  announce_sleepers_locked (self);
  kd_mutex_unlock (&self->lock);

  return in_time;
}

/* Takes between 1 and @want units in one compare-and-swap, as many as
 * there is room for, or refuses (see kd_admission_acquire()). Returns how
 * many it took: 0 when refused. Inlined into both callers, so the single
 * acquire pays nothing for the batch. */
G_ALWAYS_INLINE static inline guint
acquire_upto (KdAdmission  *self,
              KdAdmitMode   mode,
              gint64        deadline,
              guint         want,
              guint        *epoch,
              GError      **error)
{
  guint64 grant = __atomic_load_n (&self->grant, __ATOMIC_RELAXED);
  gboolean timed_out = FALSE;

  for (;;)
    {
      guint64 view, pending;

      if (grant & CLOSED_BIT)
        {
          g_set_error_literal (error, KD_ERROR, KD_ERROR_CLOSED,
                               "The dispatcher no longer accepts jobs");
          return 0;
        }

      view = __atomic_load_n (&self->released_view, __ATOMIC_RELAXED);
      pending = pending_by (acquired_of (grant), view);
      if (pending + want > self->capacity)
        pending = pending_by (acquired_of (grant), refresh_view (self));

      if (pending < self->capacity)
        {
          /* (A constant 1 for the single acquire, which then computes
           * nothing here.) */
          guint take = want == 1 ? 1 : (guint) MIN ((guint64) want, self->capacity - pending);

          if (__atomic_compare_exchange_n (&self->grant, &grant, grant + take, TRUE,
                                           __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
            {
              *epoch = slot_of (grant);
              return take;
            }
          continue;
        }

      if (mode == KD_ADMIT_TRY)
        {
          g_set_error (error, KD_ERROR, KD_ERROR_FULL,
                       "The dispatcher already holds %u pending jobs", self->capacity);
          return 0;
        }

      if (timed_out || (mode == KD_ADMIT_DEADLINE && g_get_monotonic_time () >= deadline))
        {
          g_set_error (error, KD_ERROR, KD_ERROR_TIMEOUT,
                       "The dispatcher still held %u pending jobs at the deadline",
                       self->capacity);
          return 0;
        }

      timed_out = !sleep_until_room (self, mode == KD_ADMIT_DEADLINE ? deadline : 0);
      grant = __atomic_load_n (&self->grant, __ATOMIC_RELAXED);
    }
}

/* kd_admission_acquire(), once its first look found no room by the view
 * it read, or found it closed, or lost the race for the unit. */
gboolean
kd_admission_acquire_slow (KdAdmission  *self,
                           KdAdmitMode   mode,
                           gint64        deadline,
                           guint        *epoch,
                           GError      **error)
{
  return acquire_upto (self, mode, deadline, 1, epoch, error) == 1;
}

/*
 * kd_admission_acquire_many:
 * @want: at least 1
 * @epoch: (out): the slot of the epoch every unit taken joined
 *
 * Like kd_admission_acquire(), but takes up to @want units at once: as many
 * as there is room for, waiting (as @mode says) only while there is none.
 * Returns how many it took, 0 if it refused; each unit is released on its
 * own.
 */
guint
kd_admission_acquire_many (KdAdmission  *self,
                           KdAdmitMode   mode,
                           gint64        deadline,
                           guint         want,
                           guint        *epoch,
                           GError      **error)
{
  g_assert (want > 0);

  return acquire_upto (self, mode, deadline, want, epoch, error);
}

/* The epoch numbered @seq has drained. With @lock held, so the epoch's
 * numbers are complete. */
static gboolean
epoch_has_drained_locked (KdAdmission *self,
                          guint64      seq)
{
  guint slot = seq % KD_ADMISSION_EPOCHS;

  return sum_released_in (self, slot) - self->epoch_base[slot] == self->epoch_jobs[slot];
}

static guint64 seal_locked (KdAdmission *self);

/* With @lock held, after drained_seq moved: the async waiters whose epoch
 * drained move to @notify, for unlock_and_notify(). The waiters that found
 * the ring full wait for the current epoch: it is sealed once for all of
 * them if the ring has room now. Returns whether it sealed it (it may have
 * drained already). */
static gboolean
collect_drained_locked (KdAdmission *self)
{
  KdDrainWaiter **link;
  gboolean sealed = FALSE;

  if (self->sealed_seq + 1 - self->drained_seq < KD_ADMISSION_EPOCHS)
    for (link = &self->drain_waiters; *link != NULL && !sealed; link = &(*link)->next)
      if ((*link)->seq == self->sealed_seq)
        {
          seal_locked (self);
          sealed = TRUE;
        }

  link = &self->drain_waiters;
  while (*link != NULL)
    {
      KdDrainWaiter *waiter = *link;

      if (waiter->seq < self->drained_seq)
        {
          *link = waiter->next;
          waiter->next = self->notify;
          self->notify = waiter;
        }
      else
        {
          link = &waiter->next;
        }
    }

  return sealed;
}

/* Unlocks @lock, then calls the functions of the async waiters whose epoch
 * drained. */
static void
unlock_and_notify (KdAdmission *self)
{
  KdDrainWaiter *waiter = g_steal_pointer (&self->notify);

  kd_mutex_unlock (&self->lock);

  while (waiter != NULL)
    {
      KdDrainWaiter *next = waiter->next;

      waiter->func (waiter->user_data);
      waiter = next;
    }
}

/* Moves drained_seq past every sealed epoch that has drained, oldest first,
 * and wakes the waiters if it moved. Whoever moves it must wake them: once
 * an epoch drained, a sealer may reuse its slot at once, and the release
 * that drained it then no longer sees its slot as sealed. */
static void
advance_drained_locked (KdAdmission *self)
{
  guint64 before = self->drained_seq;

  do
    while (self->drained_seq < self->sealed_seq &&
           epoch_has_drained_locked (self, self->drained_seq))
      self->drained_seq++;
  while (self->drained_seq != before && self->drain_waiters != NULL &&
         collect_drained_locked (self));

  if (self->drained_seq == before)
    return;

  g_cond_broadcast (&self->drained_cond);
  /* Every sealed epoch drained: nobody waits, releases stop looking. (A
   * waiter still sleeping waits for an epoch not sealed yet, which it
   * seals, and announces itself again, under this lock.) */
  if (self->drained_seq == self->sealed_seq)
    __atomic_fetch_and (&self->flags, ~FLAG_DRAIN_WAITERS, __ATOMIC_SEQ_CST);
}

/* Wakes the submitters asleep for room, and takes ROOM_WAITERS down
 * until one of them sleeps again (it sets the flag before it counts
 * again): the releases in between, which would all find the same room,
 * need not wake anybody. Under @lock, where sleepers announce
 * themselves, so none is missed. (Each broadcast is a system call: while
 * a woken submitter was on its way, the other workers' releases made
 * 17 of them per sleep, kd-bench W1.) */
static void
wake_room_sleepers (KdAdmission *self)
{
  kd_mutex_lock (&self->lock);
  if (load_flags (self) & FLAG_ROOM_WAITERS)
    {
      __atomic_fetch_and (&self->flags, ~FLAG_ROOM_WAITERS, __ATOMIC_SEQ_CST);
      g_cond_broadcast (&self->room_cond);
    }
  kd_mutex_unlock (&self->lock);
}

/* A release found someone waiting: wake what it may concern. */
static gboolean
release_slow (KdAdmission *self,
              KdReleaser  *releaser,
              guint        epoch,
              gint         flags)
{
  gboolean drained = FALSE;

  if (flags & FLAG_DRAIN_WAITERS)
    {
      /* Only a unit of a sealed epoch can end one. (If its slot is current
       * again, the epoch already drained and a sealer reused the slot.) */
      if (slot_of (load_grant (self)) != epoch)
        {
          kd_mutex_lock (&self->lock);
          advance_drained_locked (self);
          unlock_and_notify (self);
        }
    }

  if (flags & FLAG_ROOM_WAITERS)
    {
      guint share = MAX (1, self->slack / (kd_slots_length (&self->releasers) + 1));
      gboolean shared = releaser == &self->shared;

      /* A releaser of its own looks at the room now and then, not on every
       * release: adding up the releasers reads every worker's line. The
       * shared one, used by any thread, looks every time. */
      if (shared || ++releaser->since_room_check >= share)
        {
          if (!shared)
            releaser->since_room_check = 0;
          if (self->capacity - MIN (pending_at_most (self), self->capacity) >= self->slack)
            wake_room_sleepers (self);
        }
    }

  if ((flags & FLAG_CLOSED) && pending_at_most (self) == 0)
    drained = g_atomic_int_compare_and_exchange (&self->drain_claimed, FALSE, TRUE);

  return drained;
}

/*
 * kd_admission_release:
 * @releaser: the releaser's number, or KD_ADMISSION_ANY_RELEASER
 *
 * Ends one unit of @epoch. Returns TRUE exactly once in the admission's
 * life: when this release leaves it closed with nothing pending.
 */
gboolean
kd_admission_release (KdAdmission *self,
                      guint        releaser,
                      guint        epoch)
{
  KdReleaser *mine;
  gint flags;

  if (releaser < kd_slots_length (&self->releasers))
    {
      mine = releaser_at (self, releaser);
      /* Only this releaser writes its counters: a load and a store, no
       * read-modify-write. The stores are sequentially consistent, so that
       * the flags read below is ordered after them (the Dekker pattern).
       * The total first, then the epoch's: a waiter that saw its epoch
       * drained (kd_admission_wait) must also see the unit gone from the
       * pending count, or kd_dispatcher_wait() finds the closed dispatcher
       * still pending and returns without joining its workers. */
      __atomic_store_n (&mine->released, mine->released + 1, __ATOMIC_SEQ_CST);
      __atomic_store_n (&mine->released_in[epoch], mine->released_in[epoch] + 1,
                        __ATOMIC_SEQ_CST);
    }
  else
    {
      mine = &self->shared;
      __atomic_fetch_add (&mine->released, 1, __ATOMIC_SEQ_CST);
      __atomic_fetch_add (&mine->released_in[epoch], 1, __ATOMIC_SEQ_CST);
    }

  flags = load_flags (self);
  if (G_LIKELY (flags == 0))
    return FALSE;

  return release_slow (self, mine, epoch, flags);
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
  guint64 old = __atomic_fetch_or (&self->grant, CLOSED_BIT, __ATOMIC_SEQ_CST);

  if (old & CLOSED_BIT)
    return FALSE;

  __atomic_fetch_or (&self->flags, FLAG_CLOSED, __ATOMIC_SEQ_CST);

  kd_mutex_lock (&self->lock);
  g_cond_broadcast (&self->room_cond);
  kd_mutex_unlock (&self->lock);

  return pending_at_most (self) == 0 &&
         g_atomic_int_compare_and_exchange (&self->drain_claimed, FALSE, TRUE);
}

gboolean
kd_admission_is_closed (KdAdmission *self)
{
  return (load_grant (self) & CLOSED_BIT) != 0;
}

guint
kd_admission_get_pending (KdAdmission *self)
{
  return (guint) pending_at_most (self);
}

/* Sleeps on @drained_cond until @done holds, or @end_time (0: never)
 * passed; called with @lock held. Returns whether @done holds. */
static gboolean
sleep_until_drained_locked (KdAdmission *self,
                            gboolean   (*done) (KdAdmission *self, guint64 seq),
                            guint64      seq,
                            gint64       end_time)
{
  for (;;)
    {
      advance_drained_locked (self);
      if (done (self, seq))
        return TRUE;

      /* Announce first, then look again: a release that emptied an epoch
       * in between saw no flag, but its count is visible now. */
      __atomic_fetch_or (&self->flags, FLAG_DRAIN_WAITERS, __ATOMIC_SEQ_CST);
      advance_drained_locked (self);
      if (done (self, seq))
        return TRUE;

      if (end_time == 0)
        kd_cond_wait (&self->drained_cond, &self->lock);
      else if (!kd_cond_wait_until (&self->drained_cond, &self->lock, end_time) &&
               g_get_monotonic_time () >= end_time)
        return done (self, seq);
    }
}

/* The epoch @seq has been sealed, or can be: the slot after it is free. */
static gboolean
sealed_or_room (KdAdmission *self,
                guint64      seq)
{
  return self->sealed_seq > seq || self->sealed_seq + 1 - self->drained_seq < KD_ADMISSION_EPOCHS;
}

/* The epoch @seq and every older one have drained. */
static gboolean
epoch_drained (KdAdmission *self,
               guint64      seq)
{
  return self->drained_seq > seq;
}

/* With @lock held and room in the ring: seals the current epoch, whose
 * number it returns, and makes the next one current. The next epoch reuses
 * a slot, whose old epoch has drained: its release count is the new
 * epoch's base. No unit can join the new epoch before the seal makes it
 * current. */
static guint64
seal_locked (KdAdmission *self)
{
  guint64 seq = self->sealed_seq;
  guint next_slot = (seq + 1) % KD_ADMISSION_EPOCHS;
  guint64 grant;

  self->epoch_base[next_slot] = sum_released_in (self, next_slot);

  grant = __atomic_load_n (&self->grant, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n (&self->grant, &grant,
                                       (grant & ~SLOT_MASK) | ((guint64) next_slot << SLOT_SHIFT),
                                       TRUE, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
    ;
  g_assert (slot_of (grant) == seq % KD_ADMISSION_EPOCHS);

  self->epoch_jobs[seq % KD_ADMISSION_EPOCHS] = acquired_of (grant) - self->acquired_at_seal;
  self->acquired_at_seal = acquired_of (grant);
  self->sealed_seq++;

  return seq;
}

/*
 * kd_admission_wait_until:
 * @sealed: (nullable): called once the epoch is sealed, before sleeping
 * @end_time: a g_get_monotonic_time() to give up at; 0 for never
 *
 * Returns TRUE once every unit acquired before the call has been released,
 * FALSE if @end_time came first (@sealed may not have been called then).
 */
gboolean
kd_admission_wait_until (KdAdmission  *self,
                         KdSealedFunc  sealed,
                         gpointer      user_data,
                         gint64        end_time)
{
  gboolean drained = FALSE;
  guint64 seq;

  /* The units acquired before the call are in the current epoch, @seq:
   * whoever seals it after the call seals them all. With the ring full,
   * wait until someone did, or the ring has room for this call to. */
  kd_mutex_lock (&self->lock);
  seq = self->sealed_seq;
  if (sleep_until_drained_locked (self, sealed_or_room, seq, end_time))
    {
      if (self->sealed_seq == seq)
        seal_locked (self);
      unlock_and_notify (self);

      if (sealed != NULL)
        sealed (user_data);

      kd_mutex_lock (&self->lock);
      drained = sleep_until_drained_locked (self, epoch_drained, seq, end_time);
    }
  unlock_and_notify (self);

  return drained;
}

/*
 * kd_admission_wait:
 * @sealed: (nullable): called once the epoch is sealed, before sleeping
 *
 * Returns once every unit acquired before the call has been released.
 */
void
kd_admission_wait (KdAdmission  *self,
                   KdSealedFunc  sealed,
                   gpointer      user_data)
{
  kd_admission_wait_until (self, sealed, user_data, 0);
}

/*
 * kd_admission_wait_async:
 * @waiter: the caller's, with its @func and @user_data set; it stays the
 *   caller's
 *
 * Registers @waiter to be called once every unit acquired before the call
 * has been released, without waiting. Returns FALSE, with nothing
 * registered, if they have been already. Otherwise @waiter->func runs once
 * later, on whichever thread sees the epoch drain (a releasing one), with
 * no lock held; @waiter must live until then.
 * With KD_ADMISSION_EPOCHS - 1 epochs sealed and not yet drained, its
 * epoch is sealed once the oldest drained (or by another waiter's seal),
 * and then also holds the units acquired meanwhile.
 */
gboolean
kd_admission_wait_async (KdAdmission   *self,
                         KdDrainWaiter *waiter)
{
  gboolean registered = TRUE;

  kd_mutex_lock (&self->lock);
  /* The current epoch, as for kd_admission_wait_until(): sealed now, or
   * by collect_drained_locked() once the ring has room. */
  waiter->seq = self->sealed_seq;
  if (sealed_or_room (self, waiter->seq))
    seal_locked (self);
  waiter->next = self->drain_waiters;
  self->drain_waiters = waiter;
  /* Announce first, then look again (see sleep_until_drained_locked()). */
  __atomic_fetch_or (&self->flags, FLAG_DRAIN_WAITERS, __ATOMIC_SEQ_CST);
  advance_drained_locked (self);

  /* Drained already: not for a release to report. */
  if (waiter->seq < self->drained_seq)
    {
      KdDrainWaiter **link = &self->notify;

      while (*link != waiter)
        link = &(*link)->next;
      *link = waiter->next;
      registered = FALSE;
    }
  unlock_and_notify (self);

  return registered;
}

/* Sleeps until at least @n_sleeping submitters are asleep waiting for room.
 * Lets tests observe that a submit really blocks, without sleeping. */
void
kd_admission_wait_sleepers (KdAdmission *self,
                            guint        n_sleeping)
{
  kd_mutex_lock (&self->lock);
  self->n_watching++;
  while (self->n_sleeping < n_sleeping)
    kd_cond_wait (&self->sleepers_cond, &self->lock);
  self->n_watching--;
  kd_mutex_unlock (&self->lock);
}
