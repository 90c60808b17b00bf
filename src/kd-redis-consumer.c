/* kd-redis-consumer.c: the consumer side of a KdRedisQueue
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Two threads, each with its own blocking connection (the design and its
 * reasons are in kd-redis-queue.c):
 *
 * - The control thread beats, decides which shards this process should own,
 *   takes, renews and releases their leases, and sends the outcome of every
 *   ended job (acknowledgement, dead letter) in pipelined batches. It never
 *   waits for the dispatcher, so leases are renewed on time however busy
 *   the workers are.
 * - The reader thread takes over the pending entries of each shard it just
 *   gained, then reads new entries of its shards, within a budget of
 *   batch-size entries in flight, and submits them to the dispatcher. It
 *   blocks in the dispatcher's submit when the dispatcher is full, and in
 *   XREAD BLOCK when there is nothing to read; the control thread wakes it
 *   there by adding to a stream of its own that the XREAD also waits on
 *   (N:wake:member), when something changes.
 *
 * Shard states (Shard.state, under @lock): FREE → CLAIMING (lease taken;
 * XAUTOCLAIM runs until its cursor returns to 0-0) → READING (XREADGROUP
 * ">") → DRAINING (no longer ours by rendezvous: nothing more is read; the
 * lease is released once its entries in flight are done) → FREE. Any owned
 * state falls back to FREE when the lease is lost or its local deadline
 * passes ("fenced"): the shard's generation changes, so its entries still
 * waiting in the dispatcher are skipped instead of started, and it is taken
 * again only once none of its entries is in flight, so that a takeover never
 * runs an entry while an older one of the same shard still runs here.
 *
 * Lock order: @lock is a leaf; no Redis I/O, dispatcher call or user code
 * runs under it.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-conn-private.h"
#include "kd-redis-consumer-private.h"
#include "kd-sync-private.h"

/* Ended jobs the control thread sends in one round at most, so that a flood
 * of acknowledgements never delays a lease renewal by much. */
#define MAX_OUTCOMES_PER_ROUND 4096


typedef enum
{
  SHARD_FREE,
  SHARD_CLAIMING,
  SHARD_READING,
  SHARD_DRAINING,
} ShardState;

typedef struct
{
  /* Immutable after construction */
  char       *stream;
  char       *lease;
  gint        index;             /* -1: the unkeyed stream */

  /* Protected by the consumer's lock */
  ShardState  state;
  guint       generation;
  gint64      deadline;          /* monotonic: no job of the shard starts from then on */
  guint       in_flight;         /* read and not yet acknowledged, refused or skipped */
  gboolean    wanted;            /* ours by rendezvous */
  char        cursor[64];        /* XAUTOCLAIM's, while CLAIMING */
  char        last_id[64];       /* while idle: XREAD waits for entries after it */
} Shard;

struct _KdRedisConsumer
{
  gint               ref_count;  /* atomic */

  /* Immutable after construction */
  KdRedisConfig      config;
  char              *member;
  char              *members_key;
  char              *dead_key;
  char              *progress_channel;
  char              *wake_key;   /* the stream the control thread wakes the reader with */
  Shard             *shards;     /* n_shards keyed ones, then the unkeyed stream */
  guint              n_streams;
  gint64             tick_us;
  gint64             margin_us;
  gint64             claim_idle_us;
  GAsyncQueue       *ended;      /* KdRedisEntry *, or the consumer itself to wake the control thread */

  /* Written by start and stop, from the thread that owns the queue */
  KdDispatcher      *dispatcher;
  GThread           *reader;
  GThread           *control;
  GCancellable      *cancellable;
  gulong             cancel_id;

  GMutex             lock;
  GCond              cond;

  /* Protected by @lock */
  gboolean           running;
  gboolean           stopping;   /* the reader exits; no shard is wanted */
  gboolean           leaving;    /* the control thread releases everything and exits */
  gboolean           cancelled;
  gboolean           reader_waiting;
  gboolean           reader_blocked;
  gboolean           wake_pending;   /* something changed since the reader looked */
  gboolean           unblock_wanted;

  /* Used by the reader thread only */
  char               wake_last_id[64];
  guint              in_flight;
  guint              read_offset;
  GHashTable        *unkeyed_ids; /* ids of unkeyed entries in flight */
  KdRedisQueueStats  stats;
};

static inline gboolean
shard_owned (const Shard *shard)
{
  return shard->state != SHARD_FREE;
}

KdRedisConsumer *
kd_redis_consumer_new (const KdRedisConfig *config,
                       const char          *member)
{
  KdRedisConsumer *self = g_new0 (KdRedisConsumer, 1);
  guint i;

  self->ref_count = 1;
  self->config = *config;
  self->config.host = g_strdup (config->host);
  self->config.name = g_strdup (config->name);
  self->member = g_strdup (member);
  self->members_key = g_strdup_printf ("%s:members", config->name);
  self->dead_key = g_strdup_printf ("%s:dead", config->name);
  self->progress_channel = kd_redis_progress_channel (config->name);
  self->wake_key = g_strdup_printf ("%s:wake:%s", config->name, member);
  self->n_streams = config->n_shards + 1;
  self->shards = g_new0 (Shard, self->n_streams);
  for (i = 0; i < self->n_streams; i++)
    {
      Shard *shard = &self->shards[i];

      shard->index = i < config->n_shards ? (gint) i : -1;
      shard->stream = kd_redis_stream_name (config->name, shard->index);
      shard->lease = kd_redis_lease_name (config->name, shard->index);
      shard->state = SHARD_FREE;
      g_strlcpy (shard->cursor, "0-0", sizeof shard->cursor);
      g_strlcpy (shard->last_id, "0-0", sizeof shard->last_id);
    }

  /* Renewed six times per lease; a job starts only while at least a third
   * of the lease is left, so a holder stops well before anyone else may
   * take the shard, even if two renewals in a row fail. */
  self->tick_us = MAX (config->lease_us / 6, 1000);
  self->margin_us = config->lease_us / 3;
  self->claim_idle_us = 2 * config->lease_us;
  self->ended = g_async_queue_new ();
  g_strlcpy (self->wake_last_id, "0-0", sizeof self->wake_last_id);
  self->unkeyed_ids = g_hash_table_new_full (g_str_hash, g_str_equal, NULL, NULL);
  g_mutex_init (&self->lock);
  g_cond_init (&self->cond);

  return self;
}

KdRedisConsumer *
kd_redis_consumer_ref (KdRedisConsumer *self)
{
  g_atomic_int_inc (&self->ref_count);
  return self;
}

void
kd_redis_consumer_unref (KdRedisConsumer *self)
{
  gpointer item;
  guint i;

  if (!g_atomic_int_dec_and_test (&self->ref_count))
    return;

  g_assert (!self->running);

  while ((item = g_async_queue_try_pop (self->ended)) != NULL)
    if (item != self)
      kd_redis_entry_unref (item);
  g_async_queue_unref (self->ended);
  for (i = 0; i < self->n_streams; i++)
    {
      g_free (self->shards[i].stream);
      g_free (self->shards[i].lease);
    }
  g_free (self->shards);
  g_hash_table_unref (self->unkeyed_ids);
  g_free (self->config.host);
  g_free (self->config.name);
  g_free (self->member);
  g_free (self->members_key);
  g_free (self->dead_key);
  g_free (self->progress_channel);
  g_free (self->wake_key);
  g_mutex_clear (&self->lock);
  g_cond_clear (&self->cond);
  g_free (self);
}

