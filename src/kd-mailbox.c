/* kd-mailbox.c: a key's queue of jobs
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A mailbox is the per-key "worker" of the actor model without a thread of
 * its own: the key's jobs in submission order (an intrusive list through
 * each job's task link, so queueing a job allocates nothing), plus the task
 * header by which the scheduler runs it. A mailbox is the key's actor only
 * while its key has work: the key table (KdKeyTable) creates it at the
 * key's first job and reaps it when it runs empty. The table keeps a
 * bounded number of reaped mailboxes dormant, for the next job of their
 * key, and, with an idle time, a bounded number idle with their key state;
 * it recycles the others, so memory follows the keys with work, not the
 * keys ever seen.
 *
 * Threads: the job list is protected by the lock of the key-table shard that
 * holds the mailbox. Producers append under it; only the worker that runs
 * the mailbox pops, so the key's jobs run one at a time and in order; and
 * emptiness is decided under the same lock, so no job can slip in unseen.
 * The job that made the mailbox ready waits in @first instead, when it was
 * alone: its runner takes it without the lock, before anything else, so
 * every other look at the list (the reaping, a drop, an unpark) comes
 * after @first was taken.
 *
 * The reference count covers the key table's reference and one per job
 * whose done callback still waits for a main context: the key string must
 * outlive the mailbox's place in the table.
 */

#include "config.h"

#include <string.h>

#include "kd-mailbox-private.h"

KdMailbox *
kd_mailbox_new (void)
{
  KdMailbox *self = g_new0 (KdMailbox, 1);

  self->task.kind = KD_TASK_MAILBOX;
  return self;
}

/* Gives a new or recycled mailbox its key (copied) and its one reference. */
void
kd_mailbox_set_key (KdMailbox   *self,
                    const KdKey *key)
{
  char *buffer = self->inline_key;

  if (key->length >= KD_MAILBOX_INLINE_KEY)
    {
      if (self->heap_size <= key->length)
        {
          g_free (self->heap_key);
          self->heap_size = key->length + 1;
          self->heap_key = g_malloc (self->heap_size);
        }
      buffer = self->heap_key;
    }
  memcpy (buffer, key->string, key->length + 1);

  self->key.hash = key->hash;
  self->key.length = key->length;
  self->key.string = buffer;
  self->task.next = NULL;
  self->head = NULL;
  self->tail = NULL;
  self->dormant = FALSE;
  self->carries_unit = FALSE;
  self->dormant_link = (KdLruLink) { NULL, NULL };
  self->ref_count = 1;
}

KdMailbox *
kd_mailbox_ref (KdMailbox *self)
{
  g_atomic_int_inc (&self->ref_count);
  return self;
}

/* Drops a reference; TRUE if it was the last, and the caller now owns the
 * memory (to recycle or free). */
gboolean
kd_mailbox_drop (KdMailbox *self)
{
  return g_atomic_int_dec_and_test (&self->ref_count);
}

void
kd_mailbox_unref (KdMailbox *self)
{
  if (kd_mailbox_drop (self))
    kd_mailbox_free (self);
}

void
kd_mailbox_free (KdMailbox *self)
{
  g_assert (self->head == NULL && self->first == NULL);
  g_free (self->heap_key);
  g_free (self);
}
