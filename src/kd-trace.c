/* kd-trace.c: the USDT probes' semaphores (see kd-trace-private.h)
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <glib.h>

#include "kd-trace-private.h"

#if KD_ENABLE_TRACING
/* In the .probes section, where tracers look for them by their notes. */
# define KD_TRACE_DEFINE(probe) \
  unsigned short kdispatch_##probe##_semaphore __attribute__ ((section (".probes")));
KD_TRACE_PROBES (KD_TRACE_DEFINE)
#endif
