/* kd-redis-reader.c: the reader thread of a KdRedisQueue's consumer
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The thread takes over the pending entries of each shard just gained
 * (XAUTOCLAIM until the cursor returns to 0-0), then reads new entries of
 * the shards it reads and of the unkeyed stream (XREADGROUP ">"), within a
 * budget of batch-size entries in flight, and submits them to the
 * dispatcher, in order. With nothing to read it waits in XREAD BLOCK on a
 * lone server. A Redis Cluster runs no command over keys of several
 * slots, so no XREAD can wait on all of a member's streams: there the
 * reader reads each slot's streams in a transaction of their own, and
 * with nothing to read waits before it reads again, from POLL_MIN_US,
 * twice as long each time nothing came, up to POLL_MAX_US (or a tick).
 * A node that fails costs the shards it serves, not the others: their
 * reads go on, and only a round in which nothing succeeded rests a tick.
 * See kd-redis-consumer.c for how it fits with the other threads.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-consumer-private.h"
#include "kd-sync-private.h"

/* On a cluster, how long a reader that found nothing waits at first and
 * at most before it reads again. Each look costs two round trips per slot
 * of the shards it holds: at most, an idle reader makes about 20 a second
 * per slot, and a job added to an idle queue waits 100 ms before it is
 * read. */
#define POLL_MIN_US 1000
#define POLL_MAX_US ((gint64) 100 * 1000)

static const redisReply *
field_value (const redisReply *fields,
             const char       *name)
{
  gsize i;

  for (i = 0; i + 1 < fields->elements; i += 2)
    if (fields->element[i]->type == REDIS_REPLY_STRING && strcmp (fields->element[i]->str, name) == 0)
      return fields->element[i + 1]->type == REDIS_REPLY_STRING ? fields->element[i + 1] : NULL;
  return NULL;
}

/* Producers whose highest sequence a shard remembers, at most: a copy comes
 * right after its original, and the producers of a queue are few. */
#define MAX_PRODUCERS_PER_SHARD 256

/* Whether @entry is a copy of one read before: a producer that lost the
 * reply to an XADD sends it again with the same producer id and sequence
 * (kd_redis_queue_add_many()), and as a producer's sequences grow in the
 * order it adds, a copy is the entry whose sequence is not above the
 * highest one read from that producer in the shard. The memory of a shard
 * starts afresh with each takeover, which reads its entries in order from
 * the start; on the unkeyed stream, only what is read in order counts (a
 * claim there takes old entries of any consumer). */
static gboolean
is_copy_locked (KdRedisShard *shard,
                guint         generation,
                gboolean      claimed,
                KdRedisEntry *entry)
{
  guint64 *highest;

  if (entry->producer[0] == '\0' || entry->sequence == 0 || generation != shard->generation ||
      (shard->index < 0 && claimed))
    return FALSE;
  if (shard->producers_generation != generation ||
      g_hash_table_size (shard->producers) >= MAX_PRODUCERS_PER_SHARD)
    {
      g_hash_table_remove_all (shard->producers);
      shard->producers_generation = generation;
    }
  highest = g_hash_table_lookup (shard->producers, entry->producer);
  if (highest != NULL && entry->sequence <= *highest)
    return TRUE;
  if (highest == NULL)
    {
      highest = g_new (guint64, 1);
      g_hash_table_insert (shard->producers, g_strdup (entry->producer), highest);
    }
  *highest = entry->sequence;
  return FALSE;
}

/* Turns XREADGROUP's or XAUTOCLAIM's entries into KdRedisEntry items, and
 * counts them in flight from now on; a copy (is_copy_locked()) is marked,
 * to be acknowledged without running. Called with @lock held. */
