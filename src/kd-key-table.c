/* kd-key-table.c: the sharded table of keys with work
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * The key table maps each key that has work to its mailbox. It is split into
 * N_SHARDS shards, each a GHashTable with its own lock, chosen by the high
 * bits of the key's hash, so that a producer submitting to one key and a
 * worker reaping another rarely meet on a lock. A key is hashed once per
 * submit (kd_key_hash()); the mailbox keeps the hash, so inserting and
 * removing it never hash the key again.
 *
 * A shard's lock protects its table, its count, its spare mailboxes and the
 * job lists of its mailboxes. The life of a mailbox:
 *
 *  - kd_key_table_push(), by a producer: finds the key's mailbox or makes one
 *    (a spare if the shard has one) and appends the job. A new mailbox is
 *    returned, and the caller hands it to the scheduler: a mailbox in the
 *    table is always scheduled or running.
 *  - kd_key_table_pop(), by the worker that took the mailbox from the
 *    scheduler: the first batch of its jobs.
 *  - kd_key_table_next(), by that worker after each batch, in one locked
 *    step: if the mailbox ran empty it leaves the table (reaped), else the
 *    next batch is taken. Reaping happens before the worker releases the
 *    last job's admission, so once wait() returns no mailbox of the jobs it
 *    waited for is left in the table.
 *
 * A reaped mailbox whose last reference was the table's goes to the shard's
 * spares (at most SPARES_MAX), key buffer included, for the next new key; if
 * a main context still holds it for a delivery, the delivery frees it.
 */

#include "config.h"

#include <string.h>

#include "kd-key-table-private.h"
#include "kd-sync-private.h"

#define SHARD_BITS 5
#define N_SHARDS   (1u << SHARD_BITS)
#define SPARES_MAX 16

typedef struct
{
  GMutex      lock;
  GHashTable *table;     /* KdKey * (inside its mailbox) → KdMailbox * */
  KdMailbox  *spares;    /* linked through task.next */
  guint       n_spares;
  guint       count;     /* the table's size; written under @lock, read atomically */
} __attribute__ ((aligned (64))) Shard;

struct _KdKeyTable
{
  Shard shards[N_SHARDS];
};

static guint
key_hash (gconstpointer key)
{
  return ((const KdKey *) key)->hash;
}

static gboolean
key_equal (gconstpointer a,
           gconstpointer b)
{
  const KdKey *x = a;
  const KdKey *y = b;

  /* Byte strings: no collation, no UTF-8 validation. */
  return x->hash == y->hash && x->length == y->length &&
         memcmp (x->string, y->string, x->length) == 0;
}

static inline Shard *
shard_of (KdKeyTable *self,
          guint       hash)
{
  return &self->shards[hash >> (32 - SHARD_BITS)];
}

KdKeyTable *
kd_key_table_new (void)
{
  KdKeyTable *self = g_aligned_alloc0 (1, sizeof (KdKeyTable), G_ALIGNOF (KdKeyTable));
  guint i;

  for (i = 0; i < N_SHARDS; i++)
    {
      g_mutex_init (&self->shards[i].lock);
      self->shards[i].table = g_hash_table_new (key_hash, key_equal);
    }

  return self;
}

/* Once no job is left. */
void
kd_key_table_free (KdKeyTable *self)
{
  guint i;

  for (i = 0; i < N_SHARDS; i++)
    {
      Shard *shard = &self->shards[i];

      g_assert (g_hash_table_size (shard->table) == 0 && shard->count == 0);
      while (shard->spares != NULL)
        {
          KdMailbox *spare = shard->spares;

          shard->spares = (KdMailbox *) spare->task.next;
          kd_mailbox_free (spare);
        }
      g_hash_table_unref (shard->table);
      g_mutex_clear (&shard->lock);
    }
  g_aligned_free (self);
}

