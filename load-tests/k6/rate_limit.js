// Rate limit: one client sends RATE requests/s (default 5) for DURATION
// against the per-IP quota QUOTA_PER_MIN (default 100, the server's
// RATE_LIMIT_IP default). 429s arrive at the configured rate: the allowed
// share converges to QUOTA_PER_MIN / (60 × RATE) (plus the initial burst),
// and every 429 carries Retry-After, RateLimit headers and a problem body.
//   bash load-tests/k6/run.sh rate_limit.js   (one client: one address)
import http from 'k6/http';
import { check } from 'k6';
import { Rate } from 'k6/metrics';
import { BASE, isProblem } from './lib.js';

const RATE = Number(__ENV.RATE || 5);
const QUOTA = Number(__ENV.QUOTA_PER_MIN || 100);
const SECONDS = Number(__ENV.SECONDS || 120);
// Burst (= quota) up front, then QUOTA per minute.
const expectedAllowed = Math.min(1, (QUOTA + (QUOTA * SECONDS) / 60) / (RATE * SECONDS));
const tolerance = 0.05;
// The 429 share must lie within the tolerance of what the quota predicts.
// A bound at or past 0 or 1 is no bound: when the quota covers the whole
// run (short SECONDS), none may be limited, and `rate>0` would demand one.
const low = 1 - expectedAllowed - tolerance;
const high = 1 - expectedAllowed + tolerance;
const limitedShare = [`rate<${Math.min(1, high)}`];
if (low > 0) limitedShare.push(`rate>${low}`);

const limited = new Rate('rate_limited');

export const options = {
  scenarios: {
    one_client: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: `${SECONDS}s`,
      preAllocatedVUs: 5,
    },
  },
  thresholds: {
    rate_limited: limitedShare,
    checks: ['rate>0.99'],
    'http_req_duration{expected_response:true}': ['p(95)<100'],
  },
};

export default function () {
  const res = http.get(`${BASE}/api/v1/ping`, { responseCallback: http.expectedStatuses(200, 429) });
  limited.add(res.status === 429);
  check(res, {
    '200 or 429': (r) => r.status === 200 || r.status === 429,
    'RateLimit-Policy': (r) => (r.headers['Ratelimit-Policy'] || '').includes('"ip"'),
    'RateLimit': (r) => (r.headers['Ratelimit'] || '').includes('"ip";r='),
  });
  if (res.status === 429) {
    check(res, {
      'Retry-After ≥ 1': (r) => Number(r.headers['Retry-After']) >= 1,
      'problem+json': (r) => isProblem(r),
      'names the policy': (r) => (r.json('violated-policies') || []).includes('ip'),
    });
  }
}
