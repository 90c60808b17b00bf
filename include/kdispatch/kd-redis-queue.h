/* kd-redis-queue.h: keyed jobs shared by many processes through Redis Streams
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#if !defined(KD_INSIDE) && !defined(KDISPATCH_COMPILATION)
# error "Only <kdispatch/kdispatch.h> can be included directly."
#endif

#include <gio/gio.h>

#include "kd-dispatcher.h"
#include "kd-version.h"

G_BEGIN_DECLS

#define KD_TYPE_REDIS_QUEUE (kd_redis_queue_get_type ())

/**
 * KD_REDIS_QUEUE_MAX_FIELD_SIZE:
 *
 * The longest key or payload, in bytes, a #KdRedisQueue takes: 512 MiB
 * (Redis's default proto-max-bulk-len; Redis closes the connection of a
 * client that sends a longer string) less 64 KiB for the rest of the
 * command. kd_redis_queue_add_many() refuses a longer one before sending
 * anything.
 *
 * Since: 0.1
 */
#define KD_REDIS_QUEUE_MAX_FIELD_SIZE ((gsize) 512 * 1024 * 1024 - (gsize) 64 * 1024)

/**
 * KD_REDIS_QUEUE_MAX_LEASE_US:
 *
 * The longest lease time kd_redis_queue_set_lease_time() takes: a day, in
 * microseconds.
 *
 * Since: 0.1
 */
#define KD_REDIS_QUEUE_MAX_LEASE_US ((gint64) 24 * 60 * 60 * G_TIME_SPAN_SECOND)

/**
 * KD_REDIS_QUEUE_MAX_BATCH_SIZE:
 *
 * The largest batch kd_redis_queue_set_batch_size() takes: 1,048,576
 * entries in flight per process.
 *
 * Since: 0.1
 */
#define KD_REDIS_QUEUE_MAX_BATCH_SIZE (1024 * 1024)

KD_AVAILABLE_IN_ALL
G_DECLARE_FINAL_TYPE (KdRedisQueue, kd_redis_queue, KD, REDIS_QUEUE, GObject)

/**
 * KdRedisQueueStats:
 * @read: entries read from the streams as new
 * @claimed: entries taken over from an earlier owner of a shard (or from a
 *   consumer gone from the unkeyed stream)
 * @acked: entries acknowledged after their job completed
 * @dead_lettered: entries moved to the dead-letter stream after their last
 *   attempt failed
 * @refused: acknowledgements (or dead letters) Redis refused because the
 *   shard's lease was no longer this process's: another process runs them
 *   again
 * @skipped: entries this process did not start, or not finish, because it
 *   lost its shard or was about to: another process runs them
 * @trimmed: entries this process removed from the streams it owns, every
 *   consumer group having acknowledged them
 * @duplicates: entries acknowledged without running: copies, added by a
 *   producer that sent a job again after losing Redis's reply, of a job
 *   this process read before (same producer id and sequence)
 * @shards_owned: shards whose lease this process holds right now
 * @in_flight: entries read and not yet acknowledged, refused or skipped
 * @streams_set_aside: the queue's streams this process sets aside right now
 *   because Redis refuses them (a key of another type where a shard's
 *   stream should be, say): they are neither leased nor read, the others
 *   go on, and they are looked at again every sixth of the lease time
 *
 * A snapshot of a queue's consumer counters, filled by
 * kd_redis_queue_get_stats(). As #KdStats, it keeps its size and the
 * offsets of its fields in every version: new counters take reserved slots.
 *
 * Since: 0.1
 */
typedef struct
{
  guint64 read;
  guint64 claimed;
  guint64 acked;
  guint64 dead_lettered;
  guint64 refused;
  guint64 skipped;
  guint64 trimmed;
  guint64 duplicates;
  guint   shards_owned;
  guint   in_flight;
  guint64 streams_set_aside;

  /*< private >*/
  guint64 reserved[7];
} KdRedisQueueStats;

KD_AVAILABLE_IN_ALL
KdRedisQueue *kd_redis_queue_new             (const char      *name) G_GNUC_WARN_UNUSED_RESULT;

