/* kd-redis-consumer.c: the consumer side of a KdRedisQueue
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * The consumer is the part of a KdRedisQueue that runs jobs: it joins the
 * queue's members, owns a share of the shards, takes over their pending
 * entries, reads new ones, feeds them to the dispatcher, and acknowledges
 * them once their jobs ended (the design of the whole queue, and its
 * reasons, are in kd-redis-queue.c). Three threads, each with its own
 * blocking connections (a router: one to a lone server, or one per master
 * of a cluster, kd-redis-router.c) and its own file, so that none waits
 * for another's round trips:
 *
 * - The lease thread (kd-redis-lease.c) beats, decides which shards this
 *   process should own, and takes, renews and releases their leases, every
 *   sixth of the lease time. It does nothing else: a renewal never waits
 *   behind a read or an acknowledgement, however slow Redis or busy the
 *   process, and never for the dispatcher.
 * - The reader thread (kd-redis-reader.c) takes over the pending entries of
 *   each shard just gained, then reads new entries of its shards, within a
 *   budget of batch-size entries in flight, and submits them to the
 *   dispatcher. It blocks in the dispatcher's submit when the dispatcher is
 *   full, and when there is nothing to read, on a lone server, in XREAD
 *   BLOCK on its shards' streams and on its own wake stream
 *   (N:wake:member), which the two other threads add to when something
 *   changes; on a cluster, it waits a moment and reads again.
 * - The acker thread (kd-redis-acker.c) sends the outcome of every ended
 *   job (acknowledgement, dead letter) in one transaction per round.
 *
 * Shard states (KdRedisShard.state, under @lock): FREE → CLAIMING (lease
 * taken; XAUTOCLAIM runs until its cursor returns to 0-0) → READING
 * (XREADGROUP ">") → DRAINING (no longer ours by rendezvous: nothing more is
 * read; the lease is released once its entries in flight are done) → FREE.
 * Any owned state falls back to FREE when the lease is lost or its local
 * deadline passes ("fenced", by the lease thread's next tick or by the
 * first job refused for it, whichever comes first): the shard's generation
 * changes, so its entries still waiting in the dispatcher are skipped
 * instead of started.
 * A shard is released, or taken, only once none of its entries is in
 * flight here and no read of it is under way (KdRedisShard.reading): an
 * entry read just before a release would otherwise run here and, claimed by
 * the next owner, there too; and a takeover never runs an entry while an
 * older one of the same shard still runs here.
 *
 * The life of an entry: read (or claimed) by the reader, and counted in
 * flight at once, under @lock; submitted as the item of a job; the job's
 * handler runs it if its shard's generation and deadline allow, and
 * reports the outcome (kd_redis_consumer_report()), or the dispatcher's
 * item-free reports it skipped; the acker sends the outcome, and only then
 * is the entry no longer in flight.
 *
 * Stopping: the reader stops reading; the jobs read end and the acker sends
 * their outcomes (for at most a lease time); the acker exits; the lease
 * thread releases every lease and leaves the members. Cancelling releases
 * at once. A dispatcher closed without a stop (kd_dispatcher_close())
 * leaves the same way: the reader exits at the first job refused, the
 * rest of what it read stays pending, and once the jobs accepted have
 * ended and been acknowledged the lease thread releases every lease and
 * leaves the members, so that the others take the shards over and claim
 * what was refused.
 *
 * Lock order: @lock is a leaf; no Redis I/O, dispatcher call or user code
 * runs under it.
 */

#include "config.h"

#include <string.h>

#include "kd-key-map-private.h"
#include "kd-redis-consumer-private.h"
#include "kd-redis-streams-private.h"
#include "kd-sync-private.h"

