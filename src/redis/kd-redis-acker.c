/* kd-redis-acker.c: the acker thread of a KdRedisQueue's consumer
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The thread takes the entries whose jobs ended from the consumer's queue
 * and sends their outcomes in one transaction per round and group of
 * shards (all of them on a lone server; each slot's on a Redis Cluster):
 * one XACK per shard, one script per dead letter, fenced by the shards'
 * leases. See kd-redis-consumer.c for how it fits with the other threads.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-consumer-private.h"
#include "kd-sync-private.h"

/* Ended jobs sent in one round at most. */
#define MAX_OUTCOMES_PER_ROUND 4096

/* On a cluster, how long outcomes a node did not take wait before they
 * are sent again. */
#define CLUSTER_RETRY_US ((gint64) 100 * 1000)

/* Attempts at a transaction of outcomes refused because a lease changed
 * (see kd_redis_consumer_watch_leases()) before waiting for a tick. */
#define MAX_OUTCOME_ATTEMPTS 3

static void
add_dead_script (KdRedisArgs     *args,
                 KdRedisConsumer *self,
                 KdRedisConn     *conn,
                 KdRedisShard    *shard,
                 KdRedisEntry    *entry)
{
  kd_redis_args_add_script (args, conn, KD_REDIS_SCRIPT_DEAD, 2);
  kd_redis_args_add_string (args, shard->stream);
  kd_redis_args_add_string (args, self->dead_key);
  kd_redis_args_add_string (args, KD_REDIS_GROUP);
  kd_redis_args_add_string (args, entry->id);
  kd_redis_args_add_string (args, entry->key != NULL ? "1" : "0");
  kd_redis_args_add_string (args, entry->key != NULL ? entry->key : "");
  kd_redis_args_add (args, entry->payload, entry->payload_len);
  kd_redis_args_add_string (args, entry->producer);
  kd_redis_args_add_printf (args, "%" G_GUINT64_FORMAT, entry->sequence);
  kd_redis_args_add_printf (args, "%u", entry->attempts);
  kd_redis_args_add_string (args, entry->error_message != NULL ? entry->error_message : "");
}

/* Accounts for @ended's jobs once their outcomes were sent: an entry with
 * no command in the transaction (@command_of 0) that was not skipped was
 * refused, its shard's lease lost; then lets them go. */
static void
account_outcomes (KdRedisConsumer *self,
                  GPtrArray       *ended,
                  const guint     *command_of)
{
  guint i;

  kd_mutex_lock (&self->lock);
  for (i = 0; i < ended->len; i++)
    {
      KdRedisEntry *entry = g_ptr_array_index (ended, i);
      KdRedisShard *shard = kd_redis_consumer_entry_shard (self, entry);

      if (entry->outcome == KD_REDIS_OUTCOME_SKIP)
        self->stats.skipped++;
      else if (command_of[i] == 0)
        {
          self->stats.refused++;
          if (shard->generation == entry->generation)
            kd_redis_consumer_fence_locked (self, shard);
        }
      else if (entry->outcome == KD_REDIS_OUTCOME_DEAD)
        self->stats.dead_lettered++;
      else if (entry->outcome == KD_REDIS_OUTCOME_DUPLICATE)
        self->stats.duplicates++;
      else
        self->stats.acked++;

      g_assert (shard->in_flight > 0 && self->in_flight > 0);
      shard->in_flight--;
      self->in_flight--;
      if (entry->shard < 0)
        g_hash_table_remove (self->unkeyed_ids, entry->id);
    }
  kd_redis_consumer_wake_reader_locked (self);
  /* stop() and the lease thread, when leaving, wait for the last entries
   * in flight. */
  if (self->stopping)
    {
      g_cond_broadcast (&self->cond);
      g_cond_broadcast (&self->lease_cond);
    }
  kd_mutex_unlock (&self->lock);

  for (i = 0; i < ended->len; i++)
    kd_redis_entry_unref (g_ptr_array_index (ended, i));
  g_ptr_array_set_size (ended, 0);
}

