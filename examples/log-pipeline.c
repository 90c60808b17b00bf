/* log-pipeline.c: parse a web access log in parallel, sessionize per client in order
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * A two-stage pipeline over a web server's access log (Common Log Format):
 *
 *   lines ──> parse (ordered, parallel) ──> sessionize (keyed) ──> sink
 *
 * The reader only cuts the client's IP off the front of each line (the
 * line's key) and submits it. Parsing the rest is the costly part, and a
 * keyed stage would parse one client's lines one at a time, so the busiest
 * client would set the pace. The parse stage is an *ordered* stage instead:
 * it parses lines on every core, in any order, and releases what it emits
 * in the order the lines came in, per client. So the sessionize stage sees
 * each client's requests one at a time and in log order, and cuts them into
 * sessions (a gap of 30 minutes or more starts a new one); closed sessions
 * go to the sink, which runs within the client's sessionize job.
 *
 * No locks: a client's record is touched by one job at a time (the reader
 * creates it before the client's first line, and the main thread reads it
 * again only after kd_pipeline_wait()). A line that does not parse fails its
 * job: the parse stage's done callback counts it and the pipeline goes on.
 * A full stage holds back the reader, so memory stays flat however long the
 * log is.
 *
 * The program checks what the pipeline promises: every client's requests
 * reached the sessionizer in log order (each request carries its line
 * number), and every line was either a request or a malformed line.
 *
 *   log-pipeline --generate 1000000     a generated log of a week, 20,000 clients
 *   log-pipeline access.log             a real one (zcat access.log.gz | log-pipeline /dev/stdin)
 */

#include <kdispatch/kdispatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define SESSION_GAP (30 * 60)   /* seconds of silence that end a session */

/* ------------------------------------------------------------------------ */
/* Clients and items                                                        */

#define LENGTH_BUCKETS 6   /* sessions of 1, 2-9, 10-99, 100-999, 1000-9999, more requests */

/* What the program knows of one client IP. The reader creates it before
 * the client's first line; from then on only this client's sessionize
 * jobs touch it, one at a time, until kd_pipeline_wait() returns. */
typedef struct
{
  /* The session being built */
  guint64  last_number;
  gint64   session_start;
  gint64   last_time;
  guint    session_requests;

  guint    requests;
  guint64  bytes;
  guint    errors;          /* 5xx responses */
  guint    out_of_order;    /* requests that arrived after a later line */

  /* Its sessions, as the sink counts them */
  guint    sessions;
  guint64  session_requests_total;
  gint64   session_seconds;
  guint64  by_length[LENGTH_BUCKETS];
  gint64   longest_start;
  gint64   longest_end;
  guint    longest_requests;
} Client;

/* What the reader submits, under the client's IP. */
typedef struct
{
  guint64  number;     /* line number, from 1 */
  char    *text;
  Client  *client;
} Line;

/* What the parse stage emits, under the same key. */
typedef struct
{
  guint64  number;
  gint64   time;       /* seconds since the epoch */
  guint    status;
  guint64  bytes;
  Client  *client;
} Request;

/* What the sessionize stage emits: one client's visit. */
typedef struct
{
  gint64   start;
  gint64   end;
  guint    requests;
  Client  *client;
} Session;

static void
line_free (gpointer data)
{
  Line *line = data;

  g_free (line->text);
  g_free (line);
}

/* ------------------------------------------------------------------------ */
/* Parsing a Common Log Format line                                         */

#define PARSE_ERROR (g_quark_from_static_string ("log-pipeline-parse-error"))

/* 127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /a.gif HTTP/1.0" 200 2326 */

static gint64
days_from_civil (gint64 y,
                 guint  m,
                 guint  d)
{
  gint64 era;
  guint yoe, doy, doe;

  y -= m <= 2;
  era = (y >= 0 ? y : y - 399) / 400;
  yoe = (guint) (y - era * 400);
  doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + (gint64) doe - 719468;
}

