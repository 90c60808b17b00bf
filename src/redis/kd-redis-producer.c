/* kd-redis-producer.c: the producer side of a KdRedisQueue
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * The producer side adds jobs to the queue's streams, and counts, awaits
 * and trims what they hold (the design of the whole queue, and its
 * reasons, are in kd-redis-queue.c). It is one blocking connection, used
 * under @producer_lock by whichever thread calls, opened at the first use
 * and again after a failure; each time it opens, it creates the streams'
 * consumer group, from the streams' start, and checks the queue's number
 * of shards (kd_redis_conn_create_groups()). A stream Redis refuses (a key
 * of another type, say) is noted in @unusable: an add to it fails at once,
 * nothing sent, after one more look at the streams set aside (one command
 * each), and the adds to the other streams go on.
 *
 * Adding. A job is an XADD to its key's shard (or the unkeyed stream) with
 * its key, its payload, the producer's id and its next sequence, which
 * name it. The XADDs are pipelined ADD_CHUNK at a time: a chunk is
 * appended before the replies of the one before it are read, so that Redis
 * adds a chunk while this thread reads the replies of the one before and
 * formats the next. A connection lost after sending took the replies of
 * the jobs not yet confirmed: they are sent once more on a new connection,
 * under the same producer id and sequences, by which the reader of their
 * shard knows a copy (see "Shards" in kd-redis-queue.c).
 *
 * Progress. The backlog is counted by a script over every stream, on the
 * producer's connection. Waiting for it subscribes to the queue's progress
 * channel, on a connection of its own, before counting, and counts again
 * at each message, so that it never polls. Trimming runs, on the
 * producer's connection, the script with which the shards' owners trim
 * their streams (kd_redis_conn_trim()).
 */

#include "config.h"

#include <string.h>

#include "kd-redis-queue-private.h"
#include "kd-sync-private.h"

/* Jobs per pipelined round trip in kd_redis_queue_add_many(). */
#define ADD_CHUNK 512

/* ---- Producing --------------------------------------------------------- */

static gboolean
producer_ready_locked (KdRedisQueue  *self,
                       GError       **error)
{
  gint shard;

  if (self->producer.where == NULL)
    {
      kd_redis_conn_init (&self->producer, &self->config.server, 10 * G_TIME_SPAN_SECOND);
      kd_redis_conn_set_name (&self->producer, self->config.name, "producer", self->member);
      self->streams = g_ptr_array_new_with_free_func (g_free);
      self->unusable = g_new0 (char *, self->config.n_shards + 1);
      for (shard = 0; shard < (gint) self->config.n_shards; shard++)
        g_ptr_array_add (self->streams, kd_redis_stream_name (self->config.name, shard));
      g_ptr_array_add (self->streams, kd_redis_stream_name (self->config.name, -1));
    }
  if (self->producer_ready && kd_redis_conn_is_connected (&self->producer))
    return TRUE;
  if (!kd_redis_conn_ensure (&self->producer, error) ||
      !kd_redis_conn_create_groups (&self->producer, self->config.name, self->config.n_shards,
                                    self->unusable, error))
    {
      kd_redis_conn_close (&self->producer);
      return FALSE;
    }
  self->producer_ready = TRUE;
  return TRUE;
}

/* The stream a job of @key goes to: its shard's, or the unkeyed one. */
static guint
stream_of (KdRedisQueue *self,
           const char   *key)
{
  return key != NULL ? kd_redis_queue_shard_for_key (self, key) : self->config.n_shards;
}

/* Whether every job's stream is usable; if one was set aside, looks at the
 * streams set aside once more first (it may have been repaired). FALSE with
 * G_IO_ERROR_INVALID_DATA naming the stream and Redis's reason. */
