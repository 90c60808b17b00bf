/* client-row.c: one simulated client's progress, as the list shows it
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The list model's item: a client's name, how many messages it sends in a
 * run, how many were handled (done) and how many were handed back by a
 * cancel (returned). Only the main thread touches it: the dispatcher's done
 * callbacks run there, and each one moves a row on.
 */

#include "client-row.h"

struct _ClientRow
{
  GObject parent_instance;

  char   *name;
  guint   planned;
  guint   done;
  guint   returned;
};

enum
{
  PROP_0,
  PROP_NAME,
  PROP_PLANNED,
  PROP_DONE,
  PROP_RETURNED,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

G_DEFINE_FINAL_TYPE (ClientRow, client_row, G_TYPE_OBJECT)

static void
client_row_finalize (GObject *object)
{
  ClientRow *self = CLIENT_ROW (object);

  g_free (self->name);

  G_OBJECT_CLASS (client_row_parent_class)->finalize (object);
}

static void
client_row_get_property (GObject    *object,
                         guint       prop_id,
                         GValue     *value,
                         GParamSpec *pspec)
{
  ClientRow *self = CLIENT_ROW (object);

  switch (prop_id)
    {
    case PROP_NAME:
      g_value_set_string (value, self->name);
      break;
    case PROP_PLANNED:
      g_value_set_uint (value, self->planned);
      break;
    case PROP_DONE:
      g_value_set_uint (value, self->done);
      break;
    case PROP_RETURNED:
      g_value_set_uint (value, self->returned);
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
client_row_set_property (GObject      *object,
                         guint         prop_id,
                         const GValue *value,
                         GParamSpec   *pspec)
{
  ClientRow *self = CLIENT_ROW (object);

  switch (prop_id)
    {
    case PROP_NAME:
      self->name = g_value_dup_string (value);
      break;
    case PROP_PLANNED:
      self->planned = g_value_get_uint (value);
      break;
    case PROP_DONE:
      client_row_set_done (self, g_value_get_uint (value));
      break;
    case PROP_RETURNED:
      client_row_set_returned (self, g_value_get_uint (value));
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
client_row_class_init (ClientRowClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->finalize = client_row_finalize;
  object_class->get_property = client_row_get_property;
  object_class->set_property = client_row_set_property;

  properties[PROP_NAME] =
    g_param_spec_string ("name", NULL, NULL, NULL,
                         G_PARAM_READWRITE | G_PARAM_CONSTRUCT_ONLY | G_PARAM_STATIC_STRINGS);
  properties[PROP_PLANNED] =
    g_param_spec_uint ("planned", NULL, NULL, 0, G_MAXUINT, 0,
                       G_PARAM_READWRITE | G_PARAM_CONSTRUCT_ONLY | G_PARAM_STATIC_STRINGS);
  properties[PROP_DONE] =
    g_param_spec_uint ("done", NULL, NULL, 0, G_MAXUINT, 0,
                       G_PARAM_READWRITE | G_PARAM_EXPLICIT_NOTIFY | G_PARAM_STATIC_STRINGS);
  properties[PROP_RETURNED] =
    g_param_spec_uint ("returned", NULL, NULL, 0, G_MAXUINT, 0,
                       G_PARAM_READWRITE | G_PARAM_EXPLICIT_NOTIFY | G_PARAM_STATIC_STRINGS);

  g_object_class_install_properties (object_class, N_PROPS, properties);
}

static void
client_row_init (ClientRow *self)
{
}

ClientRow *
client_row_new (const char *name,
                guint       planned)
{
  return g_object_new (CLIENT_TYPE_ROW, "name", name, "planned", planned, NULL);
}

const char *
client_row_get_name (ClientRow *self)
{
  g_return_val_if_fail (CLIENT_IS_ROW (self), NULL);

  return self->name;
}

guint
client_row_get_planned (ClientRow *self)
{
  g_return_val_if_fail (CLIENT_IS_ROW (self), 0);

  return self->planned;
}

guint
client_row_get_done (ClientRow *self)
{
  g_return_val_if_fail (CLIENT_IS_ROW (self), 0);

  return self->done;
}

void
client_row_set_done (ClientRow *self,
                     guint      done)
{
  g_return_if_fail (CLIENT_IS_ROW (self));

  if (self->done != done)
    {
      self->done = done;
      g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_DONE]);
    }
}

guint
client_row_get_returned (ClientRow *self)
{
  g_return_val_if_fail (CLIENT_IS_ROW (self), 0);

  return self->returned;
}

void
client_row_set_returned (ClientRow *self,
                         guint      returned)
{
  g_return_if_fail (CLIENT_IS_ROW (self));

  if (self->returned != returned)
    {
      self->returned = returned;
      g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_RETURNED]);
    }
}
