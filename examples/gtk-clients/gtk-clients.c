/* gtk-clients.c: hundreds of clients' messages, handled in per-client order
 * behind a GTK window that stays responsive
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A producer thread plays the network: a few hundred simulated clients each
 * send a stream of numbered messages, interleaved at random. Every message
 * is submitted to a KdDispatcher keyed by its client, so a client's messages
 * are handled one at a time, in order, while the clients run in parallel on
 * a few worker threads. The producer blocks at the dispatcher's bound, so
 * memory stays flat however fast it is; the main thread never blocks.
 *
 * The done callbacks run on the GTK main loop (kd_dispatcher_set_main_context)
 * in per-client order: each one moves its client's row on, so the list
 * shows every client's progress as it happens. The status line is bound to
 * the dispatcher's counters, whose ::notify arrives on the main loop too.
 *
 * Cancel cancels the dispatcher's cancellable: the producer's blocked submit
 * is refused, every queued message is handed back through the done
 * callback, and the window shows how many were.
 *
 * Checks: the handler verifies each client's sequence on the worker side,
 * the done callback on the main side, and the end of a run compares the
 * window's counts with the dispatcher's. `--run-and-quit` runs one workload
 * without a click, prints the counts and exits non-zero if a check failed;
 * the test does that under Xvfb.
 */

#include <gtk/gtk.h>
#include <kdispatch/kdispatch.h>
#include <stdio.h>
#include <sys/resource.h>

#include "client-row.h"

typedef struct
{
  guint client;
  guint seq;      /* position in the client's stream */
} Message;

typedef struct
{
  guint   next_seq;  /* worker side: only the client's current message touches it */
  guint64 digest;
} ClientState;

typedef struct _Demo Demo;

/* One run of the workload, from Start until every message sent was
 * delivered. The producer thread holds a reference until it reported back. */
typedef struct
{
  Demo         *demo;
  KdDispatcher *dispatcher;
  GThread      *producer;
  guint         n_clients;
  char        **names;       /* the clients' keys */
  guint        *planned;     /* messages each client sends */
  ClientRow   **rows;
  ClientState  *states;
  guint         work;

  /* Written by the producer, read on the main thread once it reported */
  guint64      *sent;        /* per client: accepted by the dispatcher */
  guint64       submitted;
  guint64       never_sent;

  /* Workers */
  gint          out_of_order;

  /* Pacing: the producer keeps at most @window messages sent and not yet
   * shown, so a window slower than the workers slows the producer down
   * instead of piling results up in memory */
  GMutex        pace_lock;
  GCond         pace_cond;
  guint64       window;
  guint64       shown;       /* under @pace_lock */
  guint64       wake_at;     /* under @pace_lock: when the producer waits, the
                              * @shown count that lets it go on */
  gboolean      stop;        /* under @pace_lock */

  /* Main thread */
  gboolean      producer_done;
  gboolean      cancelled;
  gboolean      finishing;
  guint64       completed;
  guint64       failed;
  guint64       handed_back;
  guint64       delivered_out_of_order;
  gint64        started_us;
  gint64        ended_us;
  gint64        last_frame_us;
  gint64        longest_frame_gap_us;
  guint64       frames;
} Run;

struct _Demo
{
  GtkApplication *app;
  GtkWindow      *window;
  GListStore     *rows;
  GtkWidget      *start_button;
  GtkWidget      *cancel_button;
  GtkWidget      *status_label;
  GtkWidget      *result_label;
  Run            *run;
  gboolean        quit_after_run;
  int             exit_status;

  /* Options */
  int             n_clients;
  int             n_jobs;
  int             n_workers;
  int             capacity;
  int             work;
  gboolean        run_and_quit;
  int             cancel_after;
};

/* ------------------------------------------------------------------------ */
/* Worker side                                                              */