KdRedisConsumer *
kd_redis_consumer_new (const KdRedisConfig *config,
                       const char          *member)
{
  KdRedisConsumer *self = g_new0 (KdRedisConsumer, 1);
  guint i;

  self->ref_count = 1;
  self->config = *config;
  kd_redis_server_copy (&self->config.server, &config->server);
  self->config.name = g_strdup (config->name);
  self->member = g_strdup (member);
  self->members_key = g_strdup_printf ("%s:members", config->name);
  self->dead_key = g_strdup_printf ("%s:dead", config->name);
  self->progress_channel = kd_redis_progress_channel (config->name);
  self->wake_key = g_strdup_printf ("%s:wake:%s", config->name, member);
  self->n_streams = config->n_shards + 1;
  self->shards = g_new0 (KdRedisShard, self->n_streams);
  for (i = 0; i < self->n_streams; i++)
    {
      KdRedisShard *shard = &self->shards[i];

      shard->index = i < config->n_shards ? (gint) i : -1;
      shard->stream = kd_redis_stream_name (config->name, shard->index);
      shard->lease = kd_redis_lease_name (config->name, shard->index);
      shard->fence = shard->index >= 0 ? kd_redis_fence_name (config->name, shard->index) : NULL;
      shard->slot = kd_redis_key_slot (shard->stream, strlen (shard->stream));
      shard->state = KD_REDIS_SHARD_FREE;
      shard->producers = g_hash_table_new_full (kd_key_str_hash, g_str_equal, g_free, g_free);
      g_strlcpy (shard->cursor, "0-0", sizeof shard->cursor);
      g_strlcpy (shard->last_id, "0-0", sizeof shard->last_id);
    }

  /* Renewed six times per lease; a job starts only while at least a third
   * of the lease is left, so a holder stops well before anyone else may
   * take the shard, even if two renewals in a row fail. */
  self->tick_us = MAX (config->lease_us / 6, 1000);
  self->margin_us = config->lease_us / 3;
  self->claim_idle_us = 2 * config->lease_us;
  self->ended = g_async_queue_new ();
  g_strlcpy (self->wake_last_id, "0-0", sizeof self->wake_last_id);
  self->unkeyed_ids = g_hash_table_new_full (kd_key_str_hash, g_str_equal, NULL, NULL);
  g_mutex_init (&self->lock);
  g_cond_init (&self->cond);
  g_cond_init (&self->lease_cond);

  return self;
}

KdRedisConsumer *
kd_redis_consumer_ref (KdRedisConsumer *self)
{
  g_atomic_int_inc (&self->ref_count);
  return self;
}

void
kd_redis_consumer_unref (KdRedisConsumer *self)
{
  gpointer item;
  guint i;

  if (!g_atomic_int_dec_and_test (&self->ref_count))
    return;

  g_assert (!self->running);

  while ((item = g_async_queue_try_pop (self->ended)) != NULL)
    if (item != self)
      kd_redis_entry_unref (item);
  g_async_queue_unref (self->ended);
  for (i = 0; i < self->n_streams; i++)
    {
      g_free (self->shards[i].stream);
      g_free (self->shards[i].lease);
      g_free (self->shards[i].fence);
      g_free (self->shards[i].unusable);
      g_hash_table_unref (self->shards[i].producers);
    }
  g_free (self->shards);
  g_hash_table_unref (self->unkeyed_ids);
  kd_redis_server_clear (&self->config.server);
  g_free (self->config.name);
  g_free (self->member);
  g_free (self->members_key);
  g_free (self->dead_key);
  g_free (self->progress_channel);
  g_free (self->wake_key);
  g_mutex_clear (&self->lock);
  g_cond_clear (&self->cond);
  g_cond_clear (&self->lease_cond);
  g_free (self);
}

/* The shard stops: nothing of its current generation starts any more. */
void
kd_redis_consumer_fence_locked (KdRedisConsumer *self,
                                KdRedisShard    *shard)
{
  if (!kd_redis_shard_owned (shard))
    return;
  g_debug ("redis queue %s: %s lost shard %d", self->config.name, self->member, shard->index);
  shard->state = KD_REDIS_SHARD_FREE;
  shard->generation++;
  shard->deadline = 0;
}

