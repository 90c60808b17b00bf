/* kd-delivery-private.h: callbacks delivered on a GMainContext, in order
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

#include "kd-task-private.h"

G_BEGIN_DECLS

typedef struct _KdDelivery KdDelivery;

typedef void (*KdDeliverFunc) (KdTask   *task,
                               gpointer  user_data);

KdDelivery *kd_delivery_new              (GMainContext  *context,
                                          const char    *name,
                                          KdDeliverFunc  func,
                                          gpointer       user_data);
void        kd_delivery_push             (KdDelivery    *self,
                                          KdTask        *task);
gboolean    kd_delivery_is_dispatching   (KdDelivery    *self);
void        kd_delivery_flush            (KdDelivery    *self);
void        kd_delivery_destroy          (KdDelivery    *self);

G_END_DECLS
