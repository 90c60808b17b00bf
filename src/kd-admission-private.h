/* kd-admission-private.h: the admission bound, closing and the wait barrier
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

G_BEGIN_DECLS

/* The largest bound the admission word can count. */
#define KD_ADMISSION_CAPACITY_MAX ((1u << 28) - 1)

/* Epochs the wait barrier tracks at once (see kd-admission.c). */
#define KD_ADMISSION_EPOCHS 32

typedef enum
{
  KD_ADMIT_TRY,       /* fail with KD_ERROR_FULL at once */
  KD_ADMIT_BLOCK,     /* sleep until there is room */
  KD_ADMIT_DEADLINE,  /* sleep until there is room or the deadline passed */
} KdAdmitMode;

typedef struct _KdAdmission KdAdmission;

struct _KdAdmission
{
  /* Atomic: the counts, the current epoch's slot and the flag bits (see
   * kd-admission.c) */
  guint64 word;

  /* Atomic: jobs still pending per sealed epoch, by slot; briefly negative
   * while a sealer has not added its count yet */
  gint64  sealed_jobs[KD_ADMISSION_EPOCHS];

  /* Set before the first acquire, read-only afterwards */
  guint   capacity;
  guint   slack;          /* free units that make a release wake submitters */

  /* Protected by @lock */
  GMutex  lock;
  GCond   room_cond;      /* submitters waiting for room */
  GCond   drained_cond;   /* barrier waiters, for epochs to drain */
  GCond   sleepers_cond;  /* signalled when n_sleeping changes */
  guint   n_sleeping;     /* submitters asleep in room_cond */
  guint64 sealed_seq;     /* epochs sealed so far; the current one has this number */
  guint64 drained_seq;    /* every epoch numbered below it has drained */
};

typedef void (*KdSealedFunc) (gpointer user_data);

void     kd_admission_init           (KdAdmission  *self,
                                      guint         capacity);
void     kd_admission_set_capacity   (KdAdmission  *self,
                                      guint         capacity);
void     kd_admission_clear          (KdAdmission  *self);
gboolean kd_admission_acquire        (KdAdmission  *self,
                                      KdAdmitMode   mode,
                                      gint64        deadline,
                                      guint        *epoch,
                                      GError      **error);
gboolean kd_admission_release        (KdAdmission  *self,
                                      guint         epoch);
gboolean kd_admission_close          (KdAdmission  *self);
gboolean kd_admission_is_closed      (KdAdmission  *self);
guint    kd_admission_get_pending    (KdAdmission  *self);
void     kd_admission_wait           (KdAdmission  *self,
                                      KdSealedFunc  sealed,
                                      gpointer      user_data);
void     kd_admission_wait_sleepers  (KdAdmission  *self,
                                      guint         n_sleeping);

G_END_DECLS
