//! Batching: the checks waiting at a moment go to Redis together, one
//! script call per node, the nodes in parallel; refunds when one node
//! denies what another charged.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use redis::{FromRedisValue, RedisError};
use smallvec::{SmallVec, smallvec};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::cluster::{Node, Topology};
use super::lease::{Lease, Leases, Return};
use super::{Job, Lua, Shared, is_routing_error, kind_of, unknown};
use crate::rate_limit::clock::nanos;
use crate::rate_limit::store::{Decision, Decisions, StoreError, StoreErrorKind};

/// Takes queued jobs, as many as are waiting, into one batch; keeps up to
/// `max_in_flight` batches going. Ends when every store handle is gone.
pub(super) async fn batcher(shared: Arc<Shared>, mut rx: mpsc::Receiver<Job>) {
    let in_flight = Arc::new(Semaphore::new(shared.config.max_in_flight.max(1)));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        // Whatever queued while we waited for a permit goes in this batch.
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < shared.config.max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A check that already timed out is not charged behind its back.
        batch.retain(|job| job.reply.as_ref().is_some_and(|r| !r.is_closed()));
        if batch.is_empty() {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.run_batch(batch).await;
            drop(permit);
        });
    }
}

/// One node's share of a batch.
struct Part {
    node: usize,
    /// Per request with checks on the node: its index in the batch and the
    /// indexes of those checks.
    groups: Vec<(usize, SmallVec<[usize; 2]>)>,
}

/// A charge to give back: which check of which request, on which node.
struct Charged {
    job: usize,
    check: usize,
    /// Units charged: the cost and any lease.
    units: u64,
    /// The state the charge left, as Redis's (seconds, nanoseconds).
    left: (u64, u64),
}

/// What the nodes said about one request.
struct Verdict {
    each: SmallVec<[Option<Decision>; 2]>,
    denied: bool,
    error: Option<StoreError>,
    charged: SmallVec<[(usize, Charged); 2]>,
    /// Leases granted.
    leased: SmallVec<[Granted; 1]>,
    /// Nodes still to answer for this request.
    waiting: usize,
}

/// A lease Redis granted with a request's check.
#[derive(Clone, Copy)]
struct Granted {
    check: usize,
    units: u64,
    /// The state the charge left, as Redis's (seconds, nanoseconds).
    left: (u64, u64),
}

impl Shared {
    pub(super) fn run_batch(
        self: &Arc<Self>,
        batch: Vec<Job>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        // Boxed: a batch whose slot moved runs its retry as a batch.
        Box::pin(self.run_batch_inner(batch))
    }

