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
 *   mkdir -p build-fuzz/corpus
 *   G_SLICE=always-malloc ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
 *     UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
 *     ./build-fuzz/tests/fuzz/fuzz-model -max_len=1200 -len_control=0 -timeout=120 \
 *       -max_total_time=600 build-fuzz/corpus
 *
 * Replay a crash; a violation prints the program the input decodes to, and
 * a race may need the input run many times:
 *
 *   ./build-fuzz/tests/fuzz/fuzz-model -runs=200 crash-<sha1>
 *
 * CI runs a short smoke (the `fuzz` suite of that build: meson test -C build-fuzz --suite fuzz).
 */

#include "config.h"

#include <glib.h>
#include <stdint.h>

#include "kd-model.h"

int LLVMFuzzerInitialize (int *argc, char ***argv);
int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerInitialize (int    *argc,
                      char ***argv)
{
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
