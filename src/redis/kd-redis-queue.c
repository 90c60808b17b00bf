/* kd-redis-queue.c: keyed jobs shared by many processes through Redis Streams
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A KdRedisQueue carries jobs (a key, or none, and payload bytes) from any
 * number of producer processes to any number of consumer processes, on one
 * machine or many, through one Redis server or a Redis Cluster. It
 * guarantees what a KdDispatcher guarantees inside one process, across
 * all of them: the jobs
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
 * Streams Redis refuses. Every connection that makes the streams' groups
 * (kd_redis_create_groups()) learns which streams Redis refuses (a key
 * of another type where a stream should be): the consumer sets them aside
 * (kd_redis_consumer_check_streams(): neither leased nor read, logged,
 * counted) and its reader looks at them again once a tick; the producer
 * refuses adds to them after one more look. The scripts that count and trim
 * over every stream skip a key that is not one.
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
 * should be much shorter than a third of the lease. Taking a free lease
 * (the ACQUIRE script) also increments the shard's fencing token (the key
 * N:{shard}:fence), and every entry read under that lease carries it
 * (kd_redis_entry_get_fencing_token()): a store the handlers write to can
 * refuse a stale owner's writes by their lower token.
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
 * Threads. Blocking connections (kd-redis-conn.c) on three dedicated
 * threads, each with its own (one per master on a cluster), rather than
 * asynchronous ones on a main loop:
 * every step of the protocol is then a plain sequence (claim, read, submit;
 * beat, renew; acknowledge) whose failure handling reads top to bottom, and
 * nothing depends on a main loop the application may not run. The lease
 * thread does nothing but membership and leases, so a renewal never waits
 * behind a read (the reader may block in the dispatcher's submit, for
 * backpressure) or an acknowledgement (a large one, on a loaded Redis,
 * took a few hundred milliseconds in tests). On a lone server, the other
 * threads wake the reader from XREAD BLOCK by adding to the member's
 * stream N:wake:member,
 * which the XREAD also waits on: unlike CLIENT UNBLOCK, a wake-up sent
 * before the XREAD reaches Redis is not lost. kd-redis-consumer.c tells
 * how the threads fit. The producer side (kd-redis-producer.c) is one more
 * connection (per master), used under a lock by whichever thread adds
 * jobs; it pipelines its XADDs, a chunk in flight while the next is
 * formatted.
 *
 * Cost. With Redis's append-only file on, most of a job's cost is Redis's
 * own: XREADGROUP records each entry in the pending lists and logs an
 * XCLAIM per entry to the AOF, and XACK undoes both. The client side keeps
 * its share small: replies are built in one arena per reply rather than an
 * allocation per string (kd-redis-conn.c), and commands are formatted into
 * one buffer.
 *
 * Redis Cluster. A queue may live on a Redis Cluster (redis+cluster://):
 * its streams are spread over the masters by the slots of their hash tags
 * (N:{p}), and every thread talks to each master on a connection of its
 * own, through a router (kd-redis-router.c) that sends each command to
 * its keys' master and follows the map through failovers and moved
 * slots. A cluster runs a command, script or transaction over keys of one
 * slot only: a shard's keys share its tag, the steps that span shards
 * (reads, acknowledgements, leases, counts, trims) run once per slot
 * (a transaction per slot, one after another, for reads and
 * acknowledgements; scripts pipelined per node for the rest), and the rest (the members' set, N:meta, N:dead, a
 * member's wake stream) are keys of their own, used alone. What does not
 * fit one slot is done otherwise there: the reader, which cannot wait in
 * one XREAD on streams of many slots, reads again after a short pause
 * that grows while nothing comes (kd-redis-reader.c); a dead letter is
 * added to N:dead, on its node, before the transaction that acknowledges
 * it, so at least once rather than once; the consumers that are gone are
 * told from the live members the heartbeat listed, passed to the script.
 * Redis replicates asynchronously: a job the master stored and had not
 * passed on is lost with it in a failover, so on a cluster the producer
 * counts a job as added only once a replica confirmed it (WAIT), and a
 * master's failover, like a Redis restart, reruns at most what each
 * consumer had read and not acknowledged, plus acknowledgements the old
 * master had not passed on (each consumer's batch at most).
 *
 * Files. This one holds the object, its configuration and the consumer
 * side's entry points (the dispatcher it feeds, start, stop, stats);
 * kd-redis-producer.c holds the producer side; kd-redis-streams.c the
 * steps over every stream; kd-redis-router.c the connections to the
 * nodes. kd-redis-queue-private.h says which file holds what.
 */

#include "config.h"

#include <string.h>
#include <unistd.h>