    async fn run_batch_inner(self: &Arc<Self>, mut batch: Vec<Job>) {
        self.stats
            .requests_sent
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let topology = match self.topology().await {
            Ok(topology) => topology,
            Err(err) => {
                for reply in batch.into_iter().filter_map(|job| job.reply) {
                    let _ = reply.send(Err(err.again()));
                }
                return;
            }
        };
        let mut verdicts: Vec<Verdict> = batch
            .iter()
            .map(|job| Verdict {
                each: smallvec![None; job.keys.len()],
                denied: false,
                error: None,
                charged: SmallVec::new(),
                leased: SmallVec::new(),
                waiting: 0,
            })
            .collect();
        let parts = route(&topology, &batch, &mut verdicts);
        let mut replies: Vec<_> = batch.iter_mut().map(|job| job.reply.take()).collect();
        // Requests no node decides (a slot without a master) are answered now.
        let unrouted: Vec<usize> = (0..batch.len())
            .filter(|&j| verdicts[j].waiting == 0)
            .collect();
        self.deliver(&batch, &mut verdicts, &mut replies, &unrouted);
        // Each request is answered once its own nodes have: a slow node
        // holds only the requests with keys on it.
        let mut calls: FuturesUnordered<_> = parts
            .iter()
            .enumerate()
            .map(|(p, part)| {
                let call = self.decide_on(&topology.nodes[part.node], &batch, part);
                async move { (p, call.await) }
            })
            .collect();
        let mut again = Vec::new();
        while let Some((p, answer)) = calls.next().await {
            let part = &parts[p];
            match answer {
                Ok(values) => read_answer(&batch, part, p, &values, &mut verdicts),
                Err(err) => {
                    for (j, _) in &part.groups {
                        verdicts[*j].error = Some(err.again());
                    }
                }
            }
            let mut complete = Vec::new();
            for (j, _) in &part.groups {
                verdicts[*j].waiting -= 1;
                if verdicts[*j].waiting == 0 {
                    complete.push(*j);
                }
            }
            // What other nodes charged for a request that failed anywhere
            // goes back first, so a retry starts from nothing charged.
            self.refund(&topology, &parts, &batch, &mut verdicts, &complete)
                .await;
            // A request that met a moved slot (and no denial) is sent again,
            // once, after the slot map is read again.
            complete.retain(|&j| {
                let verdict = &verdicts[j];
                let moved = !verdict.denied
                    && !batch[j].retried
                    && verdict
                        .error
                        .as_ref()
                        .is_some_and(|e| e.kind() == StoreErrorKind::Moved);
                if moved {
                    again.push(j);
                }
                !moved
            });
            self.deliver(&batch, &mut verdicts, &mut replies, &complete);
        }
        drop(calls);
        if again.is_empty() {
            return;
        }
        // With one slot the cluster client routes by slot and follows
        // `MOVED` itself; with slot sharding the map is ours to re-read.
        if self.config.sharding == super::Sharding::Slot {
            if let Err(err) = self.refresh_topology().await {
                tracing::debug!(%err, "cannot read the redis cluster's slot map");
            }
        }
        let retry: Vec<Job> = again
            .into_iter()
            .filter_map(|j| {
                let reply = replies[j].take().filter(|r| !r.is_closed())?;
                let job = &batch[j];
                Some(Job {
                    keys: job.keys.clone(),
                    args: job.args.clone(),
                    cache_keys: job.cache_keys.clone(),
                    reply: Some(reply),
                    retried: true,
                })
            })
            .collect();
        // Each on its own: a request whose key is still in flight between
        // masters must not fail the others a shared call would hold.
        join_all(retry.into_iter().map(|job| self.run_batch(vec![job]))).await;
    }

    /// One script call deciding `part`'s groups on `node`, within the
    /// timeout. A failure counts against the node's breaker only.
    async fn decide_on(
        self: &Arc<Self>,
        node: &Arc<Node>,
        batch: &[Job],
        part: &Part,
    ) -> Result<Vec<i64>, StoreError> {
        if node.breaker.is_open() {
            self.stats
                .short_circuited
                .fetch_add(part.groups.len() as u64, Ordering::Relaxed);
            return Err(StoreError::new(
                StoreErrorKind::Connection,
                format!(
                    "redis node {} unavailable (circuit breaker open)",
                    node.label
                ),
            ));
        }
        // On a cluster a node's keys span slots: they go in ARGV, to a
        // script allowed to touch several slots of its node.
        let cross_slot = node.address.is_some();
        let script = if cross_slot {
            &self.cross_slot_script
        } else {
            &self.script
        };
        let mut names: Vec<&str> = Vec::new();
        for (j, checks) in &part.groups {
            for &c in checks {
                names.push(&batch[*j].keys[c]);
            }
        }
        let mut cmd = if cross_slot {
            let mut cmd = self.evalsha(script, &[]);
            cmd.arg(names.len()).arg(&names);
            cmd
        } else {
            let mut cmd = self.evalsha(script, &names);
            cmd.arg(0);
            cmd
        };
        drop(names);
        cmd.arg(part.groups.len());
        for (j, checks) in &part.groups {
            cmd.arg(checks.len());
            for &c in checks {
                for arg in batch[*j].args[c] {
                    cmd.arg(arg);
                }
            }
        }
        self.stats.script_calls.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(crate::metrics::RATELIMIT_REDIS_CALLS, "node" => node.label.clone())
            .increment(1);
        let answer = self.call(node, script, &cmd).await?;
        Vec::<i64>::from_redis_value(answer)
            .map_err(|err| StoreError::new(StoreErrorKind::Response, RedisError::from(err)))
    }

