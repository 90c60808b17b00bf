/* kd-redis-harness.h: a redis-server, worker processes and their logs, for test-redis-queue.c
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * kd-redis-harness.c says how the harness works, and what each function
 * does where it defines it.
 */

#pragma once

#include <gio/gio.h>
#include <hiredis/hiredis.h>
#include <kdispatch/kdispatch.h>

#include "kd-test-util.h"

G_BEGIN_DECLS

/* How long one wait of these tests may take before it fails: twice the
 * suite's, as a single wait here spans worker processes, a Redis restart
 * or a lease running out, and the AddressSanitizer build runs the whole
 * program in about four minutes. */
#define KD_REDIS_TEST_DEADLINE_US (2 * KD_TEST_DEADLINE_US)

/* ---- Certificates made with openssl ------------------------------------ */

/* A CA, the server's certificate from it (for 127.0.0.1 and localhost),
 * a client's, and another CA that signed none of them: PEM files. */
typedef struct
{
  char *ca;
  char *server_cert;
  char *server_key;
  char *client_cert;
  char *client_key;
  char *other_ca;
} TlsFiles;

gboolean       need_openssl       (void);
gboolean       need_tls           (void);
void           tls_files_make     (TlsFiles   *files,
                                   const char *dir);
void           tls_files_clear    (TlsFiles   *files);

/* ---- A redis-server of our own ----------------------------------------- */

typedef struct
{
  char        *dir;
  guint        port;
  gboolean     fsync_always;
  const char * const *extra_args;   /* more redis-server arguments, NULL-terminated */
  gboolean     tls;                 /* also a TLS port, which queues and workers use */
  TlsFiles     tls_files;           /* with @tls: made in @dir by server_start() */
  guint        tls_port;
  GSubprocess *process;
} Server;

void           find_redis_server  (void);
void           die_with_parent    (gpointer    data);
guint          free_port          (void);
gboolean       need_redis         (void);
redisContext  *server_connect     (Server     *server);
void           server_launch      (Server     *server);
void           server_start       (Server     *server);
void           server_freeze      (Server     *server);
void           server_kill        (Server     *server);
void           server_stop        (Server     *server);
void           remove_dir         (const char *path);
KdRedisQueue  *open_queue         (Server     *server,
                                   const char *name,
                                   guint       n_shards);

/* ---- Running a queue's jobs in this process ------------------------------ */

/* What seen_record(), a handler, saw: a keyed job's payload is its number
 * within its key, counting from 1. */
typedef struct
{
  GMutex      lock;
  GHashTable *last;    /* key → last number run */
  guint       keyed;
  guint       unkeyed;
  gboolean    out_of_order;
} Seen;

void           seen_init          (Seen         *seen);
void           seen_clear         (Seen         *seen);
gboolean       seen_record        (KdJob        *job,
                                   gpointer      user_data,
                                   GError      **error);
void           run_until_done     (KdRedisQueue *queue,
                                   guint         n_workers,
                                   Seen         *seen);

/* ---- What the queue holds ---------------------------------------------- */

typedef struct
{
  guint64 entries;     /* in all the streams */
  guint64 unfinished;  /* pending (read, not acknowledged) or not read yet */
} Progress;

char          *stream_name        (const char *name,
                                   gint        shard);
void           queue_progress     (Server     *server,
                                   const char *name,
                                   guint       n_shards,
                                   Progress   *progress);
void           wait_finished      (Server     *server,
                                   const char *name,
                                   guint       n_shards,
                                   guint64     total,
                                   guint64     done);
guint64        consumer_pending   (Server     *server,
                                   const char *name,
                                   guint       n_shards,
                                   const char *consumer);
guint64        streams_length     (Server     *server,
                                   const char *name,
                                   guint       n_shards);
guint64        unfinished_present (Server     *server,
                                   const char *name,
                                   guint       n_shards);
void           wait_trimmed       (Server     *server,
                                   const char *name,
                                   guint       n_shards,
                                   guint64     length);
void           wait_forgotten     (Server     *server,
                                   const char *name,
                                   guint       n_shards,
                                   const char *consumer);

/* ---- Jobs: key-K numbered from 1, in a shuffled order of keys ---------- */

typedef struct
{
  guint  n_keys;
  guint *count;        /* per key: how many jobs */
  guint  total;
} Jobs;

void           produce            (Server     *server,
                                   const char *name,
                                   guint       n_shards,
                                   guint       n_jobs,
                                   guint       n_keys,
                                   Jobs       *jobs);
void           produce_into       (KdRedisQueue *queue,
                                   guint         n_jobs,
                                   guint         n_keys,
                                   Jobs         *jobs);
guint          scaled             (guint       n);

/* ---- Worker processes -------------------------------------------------- */

typedef struct
{
  GSubprocess      *process;
  GDataInputStream *stdout_lines;
  char             *log;
  char             *name;    /* its consumer name */
  char             *out;     /* its output, once it finished */
} Worker;

Worker        *worker_start       (Server     *server,
                                   const char *name,
                                   guint       index,
                                   ...);
Worker        *worker_startv      (const char         *dir,
                                   const char * const *connection,
                                   const char         *name,
                                   guint               index,
                                   va_list             ap);
void           worker_signal      (Worker     *worker,
                                   int         signum);
void           worker_finish      (Worker     *worker,
                                   gboolean    killed);
void           worker_free        (Worker     *worker);
guint64        stat_of            (const char *out,
                                   const char *name);

/* ---- The logs ---------------------------------------------------------- */

typedef struct
{
  guint64 runs;
  guint64 duplicates;  /* runs of a job that had completed already */
  guint64 fenced_reruns;  /* runs taken over, each rerun under another token */
} Verdict;

void           check_logs         (Worker    **workers,
                                   guint       n_workers,
                                   Jobs       *jobs,
                                   guint       fail_key,
                                   guint       fail_attempts,
                                   Verdict    *verdict);

G_END_DECLS