void
kd_redis_consumer_fence_all_locked (KdRedisConsumer *self)
{
  guint i;

  for (i = 0; i < self->config.n_shards; i++)
    kd_redis_consumer_fence_locked (self, &self->shards[i]);
}

/* The reader may have something to do: wake it wherever it waits, or
 * keep it from waiting if it is about to. */
void
kd_redis_consumer_wake_reader_locked (KdRedisConsumer *self)
{
  self->wake_pending = TRUE;
  if (self->reader_waiting)
    g_cond_broadcast (&self->cond);
  if (self->reader_blocked)
    self->unblock_wanted = TRUE;
}

void
kd_redis_consumer_wake_acker (KdRedisConsumer *self)
{
  g_async_queue_push (self->ended, self);
}

gboolean
kd_redis_consumer_may_start (KdRedisConsumer *self,
                             KdRedisEntry    *entry)
{
  gint64 now = g_get_monotonic_time ();
  gboolean ok;
  KdRedisShard *shard;

  kd_mutex_lock (&self->lock);
  if (entry->shard < 0)
    ok = !self->cancelled;
  else
    {
      shard = &self->shards[entry->shard];
      ok = shard->generation == entry->generation && kd_redis_shard_owned (shard) && now < shard->deadline;
      /* Past the deadline, the shard is fenced at once rather than at the
       * lease thread's next tick: a renewal answered in between would
       * extend the deadline of this generation, and a later entry of the
       * key just skipped would start while the skipped one waits in this
       * member's pending list. Fenced, every later entry of the shard is
       * skipped too, and a takeover claims them all again, in order. */
      if (!ok && shard->generation == entry->generation && kd_redis_shard_owned (shard))
        kd_redis_consumer_fence_locked (self, shard);
    }
  kd_mutex_unlock (&self->lock);

  return ok;
}

/* Whether the dispatcher's cancellable was cancelled: true as soon as it
 * is, before any handler of its signal runs. Called between start and stop
 * only (from an item-free of the dispatcher, whose jobs end before stop()
 * clears the cancellable). */
gboolean
kd_redis_consumer_is_cancelled (KdRedisConsumer *self)
{
  return self->cancellable != NULL && g_cancellable_is_cancelled (self->cancellable);
}

void
kd_redis_consumer_report (KdRedisConsumer *self,
                          KdRedisEntry    *entry,
                          KdRedisOutcome   outcome,
                          const GError    *error,
                          guint            attempts)
{
  g_assert (!entry->reported);

  entry->reported = TRUE;
  entry->outcome = outcome;
  entry->attempts = attempts;
  if (error != NULL)
    entry->error_message = g_strdup (error->message);
  kd_redis_entry_ref (entry);
  kd_tsan_release (entry);
  g_async_queue_push (self->ended, entry);
}

void
kd_redis_consumer_get_stats (KdRedisConsumer   *self,
                             KdRedisQueueStats *stats)
{
  guint i;

  kd_mutex_lock (&self->lock);
  *stats = self->stats;
  stats->in_flight = self->in_flight;
  stats->shards_owned = 0;
  for (i = 0; i < self->config.n_shards; i++)
    if (kd_redis_shard_owned (&self->shards[i]))
      stats->shards_owned++;
  kd_mutex_unlock (&self->lock);
}

/* Makes the group of every stream, and sets aside, or takes back, the
 * streams Redis refuses one for (a key of another type where the stream
 * should be, say): a stream set aside is neither leased nor read, and the
 * others go on; the reader looks again once a tick. Each change is logged
 * and counted in KdRedisQueueStats.streams_set_aside. FALSE if a node
 * failed (its streams stay as they were; the others' answers are taken)
 * or the queue has another number of shards
 * (G_IO_ERROR_INVALID_ARGUMENT). On any thread, with a router of its
 * own. */
