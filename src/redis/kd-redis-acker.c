/* kd-redis-acker.c: the acker thread of a KdRedisQueue's consumer
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The thread takes the entries whose jobs ended from the consumer's queue
 * and sends their outcomes in one transaction per round: one XACK per
 * shard, one script per dead letter, fenced by the shards' leases. See
 * kd-redis-consumer.c for how it fits with the other threads.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-consumer-private.h"
#include "kd-sync-private.h"

/* Ended jobs sent in one round at most. */
#define MAX_OUTCOMES_PER_ROUND 4096

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

/* Sends the outcome of @ended's jobs in one transaction, fenced by their
 * shards' leases (see kd_redis_consumer_watch_leases()): per stream, one XACK of its
 * completed entries (in the order they ended, so a key's are acknowledged
 * in order), and a script per dead letter. The entries of a shard whose
 * lease this member no longer holds are refused: the new owner took them
 * over and runs them. Then accounts for them all. Returns FALSE, keeping
 * them, if Redis could not be reached: they are sent again (acknowledging
 * twice is harmless; a dead letter is added once). */
static gboolean
send_outcomes (KdRedisConsumer *self,
               KdRedisConn     *conn,
               GPtrArray       *ended)
{
  g_autoptr (GError) error = NULL;
  g_autoptr (GArray) streams = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) commands = g_array_new (FALSE, FALSE, sizeof (KdRedisArgs));
  /* Per stream: its position in @streams + 1 (0: no outcome to send), and
   * its XACK's position in @commands + 1 (0: none yet). */
  guint *stream_at = g_new0 (guint, self->n_streams);
  guint *xack_at = g_new0 (guint, self->n_streams);
  /* Per entry: its command's position + 1 (0: none: skipped or refused). */
  guint *command_of = g_new0 (guint, ended->len);
  gboolean *ours;
  redisReply *exec = NULL;
  gboolean sent;
  guint attempt, i, n_finishing;

  for (i = 0; i < ended->len; i++)
    {
      KdRedisEntry *entry = g_ptr_array_index (ended, i);
      guint s = (guint) (kd_redis_consumer_entry_shard (self, entry) - self->shards);

      if (entry->outcome != KD_REDIS_OUTCOME_SKIP && stream_at[s] == 0)
        {
          g_array_append_val (streams, s);
          stream_at[s] = streams->len;
        }
    }
  ours = g_new0 (gboolean, MAX (streams->len, 1));

  for (attempt = 0; attempt < MAX_OUTCOME_ATTEMPTS && streams->len > 0; attempt++)
    {
      if (!kd_redis_consumer_watch_leases (self, conn, (const guint *) (gpointer) streams->data, streams->len, ours, &error))
        break;

      memset (xack_at, 0, self->n_streams * sizeof (guint));
      n_finishing = 0;
      for (i = 0; i < ended->len; i++)
        {
          KdRedisEntry *entry = g_ptr_array_index (ended, i);
          KdRedisShard *shard = kd_redis_consumer_entry_shard (self, entry);
          guint s = (guint) (shard - self->shards);
          KdRedisArgs fresh;

          command_of[i] = 0;
          if (entry->outcome == KD_REDIS_OUTCOME_SKIP || !ours[stream_at[s] - 1])
            continue;
          if (entry->outcome == KD_REDIS_OUTCOME_DEAD || xack_at[s] == 0)
            {
              kd_redis_args_init (&fresh);
              if (entry->outcome == KD_REDIS_OUTCOME_DEAD)
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
          if (entry->outcome == KD_REDIS_OUTCOME_DEAD)
            command_of[i] = commands->len;
          else
            {
              kd_redis_args_add_string (&g_array_index (commands, KdRedisArgs, xack_at[s] - 1), entry->id);
              command_of[i] = xack_at[s];
            }
        }

      /* Whoever waits for the queue's backlog to shrink learns it here
       * (kd_redis_queue_wait_backlog()). With nothing to send, the MULTI
       * still ends the WATCH. */
      if (commands->len > 0)
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
  sent = streams->len == 0 || (exec != NULL && exec->type == REDIS_REPLY_ARRAY);
  if (sent)
    account_outcomes (self, ended, command_of);
  else
    g_debug ("redis queue %s: %s: outcomes not sent: %s", self->config.name, self->member,
             error != NULL ? error->message : "a lease kept changing");
  g_clear_pointer (&exec, kd_redis_reply_free);
  g_free (ours);
  g_free (command_of);
  g_free (xack_at);
  g_free (stream_at);

  return sent;
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
  KdRedisConn conn;
  gint64 retry_at = 0;

  kd_redis_conn_init (&conn, &self->config.server, self->config.lease_us);
  kd_redis_conn_set_name (&conn, self->config.name, "acker", self->member);

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

      if (ended->len > 0 && g_get_monotonic_time () >= retry_at && !send_outcomes (self, &conn, ended))
        retry_at = g_get_monotonic_time () + self->tick_us;
      kd_redis_consumer_unblock_reader (self, &conn);
    }

  kd_redis_consumer_drop_unsent (self, ended);
  kd_redis_conn_clear (&conn);

  return NULL;
}
