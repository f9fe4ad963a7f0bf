// Soak: the tenant mix, USERS users (default 20) each doing a round every
// PAUSE seconds (default 1.6), for DURATION (default 30m): latency and error
// rate must not drift (watch the Grafana dashboard's pool and memory
// panels meanwhile). Tokens expire (AUTH_TOKEN_TTL); a user logs in again.
//   bash load-tests/k6/seed.sh 20 && DURATION=30m bash load-tests/k6/run.sh soak.js
import mix from './tenant_mix.js';

export const options = {
  vus: Number(__ENV.USERS || 20),
  duration: __ENV.DURATION || '30m',
  thresholds: {
    http_req_failed: ['rate<0.001'],
    'http_req_duration{name:list}': ['p(95)<300', 'p(99)<1000'],
    rate_limited: ['rate<0.01'],
    checks: ['rate>0.999'],
  },
};

export default mix;