gboolean
kd_redis_consumer_check_streams (KdRedisConsumer  *self,
                                 KdRedisRouter    *router,
                                 GError          **error)
{
  char **unusable = g_new0 (char *, self->n_streams);
  gboolean ok;
  guint i;

  /* What no node answers for stays as it is. */
  kd_mutex_lock (&self->lock);
  for (i = 0; i < self->n_streams; i++)
    unusable[i] = g_strdup (self->shards[i].unusable);
  kd_mutex_unlock (&self->lock);
  ok = kd_redis_create_groups (router, self->config.name, self->config.n_shards, unusable, error);
  kd_mutex_lock (&self->lock);
  for (i = 0; i < self->n_streams; i++)
    {
      KdRedisShard *shard = &self->shards[i];

      if (unusable[i] != NULL && shard->unusable == NULL)
        {
          g_message ("redis queue %s: %s: stream %s is set aside, the others go on: %s",
                     self->config.name, self->member, shard->stream, unusable[i]);
          self->stats.streams_set_aside++;
        }
      else if (unusable[i] == NULL && shard->unusable != NULL)
        {
          g_message ("redis queue %s: %s: stream %s is usable again", self->config.name,
                     self->member, shard->stream);
          self->stats.streams_set_aside--;
          kd_redis_consumer_wake_reader_locked (self);
        }
      g_free (shard->unusable);
      shard->unusable = g_steal_pointer (&unusable[i]);
    }
  kd_mutex_unlock (&self->lock);

  for (i = 0; i < self->n_streams; i++)
    g_free (unusable[i]);
  g_free (unusable);
  return ok;
}

KdRedisShard *
kd_redis_consumer_entry_shard (KdRedisConsumer *self,
                               KdRedisEntry    *entry)
{
  return &self->shards[entry->shard >= 0 ? (guint) entry->shard : self->config.n_shards];
}

/* Fencing without a script. Reads and acknowledgements of a shard must
 * happen only while this member holds its lease. Rather than a script
 * that checks the lease and then acts (which would carry every entry read,
 * and every id acknowledged, through Lua and back: that costs Redis more
 * than the commands themselves), the leases are WATCHed and read with MGET,
 * and the commands then run in a MULTI that Redis refuses (EXEC answers
 * nil) if any watched lease changed or expired in between. This member's
 * own renewals cause a rare refusal too; the caller tries again.
 *
 * kd_redis_consumer_watch_leases() WATCHes the leases of the shards in @streams (indices
 * into the shards) and sets @ours[i] to whether this member holds stream
 * i's (the unkeyed stream has no lease: always TRUE). */
gboolean
kd_redis_consumer_watch_leases (KdRedisConsumer  *self,
                                KdRedisConn      *conn,
                                const guint      *streams,
                                guint             n_streams,
                                gboolean         *ours,
                                GError          **error)
{
  KdRedisArgs commands[2];
  redisReply *replies[2] = { NULL, NULL };
  guint i, k, n_leased = 0;
  gboolean ok;

  for (k = 0; k < 2; k++)
    {
      kd_redis_args_init (&commands[k]);
      kd_redis_args_add_string (&commands[k], k == 0 ? "WATCH" : "MGET");
    }
  for (i = 0; i < n_streams; i++)
    {
      const KdRedisShard *shard = &self->shards[streams[i]];

      ours[i] = shard->index < 0;
      if (shard->index < 0)
        continue;
      for (k = 0; k < 2; k++)
        kd_redis_args_add_string (&commands[k], shard->lease);
      n_leased++;
    }
  ok = n_leased == 0 || kd_redis_conn_pipeline (conn, commands, 2, replies, error);
  for (k = 0; k < 2; k++)
    kd_redis_args_clear (&commands[k]);
  if (!ok || n_leased == 0)
    return ok;

  if (replies[1]->type != REDIS_REPLY_ARRAY || replies[1]->elements != n_leased)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA, "unexpected reply to MGET");
      kd_redis_conn_close (conn);
      ok = FALSE;
    }
  for (i = 0, k = 0; i < n_streams && ok; i++)
    if (self->shards[streams[i]].index >= 0)
      {
        const redisReply *value = replies[1]->element[k++];

        ours[i] = value->type == REDIS_REPLY_STRING && strcmp (value->str, self->member) == 0;
      }
  for (k = 0; k < 2; k++)
    g_clear_pointer (&replies[k], kd_redis_reply_free);

  return ok;
}

