/* kd-mailbox.c: a key's queue of jobs
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A mailbox is the per-key "worker" of the actor model without a thread of
 * its own: a GAsyncQueue of the key's jobs in submission order, plus the
 * task header by which the scheduler runs it. A mailbox exists only while
 * its key has work (the dispatcher creates it at the key's first job and
 * reaps it when it runs empty), so memory follows the keys with work, not
 * the keys ever seen.
 *
 * Threads: producers push (the dispatcher's key lock orders them); only the
 * worker that currently runs the mailbox pops, so the key's jobs run one at
 * a time and in order. Emptiness is decided under the dispatcher's key
 * lock, which producers hold while pushing.
 *
 * The reference count covers the key table's reference and one per job
 * whose done callback still waits for a main context: the key string must
 * outlive the mailbox's place in the table.
 */

#include "config.h"

#include <string.h>

#include "kd-mailbox-private.h"
#include "kd-sync-private.h"

struct _KdMailbox
{
  KdTask       task;        /* first: the scheduler's link */
  GAsyncQueue *jobs;        /* KdJob *, oldest first */
  gint         ref_count;   /* atomic */
  char         key[];       /* NUL-terminated copy of the key */
};

KdMailbox *
kd_mailbox_new (const char *key)
{
  gsize key_size = strlen (key) + 1;
  KdMailbox *self = g_malloc (sizeof (KdMailbox) + key_size);

  self->task.next = NULL;
  self->task.kind = KD_TASK_MAILBOX;
  self->jobs = g_async_queue_new ();
  self->ref_count = 1;
  memcpy (self->key, key, key_size);

  return self;
}

KdMailbox *
kd_mailbox_ref (KdMailbox *self)
{
  g_atomic_int_inc (&self->ref_count);
  return self;
}

void
kd_mailbox_unref (KdMailbox *self)
{
  if (g_atomic_int_dec_and_test (&self->ref_count))
    {
      g_assert (g_async_queue_length (self->jobs) == 0);
      g_async_queue_unref (self->jobs);
      g_free (self);
    }
}

KdTask *
kd_mailbox_get_task (KdMailbox *self)
{
  return &self->task;
}

/* NULL if @task is not a mailbox. */
KdMailbox *
kd_mailbox_from_task (KdTask *task)
{
  return task->kind == KD_TASK_MAILBOX ? (KdMailbox *) task : NULL;
}

const char *
kd_mailbox_get_key (KdMailbox *self)
{
  return self->key;
}

void
kd_mailbox_push (KdMailbox *self,
                 KdJob     *job)
{
  kd_tsan_release (job);
  g_async_queue_push (self->jobs, job);
}

/* By the mailbox's runner only: takes up to @max_jobs of the oldest jobs. */
guint
kd_mailbox_pop_batch (KdMailbox  *self,
                      KdJob     **jobs,
                      guint       max_jobs)
{
  guint n = 0;

  g_async_queue_lock (self->jobs);
  while (n < max_jobs)
    {
      KdJob *job = g_async_queue_try_pop_unlocked (self->jobs);

      if (job == NULL)
        break;
      kd_tsan_acquire (job);
      jobs[n++] = job;
    }
  g_async_queue_unlock (self->jobs);

  return n;
}

gboolean
kd_mailbox_is_empty (KdMailbox *self)
{
  return g_async_queue_length (self->jobs) <= 0;
}