static void
parse_entries_locked (KdRedisConsumer  *self,
                      const redisReply *entries,
                      KdRedisShard     *shard,
                      guint             generation,
                      gboolean          claimed,
                      GPtrArray        *out)
{
  gsize i;

  if (entries->type != REDIS_REPLY_ARRAY)
    return;

  for (i = 0; i < entries->elements; i++)
    {
      const redisReply *item = entries->element[i];
      const redisReply *fields, *key, *payload, *producer, *sequence;
      KdRedisEntry *entry;

      /* An entry deleted from the stream while pending has no fields. */
      if (item->type != REDIS_REPLY_ARRAY || item->elements < 2 ||
          item->element[0]->type != REDIS_REPLY_STRING || item->element[1]->type != REDIS_REPLY_ARRAY)
        continue;
      fields = item->element[1];
      key = field_value (fields, "k");
      payload = field_value (fields, "p");
      producer = field_value (fields, "pid");
      sequence = field_value (fields, "seq");

      /* An unkeyed entry claimed again while still in flight here. */
      if (shard->index < 0 && g_hash_table_contains (self->unkeyed_ids, item->element[0]->str))
        continue;

      /* A keyed stream's entry without a key still runs in the shard's
       * order, under the empty key. */
      entry = kd_redis_entry_new (self, shard->index, generation,
                                  item->element[0]->str, item->element[0]->len,
                                  shard->index >= 0 ? (key != NULL ? key->str : "") : NULL,
                                  shard->index >= 0 && key != NULL ? key->len : 0,
                                  payload != NULL ? payload->str : "",
                                  payload != NULL ? payload->len : 0,
                                  producer != NULL ? producer->str : "",
                                  producer != NULL ? producer->len : 0,
                                  sequence != NULL ? g_ascii_strtoull (sequence->str, NULL, 10) : 0);
      entry->fencing_token = shard->index >= 0 ? shard->token : 0;
      if (is_copy_locked (shard, generation, claimed, entry))
        entry->outcome = KD_REDIS_OUTCOME_DUPLICATE;
      g_ptr_array_add (out, entry);
      shard->in_flight++;
      self->in_flight++;
      if (shard->index < 0)
        g_hash_table_add (self->unkeyed_ids, (gpointer) entry->id);
      if (claimed)
        self->stats.claimed++;
      else
        self->stats.read++;
    }
}

/* Submits the entries read, in order, and hands the copies to the acker.
 * Returns FALSE if the dispatcher no longer accepts jobs: the rest stay
 * pending in Redis, and are no longer in flight here. */
static gboolean
submit_entries (KdRedisConsumer *self,
                GPtrArray       *entries)
{
  g_autoptr (GError) error = NULL;
  gboolean ok;
  guint i, j;

  for (i = 0; i < entries->len; i++)
    {
      KdRedisEntry *entry = g_ptr_array_index (entries, i);

      if (entry->outcome == KD_REDIS_OUTCOME_DUPLICATE)
        {
          kd_redis_consumer_report (self, entry, KD_REDIS_OUTCOME_DUPLICATE, NULL, 0);
          kd_redis_entry_unref (entry);
          continue;
        }
      if (!kd_dispatcher_submit (self->dispatcher, entry->key, entry, &error))
        break;
    }

  if (i < entries->len)
    {
      g_debug ("redis queue %s: %s: the dispatcher refused a job: %s", self->config.name,
               self->member, error->message);
      kd_mutex_lock (&self->lock);
      for (j = i; j < entries->len; j++)
        {
          KdRedisEntry *entry = g_ptr_array_index (entries, j);
          KdRedisShard *shard = kd_redis_consumer_entry_shard (self, entry);

          shard->in_flight--;
          self->in_flight--;
          if (entry->shard < 0)
            g_hash_table_remove (self->unkeyed_ids, entry->id);
        }
      kd_mutex_unlock (&self->lock);
      for (j = i; j < entries->len; j++)
        kd_redis_entry_unref (g_ptr_array_index (entries, j));
    }
  ok = i == entries->len;
  g_ptr_array_set_size (entries, 0);

  return ok;
}

/* A round in which nothing succeeded: on a lone server, the connection
 * lost may have taken entries delivered to this consumer with it, and
 * every shard starts over from a takeover of its pending entries, once the
 * entries in flight here are done (on a cluster, reader_failed() did that
 * for the shards of the nodes that failed). The reader rests a tick. */
