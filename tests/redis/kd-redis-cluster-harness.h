/* kd-redis-cluster-harness.h: a Redis Cluster of our own, its failover, and queues on it, for test-redis-cluster.c
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * kd-redis-cluster-harness.c says how the cluster is made and watched, and
 * what each function does where it defines it. The jobs, the worker
 * processes, their logs and the looks at what a queue holds (through the
 * cluster's @place) are kd-redis-harness.h's.
 */

#pragma once

#include <gio/gio.h>
#include <hiredis/hiredis.h>
#include <kdispatch/kdispatch.h>

#include "kd-redis-harness.h"

G_BEGIN_DECLS

#define CLUSTER_MASTERS 3
#define CLUSTER_NODES (2 * CLUSTER_MASTERS)   /* a replica per master */

/* How long a node may go unanswered before the others count it as
 * failing: a killed master's replica takes its place about twice this
 * later (the timeout, the others' agreement that it failed, the replica's
 * election delay of 500 to 1,000 ms, the vote). */
#define CLUSTER_NODE_TIMEOUT_MS 1000

typedef struct
{
  /* Where a queue's streams are, for kd-redis-harness.h's looks at what
   * it holds: on the masters. The first member, so that the harness's
   * Place * is the Cluster * too. */
  Place   place;
  char   *dir;                      /* the nodes' directories and the workers' logs */
  Server  nodes[CLUSTER_NODES];     /* a killed node's process is NULL */
  guint   bus_ports[CLUSTER_NODES];
  char  **node_args[CLUSTER_NODES]; /* each node's cluster options, its extra_args */
} Cluster;

gboolean       need_redis_cluster      (void);
void           cluster_start           (Cluster     *cluster);
void           cluster_stop            (Cluster     *cluster);
void           cluster_wait_converged  (Cluster     *cluster);
void           cluster_wait_replicated (Cluster     *cluster);
guint          cluster_kill_master     (Cluster     *cluster,
                                        const char  *key);
guint          cluster_failover        (Cluster     *cluster,
                                        const char  *key);
void           cluster_restart_node    (Cluster     *cluster,
                                        guint        node);
guint          cluster_kill_master_ahead (Cluster   *cluster,
                                        const char  *key,
                                        guint64      bytes);
guint          cluster_master_of       (Cluster     *cluster,
                                        const char  *key);
redisContext  *cluster_connect_key     (Cluster     *cluster,
                                        const char  *key,
                                        guint       *node);
char          *cluster_url             (Cluster     *cluster);

/* ---- A queue on the cluster -------------------------------------------- */

KdRedisQueue  *cluster_open_queue      (Cluster     *cluster,
                                        const char  *name,
                                        guint        n_shards);
void           cluster_produce         (Cluster     *cluster,
                                        const char  *name,
                                        guint        n_shards,
                                        guint        n_jobs,
                                        guint        n_keys,
                                        Jobs        *jobs);
Worker        *cluster_worker_start    (Cluster     *cluster,
                                        const char  *name,
                                        guint        index,
                                        ...) G_GNUC_NULL_TERMINATED;

G_END_DECLS
