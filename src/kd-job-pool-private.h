/* kd-job-pool-private.h: job records recycled instead of malloc'd per job
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include "kd-job-private.h"

G_BEGIN_DECLS

KdJob *kd_job_pool_alloc (void);
void   kd_job_pool_free  (KdJob *job);

G_END_DECLS
