/* batches.c: batch, wait, next batch, on one dispatcher
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * A program that works in rounds (a frame, a tick, a page of records)
 * submits a batch of jobs, waits for exactly that batch, uses the results,
 * and starts the next round on the same dispatcher. kd_dispatcher_wait() is
 * a reusable barrier: no polling, no sleeping, no dispatcher per batch.
 *
 * Here each round squares numbers in parallel, and records, per key, which
 * round's values a "ledger" key saw, to show keyed jobs mixed into a batch.
 */

#include <kdispatch/kdispatch.h>
#include <stdio.h>
#include <stdlib.h>

#define BATCH_SIZE 10000

typedef struct
{
  guint64 results[BATCH_SIZE];
  guint   ledger_round;     /* updated by the keyed jobs, one at a time */
  guint   ledger_entries;
} Round;

static gboolean
square (KdJob    *job,
        gpointer  user_data,
        GError  **error)
{
  Round *round = user_data;
  guint i = GPOINTER_TO_UINT (kd_job_get_item (job));

  if (kd_job_get_key (job) != NULL)
    {
      round->ledger_entries++;
      return TRUE;
    }

  round->results[i] = (guint64) i * i;
  return TRUE;
}

int
main (int    argc,
      char **argv)
{
  gint n_batches = 200;
  GOptionEntry entries[] = {
    { "batches", 'n', 0, G_OPTION_ARG_INT, &n_batches, "Number of batches", "N" },
    { NULL },
  };
  g_autoptr(GOptionContext) options = g_option_context_new ("- batches with a reusable barrier");
  g_autoptr(GError) error = NULL;
  g_autoptr(KdDispatcher) dispatcher = NULL;
  Round *round = g_new0 (Round, 1);
  gint64 start = 0;
  KdStats stats;
  gint batch;

  g_option_context_add_main_entries (options, entries, NULL);
  if (!g_option_context_parse (options, &argc, &argv, &error) || n_batches < 1)
    {
      g_printerr ("%s\n", error != NULL ? error->message : "--batches must be at least 1");
      return EXIT_FAILURE;
    }

  dispatcher = kd_dispatcher_new (0, square, round, g_free);

  start = g_get_monotonic_time ();
  for (batch = 0; batch < n_batches; batch++)
    {
      guint64 sum = 0;
      guint i;

      for (i = 0; i < BATCH_SIZE; i++)
        {
          /* One job in a hundred goes through the keyed "ledger". */
          const char *key = (i % 100 == 0) ? "ledger" : NULL;

          if (!kd_dispatcher_submit (dispatcher, key, GUINT_TO_POINTER (i), &error))
            {
              g_printerr ("submit failed: %s\n", error->message);
              return EXIT_FAILURE;
            }
        }

      /* Every job of this batch has ended when wait returns. */
      kd_dispatcher_wait (dispatcher);

      for (i = 0; i < BATCH_SIZE; i++)
        {
          if (i % 100 != 0 && round->results[i] != (guint64) i * i)
            {
              g_printerr ("batch %d: result %u missing after wait\n", batch, i);
              return EXIT_FAILURE;
            }
          sum += round->results[i];
          round->results[i] = 0;
        }
      if (round->ledger_entries != (guint) (batch + 1) * (BATCH_SIZE / 100))
        {
          g_printerr ("batch %d: ledger has %u entries\n", batch, round->ledger_entries);
          return EXIT_FAILURE;
        }

      if (batch < 3 || batch == n_batches - 1)
        g_print ("batch %4d: sum of squares %" G_GUINT64_FORMAT "\n", batch, sum);
      else if (batch == 3)
        g_print ("...\n");
    }

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_print ("%d batches of %d jobs on one dispatcher (%u workers): %" G_GUINT64_FORMAT
           " jobs in %.3f s, pending %" G_GUINT64_FORMAT "\n",
           n_batches, BATCH_SIZE, kd_dispatcher_get_n_workers (dispatcher), stats.completed,
           (g_get_monotonic_time () - start) / 1e6, stats.pending);

  return stats.completed == (guint64) n_batches * BATCH_SIZE ? EXIT_SUCCESS : EXIT_FAILURE;
}
