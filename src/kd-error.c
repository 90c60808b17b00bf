/* kd-error.c: the KD_ERROR domain
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include "kd-error.h"

/**
 * kd_error_quark:
 *
 * The error domain of kdispatch's submit calls.
 *
 * Returns: the %KD_ERROR quark
 *
 * Since: 0.1
 */
G_DEFINE_QUARK (kd-error-quark, kd_error)
