/* kd-redis-consumer-private.h: the consumer side of a KdRedisQueue
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The consumer is one object run by three threads, each in its own file:
 * kd-redis-lease.c (membership and leases), kd-redis-reader.c (takeovers
 * and reads), kd-redis-acker.c (acknowledgements and dead letters).
 * kd-redis-consumer.c holds the object, its state and the helpers they
 * share; its DESIGN comment says how they fit together.
 */

#pragma once

#include "kd-dispatcher.h"
#include "kd-redis-entry-private.h"
#include "kd-redis-router-private.h"
#include "kd-redis-queue.h"

G_BEGIN_DECLS

/* A queue's settings, fixed once it produces or consumes. */
typedef struct
{
  KdRedisServer server;
  char   *name;
  guint   n_shards;
  gint64  lease_us;
  guint   batch_size;
  gint    min_replicas;  /* -1: 1 on a cluster, 0 on a lone server */
  guint   max_attempts;
  gint64  retry_initial_us;
  gint64  retry_max_us;
} KdRedisConfig;

typedef enum
{
  KD_REDIS_SHARD_FREE,
  KD_REDIS_SHARD_CLAIMING,
  KD_REDIS_SHARD_READING,
  KD_REDIS_SHARD_DRAINING,
} KdRedisShardState;

typedef struct
{
  /* Immutable after construction */
  char              *stream;
  char              *lease;
  char              *fence;        /* its fencing token's key; NULL for the unkeyed stream */
  gint               index;        /* -1: the unkeyed stream */
  guint              slot;         /* the hash slot of its keys (kd_redis_key_slot()) */

  /* Protected by the consumer's lock */
  KdRedisShardState  state;
  guint              generation;
  guint64            token;        /* its fencing token while this member holds it */
  gint64             deadline;     /* monotonic: no job of the shard starts from then on */
  guint              in_flight;    /* read and not yet acknowledged, refused or skipped */
  gboolean           reading;      /* the reader is reading it: what it gets is not counted yet */
  gboolean           wanted;       /* ours by rendezvous */
  char               cursor[64];   /* XAUTOCLAIM's, while CLAIMING */
  char               last_id[64];  /* while idle: XREAD waits for entries after it */
  char              *unusable;     /* why Redis refused its group: set aside; or NULL */

  /* Used by the reader thread only */
  GHashTable        *producers;    /* producer id → guint64 *: the highest sequence read */
  guint              producers_generation;
} KdRedisShard;

struct _KdRedisConsumer
{
  gint               ref_count;    /* atomic */

  /* Immutable after construction */
  KdRedisConfig      config;
  char              *member;
  char              *members_key;
  char              *dead_key;
  char              *progress_channel;
  char              *wake_key;     /* the stream that wakes the reader from XREAD */
  KdRedisShard      *shards;       /* n_shards keyed ones, then the unkeyed stream */
  guint              n_streams;
  gint64             tick_us;
  gint64             margin_us;
  gint64             claim_idle_us;
  GAsyncQueue       *ended;        /* KdRedisEntry *, or the consumer itself to wake the acker */

  /* Written by start and stop, from the thread that owns the queue */
  KdDispatcher      *dispatcher;
  GThread           *lease_thread;
  GThread           *reader;
  GThread           *acker;
  GCancellable      *cancellable;
  gulong             cancel_id;

  GMutex             lock;
  GCond              cond;         /* the reader's and stop()'s */
  GCond              lease_cond;   /* the lease thread's */

  /* Protected by @lock */
  gboolean           running;
  gboolean           stopping;     /* the reader exits; no shard is wanted */
  gboolean           reader_done;  /* the reader exited */
  gboolean           leaving;      /* the acker exits */
  gboolean           releasing;    /* the lease thread releases every lease and exits */
  gboolean           cancelled;
  gboolean           reader_waiting;
  gboolean           reader_blocked;
  gboolean           wake_pending; /* something changed since the reader looked */
  gboolean           unblock_wanted;
  guint              in_flight;
  guint              read_offset;
  GHashTable        *unkeyed_ids;  /* ids of unkeyed entries in flight */
  KdRedisQueueStats  stats;

  /* Used by the reader thread only */
  char               wake_last_id[64];
  gint64             poll_us;      /* on a cluster: how long it waits before reading again */
};

static inline gboolean
kd_redis_shard_owned (const KdRedisShard *shard)
{
  return shard->state != KD_REDIS_SHARD_FREE;
}

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
gboolean         kd_redis_consumer_is_cancelled (KdRedisConsumer    *self);
void             kd_redis_consumer_report      (KdRedisConsumer     *self,
                                                KdRedisEntry        *entry,
                                                KdRedisOutcome       outcome,
                                                const GError        *error,
                                                guint                attempts);
void             kd_redis_consumer_get_stats   (KdRedisConsumer     *self,
                                                KdRedisQueueStats   *stats);

/* Shared by the threads */
void             kd_redis_consumer_fence_locked       (KdRedisConsumer *self,
                                                       KdRedisShard    *shard);
void             kd_redis_consumer_fence_all_locked   (KdRedisConsumer *self);
void             kd_redis_consumer_wake_reader_locked (KdRedisConsumer *self);
void             kd_redis_consumer_wake_acker         (KdRedisConsumer *self);
void             kd_redis_consumer_unblock_reader     (KdRedisConsumer *self,
                                                       KdRedisRouter   *router);
gboolean         kd_redis_consumer_check_streams      (KdRedisConsumer *self,
                                                       KdRedisRouter   *router,
                                                       GError         **error);
gboolean         kd_redis_consumer_watch_leases       (KdRedisConsumer *self,
                                                       KdRedisConn     *conn,
                                                       const guint     *streams,
                                                       guint            n_streams,
                                                       gboolean        *ours,
                                                       GError         **error);
KdRedisShard    *kd_redis_consumer_entry_shard        (KdRedisConsumer *self,
                                                       KdRedisEntry    *entry);
void             kd_redis_consumer_drop_unsent        (KdRedisConsumer *self,
                                                       GPtrArray       *ended);

/* The threads */
gpointer         kd_redis_lease_main                  (gpointer         consumer);
gpointer         kd_redis_reader_main                 (gpointer         consumer);
gpointer         kd_redis_acker_main                  (gpointer         consumer);

G_END_DECLS