KD_AVAILABLE_IN_ALL
void          kd_redis_queue_set_address     (KdRedisQueue    *self,
                                              const char      *host,
                                              guint            port);
KD_AVAILABLE_IN_ALL
gboolean      kd_redis_queue_set_url         (KdRedisQueue    *self,
                                              const char      *url,
                                              GError         **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_redis_queue_set_tls         (KdRedisQueue    *self,
                                              const char      *ca_file,
                                              const char      *cert_file,
                                              const char      *key_file,
                                              GError         **error);
KD_AVAILABLE_IN_ALL
void          kd_redis_queue_set_credentials (KdRedisQueue    *self,
                                              const char      *user,
                                              const char      *password);
KD_AVAILABLE_IN_ALL
void          kd_redis_queue_set_n_shards    (KdRedisQueue    *self,
                                              guint            n_shards);
KD_AVAILABLE_IN_ALL
void          kd_redis_queue_set_lease_time  (KdRedisQueue    *self,
                                              gint64           lease_us);
KD_AVAILABLE_IN_ALL
void          kd_redis_queue_set_batch_size  (KdRedisQueue    *self,
                                              guint            batch_size);
KD_AVAILABLE_IN_ALL
void          kd_redis_queue_set_min_replicas (KdRedisQueue   *self,
                                              gint             min_replicas);
KD_AVAILABLE_IN_ALL
void          kd_redis_queue_set_retry       (KdRedisQueue    *self,
                                              guint            max_attempts,
                                              gint64           initial_delay_us,
                                              gint64           max_delay_us);

KD_AVAILABLE_IN_ALL
const char   *kd_redis_queue_get_name        (KdRedisQueue    *self);
KD_AVAILABLE_IN_ALL
guint         kd_redis_queue_get_n_shards    (KdRedisQueue    *self);
KD_AVAILABLE_IN_ALL
guint         kd_redis_queue_get_batch_size  (KdRedisQueue    *self);
KD_AVAILABLE_IN_ALL
guint         kd_redis_queue_get_min_replicas (KdRedisQueue   *self);
KD_AVAILABLE_IN_ALL
const char   *kd_redis_queue_get_consumer_name (KdRedisQueue  *self);
KD_AVAILABLE_IN_ALL
guint         kd_redis_queue_shard_for_key   (KdRedisQueue    *self,
                                              const char      *key);

KD_AVAILABLE_IN_ALL
gboolean      kd_redis_queue_add             (KdRedisQueue    *self,
                                              const char      *key,
                                              GBytes          *payload,
                                              GError         **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_redis_queue_add_many        (KdRedisQueue    *self,
                                              guint            n_jobs,
                                              const char     **keys,
                                              GBytes         **payloads,
                                              GError         **error);

KD_AVAILABLE_IN_ALL
gboolean      kd_redis_queue_get_backlog     (KdRedisQueue    *self,
                                              guint64         *backlog,
                                              GError         **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_redis_queue_wait_backlog    (KdRedisQueue    *self,
                                              guint64          at_most,
                                              gint64           timeout_us,
                                              GError         **error);

KD_AVAILABLE_IN_ALL
gboolean      kd_redis_queue_trim            (KdRedisQueue    *self,
                                              guint64         *trimmed,
                                              GError         **error);

KD_AVAILABLE_IN_ALL
KdDispatcher *kd_redis_queue_new_dispatcher  (KdRedisQueue    *self,
                                              guint            n_workers,
                                              KdHandlerFunc    handler,
                                              gpointer         user_data,
                                              GDestroyNotify   user_data_free) G_GNUC_WARN_UNUSED_RESULT;
KD_AVAILABLE_IN_ALL
gboolean      kd_redis_queue_start           (KdRedisQueue    *self,
                                              GError         **error);
KD_AVAILABLE_IN_ALL
void          kd_redis_queue_stop            (KdRedisQueue    *self);
KD_AVAILABLE_IN_ALL
void          kd_redis_queue_get_stats       (KdRedisQueue    *self,
                                              KdRedisQueueStats *stats);

G_END_DECLS
