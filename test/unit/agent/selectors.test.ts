import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isAgentError } from '../../../src/agent/errors.ts';
import { formatSelector, parseSelector, selectorsMatch } from '../../../src/agent/selectors.ts';

const refused = (text: string, message: RegExp): void => {
  assert.throws(
    () => parseSelector(text),
    (err: unknown) => isAgentError(err, 'ERR_AGENT_SELECTOR') && message.test(err.message),
  );
};

describe('parseSelector', () => {
  it('accepts every selector the unix and k8s attestors produce, and round-trips it', () => {
    for (const text of [
      'unix:uid:0',
      'unix:gid:1000',
      'unix:user:root',
      'unix:group:wheel',
      'unix:supplementary_gid:27',
      'unix:supplementary_group:docker',
      'unix:path:/usr/bin/argocd',
      'unix:sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08',
      'k8s:ns:argocd',
      'k8s:sa:argocd-application-controller',
      'k8s:pod-label:app.kubernetes.io/name:argocd-server',
      'k8s:pod-owner:ReplicaSet:argocd-server-5d4f',
      'k8s:container-image:quay.io/argoproj/argocd:v3.1.0',
      'k8s:pod-image-count:2',
      'k8s:node-name:node-1',
    ]) {
      assert.equal(formatSelector(parseSelector(text)), text);
    }
  });

  it('refuses text that is not type:value', () => {
    refused('unix', /not of the form type:value/);
    refused(':uid:0', /not of the form type:value/);
    refused('unix:', /not of the form type:value/);
  });

  it('refuses an unknown attestor type, naming the known ones', () => {
    refused('docker:label:x', /unknown type "docker" \(known: unix, k8s\)/);
  });

  it('refuses a selector no attestor produces, which would never match (a typo)', () => {
    refused('unix:uuid:0', /unix attestor has no "uuid" selector \(known: uid, gid/);
    refused('k8s:namespace:argocd', /k8s attestor has no "namespace" selector/);
  });

  it('refuses an empty value and a non-number where a number belongs', () => {
    refused('unix:uid:', /no value after "unix:uid:"/);
    refused('k8s:ns', /no value after "k8s:ns:"/);
    refused('unix:uid:root', /unix:uid takes a number, got "root"/);
    refused('k8s:pod-image-count:two', /takes a number/);
  });
});

describe('selectorsMatch', () => {
  it('needs every required selector among the caller’s', () => {
    const have = new Set(['unix:uid:0', 'unix:gid:0', 'k8s:ns:argocd']);
    assert.equal(selectorsMatch([parseSelector('unix:uid:0'), parseSelector('k8s:ns:argocd')], have), true);
    assert.equal(selectorsMatch([parseSelector('unix:uid:0'), parseSelector('k8s:ns:flux')], have), false);
  });
});
