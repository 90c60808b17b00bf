/* kd-admission-private.h: the admission bound, closing and the wait barrier
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

#include "kd-slots-private.h"

G_BEGIN_DECLS

/* The largest bound the admission counts. */
#define KD_ADMISSION_CAPACITY_MAX ((guint) G_MAXINT)

/* Epochs the wait barrier tracks at once (see kd-admission.c). */
#define KD_ADMISSION_EPOCHS 32

/* Releases by a thread that is not one of the releasers the admission was
 * made for. */
#define KD_ADMISSION_ANY_RELEASER G_MAXUINT

typedef enum
{
  KD_ADMIT_TRY,       /* fail with KD_ERROR_FULL at once */
  KD_ADMIT_BLOCK,     /* sleep until there is room */
  KD_ADMIT_DEADLINE,  /* sleep until there is room or the deadline passed */
} KdAdmitMode;

/* One releaser's counts, written only by that releaser (the shared one
 * with atomic additions). */
typedef struct
{
  guint64 released;                            /* units it released */
  guint64 released_in[KD_ADMISSION_EPOCHS];    /* the same, by epoch slot */
  guint   since_room_check;                    /* owner only */
} __attribute__ ((aligned (64))) KdReleaser;

typedef struct _KdAdmission KdAdmission;

typedef void (*KdDrainedFunc) (gpointer user_data);

/* An async barrier waiter (kd_admission_wait_async()): the caller's
 * memory, linked into the admission while registered. */
typedef struct _KdDrainWaiter KdDrainWaiter;

struct _KdDrainWaiter
{
  KdDrainWaiter *next;
  guint64        seq;        /* its epoch: the one current at its call */
  KdDrainedFunc  func;
  gpointer       user_data;
};

/* The grant word: 56 bits of acquired count (2^56 jobs is 22 years at 100
 * million a second, so the count never carries into the slot bits), the
 * current epoch's slot, and CLOSED. */
#define ACQUIRED_MASK  ((G_GUINT64_CONSTANT (1) << 56) - 1)
#define SLOT_SHIFT     56
#define SLOT_MASK      (G_GUINT64_CONSTANT (KD_ADMISSION_EPOCHS - 1) << SLOT_SHIFT)
#define CLOSED_BIT     (G_GUINT64_CONSTANT (1) << 61)

struct _KdAdmission
{
  /* Atomic, written by acquirers and close: the acquired count, the current
   * epoch's slot and CLOSED (see kd-admission.c) */
  guint64     grant __attribute__ ((aligned (64)));
  /* Atomic: a recent lower bound of all releases, refreshed by acquirers */
  guint64     released_view;

  /* Atomic, read on every release, written only when someone starts or
   * stops waiting: ROOM_WAITERS, DRAIN_WAITERS, CLOSED */
  gint        flags __attribute__ ((aligned (64)));

  /* Set before the first acquire, read-only afterwards */
  guint       capacity;
  guint       slack;         /* free units that make a release wake submitters */
  KdSlots     releasers;     /* KdReleaser, each a worker's; grows at run time */
  KdReleaser  shared;        /* any other thread's */

  gint        drain_claimed; /* atomic: the drain was reported */

  /* Protected by @lock */
  GMutex      lock;
  GCond       room_cond;     /* submitters waiting for room */
  GCond       drained_cond;  /* barrier waiters, for epochs to drain */
  GCond       sleepers_cond; /* signalled when n_sleeping changes */
  guint       n_sleeping;    /* submitters asleep in room_cond */
  guint       n_watching;    /* callers of kd_admission_wait_sleepers() */
  guint64     sealed_seq;    /* epochs sealed so far; the current one has this number */
  guint64     drained_seq;   /* every epoch numbered below it has drained */
  guint64     acquired_at_seal;                      /* grant's count at the last seal */
  guint64     epoch_jobs[KD_ADMISSION_EPOCHS];      /* units acquired in each sealed epoch */
  guint64     epoch_base[KD_ADMISSION_EPOCHS];      /* each slot's releases before its epoch */
  KdDrainWaiter *drain_waiters;  /* the async waiters whose epoch has not drained */
  KdDrainWaiter *notify;         /* those whose epoch drained, to call once unlocked */
};

