/* kd-redis-entry.c: one job read from a KdRedisQueue
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * An entry is one allocation: the struct, then its id, key, producer and
 * payload, each NUL-terminated, so that reading a batch of thousands costs
 * one malloc per job. It is the item of the job a KdRedisQueue submits to
 * its dispatcher; the dispatcher frees it through the queue (see
 * kd-redis-queue.c), which is how the consumer learns that a job ended
 * without running.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-entry-private.h"

/**
 * KdRedisEntry:
 *
 * One job read from a [class@Kd.RedisQueue]: the item of the job a queue's
 * dispatcher runs ([method@Kd.Job.get_item]). Its key, payload, stream id
 * and producer are read with the accessors; it is freed after the job ended,
 * unless a reference was taken with [method@Kd.RedisEntry.ref].
 *
 * Since: 0.1
 */

/* G_DEFINE_BOXED_TYPE passes the functions through a transparent union,
 * which -Wpedantic refuses. */
GType
kd_redis_entry_get_type (void)
{
  static gsize type_id;

  if (g_once_init_enter (&type_id))
    {
      GType type = g_boxed_type_register_static (g_intern_static_string ("KdRedisEntry"),
                                                 (GBoxedCopyFunc) kd_redis_entry_ref,
                                                 (GBoxedFreeFunc) kd_redis_entry_unref);

      g_once_init_leave (&type_id, type);
    }
  return type_id;
}

static char *
copy_field (char       *to,
            const char *from,
            gsize       len)
{
  if (len > 0)
    memcpy (to, from, len);
  to[len] = '\0';
  return to + len + 1;
}

KdRedisEntry *
kd_redis_entry_new (KdRedisConsumer *consumer,
                    gint             shard,
                    guint            generation,
                    const char      *id,
                    gsize            id_len,
                    const char      *key,
                    gsize            key_len,
                    const char      *payload,
                    gsize            payload_len,
                    const char      *producer,
                    gsize            producer_len,
                    guint64          sequence)
{
  gsize size = sizeof (KdRedisEntry) + id_len + 1 + key_len + 1 + payload_len + 1 + producer_len + 1;
  KdRedisEntry *entry = g_malloc (size);
  char *tail = (char *) (entry + 1);

  entry->ref_count = 1;
  entry->consumer = consumer;
  entry->shard = shard;
  entry->generation = generation;
  entry->sequence = sequence;
  entry->fencing_token = 0;
  entry->outcome = KD_REDIS_OUTCOME_NONE;
  entry->reported = FALSE;
  entry->attempts = 0;
  entry->error_message = NULL;

  entry->id = tail;
  tail = copy_field (tail, id, id_len);
  entry->key = key != NULL ? tail : NULL;
  tail = copy_field (tail, key, key != NULL ? key_len : 0);
  entry->payload = (const guint8 *) tail;
  entry->payload_len = payload_len;
  tail = copy_field (tail, payload, payload_len);
  entry->producer = tail;
  copy_field (tail, producer, producer != NULL ? producer_len : 0);

  return entry;
}

/**
 * kd_redis_entry_ref:
 * @entry: an entry
 *
 * Takes a reference on @entry, to keep it past the job that received it.
 * Thread-safe.
 *
 * Returns: (transfer full): @entry
 *
 * Since: 0.1
 */
KdRedisEntry *
kd_redis_entry_ref (KdRedisEntry *entry)
{
  g_return_val_if_fail (entry != NULL, NULL);

  g_atomic_int_inc (&entry->ref_count);
  return entry;
}

/**
 * kd_redis_entry_unref:
 * @entry: (transfer full): an entry
 *
 * Drops a reference on @entry, freeing it with the last one. Thread-safe.
 *
 * Since: 0.1
 */
void
kd_redis_entry_unref (KdRedisEntry *entry)
{
  g_return_if_fail (entry != NULL);

  if (g_atomic_int_dec_and_test (&entry->ref_count))
    {
      g_free (entry->error_message);
      g_free (entry);
    }
}

/**
 * kd_redis_entry_get_id:
 * @entry: an entry
 *
 * Gets the entry's id in its stream, such as "1700000000000-0": unique in
 * the stream, and increasing in the order the entries were added.
 *
 * Returns: (transfer none): the entry's stream id
 *
 * Since: 0.1
 */
