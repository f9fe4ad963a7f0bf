// Tenant mix: USERS users (default 20) of as many tenants (seed.sh), one per
// virtual user, each logged in once from its own address (run.sh), create,
// list, read, update and delete items, one round every PAUSE seconds
// (default 1.6: three writes a round stay under the server's default
// RATE_LIMIT_CLASS_WRITE of 120/min per user); each sees only its own
// tenant's items.
//   bash load-tests/k6/seed.sh 20 && bash load-tests/k6/run.sh tenant_mix.js
import http from 'k6/http';
import { check, sleep } from 'k6';
import { Rate } from 'k6/metrics';
import { BASE, forget, jsonHeaders, tokenFor } from './lib.js';

const USERS = Number(__ENV.USERS || 20);
const PAUSE = Number(__ENV.PAUSE || 1.6);
const limited = new Rate('rate_limited');

export const options = {
  vus: USERS,
  duration: __ENV.DURATION || '1m',
  thresholds: {
    http_req_failed: ['rate<0.01'],
    'http_req_duration{name:list}': ['p(95)<300'],
    'http_req_duration{name:create}': ['p(95)<300'],
    rate_limited: ['rate<0.05'],
    checks: ['rate>0.99'],
  },
};

// One round for this virtual user's user.
export default function () {
  const n = ((__VU - 1) % USERS) + 1;
  const token = tokenFor(n);
  if (!token) {
    sleep(PAUSE);
    return;
  }
  const auth = jsonHeaders(token);
  const ok = { responseCallback: http.expectedStatuses(200, 201, 204, 429) };
  const tag = `vu${n}`;

  const created = http.post(`${BASE}/api/v1/items`,
    JSON.stringify({ name: `${tag}-${__ITER}`, body: 'k6' }),
    Object.assign({}, auth, ok, { tags: { name: 'create' } }));
  limited.add(created.status === 429);
  if (created.status === 401) forget(n);
  if (created.status !== 201) {
    sleep(PAUSE);
    return;
  }
  const id = created.json('id');

  const list = http.get(`${BASE}/api/v1/items?limit=50`, Object.assign({}, auth, ok, { tags: { name: 'list' } }));
  limited.add(list.status === 429);
  if (list.status === 200) {
    check(list, {
      'only my tenant': (r) => r.json('items').every((i) => i.name.startsWith(`${tag}-`)),
    });
  }
  const one = `${BASE}/api/v1/items/${id}`;
  const got = http.get(one, Object.assign({}, auth, ok, { tags: { name: 'get' } }));
  limited.add(got.status === 429);
  check(got, { 'get 200': (r) => r.status === 200 || r.status === 429 });
  const updated = http.put(one, JSON.stringify({ name: `${tag}-${__ITER}-renamed` }),
    Object.assign({}, auth, ok, { tags: { name: 'update' } }));
  limited.add(updated.status === 429);
  check(updated, { 'update 200': (r) => r.status === 200 || r.status === 429 });
  const deleted = http.del(one, null, Object.assign({}, auth, ok, { tags: { name: 'delete' } }));
  limited.add(deleted.status === 429);
  check(deleted, { 'delete 204': (r) => r.status === 204 || r.status === 429 });
  sleep(PAUSE);
}