#include "kd-redis-queue-private.h"
#include "kd-sync-private.h"

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
  if (self->streams != NULL)
    kd_redis_router_clear (&self->producer);
  if (self->unusable != NULL)
    {
      guint i;

      for (i = 0; i <= self->config.n_shards; i++)
        g_free (self->unusable[i]);
      g_free (self->unusable);
    }
  g_clear_pointer (&self->streams, g_ptr_array_unref);
  g_mutex_clear (&self->producer_lock);
  g_free (self->producer_id);
  g_free (self->member);
  kd_redis_server_clear (&self->config.server);
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
  kd_redis_server_init (&self->config.server);
  self->config.n_shards = 64;
  self->config.lease_us = 5 * G_TIME_SPAN_SECOND;
  self->config.batch_size = 1024;
  self->config.min_replicas = -1;
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
 * Sets the Redis server the queue lives in, over TCP: a lone server, not
 * a cluster (see kd_redis_queue_set_url()). Default: 127.0.0.1, 6379. The
 * credentials and database (kd_redis_queue_set_url(),
 * kd_redis_queue_set_credentials()) stay as they were.
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
  g_free (self->config.server.host);
  g_clear_pointer (&self->config.server.socket_path, g_free);
  self->config.server.host = g_strdup (host);
  self->config.server.port = port;
  self->config.server.cluster = FALSE;
}

/**
 * kd_redis_queue_set_url:
 * @self: a queue
 * @url: the Redis server as a URL:
 *   `redis://[[user][:password]@]host[:port][/db]`,
 *   `rediss://[[user][:password]@]host[:port][/db]` (TLS),
 *   `unix://[[user][:password]@]/path/to/redis.sock[?db=N]`, or a node
 *   of a Redis Cluster: `redis+cluster://[[user][:password]@]host[:port]`
 *   (`rediss+cluster://` with TLS)
 * @error: return location for a #GError
 *
 * Sets the Redis server the queue lives in, and how to log in to it, the
 * way Redis clients take them. With a password every connection the queue
 * opens (to read, acknowledge, keep leases, produce) sends AUTH, with the
 * user if there is one (an ACL user; `redis://:password@host` or
 * `redis://password@host` is the default user), each time it connects or
 * reconnects; with a database number other than 0, SELECT. User and
 * password may be percent-encoded; an IPv6 address goes in brackets. The
 * URL replaces the address, credentials and database set before;
 * kd_redis_queue_set_credentials() can replace the credentials after it,
 * so that a password need not be part of a URL that is logged or shown.
 * With `rediss://` every connection uses TLS, verified against the
 * system's certificate authorities unless kd_redis_queue_set_tls() gave a
 * CA file (see there).
 *
 * With `redis+cluster://` the queue's streams are spread over the masters
 * of a Redis Cluster, whose map the queue reads from the node named (any
 * one of them) and then from the nodes it lists. Every process of the
 * queue then keeps a connection per master and per role, follows the
 * cluster through a failover or a slot that moves, and waits for a
 * replica to confirm each job added (see kd_redis_queue_add_many()). A
 * cluster has only database 0. The dead letters of a queue on a cluster
 * are added to `N:dead` at least once (see "Dead letters" in the README).
 *
 * A refusal at login (a wrong password, an unknown user) fails the
 * queue's calls with %G_IO_ERROR_PERMISSION_DENIED; the messages never
 * show the password.
 *
 * Call before the first add and before kd_redis_queue_new_dispatcher().
 *
 * Returns: %TRUE if the URL was taken; %FALSE with
 *   %G_IO_ERROR_INVALID_ARGUMENT if it is not a Redis URL, or
 *   %G_IO_ERROR_NOT_SUPPORTED for `rediss://` without a TLS backend
 *   (glib-networking), and the settings unchanged
 *
 * Since: 0.1
 */
gboolean
kd_redis_queue_set_url (KdRedisQueue  *self,
                        const char    *url,
                        GError       **error)
{
  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), FALSE);
  g_return_val_if_fail (url != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (g_atomic_int_get (&self->frozen))
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_BUSY,
                           "The queue is already in use: set its URL before the first add "
                           "and before kd_redis_queue_new_dispatcher()");
      return FALSE;
    }
  return kd_redis_server_parse_url (&self->config.server, url, error);
}

/**
 * kd_redis_queue_set_credentials:
 * @self: a queue
 * @user: (nullable): the ACL user, or %NULL for the default user
 * @password: (nullable): the password, or %NULL to send no AUTH (then
 *   @user must be %NULL too)
 *
 * Sets how the queue's connections log in to Redis (see
 * kd_redis_queue_set_url()), replacing what a URL said: AUTH @user
 * @password, or AUTH @password without a user. Read a password from a
 * file or an environment variable (as `redis-worker` does with
 * `REDISCLI_AUTH` and `--password-file`) rather than from the command line.
 *
 * Call before the first add and before kd_redis_queue_new_dispatcher().
 *
 * Since: 0.1
 */