/* Wakes the reader from XREAD BLOCK when asked to, with an entry in its
 * wake stream: the XREAD sees it even if it reaches Redis after it. The
 * stream holds one entry, and expires if this process dies. */
void
kd_redis_consumer_unblock_reader (KdRedisConsumer *self,
                                  KdRedisRouter   *router)
{
  g_autoptr (GError) error = NULL;
  redisReply *replies[2] = { NULL, NULL };
  KdRedisArgs commands[2];
  KdRedisConn *conn;
  gboolean wanted;
  guint k;

  kd_mutex_lock (&self->lock);
  wanted = self->unblock_wanted && self->reader_blocked;
  self->unblock_wanted = FALSE;
  kd_mutex_unlock (&self->lock);

  if (!wanted)
    return;
  conn = kd_redis_router_conn_for (router, self->wake_key, &error);
  if (conn == NULL)
    return;

  for (k = 0; k < 2; k++)
    kd_redis_args_init (&commands[k]);
  kd_redis_args_add_string (&commands[0], "XADD");
  kd_redis_args_add_string (&commands[0], self->wake_key);
  kd_redis_args_add_string (&commands[0], "MAXLEN");
  kd_redis_args_add_string (&commands[0], "1");
  kd_redis_args_add_string (&commands[0], "*");
  kd_redis_args_add_string (&commands[0], "wake");
  kd_redis_args_add_string (&commands[0], "1");
  kd_redis_args_add_string (&commands[1], "PEXPIRE");
  kd_redis_args_add_string (&commands[1], self->wake_key);
  kd_redis_args_add_printf (&commands[1], "%" G_GINT64_FORMAT, 2 * self->config.lease_us / 1000);
  if (kd_redis_conn_pipeline (conn, commands, 2, replies, &error))
    for (k = 0; k < 2; k++)
      kd_redis_reply_free (replies[k]);
  else
    kd_redis_router_failed (router, conn);
  for (k = 0; k < 2; k++)
    kd_redis_args_clear (&commands[k]);
}

static void
on_cancelled (GCancellable *cancellable,
              gpointer      data)
{
  KdRedisConsumer *self = data;

  kd_mutex_lock (&self->lock);
  self->cancelled = TRUE;
  self->stopping = TRUE;
  kd_redis_consumer_fence_all_locked (self);
  g_cond_broadcast (&self->cond);
  g_cond_broadcast (&self->lease_cond);
  kd_redis_consumer_wake_reader_locked (self);
  kd_mutex_unlock (&self->lock);
  kd_redis_consumer_wake_acker (self);
}

/* Once the consumer's threads are gone: it is as it was before its start. */
static void
forget_dispatcher (KdRedisConsumer *self)
{
  g_cancellable_disconnect (self->cancellable, self->cancel_id);
  self->cancel_id = 0;
  g_clear_object (&self->cancellable);
  g_clear_object (&self->dispatcher);
  self->running = FALSE;
}

/* A thread of the consumer could not be made: those made so far leave as
 * at a stop (the reader never ran, so nothing is in flight), and the
 * consumer is as it was before the start. */
static void
abandon_start (KdRedisConsumer *self)
{
  kd_mutex_lock (&self->lock);
  self->stopping = TRUE;
  self->reader_done = TRUE;
  self->leaving = TRUE;
  self->releasing = TRUE;
  g_cond_broadcast (&self->cond);
  g_cond_broadcast (&self->lease_cond);
  kd_mutex_unlock (&self->lock);
  if (self->acker != NULL)
    {
      kd_redis_consumer_wake_acker (self);
      g_thread_join (g_steal_pointer (&self->acker));
    }
  if (self->lease_thread != NULL)
    g_thread_join (g_steal_pointer (&self->lease_thread));

  forget_dispatcher (self);
}

