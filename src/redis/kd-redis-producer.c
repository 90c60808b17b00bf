/* kd-redis-producer.c: the producer side of a KdRedisQueue
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * The producer side adds jobs to the queue's streams, and counts, awaits
 * and trims what they hold (the design of the whole queue, and its
 * reasons, are in kd-redis-queue.c). It is one router (kd-redis-router.c:
 * a connection to a lone server, or one per master of a cluster), used
 * under @producer_lock by whichever thread calls, set up at the first use;
 * after each new connection it creates the streams' consumer group, from
 * the streams' start, and checks the queue's number of shards
 * (kd_redis_create_groups()). A stream Redis refuses (a key of another
 * type, say) is noted in @unusable: an add to it fails at once, nothing
 * sent, after one more look at the streams set aside (one command each),
 * and the adds to the other streams go on.
 *
 * Adding. A job is an XADD to its key's shard (or the unkeyed stream),
 * on that stream's node, with its key, its payload, the producer's id and
 * its next sequence, which name it. The XADDs are pipelined ADD_CHUNK at a
 * time; on a lone server, a chunk is appended before the replies of the
 * one before it are read, so that Redis adds a chunk while this thread
 * reads the replies of the one before and formats the next. Each node's
 * share of a chunk ends
 * with WAIT for kd_redis_queue_get_min_replicas() replicas (by default 1
 * on a cluster): a job counts as stored once that many replicas have it,
 * as Redis replicates asynchronously and a master's failover loses what it
 * had not passed on. A connection lost
 * after sending took the replies of the jobs not yet confirmed: they are
 * sent once more, under the same producer id and sequences, by which the
 * reader of their shard knows a copy (see "Shards" in kd-redis-queue.c);
 * on a cluster, again and again for PRODUCER_TIMEOUT_US, the time a
 * failover takes, on the new map. Within one attempt, nothing more is sent
 * to a node once it failed, and a node is never connected again, so that
 * no later job of a key is stored before an earlier one sent again. For
 * the same reason, on a cluster, each stream's share of a chunk is one
 * transaction (all stored or none: a cluster whose state comes back in
 * the middle of a pipeline would store a key's later jobs and refuse its
 * earlier ones), and a chunk's replies are read before the next chunk is
 * sent.
 *
 * Progress. The backlog is counted by a script per slot over its streams
 * (kd_redis_run_per_slot()). Waiting for it subscribes to the queue's
 * progress channel, on a connection of its own, before counting, and
 * counts again at each message, so that it never polls; on a cluster, a
 * message published on any node reaches every node's subscribers, and a
 * failover is waited through. Trimming runs, per slot, the script with
 * which the shards' owners trim their streams.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-queue-private.h"
#include "kd-redis-streams-private.h"
#include "kd-sync-private.h"

/* Jobs per pipelined round trip in kd_redis_queue_add_many(). */
#define ADD_CHUNK 512

/* The producer's connect, read and write timeout; on a cluster, how long
 * kd_redis_queue_add_many() sends again what was not stored (a master
 * that died is replaced by its replica within it); a tenth of it, how
 * long a node waits for its replicas to confirm what it stored. */
#define PRODUCER_TIMEOUT_US (10 * G_TIME_SPAN_SECOND)

/* On a cluster, the pause between two attempts at the jobs not stored. */
#define RESEND_PAUSE_US ((gulong) 100 * 1000)

/* ---- Producing --------------------------------------------------------- */

/* Whether @error lasts until someone acts, so that sending again cannot
 * cure it: a login or permission refused, a TLS certificate refused, a
 * queue with another number of shards. */
static gboolean
failure_lasts (const GError *error)
{
  return g_error_matches (error, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED) ||
         g_error_matches (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT) ||
         error->domain == G_TLS_ERROR;
}