static void
reader_lost_connection (KdRedisConsumer *self,
                        KdRedisRouter   *router,
                        const GError    *error)
{
  /* A login, a permission or a TLS certificate refused lasts until an
   * operator acts: said where an operator looks; anything else is a
   * passing failure. */
  if (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED) ||
      (error != NULL && error->domain == G_TLS_ERROR))
    g_message ("redis queue %s: %s: reader: %s", self->config.name, self->member, error->message);
  else
    g_debug ("redis queue %s: %s: reader: %s", self->config.name, self->member,
             error != NULL ? error->message : "server error");
  kd_mutex_lock (&self->lock);
  /* On a cluster, reader_failed() fenced the shards of the nodes that
   * failed. */
  if (!kd_redis_router_is_cluster (router))
    kd_redis_consumer_fence_all_locked (self);
  g_strlcpy (self->wake_last_id, "0-0", sizeof self->wake_last_id);
  if (!self->stopping)
    {
      self->reader_waiting = TRUE;
      kd_cond_wait_until (&self->cond, &self->lock, g_get_monotonic_time () + self->tick_us);
      self->reader_waiting = FALSE;
    }
  kd_mutex_unlock (&self->lock);
}

/* Before a round: a cluster's map, read again if it changed, and the
 * consumer groups of every stream made again after a new connection (a
 * server restarted without its data lost them), at most once a tick while
 * some node fails. Only a queue with another number of shards, or a
 * cluster whose map no node gives, fails the round: a node that fails
 * costs its own shards, in the read. */
static gboolean
reader_connect (KdRedisConsumer  *self,
                KdRedisRouter    *router,
                gint64           *next_check,
                GError          **error)
{
  GError *local_error = NULL;

  if (!kd_redis_router_update (router, error))
    return FALSE;
  if (!kd_redis_router_needs_check (router) || g_get_monotonic_time () < *next_check)
    return TRUE;
  if (kd_redis_consumer_check_streams (self, router, &local_error))
    {
      kd_redis_router_checked (router);
      return TRUE;
    }
  *next_check = g_get_monotonic_time () + self->tick_us;
  if (g_error_matches (local_error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT))
    {
      g_propagate_error (error, local_error);
      return FALSE;
    }
  g_debug ("redis queue %s: %s: reader: %s", self->config.name, self->member, local_error->message);
  g_error_free (local_error);
  return TRUE;
}

/* A read or claim of @streams (indices into the shards) failed on @conn
 * (NULL: its node could not be reached). On a lone server, the
 * connection lost may have taken entries delivered to this consumer with
 * it, and every shard starts over from a takeover; on a cluster, only the
 * shards whose streams were read there (their generations in
 * @generations). */
static void
reader_failed (KdRedisConsumer *self,
               KdRedisRouter   *router,
               KdRedisConn     *conn,
               const guint     *streams,
               const guint     *generations,
               guint            n_streams,
               const GError    *error)
{
  guint i;

  if (conn != NULL)
    kd_redis_router_failed (router, conn);
  if (!kd_redis_router_is_cluster (router))
    return;
  g_debug ("redis queue %s: %s: reader: %s", self->config.name, self->member, error->message);
  kd_mutex_lock (&self->lock);
  for (i = 0; i < n_streams; i++)
    {
      KdRedisShard *shard = &self->shards[streams[i]];

      if (shard->generation == generations[i])
        kd_redis_consumer_fence_locked (self, shard);
    }
  kd_mutex_unlock (&self->lock);
}

/* What a read of @streams got is counted in flight, or it got nothing:
 * the lease thread may release or take them again. */
static void
reader_done_reading_locked (KdRedisConsumer *self,
                            GArray          *streams)
{
  guint i;

  for (i = 0; i < streams->len; i++)
    self->shards[g_array_index (streams, guint, i)].reading = FALSE;
}

static void
reader_done_reading (KdRedisConsumer *self,
                     GArray          *streams)
{
  kd_mutex_lock (&self->lock);
  reader_done_reading_locked (self, streams);
  kd_mutex_unlock (&self->lock);
}

/* Takes over up to @budget pending entries of a shard just gained, in id
 * order, from wherever its cursor stands, on the node of its stream; a
 * failure fails that node (reader_failed()). */
