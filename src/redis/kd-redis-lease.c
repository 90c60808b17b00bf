/* kd-redis-lease.c: the lease thread of a KdRedisQueue's consumer
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Every tick (a sixth of the lease time) the thread beats in the queue's
 * sorted set of members, computes which shards this process should own by
 * rendezvous hashing over the live members, and in one round trip renews
 * the leases it holds, releases the ones it drained and takes the ones it
 * should have. Once per lease time it also tidies the streams it reads:
 * trims them below what every consumer group has acknowledged, and
 * forgets the consumers of members gone that hold nothing. It has its own
 * connection and does nothing else, so that a renewal never waits behind a
 * read or an acknowledgement. See kd-redis-consumer.c for how it fits with
 * the other threads.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-consumer-private.h"
#include "kd-sync-private.h"

static void
fence_expired_locked (KdRedisConsumer *self,
                      gint64           now)
{
  guint i;

  for (i = 0; i < self->config.n_shards; i++)
    if (kd_redis_shard_owned (&self->shards[i]) && now >= self->shards[i].deadline)
      kd_redis_consumer_fence_locked (self, &self->shards[i]);
}

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
  /* Taking a lease also moves the shard's fencing token. */
  kd_redis_args_add_script (args, conn, script,
                            script == KD_REDIS_SCRIPT_ACQUIRE ? 2 * shards->len : shards->len);
  for (i = 0; i < shards->len; i++)
    kd_redis_args_add_string (args, self->shards[g_array_index (shards, guint, i)].lease);
  if (script == KD_REDIS_SCRIPT_ACQUIRE)
    for (i = 0; i < shards->len; i++)
      kd_redis_args_add_string (args, self->shards[g_array_index (shards, guint, i)].fence);
  kd_redis_args_add_string (args, self->member);
  if (script != KD_REDIS_SCRIPT_RELEASE)
    kd_redis_args_add_printf (args, "%" G_GINT64_FORMAT, self->config.lease_us / 1000);
}

/* One round of membership and leases: beat, compute the shards this
 * process should own, renew the leases it holds, release the ones it
 * drained, take the ones it should have. */
static void
lease_tick (KdRedisConsumer *self,
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
      KdRedisShard *shard = &self->shards[i];

      shard->wanted = wanted[i] && !self->stopping;
      if (kd_redis_shard_owned (shard) && !shard->wanted && shard->state != KD_REDIS_SHARD_DRAINING)
        shard->state = KD_REDIS_SHARD_DRAINING;
      /* Released, or taken, only once nothing of it is in flight here, nor
       * about to be: a read under way would otherwise bring entries that
       * another member is about to claim and run too. */
      if (shard->state == KD_REDIS_SHARD_DRAINING && shard->in_flight == 0 && !shard->reading)
        g_array_append_val (release, i);
      else if (kd_redis_shard_owned (shard))
        g_array_append_val (renew, i);
      else if (shard->wanted && shard->in_flight == 0 && !shard->reading && shard->unusable == NULL)
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
          KdRedisShard *shard = &self->shards[index];
          gboolean same = shard->generation == g_array_index (generations, guint, index);
          /* RENEW answers 1 or 0; ACQUIRE the shard's fencing token, or 0. */
          gboolean granted = kinds[k] == KD_REDIS_SCRIPT_RELEASE ||
                             (replies[k]->type == REDIS_REPLY_ARRAY && i < replies[k]->elements &&
                              replies[k]->element[i]->integer > 0);

          if (!same)
            continue;
          if (kinds[k] == KD_REDIS_SCRIPT_RENEW)
            {
              if (!kd_redis_shard_owned (shard))
                continue;
              if (granted)
                shard->deadline = sent + self->config.lease_us - self->margin_us;
              else
                kd_redis_consumer_fence_locked (self, shard);
            }
          else if (kinds[k] == KD_REDIS_SCRIPT_RELEASE)
            {
              if (shard->state == KD_REDIS_SHARD_DRAINING)
                kd_redis_consumer_fence_locked (self, shard);
            }
          else if (granted && shard->state == KD_REDIS_SHARD_FREE && shard->in_flight == 0 && !shard->reading &&
                   !self->stopping)
            {
              g_debug ("redis queue %s: %s took shard %d", self->config.name, self->member, index);
              shard->state = KD_REDIS_SHARD_CLAIMING;
              shard->generation++;
              shard->token = (guint64) replies[k]->element[i]->integer;
              shard->deadline = sent + self->config.lease_us - self->margin_us;
              g_strlcpy (shard->cursor, "0-0", sizeof shard->cursor);
              kd_redis_consumer_wake_reader_locked (self);
            }
        }
      kd_redis_reply_free (replies[k]);
    }
  for (i = 0; i < self->config.n_shards; i++)
    if (kd_redis_shard_owned (&self->shards[i]))
      n_owned++;
  self->stats.shards_owned = n_owned;
  kd_mutex_unlock (&self->lock);
}

