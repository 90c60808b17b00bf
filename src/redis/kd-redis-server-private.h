/* kd-redis-server-private.h: where a Redis server is, and how to log in to it
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <gio/gio.h>

G_BEGIN_DECLS

typedef struct
{
  char  *host;         /* TCP: a host name or address; NULL with @socket_path */
  guint  port;
  char  *socket_path;  /* a Unix socket, or NULL */
  char  *user;         /* an ACL user, or NULL: AUTH with the password alone */
  char  *password;     /* NULL: no AUTH */
  guint  db;           /* SELECTed on every connection when not 0 */
} KdRedisServer;

void     kd_redis_server_init      (KdRedisServer       *server);
void     kd_redis_server_copy      (KdRedisServer       *dest,
                                    const KdRedisServer *src);
void     kd_redis_server_clear     (KdRedisServer       *server);
gboolean kd_redis_server_parse_url (KdRedisServer       *server,
                                    const char          *url,
                                    GError             **error);
char    *kd_redis_server_describe  (const KdRedisServer *server);

G_END_DECLS