static gboolean
reader_claim (KdRedisConsumer  *self,
              KdRedisRouter    *router,
              guint             index,
              guint             generation,
              const char       *cursor,
              guint             budget,
              gint64            min_idle_us,
              GPtrArray        *out,
              GError          **error)
{
  KdRedisShard *shard = &self->shards[index];
  KdRedisConn *conn = kd_redis_router_conn (router, shard->slot, error);
  KdRedisArgs args;
  redisReply *reply;

  if (conn == NULL)
    {
      reader_failed (self, router, NULL, &index, &generation, 1, *error);
      return FALSE;
    }
  kd_redis_args_init (&args);
  kd_redis_args_add_script (&args, conn, KD_REDIS_SCRIPT_CLAIM, 2);
  kd_redis_args_add_string (&args, shard->lease);
  kd_redis_args_add_string (&args, shard->stream);
  kd_redis_args_add_string (&args, self->member);
  kd_redis_args_add_string (&args, KD_REDIS_GROUP);
  kd_redis_args_add_printf (&args, "%" G_GINT64_FORMAT, min_idle_us / 1000);
  kd_redis_args_add_string (&args, cursor);
  kd_redis_args_add_printf (&args, "%u", budget);
  kd_redis_args_add_string (&args, shard->index >= 0 ? "1" : "0");
  reply = kd_redis_conn_run (conn, &args, error);
  kd_redis_args_clear (&args);
  if (reply == NULL)
    {
      reader_failed (self, router, conn, &index, &generation, 1, *error);
      return FALSE;
    }

  kd_mutex_lock (&self->lock);
  if (reply->type == REDIS_REPLY_INTEGER)
    {
      if (shard->generation == generation)
        kd_redis_consumer_fence_locked (self, shard);
    }
  else if (reply->type == REDIS_REPLY_ARRAY && reply->elements >= 2 &&
           reply->element[0]->type == REDIS_REPLY_STRING)
    {
      parse_entries_locked (self, reply->element[1], shard, generation, TRUE, out);
      if (shard->generation == generation)
        {
          g_strlcpy (shard->cursor, reply->element[0]->str, sizeof shard->cursor);
          if (strcmp (shard->cursor, "0-0") == 0 && shard->state == KD_REDIS_SHARD_CLAIMING)
            {
              g_debug ("redis queue %s: %s took over %u+ entries of shard %d", self->config.name,
                       self->member, out->len, shard->index);
              shard->state = KD_REDIS_SHARD_READING;
            }
        }
    }
  kd_mutex_unlock (&self->lock);
  kd_redis_reply_free (reply);

  return TRUE;
}

/* On a cluster: waits POLL_MIN_US, then twice as long after each round
 * that read nothing, up to POLL_MAX_US or a tick, or until another thread
 * wakes it; not at all if something changed since the reader looked. */
static void
reader_poll_wait (KdRedisConsumer *self)
{
  kd_mutex_lock (&self->lock);
  if (!self->stopping && !self->wake_pending)
    {
      self->reader_waiting = TRUE;
      kd_cond_wait_until (&self->cond, &self->lock, g_get_monotonic_time () + self->poll_us);
      self->reader_waiting = FALSE;
    }
  kd_mutex_unlock (&self->lock);
  self->poll_us = MIN (self->poll_us * 2, MIN (POLL_MAX_US, self->tick_us));
}

/* On a lone server: waits until one of the idle streams has an entry after
 * the last one seen, for at most a tick, or until another thread wakes it
 * through its wake stream; not at all if something changed since the
 * reader looked. */
