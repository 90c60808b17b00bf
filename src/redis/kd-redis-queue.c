/* kd-redis-queue.c: keyed jobs shared by many processes through Redis Streams
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A KdRedisQueue carries jobs (a key, or none, and payload bytes) from any
 * number of producer processes to any number of consumer processes, on one
 * machine or many, through one Redis server. It guarantees what a
 * KdDispatcher guarantees inside one process, across all of them: the jobs
 * of one key run one at a time, in the order they were added; and no job is
 * lost when a process is killed, frozen, or Redis restarts from its
 * append-only file. Delivery is at least once: a job whose process died
 * after running it and before its acknowledgement reached Redis runs again,
 * and such repeats are bounded by the batch size per process (below).
 *
 * Shards. A queue named N has P shards, fixed when it is first used (Redis
 * keeps P in the hash N:meta and refuses another). A keyed job goes to the
 * stream N:{p} with p = fnv1a32 (key) % P; unkeyed jobs go to N:{u}, read by
 * every consumer as competing consumers. An entry's fields are k (the key),
 * p (the payload), and pid + seq: the producer's id and its count of jobs,
 * which name the job. A producer whose connection fails after sending adds
 * the jobs it got no reply for once more, under the same names; as a
 * producer's sequences grow in the order it adds, the reader of a shard
 * knows a copy by a sequence not above the highest it read from that
 * producer, and acknowledges it without running it. (A copy read by
 * another consumer than its original, across a takeover, runs again, as
 * any job a dead consumer did not acknowledge does.) Every
 * stream is read through one consumer group, "kd", created at id 0 so that
 * jobs added before any consumer ran are read. Streams are never trimmed
 * with MAXLEN: once per lease time, the owner of a shard trims its stream
 * with XTRIM MINID below the oldest entry that some consumer group has not
 * acknowledged (pending, or not yet delivered), so the streams hold what is
 * unfinished and little more (kd_redis_queue_trim() does it on demand). In
 * the same round it deletes from its streams' group the consumers of
 * members gone (no beat for a lease, idle for two) that hold nothing
 * pending, once a takeover claimed what they held: the groups list the
 * live consumers and few others.
 *
 * Ownership. Each consumer process is a member named host-pid-random. It
 * beats every sixth of the lease time in the sorted set N:members, scored
 * with the server's clock (TIME, inside the script), so that members' clocks
 * never meet; a member is live while its last beat is less than a lease
 * old. Shard p belongs to the live member with the highest
 * mix (member, p) (rendezvous hashing): every member computes the same owners
 * from the same list, and a member joining or leaving moves only its share.
 * Owning is holding the lease N:{p}:lease: taken with SET NX PX, renewed
 * with a compare-and-renew script, released with a compare-and-delete
 * script (the value is the member's name). A member gives up a shard it no
 * longer should own only once the shard's jobs in flight have ended and
 * their acknowledgements are sent (state DRAINING); it takes a shard only
 * when none of the shard's entries is in flight in it.
 *
 * Takeover. A member that just took a shard first claims every pending
 * entry of its stream, the previous owner's and its own, with XAUTOCLAIM
 * (idle time 0) from 0-0 until the cursor returns to 0-0, and submits them
 * in id order; only then does it read new entries with XREADGROUP ">". So a
 * key's entries that the old owner had read and not acknowledged run again,
 * before the key's later ones: per-key order holds across the takeover.
 *
 * Fencing. Every read (XREADGROUP and XAUTOCLAIM), acknowledgement and dead
 * letter acts only while the member still holds the shard's lease. So a
 * member that was frozen past its lease cannot, once resumed, read entries
 * (which would sit in its pending list, skipped by the new owner's ">") or
 * acknowledge them: its late acknowledgements are refused, and the new
 * owner, which claimed them, runs them. XAUTOCLAIM, rare, is a script that
 * checks the lease first. Reads and acknowledgements, which carry every
 * entry, are not: the leases are WATCHed and read with MGET, and
 * XREADGROUP or XACK run in a MULTI that Redis refuses if a lease changed
 * or expired in between (a script would carry each entry through Lua and
 * back, which costs Redis more than the commands themselves). Locally, each shard has a deadline (the time the
 * last renewal was sent, plus the lease, minus a third of it): no job of a
 * shard starts from then on, so a member stops well before anyone else may
 * take the shard. A shard whose lease was lost or whose deadline passed is
 * fenced: its generation changes, so its entries still queued in the
 * dispatcher are skipped (left pending, for the next owner, which may be
 * this member again, after a new takeover). A job that started in time and
 * runs longer than the margin may overlap its rerun by the next owner: jobs
 * should be much shorter than a third of the lease.
 *
 * Execution. Entries feed a KdDispatcher created by
 * kd_redis_queue_new_dispatcher(), keyed by the entry's key, so one process
 * runs many keys of a shard in parallel while each key keeps its order. Its
 * handler is a wrapper: it checks the shard's generation and deadline,
 * calls the user's handler, and reports the outcome. The outcome is sent by
 * the acker thread (see kd-redis-consumer.c), after the job ended:
 * whatever ended since the last round is sent in one transaction, one XACK
 * per shard in the order the jobs ended. A process holds at most
 * batch-size entries read and not yet acknowledged (refused or skipped), so
 * a crash reruns at most that many. Each transaction also publishes on the
 * channel N:progress, so that kd_redis_queue_wait_backlog() waits for the
 * queue to drain without polling.
 *
 * Failure. A failed job is retried by the dispatcher, in its key's place,
 * with exponential backoff (kd_redis_queue_set_retry()); after the last
 * attempt it is added to the stream N:dead (with its stream, id, key,
 * payload, producer, attempts and error) and acknowledged, in one script.
 * Cancelling the dispatcher's cancellable stops reading, skips the queued
 * entries, and releases every lease at once, so other members take the
 * shards without waiting for the leases to expire.
 *
 * Threads. hiredis's blocking API on three dedicated threads, each with
 * its own connection, rather than the asynchronous API on a main loop:
 * every step of the protocol is then a plain sequence (claim, read, submit;
 * beat, renew; acknowledge) whose failure handling reads top to bottom, and
 * nothing depends on a main loop the application may not run. The lease
 * thread does nothing but membership and leases, so a renewal never waits
 * behind a read (the reader may block in the dispatcher's submit, for
 * backpressure) or an acknowledgement (a large one, on a loaded Redis,
 * took a few hundred milliseconds in tests). The other threads wake the
 * reader from XREAD BLOCK by adding to the member's stream N:wake:member,
 * which the XREAD also waits on: unlike CLIENT UNBLOCK, a wake-up sent
 * before the XREAD reaches Redis is not lost. kd-redis-consumer.c tells
 * how the threads fit. The producer side is one more connection, used
 * under a lock by whichever thread adds jobs; it pipelines its XADDs, a
 * chunk in flight while the next is formatted.
 *
 * Cost. With Redis's append-only file on, most of a job's cost is Redis's
 * own: XREADGROUP records each entry in the pending lists and logs an
 * XCLAIM per entry to the AOF, and XACK undoes both. The client side keeps
 * its share small: replies are built in one arena per reply rather than an
 * allocation per string (kd-redis-conn.c), and commands are formatted into
 * one buffer.
 *
 * Redis Cluster: a shard's stream and lease share a hash tag, but the
 * membership and multi-shard scripts assume one server.
 */

