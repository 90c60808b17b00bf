/* kd-redis-queue-private.h: the fields of a KdRedisQueue
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The queue is one object in two files: kd-redis-queue.c holds the object,
 * its configuration and the consumer side's entry points (the dispatcher it
 * feeds, start, stop, stats), and its DESIGN comment tells the design of
 * the whole queue; kd-redis-producer.c holds the producer side, which works
 * on the producer's connections (a router, kd-redis-router.c: one to a lone
 * server, or one per master of a cluster): adding jobs, counting the
 * backlog and waiting for it, trimming. The consumer side's own object is in
 * kd-redis-consumer-private.h.
 */

#pragma once

#include "kd-redis-router-private.h"
#include "kd-redis-consumer-private.h"
#include "kd-redis-queue.h"

G_BEGIN_DECLS

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
  KdRedisRouter    producer;     /* set up at the first use: @streams is then not NULL */
  GPtrArray       *streams;      /* char *: each shard's stream, then the unkeyed one */
  char           **unusable;     /* the same: why Redis refuses it, or NULL */
  char            *producer_id;
  guint64          sequence;

  /* Used from the thread that owns the queue; @consumer, set once, is read
   * atomically by kd_redis_queue_get_stats() from any thread */
  KdRedisConsumer *consumer;
  KdDispatcher    *dispatcher;
};

G_END_DECLS