void
kd_redis_queue_set_credentials (KdRedisQueue *self,
                                const char   *user,
                                const char   *password)
{
  KdRedisServer *server;

  g_return_if_fail (KD_IS_REDIS_QUEUE (self));
  g_return_if_fail (user == NULL || password != NULL);

  if (!check_configurable (self, G_STRFUNC))
    return;
  server = &self->config.server;
  g_free (server->user);
  server->user = g_strdup (user);
  if (server->password != NULL)
    memset (server->password, 0, strlen (server->password));
  g_free (server->password);
  server->password = g_strdup (password);
}

/**
 * kd_redis_queue_set_tls:
 * @self: a queue
 * @ca_file: (nullable) (type filename): a PEM file of the certificate
 *   authorities to trust, or %NULL for the system's
 * @cert_file: (nullable) (type filename): a PEM file with the client's
 *   certificate (and its key, without @key_file), for a server that asks
 *   for one (`tls-auth-clients`), or %NULL
 * @key_file: (nullable) (type filename): a PEM file with the key of
 *   @cert_file, or %NULL
 * @error: return location for a #GError
 *
 * Makes every connection of the queue use TLS, as a `rediss://` URL does,
 * and sets what it trusts and presents. The server's certificate must be
 * signed by one of the CAs and name the host connected to (a `127.0.0.1`
 * address must be in its subject alternative names); otherwise the queue's
 * calls fail with %G_TLS_ERROR_BAD_CERTIFICATE, saying why. The files are
 * read now: a file that cannot be read or holds no certificate or key is
 * this call's error. TLS stays on for good: a URL set afterwards replaces
 * the address and credentials, keeps these files, and even as `redis://`
 * does not turn TLS off.
 *
 * TLS comes from GIO: it needs glib-networking installed.
 *
 * Call before the first add and before kd_redis_queue_new_dispatcher().
 *
 * Returns: %TRUE if TLS is on with these settings; %FALSE with @error set
 *   (%G_IO_ERROR_NOT_SUPPORTED without a TLS backend, %G_IO_ERROR_BUSY if
 *   the queue is in use, or the file's error), the settings unchanged
 *
 * Since: 0.1
 */
gboolean
kd_redis_queue_set_tls (KdRedisQueue  *self,
                        const char    *ca_file,
                        const char    *cert_file,
                        const char    *key_file,
                        GError       **error)
{
  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), FALSE);
  g_return_val_if_fail (key_file == NULL || cert_file != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (g_atomic_int_get (&self->frozen))
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_BUSY,
                           "The queue is already in use: set its TLS before the first add "
                           "and before kd_redis_queue_new_dispatcher()");
      return FALSE;
    }
  return kd_redis_server_set_tls (&self->config.server, ca_file, cert_file, key_file, error);
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
 * kd_redis_queue_set_min_replicas:
 * @self: a queue
 * @min_replicas: how many replicas must confirm each job added, or -1 for
 *   the default: 1 on a Redis Cluster, 0 on a lone server
 *
 * Sets how many replicas of a job's master must have it before
 * kd_redis_queue_add() and kd_redis_queue_add_many() count it as added
 * (Redis's WAIT). Redis replicates asynchronously: a master that dies
 * takes what it had not passed on with it, and when its replica takes its
 * place (a Redis Cluster's failover, or Sentinel's), those jobs are lost
 * though the add succeeded. With 1, an add returns only once a replica
 * confirmed every job, and what no replica confirmed within a second is
 * sent again, under the same producer id and sequences (a copy runs
 * once), for as long as an add tries (see kd_redis_queue_add_many()). A
 * master with fewer replicas than @min_replicas, or whose replicas are
 * down, refuses adds to its shards that way (%G_IO_ERROR_TIMED_OUT). 0
 * waits for no replica.
 *
 * Call before the first add.
 *
 * Since: 0.1
 */
void
kd_redis_queue_set_min_replicas (KdRedisQueue *self,
                                 gint          min_replicas)
{
  g_return_if_fail (KD_IS_REDIS_QUEUE (self));
  g_return_if_fail (min_replicas >= -1);

  if (!check_configurable (self, G_STRFUNC))
    return;
  self->config.min_replicas = min_replicas;
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
 * kd_redis_queue_get_min_replicas:
 * @self: a queue
 *
 * Gets how many replicas of a job's master must have it before an add
 * counts it as added.
 *
 * Returns: how many replicas confirm each job added before an add returns
 *   (see kd_redis_queue_set_min_replicas()): the number set, or by default
 *   1 on a Redis Cluster and 0 on a lone server
 *
 * Since: 0.1
 */
guint
kd_redis_queue_get_min_replicas (KdRedisQueue *self)
{
  g_return_val_if_fail (KD_IS_REDIS_QUEUE (self), 0);

  if (self->config.min_replicas >= 0)
    return (guint) self->config.min_replicas;
  return self->config.server.cluster ? 1 : 0;
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
