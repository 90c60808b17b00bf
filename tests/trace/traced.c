/* traced.c: a dispatcher to trace, with one slow key
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * A dispatcher named "orders" runs 200 jobs for each of 10 clients on 2
 * workers; the jobs of client-3 take 1 ms each, the others next to nothing.
 * The USDT test (probes.sh) checks that its probes fire, and the README's
 * bpftrace example ("Packages and tracing") shows client-3 stand out.
 */

#include <kdispatch/kdispatch.h>

static gboolean
handle (KdJob    *job,
        gpointer  user_data,
        GError  **error)
{
  if (g_str_equal (kd_job_get_key (job), "client-3"))
    {
      gint64 until = g_get_monotonic_time () + 1000;

      while (g_get_monotonic_time () < until)
        ;
    }
  return TRUE;
}

int
main (void)
{
  KdDispatcher *dispatcher = kd_dispatcher_new (2, handle, NULL, NULL);
  guint i;

  kd_dispatcher_set_name (dispatcher, "orders");
  for (i = 0; i < 2000; i++)
    {
      char key[16];

      g_snprintf (key, sizeof key, "client-%u", i % 10);
      if (!kd_dispatcher_submit (dispatcher, key, GUINT_TO_POINTER (i), NULL))
        return 1;
    }
  kd_dispatcher_wait (dispatcher);
  g_object_unref (dispatcher);
  return 0;
}
