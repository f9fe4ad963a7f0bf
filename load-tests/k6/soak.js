// Soak: the tenant mix at a steady, moderate rate for DURATION (default
// 30m): latency and error rate must not drift (watch the Grafana
// dashboard's pool and memory panels meanwhile).
//   bash load-tests/k6/seed.sh 20 && DURATION=30m k6 run load-tests/k6/soak.js
import mix, { setup as mixSetup } from './tenant_mix.js';

export const options = {
  scenarios: {
    steady: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 20),
      timeUnit: '1s',
      duration: __ENV.DURATION || '30m',
      preAllocatedVUs: Number(__ENV.USERS || 20),
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.001'],
    'http_req_duration{name:list}': ['p(95)<300', 'p(99)<1000'],
    rate_limited: ['rate<0.01'],
    checks: ['rate>0.999'],
  },
};

export const setup = mixSetup;
export default mix;
