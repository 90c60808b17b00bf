/* kd-key-table.c: the sharded table of keys and their mailboxes
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * The key table maps each key that has work to its mailbox, and keeps a
 * bounded number of keys whose work ended (dormant or idle, below). It is
 * split into
 * N_SHARDS shards, each a KdKeyMap with its own lock, chosen by the high
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
 *    scheduler: the first batch of its jobs. If the push that made it
 *    active found no other job queued, that job waits in mailbox->first
 *    rather than in the list, and the runner takes it without the lock:
 *    a key with one job at a time costs two locked steps per job (the
 *    push, and the reaping), not three.
 *  - kd_key_table_next(), by that worker after each batch, in one locked
 *    step: if the mailbox ran empty it is reaped, else the next batch is
 *    taken. Reaping happens before the worker releases the last job's
 *    admission, so once wait() returns no key of the jobs it waited for is
 *    counted as live.
 *  - With a per-key bound, kd_key_table_push_bounded() first waits, on the
 *    shard's condition, until the key has fewer jobs than the bound; the
 *    runner takes each ended job away from the key's count with
 *    kd_key_table_job_ended(), which wakes the shard's waiters if any.
 *  - kd_key_table_put_back(), by the runner when a job will be retried or
 *    the key parks: the jobs it took and did not end go back to the head.
 *    The mailbox stays active, out of the scheduler, until the retry is due
 *    or the key is unparked; producers keep appending to it meanwhile.
 *  - kd_key_table_unpark(): whoever unparks a key reaps its mailbox if it is
 *    empty, or schedules it.
 *
 * With an idle time, a mailbox reaped with a key state keeps it: it goes
 * to the shard's idle list instead of the dormant one, stamped with the
 * time, and the next job of its key finds the state. The idle list is in
 * reaping order, and every key of a dispatcher waits the same idle time,
 * so its oldest mailbox is the first due: the dispatcher's timer ends the
 * idle spells that are due from the heads of the lists
 * (kd_key_table_take_expired(), then kd_key_table_expire_end() once it
 * freed each state), at a cost per key that does not depend on how many
 * are idle. Idle keys are bounded too: past @max_idle (over the whole
 * table), the runner that makes one more key idle ends the oldest idle
 * spell of its shard at once and frees that state itself, so however fast
 * keys churn, the idle states never outnumber the bound and the timer never
 * falls behind by more. An idle spell being ended is in neither list; if
 * a producer revives the mailbox meanwhile, its runner waits in
 * kd_key_table_pop() for the free to end, so a key never has two states at
 * once.
 *
 * Reaping a mailbox ends its life as the key's actor at once: it holds no
 * job, is no longer counted, and the next job of its key makes it active
 * again as if new. But it stays in the map, dormant, for that next
 * job: a key that comes and goes (a client sending one message at a time)
 * would otherwise cost an insert and a remove per job, and a mailbox set up
 * afresh. Each shard keeps at most DORMANT_MAX dormant
 * mailboxes, evicting the oldest, so memory still follows the keys with
 * work, not the keys ever seen. An evicted mailbox goes to the shard's
 * spares (at most SPARES_MAX) for the next new key, or back to malloc; if a
 * main context still holds it for a delivery, the delivery frees it.
 */

#include "config.h"

#include "kd-error.h"
#include "kd-key-table-private.h"
#include "kd-sync-private.h"

#define SHARD_BITS  5
#define N_SHARDS    (1u << SHARD_BITS)
#define DORMANT_MAX 64
#define SPARES_MAX  64

typedef struct
{
  GMutex      lock;
  KdKeyMap    map;      /* KdKey (inside its mailbox) → KdMailbox *, active or dormant */
  KdLru       dormant;   /* dormant mailboxes, least recently used first */
  KdLru       idle;      /* dormant ones that keep a key state: not evicted */
  KdMailbox  *spares;    /* out of the table, linked through task.next */
  guint       n_spares;
  guint       count;     /* active mailboxes; written under @lock, read atomically */

  /* With a per-key bound: pushes waiting for room in one of the shard's
   * keys (atomic, changed under @lock), and where they wait */
  gint        n_bound_waiters;
  GCond       bound_cond;
  GCond       blocked_cond;   /* a push went to sleep (for tests) */
  GCond       expiry_cond;    /* an idle key state was freed */
} __attribute__ ((aligned (64))) Shard;

