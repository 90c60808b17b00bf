/* kd-redis-entry-private.h: the fields of a KdRedisEntry the consumer keeps
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include "kd-redis-entry.h"

G_BEGIN_DECLS

typedef struct _KdRedisConsumer KdRedisConsumer;

/* What became of an entry's job, as the consumer's acker thread learns it. */
typedef enum
{
  KD_REDIS_OUTCOME_NONE,     /* not ended yet (or failed, with a retry to come) */
  KD_REDIS_OUTCOME_ACK,      /* completed: acknowledge it */
  KD_REDIS_OUTCOME_DEAD,     /* failed its last attempt: dead-letter and acknowledge it */
  KD_REDIS_OUTCOME_SKIP,     /* not run, or not to be acknowledged: leave it pending */
  KD_REDIS_OUTCOME_DUPLICATE,/* a producer's copy of an entry read before: acknowledge it, unrun */
} KdRedisOutcome;

struct _KdRedisEntry
{
  gint             ref_count;      /* atomic */

  /* Immutable after kd_redis_entry_new() */
  KdRedisConsumer *consumer;       /* not a reference: it outlives the dispatcher's items */
  gint             shard;          /* -1: the unkeyed stream */
  guint            generation;     /* the shard's lease generation it was read under */
  const char      *id;             /* these point into the same allocation */
  const char      *key;            /* NULL: unkeyed */
  const guint8    *payload;
  gsize            payload_len;
  const char      *producer;
  guint64          sequence;
  guint64          fencing_token;  /* its shard's, when it was read; 0 unkeyed */

  /* Written by the job's worker once it ended (or by the reader, for a
   * copy it does not submit); read by the acker thread
   * after the hand-off through the consumer's queue. Between attempts,
   * the dispatcher hands the job from worker to worker. */
  KdRedisOutcome   outcome;
  gboolean         reported;
  gboolean         failed;         /* its last attempt so far failed */
  guint            attempts;
  char            *error_message;
};

KdRedisEntry *kd_redis_entry_new (KdRedisConsumer *consumer,
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
                                  guint64          sequence);

G_END_DECLS
