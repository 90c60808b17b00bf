/* kd-dispatcher-private.h: what tests reach of a dispatcher
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Held by kd-dispatcher-properties.c; a test also reaches what a pipeline
 * does (kd-dispatcher-stage-private.h).
 */

#pragma once

#include "kd-dispatcher-stage-private.h"

G_BEGIN_DECLS

void  kd_dispatcher_wait_blocked_submitters (KdDispatcher *self,
                                             guint         n_blocked);
guint kd_dispatcher_get_admitted            (KdDispatcher *self);
guint kd_dispatcher_count_key_jobs          (KdDispatcher *self,
                                             const char   *key);
void  kd_dispatcher_wait_blocked_on_key     (KdDispatcher *self,
                                             const char   *key,
                                             guint         n_blocked);

G_END_DECLS