#include "config.h"

#include <string.h>
#include <unistd.h>

#include "kd-redis-conn-private.h"
#include "kd-redis-consumer-private.h"
#include "kd-redis-queue.h"
#include "kd-sync-private.h"

/* Jobs per pipelined round trip in kd_redis_queue_add_many(). */
#define ADD_CHUNK 512

struct _KdRedisQueue
{
  GObject          parent_instance;

  /* Configuration: before the first add or kd_redis_queue_new_dispatcher() */
  KdRedisConfig    config;
  char            *member;

  /* Atomic */
  gint             frozen;       /* used: the configuration is fixed */

  /* Protected by @producer_lock */
  GMutex           producer_lock;
  KdRedisConn      producer;
  gboolean         producer_ready;
  GPtrArray       *streams;      /* char *: each shard's stream, then the unkeyed one */
  char            *producer_id;
  guint64          sequence;

  /* Used from the thread that owns the queue; @consumer, set once, is read
   * atomically by kd_redis_queue_get_stats() from any thread */
  KdRedisConsumer *consumer;
  KdDispatcher    *dispatcher;
};

/**
 * KdRedisQueue:
 *
 * Keyed jobs shared by many processes, on one machine or many, through
 * Redis Streams: each key's jobs run one at a time, in the order they were
 * added, and none is lost when a process dies, freezes, or Redis restarts
 * from its append-only file.
 *
 * Producers add jobs with kd_redis_queue_add() or
 * kd_redis_queue_add_many(). A consumer process creates the dispatcher
 * that runs its share with kd_redis_queue_new_dispatcher() and joins with
 * kd_redis_queue_start(); the processes divide the queue's shards among
 * themselves, and take over the shards of one that stops beating.
 * Delivery is at least once: a process that dies may leave up to
 * kd_redis_queue_get_batch_size() jobs that ran and were not acknowledged,
 * which run again elsewhere, in their key's order.
 *
 * Since: 0.1
 */
