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

/* Where an object's last reference went (see kd_shutdown_dispose()). */
typedef enum
{
  KD_SHUTDOWN_ELSEWHERE,      /* a thread that may wait for the object */
  KD_SHUTDOWN_OWN_THREAD,     /* one of its workers, or its timer's thread */
  KD_SHUTDOWN_ENDING_A_JOB,   /* a thread ending one of its jobs, which it
                               * would wait for (a deferred job's return) */
} KdShutdownPlace;

void     kd_shutdown_dispose      (KdShutdown     *shutdown,
                                   GObject        *object,
                                   KdShutdownPlace place,
                                   GMainContext   *dispatching,
                                   KdShutdownFunc  close,
                                   KdShutdownFunc  finish);
gboolean kd_shutdown_is_done      (KdShutdown     *shutdown);
void     kd_shutdown_thread_enter (void);
void     kd_shutdown_thread_exit  (void);
gboolean kd_shutdown_thread_has_finishes (void);
void     kd_shutdown_thread_leave (void);

G_END_DECLS