/* On a cluster, the dead letters of @entries whose shards this member
 * holds (@ours, by position in @streams: @stream_at) go to N:dead first,
 * in a command each on that stream's node: a script runs over keys of
 * one slot only, and N:dead is in another. Acknowledged in the
 * transaction that follows, a dead letter is added once unless the
 * transaction is refused or lost, and then again at the next attempt: at
 * least once. */
static gboolean
add_dead_letters (KdRedisConsumer *self,
                  KdRedisRouter   *router,
                  GPtrArray       *entries,
                  const guint     *stream_at,
                  const gboolean  *ours,
                  GError         **error)
{
  g_autoptr (GArray) commands = g_array_new (FALSE, FALSE, sizeof (KdRedisArgs));
  redisReply **replies;
  KdRedisConn *conn;
  gboolean ok;
  guint i;

  for (i = 0; i < entries->len; i++)
    {
      KdRedisEntry *entry = g_ptr_array_index (entries, i);
      KdRedisShard *shard = kd_redis_consumer_entry_shard (self, entry);
      KdRedisArgs args;

      if (entry->outcome != KD_REDIS_OUTCOME_DEAD || !ours[stream_at[shard - self->shards] - 1])
        continue;
      kd_redis_args_init (&args);
      kd_redis_args_add_string (&args, "XADD");
      kd_redis_args_add_string (&args, self->dead_key);
      kd_redis_args_add_string (&args, "*");
      kd_redis_args_add_string (&args, "stream");
      kd_redis_args_add_string (&args, shard->stream);
      kd_redis_args_add_string (&args, "id");
      kd_redis_args_add_string (&args, entry->id);
      if (entry->key != NULL)
        {
          kd_redis_args_add_string (&args, "k");
          kd_redis_args_add_string (&args, entry->key);
        }
      kd_redis_args_add_string (&args, "p");
      kd_redis_args_add (&args, entry->payload, entry->payload_len);
      kd_redis_args_add_string (&args, "pid");
      kd_redis_args_add_string (&args, entry->producer);
      kd_redis_args_add_string (&args, "seq");
      kd_redis_args_add_printf (&args, "%" G_GUINT64_FORMAT, entry->sequence);
      kd_redis_args_add_string (&args, "attempts");
      kd_redis_args_add_printf (&args, "%u", entry->attempts);
      kd_redis_args_add_string (&args, "error");
      kd_redis_args_add_string (&args, entry->error_message != NULL ? entry->error_message : "");
      g_array_append_val (commands, args);
    }
  if (commands->len == 0)
    return TRUE;

  replies = g_new0 (redisReply *, commands->len);
  conn = kd_redis_router_conn_for (router, self->dead_key, error);
  ok = conn != NULL &&
       kd_redis_conn_pipeline (conn, (KdRedisArgs *) (gpointer) commands->data, commands->len, replies, error);
  if (ok)
    for (i = 0; i < commands->len; i++)
      kd_redis_reply_free (replies[i]);
  else if (conn != NULL)
    kd_redis_router_failed (router, conn);
  for (i = 0; i < commands->len; i++)
    kd_redis_args_clear (&g_array_index (commands, KdRedisArgs, i));
  g_free (replies);
  return ok;
}

/* Sends the outcome of @entries' jobs, none skipped, whose shards are all
 * of one group (kd_redis_router_group()), in one transaction on @conn
 * (adding to @finished how many it acknowledged or dead-lettered),
 * fenced by their shards' leases (see kd_redis_consumer_watch_leases()):
 * per stream, one XACK of its completed entries (in the order they ended,
 * so a key's are acknowledged in order), and per dead letter, on a lone
 * server, a script that adds it to N:dead and acknowledges it (on a
 * cluster, add_dead_letters() adds it first). The entries of a shard
 * whose lease this member no longer holds are refused: the new owner took
 * them over and runs them. Then accounts for them all. Returns FALSE,
 * keeping them, if Redis could not be reached: they are sent again
 * (acknowledging twice is harmless; a dead letter is added once on a lone
 * server). */
