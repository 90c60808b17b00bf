/* test-model.c: KdDispatcher against its model, on random programs
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Each seed makes a byte string (kd_model_seed_bytes()) that decodes to a
 * program: a configuration and a few threads' operations (see kd-model.h;
 * the checks are in kd-model.c and kd-model-checks.c). CI runs a fixed set
 * of seeds; `-m slow` runs thousands. Every seed is printed before it runs,
 * so a failure can be replayed alone, its program printed:
 *
 *   KD_MODEL_SEED=1234 ./build/tests/test-model        (or --seed=1234)
 *   KD_MODEL_SEED=1234 KD_MODEL_REPEAT=200 ./build/tests/test-model
 *
 * KD_MODEL_FIRST_SEED and KD_MODEL_SEEDS move and size the set.
 * KD_MODEL_STRICT=1 fails on the library bugs the model knows of and that
 * are not fixed yet (none at the moment), which otherwise are only counted.
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <stdlib.h>
#include <string.h>

#include "kd-model.h"
#include "kd-test-util.h"

static guint64 replay_seed;

static guint64
env_number (const char *name,
            guint64     fallback)
{
  const char *value = g_getenv (name);

  return value != NULL && *value != '\0' ? g_ascii_strtoull (value, NULL, 10) : fallback;
}

/* Runs one byte string; on a violation, prints the program and the
 * report and fails the test case. */
static gboolean
run_program (const guint8 *bytes,
             gsize         size,
             const char   *what,
             KdModelResult *totals)
{
  KdModelProgram *program = g_new (KdModelProgram, 1);
  KdModelResult result;
  gboolean ok;

  kd_model_program_decode (program, bytes, size);
  ok = kd_model_run (program, &result);
  if (result.n_known > 0)
    {
      const char *end = strchr (result.known, '\n');

      g_test_message ("%s: %u hits of known library bugs (KD_MODEL_STRICT=1 fails on "
                      "them), the first: %.*s", what, result.n_known,
                      end != NULL ? (int) (end - result.known) : -1, result.known);
    }
  if (!ok)
    {
      char *description = kd_model_program_describe (program);

      g_test_message ("%s: %u violations:\n%s\nprogram: %s", what, result.n_violations,
                      result.report, description);
      g_test_fail_printf ("%s broke the model (%u violations)", what, result.n_violations);
      g_free (description);
    }
  if (totals != NULL)
    {
      totals->accepted += result.accepted;
      totals->refused += result.refused;
      totals->refused_closed += result.refused_closed;
      totals->completed += result.completed;
      totals->failed += result.failed;
      totals->cancelled += result.cancelled;
      totals->key_states += result.key_states;
      totals->retried += result.retried;
      totals->dead_letters += result.dead_letters;
      totals->parks += result.parks;
      totals->drops += result.drops;
      totals->n_known += result.n_known;
    }
  kd_model_result_clear (&result);
  g_free (program);

  return ok;
}

static gboolean
run_seed (guint64        seed,
          KdModelResult *totals)
{
  gsize size;
  guint8 *bytes = kd_model_seed_bytes (seed, &size);
  char *what = g_strdup_printf ("seed %" G_GUINT64_FORMAT " (replay: KD_MODEL_SEED=%"
                                G_GUINT64_FORMAT ")", seed, seed);
  gboolean ok = run_program (bytes, size, what, totals);

  g_free (what);
  g_free (bytes);

  return ok;
}