/* The shard stops: nothing of its current generation starts any more. */
static void
fence_locked (KdRedisConsumer *self,
              Shard           *shard)
{
  if (!shard_owned (shard))
    return;
  g_debug ("redis queue %s: %s lost shard %d", self->config.name, self->member, shard->index);
  shard->state = SHARD_FREE;
  shard->generation++;
  shard->deadline = 0;
}

static void
fence_expired_locked (KdRedisConsumer *self,
                      gint64           now)
{
  guint i;

  for (i = 0; i < self->config.n_shards; i++)
    if (shard_owned (&self->shards[i]) && now >= self->shards[i].deadline)
      fence_locked (self, &self->shards[i]);
}

static void
fence_all_locked (KdRedisConsumer *self)
{
  guint i;

  for (i = 0; i < self->config.n_shards; i++)
    fence_locked (self, &self->shards[i]);
}

/* The reader may have something to do: wake it wherever it waits, or
 * keep it from waiting if it is about to. */
static void
wake_reader_locked (KdRedisConsumer *self)
{
  self->wake_pending = TRUE;
  if (self->reader_waiting)
    g_cond_broadcast (&self->cond);
  if (self->reader_blocked)
    self->unblock_wanted = TRUE;
}

static void
wake_control (KdRedisConsumer *self)
{
  g_async_queue_push (self->ended, self);
}

gboolean
kd_redis_consumer_may_start (KdRedisConsumer *self,
                             KdRedisEntry    *entry)
{
  gint64 now = g_get_monotonic_time ();
  gboolean ok;
  Shard *shard;

  kd_mutex_lock (&self->lock);
  if (entry->shard < 0)
    ok = !self->cancelled;
  else
    {
      shard = &self->shards[entry->shard];
      ok = shard->generation == entry->generation && shard_owned (shard) && now < shard->deadline;
    }
  kd_mutex_unlock (&self->lock);

  return ok;
}

void
kd_redis_consumer_report (KdRedisConsumer *self,
                          KdRedisEntry    *entry,
                          KdRedisOutcome   outcome,
                          const GError    *error,
                          guint            attempts)
{
  g_assert (!entry->reported);

  entry->reported = TRUE;
  entry->outcome = outcome;
  entry->attempts = attempts;
  if (error != NULL)
    entry->error_message = g_strdup (error->message);
  kd_redis_entry_ref (entry);
  kd_tsan_release (entry);
  g_async_queue_push (self->ended, entry);
}

void
kd_redis_consumer_get_stats (KdRedisConsumer   *self,
                             KdRedisQueueStats *stats)
{
  guint i;

  kd_mutex_lock (&self->lock);
  *stats = self->stats;
  stats->in_flight = self->in_flight;
  stats->shards_owned = 0;
  for (i = 0; i < self->config.n_shards; i++)
    if (shard_owned (&self->shards[i]))
      stats->shards_owned++;
  kd_mutex_unlock (&self->lock);
}

/* Fencing without a script. Reads and acknowledgements of a shard must
 * happen only while this member holds its lease. Rather than a script
 * that checks the lease and then acts (which would carry every entry read,
 * and every id acknowledged, through Lua and back: that costs Redis more
 * than the commands themselves), the leases are WATCHed and read with MGET,
 * and the commands then run in a MULTI that Redis refuses (EXEC answers
 * nil) if any watched lease changed or expired in between. This member's
 * own renewals cause a rare refusal too; the caller tries again.
 *
 * watch_leases() WATCHes the leases of the shards in @streams (indices
 * into the shards) and sets @ours[i] to whether this member holds stream
 * i's (the unkeyed stream has no lease: always TRUE). */
static gboolean
watch_leases (KdRedisConsumer *self,
              KdRedisConn     *conn,
              const guint     *streams,
              guint            n_streams,
              gboolean        *ours,
              GError         **error)
{
  KdRedisArgs commands[2];
  redisReply *replies[2] = { NULL, NULL };
  guint i, k, n_leased = 0;
  gboolean ok;

  for (k = 0; k < 2; k++)
    {
      kd_redis_args_init (&commands[k]);
      kd_redis_args_add_string (&commands[k], k == 0 ? "WATCH" : "MGET");
    }
  for (i = 0; i < n_streams; i++)
    {
      const Shard *shard = &self->shards[streams[i]];

      ours[i] = shard->index < 0;
      if (shard->index < 0)
        continue;
      for (k = 0; k < 2; k++)
        kd_redis_args_add_string (&commands[k], shard->lease);
      n_leased++;
    }
  ok = n_leased == 0 || kd_redis_conn_pipeline (conn, commands, 2, replies, error);
  for (k = 0; k < 2; k++)
    kd_redis_args_clear (&commands[k]);
  if (!ok || n_leased == 0)
    return ok;

  if (replies[1]->type != REDIS_REPLY_ARRAY || replies[1]->elements != n_leased)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA, "unexpected reply to MGET");
      kd_redis_conn_close (conn);
      ok = FALSE;
    }
  for (i = 0, k = 0; i < n_streams && ok; i++)
    if (self->shards[streams[i]].index >= 0)
      {
        const redisReply *value = replies[1]->element[k++];

        ours[i] = value->type == REDIS_REPLY_STRING && strcmp (value->str, self->member) == 0;
      }
  for (k = 0; k < 2; k++)
    g_clear_pointer (&replies[k], kd_redis_reply_free);

  return ok;
}

/* ---- The control thread ------------------------------------------------ */

static guint64
hash64 (const char *str)
{
  guint64 hash = 14695981039346656037ull;

  for (; *str != '\0'; str++)
    {
      hash ^= (guint8) *str;
      hash *= 1099511628211ull;
    }
  return hash;
}

