/* kd-notifier.c: property notifications from worker threads, coalesced, on a main context
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A dispatcher's counters change on its workers, up to millions of times a
 * second, but "notify" must reach the application in its main context, and
 * a GTK label bound to a counter needs a few updates a second, not one per
 * job. A notifier is a GSource in that context that the workers arm: the
 * first change after a quiet spell sets its ready time @interval_us ahead;
 * changes meanwhile only see it armed (one atomic load). When it fires, in
 * the context's thread, it disarms first and then lets the object compare
 * its counters with what it notified last (@func), so a change made after
 * that look arms it again.
 *
 * A change whose store is not yet visible when the notifier looks, made by
 * a thread that saw the notifier still armed, would be missed. So @func
 * arms the notifier again whenever it found something changed: the
 * notifications stop only after a look that found nothing new, one
 * @interval_us after the last change.
 *
 * The source holds no reference to the object: one held while notifying
 * would make another thread's unref, meant as the last one, return at
 * once and leave the object to die in the context's thread. Instead the
 * object's shutdown detaches the notifier (kd_notifier_detach()), waiting
 * for a notify in progress; a later dispatch finds nothing to notify.
 */

#include "config.h"

#include "kd-notifier-private.h"
#include "kd-sync-private.h"


static gboolean
kd_notifier_dispatch (GSource     *source,
                      GSourceFunc  callback,
                      gpointer     user_data)
{
  KdNotifier *self = (KdNotifier *) source;
  GObject *object;

  (void) callback;
  (void) user_data;

  kd_tsan_acquire (self);
  g_source_set_ready_time (source, -1);
  __atomic_store_n (&self->armed, FALSE, __ATOMIC_SEQ_CST);

  kd_mutex_lock (&self->lock);
  object = self->object;
  self->busy = object != NULL ? g_thread_self () : NULL;
  kd_mutex_unlock (&self->lock);

  /* The object lives on meanwhile: its dispose waits for this notify. */
  if (object != NULL)
    {
      self->func (object);
      kd_mutex_lock (&self->lock);
      self->busy = NULL;
      g_cond_broadcast (&self->idle);
      kd_mutex_unlock (&self->lock);
    }

  return G_SOURCE_CONTINUE;
}

static void
kd_notifier_finalize (GSource *source)
{
  KdNotifier *self = (KdNotifier *) source;

  g_cond_clear (&self->idle);
  g_mutex_clear (&self->lock);
}

static GSourceFuncs kd_notifier_funcs = {
  .dispatch = kd_notifier_dispatch,
  .finalize = kd_notifier_finalize,
};

KdNotifier *
kd_notifier_new (GObject      *object,
                 GMainContext *context,
                 gint64        interval_us,
                 KdNotifyFunc  func)
{
  KdNotifier *self = (KdNotifier *) g_source_new (&kd_notifier_funcs, sizeof (KdNotifier));

  g_mutex_init (&self->lock);
  g_cond_init (&self->idle);
  self->object = object;
  self->func = func;
  self->interval_us = interval_us;
  g_source_set_static_name (&self->source, "kdispatch property notifications");
  /* Made on the thread of the first change, dispatched in the context's:
   * GLib's context lock orders the two, which ThreadSanitizer cannot see
   * (the mark compiles to nothing otherwise; dispatch takes it). */
  kd_tsan_release (self);
  g_source_attach (&self->source, context);

  return self;
}

/* kd_notifier_arm(), once it found the notifier not armed yet. */
void
kd_notifier_arm_now (KdNotifier *self)
{
  gint armed = FALSE;

  if (__atomic_compare_exchange_n (&self->armed, &armed, TRUE, FALSE,
                                   __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
    g_source_set_ready_time (&self->source, g_get_monotonic_time () + self->interval_us);
}

/* From the object's dispose, on any thread but the notify's own: no notify
 * runs once this returns, and none starts later. */
void
kd_notifier_detach (KdNotifier *self)
{
  kd_mutex_lock (&self->lock);
  self->object = NULL;
  while (self->busy != NULL)
    kd_cond_wait (&self->idle, &self->lock);
  kd_mutex_unlock (&self->lock);
}

/* Whether the calling thread is inside a notify (an unref there cannot
 * wait for the notify to end). */
gboolean
kd_notifier_notifying_here (KdNotifier *self)
{
  gboolean here;

  kd_mutex_lock (&self->lock);
  here = self->busy == g_thread_self ();
  kd_mutex_unlock (&self->lock);

  return here;
}

/* Once nothing arms it any more. */
void
kd_notifier_destroy (KdNotifier *self)
{
  g_source_destroy (&self->source);
  g_source_unref (&self->source);
}
