// Tenant mix: USERS users (default 20) of as many tenants (seed.sh) log in
// once, then list, create, read, update and delete items; each sees only
// its own tenant's items.
//   bash load-tests/k6/seed.sh 20 && k6 run load-tests/k6/tenant_mix.js
import http from 'k6/http';
import { check, sleep } from 'k6';
import { Rate } from 'k6/metrics';
import { BASE, jsonHeaders, login } from './lib.js';

const USERS = Number(__ENV.USERS || 20);
const limited = new Rate('rate_limited');

export const options = {
  vus: Number(__ENV.VUS || USERS),
  duration: __ENV.DURATION || '1m',
  thresholds: {
    http_req_failed: ['rate<0.01'],
    'http_req_duration{name:list}': ['p(95)<300'],
    'http_req_duration{name:create}': ['p(95)<300'],
    rate_limited: ['rate<0.05'],
    checks: ['rate>0.99'],
  },
};

export function setup() {
  const tokens = [];
  for (let n = 1; n <= USERS; n++) tokens.push(login(n));
  return { tokens };
}

export default function (data) {
  const n = ((__VU - 1) % USERS) + 1;
  const token = data.tokens[n - 1];
  const auth = jsonHeaders(token);
  const ok = { responseCallback: http.expectedStatuses(200, 201, 204, 429) };
  const tag = `vu${n}`;

  const created = http.post(`${BASE}/api/v1/items`,
    JSON.stringify({ name: `${tag}-${__ITER}`, body: 'k6' }),
    Object.assign({}, auth, ok, { tags: { name: 'create' } }));
  limited.add(created.status === 429);
  if (created.status !== 201) return;
  const id = created.json('id');

  const list = http.get(`${BASE}/api/v1/items?limit=50`, Object.assign({}, auth, ok, { tags: { name: 'list' } }));
  limited.add(list.status === 429);
  if (list.status === 200) {
    check(list, {
      'only my tenant': (r) => r.json('items').every((i) => i.name.startsWith(`${tag}-`)),
    });
  }
  const one = `${BASE}/api/v1/items/${id}`;
  check(http.get(one, Object.assign({}, auth, ok, { tags: { name: 'get' } })), { 'get 200': (r) => r.status === 200 || r.status === 429 });
  check(http.put(one, JSON.stringify({ name: `${tag}-${__ITER}-renamed` }), Object.assign({}, auth, ok, { tags: { name: 'update' } })),
    { 'update 200': (r) => r.status === 200 || r.status === 429 });
  check(http.del(one, null, Object.assign({}, auth, ok, { tags: { name: 'delete' } })),
    { 'delete 204': (r) => r.status === 204 || r.status === 429 });
  sleep(0.1);
}