static guint64
mix64 (guint64 x)
{
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

/* Rendezvous hashing: shard p belongs to the live member with the highest
 * mix (member, p), so every member computes the same owners from the same
 * list, and a member joining or leaving moves only its own share. */
static void
compute_wanted (KdRedisConsumer *self,
                redisReply      *members,
                gboolean        *wanted)
{
  guint64 *hashes = g_new (guint64, members->elements);
  guint64 mine = hash64 (self->member);
  guint p;
  gsize m;

  for (m = 0; m < members->elements; m++)
    hashes[m] = members->element[m]->type == REDIS_REPLY_STRING ?
                hash64 (members->element[m]->str) : 0;

  for (p = 0; p < self->config.n_shards; p++)
    {
      guint64 salt = mix64 ((guint64) p + 1);
      guint64 best = mix64 (mine ^ salt);
      gboolean ours = TRUE;

      for (m = 0; m < members->elements && ours; m++)
        {
          guint64 score = mix64 (hashes[m] ^ salt);

          if (hashes[m] == mine)
            continue;
          if (score > best ||
              (score == best && g_strcmp0 (members->element[m]->str, self->member) > 0))
            ours = FALSE;
        }
      wanted[p] = ours;
    }

  g_free (hashes);
}

static void
add_lease_script (KdRedisArgs     *args,
                  KdRedisConsumer *self,
                  KdRedisConn     *conn,
                  KdRedisScript    script,
                  GArray          *shards)
{
  guint i;

  kd_redis_args_reset (args);
  kd_redis_args_add_script (args, conn, script, shards->len);
  for (i = 0; i < shards->len; i++)
    kd_redis_args_add_string (args, self->shards[g_array_index (shards, guint, i)].lease);
  kd_redis_args_add_string (args, self->member);
  if (script != KD_REDIS_SCRIPT_RELEASE)
    kd_redis_args_add_printf (args, "%" G_GINT64_FORMAT, self->config.lease_us / 1000);
}

/* One round of membership and leases: beat, compute the shards this
 * process should own, renew the leases it holds, release the ones it
 * drained, take the ones it should have. */
static void
control_tick (KdRedisConsumer *self,
              KdRedisConn     *conn)
{
  g_autoptr (GError) error = NULL;
  g_autoptr (GArray) renew = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) release = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) acquire = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) generations = g_array_new (FALSE, FALSE, sizeof (guint));
  gboolean *wanted;
  redisReply *members;
  redisReply *replies[3] = { NULL, NULL, NULL };
  GArray *lists[3];
  KdRedisScript kinds[3] = { KD_REDIS_SCRIPT_RENEW, KD_REDIS_SCRIPT_RELEASE, KD_REDIS_SCRIPT_ACQUIRE };
  KdRedisArgs args;
  gint64 sent;
  guint i, k, n_owned = 0;
  gboolean ok = TRUE;

  kd_redis_args_init (&args);
  members = NULL;
  /* The script's hash is known once connected. */
  if (kd_redis_conn_ensure (conn, &error))
    {
      kd_redis_args_add_script (&args, conn, KD_REDIS_SCRIPT_HEARTBEAT, 1);
      kd_redis_args_add_string (&args, self->members_key);
      kd_redis_args_add_string (&args, self->member);
      kd_redis_args_add_printf (&args, "%" G_GINT64_FORMAT, self->config.lease_us / 1000);
      kd_redis_args_add_string (&args, "0");
      members = kd_redis_conn_run (conn, &args, &error);
    }
  if (members == NULL)
    {
      g_debug ("redis queue %s: %s: %s", self->config.name, self->member, error->message);
      kd_mutex_lock (&self->lock);
      fence_expired_locked (self, g_get_monotonic_time ());
      kd_mutex_unlock (&self->lock);
      kd_redis_args_clear (&args);
      return;
    }
  wanted = g_new0 (gboolean, self->config.n_shards);
  if (members->type == REDIS_REPLY_ARRAY)
    compute_wanted (self, members, wanted);
  kd_redis_reply_free (members);

  kd_mutex_lock (&self->lock);
  fence_expired_locked (self, g_get_monotonic_time ());
  for (i = 0; i < self->config.n_shards; i++)
    {
      Shard *shard = &self->shards[i];

      shard->wanted = wanted[i] && !self->stopping;
      if (shard_owned (shard) && !shard->wanted && shard->state != SHARD_DRAINING)
        shard->state = SHARD_DRAINING;
      if (shard->state == SHARD_DRAINING && shard->in_flight == 0)
        g_array_append_val (release, i);
      else if (shard_owned (shard))
        g_array_append_val (renew, i);
      else if (shard->wanted && shard->in_flight == 0)
        g_array_append_val (acquire, i);
    }
  for (i = 0; i < self->config.n_shards; i++)
    g_array_append_val (generations, self->shards[i].generation);
  kd_mutex_unlock (&self->lock);
  g_free (wanted);

  lists[0] = renew;
  lists[1] = release;
  lists[2] = acquire;
  sent = g_get_monotonic_time ();
  for (k = 0; k < 3 && ok; k++)
    if (lists[k]->len > 0)
      {
        add_lease_script (&args, self, conn, kinds[k], lists[k]);
        ok = kd_redis_conn_append (conn, &args, &error);
      }
  for (k = 0; k < 3 && ok; k++)
    if (lists[k]->len > 0)
      {
        replies[k] = kd_redis_conn_read (conn, &error);
        ok = replies[k] != NULL;
      }
  kd_redis_args_clear (&args);
  if (!ok)
    g_debug ("redis queue %s: %s: %s", self->config.name, self->member, error->message);

  kd_mutex_lock (&self->lock);
  for (k = 0; k < 3; k++)
    {
      if (replies[k] == NULL)
        continue;
      for (i = 0; i < lists[k]->len; i++)
        {
          guint index = g_array_index (lists[k], guint, i);
          Shard *shard = &self->shards[index];
          gboolean same = shard->generation == g_array_index (generations, guint, index);
          gboolean granted = kinds[k] == KD_REDIS_SCRIPT_RELEASE ||
                             (replies[k]->type == REDIS_REPLY_ARRAY && i < replies[k]->elements &&
                              replies[k]->element[i]->integer == 1);

          if (!same)
            continue;
          if (kinds[k] == KD_REDIS_SCRIPT_RENEW)
            {
              if (!shard_owned (shard))
                continue;
              if (granted)
                shard->deadline = sent + self->config.lease_us - self->margin_us;
              else
                fence_locked (self, shard);
            }
          else if (kinds[k] == KD_REDIS_SCRIPT_RELEASE)
            {
              if (shard->state == SHARD_DRAINING)
                fence_locked (self, shard);
            }
          else if (granted && shard->state == SHARD_FREE && shard->in_flight == 0 && !self->stopping)
            {
              g_debug ("redis queue %s: %s took shard %d", self->config.name, self->member, index);
              shard->state = SHARD_CLAIMING;
              shard->generation++;
              shard->deadline = sent + self->config.lease_us - self->margin_us;
              g_strlcpy (shard->cursor, "0-0", sizeof shard->cursor);
              wake_reader_locked (self);
            }
        }
      kd_redis_reply_free (replies[k]);
    }
  for (i = 0; i < self->config.n_shards; i++)
    if (shard_owned (&self->shards[i]))
      n_owned++;
  self->stats.shards_owned = n_owned;
  kd_mutex_unlock (&self->lock);
}

static void
add_dead_script (KdRedisArgs     *args,
                 KdRedisConsumer *self,
                 KdRedisConn     *conn,
                 Shard           *shard,
                 KdRedisEntry    *entry)
{
  kd_redis_args_add_script (args, conn, KD_REDIS_SCRIPT_DEAD, 2);
  kd_redis_args_add_string (args, shard->stream);
  kd_redis_args_add_string (args, self->dead_key);
  kd_redis_args_add_string (args, KD_REDIS_GROUP);
  kd_redis_args_add_string (args, entry->id);
  kd_redis_args_add_string (args, entry->key != NULL ? "1" : "0");
  kd_redis_args_add_string (args, entry->key != NULL ? entry->key : "");
  kd_redis_args_add (args, entry->payload, entry->payload_len);
  kd_redis_args_add_string (args, entry->producer);
  kd_redis_args_add_printf (args, "%" G_GUINT64_FORMAT, entry->sequence);
  kd_redis_args_add_printf (args, "%u", entry->attempts);
  kd_redis_args_add_string (args, entry->error_message != NULL ? entry->error_message : "");
}

