/* kd-redis-router.c: one thread's connections to a lone Redis server, or to the masters of a Redis Cluster
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Each thread of a KdRedisQueue that talks to Redis (reader, acker, lease
 * keeper, producer) has a router: the connection to a lone server, or one
 * connection per master of a Redis Cluster and the map of which master
 * serves which of the 16384 hash slots. A command goes to the node of its
 * keys' slot (kd_redis_key_slot()): a cluster runs a command, script or
 * transaction only over keys of one slot, so the queue names a shard's
 * keys with its hash tag (N:{p}, N:{p}:lease, N:{p}:fence) and runs the
 * steps that span shards once per slot ("group", kd_redis_router_group();
 * on a lone server, every key is in the one group).
 *
 * The map comes from CLUSTER SLOTS, asked of the nodes of the last map and
 * then of the seed (the URL's node). It is read at the first use, and read
 * again at the next kd_redis_router_update() once something suggests it
 * changed: a connection that failed (a master that died, whose replica
 * takes over), or a redirection (MOVED, ASK, TRYAGAIN, CLUSTERDOWN: a slot
 * moved or is moving). Its users call kd_redis_router_update() between
 * rounds, never inside one, so the connections they hold during a round
 * stay valid. A redirection fails the round of the keys it concerns, which
 * their thread does again at its next round on the new map: the threads'
 * rounds repeat anyway, and a command of a round is never half done on
 * two nodes. On a cluster, a node whose connection failed is not tried
 * again for RETRY_DOWN_US, so that a dead master costs its shards alone,
 * not a reconnection per round of the others.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-router-private.h"

/* A node that could not be reached is tried again after this, and the map
 * read again at most this often while no node answers. */
#define RETRY_DOWN_US ((gint64) 100 * 1000)

#define NO_NODE G_MAXUINT16

struct _KdRedisNode
{
  KdRedisConn conn;
  gint64      down_until;        /* monotonic: not tried again before, after a failure */
};

/* CRC16-CCITT (XMODEM), as Redis Cluster hashes keys. */
static guint16
crc16 (const char *data,
       gsize       len)
{
  guint16 crc = 0;
  gsize i;
  gint bit;

  for (i = 0; i < len; i++)
    {
      crc ^= (guint16) ((guint8) data[i] << 8);
      for (bit = 0; bit < 8; bit++)
        crc = (crc & 0x8000) != 0 ? (guint16) ((crc << 1) ^ 0x1021) : (guint16) (crc << 1);
    }
  return crc;
}

/* The hash slot of @key: of what its first {...} holds, if not empty
 * (its hash tag), else of the whole key. */
guint
kd_redis_key_slot (const char *key,
                   gsize       len)
{
  const char *open = memchr (key, '{', len);

  if (open != NULL)
    {
      gsize from = (gsize) (open - key) + 1;
      const char *close = memchr (key + from, '}', len - from);

      if (close != NULL && close > key + from)
        return crc16 (key + from, (gsize) (close - key) - from) & (KD_REDIS_N_SLOTS - 1);
    }
  return crc16 (key, len) & (KD_REDIS_N_SLOTS - 1);
}

static KdRedisNode *
node_new (KdRedisRouter *router,
          const char    *host,
          guint          port)
{
  KdRedisNode *node = g_new0 (KdRedisNode, 1);
  KdRedisServer server;

  kd_redis_server_copy (&server, &router->server);
  if (host != NULL)
    {
      g_free (server.host);
      server.host = g_strdup (host);
      server.port = port;
    }
  kd_redis_conn_init (&node->conn, &server, router->timeout_us);
  kd_redis_server_clear (&server);
  if (router->queue != NULL)
    kd_redis_conn_set_name (&node->conn, router->queue, router->role, router->member);
  return node;
}

static void
node_free (KdRedisNode *node)
{
  kd_redis_conn_clear (&node->conn);
  g_free (node);
}

