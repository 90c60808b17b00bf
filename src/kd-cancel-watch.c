/* kd-cancel-watch.c: a ::cancelled handler that can be dropped from anywhere
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * g_cancellable_disconnect() waits for a ::cancelled emission running in
 * another thread, and deadlocks if the emission runs in this one: dropping
 * the last reference to a dispatcher or pipeline inside another ::cancelled
 * handler of its cancellable would hang. So the signal handler holds a link
 * instead of the object: freeing the watch clears the link under its lock,
 * which waits for a call in progress on another thread, then disconnects
 * with g_signal_handler_disconnect(), which never waits; the link itself
 * goes when the handler's closure does. Runs @func at once if the
 * cancellable is already cancelled.
 */

#include "config.h"

#include "kd-cancel-watch-private.h"
#include "kd-sync-private.h"

typedef struct
{
  gint          ref_count;
  GMutex        lock;
  KdCancelFunc  func;       /* protected by @lock; NULL once freed */
  gpointer      user_data;
} Link;

struct _KdCancelWatch
{
  GCancellable *cancellable;
  gulong        handler_id;
  Link         *link;
};

static void
link_unref (gpointer data)
{
  Link *link = data;

  if (g_atomic_int_dec_and_test (&link->ref_count))
    {
      g_mutex_clear (&link->lock);
      g_free (link);
    }
}

static void
on_cancelled (GCancellable *cancellable,
              gpointer      data)
{
  Link *link = data;

  (void) cancellable;

  kd_mutex_lock (&link->lock);
  if (link->func != NULL)
    link->func (link->user_data);
  kd_mutex_unlock (&link->lock);
}

KdCancelWatch *
kd_cancel_watch_new (GCancellable *cancellable,
                     KdCancelFunc  func,
                     gpointer      user_data)
{
  KdCancelWatch *self = g_new0 (KdCancelWatch, 1);
  Link *link = g_new0 (Link, 1);

  link->ref_count = 2;  /* the watch's and the handler's */
  g_mutex_init (&link->lock);
  link->func = func;
  link->user_data = user_data;

  self->cancellable = g_object_ref (cancellable);
  self->link = link;
  self->handler_id = g_cancellable_connect (cancellable, G_CALLBACK (on_cancelled), link,
                                            link_unref);

  return self;
}

/* Once this returns, @func is not running and will not run again. */
void
kd_cancel_watch_free (KdCancelWatch *self)
{
  kd_mutex_lock (&self->link->lock);
  self->link->func = NULL;
  kd_mutex_unlock (&self->link->lock);

  if (self->handler_id != 0)
    g_signal_handler_disconnect (self->cancellable, self->handler_id);
  link_unref (self->link);
  g_object_unref (self->cancellable);
  g_free (self);
}
