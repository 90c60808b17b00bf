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
 * A shard's lock protects its table, its counts, its dormant and spare
 * mailboxes and the job lists of its mailboxes. The life of a mailbox:
 *
 *  - kd_key_table_push(), by a producer: finds the key's mailbox or makes one
 *    and appends the job. A mailbox that becomes active (new, or dormant
 *    until now) is returned, and the caller hands it to the scheduler: an
 *    active mailbox is always scheduled or running.
 *  - kd_key_table_pop(), by the worker that took the mailbox from the
 *    scheduler: the first batch of its jobs.
 *  - kd_key_table_next(), by that worker after each batch, in one locked
 *    step: if the mailbox ran empty it is reaped, else the next batch is
 *    taken. Reaping happens before the worker releases the last job's
 *    admission, so once wait() returns no key of the jobs it waited for is
 *    counted as live.
 *  - kd_key_table_put_back(), by the runner when a job will be retried or
 *    the key parks: the jobs it took and did not end go back to the head.
 *    The mailbox stays active, out of the scheduler, until the retry is due
 *    or the key is unparked; producers keep appending to it meanwhile.
 *  - kd_key_table_unpark(): whoever unparks a key reaps its mailbox if it is
 *    empty, or schedules it.
 *
 * Reaping a mailbox ends its life as the key's actor at once: it holds no
 * job, is no longer counted, and the next job of its key makes it active
 * again as if new. But it stays in the GHashTable, dormant, for that next
 * job: a key that comes and goes (a client sending one message at a time)
 * would otherwise cost a GHashTable insert and remove per job, and
 * GHashTable rehashes a small table to clear its tombstones every few such
 * pairs (measured: 41 % of the keyed path's instructions, and an
 * allocation per two jobs). Each shard keeps at most DORMANT_MAX dormant
 * mailboxes, evicting the oldest, so memory still follows the keys with
 * work, not the keys ever seen. An evicted mailbox goes to the shard's
 * spares (at most SPARES_MAX) for the next new key, or back to malloc; if a
 * main context still holds it for a delivery, the delivery frees it.
 */

#include "config.h"

#include "kd-key-table-private.h"
#include "kd-sync-private.h"

#define SHARD_BITS  5
#define N_SHARDS    (1u << SHARD_BITS)
#define DORMANT_MAX 64
#define SPARES_MAX  64

typedef struct
{
  GMutex      lock;
  GHashTable *table;     /* KdKey * (inside its mailbox) → KdMailbox *, active or dormant */
  KdLru       dormant;   /* dormant mailboxes, least recently used first */
  KdMailbox  *spares;    /* out of the table, linked through task.next */
  guint       n_spares;
  guint       count;     /* active mailboxes; written under @lock, read atomically */
} __attribute__ ((aligned (64))) Shard;

struct _KdKeyTable
{
  Shard shards[N_SHARDS];
};

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
      self->shards[i].table = g_hash_table_new (kd_key_hash_func, kd_key_equal_func);
    }

  return self;
}

static void
link_dormant_locked (Shard     *shard,
                     KdMailbox *mailbox)
{
  mailbox->dormant = TRUE;
  kd_lru_push_newest (&shard->dormant, &mailbox->dormant_link);
}

static void
unlink_dormant_locked (Shard     *shard,
                       KdMailbox *mailbox)
{
  mailbox->dormant = FALSE;
  kd_lru_remove (&shard->dormant, &mailbox->dormant_link);
}

/* Takes the oldest dormant mailbox out of the table; returns it if the
 * caller must free it (no room among the spares). */
static KdMailbox *
evict_oldest_locked (Shard *shard)
{
  KdMailbox *mailbox = KD_LRU_ENTRY (shard->dormant.oldest, KdMailbox, dormant_link);

  unlink_dormant_locked (shard, mailbox);
  g_hash_table_remove (shard->table, &mailbox->key);

  /* The table's reference; a delivery may still hold one. */
  if (!kd_mailbox_drop (mailbox))
    return NULL;

  if (shard->n_spares < SPARES_MAX)
    {
      mailbox->task.next = shard->spares != NULL ? kd_mailbox_get_task (shard->spares) : NULL;
      shard->spares = mailbox;
      shard->n_spares++;
      return NULL;
    }

  return mailbox;
}