G_DEFINE_FINAL_TYPE (KdRedisQueue, kd_redis_queue, G_TYPE_OBJECT)

/* The dispatcher's handler data: the user's handler and the consumer. */
typedef struct
{
  KdRedisConsumer *consumer;
  KdHandlerFunc    handler;
  gpointer         user_data;
  GDestroyNotify   user_data_free;
} Feed;

static void
kd_redis_queue_finalize (GObject *object)
{
  KdRedisQueue *self = KD_REDIS_QUEUE (object);

  if (self->consumer != NULL)
    kd_redis_consumer_stop (self->consumer);
  g_clear_object (&self->dispatcher);
  g_clear_pointer (&self->consumer, kd_redis_consumer_unref);
  kd_redis_conn_clear (&self->producer);
  g_clear_pointer (&self->streams, g_ptr_array_unref);
  g_mutex_clear (&self->producer_lock);
  g_free (self->producer_id);
  g_free (self->member);
  g_free (self->config.host);
  g_free (self->config.name);

  G_OBJECT_CLASS (kd_redis_queue_parent_class)->finalize (object);
}

static void
kd_redis_queue_class_init (KdRedisQueueClass *klass)
{
  G_OBJECT_CLASS (klass)->finalize = kd_redis_queue_finalize;
}

static void
kd_redis_queue_init (KdRedisQueue *self)
{
  self->config.host = g_strdup ("127.0.0.1");
  self->config.port = 6379;
  self->config.n_shards = 64;
  self->config.lease_us = 5 * G_TIME_SPAN_SECOND;
  self->config.batch_size = 1024;
  self->config.max_attempts = 3;
  self->config.retry_initial_us = 100 * G_TIME_SPAN_MILLISECOND;
  self->config.retry_max_us = 5 * G_TIME_SPAN_SECOND;
  self->member = g_strdup_printf ("%s-%d-%08x", g_get_host_name (), (int) getpid (), g_random_int ());
  self->producer_id = g_strdup_printf ("p-%s", self->member);
  g_mutex_init (&self->producer_lock);
}

/**
 * kd_redis_queue_new:
 * @name: the queue's name, the prefix of all its Redis keys
 *
 * Creates a handle on the queue @name in a Redis server (127.0.0.1:6379
 * unless kd_redis_queue_set_address() says otherwise). Every process that
 * adds or runs the queue's jobs creates one with the same name and the same
 * number of shards. Nothing is sent to Redis yet.
 *
 * Returns: (transfer full): a new queue handle
 *
 * Since: 0.1
 */
KdRedisQueue *
kd_redis_queue_new (const char *name)
{
  KdRedisQueue *self;

  g_return_val_if_fail (name != NULL && *name != '\0', NULL);

  self = g_object_new (KD_TYPE_REDIS_QUEUE, NULL);
  self->config.name = g_strdup (name);
  return self;
}

static gboolean
check_configurable (KdRedisQueue *self,
                    const char   *func)
{
  if (g_atomic_int_get (&self->frozen))
    {
      g_critical ("%s: the queue is already in use; configure it before the first add "
                  "and before kd_redis_queue_new_dispatcher()", func);
      return FALSE;
    }
  return TRUE;
}