static gboolean
handle_message (KdJob    *job,
                gpointer  user_data,
                GError  **error)
{
  Run *run = user_data;
  Message *msg = kd_job_get_item (job);
  ClientState *state = &run->states[msg->client];
  guint64 h = 1469598103934665603ull ^ msg->seq;
  guint i;

  /* One message per client at a time: no lock on the client's state. */
  if (msg->seq != state->next_seq)
    g_atomic_int_inc (&run->out_of_order);
  state->next_seq = msg->seq + 1;

  for (i = 0; i < run->work; i++)
    h = (h ^ (i + msg->client)) * 1099511628211ull;
  state->digest ^= h;

  return TRUE;
}

static void run_unref (Run *run);
static void maybe_finish (Run *run);

/* On the main thread; the producer may report after the last delivery. */
static gboolean
producer_finished (gpointer user_data)
{
  Run *run = user_data;

  run->producer_done = TRUE;
  maybe_finish (run);
  return G_SOURCE_REMOVE;
}

/* The network: rounds in which every client that still has messages sends
 * its next one, in a random order each round. */
static gpointer
produce (gpointer user_data)
{
  Run *run = user_data;
  GRand *rand = g_rand_new_with_seed (42);
  guint *order = g_new (guint, run->n_clients);
  guint max_planned = 0;
  guint64 tried = 0, total = 0;
  guint seq, i;

  for (i = 0; i < run->n_clients; i++)
    {
      order[i] = i;
      max_planned = MAX (max_planned, run->planned[i]);
      total += run->planned[i];
    }

  for (seq = 0; seq < max_planned; seq++)
    {
      for (i = run->n_clients - 1; i > 0; i--)
        {
          guint j = g_rand_int_range (rand, 0, (gint32) i + 1);
          guint swap = order[i];

          order[i] = order[j];
          order[j] = swap;
        }

      for (i = 0; i < run->n_clients; i++)
        {
          guint client = order[i];
          g_autoptr(GError) error = NULL;
          Message *msg;

          if (seq >= run->planned[client])
            continue;

          /* At the window's edge, wait until half of it was shown. */
          g_mutex_lock (&run->pace_lock);
          if (tried - run->shown >= run->window)
            {
              run->wake_at = tried - run->window / 2;
              while (run->shown < run->wake_at && !run->stop)
                g_cond_wait (&run->pace_cond, &run->pace_lock);
              run->wake_at = 0;
            }
          g_mutex_unlock (&run->pace_lock);

          msg = g_new (Message, 1);
          msg->client = client;
          msg->seq = seq;
          tried++;
          if (!kd_dispatcher_submit (run->dispatcher, run->names[client], msg, &error))
            {
              /* Refused (the run was cancelled): the message is still ours. */
              g_free (msg);
              tried--;
              goto out;
            }
          run->sent[client]++;
        }
    }

out:
  run->submitted = tried;
  run->never_sent = total - tried;
  g_free (order);
  g_rand_free (rand);

  g_main_context_invoke_full (NULL, G_PRIORITY_DEFAULT, producer_finished, run,
                              (GDestroyNotify) run_unref);
  return NULL;
}

/* ------------------------------------------------------------------------ */
/* Main thread                                                              */

static void
run_clear (Run *run)
{
  guint i;

  for (i = 0; i < run->n_clients; i++)
    {
      g_free (run->names[i]);
      g_object_unref (run->rows[i]);
    }
  g_free (run->names);
  g_free (run->planned);
  g_free (run->rows);
  g_free (run->states);
  g_free (run->sent);
  g_mutex_clear (&run->pace_lock);
  g_cond_clear (&run->pace_cond);
}

static Run *
run_ref (Run *run)
{
  return g_atomic_rc_box_acquire (run);
}

static void
run_unref (Run *run)
{
  g_atomic_rc_box_release_full (run, (GDestroyNotify) run_clear);
}

static void
set_label (GtkWidget  *label,
           const char *format,
           ...) G_GNUC_PRINTF (2, 3);

static void
set_label (GtkWidget  *label,
           const char *format,
           ...)
{
  g_autofree char *text = NULL;
  va_list args;

  va_start (args, format);
  text = g_strdup_vprintf (format, args);
  va_end (args);
  gtk_label_set_text (GTK_LABEL (label), text);
}

