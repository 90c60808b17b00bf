/* kd-mailbox-private.h: a key's queue of jobs
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

#include "kd-job-private.h"
#include "kd-key-map-private.h"
#include "kd-lru-private.h"
#include "kd-task-private.h"

G_BEGIN_DECLS

/* Keys up to this many bytes (with the NUL) live inside the mailbox. */
#define KD_MAILBOX_INLINE_KEY 40

typedef struct _KdMailbox KdMailbox;

/* A parked key's state, and what was asked of it while its runner was
 * still ending the failed job (see kd-parked-keys.c). */
enum
{
  KD_PARK_NONE,
  KD_PARK_FINISHING,   /* state: parked, its runner ends the failed job */
  KD_PARK_PARKED,      /* state: parked, nobody runs it */
  KD_PARK_RESUME,      /* request */
  KD_PARK_DROP,        /* request */
};

struct _KdMailbox
{
  KdTask  task;        /* first: the scheduler's link */
  KdKey   key;         /* key.string points to inline_key or heap_key */

  /* Protected by the lock of the key-table shard that holds the mailbox */
  KdJob     *head;     /* oldest job, linked through task.next */
  KdJob     *tail;
  gboolean   dormant;  /* reaped, but kept in the table for reuse */
  gboolean   idle;     /* dormant with its key state kept (in the shard's
                        * idle list rather than its dormant list) */
  gint64     idle_since;  /* idle: when it was reaped */
  gboolean   expiring; /* its idle state is being freed (it is in neither
                        * list meanwhile): its runner waits */
  KdLruLink  dormant_link;  /* in the shard's dormant or idle list */

  /* The job that made the mailbox ready, when nothing else was queued:
   * set under the shard lock by the push that made it ready, taken by its
   * next runner without the lock (the scheduler's hand-off orders the two;
   * nobody else reads it) */
  KdJob     *first;

  /* The runner's only: the key's actor state, from the first job it ran
   * until it ran empty (freed before it is reaped, unless the dispatcher
   * has an idle time: then an idle mailbox keeps it, under the shard lock,
   * until it is revived or its idle time is over) */
  gpointer   state;
  gboolean   has_state;

  /* The unit of a deferred job returned while the mailbox waited for it
   * out of the scheduler: set by the return before it schedules the
   * mailbox, released by the next run (kd-dispatcher-defer.c) */
  gboolean   carries_unit;
  guint      carried_epoch;

  /* With a per-key bound: jobs queued or running (added under the shard
   * lock, taken away atomically by the runner) */
  guint      n_jobs;

  /* Under the parked-key table's lock: KD_PARK_* (kd-parked-keys.c) */
  guint8     park_state;
  guint8     park_request;

  /* Atomic: the key table's reference, and one per job still waiting for a
   * main context to deliver it (the key must outlive the table entry) */
  gint    ref_count;

  char   *heap_key;    /* a key too long for inline_key */
  gsize   heap_size;
  char    inline_key[KD_MAILBOX_INLINE_KEY];
};

KdMailbox *kd_mailbox_new         (void);
void       kd_mailbox_set_key     (KdMailbox  *self,
                                   const KdKey *key);
KdMailbox *kd_mailbox_ref         (KdMailbox  *self);
void       kd_mailbox_unref       (KdMailbox  *self);
gboolean   kd_mailbox_drop        (KdMailbox  *self);
void       kd_mailbox_free        (KdMailbox  *self);

/* The mailbox a scheduler task is, or NULL for a job. */
static inline KdMailbox *
kd_mailbox_from_task (KdTask *task)
{
  return task->kind == KD_TASK_MAILBOX ? (KdMailbox *) task : NULL;
}

static inline const char *
kd_mailbox_get_key (KdMailbox *self)
{
  return self->key.string;
}

static inline KdTask *
kd_mailbox_get_task (KdMailbox *self)
{
  return &self->task;
}

/* With the shard lock held. */
static inline void
kd_mailbox_push_locked (KdMailbox *self,
                        KdJob     *job)
{
  job->task.next = NULL;
  if (self->tail != NULL)
    self->tail->task.next = &job->task;
  else
    self->head = job;
  self->tail = job;
}

static inline gboolean
kd_mailbox_is_empty_locked (KdMailbox *self)
{
  return self->head == NULL;
}

/* With the shard lock held, by the mailbox's runner only: takes up to
 * @max_jobs of the oldest jobs. */
static inline guint
kd_mailbox_pop_locked (KdMailbox  *self,
                       KdJob     **jobs,
                       guint       max_jobs)
{
  guint n = 0;

  while (n < max_jobs && self->head != NULL)
    {
      KdJob *job = self->head;

      self->head = (KdJob *) job->task.next;
      jobs[n++] = job;
    }
  if (self->head == NULL)
    self->tail = NULL;

  return n;
}

G_END_DECLS
