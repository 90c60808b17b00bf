/* kd-redis-entry.h: one job read from a KdRedisQueue
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#if !defined(KD_INSIDE) && !defined(KDISPATCH_COMPILATION)
# error "Only <kdispatch/kdispatch.h> can be included directly."
#endif

#include <glib-object.h>

#include "kd-version.h"

G_BEGIN_DECLS

#define KD_TYPE_REDIS_ENTRY (kd_redis_entry_get_type ())

typedef struct _KdRedisEntry KdRedisEntry;

KD_AVAILABLE_IN_ALL
GType          kd_redis_entry_get_type     (void) G_GNUC_CONST;
KD_AVAILABLE_IN_ALL
KdRedisEntry  *kd_redis_entry_ref          (KdRedisEntry *entry);
KD_AVAILABLE_IN_ALL
void           kd_redis_entry_unref        (KdRedisEntry *entry);
KD_AVAILABLE_IN_ALL
const char    *kd_redis_entry_get_id       (KdRedisEntry *entry);
KD_AVAILABLE_IN_ALL
const char    *kd_redis_entry_get_key      (KdRedisEntry *entry);
KD_AVAILABLE_IN_ALL
const guint8  *kd_redis_entry_get_payload  (KdRedisEntry *entry,
                                            gsize        *length);
KD_AVAILABLE_IN_ALL
const char    *kd_redis_entry_get_producer (KdRedisEntry *entry);
KD_AVAILABLE_IN_ALL
guint64        kd_redis_entry_get_fencing_token (KdRedisEntry *entry);
KD_AVAILABLE_IN_ALL
guint64        kd_redis_entry_get_sequence (KdRedisEntry *entry);
KD_AVAILABLE_IN_ALL
gint           kd_redis_entry_get_shard    (KdRedisEntry *entry);

G_DEFINE_AUTOPTR_CLEANUP_FUNC (KdRedisEntry, kd_redis_entry_unref)

G_END_DECLS
