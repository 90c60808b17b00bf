/* kd-cancel-watch-private.h: a ::cancelled handler that can be dropped from anywhere
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <gio/gio.h>

G_BEGIN_DECLS

typedef struct _KdCancelWatch KdCancelWatch;

typedef void (*KdCancelFunc) (gpointer user_data);

KdCancelWatch *kd_cancel_watch_new  (GCancellable  *cancellable,
                                     KdCancelFunc   func,
                                     gpointer       user_data);
void           kd_cancel_watch_free (KdCancelWatch *self);

G_END_DECLS