void
kd_redis_router_init (KdRedisRouter       *router,
                      const KdRedisServer *server,
                      gint64               timeout_us)
{
  memset (router, 0, sizeof *router);
  kd_redis_server_copy (&router->server, server);
  router->timeout_us = timeout_us;
  router->nodes = g_ptr_array_new_with_free_func ((GDestroyNotify) node_free);
  /* A lone server's node is known from the start; a cluster's come with
   * its map. */
  if (!server->cluster)
    g_ptr_array_add (router->nodes, node_new (router, NULL, 0));
  router->map_stale = TRUE;
  router->fresh = TRUE;
}

/* Names every connection kd:QUEUE:ROLE:MEMBER (kd_redis_conn_set_name()). */
void
kd_redis_router_set_name (KdRedisRouter *router,
                          const char    *queue,
                          const char    *role,
                          const char    *member)
{
  guint i;

  g_free (router->queue);
  g_free (router->role);
  g_free (router->member);
  router->queue = g_strdup (queue);
  router->role = g_strdup (role);
  router->member = g_strdup (member);
  for (i = 0; i < router->nodes->len; i++)
    kd_redis_conn_set_name (&((KdRedisNode *) g_ptr_array_index (router->nodes, i))->conn, queue, role, member);
}

void
kd_redis_router_clear (KdRedisRouter *router)
{
  g_clear_pointer (&router->nodes, g_ptr_array_unref);
  g_clear_pointer (&router->slot_node, g_free);
  g_clear_pointer (&router->queue, g_free);
  g_clear_pointer (&router->role, g_free);
  g_clear_pointer (&router->member, g_free);
  kd_redis_server_clear (&router->server);
}

/* Drops every connection; a cluster's map is read again. */
void
kd_redis_router_close (KdRedisRouter *router)
{
  guint i;

  for (i = 0; i < router->nodes->len; i++)
    kd_redis_conn_close (&((KdRedisNode *) g_ptr_array_index (router->nodes, i))->conn);
  router->map_stale = TRUE;
}

static gboolean
find_node (GPtrArray  *nodes,
           const char *host,
           guint       port,
           guint      *index)
{
  guint i;

  for (i = 0; i < nodes->len; i++)
    {
      KdRedisNode *node = g_ptr_array_index (nodes, i);

      if (node->conn.server.port == port && g_strcmp0 (node->conn.server.host, host) == 0)
        {
          *index = i;
          return TRUE;
        }
    }
  return FALSE;
}

/* Takes the map CLUSTER SLOTS answered on a node of host @asked_host:
 * [[first, last, [host, port, id, ...], replica...], ...], where an empty
 * host is the node's own. The nodes of the old map that still serve slots
 * keep their connections; the others are dropped. FALSE, and the old map
 * kept, if the reply maps no slot. */
static gboolean
take_map (KdRedisRouter    *router,
          const redisReply *reply,
          const char       *asked_host,
          GError          **error)
{
  GPtrArray *nodes = g_ptr_array_new_with_free_func ((GDestroyNotify) node_free);
  guint16 *slot_node = g_new (guint16, KD_REDIS_N_SLOTS);
  gsize r;
  guint i;

  for (i = 0; i < KD_REDIS_N_SLOTS; i++)
    slot_node[i] = NO_NODE;
  for (r = 0; reply->type == REDIS_REPLY_ARRAY && r < reply->elements && nodes->len < NO_NODE; r++)
    {
      const redisReply *range = reply->element[r];
      const redisReply *master;
      const char *host;
      guint port, index;
      long long slot;

      if (range->type != REDIS_REPLY_ARRAY || range->elements < 3 ||
          range->element[0]->type != REDIS_REPLY_INTEGER || range->element[1]->type != REDIS_REPLY_INTEGER ||
          range->element[2]->type != REDIS_REPLY_ARRAY || range->element[2]->elements < 2 ||
          range->element[2]->element[0]->type != REDIS_REPLY_STRING ||
          range->element[2]->element[1]->type != REDIS_REPLY_INTEGER ||
          range->element[0]->integer < 0 || range->element[1]->integer >= KD_REDIS_N_SLOTS ||
          range->element[0]->integer > range->element[1]->integer ||
          range->element[2]->element[1]->integer <= 0 || range->element[2]->element[1]->integer >= 65536)
        continue;
      master = range->element[2];
      host = master->element[0]->str[0] != '\0' ? master->element[0]->str : asked_host;
      port = (guint) master->element[1]->integer;
      if (!find_node (nodes, host, port, &index))
        {
          KdRedisNode *node;
          guint old;

          node = find_node (router->nodes, host, port, &old) ? g_ptr_array_steal_index_fast (router->nodes, old)
                                                              : node_new (router, host, port);
          index = nodes->len;
          g_ptr_array_add (nodes, node);
        }
      for (slot = range->element[0]->integer; slot <= range->element[1]->integer; slot++)
        slot_node[slot] = (guint16) index;
    }

  if (nodes->len == 0)
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                           "Redis Cluster: CLUSTER SLOTS maps no slot");
      g_ptr_array_unref (nodes);
      g_free (slot_node);
      return FALSE;
    }
  g_ptr_array_unref (router->nodes);
  router->nodes = nodes;
  g_free (router->slot_node);
  router->slot_node = slot_node;
  return TRUE;
}

