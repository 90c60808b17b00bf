/* kd-trace-private.h: USDT probes for perf, bpftrace and SystemTap
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Built with sys/sdt.h (meson option tracing, on when the header is found),
 * each probe is an ELF note that tracers find and a no-op instruction,
 * behind its semaphore: a counter the tracer raises while it is attached
 * (bpftrace and SystemTap do, through the kernel's uprobe reference
 * counters; gdb does too). Untraced, a probe costs a load and a branch and
 * its arguments are not computed. Without sys/sdt.h the probes compile to
 * nothing. Provider "kdispatch"; the probes, their arguments, and a
 * bpftrace example are in the README ("Packages, ABI and tracing"):
 *
 *   job_submit  (dispatcher name, key, job)           accepted, before it is queued
 *   job_start   (dispatcher name, key, job, attempt)  before its handler runs
 *   job_end     (dispatcher name, key, job, outcome)  0 completed, 1 failed, 2 cancelled
 *   job_retry   (dispatcher name, key, job, attempt)  failed, and will run again
 *   key_park    (dispatcher name, key)                parked after a failure
 *   job_deliver (dispatcher name, key, job)           its done callback, on the main context
 *
 * The name and key are NUL-terminated strings or NULL (an unnamed
 * dispatcher, an unkeyed job); the job is its record's address, the same
 * from submit to end (then recycled). The semaphores are in kd-trace.c.
 */

#pragma once

#include "config.h"

#if KD_ENABLE_TRACING

# define _SDT_HAS_SEMAPHORES 1
# include <sys/sdt.h>

# define KD_TRACE_PROBES(X) X (job_submit) X (job_start) X (job_end) X (job_retry) \
                            X (key_park) X (job_deliver)
# define KD_TRACE_DECLARE(probe) extern unsigned short kdispatch_##probe##_semaphore;
KD_TRACE_PROBES (KD_TRACE_DECLARE)

# define KD_TRACING(probe) \
  G_UNLIKELY (__atomic_load_n (&kdispatch_##probe##_semaphore, __ATOMIC_RELAXED) != 0)
# define KD_TRACE2(probe, a, b) \
  G_STMT_START { if (KD_TRACING (probe)) STAP_PROBE2 (kdispatch, probe, a, b); } G_STMT_END
# define KD_TRACE3(probe, a, b, c) \
  G_STMT_START { if (KD_TRACING (probe)) STAP_PROBE3 (kdispatch, probe, a, b, c); } G_STMT_END
# define KD_TRACE4(probe, a, b, c, d) \
  G_STMT_START { if (KD_TRACING (probe)) STAP_PROBE4 (kdispatch, probe, a, b, c, d); } G_STMT_END

#else

# define KD_TRACING(probe)            FALSE
# define KD_TRACE2(probe, a, b)       G_STMT_START { } G_STMT_END
# define KD_TRACE3(probe, a, b, c)    G_STMT_START { } G_STMT_END
# define KD_TRACE4(probe, a, b, c, d) G_STMT_START { } G_STMT_END

#endif
