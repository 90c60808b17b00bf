/* kd-redis-conn-private.h: one blocking Redis connection with kdispatch's scripts
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <gio/gio.h>
#include <hiredis/hiredis.h>

#include "kd-redis-server-private.h"
#include "kd-redis-transport-private.h"

G_BEGIN_DECLS

/* The consumer group every process of a queue reads its streams with. */
#define KD_REDIS_GROUP "kd"

typedef enum
{
  KD_REDIS_SCRIPT_HEARTBEAT,
  KD_REDIS_SCRIPT_ACQUIRE,
  KD_REDIS_SCRIPT_RENEW,
  KD_REDIS_SCRIPT_RELEASE,
  KD_REDIS_SCRIPT_DELIVERED_IDS,
  KD_REDIS_SCRIPT_CLAIM,
  KD_REDIS_SCRIPT_DEAD,
  KD_REDIS_SCRIPT_BACKLOG,
  KD_REDIS_SCRIPT_TRIM,
  KD_REDIS_SCRIPT_FORGET,
  KD_REDIS_N_SCRIPTS,
} KdRedisScript;

const char  *kd_redis_script_source    (KdRedisScript  script);

/* What a connection has while connected (kd-redis-conn.c). */
typedef struct _KdRedisLink KdRedisLink;

/* A connection used by one thread at a time: not thread-safe. */
typedef struct
{
  KdRedisLink  *link;            /* NULL while disconnected */
  KdRedisServer server;          /* a copy: where, and how to log in */
  char         *where;           /* the server, for messages (no credentials) */
  gint64        timeout_us;      /* connect, read and write timeout */
  char         *name;            /* CLIENT SETNAME's, or NULL */
  char          sha[KD_REDIS_N_SCRIPTS][41];
} KdRedisConn;

/* The arguments of one command, copied back to back into one buffer, so
 * that a command of thousands of ids costs a few allocations, not one per
 * id. */
typedef struct
{
  GByteArray *data;
  GArray     *offsets;           /* gsize: where each argument starts in @data */
  GArray     *lengths;           /* gsize, hiredis's size_t */
  GPtrArray  *argv;              /* scratch: the pointers handed to hiredis */
} KdRedisArgs;

void         kd_redis_conn_init        (KdRedisConn   *conn,
                                        const KdRedisServer *server,
                                        gint64         timeout_us);
void         kd_redis_conn_set_name    (KdRedisConn   *conn,
                                        const char    *queue,
                                        const char    *role,
                                        const char    *member);
void         kd_redis_conn_clear       (KdRedisConn   *conn);
gboolean     kd_redis_conn_ensure      (KdRedisConn   *conn,
                                        GError       **error);
void         kd_redis_conn_close       (KdRedisConn   *conn);
gboolean     kd_redis_conn_is_connected (KdRedisConn  *conn);
redisReply  *kd_redis_conn_run         (KdRedisConn   *conn,
                                        KdRedisArgs   *args,
                                        GError       **error);
gboolean     kd_redis_conn_append      (KdRedisConn   *conn,
                                        KdRedisArgs   *args,
                                        GError       **error);
gboolean     kd_redis_conn_flush       (KdRedisConn   *conn,
                                        GError       **error);
redisReply  *kd_redis_conn_read        (KdRedisConn   *conn,
                                        GError       **error);
gboolean     kd_redis_conn_read_received (KdRedisConn  *conn,
                                          redisReply  **reply,
                                          GError      **error);
redisReply  *kd_redis_conn_read_until  (KdRedisConn   *conn,
                                        gint64         deadline,
                                        GError       **error);
gboolean     kd_redis_conn_pipeline    (KdRedisConn   *conn,
                                        KdRedisArgs   *commands,
                                        guint          n_commands,
                                        redisReply   **replies,
                                        GError       **error);
redisReply  *kd_redis_conn_transaction (KdRedisConn   *conn,
                                        KdRedisArgs   *commands,
                                        guint          n_commands,
                                        GError       **error);

void         kd_redis_reply_free       (redisReply    *reply);
gboolean     kd_redis_error_is_redirection (const GError *error);

void         kd_redis_args_init        (KdRedisArgs   *args);
void         kd_redis_args_clear       (KdRedisArgs   *args);
void         kd_redis_args_reset       (KdRedisArgs   *args);
void         kd_redis_args_add         (KdRedisArgs   *args,
                                        const void    *data,
                                        gsize          len);
void         kd_redis_args_add_string  (KdRedisArgs   *args,
                                        const char    *str);
void         kd_redis_args_add_printf  (KdRedisArgs   *args,
                                        const char    *format,
                                        ...) G_GNUC_PRINTF (2, 3);
void         kd_redis_args_add_script  (KdRedisArgs   *args,
                                        KdRedisConn   *conn,
                                        KdRedisScript  script,
                                        guint          n_keys);

char        *kd_redis_stream_name      (const char    *name,
                                        gint           shard);
char        *kd_redis_lease_name       (const char    *name,
                                        gint           shard);
char        *kd_redis_fence_name       (const char    *name,
                                        gint           shard);
char        *kd_redis_progress_channel (const char    *name);
guint32      kd_redis_fnv1a32          (const char    *data,
                                        gsize          len);

G_END_DECLS