static gboolean
parse_digits (const char **p,
              guint        n,
              guint       *value)
{
  guint v = 0;
  guint i;

  for (i = 0; i < n; i++)
    {
      if (!g_ascii_isdigit ((*p)[i]))
        return FALSE;
      v = v * 10 + (guint) ((*p)[i] - '0');
    }
  *p += n;
  *value = v;
  return TRUE;
}

/* "10/Oct/2000:13:55:36 -0700" → seconds since the epoch, UTC. */
static gboolean
parse_time (const char *p,
            gint64     *time)
{
  static const char months[] = "JanFebMarAprMayJunJulAugSepOctNovDec";
  guint day, month, year, hour, minute, second, tz_hours, tz_minutes;
  gint sign;

  if (!parse_digits (&p, 2, &day) || *p++ != '/')
    return FALSE;
  for (month = 1; month <= 12; month++)
    if (strncmp (p, months + 3 * (month - 1), 3) == 0)
      break;
  if (month > 12)
    return FALSE;
  p += 3;
  if (*p++ != '/' || !parse_digits (&p, 4, &year) || *p++ != ':' ||
      !parse_digits (&p, 2, &hour) || *p++ != ':' ||
      !parse_digits (&p, 2, &minute) || *p++ != ':' ||
      !parse_digits (&p, 2, &second) || *p++ != ' ')
    return FALSE;
  if (*p != '+' && *p != '-')
    return FALSE;
  sign = *p++ == '-' ? -1 : 1;
  if (!parse_digits (&p, 2, &tz_hours) || !parse_digits (&p, 2, &tz_minutes) || *p != ']')
    return FALSE;
  if (day < 1 || day > 31 || hour > 23 || minute > 59 || second > 60)
    return FALSE;

  *time = days_from_civil (year, month, day) * 86400 + hour * 3600 + minute * 60 + second -
          sign * (gint64) (tz_hours * 3600 + tz_minutes * 60);
  return TRUE;
}

/* Reads the time, the status and the size of @text, whose client the
 * reader already cut off. */
static gboolean
parse_line (const char  *text,
            Request     *request,
            GError     **error)
{
  const char *space = strchr (text, ' ');
  const char *open, *quote, *end;
  guint64 bytes = 0;
  guint status;

  if (space == NULL || space == text)
    goto malformed;

  open = strchr (space, '[');
  if (open == NULL || !parse_time (open + 1, &request->time))
    goto malformed;

  /* The request line is quoted; a quote inside it is escaped (\"). */
  quote = strchr (open, '"');
  if (quote == NULL)
    goto malformed;
  for (quote++; *quote != '"'; quote++)
    if (*quote == '\0' || (*quote == '\\' && *++quote == '\0'))
      goto malformed;
  end = quote + 1;
  if (*end++ != ' ' || !parse_digits (&end, 3, &status) || *end++ != ' ')
    goto malformed;
  if (*end == '-')
    end++;
  else
    for (; g_ascii_isdigit (*end); end++)
      bytes = bytes * 10 + (guint64) (*end - '0');
  if (*end != '\0')
    goto malformed;

  request->status = status;
  request->bytes = bytes;
  return TRUE;

malformed:
  g_set_error (error, PARSE_ERROR, 0, "not a Common Log Format line");
  return FALSE;
}

/* The parse stage: any number at once; the stage passes what they emit on
 * in line order. */
static gboolean
parse_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  Line *line = kd_job_get_item (job);
  Request parsed;
  Request *request;

  if (!parse_line (line->text, &parsed, error))
    {
      g_prefix_error (error, "line %" G_GUINT64_FORMAT ": ", line->number);
      return FALSE;
    }

  parsed.number = line->number;
  parsed.client = line->client;
  request = g_memdup2 (&parsed, sizeof parsed);
  if (!kd_job_emit (job, kd_job_get_key (job), request, error))
    {
      g_free (request);
      return FALSE;
    }
  return TRUE;
}

