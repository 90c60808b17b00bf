/* kd-redis-router-private.h: one thread's connections to a lone Redis server, or to the masters of a Redis Cluster
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * kd-redis-router.c says how commands find their node.
 */

#pragma once

#include "kd-redis-conn-private.h"

G_BEGIN_DECLS

#define KD_REDIS_N_SLOTS 16384

typedef struct _KdRedisNode KdRedisNode;

/* Used by one thread at a time: not thread-safe. */
typedef struct
{
  KdRedisServer  server;        /* the seed: where first, and how to log in to every node */
  gint64         timeout_us;
  char          *queue;         /* the connections' names (kd_redis_conn_set_name()) */
  char          *role;
  char          *member;
  GPtrArray     *nodes;         /* KdRedisNode *: the lone server; or each master of the map */
  guint16       *slot_node;     /* a cluster's: per slot, its master's index in @nodes */
  gboolean       map_stale;     /* a cluster's map is read again at the next update */
  gint64         next_map_read; /* monotonic: no map is read before, after a failed one */
  gboolean       fresh;         /* a connection was made since kd_redis_router_checked() */
} KdRedisRouter;

guint         kd_redis_key_slot          (const char          *key,
                                          gsize                len);

void          kd_redis_router_init       (KdRedisRouter       *router,
                                          const KdRedisServer *server,
                                          gint64               timeout_us);
void          kd_redis_router_set_name   (KdRedisRouter       *router,
                                          const char          *queue,
                                          const char          *role,
                                          const char          *member);
void          kd_redis_router_clear      (KdRedisRouter       *router);
void          kd_redis_router_close      (KdRedisRouter       *router);
gboolean      kd_redis_router_update     (KdRedisRouter       *router,
                                          GError             **error);
KdRedisConn  *kd_redis_router_conn       (KdRedisRouter       *router,
                                          guint                slot,
                                          GError             **error);
KdRedisConn  *kd_redis_router_peek       (KdRedisRouter       *router,
                                          guint                slot);
KdRedisConn  *kd_redis_router_conn_for   (KdRedisRouter       *router,
                                          const char          *key,
                                          GError             **error);
void          kd_redis_router_failed     (KdRedisRouter       *router,
                                          KdRedisConn         *conn);
void          kd_redis_router_redirected (KdRedisRouter       *router);
void          kd_redis_router_flush      (KdRedisRouter       *router);
gboolean      kd_redis_router_needs_check (KdRedisRouter      *router);
void          kd_redis_router_checked    (KdRedisRouter       *router);

/* Whether the router talks to a Redis Cluster. */
static inline gboolean
kd_redis_router_is_cluster (const KdRedisRouter *router)
{
  return router->server.cluster;
}

/* The keys of one command, script or transaction must be in one group:
 * one slot of a cluster; anything on a lone server. */
static inline guint
kd_redis_router_group (const KdRedisRouter *router,
                       guint                slot)
{
  return router->server.cluster ? slot : 0;
}

G_END_DECLS