struct _KdKeyTable
{
  Shard shards[N_SHARDS];

  /* Idle mailboxes of all shards, and their bound: set before use */
  guint max_idle;
  gint  n_idle __attribute__ ((aligned (64)));   /* atomic, changed under a shard lock */
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

  self->max_idle = G_MAXUINT;
  for (i = 0; i < N_SHARDS; i++)
    {
      g_mutex_init (&self->shards[i].lock);
      g_cond_init (&self->shards[i].bound_cond);
      g_cond_init (&self->shards[i].blocked_cond);
      g_cond_init (&self->shards[i].expiry_cond);
      kd_key_map_init (&self->shards[i].map);
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

/* Revives a dormant mailbox: out of its list (none while its idle state
 * is being freed). */
static void
unlink_dormant_locked (KdKeyTable *self,
                       Shard      *shard,
                       KdMailbox  *mailbox)
{
  mailbox->dormant = FALSE;
  if (mailbox->idle)
    {
      kd_lru_remove (&shard->idle, &mailbox->dormant_link);
      mailbox->idle = FALSE;
      __atomic_sub_fetch (&self->n_idle, 1, __ATOMIC_RELAXED);
    }
  else if (!mailbox->expiring)
    {
      kd_lru_remove (&shard->dormant, &mailbox->dormant_link);
    }
}

/* Takes the oldest dormant mailbox out of the table; returns it if the
 * caller must free it (no room among the spares). */
static KdMailbox *
evict_oldest_locked (Shard *shard)
{
  KdMailbox *mailbox = KD_LRU_ENTRY (shard->dormant.oldest, KdMailbox, dormant_link);

  mailbox->dormant = FALSE;
  kd_lru_remove (&shard->dormant, &mailbox->dormant_link);
  kd_key_map_remove (&shard->map, &mailbox->key);

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
      /* The shutdown expired every idle key state. */
      g_assert (shard->idle.length == 0);
      while (shard->dormant.length > 0)
        {
          KdMailbox *mailbox = evict_oldest_locked (shard);

          if (mailbox != NULL)
            kd_mailbox_free (mailbox);
        }
      while (shard->spares != NULL)
        {
          KdMailbox *spare = shard->spares;

          shard->spares = (KdMailbox *) spare->task.next;
          kd_mailbox_free (spare);
        }
      kd_key_map_clear (&shard->map);
      g_cond_clear (&shard->bound_cond);
      g_cond_clear (&shard->blocked_cond);
      g_cond_clear (&shard->expiry_cond);
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
/* With the shard lock held: appends @job to @key's mailbox (setting
 * job->mailbox), making the mailbox active if the key had no work. Returns
 * the mailbox if it became active, for the caller to schedule. */
static inline KdMailbox *
push_locked (KdKeyTable  *self,
             Shard       *shard,
             const KdKey *key,
             KdJob       *job)
{
  KdMailbox *mailbox = kd_key_map_lookup (&shard->map, key);
  gboolean activated = FALSE;

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
      kd_mailbox_set_key (mailbox, key);
      kd_key_map_insert (&shard->map, &mailbox->key, mailbox);
      activated = TRUE;
    }
  else if (mailbox->dormant)
    {
      unlink_dormant_locked (self, shard, mailbox);
      activated = TRUE;
    }
  if (activated)
    {
      __atomic_store_n (&shard->count, shard->count + 1, __ATOMIC_RELEASE);
      /* Ready, the key waits where the job that made it so would. */
      mailbox->task.band = job->task.band;
    }
  job->mailbox = mailbox;
  /* The runner takes the job that made the mailbox ready without the
   * lock; unless its idle spell is being ended, which it waits for in
   * kd_key_table_pop(). */
  if (activated && !mailbox->expiring)
    {
      g_assert (kd_mailbox_is_empty_locked (mailbox) && mailbox->first == NULL);
      mailbox->first = job;
    }
  else
    kd_mailbox_push_locked (mailbox, job);

  return activated ? mailbox : NULL;
}

/* @count: the dispatcher has a per-key bound: count the job in its key,
 * though this push does not wait for room (a pipeline's emit). */
KdMailbox *
kd_key_table_push (KdKeyTable *self,
                   const char *string,
                   KdJob      *job,
                   gboolean    count)
{
  KdMailbox *activated;
  KdKey key;
  Shard *shard;

  key.string = string;
  key.hash = kd_key_hash (string, &key.length);
  shard = shard_of (self, key.hash);

  kd_mutex_lock (&shard->lock);
  activated = push_locked (self, shard, &key, job);
  if (G_UNLIKELY (count))
    __atomic_add_fetch (&job->mailbox->n_jobs, 1, __ATOMIC_SEQ_CST);
  kd_mutex_unlock (&shard->lock);

  return activated;
}

/* With the shard lock held: whether @key has room under @bound, waiting
 * for it as @bound says. FALSE with @error set if not.
 *
 * The push counts itself as a waiter for its whole stay, before it looks
 * at anything: a close (closed, then kd_key_table_wake_bounded() reads the
 * waiters) or a runner (one job less, then kd_key_table_job_ended() reads
 * them) either sees it and wakes it under the lock, or came before its
 * look and is seen by it. */
static gboolean
wait_for_room_locked (Shard            *shard,
                      const KdKey      *key,
                      const KdKeyBound *bound,
                      GError          **error)
{
  gboolean room = FALSE, timed_out = FALSE;

  __atomic_add_fetch (&shard->n_bound_waiters, 1, __ATOMIC_SEQ_CST);
  for (;;)
    {
      KdMailbox *mailbox;

      if (kd_admission_is_closed (bound->admission))
        {
          g_set_error_literal (error, KD_ERROR, KD_ERROR_CLOSED,
                               "The dispatcher was closed while the submit waited for "
                               "room in its key");
          break;
        }

      /* A key without a mailbox, or a dormant one, has no job. */
      mailbox = kd_key_map_lookup (&shard->map, key);
      room = mailbox == NULL || mailbox->dormant ||
             __atomic_load_n (&mailbox->n_jobs, __ATOMIC_SEQ_CST) < bound->capacity;
      if (room)
        break;

      if (bound->mode == KD_ADMIT_TRY)
        {
          g_set_error (error, KD_ERROR, KD_ERROR_FULL,
                       "The key has reached its bound of %u pending jobs", bound->capacity);
          break;
        }
      if (timed_out)
        {
          g_set_error (error, KD_ERROR, KD_ERROR_TIMEOUT,
                       "The key stayed at its bound of %u pending jobs until the deadline",
                       bound->capacity);
          break;
        }

      g_cond_broadcast (&shard->blocked_cond);
      if (bound->mode == KD_ADMIT_BLOCK)
        kd_cond_wait (&shard->bound_cond, &shard->lock);
      else if (!kd_cond_wait_until (&shard->bound_cond, &shard->lock, bound->deadline))
        timed_out = g_get_monotonic_time () >= bound->deadline;   /* one last look */
    }
  __atomic_sub_fetch (&shard->n_bound_waiters, 1, __ATOMIC_SEQ_CST);

  return room;
}

/*
 * kd_key_table_push_bounded:
 * @bound: a bound on the key's jobs
 * @submitted: a counter of queued jobs, incremented (atomically)
 *   once the job found room, before it can be seen
 * @activated: (out): the mailbox if it became active, for the caller to
 *   schedule; NULL if it was already scheduled or running
 *
 * kd_key_table_push() for a dispatcher with a per-key bound: first waits
 * (under the shard lock, as @bound says) until @key has fewer than
 * @bound->capacity jobs. FALSE with @error set if it gave up: the job was
 * not queued.
 */
gboolean
kd_key_table_push_bounded (KdKeyTable        *self,
                           const char        *string,
                           KdJob             *job,
                           const KdKeyBound  *bound,
                           guint64           *submitted,
                           KdMailbox        **activated_out,
                           GError           **error)
{
  KdKey key;
  Shard *shard;

  key.string = string;
  key.hash = kd_key_hash (string, &key.length);
  shard = shard_of (self, key.hash);

  kd_mutex_lock (&shard->lock);
  if (!wait_for_room_locked (shard, &key, bound, error))
    {
      kd_mutex_unlock (&shard->lock);
      *activated_out = NULL;
      return FALSE;
    }
  __atomic_fetch_add (submitted, 1, __ATOMIC_RELAXED);
  *activated_out = push_locked (self, shard, &key, job);
  __atomic_add_fetch (&job->mailbox->n_jobs, 1, __ATOMIC_SEQ_CST);
  kd_mutex_unlock (&shard->lock);

  return TRUE;
}

/* After a change a push waiting for room must see (a job ended, the
 * dispatcher closed), stored sequentially consistent: wakes the shard's
 * waiters, if any (see wait_for_room_locked()). */
static void
wake_bound_waiters (Shard *shard)
{
  if (__atomic_load_n (&shard->n_bound_waiters, __ATOMIC_SEQ_CST) > 0)
    {
      kd_mutex_lock (&shard->lock);
      g_cond_broadcast (&shard->bound_cond);
      kd_mutex_unlock (&shard->lock);
    }
}

/* With a per-key bound, by the runner of @mailbox, once one of its jobs
 * ended and before the mailbox can be reaped: the key has room for one
 * more, and pushes waiting for room in the shard look again. */
void
kd_key_table_job_ended (KdKeyTable *self,
                        KdMailbox  *mailbox)
{
  Shard *shard = shard_of (self, mailbox->key.hash);

  __atomic_sub_fetch (&mailbox->n_jobs, 1, __ATOMIC_SEQ_CST);
  wake_bound_waiters (shard);
}

/* Sleeps until at least @n pushes wait for room in keys of @key's shard,
 * so that tests see a submit really block, without sleeping. */
void
kd_key_table_wait_blocked (KdKeyTable *self,
                           const char *key,
                           guint       n)
{
  gsize length;
  Shard *shard = shard_of (self, kd_key_hash (key, &length));

  kd_mutex_lock (&shard->lock);
  while ((guint) __atomic_load_n (&shard->n_bound_waiters, __ATOMIC_SEQ_CST) < n)
    kd_cond_wait (&shard->blocked_cond, &shard->lock);
  kd_mutex_unlock (&shard->lock);
}

/* For tests: how many of @key's jobs count against the per-key bound. */
guint
kd_key_table_count_jobs (KdKeyTable *self,
                         const char *string)
{
  KdKey key;
  KdMailbox *mailbox;
  Shard *shard;
  guint n = 0;

  key.string = string;
  key.hash = kd_key_hash (string, &key.length);
  shard = shard_of (self, key.hash);

  kd_mutex_lock (&shard->lock);
  mailbox = kd_key_map_lookup (&shard->map, &key);
  if (mailbox != NULL)
    n = (guint) __atomic_load_n (&mailbox->n_jobs, __ATOMIC_SEQ_CST);
  kd_mutex_unlock (&shard->lock);

  return n;
}

/* Wakes every push waiting for room in a key (the dispatcher closed). */
void
kd_key_table_wake_bounded (KdKeyTable *self)
{
  guint i;

  for (i = 0; i < N_SHARDS; i++)
    wake_bound_waiters (&self->shards[i]);
}

/* By the mailbox's runner: its first batch, never empty unless the return
 * of its deferred job scheduled it (it carries that job's unit). If the
 * key's idle state is being freed (revived while expiring), waits until it
 * is gone. */
guint
kd_key_table_pop (KdKeyTable  *self,
                  KdMailbox   *mailbox,
                  KdJob      **jobs,
                  guint        max_jobs)
{
  Shard *shard = shard_of (self, mailbox->key.hash);
  guint n;

  /* The job that made it ready, handed over with it (push_locked()): one
   * locked step less for a key with one job at a time. */
  if (mailbox->first != NULL)
    {
      jobs[0] = g_steal_pointer (&mailbox->first);
      return 1;
    }

  kd_mutex_lock (&shard->lock);
  while (G_UNLIKELY (mailbox->expiring))
    kd_cond_wait (&shard->expiry_cond, &shard->lock);
  n = kd_mailbox_pop_locked (mailbox, jobs, max_jobs);
  kd_mutex_unlock (&shard->lock);

  g_assert (n > 0 || mailbox->carries_unit);
  return n;
}

/* Makes an empty active mailbox dormant; returns a mailbox the caller must
 * free, if one was evicted to make room. */
static inline KdMailbox *
reap_locked (Shard     *shard,
             KdMailbox *mailbox)
{
  g_assert (mailbox->first == NULL);
  __atomic_store_n (&shard->count, shard->count - 1, __ATOMIC_RELEASE);
  link_dormant_locked (shard, mailbox);

  return shard->dormant.length > DORMANT_MAX ? evict_oldest_locked (shard) : NULL;
}

/* With the shard lock held: takes the oldest idle mailbox of @shard out
 * of its list to end its idle spell, handing out its state for the caller
 * to free before kd_key_table_expire_end(). */
static KdMailbox *
take_oldest_idle_locked (KdKeyTable *self,
                         Shard      *shard,
                         gpointer   *state)
{
  KdMailbox *mailbox = KD_LRU_ENTRY (shard->idle.oldest, KdMailbox, dormant_link);

  kd_lru_remove (&shard->idle, &mailbox->dormant_link);
  mailbox->idle = FALSE;
  mailbox->expiring = TRUE;
  __atomic_sub_fetch (&self->n_idle, 1, __ATOMIC_RELAXED);
  *state = mailbox->state;

  return mailbox;
}

/* Makes an empty active mailbox idle: dormant with its key state, newest
 * in its shard's idle list. Past the table's bound, ends the oldest idle
 * spell of the shard at once, returning that mailbox for the caller to
 * free its state (*@state) and call kd_key_table_expire_end(). */
static KdMailbox *
reap_idle_locked (KdKeyTable *self,
                  Shard      *shard,
                  KdMailbox  *mailbox,
                  gpointer   *state)
{
  g_assert (mailbox->first == NULL);
  __atomic_store_n (&shard->count, shard->count - 1, __ATOMIC_RELEASE);
  mailbox->dormant = TRUE;
  mailbox->idle = TRUE;
  mailbox->idle_since = g_get_monotonic_time ();
  kd_lru_push_newest (&shard->idle, &mailbox->dormant_link);

  if ((guint) __atomic_add_fetch (&self->n_idle, 1, __ATOMIC_SEQ_CST) > self->max_idle)
    return take_oldest_idle_locked (self, shard, state);
  return NULL;
}

/*
 * kd_key_table_next:
 * @reaped: (out): set if the mailbox ran empty and was reaped
 * @evicted: (out): with @keep_state, a mailbox whose idle state the
 *   reaping ended early (the table's bound on idle keys), or NULL
 * @evicted_state: (out): that mailbox's state, for the caller to free
 *   before kd_key_table_expire_end() (@evicted)
 *
 * By the mailbox's runner after a batch: reaps the mailbox if it ran empty,
 * or takes up to @max_jobs more of its jobs. Returns how many; 0 with
 * *reaped unset means the mailbox still has work the runner did not take
 * (@max_jobs was 0), and the runner must schedule it again. Either way the
 * runner must not touch a reaped mailbox again. With @keep_state, a reaped
 * mailbox keeps its key state, idle.
 */
guint
kd_key_table_next (KdKeyTable  *self,
                   KdMailbox   *mailbox,
                   KdJob      **jobs,
                   guint        max_jobs,
                   gboolean     keep_state,
                   gboolean    *reaped,
                   KdMailbox  **evicted,
                   gpointer    *evicted_state)
{
  Shard *shard = shard_of (self, mailbox->key.hash);
  KdMailbox *to_free = NULL;
  guint n = 0;

  *evicted = NULL;
  kd_mutex_lock (&shard->lock);
  *reaped = kd_mailbox_is_empty_locked (mailbox);
  if (*reaped && keep_state)
    *evicted = reap_idle_locked (self, shard, mailbox, evicted_state);
  else if (*reaped)
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

/* Marks every job queued in @mailbox as dropped (they end cancelled when
 * they run). */
void
kd_key_table_drop_queued (KdKeyTable *self,
                          KdMailbox  *mailbox)
{
  Shard *shard = shard_of (self, mailbox->key.hash);
  KdJob *job;

  kd_mutex_lock (&shard->lock);
  for (job = mailbox->head; job != NULL; job = (KdJob *) job->task.next)
    job->dropped = TRUE;
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

  if (drop)
    kd_key_table_drop_queued (self, mailbox);

  kd_mutex_lock (&shard->lock);
  reaped = kd_mailbox_is_empty_locked (mailbox);
  if (reaped)
    to_free = reap_locked (shard, mailbox);
  kd_mutex_unlock (&shard->lock);

  if (to_free != NULL)
    kd_mailbox_free (to_free);

  return reaped;
}

/*
 * kd_key_table_take_expired:
 * @reaped_before: the idle spells of mailboxes reaped before this time
 *   (g_get_monotonic_time()) are due; G_MAXINT64 for all of them
 * @mailboxes: (out caller-allocates): where to put the mailboxes
 * @states: (out caller-allocates): their key states
 * @max: room in @mailboxes and @states
 *
 * Ends due idle spells, oldest first in each shard: takes the mailboxes out
 * of their idle lists and hands out their states, which the caller frees
 * before kd_key_table_expire_end() for each. Returns how many; fewer than
 * @max once no more is due.
 */
guint
kd_key_table_take_expired (KdKeyTable *self,
                           gint64      reaped_before,
                           KdMailbox **mailboxes,
                           gpointer   *states,
                           guint       max)
{
  guint n = 0;
  guint i;

  for (i = 0; i < N_SHARDS && n < max; i++)
    {
      Shard *shard = &self->shards[i];

      kd_mutex_lock (&shard->lock);
      while (n < max && shard->idle.length > 0 &&
             KD_LRU_ENTRY (shard->idle.oldest, KdMailbox, dormant_link)->idle_since < reaped_before)
        {
          mailboxes[n] = take_oldest_idle_locked (self, shard, &states[n]);
          n++;
        }
      kd_mutex_unlock (&shard->lock);
    }

  return n;
}

/* When the oldest idle mailbox was reaped, or G_MAXINT64 if none is idle. */
gint64
kd_key_table_oldest_idle (KdKeyTable *self)
{
  gint64 oldest = G_MAXINT64;
  guint i;

  for (i = 0; i < N_SHARDS; i++)
    {
      Shard *shard = &self->shards[i];

      kd_mutex_lock (&shard->lock);
      if (shard->idle.length > 0)
        oldest = MIN (oldest, KD_LRU_ENTRY (shard->idle.oldest, KdMailbox, dormant_link)->idle_since);
      kd_mutex_unlock (&shard->lock);
    }

  return oldest;
}

/* Once the state of an idle spell taken out (kd_key_table_take_expired(),
 * or an eviction by kd_key_table_next()) was freed: the mailbox has no
 * state; if it is still dormant, it becomes an ordinary dormant one, and if
 * it was revived meanwhile, its runner may go on. */
void
kd_key_table_expire_end (KdKeyTable *self,
                         KdMailbox  *mailbox)
{
  Shard *shard = shard_of (self, mailbox->key.hash);
  KdMailbox *to_free = NULL;

  kd_mutex_lock (&shard->lock);
  mailbox->state = NULL;
  mailbox->has_state = FALSE;
  mailbox->expiring = FALSE;
  if (mailbox->dormant)
    {
      link_dormant_locked (shard, mailbox);
      if (shard->dormant.length > DORMANT_MAX)
        to_free = evict_oldest_locked (shard);
    }
  g_cond_broadcast (&shard->expiry_cond);
  kd_mutex_unlock (&shard->lock);

  if (to_free != NULL)
    kd_mailbox_free (to_free);
}

/* Bounds the idle mailboxes of the whole table; before it is used. */
void
kd_key_table_set_max_idle (KdKeyTable *self,
                           guint       max_idle)
{
  self->max_idle = max_idle;
}

/* The idle mailboxes (keys keeping their state with no work); thread-safe. */
guint
kd_key_table_count_idle (KdKeyTable *self)
{
  return (guint) __atomic_load_n (&self->n_idle, __ATOMIC_RELAXED);
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