/* Asks @conn (connecting it if needed) for the cluster's map, and takes
 * it. @conn may be freed by then, if its node no longer serves a slot. */
static gboolean
ask_map (KdRedisRouter  *router,
         KdRedisConn    *conn,
         GError        **error)
{
  g_autofree char *host = g_strdup (conn->server.host);
  KdRedisArgs args;
  redisReply *reply;
  gboolean ok;

  if (!kd_redis_conn_ensure (conn, error))
    return FALSE;
  kd_redis_args_init (&args);
  kd_redis_args_add_string (&args, "CLUSTER");
  kd_redis_args_add_string (&args, "SLOTS");
  reply = kd_redis_conn_run (conn, &args, error);
  kd_redis_args_clear (&args);
  if (reply == NULL)
    return FALSE;
  ok = take_map (router, reply, host, error);
  kd_redis_reply_free (reply);
  return ok;
}

/* Reads a cluster's map again if something suggested it changed (see the
 * top of the file), asking the nodes of the last map, those connected
 * first, and then the seed. At most once per RETRY_DOWN_US. FALSE only if
 * no map was ever read: with an old one, the nodes that still answer go
 * on, and the map is read again at a later update. */
gboolean
kd_redis_router_update (KdRedisRouter  *router,
                        GError        **error)
{
  GError *local_error = NULL;
  gint64 now = g_get_monotonic_time ();
  KdRedisConn seed;
  gboolean ok = FALSE;
  guint pass, i;

  if (!router->server.cluster || !router->map_stale || now < router->next_map_read)
    {
      if (router->server.cluster && router->slot_node == NULL)
        {
          g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_NOT_CONNECTED,
                               "Redis Cluster: no node answered for the map of its slots yet");
          return FALSE;
        }
      return TRUE;
    }
  router->next_map_read = now + RETRY_DOWN_US;

  for (pass = 0; pass < 2 && !ok; pass++)
    for (i = 0; i < router->nodes->len && !ok; i++)
      {
        KdRedisNode *node = g_ptr_array_index (router->nodes, i);

        if (kd_redis_conn_is_connected (&node->conn) != (pass == 0) || now < node->down_until)
          continue;
        g_clear_error (&local_error);
        /* A connection made here is a new one too. */
        router->fresh = router->fresh || pass == 1;
        ok = ask_map (router, &node->conn, &local_error);
        if (!ok && !kd_redis_conn_is_connected (&node->conn))
          node->down_until = now + RETRY_DOWN_US;
      }
  if (!ok)
    {
      kd_redis_conn_init (&seed, &router->server, router->timeout_us);
      g_clear_error (&local_error);
      ok = ask_map (router, &seed, &local_error);
      kd_redis_conn_clear (&seed);
    }

  if (ok)
    {
      router->map_stale = FALSE;
      g_clear_error (&local_error);
      return TRUE;
    }
  if (router->slot_node != NULL)
    {
      g_debug ("Redis Cluster: its map was not read again: %s", local_error->message);
      g_error_free (local_error);
      return TRUE;
    }
  g_propagate_error (error, local_error);
  return FALSE;
}