/* The dispatcher's counters notify on the main loop, at most every 100 ms. */
static void
on_counters_changed (KdDispatcher *dispatcher,
                     GParamSpec   *pspec,
                     gpointer      user_data)
{
  Demo *demo = user_data;
  KdStats stats;

  kd_dispatcher_get_stats (dispatcher, &stats);
  set_label (demo->status_label,
             "%u clients · submitted %" G_GUINT64_FORMAT " · completed %" G_GUINT64_FORMAT
             " · handed back %" G_GUINT64_FORMAT " · pending %" G_GUINT64_FORMAT
             " · running %u · live keys %u",
             demo->run != NULL ? demo->run->n_clients : 0,
             stats.submitted, stats.completed, stats.cancelled, stats.pending,
             stats.running, stats.live_keys);
}

static gboolean
on_tick (GtkWidget     *widget,
         GdkFrameClock *clock,
         gpointer       user_data)
{
  Demo *demo = user_data;
  Run *run = demo->run;
  gint64 now = g_get_monotonic_time ();

  if (run == NULL || run->ended_us != 0)
    return G_SOURCE_CONTINUE;

  if (run->last_frame_us != 0)
    run->longest_frame_gap_us = MAX (run->longest_frame_gap_us, now - run->last_frame_us);
  run->last_frame_us = now;
  run->frames++;

  return G_SOURCE_CONTINUE;
}

static gboolean
run_checks_pass (Run     *run,
                 KdStats *stats)
{
  guint64 sent = 0;
  gboolean ok = TRUE;
  guint i;

  for (i = 0; i < run->n_clients; i++)
    {
      guint done = client_row_get_done (run->rows[i]);
      guint returned = client_row_get_returned (run->rows[i]);

      sent += run->sent[i];
      ok &= done + returned == run->sent[i];
      ok &= run->cancelled || done == run->planned[i];
    }

  ok &= sent == run->submitted;
  ok &= run->out_of_order == 0 && run->delivered_out_of_order == 0;
  ok &= run->completed + run->failed + run->handed_back == run->submitted;
  ok &= stats->submitted == run->submitted && stats->completed == run->completed &&
        stats->failed == run->failed && stats->cancelled == run->handed_back &&
        stats->pending == 0 && stats->live_keys == 0;
  ok &= run->cancelled || run->never_sent == 0;

  return ok;
}

static void
print_run (Run     *run,
           gboolean ok)
{
  struct rusage usage;

  getrusage (RUSAGE_SELF, &usage);
  printf ("clients=%u\n", run->n_clients);
  printf ("planned=%" G_GUINT64_FORMAT "\n", run->submitted + run->never_sent);
  printf ("submitted=%" G_GUINT64_FORMAT "\n", run->submitted);
  printf ("completed=%" G_GUINT64_FORMAT "\n", run->completed);
  printf ("failed=%" G_GUINT64_FORMAT "\n", run->failed);
  printf ("handed-back=%" G_GUINT64_FORMAT "\n", run->handed_back);
  printf ("never-sent=%" G_GUINT64_FORMAT "\n", run->never_sent);
  printf ("cancelled=%s\n", run->cancelled ? "yes" : "no");
  printf ("out-of-order=%" G_GUINT64_FORMAT "\n",
          (guint64) run->out_of_order + run->delivered_out_of_order);
  printf ("frames=%" G_GUINT64_FORMAT "\n", run->frames);
  printf ("longest-frame-gap-ms=%.1f\n", run->longest_frame_gap_us / 1000.0);
  printf ("seconds=%.2f\n", (run->ended_us - run->started_us) / 1e6);
  printf ("peak-rss-mib=%.1f\n", usage.ru_maxrss / 1024.0);
  printf ("checks=%s\n", ok ? "passed" : "FAILED");
  fflush (stdout);
}

/* When the last message sent was delivered: the dispatcher goes (its last
 * unref joins the workers), the window shows the outcome. */