static gboolean
reader_wait_for_entries (KdRedisConsumer  *self,
                         KdRedisConn      *conn,
                         GArray           *idle,
                         GError          **error)
{
  KdRedisArgs args;
  redisReply *reply = NULL;
  gboolean block;
  gsize i;

  kd_redis_args_init (&args);
  kd_redis_args_add_string (&args, "XREAD");
  kd_redis_args_add_string (&args, "COUNT");
  kd_redis_args_add_string (&args, "1");
  kd_redis_args_add_string (&args, "BLOCK");
  kd_redis_args_add_printf (&args, "%" G_GINT64_FORMAT, MAX (self->tick_us / 1000, 1));
  kd_redis_args_add_string (&args, "STREAMS");
  kd_mutex_lock (&self->lock);
  for (i = 0; i < idle->len; i++)
    kd_redis_args_add_string (&args, self->shards[g_array_index (idle, guint, i)].stream);
  kd_redis_args_add_string (&args, self->wake_key);
  for (i = 0; i < idle->len; i++)
    kd_redis_args_add_string (&args, self->shards[g_array_index (idle, guint, i)].last_id);
  kd_redis_args_add_string (&args, self->wake_last_id);
  block = !self->stopping && !self->wake_pending;
  self->reader_blocked = block;
  kd_mutex_unlock (&self->lock);

  if (block)
    reply = kd_redis_conn_run (conn, &args, error);
  kd_redis_args_clear (&args);

  kd_mutex_lock (&self->lock);
  self->reader_blocked = FALSE;
  kd_mutex_unlock (&self->lock);

  if (!block)
    return TRUE;
  if (reply == NULL)
    return FALSE;
  /* [[stream, [[id, fields]]], ...] for the streams that had entries (nil
   * at the end of the tick): the wake stream's tells where to wait from
   * next time. */
  for (i = 0; reply->type == REDIS_REPLY_ARRAY && i < reply->elements; i++)
    {
      const redisReply *stream = reply->element[i];

      if (stream->type == REDIS_REPLY_ARRAY && stream->elements == 2 &&
          stream->element[0]->type == REDIS_REPLY_STRING && strcmp (stream->element[0]->str, self->wake_key) == 0 &&
          stream->element[1]->type == REDIS_REPLY_ARRAY && stream->element[1]->elements > 0 &&
          stream->element[1]->element[0]->type == REDIS_REPLY_ARRAY &&
          stream->element[1]->element[0]->elements > 0 &&
          stream->element[1]->element[0]->element[0]->type == REDIS_REPLY_STRING)
        g_strlcpy (self->wake_last_id, stream->element[1]->element[0]->element[0]->str, sizeof self->wake_last_id);
    }
  kd_redis_reply_free (reply);
  return TRUE;
}

/* Reads new entries of the first @reading_left of @streams still held,
 * all of one group (kd_redis_router_group()), @count at most from each,
 * fenced by their leases (see kd_redis_consumer_watch_leases()), on
 * @conn; takes the streams read from @reading_left, adds to @idle (if not
 * NULL: on a cluster, the reader does not wait in XREAD) the streams held
 * that had no entry, with where XREAD waits from, and to @n_got how many
 * had some; sets
 * @again if a lease changed meanwhile, so that nothing was read and the
 * reader should read again rather than wait. */
