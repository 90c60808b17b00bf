/* consumer.c: a program built against kdispatch the way its users build it
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include <kdispatch/kdispatch.h>

static gboolean
handle (KdJob    *job,
        gpointer  user_data,
        GError  **error)
{
  guint *last = user_data;   /* one key: its jobs run one at a time, in order */
  guint seq = GPOINTER_TO_UINT (kd_job_get_item (job));

  if (seq != *last + 1)
    return FALSE;
  *last = seq;
  return TRUE;
}

int
main (void)
{
  guint last = 0;
  g_autoptr(KdDispatcher) dispatcher = kd_dispatcher_new (2, handle, &last, NULL);
  KdStats stats;
  guint i;

  for (i = 1; i <= 1000; i++)
    if (!kd_dispatcher_submit (dispatcher, "only-key", GUINT_TO_POINTER (i), NULL))
      return 1;
  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_get_stats (dispatcher, &stats);

  g_print ("kdispatch %s: %" G_GUINT64_FORMAT " completed, %" G_GUINT64_FORMAT " failed\n",
           KD_VERSION_S, stats.completed, stats.failed);
  return stats.completed == 1000 && last == 1000 ? 0 : 1;
}