/* Leaving: every lease this process holds is released at once, and it
 * leaves the members, so the others take its shards without waiting for
 * the leases to expire. */
static void
lease_leave (KdRedisConsumer *self,
             KdRedisConn     *conn)
{
  g_autoptr (GError) error = NULL;
  g_autoptr (GArray) all = g_array_new (FALSE, FALSE, sizeof (guint));
  KdRedisArgs args;
  redisReply *reply;
  guint i;

  kd_mutex_lock (&self->lock);
  kd_redis_consumer_fence_all_locked (self);
  kd_mutex_unlock (&self->lock);

  if (!kd_redis_conn_ensure (conn, &error))
    return;
  /* Cancelled: the reader may still wait in XREAD. */
  kd_redis_consumer_unblock_reader (self, conn);

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

/* Tidies the streams of the shards this process reads, and the unkeyed
 * stream if it reads shard 0: trims them below what every consumer group
 * has acknowledged, and forgets the consumers of members gone that hold
 * nothing. Any process could (only acknowledged entries, and consumers
 * with nothing pending, go): the owner does, so that each stream is tidied
 * once per round. */
static void
lease_tidy (KdRedisConsumer *self,
            KdRedisConn     *conn)
{
  g_autoptr (GPtrArray) streams = g_ptr_array_new ();
  g_autoptr (GError) error = NULL;
  KdRedisArgs args;
  redisReply *reply;
  guint64 trimmed = 0;
  guint i;

  kd_mutex_lock (&self->lock);
  for (i = 0; i < self->config.n_shards; i++)
    if (self->shards[i].state == KD_REDIS_SHARD_READING)
      g_ptr_array_add (streams, self->shards[i].stream);
  if (self->shards[0].state == KD_REDIS_SHARD_READING)
    g_ptr_array_add (streams, self->shards[self->config.n_shards].stream);
  kd_mutex_unlock (&self->lock);

  if (!kd_redis_conn_trim (conn, streams, &trimmed, &error))
    g_debug ("redis queue %s: %s: trim: %s", self->config.name, self->member, error->message);
  kd_mutex_lock (&self->lock);
  self->stats.trimmed += trimmed;
  kd_mutex_unlock (&self->lock);
  if (streams->len == 0 || error != NULL)
    return;

  /* Gone: not beating for a lease, and idle for two. */
  kd_redis_args_init (&args);
  kd_redis_args_add_script (&args, conn, KD_REDIS_SCRIPT_FORGET, streams->len + 1);
  kd_redis_args_add_string (&args, self->members_key);
  for (i = 0; i < streams->len; i++)
    kd_redis_args_add_string (&args, g_ptr_array_index (streams, i));
  kd_redis_args_add_string (&args, KD_REDIS_GROUP);
  kd_redis_args_add_printf (&args, "%" G_GINT64_FORMAT, self->config.lease_us / 1000);
  kd_redis_args_add_printf (&args, "%" G_GINT64_FORMAT, 2 * self->config.lease_us / 1000);
  reply = kd_redis_conn_run (conn, &args, &error);
  kd_redis_args_clear (&args);
  if (reply == NULL)
    g_debug ("redis queue %s: %s: forgetting consumers: %s", self->config.name, self->member, error->message);
  g_clear_pointer (&reply, kd_redis_reply_free);
}

/* The lease thread's loop ends when stop() or a cancellation says so, or
 * once the reader exited (the dispatcher was closed without a stop) and
 * everything in flight here has ended and been acknowledged. */
static gboolean
lease_done_locked (KdRedisConsumer *self)
{
  return self->releasing || self->cancelled || (self->reader_done && self->in_flight == 0);
}

gpointer
kd_redis_lease_main (gpointer data)
{
  KdRedisConsumer *self = data;
  /* The first round takes the shards; tidying waits for the next. */
  gint64 next_tidy = g_get_monotonic_time () + self->tick_us;
  KdRedisConn conn;

  kd_redis_conn_init (&conn, &self->config.server, self->config.lease_us);
  kd_redis_conn_set_name (&conn, self->config.name, "lease", self->member);

  kd_mutex_lock (&self->lock);
  while (!lease_done_locked (self))
    {
      /* Ticks from the start of each, whatever the round trips took. */
      gint64 now = g_get_monotonic_time ();
      gint64 next_tick = now + self->tick_us;

      kd_mutex_unlock (&self->lock);
      lease_tick (self, &conn);
      kd_redis_consumer_unblock_reader (self, &conn);
      if (now >= next_tidy)
        {
          lease_tidy (self, &conn);
          next_tidy = now + self->config.lease_us;
        }
      kd_mutex_lock (&self->lock);
      while (!lease_done_locked (self))
        if (!kd_cond_wait_until (&self->lease_cond, &self->lock, next_tick))
          break;
    }
  kd_mutex_unlock (&self->lock);

  lease_leave (self, &conn);
  kd_redis_conn_clear (&conn);

  return NULL;
}
