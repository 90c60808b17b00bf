/* kd-redis-streams-private.h: the steps that go over every stream of a KdRedisQueue, each on its node
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include "kd-redis-router-private.h"

G_BEGIN_DECLS

gboolean kd_redis_create_groups       (KdRedisRouter       *router,
                                       const char          *name,
                                       guint                n_shards,
                                       char               **unusable,
                                       GError             **error);
gboolean kd_redis_create_groups_again (KdRedisRouter       *router,
                                       const char          *name,
                                       guint                n_shards,
                                       char               **unusable,
                                       GError             **error);
gboolean kd_redis_run_per_slot        (KdRedisRouter       *router,
                                       KdRedisScript        script,
                                       GPtrArray           *keys,
                                       const char * const  *argv,
                                       guint64             *sum,
                                       GError             **error);

G_END_DECLS