static gboolean
reader_read_group (KdRedisConsumer  *self,
                   KdRedisConn      *conn,
                   GArray           *streams,
                   GArray           *generations,
                   guint             count,
                   guint            *reading_left,
                   GPtrArray        *out,
                   GArray           *idle,
                   guint            *n_got,
                   gboolean         *again,
                   GError          **error)
{
  g_autofree gboolean *ours = g_new (gboolean, streams->len);
  /* Positions in @streams: the ones still ours, and the first of them,
   * which are read. */
  g_autoptr (GArray) held = g_array_new (FALSE, FALSE, sizeof (guint));
  KdRedisArgs commands[2];
  redisReply *exec;
  const redisReply *got, *delivered;
  guint i, k, next, n_reading;

  if (!kd_redis_consumer_watch_leases (self, conn, (const guint *) (gpointer) streams->data, streams->len, ours, error))
    return FALSE;

  /* The shards lost are fenced. */
  kd_mutex_lock (&self->lock);
  for (i = 0; i < streams->len; i++)
    {
      KdRedisShard *shard = &self->shards[g_array_index (streams, guint, i)];

      if (ours[i])
        g_array_append_val (held, i);
      else if (shard->generation == g_array_index (generations, guint, i))
        kd_redis_consumer_fence_locked (self, shard);
    }
  kd_mutex_unlock (&self->lock);
  n_reading = MIN (held->len, *reading_left);
  *reading_left -= n_reading;

  /* XREADGROUP ">" on the ones read; then, with @idle, where the group
   * stands on each one held, for XREAD to wait from if nothing came: the
   * entries after it are the ones not read yet. */
  for (k = 0; k < 2; k++)
    kd_redis_args_init (&commands[k]);
  kd_redis_args_add_string (&commands[0], "XREADGROUP");
  kd_redis_args_add_string (&commands[0], "GROUP");
  kd_redis_args_add_string (&commands[0], KD_REDIS_GROUP);
  kd_redis_args_add_string (&commands[0], self->member);
  kd_redis_args_add_string (&commands[0], "COUNT");
  kd_redis_args_add_printf (&commands[0], "%u", count);
  kd_redis_args_add_string (&commands[0], "STREAMS");
  kd_redis_args_add_script (&commands[1], conn, KD_REDIS_SCRIPT_DELIVERED_IDS, held->len);
  for (i = 0; i < held->len; i++)
    {
      const char *stream = self->shards[g_array_index (streams, guint, g_array_index (held, guint, i))].stream;

      if (i < n_reading)
        kd_redis_args_add_string (&commands[0], stream);
      kd_redis_args_add_string (&commands[1], stream);
    }
  for (i = 0; i < n_reading; i++)
    kd_redis_args_add_string (&commands[0], ">");
  kd_redis_args_add_string (&commands[1], KD_REDIS_GROUP);
  /* With nothing left to read, the MULTI still ends the WATCH. */
  exec = kd_redis_conn_transaction (conn, commands, n_reading == 0 ? 0 : idle != NULL ? 2 : 1, error);
  for (k = 0; k < 2; k++)
    kd_redis_args_clear (&commands[k]);
  if (exec == NULL)
    return FALSE;
  /* A lease changed after the WATCH: nothing was read; read again. */
  if (exec->type == REDIS_REPLY_NIL || n_reading == 0)
    {
      *again = *again || n_reading > 0;
      kd_redis_reply_free (exec);
      return TRUE;
    }

  got = exec->elements == (idle != NULL ? 2 : 1) ? exec->element[0] : NULL;
  delivered = got != NULL && idle != NULL ? exec->element[1] : NULL;
  if (got == NULL || (got->type != REDIS_REPLY_NIL && got->type != REDIS_REPLY_ARRAY) ||
      (idle != NULL && (delivered->type != REDIS_REPLY_ARRAY || delivered->elements != held->len)))
    {
      kd_redis_reply_free (exec);
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA, "unexpected reply to a read");
      return FALSE;
    }

  /* XREADGROUP answers the streams that had entries, in the order asked. */
  kd_mutex_lock (&self->lock);
  for (i = 0, next = 0; i < held->len; i++)
    {
      guint at = g_array_index (held, guint, i);
      guint index = g_array_index (streams, guint, at);
      KdRedisShard *shard = &self->shards[index];
      const redisReply *stream = i < n_reading && got->type == REDIS_REPLY_ARRAY && next < got->elements ?
                                 got->element[next] : NULL;

      if (stream != NULL && stream->type == REDIS_REPLY_ARRAY && stream->elements == 2 &&
          stream->element[0]->type == REDIS_REPLY_STRING &&
          strcmp (stream->element[0]->str, shard->stream) == 0)
        {
          parse_entries_locked (self, stream->element[1], shard, g_array_index (generations, guint, at), FALSE, out);
          next++;
          (*n_got)++;
        }
      else if (delivered != NULL && delivered->element[i]->type == REDIS_REPLY_STRING)
        {
          g_strlcpy (shard->last_id, delivered->element[i]->str, sizeof shard->last_id);
          g_array_append_val (idle, index);
        }
    }
  kd_mutex_unlock (&self->lock);
  kd_redis_reply_free (exec);
  return TRUE;
}

/* Reads new entries of the shards being read, and of the unkeyed stream,
 * @budget at most in all, each group of streams on its node (all in one
 * transaction on a lone server); waits for more if none had any.
 * XREADGROUP's COUNT is per stream: the budget is shared evenly among the
 * streams read, and with a budget smaller than the number of streams only
 * that many are read, the next ones in the next round. FALSE if nothing
 * succeeded: no group could be read, or the wait failed. */
