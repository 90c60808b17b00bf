/* kd-redis-conn.c: one blocking hiredis connection with kdispatch's scripts
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Every step of the protocol that must be atomic with a lease check is one
 * Lua script, loaded when the connection opens and run with EVALSHA. A
 * connection that fails (an I/O error, a timeout, a server that lost its
 * scripts after a restart) is closed; the next kd_redis_conn_ensure()
 * reconnects and loads the scripts again. See kd-redis-queue.c for the
 * design these scripts implement.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-conn-private.h"

/* Beats and lists the live members. KEYS[1] the members' sorted set;
 * ARGV[1] this member, ARGV[2] how long a member stays live after its last
 * beat (ms), ARGV[3] "1" to leave instead. Scored by the server's clock, so
 * the members' clocks never meet. Long-gone members are dropped. */
static const char script_heartbeat[] =
  "if ARGV[3] == '1' then redis.call('ZREM', KEYS[1], ARGV[1]) return {} end\n"
  "local t = redis.call('TIME')\n"
  "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
  "local live = tonumber(ARGV[2])\n"
  "redis.call('ZADD', KEYS[1], now, ARGV[1])\n"
  "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 100 * live)\n"
  "return redis.call('ZRANGEBYSCORE', KEYS[1], now - live, '+inf')\n";

/* Takes leases. KEYS: lease keys; ARGV[1] this member, ARGV[2] the lease
 * time (ms). A free lease is taken with SET NX PX; one this member still
 * holds is renewed. Returns 1 or 0 per key. */
static const char script_acquire[] =
  "local r = {}\n"
  "for i, k in ipairs(KEYS) do\n"
  "  if redis.call('SET', k, ARGV[1], 'NX', 'PX', ARGV[2]) then r[i] = 1\n"
  "  elseif redis.call('GET', k) == ARGV[1] then redis.call('PEXPIRE', k, ARGV[2]) r[i] = 1\n"
  "  else r[i] = 0 end\n"
  "end\n"
  "return r\n";

/* Compare-and-renew: as script_acquire, but never takes a free lease. */
static const char script_renew[] =
  "local r = {}\n"
  "for i, k in ipairs(KEYS) do\n"
  "  if redis.call('GET', k) == ARGV[1] then redis.call('PEXPIRE', k, ARGV[2]) r[i] = 1\n"
  "  else r[i] = 0 end\n"
  "end\n"
  "return r\n";

/* Compare-and-delete: drops the leases this member holds. */
static const char script_release[] =
  "local n = 0\n"
  "for i, k in ipairs(KEYS) do\n"
  "  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k) n = n + 1 end\n"
  "end\n"
  "return n\n";

/* Reads new entries of several streams, each only while its lease is held.
 * KEYS: (lease, stream) pairs; ARGV[1] this member (the consumer), ARGV[2]
 * the group, ARGV[3] how many entries at most in all, ARGV[3 + n] "1" if
 * stream n is leased. Per stream: 0 if its lease is not ours (nothing was
 * read), 1 if the budget ran out before it, its entries, or, when it had
 * none, the id of its last entry ("0-0" if empty), for XREAD to wait from:
 * XREADGROUP ">" found nothing, so every entry up to that one has been
 * delivered. */
static const char script_read[] =
  "local budget = tonumber(ARGV[3])\n"
  "local r = {}\n"
  "for n = 1, #KEYS / 2 do\n"
  "  local lease, stream = KEYS[2 * n - 1], KEYS[2 * n]\n"
  "  if ARGV[3 + n] == '1' and redis.call('GET', lease) ~= ARGV[1] then\n"
  "    r[n] = 0\n"
  "  elseif budget <= 0 then\n"
  "    r[n] = 1\n"
  "  else\n"
  "    local got = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[1], 'COUNT', budget, 'STREAMS', stream, '>')\n"
  "    if got then\n"
  "      r[n] = got[1][2]\n"
  "      budget = budget - #got[1][2]\n"
  "    else\n"
  "      local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)\n"
  "      if last[1] then r[n] = last[1][1] else r[n] = '0-0' end\n"
  "    end\n"
  "  end\n"
  "end\n"
  "return r\n";

/* Takes over pending entries while the lease is held. KEYS[1] lease,
 * KEYS[2] stream; ARGV[1] this member, ARGV[2] the group, ARGV[3] the
 * least idle time (ms), ARGV[4] the cursor, ARGV[5] how many, ARGV[6] "1"
 * if leased. XAUTOCLAIM's reply, or 0 if the lease is not ours. */