/*
 * kd_key_table_push:
 *
 * Appends @job to @key's mailbox (setting job->mailbox), creating the
 * mailbox if the key had no work. Returns the mailbox if it is new, for the
 * caller to schedule; NULL if it was already scheduled or running.
 */
KdMailbox *
kd_key_table_push (KdKeyTable *self,
                   const char *string,
                   KdJob      *job)
{
  KdMailbox *mailbox;
  gboolean fresh;
  KdKey key;
  Shard *shard;

  key.string = string;
  key.hash = kd_key_hash (string, &key.length);
  shard = shard_of (self, key.hash);

  kd_mutex_lock (&shard->lock);
  mailbox = g_hash_table_lookup (shard->table, &key);
  fresh = mailbox == NULL;
  if (fresh)
    {
      if (shard->spares != NULL)
        {
          mailbox = shard->spares;
          shard->spares = (KdMailbox *) mailbox->task.next;
          shard->n_spares--;
        }
      else
        {
          mailbox = kd_mailbox_new ();
        }
      kd_mailbox_set_key (mailbox, &key);
      g_hash_table_insert (shard->table, &mailbox->key, mailbox);
      __atomic_store_n (&shard->count, shard->count + 1, __ATOMIC_RELEASE);
    }
  job->mailbox = mailbox;
  kd_mailbox_push_locked (mailbox, job);
  kd_mutex_unlock (&shard->lock);

  return fresh ? mailbox : NULL;
}

/* By the mailbox's runner: its first batch, never empty. */
guint
kd_key_table_pop (KdKeyTable  *self,
                  KdMailbox   *mailbox,
                  KdJob      **jobs,
                  guint        max_jobs)
{
  Shard *shard = shard_of (self, mailbox->key.hash);
  guint n;

  kd_mutex_lock (&shard->lock);
  n = kd_mailbox_pop_locked (mailbox, jobs, max_jobs);
  kd_mutex_unlock (&shard->lock);

  g_assert (n > 0);
  return n;
}

/*
 * kd_key_table_next:
 * @reaped: (out): set if the mailbox ran empty and left the table
 *
 * By the mailbox's runner after a batch: reaps the mailbox if it ran empty,
 * or takes up to @max_jobs more of its jobs. Returns how many; 0 with
 * *reaped unset means the mailbox still has work the runner did not take
 * (@max_jobs was 0), and the runner must schedule it again.
 */
guint
kd_key_table_next (KdKeyTable  *self,
                   KdMailbox   *mailbox,
                   KdJob      **jobs,
                   guint        max_jobs,
                   gboolean    *reaped)
{
  Shard *shard = shard_of (self, mailbox->key.hash);
  KdMailbox *to_free = NULL;
  guint n = 0;

  kd_mutex_lock (&shard->lock);
  *reaped = kd_mailbox_is_empty_locked (mailbox);
  if (*reaped)
    {
      g_hash_table_remove (shard->table, &mailbox->key);
      __atomic_store_n (&shard->count, shard->count - 1, __ATOMIC_RELEASE);

      /* If the table held the last reference, keep the mailbox as a spare;
       * if a delivery still holds it, the delivery frees it. */
      if (kd_mailbox_drop (mailbox))
        {
          if (shard->n_spares < SPARES_MAX)
            {
              mailbox->task.next = &shard->spares->task;
              shard->spares = mailbox;
              shard->n_spares++;
            }
          else
            {
              to_free = mailbox;
            }
        }
    }
  else
    {
      n = kd_mailbox_pop_locked (mailbox, jobs, max_jobs);
    }
  kd_mutex_unlock (&shard->lock);

  if (to_free != NULL)
    kd_mailbox_free (to_free);

  return n;
}

/* The number of mailboxes in the table; thread-safe. */
guint
kd_key_table_count (KdKeyTable *self)
{
  guint count = 0;
  guint i;

  for (i = 0; i < N_SHARDS; i++)
    count += __atomic_load_n (&self->shards[i].count, __ATOMIC_ACQUIRE);

  return count;
}