/* Once no job is left. */
void
kd_key_table_free (KdKeyTable *self)
{
  guint i;

  for (i = 0; i < N_SHARDS; i++)
    {
      Shard *shard = &self->shards[i];

      g_assert (shard->count == 0);
      while (shard->dormant.length > 0)
        {
          KdMailbox *mailbox = evict_oldest_locked (shard);

          if (mailbox != NULL)
            kd_mailbox_free (mailbox);
        }
      g_assert (g_hash_table_size (shard->table) == 0);
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
 * Appends @job to @key's mailbox (setting job->mailbox), making the mailbox
 * active if the key had no work. Returns the mailbox if it became active,
 * for the caller to schedule; NULL if it was already scheduled or running.
 */
KdMailbox *
kd_key_table_push (KdKeyTable *self,
                   const char *string,
                   KdJob      *job)
{
  KdMailbox *mailbox;
  gboolean activated = FALSE;
  KdKey key;
  Shard *shard;

  key.string = string;
  key.hash = kd_key_hash (string, &key.length);
  shard = shard_of (self, key.hash);

  kd_mutex_lock (&shard->lock);
  mailbox = g_hash_table_lookup (shard->table, &key);
  if (mailbox == NULL)
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
      activated = TRUE;
    }
  else if (mailbox->dormant)
    {
      unlink_dormant_locked (shard, mailbox);
      activated = TRUE;
    }
  if (activated)
    __atomic_store_n (&shard->count, shard->count + 1, __ATOMIC_RELEASE);
  job->mailbox = mailbox;
  kd_mailbox_push_locked (mailbox, job);
  kd_mutex_unlock (&shard->lock);

  return activated ? mailbox : NULL;
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

/* Makes an empty active mailbox dormant; returns a mailbox the caller must
 * free, if one was evicted to make room. */
static KdMailbox *
reap_locked (Shard     *shard,
             KdMailbox *mailbox)
{
  __atomic_store_n (&shard->count, shard->count - 1, __ATOMIC_RELEASE);
  link_dormant_locked (shard, mailbox);

  return shard->dormant.length > DORMANT_MAX ? evict_oldest_locked (shard) : NULL;
}

/*
 * kd_key_table_next:
 * @reaped: (out): set if the mailbox ran empty and was reaped
 *
 * By the mailbox's runner after a batch: reaps the mailbox if it ran empty,
 * or takes up to @max_jobs more of its jobs. Returns how many; 0 with
 * *reaped unset means the mailbox still has work the runner did not take
 * (@max_jobs was 0), and the runner must schedule it again. Either way the
 * runner must not touch a reaped mailbox again.
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
    to_free = reap_locked (shard, mailbox);
  else
    {
      n = kd_mailbox_pop_locked (mailbox, jobs, max_jobs);
    }
  kd_mutex_unlock (&shard->lock);

  if (to_free != NULL)
    kd_mailbox_free (to_free);

  return n;
}

/* By the mailbox's runner, which holds it out of the scheduler (a retry
 * waiting, or a parked key): puts @n jobs it took back at the head of the
 * mailbox, in their order, before the jobs that arrived meanwhile. */
void
kd_key_table_put_back (KdKeyTable  *self,
                       KdMailbox   *mailbox,
                       KdJob      **jobs,
                       guint        n)
{
  Shard *shard = shard_of (self, mailbox->key.hash);
  guint i;

  if (n == 0)
    return;

  kd_mutex_lock (&shard->lock);
  for (i = 0; i + 1 < n; i++)
    jobs[i]->task.next = &jobs[i + 1]->task;
  jobs[n - 1]->task.next = mailbox->head != NULL ? &mailbox->head->task : NULL;
  if (mailbox->head == NULL)
    mailbox->tail = jobs[n - 1];
  mailbox->head = jobs[0];
  kd_mutex_unlock (&shard->lock);
}

/*
 * kd_key_table_unpark:
 *
 * By whoever takes a parked mailbox out of parking, which makes it its
 * runner: if @drop, marks every job queued in it as dropped (they end
 * cancelled when they run). Then reaps the mailbox if it has no job, and
 * returns TRUE (the caller must not touch it again); otherwise the caller
 * schedules it.
 */
gboolean
kd_key_table_unpark (KdKeyTable *self,
                     KdMailbox  *mailbox,
                     gboolean    drop)
{
  Shard *shard = shard_of (self, mailbox->key.hash);
  KdMailbox *to_free = NULL;
  gboolean reaped;

  kd_mutex_lock (&shard->lock);
  if (drop)
    {
      KdJob *job;

      for (job = mailbox->head; job != NULL; job = (KdJob *) job->task.next)
        job->dropped = TRUE;
    }
  reaped = kd_mailbox_is_empty_locked (mailbox);
  if (reaped)
    to_free = reap_locked (shard, mailbox);
  kd_mutex_unlock (&shard->lock);

  if (to_free != NULL)
    kd_mailbox_free (to_free);

  return reaped;
}

/* By the mailbox's runner: whether the mailbox has no job left right now
 * (only its runner takes jobs, so "not empty" stays true). */
gboolean
kd_key_table_is_empty (KdKeyTable *self,
                       KdMailbox  *mailbox)
{
  Shard *shard = shard_of (self, mailbox->key.hash);
  gboolean empty;

  kd_mutex_lock (&shard->lock);
  empty = kd_mailbox_is_empty_locked (mailbox);
  kd_mutex_unlock (&shard->lock);

  return empty;
}

/* The number of active mailboxes (keys with work); thread-safe. */
guint
kd_key_table_count (KdKeyTable *self)
{
  guint count = 0;
  guint i;

  for (i = 0; i < N_SHARDS; i++)
    count += __atomic_load_n (&self->shards[i].count, __ATOMIC_ACQUIRE);

  return count;
}
