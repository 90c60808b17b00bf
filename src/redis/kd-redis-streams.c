/* kd-redis-streams.c: the steps that go over every stream of a KdRedisQueue, each on its node
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Making the streams' consumer group, counting what they hold and trimming
 * them go over every stream of a queue, which a Redis Cluster spreads over
 * its masters: each command goes to its stream's node, and each script
 * runs once per slot over that slot's streams (on a lone server, once over
 * them all), appended on every node before any reply is read. A node that
 * fails costs the answers of its own streams: the others' are taken. See
 * kd-redis-router.c for how commands find their node.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-streams-private.h"

/* Checks that queue @name has @n_shards shards, noting it if the queue is
 * new: a process configured with another number must fail before it
 * creates streams of its own. */
static gboolean
check_n_shards (KdRedisRouter  *router,
                const char     *name,
                guint           n_shards,
                GError        **error)
{
  g_autofree char *meta = g_strdup_printf ("%s:meta", name);
  redisReply *replies[2] = { NULL, NULL };
  KdRedisArgs commands[2];
  KdRedisConn *conn;
  gboolean ok;
  guint k;

  conn = kd_redis_router_conn_for (router, meta, error);
  if (conn == NULL)
    return FALSE;
  for (k = 0; k < 2; k++)
    kd_redis_args_init (&commands[k]);
  kd_redis_args_add_string (&commands[0], "HSETNX");
  kd_redis_args_add_string (&commands[0], meta);
  kd_redis_args_add_string (&commands[0], "shards");
  kd_redis_args_add_printf (&commands[0], "%u", n_shards);
  kd_redis_args_add_string (&commands[1], "HGET");
  kd_redis_args_add_string (&commands[1], meta);
  kd_redis_args_add_string (&commands[1], "shards");
  ok = kd_redis_conn_pipeline (conn, commands, 2, replies, error);
  for (k = 0; k < 2; k++)
    kd_redis_args_clear (&commands[k]);
  if (!ok)
    {
      kd_redis_router_failed (router, conn);
      return FALSE;
    }
  if (replies[1]->type != REDIS_REPLY_STRING || g_ascii_strtoull (replies[1]->str, NULL, 10) != n_shards)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                   "Queue %s was created with %s shards, not %u", name,
                   replies[1]->type == REDIS_REPLY_STRING ? replies[1]->str : "?", n_shards);
      ok = FALSE;
    }
  for (k = 0; k < 2; k++)
    g_clear_pointer (&replies[k], kd_redis_reply_free);
  return ok;
}

/* Creates the consumer group, from the stream's start, on each stream of
 * queue @name whose index (a shard, or @n_shards for the unkeyed stream) is
 * in @streams, each on its node; sets each one's @unusable entry to Redis's
 * reason if it refuses (a key of another type), NULL if it takes it. The
 * entries of streams whose node failed stay as they were. */
static gboolean
create_groups_on (KdRedisRouter  *router,
                  const char     *name,
                  guint           n_shards,
                  GArray         *streams,
                  char          **unusable,
                  GError        **error)
{
  KdRedisConn **conns = g_new0 (KdRedisConn *, MAX (streams->len, 1));
  GError *failure = NULL;
  KdRedisArgs args;
  guint i;

  kd_redis_args_init (&args);
  for (i = 0; i < streams->len; i++)
    {
      guint index = g_array_index (streams, guint, i);
      g_autofree char *stream = kd_redis_stream_name (name, index == n_shards ? -1 : (gint) index);
      GError *local_error = NULL;
      KdRedisConn *conn = kd_redis_router_conn_for (router, stream, &local_error);

      kd_redis_args_reset (&args);
      kd_redis_args_add_string (&args, "XGROUP");
      kd_redis_args_add_string (&args, "CREATE");
      kd_redis_args_add_string (&args, stream);
      kd_redis_args_add_string (&args, KD_REDIS_GROUP);
      kd_redis_args_add_string (&args, "0");
      kd_redis_args_add_string (&args, "MKSTREAM");
      if (conn != NULL && kd_redis_conn_append (conn, &args, &local_error))
        conns[i] = conn;
      if (local_error != NULL && failure == NULL)
        failure = g_steal_pointer (&local_error);
      g_clear_error (&local_error);
    }
  kd_redis_args_clear (&args);
  kd_redis_router_flush (router);

  for (i = 0; i < streams->len; i++)
    {
      guint index = g_array_index (streams, guint, i);
      GError *local_error = NULL;
      redisReply *reply;

      if (conns[i] == NULL)
        continue;
      reply = kd_redis_conn_read (conns[i], &local_error);
      if (reply == NULL && kd_redis_error_is_redirection (local_error))
        {
          /* Not the node of the stream's slot (any more): no answer. */
          kd_redis_router_redirected (router);
          if (failure == NULL)
            failure = g_steal_pointer (&local_error);
          g_clear_error (&local_error);
          continue;
        }
      if (reply == NULL && !kd_redis_conn_is_connected (conns[i]))
        {
          /* The node failed: its streams' answers are lost. */
          kd_redis_router_failed (router, conns[i]);
          if (failure == NULL)
            failure = g_steal_pointer (&local_error);
          g_clear_error (&local_error);
          continue;
        }
      g_clear_pointer (&unusable[index], g_free);
      if (reply == NULL)
        {
          /* BUSYGROUP: the group exists already. WRONGTYPE: the key is not
           * a stream, this stream's problem alone. Anything else (a
           * permission, memory, a read-only replica, a slot that moved) is
           * the node's. */
          if (strstr (local_error->message, "WRONGTYPE") != NULL)
            unusable[index] = g_strdup (local_error->message);
          else if (strstr (local_error->message, "BUSYGROUP") == NULL && failure == NULL)
            failure = g_steal_pointer (&local_error);
          g_clear_error (&local_error);
          continue;
        }
      kd_redis_reply_free (reply);
    }
  g_free (conns);

  if (failure != NULL)
    {
      g_propagate_error (error, failure);
      return FALSE;
    }
  return TRUE;
}