/* ------------------------------------------------------------------------ */
/* Sessions per client                                                      */

static Session *
close_session (Client *client)
{
  Session *session = g_new (Session, 1);

  session->start = client->session_start;
  session->end = client->last_time;
  session->requests = client->session_requests;
  session->client = client;
  client->session_requests = 0;
  return session;
}

/* The sessionize stage: one job per client at a time, in log order. */
static gboolean
sessionize_handler (KdJob    *job,
                    gpointer  user_data,
                    GError  **error)
{
  Request *request = kd_job_get_item (job);
  Client *client = request->client;

  if (request->number <= client->last_number)
    client->out_of_order++;
  client->last_number = request->number;

  if (client->session_requests > 0 && request->time - client->last_time >= SESSION_GAP)
    {
      Session *session = close_session (client);

      if (!kd_job_emit (job, kd_job_get_key (job), session, error))
        {
          g_free (session);
          return FALSE;
        }
    }
  if (client->session_requests == 0)
    client->session_start = request->time;

  client->session_requests++;
  client->last_time = MAX (client->last_time, request->time);
  client->requests++;
  client->bytes += request->bytes;
  if (request->status >= 500)
    client->errors++;
  return TRUE;
}

/* ------------------------------------------------------------------------ */
/* The sink: session statistics                                             */

/* Within the client's sessionize job (the sink runs in the last stage's
 * handler that emits), or on the main thread once the pipeline is done. */
static void
client_add_session (Client        *client,
                    const Session *session)
{
  guint bucket = 0;
  guint n;

  /* 1 request, else by its number of digits. */
  if (session->requests > 1)
    for (n = session->requests; n > 0 && bucket + 1 < LENGTH_BUCKETS; n /= 10)
      bucket++;

  client->sessions++;
  client->session_requests_total += session->requests;
  client->session_seconds += session->end - session->start;
  client->by_length[bucket]++;
  if (client->sessions == 1 ||
      session->end - session->start > client->longest_end - client->longest_start)
    {
      client->longest_start = session->start;
      client->longest_end = session->end;
      client->longest_requests = session->requests;
    }
}

static void
session_sink (const char *ip,
              gpointer    item,
              gpointer    user_data)
{
  Session *session = item;

  client_add_session (session->client, session);
  g_free (session);
}

/* ------------------------------------------------------------------------ */
/* Input: a file, or generated traffic                                      */

/* The generator plays visits: VISITS clients browse at once, each visit a
 * run of requests a few seconds to minutes apart; when one ends, another
 * client (a few are far more frequent than the rest) starts one. */
#define VISITS    300
#define N_CLIENTS 20000

typedef struct
{
  gint64 next_ms;      /* its next request */
  guint  client;
  guint  left;         /* requests still to come */
} Visit;

typedef struct
{
  GRand   *rand;
  double  *popularity;   /* cumulative over the clients */
  Visit    heap[VISITS]; /* a min-heap on next_ms */
  gint64   stamp_second; /* the second @stamp was formatted for */
  char     stamp[32];    /* "01/Nov/2026:00:00:00 +0000" */
  guint64  visits;
  guint64  malformed;    /* lines generated broken on purpose */
} Generator;

static const char *const paths[] = {
  "/", "/index.html", "/about", "/products", "/products/42", "/cart", "/checkout",
  "/api/v1/items", "/api/v1/items/7", "/static/app.js", "/static/app.css", "/favicon.ico",
};

/* An exponentially distributed wait of @mean_ms on average. */
static gint64
generator_wait (Generator *gen,
                double     mean_ms)
{
  return (gint64) (-mean_ms * log1p (-g_rand_double (gen->rand)));
}