static gboolean
producer_ready_locked (KdRedisQueue  *self,
                       GError       **error)
{
  GError *local_error = NULL;
  gint shard;

  if (self->streams == NULL)
    {
      kd_redis_router_init (&self->producer, &self->config.server, PRODUCER_TIMEOUT_US);
      kd_redis_router_set_name (&self->producer, self->config.name, "producer", self->member);
      self->streams = g_ptr_array_new_with_free_func (g_free);
      self->unusable = g_new0 (char *, self->config.n_shards + 1);
      for (shard = 0; shard < (gint) self->config.n_shards; shard++)
        g_ptr_array_add (self->streams, kd_redis_stream_name (self->config.name, shard));
      g_ptr_array_add (self->streams, kd_redis_stream_name (self->config.name, -1));
    }
  if (!kd_redis_router_update (&self->producer, error))
    return FALSE;
  if (!kd_redis_router_needs_check (&self->producer))
    return TRUE;
  if (kd_redis_create_groups (&self->producer, self->config.name, self->config.n_shards,
                              self->unusable, &local_error))
    {
      kd_redis_router_checked (&self->producer);
      return TRUE;
    }
  /* On a cluster, a node that fails costs the jobs of its own streams,
   * which fail when sent: the others go on. */
  if (self->config.server.cluster && !failure_lasts (local_error))
    {
      g_debug ("redis queue %s: producer: %s", self->config.name, local_error->message);
      g_error_free (local_error);
      return TRUE;
    }
  g_propagate_error (error, local_error);
  return FALSE;
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
          if (!kd_redis_create_groups_again (&self->producer, self->config.name,
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

/* One attempt of kd_redis_queue_add_many(): where each job's XADD went,
 * and what came back. */
typedef struct
{
  guint          n_jobs;
  gboolean      *stored;         /* per job: Redis said it stored it (and replicas have it) */
  KdRedisConn  **sent_to;        /* per job: its node this attempt, or NULL */
  gboolean      *answered;       /* per job: its XADD succeeded this attempt */
  GPtrArray     *used;           /* KdRedisConn *: the nodes sent to this attempt */
  GPtrArray     *failed;         /* KdRedisConn *: the nodes that failed this attempt */
  GError        *failure;        /* the first failure that sending again may cure */
  GError        *refusal;        /* the first one it cannot (an error reply) */
} AddRound;

static void
add_round_fail (GError **where,
                GError  *error)
{
  if (*where == NULL)
    *where = error;
  else
    g_error_free (error);
}

/* A node failed this attempt: nothing more is sent to it until the next,
 * so that no later job of a key is stored before an earlier one that
 * must be sent again. */
static void
add_round_node_failed (KdRedisQueue *self,
                       AddRound     *round,
                       KdRedisConn  *conn,
                       GError       *error)
{
  kd_redis_router_failed (&self->producer, conn);
  if (!g_ptr_array_find (round->failed, conn, NULL))
    g_ptr_array_add (round->failed, conn);
  add_round_fail (&round->failure, error);
}

/* A reply read on @conn failed with @error: the node failed (an I/O
 * error, a redirection), or Redis refused the command. */
static void
add_round_reply_failed (KdRedisQueue *self,
                        AddRound     *round,
                        KdRedisConn  *conn,
                        GError       *error)
{
  if (!kd_redis_conn_is_connected (conn) || kd_redis_error_is_redirection (error))
    add_round_node_failed (self, round, conn, error);
  else
    add_round_fail (&round->refusal, error);
}

/* Picks the next ADD_CHUNK jobs not stored yet, from *@next on, whose node
 * has not failed this attempt, and connects their nodes. A node already
 * sent to this attempt is never connected again within it: the replies a
 * lost connection took would be read on the new one. */
static void
pick_chunk_locked (KdRedisQueue  *self,
                   AddRound      *round,
                   const char   **keys,
                   guint         *next,
                   GArray        *chunk)
{
  g_array_set_size (chunk, 0);
  for (; *next < round->n_jobs && chunk->len < ADD_CHUNK && round->refusal == NULL; (*next)++)
    {
      const char *stream = g_ptr_array_index (self->streams, stream_of (self, keys[*next]));
      KdRedisConn *node = kd_redis_router_peek (&self->producer, kd_redis_key_slot (stream, strlen (stream)));
      GError *error = NULL;
      KdRedisConn *conn;

      if (round->stored[*next] || (node != NULL && g_ptr_array_find (round->failed, node, NULL)))
        continue;
      if (node != NULL && g_ptr_array_find (round->used, node, NULL) && !kd_redis_conn_is_connected (node))
        {
          g_set_error (&error, G_IO_ERROR, G_IO_ERROR_NOT_CONNECTED, "Redis at %s: connection lost", node->where);
          add_round_node_failed (self, round, node, error);
          continue;
        }
      conn = kd_redis_router_conn_for (&self->producer, stream, &error);
      if (conn == NULL)
        {
          /* Not connected: nothing more goes to the node this attempt. */
          if (node != NULL)
            g_ptr_array_add (round->failed, node);
          add_round_fail (&round->failure, error);
          continue;
        }
      if (!g_ptr_array_find (round->used, conn, NULL))
        g_ptr_array_add (round->used, conn);
      round->sent_to[*next] = conn;
      g_array_append_val (chunk, *next);
    }
}

/* A lone server: reads the reply of each plain XADD of @chunk. */
static void
read_xadds_locked (KdRedisQueue *self,
                   AddRound     *round,
                   GArray       *chunk)
{
  guint i;

  for (i = 0; i < chunk->len; i++)
    {
      guint job = g_array_index (chunk, guint, i);
      GError *error = NULL;
      redisReply *reply = kd_redis_conn_read (round->sent_to[job], &error);

      if (reply != NULL)
        {
          round->answered[job] = TRUE;
          kd_redis_reply_free (reply);
        }
      else
        add_round_reply_failed (self, round, round->sent_to[job], error);
    }
}

/* A cluster: @order holds @chunk's jobs grouped by stream, each group
 * (@ends: where each ends in @order) sent as one transaction (MULTI, its
 * XADDs in order, EXEC), so that a stream's jobs of a chunk are stored
 * all or none: a cluster that says CLUSTERDOWN for some and, its state
 * back, stores the ones after them would store a key's later jobs before
 * its earlier ones. Reads the transactions' replies. */
static void
read_transactions_locked (KdRedisQueue *self,
                          AddRound     *round,
                          GArray       *order,
                          GArray       *ends)
{
  guint t, i, start = 0;

  for (t = 0; t < ends->len; t++)
    {
      guint end = g_array_index (ends, guint, t);
      KdRedisConn *conn = round->sent_to[g_array_index (order, guint, start)];
      GError *error = NULL;
      gboolean ok;

      /* +OK, a +QUEUED per XADD, then EXEC's array. */
      for (i = start; i <= end; i++)
        {
          GError *local_error = NULL;
          redisReply *reply = kd_redis_conn_read (conn, &local_error);

          g_clear_pointer (&reply, kd_redis_reply_free);
          if (local_error != NULL && error == NULL)
            error = local_error;
          else
            g_clear_error (&local_error);
        }
      {
        GError *local_error = NULL;
        redisReply *exec = kd_redis_conn_read (conn, &local_error);

        ok = exec != NULL && exec->type == REDIS_REPLY_ARRAY && exec->elements == end - start;
        /* An XADD that failed inside (a key of another type) fails the
         * others of its stream too. */
        for (i = 0; ok && i < exec->elements; i++)
          if (exec->element[i]->type == REDIS_REPLY_ERROR)
            {
              g_set_error (&local_error, G_IO_ERROR, G_IO_ERROR_FAILED, "Redis at %s: %s", conn->where,
                           exec->element[i]->str);
              ok = FALSE;
            }
        if (exec != NULL && !ok && local_error == NULL)
          g_set_error (&local_error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                       "Redis at %s: unexpected reply to EXEC", conn->where);
        g_clear_pointer (&exec, kd_redis_reply_free);
        if (local_error != NULL && error == NULL)
          error = local_error;
        else
          g_clear_error (&local_error);
      }
      for (i = start; i < end && ok; i++)
        round->answered[g_array_index (order, guint, i)] = TRUE;
      if (!ok)
        add_round_reply_failed (self, round, conn, error);
      else
        g_clear_error (&error);
      start = end;
    }
}

/* Reads the WAITs appended on the nodes in @waits after @chunk's jobs: a
 * job is stored once its XADD succeeded and, if the queue asks for it,
 * enough replicas confirmed it (kd_redis_queue_set_min_replicas()). */
static void
confirm_chunk_locked (KdRedisQueue *self,
                      AddRound     *round,
                      GArray       *chunk,
                      GPtrArray    *waits)
{
  guint min_replicas = kd_redis_queue_get_min_replicas (self);
  guint i, w;

  for (w = 0; w < waits->len; w++)
    {
      KdRedisConn *conn = g_ptr_array_index (waits, w);
      GError *error = NULL;
      redisReply *reply = kd_redis_conn_read (conn, &error);
      gboolean replicated = reply != NULL && reply->type == REDIS_REPLY_INTEGER &&
                            reply->integer >= (long long) min_replicas;

      if (reply != NULL && !replicated)
        g_set_error (&error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT,
                     "Redis at %s: fewer replicas than %u confirmed the jobs it stored in time", conn->where,
                     min_replicas);
      g_clear_pointer (&reply, kd_redis_reply_free);
      if (error != NULL)
        add_round_node_failed (self, round, conn, error);
      for (i = 0; i < chunk->len; i++)
        {
          guint job = g_array_index (chunk, guint, i);

          if (round->sent_to[job] == conn && !replicated)
            round->answered[job] = FALSE;
        }
    }

  for (i = 0; i < chunk->len; i++)
    {
      guint job = g_array_index (chunk, guint, i);

      if (round->answered[job])
        round->stored[job] = TRUE;
    }
}

/* Appends @chunk's jobs, on a cluster one transaction per stream (see
 * read_transactions_locked()), filling @order and @ends. */
static void
append_chunk_locked (KdRedisQueue  *self,
                     AddRound      *round,
                     GArray        *chunk,
                     const char   **keys,
                     GBytes       **payloads,
                     guint64        first_sequence,
                     GArray        *order,
                     GArray        *ends)
{
  gboolean cluster = kd_redis_router_is_cluster (&self->producer);
  gboolean *done = g_new0 (gboolean, MAX (chunk->len, 1));
  KdRedisArgs args, multi, exec;
  guint i, j;

  kd_redis_args_init (&args);
  kd_redis_args_init (&multi);
  kd_redis_args_init (&exec);
  kd_redis_args_add_string (&multi, "MULTI");
  kd_redis_args_add_string (&exec, "EXEC");
  g_array_set_size (order, 0);
  g_array_set_size (ends, 0);
  for (i = 0; i < chunk->len; i++)
    {
      guint job = g_array_index (chunk, guint, i);
      guint stream = stream_of (self, keys[job]);
      KdRedisConn *conn = round->sent_to[job];

      if (done[i])
        continue;
      if (cluster)
        kd_redis_conn_append (conn, &multi, NULL);
      for (j = i; j < chunk->len; j++)
        {
          guint other = g_array_index (chunk, guint, j);

          if (done[j] || (j > i && (!cluster || stream_of (self, keys[other]) != stream)))
            continue;
          done[j] = TRUE;
          add_xadd (self, &args, keys[other], payloads[other], first_sequence + other);
          kd_redis_conn_append (conn, &args, NULL);
          g_array_append_val (order, other);
        }
      if (cluster)
        {
          kd_redis_conn_append (conn, &exec, NULL);
          g_array_append_val (ends, order->len);
        }
    }
  kd_redis_args_clear (&args);
  kd_redis_args_clear (&multi);
  kd_redis_args_clear (&exec);
  g_free (done);
}

/* Sends the jobs not stored yet, the job i under sequence @first_sequence +
 * i, each to the node of its stream, ADD_CHUNK at a time; each node's
 * share of a chunk ends with a WAIT for the replicas the queue asks for
 * (by default one on a cluster, none on a lone server), so that a job
 * counts as stored only once a failover would keep it. On a lone server,
 * each chunk is appended before the replies of the one before it are read
 * (which sends it): Redis adds a chunk while this thread reads the replies
 * of the one before and formats the next. On a cluster, a chunk's replies
 * are read before the next is sent, and each stream's share of a chunk is
 * a transaction (read_transactions_locked()): once a node refused a job,
 * nothing later of its streams is sent before the next attempt. */
static void
send_jobs_locked (KdRedisQueue  *self,
                  AddRound      *round,
                  const char   **keys,
                  GBytes       **payloads,
                  guint64        first_sequence)
{
  g_autoptr (GArray) chunk = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) unread = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) order = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) ends = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GPtrArray) waits = g_ptr_array_new ();
  g_autoptr (GPtrArray) unread_waits = g_ptr_array_new ();
  gboolean cluster = kd_redis_router_is_cluster (&self->producer);
  guint min_replicas = kd_redis_queue_get_min_replicas (self);
  KdRedisArgs wait;
  guint next = 0, i;

  kd_redis_args_init (&wait);
  kd_redis_args_add_string (&wait, "WAIT");
  kd_redis_args_add_printf (&wait, "%u", min_replicas);
  kd_redis_args_add_printf (&wait, "%" G_GINT64_FORMAT, PRODUCER_TIMEOUT_US / 10 / 1000);
  memset (round->sent_to, 0, round->n_jobs * sizeof (KdRedisConn *));
  memset (round->answered, 0, round->n_jobs * sizeof (gboolean));
  g_ptr_array_set_size (round->used, 0);
  g_ptr_array_set_size (round->failed, 0);

  do
    {
      pick_chunk_locked (self, round, keys, &next, chunk);
      append_chunk_locked (self, round, chunk, keys, payloads, first_sequence, order, ends);
      g_ptr_array_set_size (waits, 0);
      for (i = 0; i < chunk->len && min_replicas > 0; i++)
        {
          KdRedisConn *conn = round->sent_to[g_array_index (chunk, guint, i)];

          if (!g_ptr_array_find (waits, conn, NULL))
            {
              kd_redis_conn_append (conn, &wait, NULL);
              g_ptr_array_add (waits, conn);
            }
        }
      kd_redis_router_flush (&self->producer);

      if (cluster)
        {
          read_transactions_locked (self, round, order, ends);
          confirm_chunk_locked (self, round, chunk, waits);
          continue;
        }
      read_xadds_locked (self, round, unread);
      confirm_chunk_locked (self, round, unread, unread_waits);
      g_array_set_size (unread, 0);
      g_array_append_vals (unread, chunk->data, chunk->len);
      g_ptr_array_set_size (unread_waits, 0);
      for (i = 0; i < waits->len; i++)
        g_ptr_array_add (unread_waits, g_ptr_array_index (waits, i));
    }
  while (chunk->len > 0);

  kd_redis_args_clear (&wait);
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
  GError *local_error = NULL;
  AddRound round = { n_jobs, NULL, NULL, NULL, NULL, NULL, NULL, NULL };
  guint64 first_sequence;
  gint64 give_up;
  gboolean cluster, ok, sent = FALSE;
  guint attempt, i, n_stored;

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
  cluster = self->config.server.cluster;
  give_up = g_get_monotonic_time () + PRODUCER_TIMEOUT_US;
  ok = producer_ready_locked (self, &local_error);
  if (ok && !check_streams_usable_locked (self, n_jobs, keys, &local_error))
    {
      /* Nothing was sent: the connections stay as they are. */
      kd_mutex_unlock (&self->producer_lock);
      g_propagate_error (error, local_error);
      return FALSE;
    }

  round.stored = g_new0 (gboolean, MAX (n_jobs, 1));
  round.sent_to = g_new0 (KdRedisConn *, MAX (n_jobs, 1));
  round.answered = g_new0 (gboolean, MAX (n_jobs, 1));
  round.used = g_ptr_array_new ();
  round.failed = g_ptr_array_new ();
  for (attempt = 0;; attempt++)
    {
      if (ok)
        {
          sent = TRUE;
          send_jobs_locked (self, &round, keys, payloads, first_sequence);
          ok = round.failure == NULL && round.refusal == NULL;
        }
      if (ok || round.refusal != NULL)
        break;
      if (local_error == NULL)
        local_error = g_steal_pointer (&round.failure);
      g_clear_error (&round.failure);
      if (failure_lasts (local_error))
        break;
      /* A connection lost after sending took the replies of the jobs not
       * yet stored with it: Redis may have stored them or not. They are
       * sent once more, under the same producer id and sequences, so that
       * a consumer that reads both copies runs each job once (on a lone
       * server only if something was sent: a server that cannot be
       * reached fails the call at once); on a cluster, again and again
       * while a node is replaced, for at most PRODUCER_TIMEOUT_US. */
      if (cluster ? g_get_monotonic_time () >= give_up : attempt >= 1 || !sent)
        break;
      for (i = 0, n_stored = 0; i < n_jobs; i++)
        n_stored += round.stored[i] ? 1 : 0;
      g_debug ("redis queue %s: adding again %u jobs not stored: %s", self->config.name,
               n_jobs - n_stored, local_error->message);
      if (cluster && attempt > 0)
        g_usleep (RESEND_PAUSE_US);
      g_clear_error (&local_error);
      ok = producer_ready_locked (self, &local_error);
    }
  if (!ok)
    {
      /* After an error reply a connection may hold replies of commands
       * not read: start afresh. */
      kd_redis_router_close (&self->producer);
      if (round.refusal != NULL)
        {
          g_clear_error (&local_error);
          local_error = g_steal_pointer (&round.refusal);
        }
      g_propagate_error (error, local_error);
    }
  else
    g_clear_error (&local_error);
  g_clear_error (&round.failure);
  g_clear_error (&round.refusal);
  g_free (round.stored);
  g_free (round.sent_to);
  g_free (round.answered);
  g_ptr_array_unref (round.used);
  g_ptr_array_unref (round.failed);
  kd_mutex_unlock (&self->producer_lock);

  return ok;
}

