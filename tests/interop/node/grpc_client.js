#!/usr/bin/env node
// gRPC interop peer: grpc-js (pure JavaScript, no C-core) client for the
// interop.Echo service (../echo.proto), the same cases as grpc_client.py
// bar the health service. Plain text (h2c) to --target, sending
// --authority as :authority (a mesh name); one JSON line per case
// ({"case", "ok", "detail"}); exit 1 if any case failed, 2 on bad usage.
'use strict';

const crypto = require('crypto');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const MAX_MESSAGE = 32 * 1024 * 1024;

function args() {
  const out = { timeout: 10 };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    const [k, v] = [argv[i], argv[i + 1]];
    if (v === undefined) usage(`${k} needs a value`);
    if (k === '--target') out.target = v;
    else if (k === '--authority') out.authority = v;
    else if (k === '--timeout') out.timeout = Number(v);
    else usage(`unknown option ${k}`);
  }
  if (!out.target) usage('--target is required');
  return out;
}

function usage(why) {
  console.error(`grpc_client.js: ${why}\nusage: grpc_client.js --target HOST:PORT [--authority NAME:PORT] [--timeout SECONDS]`);
  process.exit(2);
}

function check(cond, what) {
  if (!cond) throw new Error(what);
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

// A unary call as a promise of { resp, initial, trailing }.
function unary(client, method, req, opts = {}) {
  return new Promise((resolve, reject) => {
    let initial = null;
    const call = client[method](req, opts.metadata || new grpc.Metadata(), { deadline: opts.deadline }, (err, resp) => {
      if (err) reject(err);
      else resolve({ resp, initial, call });
    });
    call.on('metadata', (m) => { initial = m; });
    if (opts.onCall) opts.onCall(call);
  });
}

async function expectCode(promise, code) {
  try {
    await promise;
  } catch (e) {
    check(e.code === code, `expected code ${code}, got ${e.code}: ${e.details}`);
    return e;
  }
  throw new Error(`expected code ${code}, the call succeeded`);
}

const cases = {
  async unary(c, t) {
    const req = { payload: crypto.randomBytes(1024), text: 'hello' };
    const { resp } = await unary(c, 'Unary', req, { deadline: deadline(t) });
    check(Buffer.compare(resp.payload, req.payload) === 0 && resp.text === req.text, 'echo differs');
    return { server_saw: resp.metadata };
  },

  async metadata(c, t) {
    const md = new grpc.Metadata();
    md.set('x-test', 'abc-123');
    let trailing = null;
    const { resp, initial } = await unary(c, 'Unary', { text: 'md' }, {
      metadata: md,
      deadline: deadline(t),
      onCall: (call) => call.on('status', (s) => { trailing = s.metadata; }),
    });
    // The status (with trailers) may land just after the callback.
    for (let i = 0; i < 100 && !trailing; i++) await new Promise((r) => setTimeout(r, 10));
    check(initial && initial.get('x-echo')[0] === 'abc-123', 'initial metadata x-echo missing');
    check(trailing && trailing.get('x-trailer')[0] === 'done', 'trailing x-trailer missing');
    check(resp.metadata['x-test'] === 'abc-123', `server did not see x-test: ${JSON.stringify(resp.metadata)}`);
    return { initial: initial.getMap(), trailing: trailing.getMap() };
  },

  server_stream(c, t) {
    const [n, size] = [50, 1000];
    return new Promise((resolve, reject) => {
      const got = [];
      const call = c.ServerStream({ count: n, size }, { deadline: deadline(t) });
      call.on('data', (m) => got.push(m));
      call.on('error', reject);
      call.on('end', () => {
        try {
          check(got.length === n, `got ${got.length} messages, want ${n}`);
          check(got.every((m, i) => m.text === String(i)), 'messages out of order');
          check(got.every((m) => m.payload.length === size), 'wrong payload size');
          resolve({ messages: n });
        } catch (e) { reject(e); }
      });
    });
  },

  client_stream(c, t) {
    const sizes = [0, 1, 100, 4096, 65536, 300000, 0, 1, 100, 4096, 65536, 300000];
    return new Promise((resolve, reject) => {
      const call = c.ClientStream({ deadline: deadline(t) }, (err, resp) => {
        if (err) return reject(err);
        try {
          const total = sizes.reduce((a, b) => a + b, 0);
          check(resp.count === sizes.length, `server counted ${resp.count}, sent ${sizes.length}`);
          check(resp.total_bytes === total, `server summed ${resp.total_bytes}, sent ${total}`);
          resolve({ messages: resp.count, bytes: resp.total_bytes });
        } catch (e) { reject(e); }
      });
      for (const s of sizes) call.write({ payload: crypto.randomBytes(s) });
      call.end();
    });
  },

  // Ping-pong: each request only after the previous echo, so a proxy that
  // buffers a whole stream makes this time out.
  bidi(c, t) {
    const rounds = 20;
    return new Promise((resolve, reject) => {
      const call = c.BidiStream({ deadline: deadline(t) });
      let i = 0;
      let sent = null;
      const send = () => {
        sent = { text: `ping-${i}`, payload: crypto.randomBytes(i * 100) };
        call.write(sent);
      };
      call.on('data', (m) => {
        if (m.text !== sent.text || Buffer.compare(m.payload, sent.payload) !== 0) {
          reject(new Error(`echo ${i} differs`));
          call.cancel();
          return;
        }
        i += 1;
        if (i < rounds) send(); else call.end();
      });
      call.on('error', reject);
      call.on('end', () => (i === rounds ? resolve({ round_trips: rounds }) : reject(new Error(`ended after ${i}`))));
      send();
    });
  },

  async deadline(c) {
    const start = Date.now();
    await expectCode(unary(c, 'Sleep', { millis: 2000 }, { deadline: deadline(0.3) }), grpc.status.DEADLINE_EXCEEDED);
    const elapsed = (Date.now() - start) / 1000;
    check(elapsed < 1.0, `deadline took ${elapsed}s`);
    return { elapsed_s: elapsed };
  },

  // The cancel must travel to the server (RST_STREAM, through any proxy).
  async cancel(c, t) {
    const tag = crypto.randomBytes(16).toString('hex');
    await expectCode(unary(c, 'Sleep', { millis: 3000, tag }, {
      deadline: deadline(t),
      onCall: (call) => setTimeout(() => call.cancel(), 200),
    }), grpc.status.CANCELLED);
    const start = Date.now();
    while (Date.now() - start < 5000) {
      const { resp } = await unary(c, 'Stats', {}, { deadline: deadline(t) });
      if (resp.cancelled_tags.includes(tag)) return { seen_after_s: (Date.now() - start) / 1000 };
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error('server never saw the cancellation within 5s');
  },

  async large(c, t) {
    const payload = crypto.randomBytes(16 * 1024 * 1024);
    const start = Date.now();
    const { resp } = await unary(c, 'Unary', { payload }, { deadline: deadline(Math.max(t, 30)) });
    check(Buffer.compare(resp.payload, payload) === 0, `16 MiB payload changed (got ${resp.payload.length} bytes)`);
    return { bytes: payload.length, elapsed_s: (Date.now() - start) / 1000 };
  },

  async status(c, t) {
    const message = 'no such thing: widget/42';
    const err = await expectCode(
      unary(c, 'Fail', { code: grpc.status.NOT_FOUND, message }, { deadline: deadline(t) }),
      grpc.status.NOT_FOUND,
    );
    check(err.details === message, `message ${err.details}, want ${message}`);
    return { code: 'NOT_FOUND', message: err.details };
  },
};

async function main() {
  const a = args();
  const def = loader.loadSync(path.join(__dirname, '..', 'echo.proto'), {
    keepCase: true,
    longs: Number,
    defaults: true,
  });
  const Echo = grpc.loadPackageDefinition(def).interop.Echo;
  const options = {
    'grpc.max_receive_message_length': MAX_MESSAGE,
    'grpc.max_send_message_length': MAX_MESSAGE,
    'grpc.enable_http_proxy': 0,
  };
  if (a.authority) options['grpc.default_authority'] = a.authority;
  const client = new Echo(a.target, grpc.credentials.createInsecure(), options);
  let failed = false;
  for (const [name, run] of Object.entries(cases)) {
    try {
      const detail = await run(client, a.timeout);
      console.log(JSON.stringify({ case: name, ok: true, detail }));
    } catch (e) {
      failed = true;
      console.log(JSON.stringify({ case: name, ok: false, detail: String(e.details || e.message || e) }));
    }
  }
  client.close();
  process.exit(failed ? 1 : 0);
}

main();