static Shard *
entry_shard (KdRedisConsumer *self,
             KdRedisEntry    *entry)
{
  return &self->shards[entry->shard >= 0 ? (guint) entry->shard : self->config.n_shards];
}

/* Attempts at a transaction of outcomes refused because a lease changed
 * (see watch_leases()) before waiting for the next tick. */
#define MAX_OUTCOME_ATTEMPTS 3

/* Sends the outcome of @ended's jobs in one transaction, fenced by their
 * shards' leases (see watch_leases()): per stream, one XACK of its
 * completed entries (in the order they ended, so a key's are acknowledged
 * in order), and a script per dead letter. The entries of a shard whose
 * lease this member no longer holds are refused: the new owner took them
 * over and runs them. Then accounts for them all. Returns FALSE, keeping
 * them, if Redis could not be reached: they are sent again (acknowledging
 * twice is harmless; a dead letter is added once). */
static gboolean
send_outcomes (KdRedisConsumer *self,
               KdRedisConn     *conn,
               GPtrArray       *ended)
{
  g_autoptr (GError) error = NULL;
  g_autoptr (GArray) streams = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) commands = g_array_new (FALSE, FALSE, sizeof (KdRedisArgs));
  /* Per stream: its position in @streams + 1 (0: no outcome to send), and
   * its XACK's position in @commands + 1 (0: none yet). */
  g_autofree guint *stream_at = g_new0 (guint, self->n_streams);
  g_autofree guint *xack_at = g_new0 (guint, self->n_streams);
  /* Per entry: its command's position + 1 (0: none: skipped or refused),
   * then its verdict: 1 done, 0 skipped, -1 refused. */
  g_autofree guint *command_of = g_new0 (guint, ended->len);
  g_autofree gint *verdicts = g_new0 (gint, ended->len);
  g_autofree gboolean *ours = NULL;
  redisReply *exec = NULL;
  guint attempt, i, n_finishing;

  for (i = 0; i < ended->len; i++)
    {
      KdRedisEntry *entry = g_ptr_array_index (ended, i);
      guint s = (guint) (entry_shard (self, entry) - self->shards);

      if (entry->outcome != KD_REDIS_OUTCOME_SKIP && stream_at[s] == 0)
        {
          g_array_append_val (streams, s);
          stream_at[s] = streams->len;
        }
    }
  ours = g_new0 (gboolean, MAX (streams->len, 1));

  for (attempt = 0; attempt < MAX_OUTCOME_ATTEMPTS && streams->len > 0; attempt++)
    {
      if (!watch_leases (self, conn, (const guint *) (gpointer) streams->data, streams->len, ours, &error))
        break;

      memset (xack_at, 0, self->n_streams * sizeof (guint));
      n_finishing = 0;
      for (i = 0; i < ended->len; i++)
        {
          KdRedisEntry *entry = g_ptr_array_index (ended, i);
          Shard *shard = entry_shard (self, entry);
          guint s = (guint) (shard - self->shards);
          KdRedisArgs fresh;

          command_of[i] = 0;
          if (entry->outcome == KD_REDIS_OUTCOME_SKIP || !ours[stream_at[s] - 1])
            continue;
          if (entry->outcome == KD_REDIS_OUTCOME_DEAD || xack_at[s] == 0)
            {
              kd_redis_args_init (&fresh);
              if (entry->outcome == KD_REDIS_OUTCOME_DEAD)
                add_dead_script (&fresh, self, conn, shard, entry);
              else
                {
                  kd_redis_args_add_string (&fresh, "XACK");
                  kd_redis_args_add_string (&fresh, shard->stream);
                  kd_redis_args_add_string (&fresh, KD_REDIS_GROUP);
                  xack_at[s] = commands->len + 1;
                }
              g_array_append_val (commands, fresh);
            }
          n_finishing++;
          if (entry->outcome == KD_REDIS_OUTCOME_DEAD)
            command_of[i] = commands->len;
          else
            {
              kd_redis_args_add_string (&g_array_index (commands, KdRedisArgs, xack_at[s] - 1), entry->id);
              command_of[i] = xack_at[s];
            }
        }

      /* Whoever waits for the queue's backlog to shrink learns it here
       * (kd_redis_queue_wait_backlog()). With nothing to send, the MULTI
       * still ends the WATCH. */
      if (commands->len > 0)
        {
          KdRedisArgs publish;

          kd_redis_args_init (&publish);
          kd_redis_args_add_string (&publish, "PUBLISH");
          kd_redis_args_add_string (&publish, self->progress_channel);
          kd_redis_args_add_printf (&publish, "%u", n_finishing);
          g_array_append_val (commands, publish);
        }
      exec = kd_redis_conn_transaction (conn, (KdRedisArgs *) (gpointer) commands->data, commands->len, &error);
      for (i = 0; i < commands->len; i++)
        kd_redis_args_clear (&g_array_index (commands, KdRedisArgs, i));
      g_array_set_size (commands, 0);
      if (exec == NULL || exec->type == REDIS_REPLY_ARRAY)
        break;
      g_clear_pointer (&exec, kd_redis_reply_free);
    }

  if (streams->len > 0 && (exec == NULL || exec->type != REDIS_REPLY_ARRAY))
    {
      g_debug ("redis queue %s: %s: outcomes not sent: %s", self->config.name, self->member,
               error != NULL ? error->message : "a lease kept changing");
      return FALSE;
    }
  for (i = 0; i < ended->len; i++)
    {
      KdRedisEntry *entry = g_ptr_array_index (ended, i);

      if (entry->outcome == KD_REDIS_OUTCOME_SKIP)
        verdicts[i] = 0;
      else if (command_of[i] == 0)
        verdicts[i] = -1;
      else
        verdicts[i] = 1;
    }
  g_clear_pointer (&exec, kd_redis_reply_free);

  kd_mutex_lock (&self->lock);
  for (i = 0; i < ended->len; i++)
    {
      KdRedisEntry *entry = g_ptr_array_index (ended, i);
      Shard *shard = entry_shard (self, entry);

      if (verdicts[i] == 0)
        self->stats.skipped++;
      else if (verdicts[i] < 0)
        {
          self->stats.refused++;
          if (shard->generation == entry->generation)
            fence_locked (self, shard);
        }
      else if (entry->outcome == KD_REDIS_OUTCOME_DEAD)
        self->stats.dead_lettered++;
      else
        self->stats.acked++;

      g_assert (shard->in_flight > 0 && self->in_flight > 0);
      shard->in_flight--;
      self->in_flight--;
      if (entry->shard < 0)
        g_hash_table_remove (self->unkeyed_ids, entry->id);
    }
  wake_reader_locked (self);
  /* stop() waits for the last entries in flight. */
  if (self->stopping)
    g_cond_broadcast (&self->cond);
  kd_mutex_unlock (&self->lock);

  for (i = 0; i < ended->len; i++)
    kd_redis_entry_unref (g_ptr_array_index (ended, i));
  g_ptr_array_set_size (ended, 0);

  return TRUE;
}