static const char script_claim[] =
  "if ARGV[6] == '1' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end\n"
  "return redis.call('XAUTOCLAIM', KEYS[2], ARGV[2], ARGV[1], ARGV[3], ARGV[4], 'COUNT', ARGV[5])\n";

/* Acknowledges entries while the lease is held. KEYS[1] lease, KEYS[2]
 * stream; ARGV[1] this member, ARGV[2] the group, ARGV[3] "1" if leased,
 * ARGV[4...] the ids. XACK's count, or -1 if the lease is not ours. */
static const char script_ack[] =
  "if ARGV[3] == '1' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end\n"
  "return redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, 4))\n";

/* Dead-letters an entry and acknowledges it, in one step, while the lease
 * is held. KEYS[1] lease, KEYS[2] stream, KEYS[3] the dead-letter stream;
 * ARGV[1] this member, ARGV[2] the group, ARGV[3] "1" if leased, ARGV[4]
 * the id, ARGV[5] "1" if keyed, ARGV[6] key, ARGV[7] payload, ARGV[8]
 * producer, ARGV[9] sequence, ARGV[10] attempts, ARGV[11] the error. Once
 * only: an entry no longer pending (the reply was lost and this is a
 * retry) is not added again. 1, 0 if it was not pending, -1 if the lease
 * is not ours. */
static const char script_dead[] =
  "if ARGV[3] == '1' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end\n"
  "local n = redis.call('XACK', KEYS[2], ARGV[2], ARGV[4])\n"
  "if n == 1 then\n"
  "  local f = {'stream', KEYS[2], 'id', ARGV[4]}\n"
  "  if ARGV[5] == '1' then f[#f + 1] = 'k' f[#f + 1] = ARGV[6] end\n"
  "  for _, v in ipairs({'p', ARGV[7], 'pid', ARGV[8], 'seq', ARGV[9], 'attempts', ARGV[10], 'error', ARGV[11]}) do\n"
  "    f[#f + 1] = v\n"
  "  end\n"
  "  redis.call('XADD', KEYS[3], '*', unpack(f))\n"
  "end\n"
  "return n\n";

static const char *const scripts[KD_REDIS_N_SCRIPTS] = {
  [KD_REDIS_SCRIPT_HEARTBEAT] = script_heartbeat,
  [KD_REDIS_SCRIPT_ACQUIRE] = script_acquire,
  [KD_REDIS_SCRIPT_RENEW] = script_renew,
  [KD_REDIS_SCRIPT_RELEASE] = script_release,
  [KD_REDIS_SCRIPT_READ] = script_read,
  [KD_REDIS_SCRIPT_CLAIM] = script_claim,
  [KD_REDIS_SCRIPT_ACK] = script_ack,
  [KD_REDIS_SCRIPT_DEAD] = script_dead,
};

guint32
kd_redis_fnv1a32 (const char *data,
                  gsize       len)
{
  guint32 hash = 2166136261u;
  gsize i;

  for (i = 0; i < len; i++)
    {
      hash ^= (guint8) data[i];
      hash *= 16777619u;
    }
  return hash;
}

/* The braces are a Redis Cluster hash tag: a shard's stream and lease live
 * in the same slot, so one script may touch both. */
char *
kd_redis_stream_name (const char *name,
                      gint        shard)
{
  if (shard < 0)
    return g_strdup_printf ("%s:{u}", name);
  return g_strdup_printf ("%s:{%d}", name, shard);
}

char *
kd_redis_lease_name (const char *name,
                     gint        shard)
{
  if (shard < 0)
    return g_strdup_printf ("%s:{u}:lease", name);
  return g_strdup_printf ("%s:{%d}:lease", name, shard);
}

void
kd_redis_args_init (KdRedisArgs *args)
{
  args->argv = g_ptr_array_new_with_free_func (g_free);
  args->argvlen = g_array_new (FALSE, FALSE, sizeof (size_t));
}

void
kd_redis_args_clear (KdRedisArgs *args)
{
  g_clear_pointer (&args->argv, g_ptr_array_unref);
  g_clear_pointer (&args->argvlen, g_array_unref);
}

void
kd_redis_args_reset (KdRedisArgs *args)
{
  g_ptr_array_set_size (args->argv, 0);
  g_array_set_size (args->argvlen, 0);
}

