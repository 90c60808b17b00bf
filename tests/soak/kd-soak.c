/* kd-soak.c: the dispatcher's model for minutes, its memory watched
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Runs the programs of seed after seed (the same as test-model's) for a
 * given time, samples the process's RSS (VmRSS in /proc/self/status) and
 * the malloc heap in use, and prints them periodically. It fails if a run
 * breaks the model or if memory grows without bound: after a warm-up, the
 * lowest RSS of the last quarter of the run must stay within a margin of
 * the highest RSS of the warm-up. A leak of a few bytes per job shows as a
 * steady climb over minutes; the model's own checks catch lost items at
 * once, so this watches what the library keeps for itself.
 *
 *   ./build/tests/soak/kd-soak --minutes=5
 */

#include "config.h"

#include <glib.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd-model.h"

static gdouble minutes = 5.0;
static gint64 first_seed = 1;
static gint interval_s = 10;
static gint max_growth_kb = 8192;

static const GOptionEntry entries[] = {
  { "minutes", 'm', 0, G_OPTION_ARG_DOUBLE, &minutes, "How long to run (default 5)", "M" },
  { "seed", 's', 0, G_OPTION_ARG_INT64, &first_seed, "The first seed (default 1)", "S" },
  { "interval", 'i', 0, G_OPTION_ARG_INT, &interval_s,
    "Seconds between two samples of the memory (default 10)", "SECONDS" },
  { "max-growth-kb", 'g', 0, G_OPTION_ARG_INT, &max_growth_kb,
    "How far the RSS may end above the warm-up's highest (default 8192)", "KB" },
  { NULL }
};

typedef struct
{
  gdouble elapsed_s;
  guint64 rss_kb;
} Sample;

/* VmRSS of /proc/self/status, in kB; 0 if it cannot be read. */
static guint64
read_rss_kb (void)
{
  char *status = NULL;
  const char *line;
  guint64 rss = 0;

  if (!g_file_get_contents ("/proc/self/status", &status, NULL, NULL))
    return 0;
  line = strstr (status, "VmRSS:");
  if (line != NULL)
    rss = g_ascii_strtoull (line + strlen ("VmRSS:"), NULL, 10);
  g_free (status);

  return rss;
}

int
main (int    argc,
      char **argv)
{
  GOptionContext *context = g_option_context_new (NULL);
  GError *error = NULL;
  GArray *samples = g_array_new (FALSE, FALSE, sizeof (Sample));
  gint64 start, end, next_sample;
  guint64 seed, runs = 0, accepted = 0, known = 0, warmup_max = 0, tail_min = G_MAXUINT64;
  gdouble warmup_s, tail_s;
  gboolean grew;
  guint i;

  g_option_context_set_summary (context,
    "Runs the dispatcher's model (tests/kd-model.c) on seed after seed for\n"
    "--minutes, printing the runs, the RSS (VmRSS from /proc/self/status) and\n"
    "the malloc heap in use every --interval seconds.\n"
    "\n"
    "Fails (exit status 1) if a run breaks the model (the seed is printed;\n"
    "replay it with KD_MODEL_SEED=S test-model), or if memory grows without\n"
    "bound: after a warm-up of a fifth of the run, the lowest RSS of the last\n"
    "quarter must stay within --max-growth-kb of the warm-up's highest.");
  g_option_context_add_main_entries (context, entries, NULL);
  if (!g_option_context_parse (context, &argc, &argv, &error))
    {
      g_printerr ("kd-soak: %s\n", error->message);
      return 2;
    }
  g_option_context_free (context);
  if (minutes <= 0 || interval_s <= 0 || max_growth_kb < 0 || first_seed < 0)
    {
      g_printerr ("kd-soak: --minutes, --interval and --max-growth-kb must be positive, --seed not negative\n");
      return 2;
    }

  kd_model_quiet_debug ();

  start = g_get_monotonic_time ();
  end = start + (gint64) (minutes * 60 * G_TIME_SPAN_SECOND);
  next_sample = start;
  printf ("%8s %10s %10s %12s %10s %10s\n", "time_s", "runs", "seed", "accepted", "rss_kb", "heap_kb");

  for (seed = (guint64) first_seed;; seed++)
    {
      gint64 now = g_get_monotonic_time ();
      KdModelResult result;
      gsize size;
      guint8 *bytes;

      if (now >= next_sample || now >= end)
        {
          struct mallinfo2 heap = mallinfo2 ();
          Sample sample = { (now - start) / 1e6, read_rss_kb () };

          g_array_append_val (samples, sample);
          printf ("%8.1f %10" G_GUINT64_FORMAT " %10" G_GUINT64_FORMAT " %12" G_GUINT64_FORMAT
                  " %10" G_GUINT64_FORMAT " %10zu\n",
                  sample.elapsed_s, runs, seed, accepted, sample.rss_kb, heap.uordblks / 1024);
          fflush (stdout);
          next_sample += interval_s * G_TIME_SPAN_SECOND;
          if (now >= end)
            break;
        }

      bytes = kd_model_seed_bytes (seed, &size);
      if (!kd_model_run_bytes (bytes, size, &result))
        {
          g_printerr ("kd-soak: seed %" G_GUINT64_FORMAT " broke the model (replay with "
                      "KD_MODEL_SEED=%" G_GUINT64_FORMAT " test-model):\n%s",
                      seed, seed, result.report);
          return 1;
        }
      accepted += result.accepted;
      known += result.n_known;
      runs++;
      kd_model_result_clear (&result);
      g_free (bytes);
    }

  /* The warm-up's highest against the last quarter's lowest. The first
   * sample is taken before any run: the warm-up starts with the second. */
  warmup_s = minutes * 60 / 5;
  tail_s = minutes * 60 * 3 / 4;
  for (i = 1; i < samples->len; i++)
    {
      Sample *sample = &g_array_index (samples, Sample, i);

      if (sample->elapsed_s <= warmup_s || i == 1)
        warmup_max = MAX (warmup_max, sample->rss_kb);
      if (sample->elapsed_s >= tail_s)
        tail_min = MIN (tail_min, sample->rss_kb);
    }
  grew = tail_min > warmup_max + (guint64) max_growth_kb;
  printf ("kd-soak: %" G_GUINT64_FORMAT " runs, %" G_GUINT64_FORMAT " jobs accepted in %.1f min "
          "(%" G_GUINT64_FORMAT " hits of known library bugs); RSS %" G_GUINT64_FORMAT
          " kB at most in the warm-up, %" G_GUINT64_FORMAT " kB at least in the last quarter: %s\n",
          runs, accepted, minutes, known, warmup_max, tail_min,
          grew ? "memory grows, FAIL" : "flat, ok");
  g_array_unref (samples);

  return grew ? 1 : 0;
}