/* Wakes the reader from XREAD BLOCK when asked to, with an entry in its
 * wake stream: the XREAD sees it even if it reaches Redis after it. The
 * stream holds one entry, and expires if this process dies. */
static void
unblock_reader (KdRedisConsumer *self,
                KdRedisConn     *conn)
{
  g_autoptr (GError) error = NULL;
  redisReply *replies[2] = { NULL, NULL };
  KdRedisArgs commands[2];
  gboolean wanted;
  guint k;

  kd_mutex_lock (&self->lock);
  wanted = self->unblock_wanted && self->reader_blocked;
  self->unblock_wanted = FALSE;
  kd_mutex_unlock (&self->lock);

  if (!wanted)
    return;

  for (k = 0; k < 2; k++)
    kd_redis_args_init (&commands[k]);
  kd_redis_args_add_string (&commands[0], "XADD");
  kd_redis_args_add_string (&commands[0], self->wake_key);
  kd_redis_args_add_string (&commands[0], "MAXLEN");
  kd_redis_args_add_string (&commands[0], "1");
  kd_redis_args_add_string (&commands[0], "*");
  kd_redis_args_add_string (&commands[0], "wake");
  kd_redis_args_add_string (&commands[0], "1");
  kd_redis_args_add_string (&commands[1], "PEXPIRE");
  kd_redis_args_add_string (&commands[1], self->wake_key);
  kd_redis_args_add_printf (&commands[1], "%" G_GINT64_FORMAT, 2 * self->config.lease_us / 1000);
  if (kd_redis_conn_pipeline (conn, commands, 2, replies, &error))
    for (k = 0; k < 2; k++)
      kd_redis_reply_free (replies[k]);
  for (k = 0; k < 2; k++)
    kd_redis_args_clear (&commands[k]);
}

/* Leaving: every lease this process holds is released at once, and it
 * leaves the members, so the others take its shards without waiting for
 * the leases to expire. */
static void
control_leave (KdRedisConsumer *self,
               KdRedisConn     *conn)
{
  g_autoptr (GError) error = NULL;
  g_autoptr (GArray) all = g_array_new (FALSE, FALSE, sizeof (guint));
  KdRedisArgs args;
  redisReply *reply;
  guint i;

  kd_mutex_lock (&self->lock);
  fence_all_locked (self);
  kd_mutex_unlock (&self->lock);

  if (!kd_redis_conn_ensure (conn, &error))
    return;
  /* Cancelled: the reader may still wait in XREAD. */
  unblock_reader (self, conn);

  for (i = 0; i < self->config.n_shards; i++)
    g_array_append_val (all, i);
  kd_redis_args_init (&args);
  add_lease_script (&args, self, conn, KD_REDIS_SCRIPT_RELEASE, all);
  reply = kd_redis_conn_run (conn, &args, &error);
  g_clear_pointer (&reply, kd_redis_reply_free);
  g_clear_error (&error);

  kd_redis_args_reset (&args);
  kd_redis_args_add_script (&args, conn, KD_REDIS_SCRIPT_HEARTBEAT, 1);
  kd_redis_args_add_string (&args, self->members_key);
  kd_redis_args_add_string (&args, self->member);
  kd_redis_args_add_string (&args, "0");
  kd_redis_args_add_string (&args, "1");
  reply = kd_redis_conn_run (conn, &args, &error);
  g_clear_pointer (&reply, kd_redis_reply_free);
  g_clear_error (&error);

  kd_redis_args_reset (&args);
  kd_redis_args_add_string (&args, "DEL");
  kd_redis_args_add_string (&args, self->wake_key);
  reply = kd_redis_conn_run (conn, &args, &error);
  g_clear_pointer (&reply, kd_redis_reply_free);
  kd_redis_args_clear (&args);
}

static gpointer
control_main (gpointer data)
{
  KdRedisConsumer *self = data;
  g_autoptr (GPtrArray) ended = g_ptr_array_new ();
  KdRedisConn conn;
  gint64 next_tick = 0;
  gboolean retry_later = FALSE;

  kd_redis_conn_init (&conn, self->config.host, self->config.port, self->config.lease_us);

  for (;;)
    {
      gint64 now = g_get_monotonic_time ();
      gboolean leave;
      gpointer item;

      kd_mutex_lock (&self->lock);
      leave = self->leaving || self->cancelled;
      kd_mutex_unlock (&self->lock);
      if (leave)
        break;

      if (now >= next_tick)
        {
          control_tick (self, &conn);
          next_tick = now + self->tick_us;
          retry_later = FALSE;
          unblock_reader (self, &conn);
          continue;
        }

      /* Waits for ended jobs (or a wake-up) until the next tick; after a
       * failed send, only the next tick retries. */
      if (ended->len == 0 || retry_later)
        item = g_async_queue_timeout_pop (self->ended, (guint64) (next_tick - now));
      else
        item = g_async_queue_try_pop (self->ended);
      while (item != NULL)
        {
          if (item != self)
            {
              kd_tsan_acquire (item);
              g_ptr_array_add (ended, item);
            }
          if (ended->len >= MAX_OUTCOMES_PER_ROUND)
            break;
          item = g_async_queue_try_pop (self->ended);
        }

      if (ended->len > 0 && !retry_later)
        retry_later = !send_outcomes (self, &conn, ended);
      unblock_reader (self, &conn);
    }

  control_leave (self, &conn);
  for (guint i = 0; i < ended->len; i++)
    kd_redis_entry_unref (g_ptr_array_index (ended, i));
  kd_redis_conn_clear (&conn);

  return NULL;
}

/* ---- The reader thread ------------------------------------------------- */

static const redisReply *
field_value (const redisReply *fields,
             const char       *name)
{
  gsize i;

  for (i = 0; i + 1 < fields->elements; i += 2)
    if (fields->element[i]->type == REDIS_REPLY_STRING && strcmp (fields->element[i]->str, name) == 0)
      return fields->element[i + 1]->type == REDIS_REPLY_STRING ? fields->element[i + 1] : NULL;
  return NULL;
}

