/* kd-redis-transport-private.h: the bytes to and from one Redis server, over TCP, a Unix socket or TLS
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <gio/gio.h>

#include "kd-redis-server-private.h"

G_BEGIN_DECLS

typedef struct _KdRedisTransport KdRedisTransport;

KdRedisTransport *kd_redis_transport_connect   (const KdRedisServer  *server,
                                                const char           *where,
                                                gint64                timeout_us,
                                                GError              **error);
void              kd_redis_transport_free      (KdRedisTransport     *self);
gboolean          kd_redis_transport_write_all (KdRedisTransport     *self,
                                                const guint8         *data,
                                                gsize                 len,
                                                gint64                timeout_us,
                                                GError              **error);
gsize             kd_redis_transport_read      (KdRedisTransport     *self,
                                                guint8               *buffer,
                                                gsize                 len,
                                                gint64                deadline,
                                                GError              **error);

G_END_DECLS