static gboolean
check_streams_usable_locked (KdRedisQueue  *self,
                             guint          n_jobs,
                             const char   **keys,
                             GError       **error)
{
  gboolean looked_again = FALSE;
  guint i;

  for (i = 0; i < n_jobs; i++)
    {
      guint stream = stream_of (self, keys[i]);

      if (self->unusable[stream] == NULL)
        continue;
      if (!looked_again)
        {
          looked_again = TRUE;
          if (!kd_redis_conn_create_groups_again (&self->producer, self->config.name,
                                                  self->config.n_shards, self->unusable, error))
            return FALSE;
          if (self->unusable[stream] == NULL)
            continue;
        }
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                   "Stream %s cannot take jobs, nothing was added: %s",
                   (const char *) g_ptr_array_index (self->streams, stream), self->unusable[stream]);
      return FALSE;
    }
  return TRUE;
}

static void
add_xadd (KdRedisQueue *self,
          KdRedisArgs  *args,
          const char   *key,
          GBytes       *payload,
          guint64       sequence)
{
  const char *stream;
  gconstpointer data;
  gsize len;

  stream = g_ptr_array_index (self->streams, stream_of (self, key));
  data = g_bytes_get_data (payload, &len);
  kd_redis_args_reset (args);
  kd_redis_args_add_string (args, "XADD");
  kd_redis_args_add_string (args, stream);
  kd_redis_args_add_string (args, "*");
  if (key != NULL)
    {
      kd_redis_args_add_string (args, "k");
      kd_redis_args_add_string (args, key);
    }
  kd_redis_args_add_string (args, "p");
  kd_redis_args_add (args, data, len);
  kd_redis_args_add_string (args, "pid");
  kd_redis_args_add_string (args, self->producer_id);
  kd_redis_args_add_string (args, "seq");
  kd_redis_args_add_printf (args, "%" G_GUINT64_FORMAT, sequence);
}

/* Reads @n_replies replies to XADD; counts them in @confirmed. */
static gboolean
read_add_replies_locked (KdRedisQueue  *self,
                         guint          n_replies,
                         guint         *confirmed,
                         GError       **error)
{
  guint i;

  for (i = 0; i < n_replies; i++)
    {
      redisReply *reply = kd_redis_conn_read (&self->producer, error);

      if (reply == NULL)
        return FALSE;
      kd_redis_reply_free (reply);
      (*confirmed)++;
    }
  return TRUE;
}

/* Sends the jobs from @from on, the job i under sequence @first_sequence +
 * i; @confirmed counts the ones Redis said it stored. Each chunk is
 * appended before the replies of the one before it are read (which sends
 * it): Redis adds a chunk while this thread reads the replies of the one
 * before and formats the next. */
static gboolean
send_jobs_locked (KdRedisQueue  *self,
                  guint          n_jobs,
                  const char   **keys,
                  GBytes       **payloads,
                  guint64        first_sequence,
                  guint          from,
                  guint         *confirmed,
                  GError       **error)
{
  KdRedisArgs args;
  gboolean ok = TRUE;
  guint start, i, unread = 0;

  kd_redis_args_init (&args);
  for (start = from; start < n_jobs && ok; start += ADD_CHUNK)
    {
      guint end = MIN (start + ADD_CHUNK, n_jobs);

      for (i = start; i < end && ok; i++)
        {
          add_xadd (self, &args, keys[i], payloads[i], first_sequence + i);
          ok = kd_redis_conn_append (&self->producer, &args, error);
        }
      ok = ok && read_add_replies_locked (self, unread, confirmed, error);
      unread = end - start;
    }
  ok = ok && read_add_replies_locked (self, unread, confirmed, error);
  kd_redis_args_clear (&args);

  return ok;
}

/* Redis closes the connection of a client that sends a string longer than
 * its proto-max-bulk-len: such a job is refused before anything is sent,
 * rather than sent again on a new connection and refused with an opaque
 * error. */
