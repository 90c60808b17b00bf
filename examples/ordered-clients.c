/* ordered-clients.c: many clients, each one's messages handled in order
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * A service receives messages from many clients. Each client's messages must
 * be handled in the order they arrived (a client's "deposit" must not
 * overtake its "open account"), while different clients are served in
 * parallel. Alongside, unkeyed background work (think thumbnails or
 * checksums) fans out over every worker.
 *
 * Each message is keyed by its client's name: kdispatch runs one message per
 * client at a time, in order, on a bounded set of threads. The handler
 * checks the order itself, so the summary proves it.
 */

#include <kdispatch/kdispatch.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct
{
  guint   client;
  guint   seq;      /* position in the client's stream */
  guint64 payload;
} Message;

typedef struct
{
  guint    next_seq;  /* only the client's current message touches this */
  guint64  balance;
} ClientState;

typedef struct
{
  ClientState *clients;
  gint         out_of_order;
  gint         background_done;
  guint64      background_sum;
} Service;

static gboolean
handle_job (KdJob    *job,
            gpointer  user_data,
            GError  **error)
{
  Service *service = user_data;
  Message *message = kd_job_get_item (job);

  if (kd_job_get_key (job) == NULL)
    {
      /* Background work: a checksum of the payload. */
      guint64 x = message->payload;
      guint i;

      for (i = 0; i < 200; i++)
        x = x * 6364136223846793005u + 1442695040888963407u;
      __atomic_fetch_add (&service->background_sum, x >> 32, __ATOMIC_RELAXED);
      g_atomic_int_inc (&service->background_done);
      return TRUE;
    }

  /* No lock: kdispatch never runs two messages of one client at once. */
  ClientState *state = &service->clients[message->client];

  if (message->seq != state->next_seq)
    g_atomic_int_inc (&service->out_of_order);
  state->next_seq = message->seq + 1;
  state->balance += message->payload;

  return TRUE;
}

static gboolean
submit_message (KdDispatcher *dispatcher,
                const char   *key,
                guint         client,
                guint         seq,
                guint64       payload)
{
  g_autoptr(GError) error = NULL;
  Message *message = g_new (Message, 1);

  message->client = client;
  message->seq = seq;
  message->payload = payload;

  /* On success the dispatcher owns the message and frees it when done. */
  if (!kd_dispatcher_submit (dispatcher, key, message, &error))
    {
      g_printerr ("submit failed: %s\n", error->message);
      g_free (message);
      return FALSE;
    }

  return TRUE;
}

int
main (int    argc,
      char **argv)
{
  gint n_clients = 2000;
  gint n_messages = 500;
  gint n_background = 200000;
  gint n_workers = 0;
  gint fanout = 2;
  GOptionEntry entries[] = {
    { "clients", 'c', 0, G_OPTION_ARG_INT, &n_clients, "Number of clients", "N" },
    { "messages", 'm', 0, G_OPTION_ARG_INT, &n_messages, "Messages per client", "N" },
    { "background", 'b', 0, G_OPTION_ARG_INT, &n_background, "Unkeyed background jobs", "N" },
    { "workers", 'w', 0, G_OPTION_ARG_INT, &n_workers, "Worker threads (0: one per processor)", "N" },
    { "fanout", 'f', 0, G_OPTION_ARG_INT, &fanout, "Worker groups", "N" },
    { NULL },
  };
  g_autoptr(GOptionContext) options = g_option_context_new ("- per-client ordered handling with kdispatch");
  g_autoptr(GError) error = NULL;
  g_autoptr(KdDispatcher) dispatcher = NULL;
  Service service = { 0 };
  char **names;
  guint64 total_messages;
  gint64 start, elapsed;
  KdStats stats;
  gint c, m, b;

  g_option_context_add_main_entries (options, entries, NULL);
  if (!g_option_context_parse (options, &argc, &argv, &error))
    {
      g_printerr ("%s\n", error->message);
      return EXIT_FAILURE;
    }
  if (n_clients < 1 || n_messages < 0 || n_background < 0 || n_workers < 0 || fanout < 1)
    {
      g_printerr ("Counts must not be negative, and clients and fanout at least 1\n");
      return EXIT_FAILURE;
    }

  service.clients = g_new0 (ClientState, n_clients);
  names = g_new (char *, n_clients);
  for (c = 0; c < n_clients; c++)
    names[c] = g_strdup_printf ("client-%d", c);

  dispatcher = kd_dispatcher_new ((guint) n_workers, handle_job, &service, NULL);
  kd_dispatcher_set_fanout (dispatcher, (guint) fanout);
  kd_dispatcher_set_capacity (dispatcher, 4096);
  kd_dispatcher_set_item_free (dispatcher, g_free);

  /* Messages arrive interleaved across clients, with background work mixed
   * in, as they would from a network. */
  start = g_get_monotonic_time ();
  b = 0;
  for (m = 0; m < n_messages; m++)
    for (c = 0; c < n_clients; c++)
      {
        if (!submit_message (dispatcher, names[c], (guint) c, (guint) m,
                             (guint64) c * 1000003u + (guint64) m))
          return EXIT_FAILURE;

        if (b < n_background && (m * n_clients + c) % 8 == 0 &&
            !submit_message (dispatcher, NULL, 0, 0, (guint64) b++))
          return EXIT_FAILURE;
      }
  for (; b < n_background; b++)
    if (!submit_message (dispatcher, NULL, 0, 0, (guint64) b))
      return EXIT_FAILURE;
  kd_dispatcher_wait (dispatcher);
  elapsed = g_get_monotonic_time () - start;

  kd_dispatcher_get_stats (dispatcher, &stats);
  total_messages = (guint64) n_clients * (guint64) n_messages;

  g_print ("kdispatch ordered-clients\n");
  g_print ("  workers              %u (%u worker groups), capacity %u\n",
           kd_dispatcher_get_n_workers (dispatcher), kd_dispatcher_get_fanout (dispatcher),
           kd_dispatcher_get_capacity (dispatcher));
  g_print ("  clients              %d\n", n_clients);
  g_print ("  keyed messages       %" G_GUINT64_FORMAT " (%d per client)\n",
           total_messages, n_messages);
  g_print ("  out of order         %d\n", service.out_of_order);
  g_print ("  background jobs      %d\n", service.background_done);
  g_print ("  jobs completed       %" G_GUINT64_FORMAT " (failed %" G_GUINT64_FORMAT
           ", cancelled %" G_GUINT64_FORMAT ", pending %" G_GUINT64_FORMAT ")\n",
           stats.completed, stats.failed, stats.cancelled, stats.pending);
  g_print ("  live keys after wait %u\n", stats.live_keys);
  g_print ("  elapsed              %.3f s\n", elapsed / 1e6);
  g_print ("  throughput           %.2f M jobs/s\n",
           (double) stats.completed / (double) MAX (elapsed, 1));

  for (c = 0; c < n_clients; c++)
    {
      if (service.clients[c].next_seq != (guint) n_messages)
        {
          g_printerr ("client %d handled %u of %d messages\n", c,
                      service.clients[c].next_seq, n_messages);
          return EXIT_FAILURE;
        }
      g_free (names[c]);
    }
  g_free (names);
  g_free (service.clients);

  if (service.out_of_order != 0 || stats.completed != total_messages + (guint64) n_background ||
      stats.live_keys != 0)
    {
      g_printerr ("FAILED: order or accounting broken\n");
      return EXIT_FAILURE;
    }

  g_print ("  OK: every client's messages were handled in order\n");
  return EXIT_SUCCESS;
}
