import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { PolicyErrorCode, RequestInfoError } from '../../../src/policy/errors.ts';
import { describeRequest, formatResource, requestInfo } from '../../../src/policy/request.ts';
import type { RequestInfo } from '../../../src/policy/types.ts';

type Expected = Partial<RequestInfo>;

/** [method, target, expected fields]; unspecified string fields must be ''. */
const TABLE: [string, string, Expected][] = [
  // Core group, namespaced
  ['GET', '/api/v1/namespaces/default/pods', { verb: 'list', resource: 'pods', namespace: 'default' }],
  [
    'GET',
    '/api/v1/namespaces/default/pods/web',
    { verb: 'get', resource: 'pods', name: 'web', namespace: 'default' },
  ],
  [
    'HEAD',
    '/api/v1/namespaces/default/pods/web',
    { verb: 'get', resource: 'pods', name: 'web', namespace: 'default' },
  ],
  ['POST', '/api/v1/namespaces/default/pods', { verb: 'create', resource: 'pods', namespace: 'default' }],
  [
    'PUT',
    '/api/v1/namespaces/default/pods/web',
    { verb: 'update', resource: 'pods', name: 'web', namespace: 'default' },
  ],
  [
    'PATCH',
    '/api/v1/namespaces/default/pods/web',
    { verb: 'patch', resource: 'pods', name: 'web', namespace: 'default' },
  ],
  [
    'DELETE',
    '/api/v1/namespaces/default/pods/web',
    { verb: 'delete', resource: 'pods', name: 'web', namespace: 'default' },
  ],
  [
    'DELETE',
    '/api/v1/namespaces/default/pods',
    { verb: 'deletecollection', resource: 'pods', namespace: 'default' },
  ],
  // Subresources
  [
    'GET',
    '/api/v1/namespaces/default/pods/web/log',
    { verb: 'get', resource: 'pods', name: 'web', subresource: 'log', namespace: 'default' },
  ],
  [
    'POST',
    '/api/v1/namespaces/default/pods/web/exec?command=sh',
    { verb: 'create', resource: 'pods', name: 'web', subresource: 'exec', namespace: 'default' },
  ],
  [
    'GET',
    '/api/v1/namespaces/default/pods/web/log/extra/parts',
    { verb: 'get', resource: 'pods', name: 'web', subresource: 'log', namespace: 'default' },
  ],
  // Core group, cluster-scoped
  ['GET', '/api/v1/nodes', { verb: 'list', resource: 'nodes' }],
  ['GET', '/api/v1/nodes/n1', { verb: 'get', resource: 'nodes', name: 'n1' }],
  [
    'GET',
    '/api/v1/nodes/n1/proxy/metrics',
    { verb: 'get', resource: 'nodes', name: 'n1', subresource: 'proxy' },
  ],
  ['GET', '/api/v1/pods', { verb: 'list', resource: 'pods' }],
  // Namespaces themselves
  ['GET', '/api/v1/namespaces', { verb: 'list', resource: 'namespaces' }],
  [
    'GET',
    '/api/v1/namespaces/kube-system',
    { verb: 'get', resource: 'namespaces', name: 'kube-system', namespace: 'kube-system' },
  ],
  [
    'PUT',
    '/api/v1/namespaces/ns1/finalize',
    { verb: 'update', resource: 'namespaces', name: 'ns1', subresource: 'finalize', namespace: 'ns1' },
  ],
  [
    'PUT',
    '/api/v1/namespaces/ns1/status',
    { verb: 'update', resource: 'namespaces', name: 'ns1', subresource: 'status', namespace: 'ns1' },
  ],
  // Named groups
  [
    'GET',
    '/apis/apps/v1/namespaces/argocd/deployments',
    { verb: 'list', apiGroup: 'apps', resource: 'deployments', namespace: 'argocd' },
  ],
  [
    'PATCH',
    '/apis/apps/v1/namespaces/argocd/deployments/web/scale',
    {
      verb: 'patch',
      apiGroup: 'apps',
      resource: 'deployments',
      name: 'web',
      subresource: 'scale',
      namespace: 'argocd',
    },
  ],
  [
    'GET',
    '/apis/rbac.authorization.k8s.io/v1/clusterroles/admin',
    { verb: 'get', apiGroup: 'rbac.authorization.k8s.io', resource: 'clusterroles', name: 'admin' },
  ],
  ['GET', '/apis/apps/v1/deployments', { verb: 'list', apiGroup: 'apps', resource: 'deployments' }],
  // Watch forms
  [
    'GET',
    '/api/v1/namespaces/default/pods?watch=true',
    { verb: 'watch', resource: 'pods', namespace: 'default' },
  ],
  [
    'GET',
    '/api/v1/namespaces/default/pods?watch=1',
    { verb: 'watch', resource: 'pods', namespace: 'default' },
  ],
  ['GET', '/api/v1/pods?watch=yes', { verb: 'watch', resource: 'pods' }],
  ['GET', '/api/v1/pods?watch=', { verb: 'watch', resource: 'pods' }],
  ['GET', '/api/v1/pods?watch', { verb: 'watch', resource: 'pods' }],
  ['GET', '/api/v1/pods?w%61tch=1', { verb: 'watch', resource: 'pods' }],
  ['GET', '/api/v1/pods?watch=false', { verb: 'list', resource: 'pods' }],
  ['GET', '/api/v1/pods?watch=FALSE', { verb: 'list', resource: 'pods' }],
  ['GET', '/api/v1/pods?watch=0', { verb: 'list', resource: 'pods' }],
  ['GET', '/api/v1/pods?watch=0&watch=1', { verb: 'list', resource: 'pods' }],
  ['GET', '/api/v1/pods?watch=1&watch=0', { verb: 'watch', resource: 'pods' }],
  // Go's query parser skips pairs with ";" or bad escapes; the next "watch" counts.
  ['GET', '/api/v1/pods?watch=0;x&watch=1', { verb: 'watch', resource: 'pods' }],
  ['GET', '/api/v1/pods?watch=%zz&watch=1', { verb: 'watch', resource: 'pods' }],
  ['GET', '/api/v1/pods/web?watch=1', { verb: 'get', resource: 'pods', name: 'web' }],
  ['GET', '/api/v1/watch/pods', { verb: 'watch', resource: 'pods' }],
  ['GET', '/api/v1/watch/namespaces/default/pods', { verb: 'watch', resource: 'pods', namespace: 'default' }],
  [
    'GET',
    '/api/v1/watch/namespaces/default/pods/web',
    { verb: 'watch', resource: 'pods', name: 'web', namespace: 'default' },
  ],
  ['GET', '/apis/apps/v1/watch/deployments', { verb: 'watch', apiGroup: 'apps', resource: 'deployments' }],
  // The legacy prefixes decide the verb whatever the method.
  ['DELETE', '/api/v1/watch/pods', { verb: 'watch', resource: 'pods' }],
  [
    'GET',
    '/api/v1/proxy/namespaces/default/pods/web/a/b',
    { verb: 'proxy', resource: 'pods', name: 'web', namespace: 'default' },
  ],
  // Methods kube-apiserver has no verb for
  ['OPTIONS', '/api/v1/pods', { verb: '', resource: 'pods' }],
  ['get', '/api/v1/pods', { verb: '', resource: 'pods' }],
  // Trailing slash (splitPath trims it)
  ['GET', '/api/v1/namespaces/default/pods/', { verb: 'list', resource: 'pods', namespace: 'default' }],
  // Percent-decoded before splitting, as Go's URL.Path
  ['GET', '/api/v1/namespaces/d%65fault/pods', { verb: 'list', resource: 'pods', namespace: 'default' }],
];

