/* kd-shutdown-private.h: finishing a shutdown that cannot wait where it began
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib-object.h>

G_BEGIN_DECLS

/* A step of @object's shutdown (see kd_shutdown_dispose()). */
typedef void (*KdShutdownFunc) (GObject *object);

/* How far an object's shutdown got; zero-initialised with the object. */
typedef struct
{
  gint state;   /* atomic */
} KdShutdown;

void     kd_shutdown_dispose      (KdShutdown     *shutdown,
                                   GObject        *object,
                                   gboolean        on_own_thread,
                                   GMainContext   *dispatching,
                                   KdShutdownFunc  close,
                                   KdShutdownFunc  finish);
gboolean kd_shutdown_is_done      (KdShutdown     *shutdown);
void     kd_shutdown_thread_enter (void);
void     kd_shutdown_thread_exit  (void);
gboolean kd_shutdown_thread_has_finishes (void);
void     kd_shutdown_thread_leave (void);

G_END_DECLS