void
kd_redis_args_add (KdRedisArgs *args,
                   const void  *data,
                   gsize        len)
{
  size_t size = len;

  g_ptr_array_add (args->argv, g_memdup2 (data != NULL ? data : "", len > 0 ? len : 1));
  g_array_append_val (args->argvlen, size);
}

void
kd_redis_args_add_string (KdRedisArgs *args,
                          const char  *str)
{
  kd_redis_args_add (args, str, strlen (str));
}

void
kd_redis_args_add_printf (KdRedisArgs *args,
                          const char  *format,
                          ...)
{
  va_list ap;
  char *str;
  size_t size;

  va_start (ap, format);
  str = g_strdup_vprintf (format, ap);
  va_end (ap);
  size = strlen (str);
  g_ptr_array_add (args->argv, str);
  g_array_append_val (args->argvlen, size);
}

void
kd_redis_args_add_script (KdRedisArgs   *args,
                          KdRedisConn   *conn,
                          KdRedisScript  script,
                          guint          n_keys)
{
  kd_redis_args_add_string (args, "EVALSHA");
  kd_redis_args_add_string (args, conn->sha[script]);
  kd_redis_args_add_printf (args, "%u", n_keys);
}

void
kd_redis_conn_init (KdRedisConn *conn,
                    const char  *host,
                    guint        port,
                    gint64       timeout_us)
{
  memset (conn, 0, sizeof *conn);
  conn->host = g_strdup (host);
  conn->port = port;
  conn->timeout_us = timeout_us;
}

void
kd_redis_conn_clear (KdRedisConn *conn)
{
  kd_redis_conn_close (conn);
  g_clear_pointer (&conn->host, g_free);
}

void
kd_redis_conn_close (KdRedisConn *conn)
{
  g_clear_pointer (&conn->context, redisFree);
}

static void
set_io_error (KdRedisConn  *conn,
              GError      **error)
{
  g_set_error (error, G_IO_ERROR, G_IO_ERROR_CONNECTION_CLOSED,
               "Redis at %s:%u: %s", conn->host, conn->port,
               conn->context != NULL && conn->context->errstr[0] != '\0' ?
               conn->context->errstr : "connection lost");
  kd_redis_conn_close (conn);
}

/* An error reply leaves the connection usable, except NOSCRIPT: the server
 * lost the scripts (a restart, SCRIPT FLUSH), and reconnecting loads them. */
static redisReply *
check_reply (KdRedisConn  *conn,
             redisReply   *reply,
             GError      **error)
{
  if (reply == NULL)
    {
      set_io_error (conn, error);
      return NULL;
    }
  if (reply->type == REDIS_REPLY_ERROR)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_FAILED, "Redis at %s:%u: %s",
                   conn->host, conn->port, reply->str);
      if (g_str_has_prefix (reply->str, "NOSCRIPT"))
        kd_redis_conn_close (conn);
      freeReplyObject (reply);
      return NULL;
    }
  return reply;
}

gboolean
kd_redis_conn_ensure (KdRedisConn  *conn,
                      GError      **error)
{
  struct timeval tv;
  guint i;

  if (conn->context != NULL)
    return TRUE;

  tv.tv_sec = conn->timeout_us / G_USEC_PER_SEC;
  tv.tv_usec = conn->timeout_us % G_USEC_PER_SEC;
  conn->context = redisConnectWithTimeout (conn->host, (int) conn->port, tv);
  if (conn->context == NULL || conn->context->err != 0)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_CONNECTION_REFUSED,
                   "Cannot connect to Redis at %s:%u: %s", conn->host, conn->port,
                   conn->context != NULL ? conn->context->errstr : "out of memory");
      kd_redis_conn_close (conn);
      return FALSE;
    }
  if (redisSetTimeout (conn->context, tv) != REDIS_OK)
    {
      set_io_error (conn, error);
      return FALSE;
    }
  redisEnableKeepAlive (conn->context);

  for (i = 0; i < KD_REDIS_N_SCRIPTS; i++)
    {
      const char *argv[] = { "SCRIPT", "LOAD", scripts[i] };
      size_t argvlen[] = { 6, 4, strlen (scripts[i]) };
      redisReply *reply;

      reply = check_reply (conn, redisCommandArgv (conn->context, 3, argv, argvlen), error);
      if (reply == NULL)
        {
          kd_redis_conn_close (conn);
          return FALSE;
        }
      g_assert (reply->type == REDIS_REPLY_STRING && reply->len == 40);
      memcpy (conn->sha[i], reply->str, 41);
      freeReplyObject (reply);
    }

  return TRUE;
}