const NON_RESOURCE: [string, string, string][] = [
  ['GET', '/', 'get'],
  ['GET', '/api', 'get'],
  ['GET', '/api/v1', 'get'],
  ['GET', '/apis', 'get'],
  ['GET', '/apis/apps', 'get'],
  ['GET', '/apis/apps/v1', 'get'],
  ['GET', '/apis/apps/v1/', 'get'],
  ['GET', '/healthz', 'get'],
  ['HEAD', '/healthz', 'head'],
  ['GET', '/version?timeout=32s', 'get'],
  ['GET', '/openapi/v3/apis/apps/v1', 'get'],
  ['POST', '/logs/x', 'post'],
  ['GET', '/metrics/a/b/c', 'get'],
];

describe('requestInfo', () => {
  it('reads resource requests as kube-apiserver does', () => {
    for (const [method, target, expected] of TABLE) {
      const info = requestInfo(method, target);
      const want: RequestInfo = {
        isResourceRequest: true,
        verb: '',
        path: target.split('?')[0]?.replace('%65', 'e') ?? '',
        apiGroup: '',
        apiVersion: 'v1',
        resource: '',
        subresource: '',
        namespace: '',
        name: '',
        ...expected,
      };
      assert.deepEqual(info, want, `${method} ${target}`);
    }
  });

  it('reads discovery and other paths as non-resource requests with the lower-case method as verb', () => {
    for (const [method, target, verb] of NON_RESOURCE) {
      const info = requestInfo(method, target);
      assert.equal(info.isResourceRequest, false, target);
      assert.equal(info.verb, verb, target);
      assert.equal(info.path, target.split('?')[0]);
      assert.equal(info.resource, '');
      assert.equal(info.namespace, '');
    }
  });

  it('refuses targets kube-apiserver would refuse or that later path cleaning could read differently', () => {
    const bad = [
      'api/v1/pods',
      'http://example.org/api/v1/pods',
      '*',
      '/api/v1/pods/%zz',
      '/api/v1/pods/%4',
      '/api/v1/namespaces/a/../kube-system/secrets',
      '/api/v1/namespaces/a/%2e%2e/kube-system/secrets',
      '/api/v1/namespaces/./pods',
      '/api//v1/pods',
      '//api/v1/pods',
      '/api/v1/pods/a%2F%2Fb',
      '/api/v1/pods/a b',
      '/api/v1/pods/\u00e9',
      '/api/v1/pods/%00',
      '/api/v1/pods/%ff',
      '/api/v1/watch',
      `/api/v1/pods?${'a=1&'.repeat(1000)}`,
      `/${'a'.repeat(17000)}`,
      // WHATWG URL reads "\\" as "/" (the upgrade path once sent the proxy's token to such a host).
      '/\\127.0.0.1:17777/stolen',
      '\\127.0.0.1:17777/stolen',
      '/openapi/v2\\..\\..\\api\\v1\\namespaces\\denied\\secrets\\topsecret',
      '/api/v1/namespaces/allowed/pods/x%5C..%5C..%5Cdenied',
      '/api/v1/namespaces/allowed/pods/x%5c..',
      '/api/v1/pods#fragment',
      '/api/v1/pods?labelSelector=a#b',
      '/api/v1/pods/a"b',
      '/api/v1/pods/a<b>',
      '/api/v1/pods/a{b}',
      '/api/v1/pods/a|b',
      '/api/v1/pods/a^b',
      '/api/v1/pods/a`b',
      '/api/v1/pods/[::1]',
      '/api/v1/pods?x=\t',
    ];
    for (const target of bad) {
      assert.throws(
        () => requestInfo('GET', target),
        (err: unknown) => err instanceof RequestInfoError && err.code === PolicyErrorCode.BadRequest,
        target,
      );
    }
  });

  it('decodes %2F into a separator, as Go does before splitting', () => {
    const info = requestInfo('GET', '/api/v1/namespaces/a%2Fpods');
    assert.equal(info.namespace, 'a');
    assert.equal(info.resource, 'pods');
  });

  it('formats resources as limits.resources writes them and describes requests for people', () => {
    assert.equal(formatResource(requestInfo('GET', '/api/v1/namespaces/d/pods/p/log')), 'pods/log');
    assert.equal(
      formatResource(requestInfo('GET', '/apis/apps/v1/namespaces/d/deployments/x/scale')),
      'apps/deployments/scale',
    );
    assert.equal(
      describeRequest(requestInfo('GET', '/api/v1/namespaces/d/pods/p')),
      'get pods "p" in namespace "d"',
    );
    assert.equal(describeRequest(requestInfo('GET', '/api/v1/nodes')), 'list nodes (cluster-scoped)');
    assert.equal(describeRequest(requestInfo('GET', '/healthz')), 'get /healthz');
  });
});
