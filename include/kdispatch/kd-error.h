/* kd-error.h: the KD_ERROR domain
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#if !defined(KD_INSIDE) && !defined(KDISPATCH_COMPILATION)
# error "Only <kdispatch/kdispatch.h> can be included directly."
#endif

#include <glib.h>

#include "kd-version.h"

G_BEGIN_DECLS

#define KD_ERROR (kd_error_quark ())

/**
 * KdError:
 * @KD_ERROR_CLOSED: the dispatcher no longer accepts jobs (closed or cancelled)
 * @KD_ERROR_FULL: the admission bound is reached and the call may not block
 * @KD_ERROR_TIMEOUT: the admission bound stayed reached until the deadline
 *
 * Errors of the %KD_ERROR domain, returned by the submit calls. A job
 * dropped by cancellation ends with %G_IO_ERROR_CANCELLED instead.
 *
 * Since: 0.1
 */
typedef enum
{
  KD_ERROR_CLOSED,
  KD_ERROR_FULL,
  KD_ERROR_TIMEOUT,
} KdError;

KD_AVAILABLE_IN_ALL
GQuark kd_error_quark (void);

G_END_DECLS