static void
generator_new_visit (Generator *gen,
                     Visit     *visit,
                     gint64     now_ms)
{
  double pick = g_rand_double (gen->rand);
  guint lo = 0, hi = N_CLIENTS - 1;

  while (lo < hi)
    {
      guint mid = (lo + hi) / 2;

      if (gen->popularity[mid] < pick)
        lo = mid + 1;
      else
        hi = mid;
    }
  visit->client = lo;
  visit->left = 1 + (guint) generator_wait (gen, 8000) / 1000;  /* 9 requests on average */
  visit->next_ms = now_ms + generator_wait (gen, 20000);
  gen->visits++;
}

static void
generator_sift_down (Generator *gen,
                     guint      i)
{

  for (;;)
    {
      guint child = 2 * i + 1;
      Visit swap;

      if (child >= VISITS)
        return;
      if (child + 1 < VISITS && gen->heap[child + 1].next_ms < gen->heap[child].next_ms)
        child++;
      if (gen->heap[i].next_ms <= gen->heap[child].next_ms)
        return;
      swap = gen->heap[i];
      gen->heap[i] = gen->heap[child];
      gen->heap[child] = swap;
      i = child;
    }
}

static void
generator_init (Generator *gen)
{
  gint64 start_ms = (gint64) 1793491200 * 1000;  /* 2026-11-01 00:00:00 UTC */
  double total = 0;
  guint i;

  memset (gen, 0, sizeof *gen);
  gen->rand = g_rand_new_with_seed (20261121);
  gen->popularity = g_new (double, N_CLIENTS);
  for (i = 0; i < N_CLIENTS; i++)
    gen->popularity[i] = total += pow (i + 1, -0.6);
  for (i = 0; i < N_CLIENTS; i++)
    gen->popularity[i] /= total;

  for (i = 0; i < VISITS; i++)
    generator_new_visit (gen, &gen->heap[i], start_ms);
  for (i = VISITS / 2; i-- > 0;)
    generator_sift_down (gen, i);
  gen->stamp_second = -1;
}

static char *
generator_next (Generator *gen)
{
  Visit *visit = &gen->heap[0];
  gint64 now_ms = visit->next_ms;
  guint client = visit->client;
  guint status, r;

  if (now_ms / 1000 != gen->stamp_second)
    {
      static const char *const months[] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                            "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" };
      g_autoptr(GDateTime) when = g_date_time_new_from_unix_utc (now_ms / 1000);

      g_snprintf (gen->stamp, sizeof gen->stamp, "%02d/%s/%04d:%02d:%02d:%02d +0000",
                  g_date_time_get_day_of_month (when),
                  months[g_date_time_get_month (when) - 1],
                  g_date_time_get_year (when), g_date_time_get_hour (when),
                  g_date_time_get_minute (when), g_date_time_get_second (when));
      gen->stamp_second = now_ms / 1000;
    }

  /* The visit's next request, or the next visit. */
  if (--visit->left > 0)
    visit->next_ms = now_ms + 1000 + generator_wait (gen, 20000);
  else
    generator_new_visit (gen, visit, now_ms);
  generator_sift_down (gen, 0);

  if (g_rand_int_range (gen->rand, 0, 10000) == 0)
    {
      gen->malformed++;
      return g_strdup ("\\x16\\x03\\x01 garbage from a TLS client on the plain port");
    }

  r = (guint) g_rand_int_range (gen->rand, 0, 100);
  status = r < 85 ? 200 : r < 93 ? 304 : r < 99 ? 404 : 500;
  return g_strdup_printf ("10.%u.%u.%u - - [%s] \"GET %s HTTP/1.1\" %u %u",
                          (client >> 16) & 0xff, (client >> 8) & 0xff, client & 0xff,
                          gen->stamp,
                          paths[g_rand_int_range (gen->rand, 0, G_N_ELEMENTS (paths))],
                          status,
                          status == 304 ? 0 : (guint) g_rand_int_range (gen->rand, 200, 60000));
}