static gboolean
check_job_sizes (guint         n_jobs,
                 const char  **keys,
                 GBytes      **payloads,
                 GError      **error)
{
  guint i;

  for (i = 0; i < n_jobs; i++)
    {
      gsize key_len = keys[i] != NULL ? strlen (keys[i]) : 0;
      gsize payload_len = g_bytes_get_size (payloads[i]);

      if (key_len > KD_REDIS_QUEUE_MAX_FIELD_SIZE || payload_len > KD_REDIS_QUEUE_MAX_FIELD_SIZE)
        {
          g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                       "Job %u's %s is %" G_GSIZE_FORMAT " bytes long; a queue takes at most %" G_GSIZE_FORMAT,
                       i, key_len > KD_REDIS_QUEUE_MAX_FIELD_SIZE ? "key" : "payload",
                       MAX (key_len, payload_len), KD_REDIS_QUEUE_MAX_FIELD_SIZE);
          return FALSE;
        }
    }
  return TRUE;
}

/**
 * kd_redis_queue_add:
 * @self: a queue
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @payload: the job's bytes
 * @error: return location for an error
 *
 * Adds one job to the queue, in its key's shard: it runs after every job of
 * @key added before it, by whichever consumer process owns the shard then.
 * Returns once Redis stored it. Thread-safe (calls from several threads
 * take turns on one connection; for many jobs, kd_redis_queue_add_many()
 * is much faster).
 *
 * Returns: %TRUE if the job was stored; %FALSE with @error set (a
 *   %G_IO_ERROR) if Redis could not be reached or refused it, in which case
 *   it may or may not have been stored, or %G_IO_ERROR_INVALID_ARGUMENT,
 *   nothing sent, if @key or @payload is longer than
 *   %KD_REDIS_QUEUE_MAX_FIELD_SIZE
 *
 * Since: 0.1
 */
gboolean
kd_redis_queue_add (KdRedisQueue  *self,
                    const char    *key,
                    GBytes        *payload,
                    GError       **error)
{
  return kd_redis_queue_add_many (self, 1, &key, &payload, error);
}

/**
 * kd_redis_queue_add_many:
 * @self: a queue
 * @n_jobs: the number of jobs
 * @keys: (array length=n_jobs): the jobs' keys; a %NULL element adds an
 *   unkeyed job
 * @payloads: (array length=n_jobs): the jobs' bytes
 * @error: return location for an error
 *
 * Adds @n_jobs jobs, in order, pipelining them to Redis (a few hundred per
 * round trip). Thread-safe.
 *
 * If the connection fails once jobs were sent, the jobs Redis did not
 * confirm are sent once more on a new connection, under the same producer
 * id and sequences (kd_redis_entry_get_producer(),
 * kd_redis_entry_get_sequence()): a job stored twice that way runs once
 * (#KdRedisQueueStats.duplicates counts the copies).
 *
 * Returns: %TRUE if every job was stored; %FALSE with @error set: a
 *   %G_IO_ERROR if Redis could not be reached twice or refused one, in
 *   which case the jobs before it are stored and the rest may or may not
 *   be (added again by another call, they get new sequences, and may run
 *   twice); %G_IO_ERROR_INVALID_ARGUMENT, nothing sent, if a key or
 *   payload is longer than %KD_REDIS_QUEUE_MAX_FIELD_SIZE.
 *
 * Since: 0.1
 */
