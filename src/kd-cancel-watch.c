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
 * instead of the object, and @func runs outside the link's lock, with the
 * calling thread marked on the link. Freeing the watch clears the link's
 * @func and waits for a call in progress on another thread, never for one
 * in its own: @func itself may drop the object's last reference (through
 * application code it calls), and the object's dispose frees the watch.
 * Then it disconnects with g_signal_handler_disconnect(), which never
 * waits; the link itself goes when the handler's closure does. Calls of
 * one link never overlap: GCancellable emits ::cancelled once per
 * cancellation, and g_cancellable_reset() waits for an emission to end.
 * Runs @func at once if the cancellable is already cancelled.
 */

#include "config.h"

#include "kd-cancel-watch-private.h"
#include "kd-sync-private.h"

typedef struct
{
  gint          ref_count;
  GMutex        lock;
  GCond         call_ended;
  KdCancelFunc  func;       /* protected by @lock; NULL once freed */
  gpointer      user_data;
  GThread      *calling;    /* protected by @lock: the thread running @func */
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
      g_cond_clear (&link->call_ended);
      g_free (link);
    }
}

static void
on_cancelled (GCancellable *cancellable,
              gpointer      data)
{
  Link *link = data;
  KdCancelFunc func;

  (void) cancellable;

  kd_mutex_lock (&link->lock);
  func = link->func;
  if (func != NULL)
    link->calling = g_thread_self ();
  kd_mutex_unlock (&link->lock);

  if (func == NULL)
    return;

  /* The handler's reference keeps @link alive, even if @func frees the
   * watch. */
  func (link->user_data);

  kd_mutex_lock (&link->lock);
  link->calling = NULL;
  g_cond_broadcast (&link->call_ended);
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
  g_cond_init (&link->call_ended);
  link->func = func;
  link->user_data = user_data;

  self->cancellable = g_object_ref (cancellable);
  self->link = link;
  self->handler_id = g_cancellable_connect (cancellable, G_CALLBACK (on_cancelled), link,
                                            link_unref);

  return self;
}

/* Once this returns, @func will not run again, and is not running but in
 * the calling thread (when @func led to this free). */
void
kd_cancel_watch_free (KdCancelWatch *self)
{
  Link *link = self->link;

  kd_mutex_lock (&link->lock);
  link->func = NULL;
  while (link->calling != NULL && link->calling != g_thread_self ())
    kd_cond_wait (&link->call_ended, &link->lock);
  kd_mutex_unlock (&link->lock);

  if (self->handler_id != 0)
    g_signal_handler_disconnect (self->cancellable, self->handler_id);
  link_unref (self->link);
  g_object_unref (self->cancellable);
  g_free (self);
}