redisReply *
kd_redis_conn_run (KdRedisConn  *conn,
                   KdRedisArgs  *args,
                   GError      **error)
{
  if (!kd_redis_conn_ensure (conn, error))
    return NULL;
  return check_reply (conn,
                      redisCommandArgv (conn->context, (int) args->argv->len,
                                        (const char **) args->argv->pdata,
                                        (const size_t *) (gpointer) args->argvlen->data),
                      error);
}

gboolean
kd_redis_conn_append (KdRedisConn  *conn,
                      KdRedisArgs  *args,
                      GError      **error)
{
  if (!kd_redis_conn_ensure (conn, error))
    return FALSE;
  if (redisAppendCommandArgv (conn->context, (int) args->argv->len,
                              (const char **) args->argv->pdata,
                              (const size_t *) (gpointer) args->argvlen->data) != REDIS_OK)
    {
      set_io_error (conn, error);
      return FALSE;
    }
  return TRUE;
}

/* Reads the reply of the oldest appended command. After an I/O error the
 * connection is closed and the other replies are lost. */
redisReply *
kd_redis_conn_read (KdRedisConn  *conn,
                    GError      **error)
{
  void *reply = NULL;

  if (conn->context == NULL)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_NOT_CONNECTED,
                   "Redis at %s:%u: connection lost", conn->host, conn->port);
      return NULL;
    }
  if (redisGetReply (conn->context, &reply) != REDIS_OK)
    reply = NULL;
  return check_reply (conn, reply, error);
}

/* Creates the consumer group on every stream of the queue, from the
 * stream's start so that jobs added before any consumer ran are read; and
 * checks that the queue's number of shards is the one it was created with.
 * Safe to repeat. */
gboolean
kd_redis_conn_create_groups (KdRedisConn  *conn,
                             const char   *name,
                             guint         n_shards,
                             GError      **error)
{
  KdRedisArgs args;
  g_autofree char *meta = g_strdup_printf ("%s:meta", name);
  gboolean ok = TRUE;
  gint shard;
  guint i;

  kd_redis_args_init (&args);
  kd_redis_args_add_string (&args, "HSETNX");
  kd_redis_args_add_string (&args, meta);
  kd_redis_args_add_string (&args, "shards");
  kd_redis_args_add_printf (&args, "%u", n_shards);
  ok = kd_redis_conn_append (conn, &args, error);
  kd_redis_args_reset (&args);
  kd_redis_args_add_string (&args, "HGET");
  kd_redis_args_add_string (&args, meta);
  kd_redis_args_add_string (&args, "shards");
  ok = ok && kd_redis_conn_append (conn, &args, error);
  for (shard = -1; ok && shard < (gint) n_shards; shard++)
    {
      g_autofree char *stream = kd_redis_stream_name (name, shard);

      kd_redis_args_reset (&args);
      kd_redis_args_add_string (&args, "XGROUP");
      kd_redis_args_add_string (&args, "CREATE");
      kd_redis_args_add_string (&args, stream);
      kd_redis_args_add_string (&args, KD_REDIS_GROUP);
      kd_redis_args_add_string (&args, "0");
      kd_redis_args_add_string (&args, "MKSTREAM");
      ok = kd_redis_conn_append (conn, &args, error);
    }
  kd_redis_args_clear (&args);
  if (!ok)
    return FALSE;

  for (i = 0; i < n_shards + 3; i++)
    {
      GError *local_error = NULL;
      redisReply *reply = kd_redis_conn_read (conn, &local_error);

      if (reply == NULL && conn->context == NULL)
        {
          g_propagate_error (error, local_error);
          return FALSE;
        }
      if (reply == NULL)
        {
          /* The group exists already. */
          if (strstr (local_error->message, "BUSYGROUP") == NULL && ok)
            {
              g_propagate_error (error, local_error);
              local_error = NULL;
              ok = FALSE;
            }
          g_clear_error (&local_error);
          continue;
        }
      if (i == 1 && ok &&
          (reply->type != REDIS_REPLY_STRING ||
           g_ascii_strtoull (reply->str, NULL, 10) != n_shards))
        {
          g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                       "Queue %s was created with %s shards, not %u", name,
                       reply->type == REDIS_REPLY_STRING ? reply->str : "?", n_shards);
          ok = FALSE;
        }
      freeReplyObject (reply);
    }

  return ok;
}