/**
 * kd_redis_queue_set_address:
 * @self: a queue
 * @host: the Redis server's host name or IP address
 * @port: its TCP port
 *
 * Sets the Redis server the queue lives in. Default: 127.0.0.1, 6379.
 *
 * Call before the first add and before kd_redis_queue_new_dispatcher().
 *
 * Since: 0.1
 */
void
kd_redis_queue_set_address (KdRedisQueue *self,
                            const char   *host,
                            guint         port)
{
  g_return_if_fail (KD_IS_REDIS_QUEUE (self));
  g_return_if_fail (host != NULL);
  g_return_if_fail (port > 0 && port < 65536);

  if (!check_configurable (self, G_STRFUNC))
    return;
  g_free (self->config.host);
  self->config.host = g_strdup (host);
  self->config.port = port;
}

/**
 * kd_redis_queue_set_n_shards:
 * @self: a queue
 * @n_shards: the number of shards, at least 1
 *
 * Sets how many shards (streams of keyed jobs) the queue has, default 64:
 * the most consumer processes that can share its keyed jobs. It is fixed
 * when the queue is first used: a process that says otherwise fails to add
 * or consume.
 *
 * Call before the first add and before kd_redis_queue_new_dispatcher().
 *
 * Since: 0.1
 */
void
kd_redis_queue_set_n_shards (KdRedisQueue *self,
                             guint         n_shards)
{
  g_return_if_fail (KD_IS_REDIS_QUEUE (self));
  g_return_if_fail (n_shards >= 1 && n_shards <= 65536);

  if (!check_configurable (self, G_STRFUNC))
    return;
  self->config.n_shards = n_shards;
}

/**
 * kd_redis_queue_set_lease_time:
 * @self: a queue
 * @lease_us: the lease time, in microseconds, from 30 ms to
 *   %KD_REDIS_QUEUE_MAX_LEASE_US (a day)
 *
 * Sets how long a consumer holds a shard without renewing it, default 5 s:
 * how long after a consumer dies the others take its shards over. A
 * consumer renews its leases six times per lease time, and starts a job of
 * a shard only while a third of the lease is left: jobs should take much
 * less than that. All the queue's consumers should use the same value.
 *
 * Call before kd_redis_queue_new_dispatcher().
 *
 * Since: 0.1
 */
void
kd_redis_queue_set_lease_time (KdRedisQueue *self,
                               gint64        lease_us)
{
  g_return_if_fail (KD_IS_REDIS_QUEUE (self));
  g_return_if_fail (lease_us >= 30 * G_TIME_SPAN_MILLISECOND);
  g_return_if_fail (lease_us <= KD_REDIS_QUEUE_MAX_LEASE_US);

  if (!check_configurable (self, G_STRFUNC))
    return;
  self->config.lease_us = lease_us;
}

/**
 * kd_redis_queue_set_batch_size:
 * @self: a queue
 * @batch_size: the most entries in flight in this process, from 1 to
 *   %KD_REDIS_QUEUE_MAX_BATCH_SIZE
 *
 * Sets how many entries a consumer process holds at most, read and not yet
 * acknowledged; default 1024. It reads again once half of them are done. A
 * larger batch means fewer round trips; it also bounds how many jobs run
 * twice when the process dies.
 *
 * Call before kd_redis_queue_new_dispatcher().
 *
 * Since: 0.1
 */
void
kd_redis_queue_set_batch_size (KdRedisQueue *self,
                               guint         batch_size)
{
  g_return_if_fail (KD_IS_REDIS_QUEUE (self));
  g_return_if_fail (batch_size >= 1 && batch_size <= KD_REDIS_QUEUE_MAX_BATCH_SIZE);

  if (!check_configurable (self, G_STRFUNC))
    return;
  self->config.batch_size = batch_size;
}