/* Turns XREADGROUP's or XAUTOCLAIM's entries into KdRedisEntry items. */
static void
parse_entries (KdRedisConsumer  *self,
               const redisReply *entries,
               Shard            *shard,
               guint             generation,
               GPtrArray        *out)
{
  gsize i;

  if (entries->type != REDIS_REPLY_ARRAY)
    return;

  for (i = 0; i < entries->elements; i++)
    {
      const redisReply *item = entries->element[i];
      const redisReply *fields, *key, *payload, *producer, *sequence;

      /* An entry deleted from the stream while pending has no fields. */
      if (item->type != REDIS_REPLY_ARRAY || item->elements < 2 ||
          item->element[0]->type != REDIS_REPLY_STRING || item->element[1]->type != REDIS_REPLY_ARRAY)
        continue;
      fields = item->element[1];
      key = field_value (fields, "k");
      payload = field_value (fields, "p");
      producer = field_value (fields, "pid");
      sequence = field_value (fields, "seq");

      /* A keyed stream's entry without a key still runs in the shard's
       * order, under the empty key. */
      g_ptr_array_add (out, kd_redis_entry_new (self, shard->index, generation,
                                                item->element[0]->str, item->element[0]->len,
                                                shard->index >= 0 ? (key != NULL ? key->str : "") : NULL,
                                                shard->index >= 0 && key != NULL ? key->len : 0,
                                                payload != NULL ? payload->str : "",
                                                payload != NULL ? payload->len : 0,
                                                producer != NULL ? producer->str : "",
                                                producer != NULL ? producer->len : 0,
                                                sequence != NULL ? g_ascii_strtoull (sequence->str, NULL, 10) : 0));
    }
}

/* Submits the entries read, in order. Returns FALSE if the dispatcher no
 * longer accepts jobs: the rest stay pending in Redis. */
static gboolean
submit_entries (KdRedisConsumer *self,
                GPtrArray       *entries,
                gboolean         claimed)
{
  gboolean ok = TRUE;
  guint i;

  for (i = 0; i < entries->len; i++)
    {
      KdRedisEntry *entry = g_ptr_array_index (entries, i);
      Shard *shard = entry_shard (self, entry);
      g_autoptr (GError) error = NULL;

      kd_mutex_lock (&self->lock);
      if (entry->shard < 0 && g_hash_table_contains (self->unkeyed_ids, entry->id))
        {
          /* Claimed again while still in flight here. */
          kd_mutex_unlock (&self->lock);
          kd_redis_entry_unref (entry);
          continue;
        }
      shard->in_flight++;
      self->in_flight++;
      if (entry->shard < 0)
        g_hash_table_add (self->unkeyed_ids, (gpointer) entry->id);
      if (claimed)
        self->stats.claimed++;
      else
        self->stats.read++;
      kd_mutex_unlock (&self->lock);

      if (ok && kd_dispatcher_submit (self->dispatcher, entry->key, entry, &error))
        continue;

      if (ok)
        g_debug ("redis queue %s: %s: the dispatcher refused a job: %s", self->config.name,
                 self->member, error->message);
      ok = FALSE;
      kd_mutex_lock (&self->lock);
      shard->in_flight--;
      self->in_flight--;
      if (entry->shard < 0)
        g_hash_table_remove (self->unkeyed_ids, entry->id);
      kd_mutex_unlock (&self->lock);
      kd_redis_entry_unref (entry);
    }
  g_ptr_array_set_size (entries, 0);

  return ok;
}

/* A connection the reader lost may have taken entries delivered to this
 * consumer with it: every shard starts over from a takeover of its pending
 * entries, once the entries in flight here are done. */
static void
reader_lost_connection (KdRedisConsumer *self,
                        const GError    *error)
{
  g_debug ("redis queue %s: %s: reader: %s", self->config.name, self->member,
           error != NULL ? error->message : "server error");
  kd_mutex_lock (&self->lock);
  fence_all_locked (self);
  g_strlcpy (self->wake_last_id, "0-0", sizeof self->wake_last_id);
  if (!self->stopping)
    {
      self->reader_waiting = TRUE;
      kd_cond_wait_until (&self->cond, &self->lock, g_get_monotonic_time () + self->tick_us);
      self->reader_waiting = FALSE;
    }
  kd_mutex_unlock (&self->lock);
}

static gboolean
reader_connect (KdRedisConsumer  *self,
                KdRedisConn      *conn,
                GError          **error)
{
  if (conn->context != NULL)
    return TRUE;
  if (!kd_redis_conn_ensure (conn, error) ||
      !kd_redis_conn_create_groups (conn, self->config.name, self->config.n_shards, error))
    {
      kd_redis_conn_close (conn);
      return FALSE;
    }

  return TRUE;
}

/* Takes over up to @budget pending entries of a shard just gained, in id
 * order, from wherever its cursor stands. */
static gboolean
reader_claim (KdRedisConsumer *self,
              KdRedisConn     *conn,
              guint            index,
              guint            generation,
              const char      *cursor,
              guint            budget,
              gint64           min_idle_us,
              GPtrArray       *out,
              GError         **error)
{
  Shard *shard = &self->shards[index];
  KdRedisArgs args;
  redisReply *reply;

  kd_redis_args_init (&args);
  kd_redis_args_add_script (&args, conn, KD_REDIS_SCRIPT_CLAIM, 2);
  kd_redis_args_add_string (&args, shard->lease);
  kd_redis_args_add_string (&args, shard->stream);
  kd_redis_args_add_string (&args, self->member);
  kd_redis_args_add_string (&args, KD_REDIS_GROUP);
  kd_redis_args_add_printf (&args, "%" G_GINT64_FORMAT, min_idle_us / 1000);
  kd_redis_args_add_string (&args, cursor);
  kd_redis_args_add_printf (&args, "%u", budget);
  kd_redis_args_add_string (&args, shard->index >= 0 ? "1" : "0");
  reply = kd_redis_conn_run (conn, &args, error);
  kd_redis_args_clear (&args);
  if (reply == NULL)
    return FALSE;

  kd_mutex_lock (&self->lock);
  if (reply->type == REDIS_REPLY_INTEGER)
    {
      if (shard->generation == generation)
        fence_locked (self, shard);
    }
  else if (reply->type == REDIS_REPLY_ARRAY && reply->elements >= 2 &&
           reply->element[0]->type == REDIS_REPLY_STRING)
    {
      parse_entries (self, reply->element[1], shard, generation, out);
      if (shard->generation == generation)
        {
          g_strlcpy (shard->cursor, reply->element[0]->str, sizeof shard->cursor);
          if (strcmp (shard->cursor, "0-0") == 0 && shard->state == SHARD_CLAIMING)
            {
              g_debug ("redis queue %s: %s took over %u+ entries of shard %d", self->config.name,
                       self->member, out->len, shard->index);
              shard->state = SHARD_READING;
            }
        }
    }
  kd_mutex_unlock (&self->lock);
  kd_redis_reply_free (reply);

  return TRUE;
}

/* Waits until one of the idle streams has an entry after the last one seen,
 * for at most a tick, or until the control thread wakes it through its
 * wake stream; not at all if something changed since the reader looked. */
