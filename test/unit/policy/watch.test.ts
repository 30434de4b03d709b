import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { PolicyError } from '../../../src/policy/errors.ts';
import type { Policy } from '../../../src/policy/model.ts';
import { watchPolicy } from '../../../src/policy/watch.ts';

const policyFor = (user: string) => `rules:
  - name: a
    match: {id: "spiffe://a.org/x"}
    identity: {user: ${user}}
`;

describe('watchPolicy', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'ksp-policy-watch-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it('swaps in a valid edit, keeps the last good policy on a broken one, and reports each failure once', async () => {
    const file = join(dir, 'policy.yaml');
    await writeFile(file, policyFor('first'));
    const changes: [string, string][] = [];
    const errors: PolicyError[] = [];
    let recovered = 0;
    const watcher = await watchPolicy(file, {
      pollIntervalMs: 60_000,
      debounceMs: 10_000,
      onRecover: () => recovered++,
      onChange: (next: Policy, previous: Policy) =>
        changes.push([
          previous.rules[0]?.identity.user.source ?? '',
          next.rules[0]?.identity.user.source ?? '',
        ]),
      onError: (err) => errors.push(err),
    });
    try {
      assert.equal(watcher.generation, 1, 'the first load is generation 1');
      assert.equal(watcher.current.rules[0]?.identity.user.source, 'first');

      await writeFile(file, policyFor('second'));
      await watcher.reload();
      assert.equal(watcher.generation, 2);
      assert.deepEqual(changes, [['first', 'second']]);

      await writeFile(file, policyFor('"{nope}"'));
      await watcher.reload();
      await watcher.reload();
      assert.equal(watcher.generation, 2);
      assert.equal(watcher.current.rules[0]?.identity.user.source, 'second');
      assert.equal(errors.length, 1, 'reported once');
      assert.ok(errors[0] instanceof PolicyError);
      assert.equal(errors[0]?.code, 'ERR_POLICY');
      assert.match(
        errors[0]?.message ?? '',
        /policy\.yaml:4:23: identity\.user: unknown placeholder "\{nope\}"/,
      );

      await rm(file);
      await watcher.reload();
      assert.equal(errors.length, 2);
      assert.ok(errors[1] instanceof PolicyError);
      assert.match(errors[1]?.message ?? '', /cannot read the file/);
      assert.equal(watcher.current.rules[0]?.identity.user.source, 'second');

      // Reverting to the content in force ends the failure (the alert clears) without a new generation.
      assert.equal(recovered, 0);
      await writeFile(file, policyFor('second'));
      await watcher.reload();
      assert.equal(recovered, 1, 'a revert to the good content is reported as a recovery');
      assert.equal(watcher.generation, 2);
      await watcher.reload();
      assert.equal(recovered, 1, 'reported once');

      await writeFile(file, policyFor('third'));
      await watcher.reload();
      assert.equal(watcher.generation, 3);
      assert.equal(watcher.current.rules[0]?.identity.user.source, 'third');
    } finally {
      watcher.close();
    }
  });

  it('refuses to start on a missing or invalid file with a PolicyError', async () => {
    await assert.rejects(watchPolicy(join(dir, 'missing.yaml')), (err: unknown) => {
      assert.ok(err instanceof PolicyError);
      assert.match(err.message, /missing\.yaml: cannot read the policy file: ENOENT/);
      return true;
    });
    const bad = join(dir, 'bad.yaml');
    await writeFile(bad, 'rules: 3\n');
    await assert.rejects(watchPolicy(bad), (err: unknown) => {
      assert.ok(err instanceof PolicyError);
      assert.deepEqual(err.problems, [
        { line: 1, column: 8, message: '"rules" must be a list, got a number (3)' },
      ]);
      return true;
    });
  });

  it('picks up an edit from the file system without an explicit reload', async () => {
    const file = join(dir, 'live.yaml');
    await writeFile(file, policyFor('one'));
    const watcher = await watchPolicy(file, { debounceMs: 20, pollIntervalMs: 100 });
    try {
      await writeFile(file, policyFor('two'));
      const deadline = Date.now() + 2000;
      while (watcher.generation === 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      assert.equal(watcher.current.rules[0]?.identity.user.source, 'two');
    } finally {
      watcher.close();
    }
  });
});