gboolean
kd_redis_consumer_start (KdRedisConsumer  *self,
                         KdDispatcher     *dispatcher,
                         GError          **error)
{
  KdRedisRouter router;
  gboolean ok;

  g_assert (!self->running);

  /* The dispatcher's workers first: the reader's submits must not be the
   * first to learn that they cannot start. */
  if (!kd_dispatcher_start (dispatcher, error))
    return FALSE;

  /* Fails early, with a useful error, if Redis cannot be reached or the
   * queue has another number of shards. */
  kd_redis_router_init (&router, &self->config.server, self->config.lease_us);
  ok = kd_redis_router_update (&router, error) && kd_redis_consumer_check_streams (self, &router, error);
  kd_redis_router_clear (&router);
  if (!ok)
    return FALSE;

  self->dispatcher = g_object_ref (dispatcher);
  self->cancellable = g_object_ref (kd_dispatcher_get_cancellable (dispatcher));
  self->running = TRUE;
  self->stopping = FALSE;
  self->reader_done = FALSE;
  self->leaving = FALSE;
  self->releasing = FALSE;
  self->cancelled = FALSE;
  self->cancel_id = g_cancellable_connect (self->cancellable, G_CALLBACK (on_cancelled), self, NULL);
  self->lease_thread = g_thread_try_new ("kd-redis-lease", kd_redis_lease_main, self, error);
  if (self->lease_thread != NULL)
    self->acker = g_thread_try_new ("kd-redis-acker", kd_redis_acker_main, self, error);
  if (self->acker != NULL)
    self->reader = g_thread_try_new ("kd-redis-reader", kd_redis_reader_main, self, error);
  if (self->reader == NULL)
    {
      g_prefix_error (error, "Could not start the queue's threads: ");
      abandon_start (self);
      return FALSE;
    }

  return TRUE;
}

void
kd_redis_consumer_stop (KdRedisConsumer *self)
{
  GPtrArray *unsent;
  gint64 deadline;

  if (!self->running)
    return;

  kd_mutex_lock (&self->lock);
  self->stopping = TRUE;
  g_cond_broadcast (&self->cond);
  kd_redis_consumer_wake_reader_locked (self);
  kd_mutex_unlock (&self->lock);
  kd_redis_consumer_wake_acker (self);
  g_thread_join (g_steal_pointer (&self->reader));

  /* Everything submitted ends, and its outcome is sent, unless that takes
   * longer than a lease: then what is left stays pending for the next
   * owner. */
  kd_dispatcher_wait (self->dispatcher);
  deadline = g_get_monotonic_time () + self->config.lease_us;
  kd_mutex_lock (&self->lock);
  while (self->in_flight > 0 && !self->cancelled)
    if (!kd_cond_wait_until (&self->cond, &self->lock, deadline))
      break;
  self->leaving = TRUE;
  kd_mutex_unlock (&self->lock);
  kd_redis_consumer_wake_acker (self);
  g_thread_join (g_steal_pointer (&self->acker));
  /* Cancelled, the acker may have left before the last jobs ended: what
   * they reported since is accounted for as the acker does on its way out. */
  unsent = g_ptr_array_new ();
  kd_redis_consumer_drop_unsent (self, unsent);
  g_ptr_array_unref (unsent);

  /* The leases are held until no acknowledgement needs them any more. */
  kd_mutex_lock (&self->lock);
  self->releasing = TRUE;
  g_cond_broadcast (&self->lease_cond);
  kd_mutex_unlock (&self->lock);
  g_thread_join (g_steal_pointer (&self->lease_thread));

  forget_dispatcher (self);
}