static void
generator_clear (Generator *gen)
{
  g_rand_free (gen->rand);
  g_free (gen->popularity);
}

/* ------------------------------------------------------------------------ */
/* Reporting                                                                */

typedef struct
{
  const char *ip;
  Client     *client;
} Ranked;

typedef struct
{
  guint64     clients;       /* with at least one request */
  guint64     requests;
  guint64     out_of_order;
  guint64     sessions;
  guint64     session_requests;
  gint64      session_seconds;
  guint64     by_length[LENGTH_BUCKETS];
  const Ranked *longest;
  GArray     *ranked;        /* Ranked, most requests first */
} Totals;

static gint
by_requests (gconstpointer a,
             gconstpointer b)
{
  const Ranked *x = a;
  const Ranked *y = b;

  if (x->client->requests != y->client->requests)
    return x->client->requests > y->client->requests ? -1 : 1;
  return strcmp (x->ip, y->ip);
}

/* After kd_pipeline_wait(): ends every client's open session (the log
 * ended) and sums the clients up. */
static void
totals_compute (Totals     *totals,
                GHashTable *clients)
{
  GHashTableIter iter;
  gpointer ip, value;
  guint i, b;

  memset (totals, 0, sizeof *totals);
  totals->ranked = g_array_sized_new (FALSE, FALSE, sizeof (Ranked), g_hash_table_size (clients));

  g_hash_table_iter_init (&iter, clients);
  while (g_hash_table_iter_next (&iter, &ip, &value))
    {
      Client *client = value;

      /* Only malformed lines came from it. */
      if (client->requests == 0)
        continue;

      g_autofree Session *session = close_session (client);
      client_add_session (client, session);
      g_array_append_val (totals->ranked, ((Ranked) { ip, client }));
    }
  g_array_sort (totals->ranked, by_requests);

  for (i = 0; i < totals->ranked->len; i++)
    {
      const Ranked *r = &g_array_index (totals->ranked, Ranked, i);
      const Client *c = r->client;

      totals->clients++;
      totals->requests += c->requests;
      totals->out_of_order += c->out_of_order;
      totals->sessions += c->sessions;
      totals->session_requests += c->session_requests_total;
      totals->session_seconds += c->session_seconds;
      for (b = 0; b < LENGTH_BUCKETS; b++)
        totals->by_length[b] += c->by_length[b];
      if (totals->longest == NULL ||
          c->longest_end - c->longest_start >
          totals->longest->client->longest_end - totals->longest->client->longest_start)
        totals->longest = r;
    }
}

static void
print_top_clients (const Totals *totals,
                   guint         top)
{
  guint i;

  printf ("\ntop clients by requests:\n");
  printf ("  %4s  %-16s %9s %9s %10s %7s\n", "#", "client", "requests", "sessions", "MiB", "5xx");
  for (i = 0; i < MIN (top, totals->ranked->len); i++)
    {
      const Ranked *r = &g_array_index (totals->ranked, Ranked, i);

      printf ("  %4u  %-16s %9u %9u %10.1f %7u\n", i + 1, r->ip, r->client->requests,
              r->client->sessions, r->client->bytes / 1048576.0, r->client->errors);
    }
}

static void
print_sessions (const Totals *totals)
{
  static const char *const labels[LENGTH_BUCKETS] = { "1", "2-9", "10-99", "100-999", "1000-9999", "10000+" };
  guint i;

  printf ("\nsessions (a %d-minute silence ends one): %" G_GUINT64_FORMAT
          ", %.1f requests and %.1f minutes on average\n",
          SESSION_GAP / 60, totals->sessions,
          totals->sessions ? (double) totals->session_requests / totals->sessions : 0.0,
          totals->sessions ? totals->session_seconds / 60.0 / totals->sessions : 0.0);
  for (i = 0; i < LENGTH_BUCKETS; i++)
    printf ("  %10s requests: %9" G_GUINT64_FORMAT " sessions\n", labels[i], totals->by_length[i]);
  if (totals->longest != NULL)
    {
      const Client *c = totals->longest->client;
      g_autoptr(GDateTime) start = g_date_time_new_from_unix_utc (c->longest_start);
      g_autofree char *when = g_date_time_format (start, "%Y-%m-%d %H:%M UTC");
      gint64 seconds = c->longest_end - c->longest_start;

      printf ("  longest: %s, %u requests over %.1f %s from %s\n", totals->longest->ip,
              c->longest_requests, seconds >= 3600 ? seconds / 3600.0 : seconds / 60.0,
              seconds >= 3600 ? "hours" : "minutes", when);
    }
}