static gboolean
finish_run (gpointer user_data)
{
  Demo *demo = user_data;
  Run *run = g_steal_pointer (&demo->run);
  gboolean ok;
  KdStats stats;

  run->ended_us = g_get_monotonic_time ();
  g_thread_join (g_steal_pointer (&run->producer));
  kd_dispatcher_get_stats (run->dispatcher, &stats);
  g_signal_handlers_disconnect_by_data (run->dispatcher, demo);
  g_clear_object (&run->dispatcher);

  ok = run_checks_pass (run, &stats);
  if (run->cancelled)
    set_label (demo->result_label,
               "Cancelled: %" G_GUINT64_FORMAT " messages handled, %" G_GUINT64_FORMAT
               " handed back, %" G_GUINT64_FORMAT " never sent. %s",
               run->completed, run->handed_back, run->never_sent,
               ok ? "Nothing lost, every client in order." : "CHECKS FAILED.");
  else
    set_label (demo->result_label,
               "Done: %" G_GUINT64_FORMAT " messages from %u clients in %.2f s, "
               "longest frame gap %.0f ms. %s",
               run->completed, run->n_clients, (run->ended_us - run->started_us) / 1e6,
               run->longest_frame_gap_us / 1000.0,
               ok ? "Every client in order." : "CHECKS FAILED.");
  set_label (demo->status_label,
             "%u clients · submitted %" G_GUINT64_FORMAT " · completed %" G_GUINT64_FORMAT
             " · handed back %" G_GUINT64_FORMAT,
             run->n_clients, stats.submitted, stats.completed, stats.cancelled);

  if (demo->run_and_quit)
    print_run (run, ok);
  if (!ok)
    demo->exit_status = 1;

  gtk_widget_set_sensitive (demo->start_button, TRUE);
  gtk_widget_set_sensitive (demo->cancel_button, FALSE);
  run_unref (run);

  if (demo->quit_after_run)
    gtk_window_destroy (demo->window);

  return G_SOURCE_REMOVE;
}

static void
maybe_finish (Run *run)
{
  if (!run->finishing && run->producer_done &&
      run->completed + run->failed + run->handed_back == run->submitted)
    {
      run->finishing = TRUE;
      g_idle_add (finish_run, run->demo);
    }
}

static void
cancel_run (Demo *demo)
{
  if (demo->run == NULL || demo->run->cancelled)
    return;

  demo->run->cancelled = TRUE;
  g_mutex_lock (&demo->run->pace_lock);
  demo->run->stop = TRUE;
  g_cond_signal (&demo->run->pace_cond);
  g_mutex_unlock (&demo->run->pace_lock);
  gtk_widget_set_sensitive (demo->cancel_button, FALSE);
  set_label (demo->result_label, "Cancelling…");
  g_cancellable_cancel (kd_dispatcher_get_cancellable (demo->run->dispatcher));
}

