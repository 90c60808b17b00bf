/* kd-group.h: jobs counted, awaited and cancelled together
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#if !defined(KD_INSIDE) && !defined(KDISPATCH_COMPILATION)
# error "Only <kdispatch/kdispatch.h> can be included directly."
#endif

#include <gio/gio.h>

#include "kd-dispatcher.h"
#include "kd-version.h"

G_BEGIN_DECLS

#define KD_TYPE_GROUP (kd_group_get_type ())

KD_AVAILABLE_IN_ALL
G_DECLARE_FINAL_TYPE (KdGroup, kd_group, KD, GROUP, GObject)

KD_AVAILABLE_IN_ALL
KdGroup      *kd_group_new              (KdDispatcher        *dispatcher);
KD_AVAILABLE_IN_ALL
KdDispatcher *kd_group_get_dispatcher   (KdGroup             *self);
KD_AVAILABLE_IN_ALL
GCancellable *kd_group_get_cancellable  (KdGroup             *self);
KD_AVAILABLE_IN_ALL
void          kd_group_set_fail_fast    (KdGroup             *self,
                                         gboolean             fail_fast);
KD_AVAILABLE_IN_ALL
gboolean      kd_group_get_fail_fast    (KdGroup             *self);
KD_AVAILABLE_IN_ALL
void          kd_group_set_priority     (KdGroup             *self,
                                         gint                 priority);
KD_AVAILABLE_IN_ALL
gint          kd_group_get_priority     (KdGroup             *self);

KD_AVAILABLE_IN_ALL
gboolean      kd_group_submit           (KdGroup             *self,
                                         const char          *key,
                                         gpointer             item,
                                         GError             **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_group_submit_value     (KdGroup             *self,
                                         const char          *key,
                                         const GValue        *value,
                                         GError             **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_group_try_submit       (KdGroup             *self,
                                         const char          *key,
                                         gpointer             item,
                                         GError             **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_group_submit_timeout   (KdGroup             *self,
                                         const char          *key,
                                         gpointer             item,
                                         gint64               timeout_us,
                                         GError             **error);
KD_AVAILABLE_IN_ALL
void          kd_group_submit_async     (KdGroup             *self,
                                         const char          *key,
                                         gpointer             item,
                                         GCancellable        *cancellable,
                                         GAsyncReadyCallback  callback,
                                         gpointer             user_data);
KD_AVAILABLE_IN_ALL
void          kd_group_submit_value_async (KdGroup             *self,
                                           const char          *key,
                                           const GValue        *value,
                                           GCancellable        *cancellable,
                                           GAsyncReadyCallback  callback,
                                           gpointer             user_data);
KD_AVAILABLE_IN_ALL
gboolean      kd_group_submit_value_finish (KdGroup            *self,
                                            GAsyncResult       *result,
                                            GError            **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_group_submit_finish    (KdGroup             *self,
                                         GAsyncResult        *result,
                                         GError             **error);

KD_AVAILABLE_IN_ALL
gboolean      kd_group_wait             (KdGroup             *self,
                                         GError             **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_group_wait_until       (KdGroup             *self,
                                         gint64               end_time,
                                         GError             **error);
KD_AVAILABLE_IN_ALL
void          kd_group_wait_async       (KdGroup             *self,
                                         GCancellable        *cancellable,
                                         GAsyncReadyCallback  callback,
                                         gpointer             user_data);
KD_AVAILABLE_IN_ALL
gboolean      kd_group_wait_finish      (KdGroup             *self,
                                         GAsyncResult        *result,
                                         GError             **error);

KD_AVAILABLE_IN_ALL
void          kd_group_get_stats        (KdGroup             *self,
                                         KdStats             *stats);

G_END_DECLS
