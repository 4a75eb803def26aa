//! The soak of issue 16, short: about a minute of writes through the compiled
//! `aggregator` and `refresher` on moto and the Storage Gateway stand-in (strict
//! limits, refreshes of seconds, completion events through moto's EventBridge), while
//! both function processes are SIGKILLed at random points (mid-invocation and between
//! invocations), gateway B fails every `RefreshCache` for 20 s, and completion events
//! are dropped, delayed and duplicated. The benchmark's `soak` section runs the same
//! soak for minutes (`scripts/bench.sh --only soak`); both use
//! `tests/src/bin/bench_soak/engine.rs`, included here.
//!
//! Asserted from the calls that reached the stand-in and the table afterwards: every
//! write is covered on every share of its bucket (a call that started after it lists
//! its folder and each ancestor), every covering call started within the bound of
//! docs/protocol.md plus the terms of the faults that concern the write, the failing
//! gateway's siblings within the bound, no call rejected by the strict limits, and the
//! share items drained.

#[allow(dead_code)]
#[path = "../src/bin/bench_soak/engine.rs"]
mod engine;

use engine::analysis::{FaultKind, Micros};
use engine::{SoakConfig, SoakEnv, SoakOutcome};
use integration_tests::aws::{sdk_config, BoxError, Clients};
use integration_tests::moto::Moto;
use integration_tests::sgw_standin::SgwStandIn;
use integration_tests::stack::binary;
use std::time::Instant;

fn secs(us: Micros) -> f64 {
    us as f64 / 1e6
}

fn summary(o: &SoakOutcome) -> String {
    let kills: Vec<String> = [
        FaultKind::AggregatorKilledMidInvocation,
        FaultKind::AggregatorKilledAfterResponse,
        FaultKind::AggregatorKilledIdle,
        FaultKind::RefresherKilledMidInvocation,
        FaultKind::RefresherKilledAfterResponse,
        FaultKind::RefresherKilledIdle,
        FaultKind::CompletionDropped,
        FaultKind::CompletionDelayed,
        FaultKind::CompletionDuplicated,
    ]
    .iter()
    .map(|k| format!("{}: {}", k.describe(), o.kills(*k)))
    .collect();
    format!(
        "{} writes, {} checked on shares, {} calls accepted, {} failed (500), {} rejected; S {:.1} s, B healthy {:.1} s, B failing {:.1} s (+{:.1} s); faults: {}",
        o.writes.len(),
        o.coverage.len(),
        o.calls.len(),
        o.failed_calls.iter().sum::<usize>(),
        o.rejected.len(),
        secs(o.sqs_margin()),
        secs(o.bounds[0].total()),
        secs(o.bounds[1].total()),
        secs(o.failure_term().unwrap_or(0)),
        kills.join(", ")
    )
}

