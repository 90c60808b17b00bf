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

KdNotifier *kd_notifier_new     (GObject      *object,
                                 GMainContext *context,
                                 gint64        interval_us,
                                 KdNotifyFunc  func);
void        kd_notifier_arm     (KdNotifier   *self);
void        kd_notifier_detach  (KdNotifier   *self);
gboolean    kd_notifier_notifying_here (KdNotifier *self);
void        kd_notifier_destroy (KdNotifier   *self);

G_END_DECLS
