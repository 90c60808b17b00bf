/* kd-shutdown-private.h: finishing a shutdown that cannot wait where it began
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib-object.h>

G_BEGIN_DECLS

/* The rest of @object's shutdown, run where it may wait for the object's
 * threads; the reference kd_shutdown_later() took is dropped after it. */
typedef void (*KdShutdownFunc) (GObject *object);

void kd_shutdown_later        (GObject        *object,
                               GMainContext   *dispatching,
                               KdShutdownFunc  finish);
void kd_shutdown_thread_enter (void);
void kd_shutdown_thread_exit  (void);

G_END_DECLS