static gboolean
send_group_outcomes (KdRedisConsumer *self,
                     KdRedisRouter   *router,
                     KdRedisConn     *conn,
                     GPtrArray       *entries,
                     guint           *finished)
{
  g_autoptr (GError) error = NULL;
  g_autoptr (GArray) streams = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) commands = g_array_new (FALSE, FALSE, sizeof (KdRedisArgs));
  gboolean cluster = kd_redis_router_is_cluster (router);
  /* Per stream: its position in @streams + 1 (0: no outcome to send), and
   * its XACK's position in @commands + 1 (0: none yet). */
  guint *stream_at = g_new0 (guint, self->n_streams);
  guint *xack_at = g_new0 (guint, self->n_streams);
  /* Per entry: its command's position + 1 (0: none: refused). */
  guint *command_of = g_new0 (guint, entries->len);
  gboolean *ours;
  redisReply *exec = NULL;
  gboolean sent;
  guint attempt, i, n_finishing;

  for (i = 0; i < entries->len; i++)
    {
      KdRedisEntry *entry = g_ptr_array_index (entries, i);
      guint s = (guint) (kd_redis_consumer_entry_shard (self, entry) - self->shards);

      if (stream_at[s] == 0)
        {
          g_array_append_val (streams, s);
          stream_at[s] = streams->len;
        }
    }
  ours = g_new0 (gboolean, MAX (streams->len, 1));

  for (attempt = 0; attempt < MAX_OUTCOME_ATTEMPTS; attempt++)
    {
      if (!kd_redis_consumer_watch_leases (self, conn, (const guint *) (gpointer) streams->data, streams->len, ours, &error))
        break;
      if (cluster && !add_dead_letters (self, router, entries, stream_at, ours, &error))
        break;

      memset (xack_at, 0, self->n_streams * sizeof (guint));
      n_finishing = 0;
      for (i = 0; i < entries->len; i++)
        {
          KdRedisEntry *entry = g_ptr_array_index (entries, i);
          KdRedisShard *shard = kd_redis_consumer_entry_shard (self, entry);
          guint s = (guint) (shard - self->shards);
          gboolean script = entry->outcome == KD_REDIS_OUTCOME_DEAD && !cluster;
          KdRedisArgs fresh;

          command_of[i] = 0;
          if (!ours[stream_at[s] - 1])
            continue;
          if (script || xack_at[s] == 0)
            {
              kd_redis_args_init (&fresh);
              if (script)
                add_dead_script (&fresh, self, conn, shard, entry);
              else
                {
                  kd_redis_args_add_string (&fresh, "XACK");
                  kd_redis_args_add_string (&fresh, shard->stream);
                  kd_redis_args_add_string (&fresh, KD_REDIS_GROUP);
                  xack_at[s] = commands->len + 1;
                }
              g_array_append_val (commands, fresh);
            }
          n_finishing++;
          if (script)
            command_of[i] = commands->len;
          else
            {
              kd_redis_args_add_string (&g_array_index (commands, KdRedisArgs, xack_at[s] - 1), entry->id);
              command_of[i] = xack_at[s];
            }
        }

      /* Whoever waits for the queue's backlog to shrink learns it here
       * (kd_redis_queue_wait_backlog()); on a cluster, where a message is
       * sent to every node, once per round (send_outcomes()). With nothing
       * to send, the MULTI still ends the WATCH. */
      if (commands->len > 0 && !cluster)
        {
          KdRedisArgs publish;

          kd_redis_args_init (&publish);
          kd_redis_args_add_string (&publish, "PUBLISH");
          kd_redis_args_add_string (&publish, self->progress_channel);
          kd_redis_args_add_printf (&publish, "%u", n_finishing);
          g_array_append_val (commands, publish);
        }
      exec = kd_redis_conn_transaction (conn, (KdRedisArgs *) (gpointer) commands->data, commands->len, &error);
      for (i = 0; i < commands->len; i++)
        kd_redis_args_clear (&g_array_index (commands, KdRedisArgs, i));
      g_array_set_size (commands, 0);
      if (exec == NULL || exec->type == REDIS_REPLY_ARRAY)
        break;
      g_clear_pointer (&exec, kd_redis_reply_free);
    }

  /* Freed by hand on every way out: the analyzer of the CI's clang-tidy
   * does not follow g_autofree out of an early return. */
  sent = exec != NULL && exec->type == REDIS_REPLY_ARRAY;
  if (sent)
    {
      *finished += n_finishing;
      account_outcomes (self, entries, command_of);
    }
  else
    {
      /* A failure may leave the leases WATCHed on a connection still
       * open: it starts afresh. */
      if (error != NULL)
        kd_redis_router_failed (router, conn);
      g_debug ("redis queue %s: %s: outcomes not sent: %s", self->config.name, self->member,
               error != NULL ? error->message : "a lease kept changing");
    }
  g_clear_pointer (&exec, kd_redis_reply_free);
  g_free (ours);
  g_free (command_of);
  g_free (xack_at);
  g_free (stream_at);

  return sent;
}

