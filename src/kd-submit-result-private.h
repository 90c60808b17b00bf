/* kd-submit-result-private.h: the GAsyncResult of the dispatcher's async calls
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <gio/gio.h>

#include "kd-delivery-private.h"
#include "kd-dispatcher.h"
#include "kd-group.h"
#include "kd-item-private.h"
#include "kd-task-private.h"

G_BEGIN_DECLS

#define KD_TYPE_SUBMIT_RESULT (kd_submit_result_get_type ())

/* The source tag of kd_dispatcher_submit_async()'s results: the function,
 * as GIO's convention has it (through an integer, which ISO C allows). */
#define KD_SUBMIT_RESULT_TAG ((gpointer) (guintptr) kd_dispatcher_submit_async)

G_DECLARE_FINAL_TYPE (KdSubmitResult, kd_submit_result, KD, SUBMIT_RESULT, GObject)

/* A dispatcher's deliveries of async results, one per caller context. */
typedef struct _KdResultRegistry KdResultRegistry;

KdResultRegistry *kd_result_registry_new  (void);
void              kd_result_registry_free (KdResultRegistry *self);

KdSubmitResult *kd_submit_result_new          (KdDispatcher        *dispatcher,
                                               KdResultRegistry    *results,
                                               gpointer             source_tag,
                                               gpointer             item,
                                               GCancellable        *cancellable,
                                               GAsyncReadyCallback  callback,
                                               gpointer             user_data);
void            kd_submit_result_set_group    (KdSubmitResult      *self,
                                               KdGroup             *group);
KdGroup        *kd_submit_result_get_group    (KdSubmitResult      *self);
KdTask         *kd_submit_result_get_task     (KdSubmitResult      *self);
KdSubmitResult *kd_submit_result_from_task    (KdTask              *task);
void            kd_submit_result_keep_key     (KdSubmitResult      *self,
                                               const char          *key);
const char     *kd_submit_result_get_key      (KdSubmitResult      *self);
gpointer        kd_submit_result_get_item     (KdSubmitResult      *self);
void            kd_submit_result_set_value_item (KdSubmitResult    *self);
KdItemKind      kd_submit_result_get_item_kind (KdSubmitResult     *self);
void            kd_submit_result_refuse_item  (KdSubmitResult      *self);
gboolean        kd_submit_result_is_cancelled (KdSubmitResult      *self);
void            kd_submit_result_complete     (KdSubmitResult      *self,
                                               GError              *error);
void            kd_submit_result_complete_once (KdSubmitResult    **slot,
                                                GError             *error);
gboolean        kd_submit_result_propagate    (KdSubmitResult      *self,
                                               GError             **error);

G_END_DECLS
