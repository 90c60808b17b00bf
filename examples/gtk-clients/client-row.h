/* client-row.h: one simulated client's progress, as the list shows it
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib-object.h>

G_BEGIN_DECLS

#define CLIENT_TYPE_ROW (client_row_get_type ())

G_DECLARE_FINAL_TYPE (ClientRow, client_row, CLIENT, ROW, GObject)

ClientRow  *client_row_new          (const char *name,
                                     guint       planned);
const char *client_row_get_name     (ClientRow  *self);
guint       client_row_get_planned  (ClientRow  *self);
guint       client_row_get_done     (ClientRow  *self);
void        client_row_set_done     (ClientRow  *self,
                                     guint       done);
guint       client_row_get_returned (ClientRow  *self);
void        client_row_set_returned (ClientRow  *self,
                                     guint       returned);

G_END_DECLS
