/* kd-pipeline.h: stages chained with backpressure, per-key order and one shutdown
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

#define KD_TYPE_PIPELINE (kd_pipeline_get_type ())

KD_AVAILABLE_IN_ALL
G_DECLARE_FINAL_TYPE (KdPipeline, kd_pipeline, KD, PIPELINE, GObject)

/**
 * KdStageMode:
 * @KD_STAGE_KEYED: items of one key run one at a time, in order; items of
 *   different keys, and unkeyed items, run in parallel (the default)
 * @KD_STAGE_PARALLEL: every item runs in parallel; what they emit leaves in
 *   any order
 * @KD_STAGE_ORDERED: every item runs in parallel, but what they emit leaves
 *   in the order the items entered the stage, per key
 *
 * How a pipeline stage orders its items.
 *
 * Since: 0.1
 */
typedef enum
{
  KD_STAGE_KEYED,
  KD_STAGE_PARALLEL,
  KD_STAGE_ORDERED,
} KdStageMode;

/**
 * KdSinkFunc:
 * @key: (nullable): the item's key
 * @item: (transfer none) (nullable): an item the last stage emitted
 * @user_data: the data given to kd_pipeline_set_sink()
 *
 * Receives what the last stage emits, on the worker that emitted it (so it
 * may run on several threads at once, unless the last stage is keyed or
 * ordered, where one key's items arrive in order). The item is the sink's
 * from then on: the pipeline does not free it. Values go to the value sink
 * instead (#KdValueSinkFunc), which is what bindings use.
 *
 * Since: 0.1
 */
typedef void (*KdSinkFunc) (const char *key,
                            gpointer    item,
                            gpointer    user_data);

/**
 * KdValueSinkFunc:
 * @key: (nullable): the value's key
 * @value: a value the last stage emitted, borrowed for the call
 * @user_data: the data given to kd_pipeline_set_value_sink()
 *
 * Receives what the last stage emits as a value (see
 * kd_job_emit_value()), on the worker that emitted it, as a #KdSinkFunc
 * does. The pipeline frees @value when the sink returns.
 *
 * Since: 0.1
 */
typedef void (*KdValueSinkFunc) (const char   *key,
                                 const GValue *value,
                                 gpointer      user_data);

KD_AVAILABLE_IN_ALL
KdPipeline   *kd_pipeline_new             (void) G_GNUC_WARN_UNUSED_RESULT;
KD_AVAILABLE_IN_ALL
KdDispatcher *kd_pipeline_add_stage       (KdPipeline      *self,
                                           const char      *name,
                                           guint            n_workers,
                                           KdHandlerFunc    handler,
                                           gpointer         user_data,
                                           GDestroyNotify   user_data_free);
KD_AVAILABLE_IN_ALL
void          kd_pipeline_set_stage_mode  (KdPipeline      *self,
                                           KdDispatcher    *stage,
                                           KdStageMode      mode);
KD_AVAILABLE_IN_ALL
guint         kd_pipeline_get_n_stages    (KdPipeline      *self);
KD_AVAILABLE_IN_ALL
KdDispatcher *kd_pipeline_get_stage       (KdPipeline      *self,
                                           guint            index);
KD_AVAILABLE_IN_ALL
void          kd_pipeline_set_sink        (KdPipeline      *self,
                                           KdSinkFunc       sink,
                                           gpointer         user_data,
                                           GDestroyNotify   user_data_free);
KD_AVAILABLE_IN_ALL
void          kd_pipeline_set_value_sink  (KdPipeline      *self,
                                           KdValueSinkFunc  sink,
                                           gpointer         user_data,
                                           GDestroyNotify   user_data_free);
KD_AVAILABLE_IN_ALL
void          kd_pipeline_set_cancellable (KdPipeline      *self,
                                           GCancellable    *cancellable);
KD_AVAILABLE_IN_ALL
GCancellable *kd_pipeline_get_cancellable (KdPipeline      *self);
KD_AVAILABLE_IN_ALL
gboolean      kd_pipeline_submit          (KdPipeline      *self,
                                           const char      *key,
                                           gpointer         item,
                                           GError         **error);
KD_AVAILABLE_IN_ALL
gboolean      kd_pipeline_submit_value    (KdPipeline      *self,
                                           const char      *key,
                                           const GValue    *value,
                                           GError         **error);
KD_AVAILABLE_IN_ALL
guint         kd_pipeline_submit_many     (KdPipeline          *self,
                                           const char * const  *keys,
                                           gpointer            *items,
                                           guint                n_items,
                                           GError             **error);
KD_AVAILABLE_IN_ALL
void          kd_pipeline_close           (KdPipeline      *self);
KD_AVAILABLE_IN_ALL
void          kd_pipeline_wait            (KdPipeline      *self);
KD_AVAILABLE_IN_ALL
gboolean      kd_pipeline_wait_until      (KdPipeline      *self,
                                           gint64           end_time);
KD_AVAILABLE_IN_ALL
void          kd_pipeline_wait_async      (KdPipeline          *self,
                                           GCancellable        *cancellable,
                                           GAsyncReadyCallback  callback,
                                           gpointer             user_data);
KD_AVAILABLE_IN_ALL
gboolean      kd_pipeline_wait_finish     (KdPipeline      *self,
                                           GAsyncResult    *result,
                                           GError         **error);

G_END_DECLS