/* The connection to the node that serves @slot, connected; or NULL with
 * @error set. On a cluster, a node whose connection fails is not tried
 * again for RETRY_DOWN_US, and the map is read again at the next update. */
KdRedisConn *
kd_redis_router_conn (KdRedisRouter  *router,
                      guint           slot,
                      GError        **error)
{
  gint64 now = g_get_monotonic_time ();
  KdRedisNode *node;

  if (!router->server.cluster)
    node = g_ptr_array_index (router->nodes, 0);
  else if (router->slot_node == NULL || router->slot_node[slot] == NO_NODE)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_NOT_CONNECTED,
                   "Redis Cluster: no node serves slot %u (the cluster is down, or its map unknown)", slot);
      router->map_stale = TRUE;
      return NULL;
    }
  else
    {
      node = g_ptr_array_index (router->nodes, router->slot_node[slot]);
      if (now < node->down_until)
        {
          g_set_error (error, G_IO_ERROR, G_IO_ERROR_NOT_CONNECTED,
                       "Redis at %s: not reachable a moment ago", node->conn.where);
          return NULL;
        }
    }

  if (!kd_redis_conn_is_connected (&node->conn))
    {
      if (!kd_redis_conn_ensure (&node->conn, error))
        {
          if (router->server.cluster)
            {
              node->down_until = now + RETRY_DOWN_US;
              router->map_stale = TRUE;
            }
          return NULL;
        }
      router->fresh = TRUE;
    }
  return &node->conn;
}

/* The connection of the node that serves @slot, connected or not; NULL
 * if no node does. */
KdRedisConn *
kd_redis_router_peek (KdRedisRouter *router,
                      guint          slot)
{
  if (!router->server.cluster)
    return &((KdRedisNode *) g_ptr_array_index (router->nodes, 0))->conn;
  if (router->slot_node == NULL || router->slot_node[slot] == NO_NODE)
    return NULL;
  return &((KdRedisNode *) g_ptr_array_index (router->nodes, router->slot_node[slot]))->conn;
}

KdRedisConn *
kd_redis_router_conn_for (KdRedisRouter  *router,
                          const char     *key,
                          GError        **error)
{
  return kd_redis_router_conn (router, kd_redis_key_slot (key, strlen (key)), error);
}

/* A round failed on @conn (an I/O error, an error reply, a redirection):
 * it is closed, and a cluster's map read again at the next update. */
void
kd_redis_router_failed (KdRedisRouter *router,
                        KdRedisConn   *conn)
{
  kd_redis_conn_close (conn);
  if (router->server.cluster)
    router->map_stale = TRUE;
}

/* Sends what was appended on every connection, so that the nodes work
 * at once rather than each when its first reply is read. A connection
 * that fails is closed: its replies read fail. */
void
kd_redis_router_flush (KdRedisRouter *router)
{
  guint i;

  for (i = 0; i < router->nodes->len; i++)
    {
      KdRedisNode *node = g_ptr_array_index (router->nodes, i);

      kd_redis_conn_flush (&node->conn, NULL);
    }
}

/* A command was redirected (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) on a
 * connection that stays open: the map is read again at the next update,
 * however recently it was read (the node that said so answers). */
void
kd_redis_router_redirected (KdRedisRouter *router)
{
  if (router->server.cluster)
    {
      router->map_stale = TRUE;
      router->next_map_read = 0;
    }
}

/* Whether a connection was made since the last kd_redis_router_checked()
 * (or ever), or one of the map's nodes is not connected, so that its next
 * command would make one: the queue's consumer groups are made again on
 * its streams first (a server restarted without its data lost them). */
gboolean
kd_redis_router_needs_check (KdRedisRouter *router)
{
  guint i;

  if (router->fresh)
    return TRUE;
  for (i = 0; i < router->nodes->len; i++)
    if (!kd_redis_conn_is_connected (&((KdRedisNode *) g_ptr_array_index (router->nodes, i))->conn))
      return TRUE;
  return FALSE;
}

void
kd_redis_router_checked (KdRedisRouter *router)
{
  router->fresh = FALSE;
}