/* ---- Progress ---------------------------------------------------------- */

/* Runs @script per slot over the queue's streams (kd_redis_run_per_slot()),
 * adding what it answers to @sum; once more, on the map read again, if a
 * node answered that its slots moved (an operator's failover, a reshard):
 * from zero again if @from_zero (a count), else adding (a trim, which
 * trims nothing twice). */
static gboolean
run_per_slot_locked (KdRedisQueue        *self,
                     KdRedisScript        script,
                     const char * const  *argv,
                     gboolean             from_zero,
                     guint64             *sum,
                     GError             **error)
{
  GError *local_error = NULL;
  guint attempt;

  for (attempt = 0; attempt < 2; attempt++)
    {
      g_clear_error (&local_error);
      if (from_zero)
        *sum = 0;
      if (producer_ready_locked (self, &local_error) &&
          kd_redis_run_per_slot (&self->producer, script, self->streams, argv, sum, &local_error))
        return TRUE;
      if (!kd_redis_error_is_redirection (local_error))
        break;
    }
  g_propagate_error (error, local_error);
  return FALSE;
}

static gboolean
count_backlog_locked (KdRedisQueue  *self,
                      guint64       *backlog,
                      GError       **error)
{
  const char *const argv[] = { KD_REDIS_GROUP, NULL };

  return run_per_slot_locked (self, KD_REDIS_SCRIPT_BACKLOG, argv, TRUE, backlog, error);
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

/* A connection subscribed to @channel, on the node of its name's slot. */
static KdRedisConn *
subscribe (KdRedisRouter  *router,
           const char     *channel,
           GError        **error)
{
  KdRedisConn *conn = NULL;
  KdRedisArgs args;
  redisReply *reply;

  if (!kd_redis_router_update (router, error) ||
      (conn = kd_redis_router_conn_for (router, channel, error)) == NULL)
    return NULL;
  kd_redis_args_init (&args);
  kd_redis_args_add_string (&args, "SUBSCRIBE");
  kd_redis_args_add_string (&args, channel);
  reply = kd_redis_conn_run (conn, &args, error);
  kd_redis_args_clear (&args);
  if (reply == NULL)
    {
      kd_redis_router_failed (router, conn);
      return NULL;
    }
  kd_redis_reply_free (reply);
  return conn;
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
  gint64 failing_since = -1;
  KdRedisRouter router;
  KdRedisConn *subscriber = NULL;
  redisReply *reply;
  guint64 backlog;
  gboolean ok;

  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  channel = kd_redis_progress_channel (self->config.name);
  kd_redis_router_init (&router, &self->config.server, PRODUCER_TIMEOUT_US);
  for (;;)
    {
      GError *local_error = NULL;

      /* Subscribed before counting: progress made after a count is
       * published after it, and wakes the wait that follows. On a
       * cluster, a message published on any node reaches every node's
       * subscribers. */
      if (subscriber == NULL)
        subscriber = subscribe (&router, channel, &local_error);
      ok = subscriber != NULL && kd_redis_queue_get_backlog (self, &backlog, &local_error);
      if (ok && backlog <= at_most)
        break;
      if (ok)
        {
          reply = kd_redis_conn_read_until (subscriber, deadline, &local_error);
          ok = reply != NULL;
          g_clear_pointer (&reply, kd_redis_reply_free);
          /* The other messages already received say nothing more; an
           * unreadable one fails the wait, as a reply read above would. */
          while (ok && (ok = kd_redis_conn_read_received (subscriber, &reply, &local_error)) &&
                 reply != NULL)
            g_clear_pointer (&reply, kd_redis_reply_free);
        }
      if (ok)
        {
          failing_since = -1;
          continue;
        }

      /* On a cluster, a node that fails is replaced by its replica within
       * moments: the wait goes on, for PRODUCER_TIMEOUT_US of failures at
       * most. */
      now = g_get_monotonic_time ();
      if (failing_since < 0)
        failing_since = now;
      if (!self->config.server.cluster || g_error_matches (local_error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT) ||
          (deadline >= 0 && now >= deadline) || now - failing_since >= PRODUCER_TIMEOUT_US)
        {
          g_propagate_error (error, local_error);
          break;
        }
      g_debug ("redis queue %s: waiting for the backlog: %s", self->config.name, local_error->message);
      g_error_free (local_error);
      if (subscriber != NULL)
        kd_redis_router_failed (&router, g_steal_pointer (&subscriber));
      g_usleep (RESEND_PAUSE_US);
    }
  kd_redis_router_clear (&router);

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
  ok = run_per_slot_locked (self, KD_REDIS_SCRIPT_TRIM, NULL, FALSE, &count, error);
  kd_mutex_unlock (&self->producer_lock);
  if (ok && trimmed != NULL)
    *trimmed = count;

  return ok;
}