/* The reader's side: the record of the client that sent @text (its first
 * field, or "" if it has none), created at the client's first line. */
static Client *
client_for_line (GHashTable  *clients,
                 const char  *text,
                 const char **ip)
{
  gsize length = strcspn (text, " ");
  char stack[64];
  char *probe = length < sizeof stack ? stack : g_malloc (length + 1);
  gpointer found_ip = NULL, client = NULL;

  memcpy (probe, text, length);
  probe[length] = '\0';
  if (!g_hash_table_lookup_extended (clients, probe, &found_ip, &client))
    {
      found_ip = g_strdup (probe);
      client = g_new0 (Client, 1);
      g_hash_table_insert (clients, found_ip, client);
    }
  if (probe != stack)
    g_free (probe);

  *ip = found_ip;
  return client;
}

/* ------------------------------------------------------------------------ */

static void
count_malformed (KdJob        *job,
                 const GError *error,
                 gpointer      user_data)
{
  guint64 *malformed = user_data;

  if (g_error_matches (error, PARSE_ERROR, 0))
    {
      /* Only the first few, to show where they are. */
      if (__atomic_add_fetch (malformed, 1, __ATOMIC_RELAXED) <= 3)
        g_printerr ("log-pipeline: skipped %s\n", error->message);
    }
}