    /// `EVALSHA <script> <keys>` and the time arguments every script
    /// starts with; the caller adds the rest.
    fn evalsha(&self, script: &Lua, keys: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.script.get_hash()).arg(keys.len()).arg(keys);
        match &self.script_clock {
            Some(clock) => {
                let now = clock.now();
                cmd.arg(now.as_secs()).arg(now.subsec_nanos());
            }
            None => {
                cmd.arg("").arg("");
            }
        }
        cmd
    }

    /// Runs a script call on `node` within the timeout, feeding its
    /// breaker.
    async fn call(
        self: &Arc<Self>,
        node: &Arc<Node>,
        script: &Lua,
        cmd: &redis::Cmd,
    ) -> Result<redis::Value, StoreError> {
        let error =
            match tokio::time::timeout(self.config.timeout, self.eval(node, script, cmd)).await {
                Ok(Ok(value)) => {
                    node.breaker.success();
                    return Ok(value);
                }
                Ok(Err(err)) if is_routing_error(&err) => {
                    tracing::debug!(%err, node = %node.label, "redis call sent to the wrong node");
                    StoreError::new(
                        StoreErrorKind::Moved,
                        format!("redis node {}: {err}", node.label),
                    )
                }
                Ok(Err(err)) => {
                    tracing::debug!(%err, node = %node.label, "redis rate-limit script failed");
                    StoreError::new(kind_of(&err), format!("redis node {}: {err}", node.label))
                }
                Err(_) => StoreError::new(
                    StoreErrorKind::Timeout,
                    format!(
                        "redis node {} did not answer within the timeout",
                        node.label
                    ),
                ),
            };
        #[cfg(feature = "metrics")]
        metrics::counter!(
            crate::metrics::RATELIMIT_REDIS_NODE_ERRORS,
            "node" => node.label.clone(),
            "kind" => error.kind().as_str()
        )
        .increment(1);
        if error.kind() == StoreErrorKind::Moved {
            // The node is fine; our slot map is not.
            self.refresh_soon();
        } else {
            self.node_failed(node);
        }
        Err(error)
    }

    /// Gives back, node by node and in parallel, what a request that was
    /// not admitted had charged. Awaited before the request is answered.
    async fn refund(
        self: &Arc<Self>,
        topology: &Topology,
        parts: &[Part],
        batch: &[Job],
        verdicts: &mut [Verdict],
        complete: &[usize],
    ) {
        let mut per_part: Vec<Vec<Charged>> = parts.iter().map(|_| Vec::new()).collect();
        for &j in complete {
            let verdict = &mut verdicts[j];
            if verdict.denied || verdict.error.is_some() {
                verdict.leased.clear();
                for (p, charged) in verdict.charged.drain(..) {
                    // Reported as it stands without the charge, as when
                    // one script denies the whole request.
                    let [t, capacity, cost, _, _] = batch[charged.job].args[charged.check];
                    if let Some(decision) = &mut verdict.each[charged.check] {
                        let base =
                            nanos(decision.reset_after).saturating_sub(t.saturating_mul(cost));
                        decision.remaining = capacity.saturating_sub(base) / t.max(1);
                        decision.reset_after = Duration::from_nanos(base);
                    }
                    per_part[p].push(charged);
                }
            }
        }
        let mut calls = Vec::new();
        for (charged, part) in per_part.iter().zip(parts) {
            if !charged.is_empty() {
                calls.push(self.refund_on(&topology.nodes[part.node], batch, charged));
            }
        }
        for (count, done) in join_all(calls).await {
            let (stat, outcome) = if done {
                (&self.stats.refunds, "done")
            } else {
                (&self.stats.refund_failures, "failed")
            };
            stat.fetch_add(count, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            metrics::counter!(crate::metrics::RATELIMIT_REDIS_REFUNDS, "outcome" => outcome)
                .increment(count);
            #[cfg(not(feature = "metrics"))]
            let _ = outcome;
        }
    }

    /// One refund call on `node`; the charges it covers and whether it
    /// went through.
    async fn refund_on(
        self: &Arc<Self>,
        node: &Arc<Node>,
        batch: &[Job],
        charged: &[Charged],
    ) -> (u64, bool) {
        let mut cmd = self.evalsha(&self.refund_script, &[]);
        cmd.arg(charged.len());
        for c in charged {
            let t = batch[c.job].args[c.check][0];
            cmd.arg(batch[c.job].keys[c.check].as_str())
                .arg(t.saturating_mul(c.units))
                .arg(c.left.0)
                .arg(c.left.1);
        }
        let done = self.call(node, &self.refund_script, &cmd).await.is_ok();
        (charged.len() as u64, done)
    }

    /// Gives unused leased units back, one call per node.
    async fn return_leases(self: &Arc<Self>, returns: Vec<Return>) {
        let topology = self.current_topology();
        let mut per_node: Vec<Vec<&Return>> = topology.nodes.iter().map(|_| Vec::new()).collect();
        for r in &returns {
            if let Some(node) = topology.node_of(&r.name) {
                per_node[node].push(r);
            }
        }
        let mut calls = Vec::new();
        for (node, items) in topology.nodes.iter().zip(&per_node) {
            if items.is_empty() {
                continue;
            }
            let mut cmd = self.evalsha(&self.refund_script, &[]);
            cmd.arg(items.len());
            for r in items {
                cmd.arg(r.name.as_str())
                    .arg(r.charge)
                    .arg(r.left.0)
                    .arg(r.left.1);
            }
            calls.push(async move {
                let units: u64 = items.iter().map(|r| r.units).sum();
                (
                    units,
                    self.call(node, &self.refund_script, &cmd).await.is_ok(),
                )
            });
        }
        for (units, done) in join_all(calls).await {
            if done {
                self.stats
                    .lease_units_returned
                    .fetch_add(units, Ordering::Relaxed);
                #[cfg(feature = "metrics")]
                metrics::counter!(crate::metrics::RATELIMIT_LEASE_RETURNED).increment(units);
            } else {
                self.stats.refund_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Answers the `complete` requests and remembers denied keys.
    fn deliver(
        &self,
        batch: &[Job],
        verdicts: &mut [Verdict],
        replies: &mut [Option<oneshot::Sender<Result<Decisions, StoreError>>>],
        complete: &[usize],
    ) {
        if complete.is_empty() {
            return;
        }
        let local_now = nanos(self.clock.now());
        for &j in complete {
            let (job, verdict) = (&batch[j], &mut verdicts[j]);
            if let Some(leases) = &self.leases {
                self.settle_leases(leases, job, verdict, local_now);
            }
            let Some(reply) = replies[j].take() else {
                continue;
            };
            // A denial is Redis's answer even when another node failed.
            if let (Some(err), false) = (verdict.error.take(), verdict.denied) {
                let _ = reply.send(Err(err));
                continue;
            }
            let mut each = SmallVec::with_capacity(verdict.each.len());
            for ((decision, cache_key), args) in
                verdict.each.iter().zip(&job.cache_keys).zip(&job.args)
            {
                let decision = decision.unwrap_or_else(unknown);
                let enforce = args[3] == 1;
                if self.config.local_cache
                    && enforce
                    && !decision.allowed
                    && !decision.retry_after.is_zero()
                {
                    // The wait was for this request's cost: what the bucket
                    // owes is that wait less the request's own charge.
                    let charge = args[0].saturating_mul(args[2]);
                    let owed = (local_now + nanos(decision.retry_after)).saturating_sub(charge);
                    self.remember_denial(cache_key.clone(), owed);
                }
                each.push(decision);
            }
            let _ = reply.send(Ok(Decisions {
                allowed: !verdict.denied,
                each,
            }));
        }
    }
}

impl Shared {
    /// Ends the lease requests a job carried: a granted lease is held from
    /// now on; a denied, failed or refunded request leased nothing.
    fn settle_leases(&self, leases: &Leases, job: &Job, verdict: &Verdict, now: u64) {
        for (c, args) in job.args.iter().enumerate() {
            if args[4] == 0 {
                continue;
            }
            let granted = verdict.leased.iter().find(|g| g.check == c).and_then(
                |&Granted { units, left, .. }| {
                    let decision = verdict.each[c]?;
                    self.stats.leases.fetch_add(1, Ordering::Relaxed);
                    #[cfg(feature = "metrics")]
                    metrics::counter!(crate::metrics::RATELIMIT_LEASES).increment(1);
                    Some(Lease {
                        units,
                        ends: 0,
                        reset_at: now + nanos(decision.reset_after) + args[0].saturating_mul(units),
                        pending_since: None,
                        name: job.keys[c].clone(),
                        t: args[0],
                        left,
                        capacity: args[1],
                    })
                },
            );
            leases.settle(&job.cache_keys[c], granted, now);
        }
    }
}

/// Ends leases whose time is up and gives their unused units back, every
/// half lease; ends with the store.
pub(super) async fn lease_sweeper(shared: std::sync::Weak<Shared>) {
    loop {
        let period = match shared.upgrade() {
            Some(shared) => {
                let Some(leases) = &shared.leases else { return };
                let now = nanos(shared.clock.now());
                let returns = leases.sweep(now, 2 * nanos(shared.config.timeout));
                #[cfg(feature = "metrics")]
                metrics::gauge!(crate::metrics::RATELIMIT_LEASE_OUTSTANDING)
                    .set(leases.outstanding.load(Ordering::Relaxed) as f64);
                if !returns.is_empty() {
                    shared.return_leases(returns).await;
                }
                // Often enough that a lease goes back soon after it ends.
                (leases.config.duration / 2)
                    .clamp(Duration::from_millis(5), Duration::from_millis(50))
            }
            None => return,
        };
        tokio::time::sleep(period).await;
    }
}

/// Splits a batch by node. A request with a key in a slot no master
/// serves is not sent at all.
fn route(topology: &Topology, batch: &[Job], verdicts: &mut [Verdict]) -> Vec<Part> {
    let mut parts: Vec<Part> = Vec::new();
    for (j, job) in batch.iter().enumerate() {
        let routed: Option<SmallVec<[usize; 2]>> =
            job.keys.iter().map(|key| topology.node_of(key)).collect();
        let Some(routed) = routed else {
            verdicts[j].error = Some(StoreError::new(
                StoreErrorKind::Connection,
                "a redis cluster slot has no master",
            ));
            continue;
        };
        for (c, node) in routed.into_iter().enumerate() {
            let p = match parts.iter().position(|p| p.node == node) {
                Some(p) => p,
                None => {
                    parts.push(Part {
                        node,
                        groups: Vec::new(),
                    });
                    parts.len() - 1
                }
            };
            match parts[p].groups.last_mut() {
                Some((last, checks)) if *last == j => checks.push(c),
                _ => {
                    parts[p].groups.push((j, smallvec![c]));
                    verdicts[j].waiting += 1;
                }
            }
        }
    }
    parts
}

/// Reads one node's answer into the requests' verdicts: per group,
/// allowed, then per check four values (see `gcra.lua`).
fn read_answer(batch: &[Job], part: &Part, p: usize, values: &[i64], verdicts: &mut [Verdict]) {
    let mut values = values.iter().map(|v| u64::try_from(*v).unwrap_or(0));
    let mut next = || values.next();
    let (Some(now_s), Some(now_ns)) = (next(), next()) else {
        for (j, _) in &part.groups {
            verdicts[*j].error = Some(short_answer());
        }
        return;
    };
    for (j, checks) in &part.groups {
        let verdict = &mut verdicts[*j];
        let Some(group_allowed) = next() else {
            verdict.error = Some(short_answer());
            continue;
        };
        if group_allowed != 1 {
            verdict.denied = true;
        }
        for &c in checks {
            let mut value = || next().unwrap_or(0);
            let decision = Decision {
                allowed: value() == 1,
                remaining: value(),
                reset_after: Duration::from_nanos(value()),
                retry_after: Duration::from_nanos(value()),
            };
            let leased = value();
            let [t, _, cost, _, _] = batch[*j].args[c];
            let units = cost + leased;
            if group_allowed == 1 && decision.allowed && units > 0 {
                let left = now_ns + nanos(decision.reset_after) + t.saturating_mul(leased);
                let left = (now_s + left / 1_000_000_000, left % 1_000_000_000);
                verdict.charged.push((
                    p,
                    Charged {
                        job: *j,
                        check: c,
                        units,
                        left,
                    },
                ));
                if leased > 0 {
                    verdict.leased.push(Granted {
                        check: c,
                        units: leased,
                        left,
                    });
                }
            }
            verdict.each[c] = Some(decision);
        }
    }
}

fn short_answer() -> StoreError {
    StoreError::new(
        StoreErrorKind::Response,
        "redis script returned too few values",
    )
}
