#!/usr/bin/env -S gjs -m
// ordered-clients.js: per-client ordered handling in JavaScript, with GJS
//
// SPDX-License-Identifier: LGPL-2.1-or-later
//
// 200 clients send 10 messages each, submitted without blocking the main
// loop (kd_dispatcher_submit_async()). The handlers run in JavaScript on the
// main loop (kd_dispatcher_set_handler_context(): GJS runs JavaScript on
// its own thread only), one message per client at a time, in order, while
// the workers schedule. Each handler starts an "asynchronous write" (a
// timeout here) and defers its job; the write's callback returns it. Each
// message is a GObject of the example's, with JavaScript fields of its
// own, submitted as the job's value (kd_dispatcher_submit_value_async())
// and read back in the handler (kd_job_get_value()).
//
// Run from a build tree:
//   GI_TYPELIB_PATH=build/src LD_LIBRARY_PATH=build/src gjs -m examples/gjs/ordered-clients.js

import GLib from 'gi://GLib';
import GObject from 'gi://GObject';
import Kd from 'gi://Kd?version=1';
import System from 'system';

const N_CLIENTS = 200;
const N_MESSAGES = 10;
const total = N_CLIENTS * N_MESSAGES;

const Message = GObject.registerClass(class Message extends GObject.Object {
    _init(client, n) {
        super._init();
        this.client = client;
        this.n = n;
    }
});

const written = new Map();      // client -> message numbers handled, in order
let inFlight = 0, maxInFlight = 0, ended = 0, failed = 0;
const loop = new GLib.MainLoop(null, false);

function handle(job) {
    const message = job.get_value();
    const client = job.get_key();

    if (!(message instanceof Message) || message.client !== client)
        throw new Error(`client ${client} got ${message}`);

    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    job.defer();
    // The asynchronous write: its callback returns the job.
    GLib.timeout_add(GLib.PRIORITY_DEFAULT, 1, () => {
        written.get(client).push(message.n);
        inFlight--;
        job.return_success();
        return GLib.SOURCE_REMOVE;
    });
    return true;
}

const dispatcher = Kd.Dispatcher.new(2, handle);
dispatcher.set_handler_context(GLib.MainContext.default());

// Each message's outcome, on the main loop once it was handled. An async
// submit never blocks the loop: past the bound (1,024 pending) it waits
// without a thread, in call order.
function onHandled(source, result) {
    try {
        source.submit_finish(result);
    } catch (e) {
        printerr(`ordered-clients.js: ${e.message}`);
        failed++;
    }
    if (++ended === total)
        loop.quit();
}

for (let c = 0; c < N_CLIENTS; c++)
    written.set(`client-${c}`, []);
for (let m = 1; m <= N_MESSAGES; m++) {
    for (let c = 0; c < N_CLIENTS; c++) {
        const client = `client-${c}`;
        dispatcher.submit_value_async(client, new Message(client, m), null, onHandled);
    }
}

GLib.timeout_add_seconds(GLib.PRIORITY_DEFAULT, 60, () => {
    printerr('ordered-clients.js: timed out');
    loop.quit();
    return GLib.SOURCE_REMOVE;
});
loop.run();
dispatcher.wait();

let outOfOrder = 0;
for (const [client, messages] of written) {
    messages.forEach((m, i) => {
        if (m !== i + 1)
            outOfOrder++;
    });
    if (messages.length !== N_MESSAGES)
        outOfOrder++;
}
const stats = dispatcher.get_stats();
print(`ordered-clients.js: ${ended} of ${total} messages handled in JavaScript, ` +
      `${outOfOrder} out of order, ${failed} failed, up to ${maxInFlight} writes in flight, ` +
      `${stats.completed} completed`);
if (ended !== total || outOfOrder !== 0 || failed !== 0 ||
    stats.completed !== total || maxInFlight < 2)
    System.exit(1);