int
main (int    argc,
      char **argv)
{
  gint generate = 0;
  gint parse_workers = 0;
  gint top = 10;
  GOptionEntry entries[] = {
    { "generate", 'g', 0, G_OPTION_ARG_INT, &generate, "Generate a log of N lines instead of reading FILE", "N" },
    { "parse-workers", 'p', 0, G_OPTION_ARG_INT, &parse_workers, "Parse threads (default: one per processor)", "N" },
    { "top", 't', 0, G_OPTION_ARG_INT, &top, "Clients to list", "N" },
    { NULL },
  };
  g_autoptr(GOptionContext) options = g_option_context_new ("[FILE] - sessionize a web access log");
  g_autoptr(GError) error = NULL;
  g_autoptr(KdPipeline) pipeline = NULL;
  g_autoptr(GDataInputStream) input = NULL;
  g_autoptr(GHashTable) clients = NULL;
  Generator gen = { 0 };
  Totals totals;
  KdDispatcher *parse, *sessionize;
  guint64 n_lines = 0, malformed = 0;
  KdStats parse_stats;
  gint64 start, elapsed;
  gboolean ok = TRUE;

  g_option_context_add_main_entries (options, entries, NULL);
  if (!g_option_context_parse (options, &argc, &argv, &error))
    {
      g_printerr ("log-pipeline: %s\n", error->message);
      return 2;
    }
  if ((generate > 0) == (argc == 2) || argc > 2 || generate < 0 || parse_workers < 0 || top < 0)
    {
      g_printerr ("log-pipeline: give a log FILE or --generate N\n");
      return 2;
    }

  if (generate > 0)
    {
      generator_init (&gen);
    }
  else
    {
      g_autoptr(GFile) file = g_file_new_for_commandline_arg (argv[1]);
      g_autoptr(GFileInputStream) stream = g_file_read (file, NULL, &error);

      if (stream == NULL)
        {
          g_printerr ("log-pipeline: %s\n", error->message);
          return 1;
        }
      input = g_data_input_stream_new (G_INPUT_STREAM (stream));
      g_buffered_input_stream_set_buffer_size (G_BUFFERED_INPUT_STREAM (input), 1 << 16);
    }

  /* IP → Client; only this thread touches the table. */
  clients = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);

  pipeline = kd_pipeline_new ();

  parse = kd_pipeline_add_stage (pipeline, "parse", parse_workers, parse_handler, NULL, NULL);
  kd_pipeline_set_stage_mode (pipeline, parse, KD_STAGE_ORDERED);
  kd_dispatcher_set_item_free (parse, line_free);
  kd_dispatcher_set_done_func (parse, count_malformed, &malformed, NULL);

  sessionize = kd_pipeline_add_stage (pipeline, "sessionize", 2, sessionize_handler, NULL, NULL);
  kd_dispatcher_set_item_free (sessionize, g_free);

  kd_pipeline_set_sink (pipeline, session_sink, NULL, NULL);

  start = g_get_monotonic_time ();
  for (;;)
    {
      const char *ip;
      Line *line;
      char *text;

      if (generate > 0)
        {
          if (n_lines == (guint64) generate)
            break;
          text = generator_next (&gen);
        }
      else
        {
          gsize length;

          text = g_data_input_stream_read_line (input, &length, NULL, &error);
          if (text == NULL)
            break;
          if (length > 0 && text[length - 1] == '\r')
            text[length - 1] = '\0';
        }

      line = g_new (Line, 1);
      line->number = ++n_lines;
      line->text = text;
      line->client = client_for_line (clients, text, &ip);
      if (!kd_pipeline_submit (pipeline, ip, line, &error))
        {
          line_free (line);
          break;
        }
    }
  if (error != NULL)
    {
      g_printerr ("log-pipeline: %s\n", error->message);
      return 1;
    }

  /* Every line has left the pipeline: the clients are this thread's again,
   * and the sessions still open end with the log. */
  kd_pipeline_wait (pipeline);
  elapsed = g_get_monotonic_time () - start;
  totals_compute (&totals, clients);

  kd_dispatcher_get_stats (parse, &parse_stats);
  printf ("log-pipeline: %" G_GUINT64_FORMAT " lines in %.2f s (%.2f M lines/s), "
          "%u parse workers\n", n_lines, elapsed / 1e6,
          elapsed > 0 ? n_lines / (double) elapsed : 0.0, kd_dispatcher_get_n_workers (parse));
  printf ("  %" G_GUINT64_FORMAT " requests from %" G_GUINT64_FORMAT " clients, %"
          G_GUINT64_FORMAT " malformed lines skipped\n",
          totals.requests, totals.clients, malformed);

  if (top > 0)
    print_top_clients (&totals, top);
  print_sessions (&totals);

  /* What the pipeline promised. */
  printf ("\nchecks:\n");
  printf ("  requests that reached their client out of log order: %" G_GUINT64_FORMAT "\n",
          totals.out_of_order);
  ok = ok && totals.out_of_order == 0;
  printf ("  lines = requests + malformed: %s\n", n_lines == totals.requests + malformed ? "yes" : "NO");
  ok = ok && n_lines == totals.requests + malformed;
  printf ("  requests in sessions: %" G_GUINT64_FORMAT " of %" G_GUINT64_FORMAT "\n",
          totals.session_requests, totals.requests);
  ok = ok && totals.session_requests == totals.requests;
  if (generate > 0)
    {
      printf ("  malformed lines found: %" G_GUINT64_FORMAT " of %" G_GUINT64_FORMAT " generated\n",
              malformed, gen.malformed);
      ok = ok && malformed == gen.malformed;
      generator_clear (&gen);
    }
  ok = ok && parse_stats.failed == malformed;

  g_array_unref (totals.ranked);
  g_clear_object (&pipeline);

  printf ("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
