/* ordered-clients.vala: each client's messages handled in order, from Vala
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Many clients send messages; each client's are handled one at a time, in
 * the order they came, while the clients are handled in parallel. The
 * messages are objects, submitted as values from a main loop with
 * submit_value_async, which never blocks: past the dispatcher's bound they
 * wait without a thread. The
 * program checks every message ran once, in its client's order, and that
 * every async callback came back on the main loop's thread.
 *
 *   vala-ordered-clients [CLIENTS] [MESSAGES]
 */

class Message : Object {
    public string client { get; construct; }
    public int number { get; construct; }

    public Message (string client, int number) {
        Object (client: client, number: number);
    }
}

int main (string[] args) {
    int n_clients = args.length > 1 ? int.parse (args[1]) : 200;
    int n_messages = args.length > 2 ? int.parse (args[2]) : 50;
    var loop = new MainLoop ();
    var main_thread = Thread.self<void> ();
    var mutex = Mutex ();
    var next = new HashTable<string, int> (str_hash, str_equal);
    int out_of_order = 0;
    int ran = 0;
    int called_back = 0;
    int failed = 0;
    bool wrong_thread = false;

    /* Runs on the workers: one message of a client at a time. */
    var dispatcher = new Kd.Dispatcher (4, (job) => {
        string key = job.get_key ();
        var value = job.get_value ();
        var received = value != null ? value.get_object () as Message : null;
        int message = received != null && received.client == key ? received.number : -1;

        mutex.lock ();
        if (next.contains (key) ? next[key] != message : message != 0)
            out_of_order++;
        next[key] = message + 1;
        ran++;
        mutex.unlock ();
        return true;
    });
    dispatcher.set_capacity (64);
    dispatcher.set_max_waiting ((uint) (n_clients * n_messages));

    for (int m = 0; m < n_messages; m++) {
        for (int c = 0; c < n_clients; c++) {
            var client = "client-%d".printf (c);
            dispatcher.submit_value_async.begin (client, new Message (client, m), null, (obj, res) => {
                try {
                    dispatcher.submit_value_async.end (res);
                } catch (Error e) {
                    failed++;
                }
                if (Thread.self<void> () != main_thread)
                    wrong_thread = true;
                if (++called_back == n_clients * n_messages) {
                    dispatcher.wait_async.begin (null, (obj2, res2) => {
                        try {
                            dispatcher.wait_async.end (res2);
                        } catch (Error e) {
                            failed++;
                        }
                        loop.quit ();
                    });
                }
            });
        }
    }
    Timeout.add_seconds (60, () => { loop.quit (); return Source.REMOVE; });
    loop.run ();

    print ("vala-ordered-clients: %d messages of %d clients ran, %d out of order, %d failed\n",
           ran, n_clients, out_of_order, failed);
    if (ran != n_clients * n_messages || called_back != ran || out_of_order != 0 || failed != 0 ||
        wrong_thread) {
        printerr ("vala-ordered-clients: FAILED%s\n", wrong_thread ? " (a callback off the main thread)" : "");
        return 1;
    }
    return 0;
}
