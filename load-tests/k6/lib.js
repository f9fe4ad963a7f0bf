// Shared by the k6 scripts: the target, login, and JSON helpers.
import http from 'k6/http';
import { check } from 'k6';

export const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
export const PASSWORD = __ENV.K6_PASSWORD || 'k6-password-123';

export function jsonHeaders(token) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  return { headers };
}

// Logs in user `k6-user-<n>@example.com` (made by seed.sh) and returns its token.
export function login(n) {
  const res = http.post(`${BASE}/auth/login`,
    JSON.stringify({ email: `k6-user-${n}@example.com`, password: PASSWORD }),
    jsonHeaders());
  check(res, { 'login 200': (r) => r.status === 200 });
  return res.status === 200 ? res.json('access_token') : null;
}

export function isProblem(res) {
  return (res.headers['Content-Type'] || '').startsWith('application/problem+json');
}