static void
test_seeds (void)
{
  guint64 first = env_number ("KD_MODEL_FIRST_SEED", 1);
  guint64 n = env_number ("KD_MODEL_SEEDS", kd_test_size (300, 4000));
  KdModelResult totals = { 0 };
  gint64 start = g_get_monotonic_time ();
  guint64 seed;

  g_test_summary ("Random programs of submits, try_submits, timed submits, async submits, "
                  "waits, closes, cancels, stats, unrefs, resumes and drops of parked keys "
                  "from several threads, with retries, dead letters, PARK, a key capacity, an "
                  "idle time, bounds on idle keys and waiting async submissions, and worker "
                  "funcs, keep every guarantee the model checks (see kd-model.c)");

  for (seed = first; seed < first + n; seed++)
    {
      g_test_message ("seed %" G_GUINT64_FORMAT, seed);
      if (!run_seed (seed, &totals))
        return;
    }

  g_test_message ("%" G_GUINT64_FORMAT " seeds in %.1f s: %" G_GUINT64_FORMAT " accepted, %"
                  G_GUINT64_FORMAT " refused (%" G_GUINT64_FORMAT " closed), %"
                  G_GUINT64_FORMAT " completed, %" G_GUINT64_FORMAT " failed, %"
                  G_GUINT64_FORMAT " cancelled, %" G_GUINT64_FORMAT " key states, %"
                  G_GUINT64_FORMAT " retries, %" G_GUINT64_FORMAT " dead letters, %"
                  G_GUINT64_FORMAT " parks (%" G_GUINT64_FORMAT " dropped), %u hits "
                  "of known library bugs", n, (g_get_monotonic_time () - start) / 1e6,
                  totals.accepted, totals.refused, totals.refused_closed, totals.completed,
                  totals.failed, totals.cancelled, totals.key_states, totals.retried,
                  totals.dead_letters, totals.parks, totals.drops, totals.n_known);

  /* The seeds are meant to reach every ending and refusal; a set that no
   * longer does (the op table changed) should be looked at. */
  if (n >= 100)
    {
      g_assert_cmpuint (totals.completed, >, 0);
      g_assert_cmpuint (totals.failed, >, 0);
      g_assert_cmpuint (totals.cancelled, >, 0);
      g_assert_cmpuint (totals.refused, >, 0);
      g_assert_cmpuint (totals.key_states, >, 0);
      g_assert_cmpuint (totals.retried, >, 0);
      g_assert_cmpuint (totals.dead_letters, >, 0);
      g_assert_cmpuint (totals.parks, >, 0);
      g_assert_cmpuint (totals.drops, >, 0);
    }
}

static void
test_replay (void)
{
  guint64 repeat = env_number ("KD_MODEL_REPEAT", 1);
  KdModelProgram *program = g_new (KdModelProgram, 1);
  gsize size;
  guint8 *bytes = kd_model_seed_bytes (replay_seed, &size);
  char *description;
  guint64 i;

  kd_model_program_decode (program, bytes, size);
  description = kd_model_program_describe (program);
  g_test_message ("seed %" G_GUINT64_FORMAT ", %" G_GUINT64_FORMAT " times: %s", replay_seed,
                  repeat, description);

  for (i = 0; i < repeat; i++)
    if (!run_seed (replay_seed, NULL))
      break;

  g_free (description);
  g_free (bytes);
  g_free (program);
}

/* Programs written by hand for the situations random bytes reach rarely,
 * in the byte format of kd-model.h: a header of 7 bytes (workers, fanout,
 * capacity index, threads, keys, flags, rare flags; each taken modulo its
 * range), then ops by name, each with its thread and operands (submits:
 * key, duration, fail rate, count - 1; submit_timeout: and the timeout). */
static void
add_op (GByteArray   *program,
        const char   *name,
        guint8        thread,
        const guint8 *operands,
        guint         n_operands)
{
  guint8 selector = kd_model_op_selector (name);

  g_byte_array_append (program, &selector, 1);
  g_byte_array_append (program, &thread, 1);
  g_byte_array_append (program, operands, n_operands);
}

#define HEADER(program, ...) \
  g_byte_array_append ((program), (const guint8[]) { __VA_ARGS__, 0, 0, 0 }, 10)
/* ... with the features, retry and key parameter bytes */
#define HEADER10(program, ...) \
  g_byte_array_append ((program), (const guint8[]) { __VA_ARGS__ }, 10)
#define OP(program, name, thread, ...) \
  add_op ((program), (name), (thread), (const guint8[]) { __VA_ARGS__ }, \
          sizeof ((const guint8[]) { __VA_ARGS__ }))
#define OP0(program, name, thread) add_op ((program), (name), (thread), NULL, 0)

/* Flags of the header's sixth byte. */
#define CONTEXT_LOOP     0x02
#define CONTEXT_ITERATE  0x03
#define KEY_STATES       0x04
#define MAIN_KEEPS_REF   0x08
#define LAST_WAITS       0x10
#define OWN_CANCELLABLE  0x20
#define SHARED_CANCEL    0x40
/* ... and of the seventh */
#define PRE_CANCELLED    0x1f
#define NO_DONE          0xe0

/* 2 workers, capacity 1: three threads block on the bound with long jobs
 * of two keys and unkeyed ones, the fourth cancels, then submits again. */