static gboolean
reader_wait_for_entries (KdRedisConsumer *self,
                         KdRedisConn     *conn,
                         GArray          *idle,
                         GError         **error)
{
  KdRedisArgs args;
  redisReply *reply = NULL;
  gboolean block;
  gsize i;

  kd_redis_args_init (&args);
  kd_redis_args_add_string (&args, "XREAD");
  kd_redis_args_add_string (&args, "COUNT");
  kd_redis_args_add_string (&args, "1");
  kd_redis_args_add_string (&args, "BLOCK");
  kd_redis_args_add_printf (&args, "%" G_GINT64_FORMAT, MAX (self->tick_us / 1000, 1));
  kd_redis_args_add_string (&args, "STREAMS");
  kd_mutex_lock (&self->lock);
  for (i = 0; i < idle->len; i++)
    kd_redis_args_add_string (&args, self->shards[g_array_index (idle, guint, i)].stream);
  kd_redis_args_add_string (&args, self->wake_key);
  for (i = 0; i < idle->len; i++)
    kd_redis_args_add_string (&args, self->shards[g_array_index (idle, guint, i)].last_id);
  kd_redis_args_add_string (&args, self->wake_last_id);
  block = !self->stopping && !self->wake_pending;
  self->reader_blocked = block;
  kd_mutex_unlock (&self->lock);

  if (block)
    reply = kd_redis_conn_run (conn, &args, error);
  kd_redis_args_clear (&args);

  kd_mutex_lock (&self->lock);
  self->reader_blocked = FALSE;
  kd_mutex_unlock (&self->lock);

  if (!block)
    return TRUE;
  if (reply == NULL)
    return FALSE;
  /* [[stream, [[id, fields]]], ...] for the streams that had entries (nil
   * at the end of the tick): the wake stream's tells where to wait from
   * next time. */
  for (i = 0; reply->type == REDIS_REPLY_ARRAY && i < reply->elements; i++)
    {
      const redisReply *stream = reply->element[i];

      if (stream->type == REDIS_REPLY_ARRAY && stream->elements == 2 &&
          stream->element[0]->type == REDIS_REPLY_STRING && strcmp (stream->element[0]->str, self->wake_key) == 0 &&
          stream->element[1]->type == REDIS_REPLY_ARRAY && stream->element[1]->elements > 0 &&
          stream->element[1]->element[0]->type == REDIS_REPLY_ARRAY &&
          stream->element[1]->element[0]->elements > 0 &&
          stream->element[1]->element[0]->element[0]->type == REDIS_REPLY_STRING)
        g_strlcpy (self->wake_last_id, stream->element[1]->element[0]->element[0]->str, sizeof self->wake_last_id);
    }
  kd_redis_reply_free (reply);
  return TRUE;
}

/* Reads new entries of the shards being read, and of the unkeyed stream,
 * @budget at most in all, fenced by their leases (see watch_leases());
 * waits in XREAD BLOCK if none had any. XREADGROUP's COUNT is per stream:
 * the budget is shared evenly among the streams read. */
static gboolean
reader_read (KdRedisConsumer *self,
             KdRedisConn     *conn,
             GArray          *streams,
             GArray          *generations,
             guint            budget,
             GPtrArray       *out,
             GError         **error)
{
  g_autofree gboolean *ours = g_new (gboolean, streams->len);
  g_autoptr (GArray) reading = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) idle = g_array_new (FALSE, FALSE, sizeof (guint));
  KdRedisArgs commands[2];
  redisReply *exec;
  const redisReply *got, *last_ids;
  guint i, k, next;

  if (!watch_leases (self, conn, (const guint *) (gpointer) streams->data, streams->len, ours, error))
    return FALSE;

  /* Positions in @streams of the ones to read; the shards lost are
   * fenced. */
  kd_mutex_lock (&self->lock);
  for (i = 0; i < streams->len; i++)
    {
      Shard *shard = &self->shards[g_array_index (streams, guint, i)];

      if (ours[i])
        g_array_append_val (reading, i);
      else if (shard->generation == g_array_index (generations, guint, i))
        fence_locked (self, shard);
    }
  kd_mutex_unlock (&self->lock);
  g_array_set_size (reading, MIN (reading->len, budget));

  for (k = 0; k < 2; k++)
    kd_redis_args_init (&commands[k]);
  kd_redis_args_add_string (&commands[0], "XREADGROUP");
  kd_redis_args_add_string (&commands[0], "GROUP");
  kd_redis_args_add_string (&commands[0], KD_REDIS_GROUP);
  kd_redis_args_add_string (&commands[0], self->member);
  kd_redis_args_add_string (&commands[0], "COUNT");
  kd_redis_args_add_printf (&commands[0], "%u", budget / MAX (reading->len, 1));
  kd_redis_args_add_string (&commands[0], "STREAMS");
  kd_redis_args_add_script (&commands[1], conn, KD_REDIS_SCRIPT_LAST_IDS, reading->len);
  for (i = 0; i < reading->len; i++)
    {
      const char *stream = self->shards[g_array_index (streams, guint, g_array_index (reading, guint, i))].stream;

      kd_redis_args_add_string (&commands[0], stream);
      kd_redis_args_add_string (&commands[1], stream);
    }
  for (i = 0; i < reading->len; i++)
    kd_redis_args_add_string (&commands[0], ">");
  /* With nothing left to read, the MULTI still ends the WATCH. */
  exec = kd_redis_conn_transaction (conn, commands, reading->len > 0 ? 2 : 0, error);
  for (k = 0; k < 2; k++)
    kd_redis_args_clear (&commands[k]);
  if (exec == NULL)
    return FALSE;
  /* A lease changed after the WATCH: nothing was read; read again. */
  if (exec->type == REDIS_REPLY_NIL || reading->len == 0)
    {
      kd_redis_reply_free (exec);
      return TRUE;
    }

  got = exec->elements == 2 ? exec->element[0] : NULL;
  last_ids = exec->elements == 2 ? exec->element[1] : NULL;
  if (got == NULL || (got->type != REDIS_REPLY_NIL && got->type != REDIS_REPLY_ARRAY) ||
      last_ids->type != REDIS_REPLY_ARRAY || last_ids->elements != reading->len)
    {
      kd_redis_reply_free (exec);
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA, "unexpected reply to a read");
      return FALSE;
    }

  /* XREADGROUP answers the streams that had entries, in the order asked. */
  kd_mutex_lock (&self->lock);
  for (i = 0, next = 0; i < reading->len; i++)
    {
      guint at = g_array_index (reading, guint, i);
      guint index = g_array_index (streams, guint, at);
      Shard *shard = &self->shards[index];
      const redisReply *stream = got->type == REDIS_REPLY_ARRAY && next < got->elements ?
                                 got->element[next] : NULL;

      if (stream != NULL && stream->type == REDIS_REPLY_ARRAY && stream->elements == 2 &&
          stream->element[0]->type == REDIS_REPLY_STRING &&
          strcmp (stream->element[0]->str, shard->stream) == 0)
        {
          parse_entries (self, stream->element[1], shard, g_array_index (generations, guint, at), out);
          next++;
        }
      else if (last_ids->element[i]->type == REDIS_REPLY_STRING)
        {
          g_strlcpy (shard->last_id, last_ids->element[i]->str, sizeof shard->last_id);
          g_array_append_val (idle, index);
        }
    }
  kd_mutex_unlock (&self->lock);
  kd_redis_reply_free (exec);

  if (idle->len == reading->len)
    return reader_wait_for_entries (self, conn, idle, error);
  return TRUE;
}