static gboolean
reader_read (KdRedisConsumer  *self,
             KdRedisRouter    *router,
             GArray           *streams,
             GArray           *generations,
             guint             budget,
             GPtrArray        *out,
             GError          **error)
{
  g_autoptr (GArray) idle = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) group_streams = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) group_generations = g_array_new (FALSE, FALSE, sizeof (guint));
  gboolean *done;
  guint reading_left = MIN (streams->len, budget);
  guint count = budget / MAX (reading_left, 1);
  guint i, j, n_got = 0, n_groups = 0, n_failed = 0;
  gboolean again = FALSE;
  GError *failure = NULL;

  done = g_new0 (gboolean, MAX (streams->len, 1));
  for (i = 0; i < streams->len; i++)
    {
      guint group = kd_redis_router_group (router, self->shards[g_array_index (streams, guint, i)].slot);
      GError *local_error = NULL;
      KdRedisConn *conn;

      if (done[i])
        continue;
      g_array_set_size (group_streams, 0);
      g_array_set_size (group_generations, 0);
      for (j = i; j < streams->len; j++)
        if (!done[j] && kd_redis_router_group (router, self->shards[g_array_index (streams, guint, j)].slot) == group)
          {
            done[j] = TRUE;
            g_array_append_val (group_streams, g_array_index (streams, guint, j));
            g_array_append_val (group_generations, g_array_index (generations, guint, j));
          }
      /* The budget is spent: the next rounds read these. */
      if (reading_left == 0)
        continue;
      n_groups++;
      conn = kd_redis_router_conn (router, self->shards[g_array_index (streams, guint, i)].slot, &local_error);
      if (conn != NULL &&
          reader_read_group (self, conn, group_streams, group_generations, count, &reading_left, out,
                             kd_redis_router_is_cluster (router) ? NULL : idle, &n_got, &again, &local_error))
        continue;
      reader_failed (self, router, conn, (const guint *) (gpointer) group_streams->data,
                     (const guint *) (gpointer) group_generations->data, group_streams->len, local_error);
      n_failed++;
      if (failure == NULL)
        failure = g_steal_pointer (&local_error);
      g_clear_error (&local_error);
    }
  g_free (done);
  /* Not while it waits for more. */
  reader_done_reading (self, streams);

  if (n_groups > 0 && n_failed == n_groups)
    {
      g_propagate_error (error, failure);
      return FALSE;
    }
  g_clear_error (&failure);
  if (again)
    return TRUE;
  if (n_got > 0)
    {
      self->poll_us = POLL_MIN_US;
      return TRUE;
    }
  if (kd_redis_router_is_cluster (router))
    {
      reader_poll_wait (self);
      return TRUE;
    }
  {
    KdRedisConn *conn = kd_redis_router_conn (router, 0, error);

    if (conn == NULL || !reader_wait_for_entries (self, conn, idle, error))
      {
        if (conn != NULL)
          kd_redis_router_failed (router, conn);
        return FALSE;
      }
  }
  return TRUE;
}

