/* kd-notifier-private.h: property notifications from worker threads, coalesced, on a main context
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib-object.h>

G_BEGIN_DECLS

typedef struct _KdNotifier KdNotifier;

/* Emits what changed on @object; runs in the notifier's context. */
typedef void (*KdNotifyFunc) (GObject *object);

/* Here so that kd_notifier_arm()'s test, on every job's path, is inlined. */
struct _KdNotifier
{
  GSource       source;

  /* Immutable */
  KdNotifyFunc  func;
  gint64        interval_us;

  gint          armed;    /* atomic */

  /* Under @lock: the object, until kd_notifier_detach(), and whether a
   * notify is running */
  GMutex        lock;
  GCond         idle;
  GObject      *object;
  GThread      *busy;     /* the thread notifying, or NULL */
};

KdNotifier *kd_notifier_new     (GObject      *object,
                                 GMainContext *context,
                                 gint64        interval_us,
                                 KdNotifyFunc  func);
void        kd_notifier_arm_now (KdNotifier   *self);
void        kd_notifier_detach  (KdNotifier   *self);
gboolean    kd_notifier_notifying_here (KdNotifier *self);
void        kd_notifier_destroy (KdNotifier   *self);

/* Something changed: notify within @interval_us. Any thread; after the
 * change is stored. */
static inline void
kd_notifier_arm (KdNotifier *self)
{
  if (G_LIKELY (__atomic_load_n (&self->armed, __ATOMIC_SEQ_CST)))
    return;
  kd_notifier_arm_now (self);
}

G_END_DECLS