/**
 * kd_redis_queue_set_retry:
 * @self: a queue
 * @max_attempts: how many times a job may run, at least 1
 * @initial_delay_us: the wait before the first retry, in microseconds
 * @max_delay_us: the longest wait between two attempts, at least
 *   @initial_delay_us
 *
 * Sets how failed jobs are retried, as kd_dispatcher_set_retry() does, in
 * their key's place; default 3 attempts, from 100 ms to 5 s. A job whose
 * last attempt failed is moved to the dead-letter stream (the queue's name
 * followed by ":dead") and acknowledged, in one step. Set it here; a retry
 * set on the dispatcher afterwards takes precedence (see
 * kd_redis_queue_new_dispatcher()).
 *
 * Call before kd_redis_queue_new_dispatcher().
 *
 * Since: 0.1
 */
void
kd_redis_queue_set_retry (KdRedisQueue *self,
                          guint         max_attempts,
                          gint64        initial_delay_us,
                          gint64        max_delay_us)
{
  g_return_if_fail (KD_IS_REDIS_QUEUE (self));
  g_return_if_fail (max_attempts >= 1);
  g_return_if_fail (initial_delay_us >= 0);
  g_return_if_fail (max_delay_us >= initial_delay_us);

  if (!check_configurable (self, G_STRFUNC))
    return;
  self->config.max_attempts = max_attempts;
  self->config.retry_initial_us = initial_delay_us;
  self->config.retry_max_us = max_delay_us;
}

/**
 * kd_redis_queue_get_name:
 * @self: a queue
 *
 * Gets the queue's name.
 *
 * Returns: (transfer none): the name given to kd_redis_queue_new()
 *
 * Since: 0.1
 */
const char *
kd_redis_queue_get_name (KdRedisQueue *self)
{
  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), NULL);

  return self->config.name;
}

/**
 * kd_redis_queue_get_n_shards:
 * @self: a queue
 *
 * Gets the queue's number of shards.
 *
 * Returns: the number of shards
 *
 * Since: 0.1
 */
guint
kd_redis_queue_get_n_shards (KdRedisQueue *self)
{
  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), 0);

  return self->config.n_shards;
}

/**
 * kd_redis_queue_get_batch_size:
 * @self: a queue
 *
 * Gets the most entries this process holds read and not yet acknowledged.
 *
 * Returns: the batch size
 *
 * Since: 0.1
 */
guint
kd_redis_queue_get_batch_size (KdRedisQueue *self)
{
  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), 0);

  return self->config.batch_size;
}

/**
 * kd_redis_queue_get_consumer_name:
 * @self: a queue
 *
 * Gets the name this process consumes under: its member name in the
 * queue's sorted set of members, its consumer name in the streams' group,
 * and the value of the leases it holds. Unique per queue object.
 *
 * Returns: (transfer none): the consumer name
 *
 * Since: 0.1
 */
const char *
kd_redis_queue_get_consumer_name (KdRedisQueue *self)
{
  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), NULL);

  return self->member;
}

/**
 * kd_redis_queue_shard_for_key:
 * @self: a queue
 * @key: a job's key
 *
 * Tells which shard a key's jobs go to: fnv1a32 (@key) modulo the number of
 * shards. Thread-safe.
 *
 * Returns: the shard, from 0 to the number of shards - 1
 *
 * Since: 0.1
 */
guint
kd_redis_queue_shard_for_key (KdRedisQueue *self,
                              const char   *key)
{
  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), 0);
  g_return_val_if_fail (key != NULL, 0);

  return kd_redis_fnv1a32 (key, strlen (key)) % self->config.n_shards;
}

/* ---- Producing --------------------------------------------------------- */

