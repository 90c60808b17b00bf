/* kd-delivery-private.h: done callbacks delivered on a GMainContext
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

#include "kd-job-private.h"

G_BEGIN_DECLS

typedef struct _KdDelivery KdDelivery;

typedef void (*KdDeliverFunc) (KdJob    *job,
                               gpointer  user_data);

KdDelivery *kd_delivery_new              (GMainContext  *context,
                                          KdDeliverFunc  func,
                                          gpointer       user_data);
void        kd_delivery_push             (KdDelivery    *self,
                                          KdJob         *job);
gboolean    kd_delivery_is_dispatching   (KdDelivery    *self);
void        kd_delivery_flush            (KdDelivery    *self);
void        kd_delivery_destroy          (KdDelivery    *self);

G_END_DECLS