typedef void (*KdSealedFunc) (gpointer user_data);

void     kd_admission_init           (KdAdmission  *self,
                                      guint         capacity,
                                      guint         n_releasers);
void     kd_admission_set_capacity   (KdAdmission  *self,
                                      guint         capacity);
void     kd_admission_add_releasers  (KdAdmission  *self,
                                      guint         n_releasers);
void     kd_admission_clear          (KdAdmission  *self);
gboolean kd_admission_acquire_slow   (KdAdmission  *self,
                                      KdAdmitMode   mode,
                                      gint64        deadline,
                                      guint        *epoch,
                                      GError      **error);
guint    kd_admission_acquire_many   (KdAdmission  *self,
                                      KdAdmitMode   mode,
                                      gint64        deadline,
                                      guint         want,
                                      guint        *epoch,
                                      GError      **error);
gboolean kd_admission_release        (KdAdmission  *self,
                                      guint         releaser,
                                      guint         epoch);
gboolean kd_admission_close          (KdAdmission  *self);
gboolean kd_admission_is_closed      (KdAdmission  *self);
guint    kd_admission_get_pending    (KdAdmission  *self);
void     kd_admission_wait           (KdAdmission  *self,
                                      KdSealedFunc  sealed,
                                      gpointer      user_data);
gboolean kd_admission_wait_until     (KdAdmission  *self,
                                      KdSealedFunc  sealed,
                                      gpointer      user_data,
                                      gint64        end_time);
gboolean kd_admission_wait_async     (KdAdmission   *self,
                                      KdDrainWaiter *waiter);
void     kd_admission_wait_sleepers  (KdAdmission  *self,
                                      guint         n_sleeping);

static inline guint64
acquired_of (guint64 grant)
{
  return grant & ACQUIRED_MASK;
}

static inline guint
slot_of (guint64 grant)
{
  return (guint) ((grant & SLOT_MASK) >> SLOT_SHIFT);
}

/* Pending units by an acquired count and a release count read at different
 * moments: a stale acquired count can be below releases of units acquired
 * since, which must read as no units, not as a huge number. */
static inline guint64
pending_by (guint64 acquired,
            guint64 released)
{
  return acquired > released ? acquired - released : 0;
}

/*
 * kd_admission_acquire:
 * @epoch: (out): the slot of the epoch the unit joined; pass it to release
 *
 * Accepts one unit, or refuses: KD_ERROR_CLOSED when closed (even if also
 * full), KD_ERROR_FULL for KD_ADMIT_TRY, KD_ERROR_TIMEOUT when @deadline
 * (monotonic time) passed with the bound still reached. Inlined: on every
 * submit, the first look (open, and room by the last view of the releases)
 * and the unit's compare-and-swap are all it does.
 */
static inline gboolean
kd_admission_acquire (KdAdmission  *self,
                      KdAdmitMode   mode,
                      gint64        deadline,
                      guint        *epoch,
                      GError      **error)
{
  guint64 grant = __atomic_load_n (&self->grant, __ATOMIC_RELAXED);
  guint64 view = __atomic_load_n (&self->released_view, __ATOMIC_RELAXED);

  if (G_LIKELY (!(grant & CLOSED_BIT) &&
                pending_by (acquired_of (grant), view) < self->capacity &&
                __atomic_compare_exchange_n (&self->grant, &grant, grant + 1, FALSE,
                                             __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)))
    {
      *epoch = slot_of (grant);
      return TRUE;
    }
  return kd_admission_acquire_slow (self, mode, deadline, epoch, error);
}

G_END_DECLS
