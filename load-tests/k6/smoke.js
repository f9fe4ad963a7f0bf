// Smoke: one user, every public route, for DURATION (default 30s).
//   bash load-tests/k6/run.sh smoke.js   (BASE_URL=http://127.0.0.1:8080)
import http from 'k6/http';
import { check, sleep } from 'k6';
import { BASE } from './lib.js';

export const options = {
  vus: 1,
  duration: __ENV.DURATION || '30s',
  thresholds: {
    http_req_failed: ['rate<0.01'],
    http_req_duration: ['p(95)<200'],
    checks: ['rate>0.99'],
  },
};

export default function () {
  check(http.get(`${BASE}/health`), { 'health 200': (r) => r.status === 200 });
  check(http.get(`${BASE}/ready`), {
    'ready 200': (r) => r.status === 200,
    'health+json': (r) => (r.headers['Content-Type'] || '').startsWith('application/health+json'),
  });
  check(http.get(`${BASE}/api/v1/ping`), { 'ping 200': (r) => r.status === 200 });
  check(http.get(`${BASE}/openapi.json`), { 'openapi 200': (r) => r.status === 200 });
  // An unknown path is answered 404 on purpose: expected, not a failure.
  const missing = http.get(`${BASE}/nope`, { responseCallback: http.expectedStatuses(404) });
  check(missing, {
    '404 problem': (r) => r.status === 404 && (r.headers['Content-Type'] || '').startsWith('application/problem+json'),
  });
  sleep(1);
}
