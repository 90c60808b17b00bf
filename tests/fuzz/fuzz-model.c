/* fuzz-model.c: libFuzzer drives the dispatcher's model with its bytes
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Every input decodes to a program of kd-model.h (a configuration and a few
 * threads' operations on one KdDispatcher); the model runs it and checks
 * the contract (see kd-model.c). A violation aborts with its place and the
 * program, and libFuzzer keeps the input as crash-*.
 *
 * Built with -Dfuzz=true (clang, the whole build instrumented with
 * -fsanitize=fuzzer-no-link,address,undefined). Run it locally:
 *
 *   CC=clang meson setup build-fuzz -Dfuzz=true -Db_sanitize=address,undefined -Db_lundef=false
 *   ninja -C build-fuzz tests/fuzz/fuzz-model
 *   G_SLICE=always-malloc ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
 *     UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
 *     KD_FUZZ_SEED_CORPUS=build-fuzz/corpus \
 *     ./build-fuzz/tests/fuzz/fuzz-model -max_len=1200 -len_control=0 -timeout=120 \
 *       -max_total_time=600 build-fuzz/corpus
 *
 * (KD_FUZZ_SEED_CORPUS fills an empty corpus with test-model's first seeds.)
 *
 * Replay a crash; a violation prints the program the input decodes to, and
 * a race may need the input run many times:
 *
 *   ./build-fuzz/tests/fuzz/fuzz-model -runs=200 crash-<sha1>
 *
 * CI runs a short smoke from those seeds (the `fuzz` suite of that build:
 * meson test -C build-fuzz --suite fuzz).
 */

#include "config.h"

#include <glib.h>
#include <glib/gstdio.h>
#include <stdint.h>

#include "kd-model.h"

/* How many of test-model's seeds make a seed corpus. */
#define SEED_CORPUS_SIZE 64

int LLVMFuzzerInitialize (int *argc, char ***argv);
int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

/* KD_FUZZ_SEED_CORPUS=DIR: writes the programs of test-model's first seeds
 * into DIR (made if missing) unless it holds files already, so that a run
 * given DIR as its corpus starts from real programs (cancels, closes and
 * unrefs among many submits) instead of a few bytes. libFuzzer calls this
 * before it reads its corpus directories. */
static void
write_seed_corpus (const char *dir)
{
  GDir *listing;
  guint64 seed;

  if (g_mkdir_with_parents (dir, 0755) != 0)
    g_error ("fuzz-model: cannot make %s", dir);
  listing = g_dir_open (dir, 0, NULL);
  if (listing != NULL && g_dir_read_name (listing) != NULL)
    {
      g_dir_close (listing);
      return;
    }
  g_clear_pointer (&listing, g_dir_close);

  for (seed = 1; seed <= SEED_CORPUS_SIZE; seed++)
    {
      gsize size;
      guint8 *bytes = kd_model_seed_bytes (seed, &size);
      char *name = g_strdup_printf ("%s/seed-%03" G_GUINT64_FORMAT, dir, seed);

      if (!g_file_set_contents (name, (const char *) bytes, (gssize) size, NULL))
        g_error ("fuzz-model: cannot write %s", name);
      g_free (name);
      g_free (bytes);
    }
}

int
LLVMFuzzerInitialize (int    *argc,
                      char ***argv)
{
  const char *seed_corpus = g_getenv ("KD_FUZZ_SEED_CORPUS");

  if (seed_corpus != NULL && *seed_corpus != '\0')
    write_seed_corpus (seed_corpus);
  kd_model_set_fatal (TRUE);
  return 0;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data,
                        size_t         size)
{
  KdModelResult result;

  /* Fatal mode: a violation has aborted already. */
  if (!kd_model_run_bytes (data, size, &result))
    g_error ("kd-model: %u violations:\n%s", result.n_violations, result.report);
  kd_model_result_clear (&result);

  return 0;
}