static gboolean
producer_ready_locked (KdRedisQueue  *self,
                       GError       **error)
{
  gint shard;

  if (self->producer.host == NULL)
    {
      kd_redis_conn_init (&self->producer, self->config.host, self->config.port, 10 * G_TIME_SPAN_SECOND);
      kd_redis_conn_set_name (&self->producer, self->config.name, "producer", self->member);
      self->streams = g_ptr_array_new_with_free_func (g_free);
      for (shard = 0; shard < (gint) self->config.n_shards; shard++)
        g_ptr_array_add (self->streams, kd_redis_stream_name (self->config.name, shard));
      g_ptr_array_add (self->streams, kd_redis_stream_name (self->config.name, -1));
    }
  if (self->producer_ready && self->producer.context != NULL)
    return TRUE;
  if (!kd_redis_conn_ensure (&self->producer, error) ||
      !kd_redis_conn_create_groups (&self->producer, self->config.name, self->config.n_shards, error))
    {
      kd_redis_conn_close (&self->producer);
      return FALSE;
    }
  self->producer_ready = TRUE;
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

  stream = g_ptr_array_index (self->streams, key != NULL ? kd_redis_queue_shard_for_key (self, key) :
                                                           self->config.n_shards);
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
  KdRedisSigpipeGuard guard;
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

  kd_redis_sigpipe_guard_enter (&guard);
  kd_mutex_lock (&self->producer_lock);
  g_atomic_int_set (&self->frozen, TRUE);
  first_sequence = self->sequence + 1;
  self->sequence += n_jobs;
  ok = producer_ready_locked (self, &local_error);
  if (ok && !send_jobs_locked (self, n_jobs, keys, payloads, first_sequence, 0, &confirmed, &local_error))
    {
      ok = FALSE;
      /* A connection lost after sending took the replies of the jobs not
       * yet confirmed with it: Redis may have stored them or not. They are
       * sent once more, under the same producer id and sequences, so that
       * a consumer that reads both copies runs each job once. */
      if (self->producer.context == NULL)
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
  kd_redis_sigpipe_guard_leave (&guard);

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
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA, "Redis at %s:%u: unexpected reply to a count",
                   self->config.host, self->config.port);
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
  KdRedisSigpipeGuard guard;
  gboolean ok;

  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), FALSE);
  g_return_val_if_fail (backlog != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  kd_redis_sigpipe_guard_enter (&guard);
  kd_mutex_lock (&self->producer_lock);
  g_atomic_int_set (&self->frozen, TRUE);
  ok = count_backlog_locked (self, backlog, error);
  kd_mutex_unlock (&self->producer_lock);
  kd_redis_sigpipe_guard_leave (&guard);

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
  KdRedisSigpipeGuard guard;
  KdRedisConn subscriber;
  KdRedisArgs args;
  redisReply *reply;
  guint64 backlog;
  gboolean ok;

  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  kd_redis_sigpipe_guard_enter (&guard);
  channel = kd_redis_progress_channel (self->config.name);
  kd_redis_conn_init (&subscriber, self->config.host, self->config.port, 10 * G_TIME_SPAN_SECOND);
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
      /* The other messages already received say nothing more. */
      while (ok && (reply = kd_redis_conn_read_received (&subscriber)) != NULL)
        g_clear_pointer (&reply, kd_redis_reply_free);
    }
  kd_redis_conn_clear (&subscriber);
  kd_redis_sigpipe_guard_leave (&guard);

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
  KdRedisSigpipeGuard guard;
  guint64 count = 0;
  gboolean ok;

  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  kd_redis_sigpipe_guard_enter (&guard);
  kd_mutex_lock (&self->producer_lock);
  g_atomic_int_set (&self->frozen, TRUE);
  ok = producer_ready_locked (self, error) && kd_redis_conn_trim (&self->producer, self->streams, &count, error);
  kd_mutex_unlock (&self->producer_lock);
  kd_redis_sigpipe_guard_leave (&guard);
  if (ok && trimmed != NULL)
    *trimmed = count;

  return ok;
}

/* ---- Consuming --------------------------------------------------------- */

static gboolean
feed_handler (KdJob    *job,
              gpointer  user_data,
              GError  **error)
{
  Feed *feed = user_data;
  KdRedisEntry *entry = kd_job_get_item (job);
  guint attempt = kd_job_get_attempt (job);

  if (!kd_redis_consumer_may_start (feed->consumer, entry))
    {
      kd_redis_consumer_report (feed->consumer, entry, KD_REDIS_OUTCOME_SKIP, NULL, attempt);
      return TRUE;
    }

  if (feed->handler (job, feed->user_data, error))
    {
      kd_redis_consumer_report (feed->consumer, entry, KD_REDIS_OUTCOME_ACK, NULL, attempt);
      return TRUE;
    }

  if (error != NULL && *error == NULL)
    g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_FAILED, "The handler failed without saying why");

  /* Whether this attempt was the last is the dispatcher's to say (its
   * retry settings may have been changed after
   * kd_redis_queue_new_dispatcher()): the failure is noted, and
   * release_entry(), which runs once the job has ended for good,
   * dead-letters the entry. */
  entry->failed = TRUE;
  entry->attempts = attempt;
  g_free (entry->error_message);
  entry->error_message = error != NULL ? g_strdup ((*error)->message) : NULL;
  return FALSE;
}