static gpointer
reader_main (gpointer data)
{
  KdRedisConsumer *self = data;
  g_autoptr (GPtrArray) entries = g_ptr_array_new ();
  g_autoptr (GArray) streams = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) generations = g_array_new (FALSE, FALSE, sizeof (guint));
  guint unkeyed = self->config.n_shards;
  gint64 next_unkeyed_claim = g_get_monotonic_time () + self->claim_idle_us;
  KdRedisConn conn;

  kd_redis_conn_init (&conn, self->config.host, self->config.port,
                      self->config.lease_us + self->tick_us);

  for (;;)
    {
      g_autoptr (GError) error = NULL;
      gint claiming = -1;
      guint claim_generation = 0;
      char cursor[64] = "0-0";
      guint budget = 0;
      gboolean ok;
      guint i;

      g_array_set_size (streams, 0);
      g_array_set_size (generations, 0);

      kd_mutex_lock (&self->lock);
      while (!self->stopping)
        {
          /* Read again once half the budget is free, so that reading
           * overlaps running without ever exceeding it. */
          budget = self->config.batch_size - MIN (self->in_flight, self->config.batch_size);
          if (self->in_flight <= self->config.batch_size / 2 && budget > 0)
            break;
          self->reader_waiting = TRUE;
          kd_cond_wait_until (&self->cond, &self->lock, g_get_monotonic_time () + self->tick_us);
          self->reader_waiting = FALSE;
        }
      if (self->stopping)
        {
          kd_mutex_unlock (&self->lock);
          break;
        }
      /* What changed until now is seen in this round. */
      self->wake_pending = FALSE;
      for (i = 0; i < self->config.n_shards && claiming < 0; i++)
        if (self->shards[i].state == SHARD_CLAIMING)
          {
            claiming = (gint) i;
            claim_generation = self->shards[i].generation;
            g_strlcpy (cursor, self->shards[i].cursor, sizeof cursor);
          }
      if (claiming < 0)
        {
          /* Rotated, so that a budget too small for all never starves the
           * same streams. */
          self->read_offset++;
          for (i = 0; i < self->n_streams; i++)
            {
              guint index = (i + self->read_offset) % self->n_streams;

              if (index == unkeyed || self->shards[index].state == SHARD_READING)
                {
                  g_array_append_val (streams, index);
                  g_array_append_val (generations, self->shards[index].generation);
                }
            }
        }
      kd_mutex_unlock (&self->lock);

      if (!reader_connect (self, &conn, &error))
        {
          reader_lost_connection (self, error);
          continue;
        }

      if (claiming >= 0)
        {
          ok = reader_claim (self, &conn, (guint) claiming, claim_generation, cursor, budget,
                             0, entries, &error);
          if (ok && !submit_entries (self, entries, TRUE))
            break;
        }
      else if (g_get_monotonic_time () >= next_unkeyed_claim)
        {
          /* Unkeyed entries pending for long with a consumer that went
           * away: any consumer takes them over. */
          kd_mutex_lock (&self->lock);
          g_strlcpy (cursor, self->shards[unkeyed].cursor, sizeof cursor);
          kd_mutex_unlock (&self->lock);
          ok = reader_claim (self, &conn, unkeyed, 0, cursor, budget, self->claim_idle_us,
                             entries, &error);
          kd_mutex_lock (&self->lock);
          if (ok && strcmp (self->shards[unkeyed].cursor, "0-0") == 0)
            next_unkeyed_claim = g_get_monotonic_time () + self->claim_idle_us;
          kd_mutex_unlock (&self->lock);
          if (ok && !submit_entries (self, entries, TRUE))
            break;
        }
      else
        {
          ok = reader_read (self, &conn, streams, generations, budget, entries, &error);
          if (ok && !submit_entries (self, entries, FALSE))
            break;
        }

      if (!ok)
        {
          for (i = 0; i < entries->len; i++)
            kd_redis_entry_unref (g_ptr_array_index (entries, i));
          g_ptr_array_set_size (entries, 0);
          kd_redis_conn_close (&conn);
          reader_lost_connection (self, error);
        }
    }

  kd_redis_conn_clear (&conn);
  return NULL;
}

/* ---- Start and stop ---------------------------------------------------- */

static void
on_cancelled (GCancellable *cancellable,
              gpointer      data)
{
  KdRedisConsumer *self = data;

  kd_mutex_lock (&self->lock);
  self->cancelled = TRUE;
  self->stopping = TRUE;
  fence_all_locked (self);
  g_cond_broadcast (&self->cond);
  wake_reader_locked (self);
  kd_mutex_unlock (&self->lock);
  wake_control (self);
}

gboolean
kd_redis_consumer_start (KdRedisConsumer  *self,
                         KdDispatcher     *dispatcher,
                         GError          **error)
{
  KdRedisConn conn;
  gboolean ok;

  g_assert (!self->running);

  /* Fails early, with a useful error, if Redis cannot be reached or the
   * queue has another number of shards. */
  kd_redis_conn_init (&conn, self->config.host, self->config.port, self->config.lease_us);
  ok = kd_redis_conn_ensure (&conn, error) &&
       kd_redis_conn_create_groups (&conn, self->config.name, self->config.n_shards, error);
  kd_redis_conn_clear (&conn);
  if (!ok)
    return FALSE;

  self->dispatcher = g_object_ref (dispatcher);
  self->cancellable = g_object_ref (kd_dispatcher_get_cancellable (dispatcher));
  self->running = TRUE;
  self->stopping = FALSE;
  self->leaving = FALSE;
  self->cancelled = FALSE;
  self->cancel_id = g_cancellable_connect (self->cancellable, G_CALLBACK (on_cancelled), self, NULL);
  self->control = g_thread_new ("kd-redis-control", control_main, self);
  self->reader = g_thread_new ("kd-redis-reader", reader_main, self);

  return TRUE;
}

void
kd_redis_consumer_stop (KdRedisConsumer *self)
{
  gint64 deadline;

  if (!self->running)
    return;

  kd_mutex_lock (&self->lock);
  self->stopping = TRUE;
  g_cond_broadcast (&self->cond);
  wake_reader_locked (self);
  kd_mutex_unlock (&self->lock);
  wake_control (self);
  g_thread_join (g_steal_pointer (&self->reader));

  /* Everything submitted ends, and its outcome is sent, unless that takes
   * longer than a lease: then what is left stays pending for the next
   * owner. */
  kd_dispatcher_wait (self->dispatcher);
  deadline = g_get_monotonic_time () + self->config.lease_us;
  kd_mutex_lock (&self->lock);
  while (self->in_flight > 0 && !self->cancelled)
    if (!kd_cond_wait_until (&self->cond, &self->lock, deadline))
      break;
  self->leaving = TRUE;
  kd_mutex_unlock (&self->lock);
  wake_control (self);
  g_thread_join (g_steal_pointer (&self->control));

  g_cancellable_disconnect (self->cancellable, self->cancel_id);
  self->cancel_id = 0;
  g_clear_object (&self->cancellable);
  g_clear_object (&self->dispatcher);
  self->running = FALSE;
}