const char *
kd_redis_entry_get_id (KdRedisEntry *entry)
{
  g_return_val_if_fail (entry != NULL, NULL);

  return entry->id;
}

/**
 * kd_redis_entry_get_key:
 * @entry: an entry
 *
 * Gets the key the job was added with; it is also the key of the job the
 * entry runs as (kd_job_get_key()).
 *
 * Returns: (transfer none) (nullable): the job's key, or %NULL for an
 *   unkeyed job
 *
 * Since: 0.1
 */
const char *
kd_redis_entry_get_key (KdRedisEntry *entry)
{
  g_return_val_if_fail (entry != NULL, NULL);

  return entry->key;
}

/**
 * kd_redis_entry_get_payload:
 * @entry: an entry
 * @length: (out) (optional): return location for the payload's length in
 *   bytes
 *
 * Gets the bytes the job was added with. They are followed by a NUL byte
 * that is not part of @length, so a text payload may be read as a string.
 *
 * Returns: (transfer none) (array length=length): the payload
 *
 * Since: 0.1
 */
const guint8 *
kd_redis_entry_get_payload (KdRedisEntry *entry,
                            gsize        *length)
{
  g_return_val_if_fail (entry != NULL, NULL);

  if (length != NULL)
    *length = entry->payload_len;
  return entry->payload;
}

/**
 * kd_redis_entry_get_fencing_token:
 * @entry: an entry
 *
 * Gets the fencing token of the entry's shard when this process read it: a
 * number that goes up each time the shard changes owner, so a later owner's
 * entries always carry a higher token than an earlier one's. It is the
 * Redis server's time in microseconds when the owner took the shard, or
 * one more than the token before if that is higher, so it still goes up
 * after Redis lost the last token's write (a restart from an append-only
 * file a second behind, a failover to a replica that lagged), unless the
 * server's clock went back by more than it lost.
 *
 * A handler with effects outside the queue can pass it along with each
 * write (and the shard, kd_redis_entry_get_shard()), and the store can
 * refuse a write whose token is lower than one it has already seen for the
 * shard. Then the job of a process that froze past its lease (see "At least
 * once" in the scaling-out guide), and ran on after the shard's next owner
 * started, cannot overwrite what that owner wrote.
 *
 * Returns: the token, a positive number; 0 for an unkeyed entry, which no
 *   lease orders
 *
 * Since: 0.1
 */
guint64
kd_redis_entry_get_fencing_token (KdRedisEntry *entry)
{
  g_return_val_if_fail (entry != NULL, 0);

  return entry->fencing_token;
}

/**
 * kd_redis_entry_get_producer:
 * @entry: an entry
 *
 * Gets the id of the #KdRedisQueue that added the job, unique per queue
 * object. With kd_redis_entry_get_sequence() it names the job: the consumer
 * runs once a job its producer added twice after losing a reply (see
 * kd_redis_queue_add_many()).
 *
 * Returns: (transfer none): the producer's id, or "" if the entry was not
 *   added by a #KdRedisQueue
 *
 * Since: 0.1
 */
const char *
kd_redis_entry_get_producer (KdRedisEntry *entry)
{
  g_return_val_if_fail (entry != NULL, NULL);

  return entry->producer;
}

/**
 * kd_redis_entry_get_sequence:
 * @entry: an entry
 *
 * Gets the job's number among those its producer added, counting from 1.
 *
 * Returns: the sequence number, 0 if unknown
 *
 * Since: 0.1
 */
guint64
kd_redis_entry_get_sequence (KdRedisEntry *entry)
{
  g_return_val_if_fail (entry != NULL, 0);

  return entry->sequence;
}

/**
 * kd_redis_entry_get_shard:
 * @entry: an entry
 *
 * Gets the shard whose stream the entry was read from: for a keyed job,
 * kd_redis_queue_shard_for_key() of its key.
 *
 * Returns: the shard, or -1 for an unkeyed job
 *
 * Since: 0.1
 */
gint
kd_redis_entry_get_shard (KdRedisEntry *entry)
{
  g_return_val_if_fail (entry != NULL, -1);

  return entry->shard;
}
