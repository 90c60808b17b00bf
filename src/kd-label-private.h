/* kd-label-private.h: the key an item carries through a pipeline
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

G_BEGIN_DECLS

char *kd_label_new   (const char *key);
char *kd_label_ref   (char       *label);
void  kd_label_unref (char       *label);

G_END_DECLS
