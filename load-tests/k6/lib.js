// Shared by the k6 scripts: the target, login, and JSON helpers.
import http from 'k6/http';
import { check, sleep } from 'k6';

export const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
export const PASSWORD = __ENV.K6_PASSWORD || 'k6-password-123';

export function jsonHeaders(token) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  return { headers };
}

// Logs in user `k6-user-<n>@example.com` (made by seed.sh) and returns its
// token, or null. A 503 is the server bounding password hashing (many users
// logging in at once, AUTH_HASH_QUEUE): the user waits its Retry-After and
// tries again on its next round, as a well-behaved client does.
export function login(n) {
  const res = http.post(`${BASE}/auth/login`,
    JSON.stringify({ email: `k6-user-${n}@example.com`, password: PASSWORD }),
    Object.assign(jsonHeaders(), {
      tags: { name: 'login' },
      responseCallback: http.expectedStatuses(200, 503),
    }));
  if (res.status === 503) {
    check(res, { 'busy login says when to retry': (r) => Number(r.headers['Retry-After']) >= 1 });
    sleep(Number(res.headers['Retry-After']) || 1);
    return null;
  }
  check(res, { 'login 200': (r) => r.status === 200 });
  return res.status === 200 ? res.json('access_token') : null;
}

// This virtual user's token for user `n`, logged in on first use and again
// once the server answers 401 (AUTH_TOKEN_TTL, 15 min by default, is
// shorter than a soak): each user logs in from its own VU, so from its own
// address under `run.sh`.
const tokens = {};
export function tokenFor(n) {
  if (!tokens[n]) tokens[n] = login(n);
  return tokens[n];
}
export function forget(n) {
  delete tokens[n];
}

export function isProblem(res) {
  return (res.headers['Content-Type'] || '').startsWith('application/problem+json');
}
