/* kd-parked-keys.c: the keys a dispatcher parked after a failure
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * With KD_FAILURE_PARK, a key whose job failed for good parks: its
 * mailbox, still in the key table but out of the scheduler, enters this
 * table, keyed by the mailbox's own key in a KdKeyMap (keys that clients
 * choose may be parked in numbers, and the map's hash has a secret). The
 * table only records who is parked; it never schedules, reaps or frees a
 * mailbox. Whoever takes a mailbox out (resume, drop, the dispatcher's
 * cancellation or last unref) gets it back and becomes its runner, so the
 * dispatcher (kd-dispatcher-failure.c) decides what happens to it.
 *
 * A mailbox's park_state and park_request are under @lock. A key parks in
 * two steps, because its runner must still end the failed job after
 * parking it (the job's done callback sees the key parked and may resume
 * or drop it): kd_parked_keys_add() marks it FINISHING; a take meanwhile
 * leaves the runner a request instead of the mailbox; kd_parked_keys_settle()
 * then parks it for good (PARKED) or hands the request to the runner.
 *
 * @lock is taken alone, but for a key-table shard's lock taken under it
 * (dropping a finishing key's queued jobs, kd_key_table_drop_queued()).
 */

#include "config.h"

#include "kd-parked-keys-private.h"
#include "kd-sync-private.h"

void
kd_parked_keys_init (KdParkedKeys *self)
{
  g_mutex_init (&self->lock);
  kd_key_map_init (&self->map);
  self->closed = FALSE;
  self->count = 0;
}

void
kd_parked_keys_clear (KdParkedKeys *self)
{
  kd_key_map_clear (&self->map);
  g_mutex_clear (&self->lock);
}

/* By the runner of @mailbox, whose job failed for good, before the job
 * ends: the key parks, as finishing until kd_parked_keys_settle(). FALSE
 * if keys no longer park (the table is closed). */
gboolean
kd_parked_keys_add (KdParkedKeys *self,
                    KdMailbox    *mailbox)
{
  gboolean parked;

  kd_mutex_lock (&self->lock);
  parked = !self->closed;
  if (parked)
    {
      mailbox->park_state = KD_PARK_FINISHING;
      mailbox->park_request = KD_PARK_NONE;
      kd_key_map_insert (&self->map, &mailbox->key, mailbox);
      g_atomic_int_inc (&self->count);
    }
  kd_mutex_unlock (&self->lock);

  return parked;
}

/* By the same runner once the failed job ended: KD_PARK_NONE if the key
 * stays parked; else what was asked meanwhile (KD_PARK_RESUME or
 * KD_PARK_DROP), and the runner unparks it. */
guint
kd_parked_keys_settle (KdParkedKeys *self,
                       KdMailbox    *mailbox)
{
  guint request;

  kd_mutex_lock (&self->lock);
  request = mailbox->park_request;
  mailbox->park_state = request == KD_PARK_NONE ? KD_PARK_PARKED : KD_PARK_NONE;
  mailbox->park_request = KD_PARK_NONE;
  kd_mutex_unlock (&self->lock);

  return request;
}

/* Takes @key out of parking, to resume it or (@drop) drop its jobs. FALSE
 * if it was not parked. Otherwise *@to_unpark is the mailbox the caller
 * now runs and must unpark, or NULL if its runner still ends the failed
 * job and unparks it after (then the jobs queued now, if @drop, are
 * dropped now, before the runner can see the request; not those submitted
 * after this call). */
gboolean
kd_parked_keys_take (KdParkedKeys *self,
                     KdKeyTable   *keys,
                     const char   *key,
                     gboolean      drop,
                     KdMailbox   **to_unpark)
{
  KdKey probe = { 0, 0, key };
  KdMailbox *mailbox;

  probe.hash = kd_key_hash (key, &probe.length);
  kd_mutex_lock (&self->lock);
  mailbox = kd_key_map_lookup (&self->map, &probe);
  if (mailbox == NULL)
    {
      kd_mutex_unlock (&self->lock);
      return FALSE;
    }
  kd_key_map_remove (&self->map, &mailbox->key);
  g_atomic_int_add (&self->count, -1);
  if (mailbox->park_state == KD_PARK_FINISHING)
    {
      if (drop)
        kd_key_table_drop_queued (keys, mailbox);
      mailbox->park_request = KD_PARK_RESUME;
      mailbox = NULL;
    }
  else
    {
      mailbox->park_state = KD_PARK_NONE;
    }
  kd_mutex_unlock (&self->lock);

  *to_unpark = mailbox;
  return TRUE;
}

/* No key parks any more, and every parked one leaves: returns the parked
 * mailboxes, which the caller now runs and must unpark; those whose runner
 * still ends the failed job are left to it, with a request to drop. */
GPtrArray *
kd_parked_keys_close (KdParkedKeys *self)
{
  GPtrArray *parked = g_ptr_array_new ();
  gpointer value;
  guint i = 0;

  kd_mutex_lock (&self->lock);
  self->closed = TRUE;
  while (kd_key_map_next (&self->map, &i, &value))
    {
      KdMailbox *mailbox = value;

      if (mailbox->park_state == KD_PARK_FINISHING)
        {
          mailbox->park_request = KD_PARK_DROP;
        }
      else
        {
          mailbox->park_state = KD_PARK_NONE;
          g_ptr_array_add (parked, mailbox);
        }
    }
  kd_key_map_remove_all (&self->map);
  g_atomic_int_set (&self->count, 0);
  kd_mutex_unlock (&self->lock);

  return parked;
}

/* The parked keys, NULL-terminated, in no particular order. */
char **
kd_parked_keys_list (KdParkedKeys *self)
{
  GPtrArray *keys = g_ptr_array_new ();
  gpointer mailbox;
  guint i = 0;

  kd_mutex_lock (&self->lock);
  while (kd_key_map_next (&self->map, &i, &mailbox))
    g_ptr_array_add (keys, g_strdup (kd_mailbox_get_key (mailbox)));
  kd_mutex_unlock (&self->lock);
  g_ptr_array_add (keys, NULL);

  return (char **) g_ptr_array_free (keys, FALSE);
}

guint
kd_parked_keys_count (KdParkedKeys *self)
{
  return (guint) g_atomic_int_get (&self->count);
}
