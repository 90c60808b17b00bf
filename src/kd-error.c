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
GQuark
kd_error_quark (void)
{
  /* G_DEFINE_QUARK reads and writes its cache without atomics: a data race
   * when two threads fail their first submit at once. */
  static GQuark quark;
  GQuark q = __atomic_load_n (&quark, __ATOMIC_ACQUIRE);

  if (G_UNLIKELY (q == 0))
    {
      q = g_quark_from_static_string ("kd-error-quark");
      __atomic_store_n (&quark, q, __ATOMIC_RELEASE);
    }

  return q;
}
