/* kd-dispatcher-private.h: helpers the tests reach
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include "kd-admission-private.h"
#include "kd-dispatcher.h"

G_BEGIN_DECLS

void  kd_dispatcher_wait_sealed             (KdDispatcher *self,
                                             KdSealedFunc  sealed,
                                             gpointer      user_data);
void  kd_dispatcher_wait_blocked_submitters (KdDispatcher *self,
                                             guint         n_blocked);
guint kd_dispatcher_get_admitted            (KdDispatcher *self);

G_END_DECLS