/* In the main loop, in per-client order, once per message sent. */
static void
on_message_done (KdJob        *job,
                 const GError *error,
                 gpointer      user_data)
{
  Run *run = user_data;
  Message *msg = kd_job_get_item (job);
  ClientRow *row = run->rows[msg->client];
  guint done = client_row_get_done (row);
  guint returned = client_row_get_returned (row);

  if (msg->seq != done + returned)
    run->delivered_out_of_order++;

  if (error == NULL)
    {
      run->completed++;
      client_row_set_done (row, done + 1);
    }
  else if (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
    {
      run->handed_back++;
      client_row_set_returned (row, returned + 1);
    }
  else
    {
      run->failed++;
    }

  g_mutex_lock (&run->pace_lock);
  if (++run->shown == run->wake_at)
    g_cond_signal (&run->pace_cond);
  g_mutex_unlock (&run->pace_lock);

  if (run->demo->cancel_after > 0 && run->completed == (guint64) run->demo->cancel_after)
    g_signal_emit_by_name (run->demo->cancel_button, "clicked");  /* as a click would */

  maybe_finish (run);
}

static void
start_run (Demo *demo)
{
  Run *run = g_atomic_rc_box_new0 (Run);
  guint n = (guint) demo->n_clients;
  g_autoptr(GPtrArray) rows = g_ptr_array_new ();
  guint i;

  run->demo = demo;
  run->n_clients = n;
  run->work = (guint) demo->work;
  run->names = g_new0 (char *, n);
  run->planned = g_new0 (guint, n);
  run->rows = g_new0 (ClientRow *, n);
  run->states = g_new0 (ClientState, n);
  run->sent = g_new0 (guint64, n);
  g_mutex_init (&run->pace_lock);
  g_cond_init (&run->pace_cond);
  run->window = 2 * (guint64) demo->capacity;

  for (i = 0; i < n; i++)
    {
      run->names[i] = g_strdup_printf ("client-%03u", i);
      run->planned[i] = (guint) demo->n_jobs / n + (i < (guint) demo->n_jobs % n);
      run->rows[i] = client_row_new (run->names[i], run->planned[i]);
      g_ptr_array_add (rows, run->rows[i]);
    }
  g_list_store_splice (demo->rows, 0, g_list_model_get_n_items (G_LIST_MODEL (demo->rows)),
                       rows->pdata, rows->len);

  run->dispatcher = kd_dispatcher_new ((guint) demo->n_workers, handle_message, run, NULL);
  kd_dispatcher_set_name (run->dispatcher, "gtk-clients");
  kd_dispatcher_set_capacity (run->dispatcher, (guint) demo->capacity);
  kd_dispatcher_set_item_free (run->dispatcher, g_free);
  kd_dispatcher_set_main_context (run->dispatcher, g_main_context_default ());
  kd_dispatcher_set_done_func (run->dispatcher, on_message_done, run, NULL);
  g_signal_connect (run->dispatcher, "notify", G_CALLBACK (on_counters_changed), demo);

  demo->run = run;
  gtk_widget_set_sensitive (demo->start_button, FALSE);
  gtk_widget_set_sensitive (demo->cancel_button, TRUE);
  set_label (demo->result_label, "Running %d messages from %u clients on %u workers…",
             demo->n_jobs, n, kd_dispatcher_get_n_workers (run->dispatcher));

  run->started_us = g_get_monotonic_time ();
  run->producer = g_thread_new ("producer", produce, run_ref (run));
}

static void
on_start_clicked (GtkButton *button,
                  gpointer   user_data)
{
  start_run (user_data);
}

static void
on_cancel_clicked (GtkButton *button,
                   gpointer   user_data)
{
  cancel_run (user_data);
}

/* Closing the window while a run goes on cancels it; the window goes once
 * everything was handed back. */
static gboolean
on_close_request (GtkWindow *window,
                  gpointer   user_data)
{
  Demo *demo = user_data;

  if (demo->run == NULL)
    return FALSE;

  demo->quit_after_run = TRUE;
  cancel_run (demo);
  return TRUE;
}

/* ------------------------------------------------------------------------ */
/* The list                                                                 */

typedef struct
{
  GtkWidget *name;
  GtkWidget *bar;
  GtkWidget *count;
} RowWidgets;

static void
update_row_widgets (ClientRow  *row,
                    GParamSpec *pspec,
                    gpointer    user_data)
{
  RowWidgets *widgets = user_data;
  guint planned = client_row_get_planned (row);
  guint done = client_row_get_done (row);
  guint returned = client_row_get_returned (row);

  gtk_progress_bar_set_fraction (GTK_PROGRESS_BAR (widgets->bar),
                                 planned > 0 ? (double) done / planned : 0.0);
  if (returned > 0)
    set_label (widgets->count, "%u / %u · %u handed back", done, planned, returned);
  else
    set_label (widgets->count, "%u / %u", done, planned);
}

static void
setup_row (GtkSignalListItemFactory *factory,
           GtkListItem              *item,
           gpointer                  user_data)
{
  GtkWidget *box = gtk_box_new (GTK_ORIENTATION_HORIZONTAL, 12);
  RowWidgets *widgets = g_new0 (RowWidgets, 1);

  widgets->name = gtk_label_new (NULL);
  gtk_label_set_xalign (GTK_LABEL (widgets->name), 0.0);
  gtk_label_set_width_chars (GTK_LABEL (widgets->name), 11);
  widgets->bar = gtk_progress_bar_new ();
  gtk_widget_set_hexpand (widgets->bar, TRUE);
  gtk_widget_set_valign (widgets->bar, GTK_ALIGN_CENTER);
  widgets->count = gtk_label_new (NULL);
  gtk_label_set_xalign (GTK_LABEL (widgets->count), 1.0);
  gtk_label_set_width_chars (GTK_LABEL (widgets->count), 30);
  gtk_widget_add_css_class (widgets->count, "numeric");

  gtk_box_append (GTK_BOX (box), widgets->name);
  gtk_box_append (GTK_BOX (box), widgets->bar);
  gtk_box_append (GTK_BOX (box), widgets->count);
  gtk_widget_set_margin_start (box, 6);
  gtk_widget_set_margin_end (box, 6);
  gtk_list_item_set_child (item, box);
  g_object_set_data_full (G_OBJECT (item), "row-widgets", widgets, g_free);
}

static void
bind_row (GtkSignalListItemFactory *factory,
          GtkListItem              *item,
          gpointer                  user_data)
{
  ClientRow *row = gtk_list_item_get_item (item);
  RowWidgets *widgets = g_object_get_data (G_OBJECT (item), "row-widgets");

  gtk_label_set_text (GTK_LABEL (widgets->name), client_row_get_name (row));
  update_row_widgets (row, NULL, widgets);
  g_signal_connect (row, "notify::done", G_CALLBACK (update_row_widgets), widgets);
  g_signal_connect (row, "notify::returned", G_CALLBACK (update_row_widgets), widgets);
}

static void
unbind_row (GtkSignalListItemFactory *factory,
            GtkListItem              *item,
            gpointer                  user_data)
{
  ClientRow *row = gtk_list_item_get_item (item);
  RowWidgets *widgets = g_object_get_data (G_OBJECT (item), "row-widgets");

  g_signal_handlers_disconnect_by_data (row, widgets);
}

static GtkWidget *
client_list_new (Demo *demo)
{
  GtkListItemFactory *factory = gtk_signal_list_item_factory_new ();
  GtkNoSelection *selection;
  GtkWidget *list, *scrolled;

  g_signal_connect (factory, "setup", G_CALLBACK (setup_row), demo);
  g_signal_connect (factory, "bind", G_CALLBACK (bind_row), demo);
  g_signal_connect (factory, "unbind", G_CALLBACK (unbind_row), demo);

  selection = gtk_no_selection_new (G_LIST_MODEL (g_object_ref (demo->rows)));
  list = gtk_list_view_new (GTK_SELECTION_MODEL (selection), factory);

  scrolled = gtk_scrolled_window_new ();
  gtk_scrolled_window_set_child (GTK_SCROLLED_WINDOW (scrolled), list);
  gtk_widget_set_vexpand (scrolled, TRUE);

  return scrolled;
}

/* ------------------------------------------------------------------------ */
/* The application                                                          */

static void
on_activate (GApplication *app,
             gpointer      user_data)
{
  Demo *demo = user_data;
  GtkWidget *header, *box;

  demo->window = GTK_WINDOW (gtk_application_window_new (GTK_APPLICATION (app)));
  gtk_window_set_title (demo->window, "kdispatch: clients in order");
  gtk_window_set_default_size (demo->window, 760, 560);
  g_signal_connect (demo->window, "close-request", G_CALLBACK (on_close_request), demo);

  header = gtk_header_bar_new ();
  demo->start_button = gtk_button_new_with_label ("Start");
  gtk_widget_add_css_class (demo->start_button, "suggested-action");
  g_signal_connect (demo->start_button, "clicked", G_CALLBACK (on_start_clicked), demo);
  demo->cancel_button = gtk_button_new_with_label ("Cancel");
  gtk_widget_add_css_class (demo->cancel_button, "destructive-action");
  gtk_widget_set_sensitive (demo->cancel_button, FALSE);
  g_signal_connect (demo->cancel_button, "clicked", G_CALLBACK (on_cancel_clicked), demo);
  gtk_header_bar_pack_start (GTK_HEADER_BAR (header), demo->start_button);
  gtk_header_bar_pack_end (GTK_HEADER_BAR (header), demo->cancel_button);
  gtk_window_set_titlebar (demo->window, header);

  box = gtk_box_new (GTK_ORIENTATION_VERTICAL, 6);
  demo->status_label = gtk_label_new ("Press Start to send the messages.");
  gtk_label_set_xalign (GTK_LABEL (demo->status_label), 0.0);
  gtk_widget_set_margin_start (demo->status_label, 6);
  gtk_widget_set_margin_top (demo->status_label, 6);
  demo->result_label = gtk_label_new (NULL);
  gtk_label_set_xalign (GTK_LABEL (demo->result_label), 0.0);
  gtk_label_set_wrap (GTK_LABEL (demo->result_label), TRUE);
  gtk_widget_set_margin_start (demo->result_label, 6);
  gtk_widget_set_margin_bottom (demo->result_label, 6);

  gtk_box_append (GTK_BOX (box), demo->status_label);
  gtk_box_append (GTK_BOX (box), client_list_new (demo));
  gtk_box_append (GTK_BOX (box), demo->result_label);
  gtk_window_set_child (demo->window, box);

  gtk_widget_add_tick_callback (GTK_WIDGET (demo->window), on_tick, demo, NULL);
  gtk_window_present (demo->window);

  if (demo->run_and_quit)
    {
      demo->quit_after_run = TRUE;
      start_run (demo);
    }
}

static gint
on_handle_local_options (GApplication *app,
                         GVariantDict *options,
                         gpointer      user_data)
{
  Demo *demo = user_data;

  if (demo->n_clients < 1 || demo->n_jobs < 0 || demo->n_workers < 0 ||
      demo->capacity < 1 || demo->work < 0 || demo->cancel_after < 0)
    {
      g_printerr ("gtk-clients: --clients and --capacity must be at least 1, "
                  "the other numbers not negative\n");
      return 2;
    }

  return -1;
}

int
main (int   argc,
      char *argv[])
{
  Demo demo = {
    .n_clients = 300,
    .n_jobs = 1000000,
    .n_workers = 0,
    .capacity = 4096,
    .work = 400,
  };
  const GOptionEntry entries[] = {
    { "clients", 0, 0, G_OPTION_ARG_INT, &demo.n_clients, "Simulated clients (300)", "N" },
    { "jobs", 0, 0, G_OPTION_ARG_INT, &demo.n_jobs, "Messages in all (1000000)", "N" },
    { "workers", 0, 0, G_OPTION_ARG_INT, &demo.n_workers, "Worker threads (0: one per CPU)", "N" },
    { "capacity", 0, 0, G_OPTION_ARG_INT, &demo.capacity, "The dispatcher's bound (4096)", "N" },
    { "work", 0, 0, G_OPTION_ARG_INT, &demo.work, "Work rounds per message (400)", "N" },
    { "run-and-quit", 0, 0, G_OPTION_ARG_NONE, &demo.run_and_quit,
      "Run the workload at once, print the counts and quit", NULL },
    { "cancel-after", 0, 0, G_OPTION_ARG_INT, &demo.cancel_after,
      "Press Cancel once N messages were handled", "N" },
    { NULL }
  };
  g_autoptr(GtkApplication) app = NULL;
  int status;

  app = gtk_application_new (NULL, G_APPLICATION_NON_UNIQUE);
  demo.app = app;
  demo.rows = g_list_store_new (CLIENT_TYPE_ROW);
  g_application_add_main_option_entries (G_APPLICATION (app), entries);
  g_signal_connect (app, "handle-local-options", G_CALLBACK (on_handle_local_options), &demo);
  g_signal_connect (app, "activate", G_CALLBACK (on_activate), &demo);

  status = g_application_run (G_APPLICATION (app), argc, argv);
  g_object_unref (demo.rows);

  return status != 0 ? status : demo.exit_status;
}