gboolean
kd_redis_queue_add_many (KdRedisQueue  *self,
                         guint          n_jobs,
                         const char   **keys,
                         GBytes       **payloads,
                         GError       **error)
{
  g_autoptr (GError) local_error = NULL;
  guint64 first_sequence;
  guint confirmed = 0, i;
  gboolean ok;

  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), FALSE);
  g_return_val_if_fail (n_jobs == 0 || (keys != NULL && payloads != NULL), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);
  for (i = 0; i < n_jobs; i++)
    g_return_val_if_fail (payloads[i] != NULL, FALSE);
  if (!check_job_sizes (n_jobs, keys, payloads, error))
    return FALSE;

  kd_mutex_lock (&self->producer_lock);
  g_atomic_int_set (&self->frozen, TRUE);
  first_sequence = self->sequence + 1;
  self->sequence += n_jobs;
  ok = producer_ready_locked (self, &local_error);
  if (ok && !check_streams_usable_locked (self, n_jobs, keys, &local_error))
    {
      /* Nothing was sent: the connection stays as it is. */
      kd_mutex_unlock (&self->producer_lock);
      g_propagate_error (error, g_steal_pointer (&local_error));
      return FALSE;
    }
  if (ok && !send_jobs_locked (self, n_jobs, keys, payloads, first_sequence, 0, &confirmed, &local_error))
    {
      ok = FALSE;
      /* A connection lost after sending took the replies of the jobs not
       * yet confirmed with it: Redis may have stored them or not. They are
       * sent once more, under the same producer id and sequences, so that
       * a consumer that reads both copies runs each job once. */
      if (!kd_redis_conn_is_connected (&self->producer))
        {
          g_debug ("redis queue %s: adding again %u jobs whose replies were lost: %s", self->config.name,
                   n_jobs - confirmed, local_error->message);
          g_clear_error (&local_error);
          ok = producer_ready_locked (self, &local_error) &&
               send_jobs_locked (self, n_jobs, keys, payloads, first_sequence, confirmed, &confirmed,
                                 &local_error);
        }
    }
  /* After an error reply the connection may hold replies of commands not
   * read: start afresh. */
  if (!ok)
    {
      kd_redis_conn_close (&self->producer);
      g_propagate_error (error, g_steal_pointer (&local_error));
    }
  kd_mutex_unlock (&self->producer_lock);

  return ok;
}

/* ---- Progress ---------------------------------------------------------- */

static gboolean
count_backlog_locked (KdRedisQueue  *self,
                      guint64       *backlog,
                      GError       **error)
{
  KdRedisArgs args;
  redisReply *reply;
  guint i;

  if (!producer_ready_locked (self, error))
    return FALSE;
  kd_redis_args_init (&args);
  kd_redis_args_add_script (&args, &self->producer, KD_REDIS_SCRIPT_BACKLOG, self->streams->len);
  for (i = 0; i < self->streams->len; i++)
    kd_redis_args_add_string (&args, g_ptr_array_index (self->streams, i));
  kd_redis_args_add_string (&args, KD_REDIS_GROUP);
  reply = kd_redis_conn_run (&self->producer, &args, error);
  kd_redis_args_clear (&args);
  if (reply == NULL)
    return FALSE;
  if (reply->type != REDIS_REPLY_INTEGER || reply->integer < 0)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                   "Redis at %s: unexpected reply to a count", self->producer.where);
      kd_redis_reply_free (reply);
      return FALSE;
    }
  *backlog = (guint64) reply->integer;
  kd_redis_reply_free (reply);
  return TRUE;
}

/**
 * kd_redis_queue_get_backlog:
 * @self: a queue
 * @backlog: (out): return location for the number of unfinished jobs
 * @error: return location for an error
 *
 * Counts the queue's unfinished jobs, whichever process added them or runs
 * them: added and not yet acknowledged or dead-lettered (not read yet,
 * running, or waiting for a retry). Thread-safe.
 *
 * Returns: %TRUE with @backlog set; %FALSE with @error set (a
 *   %G_IO_ERROR) if Redis could not be reached
 *
 * Since: 0.1
 */
gboolean
kd_redis_queue_get_backlog (KdRedisQueue  *self,
                            guint64       *backlog,
                            GError       **error)
{
  gboolean ok;

  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), FALSE);
  g_return_val_if_fail (backlog != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  kd_mutex_lock (&self->producer_lock);
  g_atomic_int_set (&self->frozen, TRUE);
  ok = count_backlog_locked (self, backlog, error);
  kd_mutex_unlock (&self->producer_lock);

  return ok;
}