/* Creates the consumer group on every stream of the queue, from the
 * stream's start so that jobs added before any consumer ran are read; and
 * checks that the queue's number of shards is the one it was created with.
 * Safe to repeat. A stream that refuses (a key of another type, say) does
 * not fail the rest: @unusable (n_shards + 1 entries, the keyed shards'
 * then the unkeyed stream's) gets Redis's reason for it, and NULL for the
 * others that answered (the caller frees them). FALSE with @error if a
 * node failed (the entries of its streams stay as they were) or the
 * queue has another number of shards (G_IO_ERROR_INVALID_ARGUMENT, and
 * nothing made). */
gboolean
kd_redis_create_groups (KdRedisRouter  *router,
                        const char     *name,
                        guint           n_shards,
                        char          **unusable,
                        GError        **error)
{
  g_autoptr (GArray) streams = g_array_sized_new (FALSE, FALSE, sizeof (guint), n_shards + 1);
  guint i;

  if (!check_n_shards (router, name, n_shards, error))
    return FALSE;
  for (i = 0; i <= n_shards; i++)
    g_array_append_val (streams, i);
  return create_groups_on (router, name, n_shards, streams, unusable, error);
}

/* As kd_redis_create_groups(), on the streams @unusable says Redis
 * refused only: one command each, to see whether they were repaired. */
gboolean
kd_redis_create_groups_again (KdRedisRouter  *router,
                              const char     *name,
                              guint           n_shards,
                              char          **unusable,
                              GError        **error)
{
  g_autoptr (GArray) streams = g_array_new (FALSE, FALSE, sizeof (guint));
  guint i;

  for (i = 0; i <= n_shards; i++)
    if (unusable[i] != NULL)
      g_array_append_val (streams, i);
  return create_groups_on (router, name, n_shards, streams, unusable, error);
}

static gint
compare_slots (gconstpointer a,
               gconstpointer b,
               gpointer      slots)
{
  guint slot_a = ((const guint *) slots)[*(const guint *) a];
  guint slot_b = ((const guint *) slots)[*(const guint *) b];

  return slot_a < slot_b ? -1 : slot_a > slot_b;
}

/* Runs @script over @keys (char *), once per group of keys that share a
 * slot (once over them all on a lone server), with the arguments @argv
 * (NULL-terminated) after the keys, and adds up the integers it answers in
 * @sum. FALSE with @error if a node failed or refused: the other groups'
 * answers are still added. */
gboolean
kd_redis_run_per_slot (KdRedisRouter       *router,
                       KdRedisScript        script,
                       GPtrArray           *keys,
                       const char * const  *argv,
                       guint64             *sum,
                       GError             **error)
{
  g_autofree guint *slots = g_new (guint, MAX (keys->len, 1));
  g_autofree guint *order = g_new (guint, MAX (keys->len, 1));
  g_autoptr (GPtrArray) conns = g_ptr_array_new ();
  GError *failure = NULL;
  KdRedisArgs args;
  guint i, start, end, k;

  for (i = 0; i < keys->len; i++)
    {
      const char *key = g_ptr_array_index (keys, i);

      slots[i] = kd_redis_router_group (router, kd_redis_key_slot (key, strlen (key)));
      order[i] = i;
    }
  g_qsort_with_data (order, (gint) keys->len, sizeof (guint), compare_slots, slots);

  kd_redis_args_init (&args);
  for (start = 0; start < keys->len; start = end)
    {
      GError *local_error = NULL;
      KdRedisConn *conn;

      for (end = start + 1; end < keys->len && slots[order[end]] == slots[order[start]]; end++)
        ;
      conn = kd_redis_router_conn_for (router, g_ptr_array_index (keys, order[start]), &local_error);
      if (conn != NULL)
        {
          kd_redis_args_reset (&args);
          kd_redis_args_add_script (&args, conn, script, end - start);
          for (i = start; i < end; i++)
            kd_redis_args_add_string (&args, g_ptr_array_index (keys, order[i]));
          for (k = 0; argv != NULL && argv[k] != NULL; k++)
            kd_redis_args_add_string (&args, argv[k]);
          if (!kd_redis_conn_append (conn, &args, &local_error))
            conn = NULL;
        }
      if (conn != NULL)
        g_ptr_array_add (conns, conn);
      else if (failure == NULL)
        failure = g_steal_pointer (&local_error);
      g_clear_error (&local_error);
    }
  kd_redis_args_clear (&args);
  kd_redis_router_flush (router);

  for (i = 0; i < conns->len; i++)
    {
      KdRedisConn *conn = g_ptr_array_index (conns, i);
      GError *local_error = NULL;
      redisReply *reply = kd_redis_conn_read (conn, &local_error);

      if (reply != NULL && reply->type == REDIS_REPLY_INTEGER && reply->integer >= 0)
        *sum += (guint64) reply->integer;
      else if (reply != NULL)
        g_set_error (&local_error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                     "Redis at %s: unexpected reply to a script", conn->where);
      else if (!kd_redis_conn_is_connected (conn))
        kd_redis_router_failed (router, conn);
      else if (kd_redis_error_is_redirection (local_error))
        kd_redis_router_redirected (router);
      g_clear_pointer (&reply, kd_redis_reply_free);
      if (local_error != NULL && failure == NULL)
        failure = g_steal_pointer (&local_error);
      g_clear_error (&local_error);
    }

  if (failure != NULL)
    {
      g_propagate_error (error, failure);
      return FALSE;
    }
  return TRUE;
}