static GByteArray *
program_cancel_blocked (void)
{
  GByteArray *p = g_byte_array_new ();

  HEADER (p, 1, 0, 0, 3, 1, OWN_CANCELLABLE | LAST_WAITS, 0);
  OP (p, "submit", 0, 0, 3, 0, 15);
  OP (p, "submit", 1, 1, 3, 0, 15);
  OP (p, "submit", 2, 2, 3, 3, 15);
  OP0 (p, "cancel", 3);
  OP (p, "submit", 3, 0, 0, 0, 0);
  return p;
}

/* Three threads submit to one key with a loop context and key states; one
 * drops its reference at once, the last of the other two is the last. */
static GByteArray *
program_unref_while_submitting (void)
{
  GByteArray *p = g_byte_array_new ();

  HEADER (p, 2, 1, 2, 2, 0, CONTEXT_LOOP | KEY_STATES, 0);
  OP0 (p, "unref", 0);
  OP (p, "submit", 1, 0, 2, 0, 15);
  OP (p, "submit", 2, 0, 2, 0, 15);
  OP0 (p, "unref", 1);
  OP (p, "submit", 2, 0, 1, 0, 15);
  OP0 (p, "unref", 2);
  return p;
}

/* 1 worker, capacity 2, an iterated context: try_submit and timed submits
 * find the bound reached, then a close refuses them all. */
static GByteArray *
program_close_full_iterate (void)
{
  GByteArray *p = g_byte_array_new ();

  HEADER (p, 0, 0, 1, 1, 2, CONTEXT_ITERATE, 0);
  OP (p, "submit", 0, 0, 3, 0, 15);
  OP (p, "try_submit", 1, 1, 0, 0, 15);
  OP (p, "submit_timeout", 1, 2, 0, 0, 7, 0);
  OP0 (p, "iterate", 1);
  OP0 (p, "close", 0);
  OP (p, "submit_timeout", 1, 3, 0, 0, 7, 3);
  OP0 (p, "wait", 1);
  OP0 (p, "iterate", 0);
  return p;
}

/* Two threads cancel a cancellable that another user shares (its handler
 * runs first and takes a while) while two others keep submitting: a submit
 * after either cancel returned must be refused, even while the other is
 * still emitting ::cancelled. */
static GByteArray *
program_cancel_twice_shared (void)
{
  GByteArray *p = g_byte_array_new ();

  HEADER (p, 2, 1, 6, 3, 2, OWN_CANCELLABLE | SHARED_CANCEL, 0);
  OP (p, "submit", 2, 0, 0, 0, 15);
  OP (p, "submit", 3, 1, 0, 0, 15);
  OP0 (p, "cancel", 0);
  OP0 (p, "cancel", 1);
  OP (p, "submit", 1, 2, 0, 0, 15);
  OP (p, "try_submit", 0, 0, 0, 0, 15);
  OP (p, "submit", 2, 1, 0, 0, 15);
  OP (p, "submit", 3, 0, 0, 0, 15);
  OP0 (p, "wait", 3);
  return p;
}

/* A cancellable cancelled before the first submit, no done callback. */
static GByteArray *
program_pre_cancelled (void)
{
  GByteArray *p = g_byte_array_new ();

  HEADER (p, 1, 1, 7, 1, 3, OWN_CANCELLABLE, PRE_CANCELLED | NO_DONE);
  OP (p, "submit", 0, 0, 0, 0, 3);
  OP (p, "try_submit", 1, 1, 0, 0, 3);
  OP0 (p, "wait", 0);
  OP0 (p, "stats", 1);
  return p;
}

/* The main thread keeps its reference and waits last; the others wait
 * and read stats while failing jobs of every key run. */
static GByteArray *
program_main_waits_last (void)
{
  GByteArray *p = g_byte_array_new ();

  HEADER (p, 5, 3, 3, 2, 7, MAIN_KEEPS_REF | KEY_STATES, 0);
  OP (p, "submit", 0, 0, 2, 7, 15);
  OP (p, "submit", 1, 8, 2, 6, 15);
  OP0 (p, "wait", 2);
  OP (p, "try_submit", 2, 3, 1, 5, 15);
  OP0 (p, "stats", 0);
  OP (p, "submit", 1, 3, 3, 4, 15);
  OP0 (p, "wait", 0);
  OP0 (p, "stats", 2);
  return p;
}

/* Bits of the eighth (features) byte; the ninth sets the retry (attempts
 * 2 + b % 3, delay class b >> 2; b & 0xe0 == 0xe0 with RETRY_HUGE: a delay
 * only a cancel ends), the tenth the key capacity (1 + b % 4) and idle
 * time class (b >> 2). */