/* On a cluster: tells whoever waits for the queue's backlog that
 * @finished more jobs finished, once per round (a message published on
 * one node is sent to every node). */
static void
publish_progress (KdRedisConsumer *self,
                  KdRedisRouter   *router,
                  guint            finished)
{
  g_autoptr (GError) error = NULL;
  KdRedisConn *conn = kd_redis_router_conn_for (router, self->progress_channel, &error);
  redisReply *reply = NULL;
  KdRedisArgs args;

  if (conn == NULL)
    return;
  kd_redis_args_init (&args);
  kd_redis_args_add_string (&args, "PUBLISH");
  kd_redis_args_add_string (&args, self->progress_channel);
  kd_redis_args_add_printf (&args, "%u", finished);
  reply = kd_redis_conn_run (conn, &args, &error);
  kd_redis_args_clear (&args);
  if (reply == NULL)
    kd_redis_router_failed (router, conn);
  g_clear_pointer (&reply, kd_redis_reply_free);
}

/* Sends the outcome of @ended's jobs, the entries of each group of shards
 * (one group on a lone server) in a transaction on their node
 * (send_group_outcomes()); skipped entries need none. Accounts for those
 * sent, and leaves in @ended those that were not, to be sent again: a node
 * that fails keeps its own. FALSE if some were not sent. */
static gboolean
send_outcomes (KdRedisConsumer *self,
               KdRedisRouter   *router,
               GPtrArray       *ended)
{
  g_autoptr (GPtrArray) skipped = g_ptr_array_new ();
  g_autoptr (GPtrArray) group = g_ptr_array_new ();
  g_autoptr (GPtrArray) unsent = g_ptr_array_new ();
  guint i, finished = 0;

  /* Skipped: nothing to send. */
  for (i = 0; i < ended->len; i++)
    {
      KdRedisEntry *entry = g_ptr_array_index (ended, i);

      g_ptr_array_add (entry->outcome == KD_REDIS_OUTCOME_SKIP ? skipped : unsent, entry);
    }
  if (skipped->len > 0)
    {
      guint *no_command = g_new0 (guint, skipped->len);

      account_outcomes (self, skipped, no_command);
      g_free (no_command);
    }
  g_ptr_array_set_size (ended, 0);

  while (unsent->len > 0)
    {
      KdRedisEntry *first = g_ptr_array_index (unsent, 0);
      guint slot = kd_redis_consumer_entry_shard (self, first)->slot;
      guint id = kd_redis_router_group (router, slot);
      GError *local_error = NULL;
      KdRedisConn *conn;
      guint kept = 0;

      /* The group's entries, in the order they ended; the others stay. */
      for (i = 0; i < unsent->len; i++)
        {
          KdRedisEntry *entry = g_ptr_array_index (unsent, i);

          if (kd_redis_router_group (router, kd_redis_consumer_entry_shard (self, entry)->slot) == id)
            g_ptr_array_add (group, entry);
          else
            unsent->pdata[kept++] = entry;
        }
      g_ptr_array_set_size (unsent, (gint) kept);

      conn = kd_redis_router_conn (router, slot, &local_error);
      if (conn == NULL || !send_group_outcomes (self, router, conn, group, &finished))
        {
          if (local_error != NULL)
            g_debug ("redis queue %s: %s: outcomes not sent: %s", self->config.name, self->member,
                     local_error->message);
          g_clear_error (&local_error);
          for (i = 0; i < group->len; i++)
            g_ptr_array_add (ended, g_ptr_array_index (group, i));
        }
      g_ptr_array_set_size (group, 0);
    }
  if (finished > 0 && kd_redis_router_is_cluster (router))
    publish_progress (self, router, finished);

  return ended->len == 0;
}