static void
feed_free (gpointer data)
{
  Feed *feed = data;

  if (feed->user_data_free != NULL)
    feed->user_data_free (feed->user_data);
  kd_redis_consumer_unref (feed->consumer);
  g_free (feed);
}

/* The dispatcher's item-free, once the entry's job has ended for good. An
 * entry whose job failed its last attempt is dead-lettered, unless the
 * dispatcher was cancelled (then it stays pending, to run again
 * elsewhere). One whose job ended without an outcome otherwise (it never
 * ran: cancelled, dropped, or cancelled while waiting for a retry) is
 * skipped, so the consumer knows it is no longer in flight. */
static void
release_entry (gpointer data)
{
  KdRedisEntry *entry = data;

  if (!entry->reported && entry->failed && !kd_redis_consumer_is_cancelled (entry->consumer))
    kd_redis_consumer_report (entry->consumer, entry, KD_REDIS_OUTCOME_DEAD, NULL, entry->attempts);
  else if (!entry->reported)
    kd_redis_consumer_report (entry->consumer, entry, KD_REDIS_OUTCOME_SKIP, NULL, 0);
  kd_redis_entry_unref (entry);
}

/**
 * kd_redis_queue_new_dispatcher:
 * @self: a queue
 * @n_workers: the number of worker threads, at most
 *   %KD_DISPATCHER_MAX_WORKERS; 0 for one per processor
 * @handler: (scope notified) (closure user_data) (destroy user_data_free):
 *   runs each job
 * @user_data: data for @handler
 * @user_data_free: (nullable): frees @user_data once the dispatcher is gone
 *
 * Creates the dispatcher that runs this process's share of the queue's jobs
 * once kd_redis_queue_start() is called. Each job's item is its
 * #KdRedisEntry (kd_job_get_item()), its key the entry's key. @handler runs
 * as with kd_dispatcher_new(), only for entries whose shard this process
 * still safely holds; when it returns %TRUE the entry is acknowledged, when
 * it fails the job is retried as kd_redis_queue_set_retry() says, then
 * dead-lettered.
 *
 * The queue sets the dispatcher's item-free function (leave it) and its
 * retry, from kd_redis_queue_set_retry(); the rest (capacity, done
 * callback, main context, worker functions, ...) may be configured as
 * usual before kd_redis_queue_start(). A retry set on the dispatcher
 * afterwards (kd_dispatcher_set_retry()) takes precedence: an entry is
 * dead-lettered once the dispatcher gave up on its job. The failure
 * policy %KD_FAILURE_PARK is not supported (the later jobs of a parked key
 * would hold their shard, and kd_redis_queue_stop(), for ever):
 * kd_redis_queue_start() refuses it. One dispatcher per queue object.
 *
 * Returns: (transfer full): a new dispatcher, fed by the queue
 *
 * Since: 0.1
 */
KdDispatcher *
kd_redis_queue_new_dispatcher (KdRedisQueue   *self,
                               guint           n_workers,
                               KdHandlerFunc   handler,
                               gpointer        user_data,
                               GDestroyNotify  user_data_free)
{
  KdRedisConsumer *consumer;
  KdDispatcher *dispatcher;
  Feed *feed;

  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), NULL);
  g_return_val_if_fail (handler != NULL, NULL);
  g_return_val_if_fail (n_workers <= KD_DISPATCHER_MAX_WORKERS, NULL);
  g_return_val_if_fail (self->consumer == NULL, NULL);

  kd_mutex_lock (&self->producer_lock);
  g_atomic_int_set (&self->frozen, TRUE);
  kd_mutex_unlock (&self->producer_lock);

  consumer = kd_redis_consumer_new (&self->config, self->member);
  g_atomic_pointer_set (&self->consumer, consumer);
  feed = g_new0 (Feed, 1);
  feed->consumer = kd_redis_consumer_ref (consumer);
  feed->handler = handler;
  feed->user_data = user_data;
  feed->user_data_free = user_data_free;

  dispatcher = kd_dispatcher_new (n_workers, feed_handler, feed, feed_free);
  kd_dispatcher_set_item_free (dispatcher, release_entry);
  kd_dispatcher_set_retry (dispatcher, self->config.max_attempts, self->config.retry_initial_us,
                           self->config.retry_max_us);
  self->dispatcher = g_object_ref (dispatcher);

  return dispatcher;
}