#define RETRY            0x02
#define RETRY_HUGE       0x03
#define DEAD_LETTER      0x04
#define PARK             0x08
#define KEY_CAPACITY     0x10
#define IDLE_TIME        0x20
#define WORKER_FUNCS     0x40
#define START            0x80
/* fail rate indexes of the submits (fail_rates[] of kd-model-ops.c) */
#define FAIL_ALL         7
#define FAIL_HALF        6

/* PARK with retries: key 0's items fail every attempt and park it, from
 * two threads that resume, drop and list the key while key 1 runs on; a
 * key capacity of 2 blocks the submits behind the parked key until the
 * done callbacks or the janitor resolve it. */
static GByteArray *
program_park_resume_drop (void)
{
  GByteArray *p = g_byte_array_new ();

  HEADER10 (p, 1, 0, 7, 1, 1, KEY_STATES | LAST_WAITS, 0,
            RETRY | DEAD_LETTER | PARK | KEY_CAPACITY | WORKER_FUNCS | START, 0x04, 0x01);
  OP (p, "submit", 0, 0, 0, FAIL_ALL, 3);
  OP (p, "submit", 1, 1, 2, FAIL_HALF, 7);
  OP (p, "resume", 1, 0, 0);
  OP0 (p, "parked", 1);
  OP (p, "submit", 0, 0, 1, FAIL_HALF, 5);
  OP (p, "resume", 1, 0, 1);
  OP0 (p, "wait", 0);
  OP (p, "resume", 0, 0, 0);
  OP0 (p, "stats", 1);
  return p;
}

/* A retry delay of 30 s: the wait ends when the janitor cancels; the
 * waiting retries end CANCELLED, the submit after it is refused. */
static GByteArray *
program_retry_huge_cancel (void)
{
  GByteArray *p = g_byte_array_new ();

  HEADER10 (p, 2, 1, 7, 1, 1, KEY_STATES, 0, RETRY_HUGE | DEAD_LETTER | IDLE_TIME, 0xe1, 0x04);
  OP (p, "submit", 0, 0, 0, FAIL_ALL, 2);
  OP (p, "submit", 1, 2, 0, FAIL_HALF, 7);
  OP0 (p, "wait", 0);
  OP (p, "submit", 0, 1, 0, 0, 0);
  OP0 (p, "stats", 1);
  return p;
}

typedef struct
{
  const char  *name;
  GByteArray *(*build) (void);
} FixedProgram;

static void
test_programs (void)
{
  static const FixedProgram programs[] = {
    { "cancel-blocked", program_cancel_blocked },
    { "unref-while-submitting", program_unref_while_submitting },
    { "close-full-iterate", program_close_full_iterate },
    { "pre-cancelled", program_pre_cancelled },
    { "cancel-twice-shared", program_cancel_twice_shared },
    { "main-waits-last", program_main_waits_last },
    { "park-resume-drop", program_park_resume_drop },
    { "retry-huge-cancel", program_retry_huge_cancel },
  };
  guint repeat = kd_test_size (20, 500);
  guint i, r;

  g_test_summary ("Hand-written programs for what random bytes rarely reach: a cancel "
                  "with submitters blocked on a full bound, the last unref while other "
                  "threads submit, closing while full, a cancellable cancelled before "
                  "the first submit, two cancels of a shared cancellable, the main "
                  "thread's last unref after a wait, parked keys resumed and dropped "
                  "from threads and done callbacks, a retry only a cancel ends");

  for (i = 0; i < G_N_ELEMENTS (programs); i++)
    {
      GByteArray *bytes = programs[i].build ();
      gboolean ok = TRUE;

      for (r = 0; r < repeat && ok; r++)
        ok = run_program (bytes->data, bytes->len, programs[i].name, NULL);
      g_byte_array_unref (bytes);
      if (!ok)
        return;
    }
}

int
main (int    argc,
      char **argv)
{
  const char *seed = g_getenv ("KD_MODEL_SEED");
  int i;

  g_test_init (&argc, &argv, NULL);

  kd_model_quiet_debug ();

  for (i = 1; i < argc; i++)
    if (g_str_has_prefix (argv[i], "--seed="))
      seed = argv[i] + strlen ("--seed=");

  if (seed != NULL && *seed != '\0')
    {
      replay_seed = g_ascii_strtoull (seed, NULL, 10);
      g_test_add_func ("/kd/model/replay", test_replay);
    }
  else
    {
      g_test_add_func ("/kd/model/programs", test_programs);
      g_test_add_func ("/kd/model/seeds", test_seeds);
    }

  return g_test_run ();
}