/* Accounts for the ended entries the acker leaves with, their outcomes not
 * sent (stop() gave up waiting for them: Redis could not be reached, or
 * the drain outlasted the lease), those in @ended and those still queued:
 * as refused (or skipped), so that the counts in flight return to 0 and no
 * unkeyed id points into a freed entry. They stay pending in Redis, for
 * the next owner, which may be this member again after a restart. */
void
kd_redis_consumer_drop_unsent (KdRedisConsumer *self,
                               GPtrArray       *ended)
{
  guint *command_of;
  gpointer item;

  while ((item = g_async_queue_try_pop (self->ended)) != NULL)
    if (item != self)
      {
        kd_tsan_acquire (item);
        g_ptr_array_add (ended, item);
      }
  if (ended->len == 0)
    return;
  command_of = g_new0 (guint, ended->len);
  account_outcomes (self, ended, command_of);
  g_free (command_of);
}

gpointer
kd_redis_acker_main (gpointer data)
{
  KdRedisConsumer *self = data;
  g_autoptr (GPtrArray) ended = g_ptr_array_new ();
  KdRedisRouter router;
  gint64 retry_at = 0;

  kd_redis_router_init (&router, &self->config.server, self->config.lease_us);
  kd_redis_router_set_name (&router, self->config.name, "acker", self->member);

  for (;;)
    {
      gint64 now = g_get_monotonic_time ();
      gboolean leave;
      gpointer item;

      kd_mutex_lock (&self->lock);
      leave = self->leaving || self->cancelled;
      kd_mutex_unlock (&self->lock);
      if (leave)
        break;

      /* Waits for ended jobs, or a wake-up; after a failed send, Redis
       * gets a tick's rest before the next attempt. */
      if (ended->len == 0)
        item = g_async_queue_pop (self->ended);
      else if (now < retry_at)
        item = g_async_queue_timeout_pop (self->ended, (guint64) (retry_at - now));
      else
        item = g_async_queue_try_pop (self->ended);
      while (item != NULL)
        {
          if (item != self)
            {
              kd_tsan_acquire (item);
              g_ptr_array_add (ended, item);
            }
          if (ended->len >= MAX_OUTCOMES_PER_ROUND)
            break;
          item = g_async_queue_try_pop (self->ended);
        }

      /* On a cluster, what a failed node kept waits less than a tick:
       * the others' outcomes, sent with it, go on meanwhile. */
      if (ended->len > 0 && g_get_monotonic_time () >= retry_at &&
          (!kd_redis_router_update (&router, NULL) || !send_outcomes (self, &router, ended)))
        retry_at = g_get_monotonic_time () +
                   (kd_redis_router_is_cluster (&router) ? MIN (self->tick_us, CLUSTER_RETRY_US) : self->tick_us);
      kd_redis_consumer_unblock_reader (self, &router);
    }

  kd_redis_consumer_drop_unsent (self, ended);
  kd_redis_router_clear (&router);

  return NULL;
}