gpointer
kd_redis_reader_main (gpointer data)
{
  KdRedisConsumer *self = data;
  g_autoptr (GPtrArray) entries = g_ptr_array_new ();
  g_autoptr (GArray) streams = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) generations = g_array_new (FALSE, FALSE, sizeof (guint));
  guint unkeyed = self->config.n_shards;
  gint64 next_unkeyed_claim = g_get_monotonic_time () + self->claim_idle_us;
  gint64 next_stream_check = 0, next_check = 0;
  KdRedisRouter router;

  kd_redis_router_init (&router, &self->config.server, self->config.lease_us + self->tick_us);
  kd_redis_router_set_name (&router, self->config.name, "reader", self->member);
  self->poll_us = POLL_MIN_US;

  for (;;)
    {
      g_autoptr (GError) error = NULL;
      gint claiming = -1;
      guint claim_generation = 0;
      gboolean unkeyed_usable, set_aside;
      char cursor[64] = "0-0";
      guint budget = 0;
      gboolean ok;
      guint i;

      g_array_set_size (streams, 0);
      g_array_set_size (generations, 0);

      kd_mutex_lock (&self->lock);
      while (!self->stopping)
        {
          /* Read again once half the budget is free, so that reading
           * overlaps running without ever exceeding it. */
          budget = self->config.batch_size - MIN (self->in_flight, self->config.batch_size);
          if (self->in_flight <= self->config.batch_size / 2 && budget > 0)
            break;
          self->reader_waiting = TRUE;
          kd_cond_wait_until (&self->cond, &self->lock, g_get_monotonic_time () + self->tick_us);
          self->reader_waiting = FALSE;
        }
      if (self->stopping)
        {
          kd_mutex_unlock (&self->lock);
          break;
        }
      /* What changed until now is seen in this round. */
      self->wake_pending = FALSE;
      for (i = 0; i < self->config.n_shards && claiming < 0; i++)
        if (self->shards[i].state == KD_REDIS_SHARD_CLAIMING && self->shards[i].unusable == NULL)
          {
            claiming = (gint) i;
            claim_generation = self->shards[i].generation;
            g_strlcpy (cursor, self->shards[i].cursor, sizeof cursor);
            g_array_append_val (streams, i);
            g_array_append_val (generations, claim_generation);
          }
      if (claiming < 0)
        {
          /* Rotated, so that a budget too small for all never starves the
           * same streams. */
          self->read_offset++;
          for (i = 0; i < self->n_streams; i++)
            {
              guint index = (i + self->read_offset) % self->n_streams;

              if (self->shards[index].unusable == NULL &&
                  (index == unkeyed || self->shards[index].state == KD_REDIS_SHARD_READING))
                {
                  g_array_append_val (streams, index);
                  g_array_append_val (generations, self->shards[index].generation);
                }
            }
        }
      for (i = 0; i < streams->len; i++)
        self->shards[g_array_index (streams, guint, i)].reading = TRUE;
      unkeyed_usable = self->shards[unkeyed].unusable == NULL;
      set_aside = self->stats.streams_set_aside > 0;
      kd_mutex_unlock (&self->lock);

      if (!reader_connect (self, &router, &next_check, &error))
        {
          reader_done_reading (self, streams);
          reader_lost_connection (self, &router, error);
          continue;
        }
      /* Streams set aside are looked at again once a tick (a sixth of the
       * lease time). */
      if (set_aside && g_get_monotonic_time () >= next_stream_check)
        {
          next_stream_check = g_get_monotonic_time () + self->tick_us;
          if (!kd_redis_consumer_check_streams (self, &router, &error) &&
              !kd_redis_router_is_cluster (&router))
            {
              reader_done_reading (self, streams);
              kd_redis_router_close (&router);
              reader_lost_connection (self, &router, error);
              continue;
            }
          g_clear_error (&error);
        }

      if (claiming >= 0)
        {
          ok = reader_claim (self, &router, (guint) claiming, claim_generation, cursor, budget,
                             0, entries, &error);
          reader_done_reading (self, streams);
          if (ok && !submit_entries (self, entries))
            break;
        }
      else if (g_get_monotonic_time () >= next_unkeyed_claim && unkeyed_usable)
        {
          /* Unkeyed entries pending for long with a consumer that went
           * away: any consumer takes them over. */
          kd_mutex_lock (&self->lock);
          g_strlcpy (cursor, self->shards[unkeyed].cursor, sizeof cursor);
          kd_mutex_unlock (&self->lock);
          ok = reader_claim (self, &router, unkeyed, 0, cursor, budget, self->claim_idle_us,
                             entries, &error);
          reader_done_reading (self, streams);
          kd_mutex_lock (&self->lock);
          if (ok && strcmp (self->shards[unkeyed].cursor, "0-0") == 0)
            next_unkeyed_claim = g_get_monotonic_time () + self->claim_idle_us;
          kd_mutex_unlock (&self->lock);
          if (ok && !submit_entries (self, entries))
            break;
        }
      else
        {
          ok = reader_read (self, &router, streams, generations, budget, entries, &error);
          reader_done_reading (self, streams);
          if (ok && !submit_entries (self, entries))
            break;
        }

      if (!ok)
        {
          /* Entries come only with a success. */
          g_assert (entries->len == 0);
          reader_lost_connection (self, &router, error);
        }
    }

  /* Whatever made it exit (a stop, or a dispatcher closed without being
   * cancelled, which refuses jobs), this member is leaving: no shard is
   * wanted any more, and once what is in flight has ended and been
   * acknowledged, the lease thread releases every lease and leaves the
   * members (kd_redis_lease_main()). The entries the dispatcher refused
   * stay pending, and the next owner's takeover claims them. */
  kd_mutex_lock (&self->lock);
  self->stopping = TRUE;
  self->reader_done = TRUE;
  g_cond_broadcast (&self->lease_cond);
  kd_mutex_unlock (&self->lock);
  kd_redis_router_clear (&router);
  return NULL;
}