fn describe(o: &SoakOutcome, c: &engine::analysis::Covered) -> String {
    let w = &o.writes[c.write];
    format!(
        "write {} `{}` at +{:.1} s (processed +{:.1} s) on {}: covering {:?}, staleness {:?} s, allowed {:.1} s after processing, faults {:?}",
        c.write,
        w.key,
        secs(w.at - o.t0),
        secs(w.processed.unwrap_or(w.at) - o.t0),
        o.shares[c.share].label,
        c.covering.map(|t| secs(t - o.t0)),
        c.staleness.map(secs),
        secs(c.allowed),
        c.faults
            .iter()
            .map(|f| (o.faults[*f].kind, secs(o.faults[*f].at - o.t0)))
            .collect::<Vec<_>>()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_with_kills_a_failing_gateway_and_lost_events_covers_every_write_within_the_bound(
) -> Result<(), BoxError> {
    let moto = Moto::start().await?;
    let gateway = SgwStandIn::start().await?;
    let admin = Clients::new(&sdk_config(moto.endpoint()).await);
    let aggregator_bin = binary("aggregator")?;
    let refresher_bin = binary("refresher")?;
    let env = SoakEnv {
        moto_endpoint: moto.endpoint(),
        gateway: &gateway,
        admin: &admin,
        aggregator_bin: &aggregator_bin,
        refresher_bin: &refresher_bin,
    };
    let config = SoakConfig::ci();
    let started = Instant::now();
    let o = engine::run(&env, &config).await?;
    println!(
        "soak in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        summary(&o)
    );

    // Every write was written and processed by the aggregator (retried after a kill).
    assert_eq!(o.writes.len(), (config.seconds * config.rate) as usize);
    let unprocessed: Vec<usize> = (0..o.writes.len())
        .filter(|w| o.writes[*w].processed.is_none())
        .collect();
    assert!(
        unprocessed.is_empty(),
        "writes never processed: {unprocessed:?}"
    );
    assert!(o.unexpected.is_empty(), "{:?}", o.unexpected);

    // The faults happened.
    let kills = |kinds: &[FaultKind]| kinds.iter().map(|k| o.kills(*k)).sum::<usize>();
    assert!(
        kills(&[FaultKind::AggregatorKilledMidInvocation]) >= 1
            && kills(&[FaultKind::RefresherKilledMidInvocation]) >= 1,
        "a kill of each function during an invocation: {}",
        summary(&o)
    );
    assert!(
        kills(&[
            FaultKind::AggregatorKilledIdle,
            FaultKind::AggregatorKilledAfterResponse
        ]) >= 1
            && kills(&[
                FaultKind::RefresherKilledIdle,
                FaultKind::RefresherKilledAfterResponse
            ]) >= 1,
        "a kill of each function between invocations: {}",
        summary(&o)
    );
    assert!(o.aggregator.retries >= 1, "{:?}", o.aggregator);
    assert!(
        o.queue.redelivered >= 1,
        "a killed batch comes back: {:?}",
        o.queue
    );
    assert!(
        o.kills(FaultKind::CompletionDelayed) + o.kills(FaultKind::CompletionDropped) >= 1,
        "{}",
        summary(&o)
    );

    // Gateway B failed every call of its shares for its stretch: some failed, none
    // started then, and each was called again afterwards. (A share whose window sat
    // in a killed batch may not have been called during the stretch at all.)
    let (from, to) = o.failure_window.ok_or("the gateway never failed")?;
    let failing: Vec<usize> = (0..o.shares.len())
        .filter(|s| o.shares[*s].class == 1)
        .collect();
    assert!(
        failing.iter().map(|s| o.failed_calls[*s]).sum::<usize>() >= 1,
        "no call failed: {}",
        summary(&o)
    );
    for &s in &failing {
        assert!(
            !o.calls
                .iter()
                .any(|c| c.share == s && c.start > from && c.start < to),
            "{}: a call was accepted while its gateway failed",
            o.shares[s].label
        );
        assert!(
            o.calls.iter().any(|c| c.share == s && c.start > to),
            "{}: never called after its gateway recovered",
            o.shares[s].label
        );
    }
    // Its siblings on gateway A went on being called meanwhile.
    assert!(
        o.calls
            .iter()
            .any(|c| o.shares[c.share].class == 0 && c.start > from && c.start < to),
        "no share of gateway A was called while gateway B failed"
    );

    // No call broke the gateway's limits: two in flight, the interval.
    assert!(o.rejected.is_empty(), "rejected calls: {:?}", o.rejected);

    // Every write covered on every share of its bucket, within the bound.
    let not_covered = o.not_covered();
    assert!(
        not_covered.is_empty(),
        "{} of {} writes × shares not covered; first: {}",
        not_covered.len(),
        o.coverage.len(),
        not_covered
            .iter()
            .take(5)
            .map(|c| describe(&o, c))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let outside = o.outside_bound();
    assert!(
        outside.is_empty(),
        "{} of {} covering calls started later than the bound plus the fault terms; first:\n{}",
        outside.len(),
        o.coverage.len(),
        outside
            .iter()
            .take(5)
            .map(|c| describe(&o, c))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Drained: no message left, every window handed off, nothing pending, no slot
    // taken but those whose lease must run out (a dropped event, a killed claim).
    assert_eq!(o.drain_error, None);
    assert!(
        o.end_state_problems().is_empty(),
        "{:?}",
        o.end_state_problems()
    );
    Ok(())
}