/**
 * kd_redis_queue_start:
 * @self: a queue with a dispatcher (kd_redis_queue_new_dispatcher())
 * @error: return location for an error
 *
 * Joins the queue's consumers: from now on this process owns its share of
 * the shards, takes over their pending entries, reads new ones, and feeds
 * them to the dispatcher. Checks first that the dispatcher's failure
 * policy is %KD_FAILURE_CONTINUE, that Redis can be reached and that the
 * queue has the configured number of shards. Once started, a lost
 * connection is retried, never reported.
 *
 * Call from the thread that configured the queue.
 *
 * Returns: %TRUE if started; %FALSE with @error set otherwise:
 *   %G_IO_ERROR_NOT_SUPPORTED if the dispatcher's failure policy is
 *   %KD_FAILURE_PARK, %G_IO_ERROR_INVALID_ARGUMENT if the queue has
 *   another number of shards, another %G_IO_ERROR if Redis could not be
 *   reached, %G_THREAD_ERROR_AGAIN if a thread (the dispatcher's workers,
 *   or the queue's own three) could not be made; the queue is then as
 *   before the call, which may be made again
 *
 * Since: 0.1
 */
gboolean
kd_redis_queue_start (KdRedisQueue  *self,
                      GError       **error)
{
  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), FALSE);
  g_return_val_if_fail (self->consumer != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (kd_dispatcher_get_failure_policy (self->dispatcher) == KD_FAILURE_PARK)
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_NOT_SUPPORTED,
                           "A KdRedisQueue's dispatcher cannot park keys (KD_FAILURE_PARK): the later "
                           "jobs of a parked key would hold their shard for ever");
      return FALSE;
    }

  return kd_redis_consumer_start (self->consumer, self->dispatcher, error);
}

/**
 * kd_redis_queue_stop:
 * @self: a queue
 *
 * Leaves the queue's consumers, gracefully: stops reading, lets the jobs
 * already read end (kd_dispatcher_wait()) and sends their
 * acknowledgements, for at most one lease time more, then releases every
 * lease and leaves the members, so the other processes take the shards over
 * at once. Cancelling the dispatcher's cancellable instead releases the
 * leases without waiting; stop must still be called (or the queue
 * finalized) to join the queue's threads. Does nothing if not started;
 * the queue may be started again.
 *
 * Call from the thread that started the queue, never from a handler.
 *
 * Since: 0.1
 */
void
kd_redis_queue_stop (KdRedisQueue *self)
{
  g_return_if_fail (KD_IS_REDIS_QUEUE (self));

  if (self->consumer != NULL)
    kd_redis_consumer_stop (self->consumer);
}

/**
 * kd_redis_queue_get_stats:
 * @self: a queue
 * @stats: (out caller-allocates): the counters
 *
 * Fills @stats with the consumer side's counters since the dispatcher was
 * created. Thread-safe.
 *
 * Since: 0.1
 */
void
kd_redis_queue_get_stats (KdRedisQueue      *self,
                          KdRedisQueueStats *stats)
{
  KdRedisConsumer *consumer;

  g_return_if_fail (KD_IS_REDIS_QUEUE (self));
  g_return_if_fail (stats != NULL);

  consumer = g_atomic_pointer_get (&self->consumer);
  if (consumer == NULL)
    {
      memset (stats, 0, sizeof *stats);
      return;
    }
  kd_redis_consumer_get_stats (consumer, stats);
}
