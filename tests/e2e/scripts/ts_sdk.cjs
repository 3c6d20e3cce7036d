// The official TypeScript SDK (@runloop/api-client 1.32.0) against devboxd; run by test_ts_sdk.py.
//
// Env: RUNLOOP_BASE_URL, RUNLOOP_API_KEY, TS_SDK_DIR (a directory whose node_modules has the SDK).
// Writes "DEVBOX_ID=<id>" to stderr as soon as the devbox exists (so the test can clean it up if
// this script dies), and prints one JSON object with what it observed as the last stdout line.
'use strict';

const fs = require('fs');
const path = require('path');
const { createRequire } = require('module');

const sdkRequire = createRequire(path.join(process.env.TS_SDK_DIR, 'package.json'));
const { RunloopSDK } = sdkRequire('@runloop/api-client');
const sdkVersion = JSON.parse(
  fs.readFileSync(path.join(process.env.TS_SDK_DIR, 'node_modules', '@runloop', 'api-client', 'package.json'), 'utf8'),
).version;

async function res(r) {
  return { exit_code: r.exitCode, stdout: await r.stdout(), stderr: await r.stderr(), execution_id: r.executionId };
}

async function main() {
  const sdk = new RunloopSDK({
    baseURL: process.env.RUNLOOP_BASE_URL,
    bearerToken: process.env.RUNLOOP_API_KEY,
  });
  const out = { sdk_version: sdkVersion };

  // create_and_await_running, then awaitRunning if needed
  const devbox = await sdk.devbox.create({ name: 'e2e-ts-sdk', metadata: { via: 'ts' } });
  console.error(`DEVBOX_ID=${devbox.id}`);
  out.devbox_id = devbox.id;
  try {
    const info = await devbox.getInfo();
    out.info = { status: info.status, name: info.name, metadata: info.metadata };

    // cmd.exec without callbacks: POST /execute with command_id, then the execution long poll
    out.exec = await res(await devbox.cmd.exec('echo hi'));
    out.exec_fail = await res(await devbox.cmd.exec('echo out; echo err >&2; exit 3'));
    out.exec_slow = await res(await devbox.cmd.exec('sleep 2; echo slow'));

    // execAsync + result()
    const ex = await devbox.cmd.execAsync('sleep 1; echo async');
    out.async_initial_status = (await ex.getState()).status;
    out.async = await res(await ex.result());

    // cmd.exec with callbacks: execute_async + SSE streams (offset=0)
    const seen = { out: '', err: '', all: '' };
    const cb = await devbox.cmd.exec('for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.1; done', {
      stdout: (l) => { seen.out += l; },
      stderr: (l) => { seen.err += l; },
      output: (l) => { seen.all += l; },
    });
    out.callbacks = { result: await res(cb), seen };

    // a long output: truncated inline, streamed in full by stdout()
    const long = await devbox.cmd.exec('seq 1 500');
    out.long = { truncated: long.result.stdout_truncated, stdout: await long.stdout(), last3: await long.stdout(3) };

    // named shells
    const s1 = devbox.shell('s1');
    out.shell_setup = await res(await s1.exec('cd /tmp && export FOO=bar'));
    out.shell_state = await res(await s1.exec('pwd; echo "$FOO"'));
    out.other_shell = await res(await devbox.shell('s2').exec('pwd; echo "${FOO:-unset}"'));
    out.plain = await res(await devbox.cmd.exec('pwd; echo "${FOO:-unset}"'));
    const sa = await s1.execAsync('echo "async-$FOO"; pwd');
    out.shell_async = await res(await sa.result());
    out.shell_view_name = (await sa.getState()).shell_name;
    const logs = await devbox.logs({ shell_name: 's1' });
    out.shell_logs = logs.logs.map((e) => ({ cmd: e.cmd, shell_name: e.shell_name, source: e.source }));

    // kill
    const k = await devbox.cmd.execAsync('sleep 100');
    await k.kill();
    out.killed = (await k.result()).exitCode;

    // files
    await devbox.file.write({ file_path: 'ts.txt', contents: 'from ts\n' });
    out.file = await devbox.file.read({ file_path: 'ts.txt' });
  } finally {
    const v = await devbox.shutdown();
    out.shutdown_status = v.status;
  }
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error((e && e.stack) || String(e));
  process.exit(1);
});