/**
 * kd_redis_queue_wait_backlog:
 * @self: a queue
 * @at_most: the backlog to wait for
 * @timeout_us: how long to wait at most, in microseconds, or -1 for no
 *   limit
 * @error: return location for an error
 *
 * Blocks until the queue's backlog (kd_redis_queue_get_backlog()) is at
 * most @at_most: with 0, until every job added so far, by any process, has
 * finished. It does not poll: each consumer publishes on the Redis channel
 * named after the queue followed by ":progress" whenever it acknowledges
 * or dead-letters jobs, and the backlog is counted again then. Thread-safe;
 * never from a handler of a dispatcher that runs the queue's jobs, which
 * could wait for itself.
 *
 * Returns: %TRUE once the backlog is at most @at_most; %FALSE with @error
 *   set: %G_IO_ERROR_TIMED_OUT at the deadline, another %G_IO_ERROR if
 *   Redis could not be reached
 *
 * Since: 0.1
 */
gboolean
kd_redis_queue_wait_backlog (KdRedisQueue  *self,
                             guint64        at_most,
                             gint64         timeout_us,
                             GError       **error)
{
  g_autofree char *channel = NULL;
  gint64 now = g_get_monotonic_time ();
  /* A deadline past the end of time is no deadline. */
  gint64 deadline = timeout_us < 0 || timeout_us > G_MAXINT64 - now ? -1 : now + timeout_us;
  KdRedisConn subscriber;
  KdRedisArgs args;
  redisReply *reply;
  guint64 backlog;
  gboolean ok;

  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  channel = kd_redis_progress_channel (self->config.name);
  kd_redis_conn_init (&subscriber, &self->config.server, 10 * G_TIME_SPAN_SECOND);
  kd_redis_args_init (&args);
  kd_redis_args_add_string (&args, "SUBSCRIBE");
  kd_redis_args_add_string (&args, channel);
  reply = kd_redis_conn_run (&subscriber, &args, error);
  kd_redis_args_clear (&args);
  ok = reply != NULL;
  g_clear_pointer (&reply, kd_redis_reply_free);

  /* Subscribed before counting: progress made after a count is published
   * after it, and wakes the wait that follows. */
  while (ok)
    {
      ok = kd_redis_queue_get_backlog (self, &backlog, error);
      if (!ok || backlog <= at_most)
        break;

      reply = kd_redis_conn_read_until (&subscriber, deadline, error);
      ok = reply != NULL;
      g_clear_pointer (&reply, kd_redis_reply_free);
      /* The other messages already received say nothing more; an
       * unreadable one fails the wait, as a reply read above would. */
      while (ok && (ok = kd_redis_conn_read_received (&subscriber, &reply, error)) &&
             reply != NULL)
        g_clear_pointer (&reply, kd_redis_reply_free);
    }
  kd_redis_conn_clear (&subscriber);

  return ok;
}

/**
 * kd_redis_queue_trim:
 * @self: a queue
 * @trimmed: (out) (optional): return location for the number of entries
 *   removed
 * @error: return location for an error
 *
 * Removes from the queue's streams the entries that every consumer group
 * has acknowledged, and no other: each stream is trimmed (XTRIM MINID)
 * below its oldest entry still pending in some group, or not yet delivered
 * to it. The consumers do this on their own, once per lease time, for the
 * shards they own; call it to reclaim the memory at once, after a large
 * batch for instance. Thread-safe.
 *
 * Returns: %TRUE if trimmed; %FALSE with @error set (a %G_IO_ERROR) if
 *   Redis could not be reached
 *
 * Since: 0.1
 */
gboolean
kd_redis_queue_trim (KdRedisQueue  *self,
                     guint64       *trimmed,
                     GError       **error)
{
  guint64 count = 0;
  gboolean ok;

  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  kd_mutex_lock (&self->producer_lock);
  g_atomic_int_set (&self->frozen, TRUE);
  ok = producer_ready_locked (self, error) && kd_redis_conn_trim (&self->producer, self->streams, &count, error);
  kd_mutex_unlock (&self->producer_lock);
  if (ok && trimmed != NULL)
    *trimmed = count;

  return ok;
}
