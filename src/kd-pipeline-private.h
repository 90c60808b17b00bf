/* kd-pipeline-private.h: what tests reach of a pipeline
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include "kd-pipeline.h"

G_BEGIN_DECLS

void kd_pipeline_wait_ticket_sleepers (KdPipeline   *self,
                                       KdDispatcher *stage,
                                       guint         n_sleeping);

G_END_DECLS
