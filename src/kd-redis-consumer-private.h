/* kd-redis-consumer-private.h: the consumer side of a KdRedisQueue
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include "kd-dispatcher.h"
#include "kd-redis-entry-private.h"
#include "kd-redis-queue.h"

G_BEGIN_DECLS

/* A queue's settings, fixed once it produces or consumes. */
typedef struct
{
  char   *host;
  guint   port;
  char   *name;
  guint   n_shards;
  gint64  lease_us;
  guint   batch_size;
  guint   max_attempts;
  gint64  retry_initial_us;
  gint64  retry_max_us;
} KdRedisConfig;

KdRedisConsumer *kd_redis_consumer_new         (const KdRedisConfig *config,
                                                const char          *member);
KdRedisConsumer *kd_redis_consumer_ref         (KdRedisConsumer     *self);
void             kd_redis_consumer_unref       (KdRedisConsumer     *self);
gboolean         kd_redis_consumer_start       (KdRedisConsumer     *self,
                                                KdDispatcher        *dispatcher,
                                                GError             **error);
void             kd_redis_consumer_stop        (KdRedisConsumer     *self);
gboolean         kd_redis_consumer_may_start   (KdRedisConsumer     *self,
                                                KdRedisEntry        *entry);
void             kd_redis_consumer_report      (KdRedisConsumer     *self,
                                                KdRedisEntry        *entry,
                                                KdRedisOutcome       outcome,
                                                const GError        *error,
                                                guint                attempts);
void             kd_redis_consumer_get_stats   (KdRedisConsumer     *self,
                                                KdRedisQueueStats   *stats);

G_END_DECLS
