/* kdispatch.h: the one header users include
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#define KD_INSIDE
# include "kd-version.h"
# include "kd-error.h"
# include "kd-job.h"
# include "kd-dispatcher.h"
# include "kd-group.h"
# include "kd-pipeline.h"
# include "kd-features.h"
# ifdef KD_HAS_REDIS
#  include "kd-redis-entry.h"
#  include "kd-redis-queue.h"
# endif
#undef KD_INSIDE
