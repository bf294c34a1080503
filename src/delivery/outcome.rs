//! The delivery stage's decisions, as pure functions with table tests: what an attempt's
//! per-recipient results mean (delivered, failed, deferred, expired), who is told what
//! (success, failure and delay notices, RFC 3461 NOTIFY), and when the next attempt is.
//! `runtime/queue.rs` performs the I/O these decide.

use std::time::Duration;

use super::{Envelope, Notice};

/// One recipient's line in a delivery status notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptStatus {
    pub rcpt: String,
    /// `5.1.1`, `4.4.7`…
    pub status: String,
    /// The next hop's reply (or our own diagnosis), one line.
    pub diagnostic: String,
    pub remote_mta: Option<String>,
    /// The recipient's ORCPT (`addr-type;xtext`), reported as Original-Recipient.
    pub orcpt: Option<String>,
}

/// Failed, still being retried, handed to a hop that does not do DSN, or delivered here
/// (into a drop folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Failed,
    Delayed,
    Relayed,
    Delivered,
}

/// What one attempt did for one recipient, as the relay or drop folder reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempted {
    /// Done; the success notice it warrants when the recipient asked for one (`None`: none
    /// from here — the hop took the request on, or the route discards).
    Delivered(Option<Kind>),
    /// A permanent refusal: the enhanced status, the reply on one line, the host that gave it.
    Failed {
        status: String,
        diagnostic: String,
        remote_mta: Option<String>,
    },
    /// A temporary failure.
    Deferred { status: String, diagnostic: String },
}

/// How a recipient ends an attempt (metrics and logs use [`Result::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Result {
    Delivered,
    Failed,
    /// Deferred past `max_lifetime`: failed with `4.4.7`.
    Expired,
    Deferred,
}

impl Result {
    pub fn name(self) -> &'static str {
        match self {
            Result::Delivered => "delivered",
            Result::Failed => "failed",
            Result::Expired => "expired",
            Result::Deferred => "deferred",
        }
    }
}

/// What an attempt's results mean for the message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Conclusion {
    /// Each recipient's result with its diagnostic (empty when delivered).
    pub results: Vec<(u32, Result, String)>,
    /// Recipients that are finished (delivered, failed or expired).
    pub finished: Vec<u32>,
    /// Success notices owed, by kind.
    pub succeeded: Vec<(Kind, RcptStatus)>,
    /// Failure notice (bounce) lines owed.
    pub failed: Vec<RcptStatus>,
    /// Delay notice lines, should one be due ([`delay_notice_due`]).
    pub deferred: Vec<RcptStatus>,
    /// The last temporary error, for the queue listing.
    pub last_error: String,
}

/// Classify an attempt's results. `age` is the message's time in the queue; a recipient
/// deferred at or past `max_lifetime` expires. Nobody is notified about a message from the
/// null sender or about a notice itself; otherwise each recipient's NOTIFY decides.
pub fn conclude(
    env: &Envelope,
    results: Vec<(u32, Attempted)>,
    age: Duration,
    max_lifetime: Duration,
) -> Conclusion {
    let expired = age >= max_lifetime;
    let notify = !env.mail_from.is_empty() && !env.is_bounce;
    let wants = |i: u32, n: Notice| {
        notify && (n == Notice::Failure || env.reflects()) && env.dsn.wants(i as usize, n)
    };
    let mut c = Conclusion::default();
    for (i, r) in results {
        let rcpt = env.rcpts.get(i as usize).cloned().unwrap_or_default();
        let line = |status: String, diagnostic: String, remote_mta: Option<String>| RcptStatus {
            rcpt: rcpt.clone(),
            status,
            diagnostic,
            remote_mta,
            orcpt: env.dsn.rcpt(i as usize).orcpt,
        };
        match r {
            Attempted::Delivered(notice) => {
                c.finished.push(i);
                c.results.push((i, Result::Delivered, String::new()));
                if let Some(kind) = notice
                    && wants(i, Notice::Success)
                {
                    let what = match kind {
                        Kind::Relayed => "relayed to a next hop without DSN",
                        _ => "delivered",
                    };
                    c.succeeded
                        .push((kind, line("2.0.0".into(), what.into(), None)));
                }
            }
            Attempted::Failed {
                status,
                diagnostic,
                remote_mta,
            } => {
                c.finished.push(i);
                c.results.push((i, Result::Failed, diagnostic.clone()));
                if wants(i, Notice::Failure) {
                    c.failed.push(line(status, diagnostic, remote_mta));
                }
            }
            Attempted::Deferred { diagnostic, .. } if expired => {
                c.finished.push(i);
                c.results.push((i, Result::Expired, diagnostic.clone()));
                if wants(i, Notice::Failure) {
                    let why = format!(
                        "message expired after {}s in the queue; last error: {diagnostic}",
                        age.as_secs()
                    );
                    c.failed.push(line("4.4.7".into(), why, None));
                }
            }
            Attempted::Deferred { status, diagnostic } => {
                c.results.push((i, Result::Deferred, diagnostic.clone()));
                c.last_error = diagnostic.clone();
                if wants(i, Notice::Delay) {
                    c.deferred.push(line(status, diagnostic, None));
                }
            }
        }
    }
    c
}

/// A delay notice is sent once, when a message that still has deferred recipients who want
/// one has waited `delay_notice` (0 = never).
pub fn delay_notice_due(
    age: Duration,
    delay_notice: Duration,
    already_sent: bool,
    deferred: &[RcptStatus],
) -> bool {
    !delay_notice.is_zero() && age >= delay_notice && !already_sent && !deferred.is_empty()
}

/// The wait before attempt `attempt + 1` (`attempt` ≥ 1): the schedule, last entry repeated
/// (5 minutes when it is empty).
pub fn backoff(schedule: &[Duration], attempt: u32) -> Duration {
    let i = (attempt.max(1) - 1) as usize;
    schedule
        .get(i)
        .or(schedule.last())
        .copied()
        .unwrap_or(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{DsnRequest, RcptDsn};
    use crate::proto::command::notify;

    const HOUR: Duration = Duration::from_secs(3600);
    const LIFETIME: Duration = Duration::from_secs(5 * 86400);

    fn env(from: &str, notify: &[Option<u8>]) -> Envelope {
        let mut e = Envelope::example("Q1", &["a@x.test", "b@x.test", "c@x.test"]);
        e.mail_from = from.into();
        e.dsn = DsnRequest {
            rcpts: notify
                .iter()
                .map(|&n| RcptDsn {
                    notify: n,
                    orcpt: Some("rfc822;orig@x.test".into()),
                })
                .collect(),
            ..DsnRequest::default()
        };
        // (Inbound, from a sender SPF vouched for: every notice asked for may go.)
        e.sender_verified = true;
        e
    }

    fn failed(code: &str) -> Attempted {
        Attempted::Failed {
            status: code.into(),
            diagnostic: format!("{code} no"),
            remote_mta: Some("mx.x.test".into()),
        }
    }

    fn deferred() -> Attempted {
        Attempted::Deferred {
            status: "4.4.1".into(),
            diagnostic: "451 4.4.1 later".into(),
        }
    }

    /// Recipient 0 delivered (with `notice` owed), 1 failed for good, 2 deferred, at `age`.
    fn three_results(e: &Envelope, notice: Option<Kind>, age: Duration) -> Conclusion {
        conclude(
            e,
            vec![
                (0, Attempted::Delivered(notice)),
                (1, failed("5.1.1")),
                (2, deferred()),
            ],
            age,
            LIFETIME,
        )
    }

    fn names(c: &Conclusion) -> Vec<(u32, &'static str)> {
        c.results.iter().map(|(i, r, _)| (*i, r.name())).collect()
    }

    #[test]
    fn every_result_class() {
        let e = env("s@y.test", &[]);
        let c = three_results(&e, None, HOUR);
        assert_eq!(
            names(&c),
            [(0, "delivered"), (1, "failed"), (2, "deferred")]
        );
        assert_eq!(c.finished, [0, 1]);
        // Without NOTIFY: failures and delays are reported, success is not.
        assert!(c.succeeded.is_empty());
        assert_eq!(c.failed.len(), 1);
        assert_eq!(c.failed[0].rcpt, "b@x.test");
        assert_eq!(c.failed[0].remote_mta.as_deref(), Some("mx.x.test"));
        assert_eq!(c.deferred.len(), 1);
        assert_eq!(c.last_error, "451 4.4.1 later");
    }

    #[test]
    fn lifetime_expiry() {
        let e = env("s@y.test", &[]);
        for (age, want) in [
            (LIFETIME - Duration::from_secs(1), "deferred"),
            (LIFETIME, "expired"),
            (LIFETIME + HOUR, "expired"),
        ] {
            let c = conclude(&e, vec![(0, deferred())], age, LIFETIME);
            assert_eq!(names(&c), [(0, want)], "{age:?}");
            if want == "expired" {
                assert_eq!(c.finished, [0]);
                assert_eq!(c.failed[0].status, "4.4.7");
                assert!(
                    c.failed[0]
                        .diagnostic
                        .contains("last error: 451 4.4.1 later")
                );
                assert!(c.deferred.is_empty());
            }
        }
    }

    #[test]
    fn notify_decides_who_hears_what() {
        let never = Some(notify::NEVER);
        let success = Some(notify::SUCCESS);
        let delay = Some(notify::DELAY);
        let e = env("s@y.test", &[success, never, delay]);
        let c = three_results(&e, Some(Kind::Relayed), HOUR);
        assert_eq!(c.succeeded.len(), 1);
        assert_eq!(c.succeeded[0].0, Kind::Relayed);
        assert_eq!(
            c.succeeded[0].1.orcpt.as_deref(),
            Some("rfc822;orig@x.test")
        );
        assert!(c.failed.is_empty(), "NOTIFY=NEVER");
        assert_eq!(c.deferred.len(), 1, "NOTIFY=DELAY");
        // A delivered notice is owed only when asked for and when the hop did not take it on.
        let c = conclude(&e, vec![(0, Attempted::Delivered(None))], HOUR, LIFETIME);
        assert!(c.succeeded.is_empty());
    }

    #[test]
    fn the_null_sender_and_notices_are_never_notified() {
        for (from, bounce) in [("", false), ("s@y.test", true)] {
            let mut e = env(from, &[Some(notify::SUCCESS | notify::FAILURE)]);
            e.is_bounce = bounce;
            let c = three_results(&e, Some(Kind::Delivered), LIFETIME);
            assert_eq!(c.finished, [0, 1, 2]);
            assert!(c.succeeded.is_empty() && c.failed.is_empty() && c.deferred.is_empty());
        }
    }

    #[test]
    fn unverified_inbound_senders_hear_of_failures_only() {
        use crate::delivery::Direction;
        let all = Some(notify::SUCCESS | notify::FAILURE | notify::DELAY);
        for (direction, verified, reflects) in [
            (Direction::Inbound, false, false),
            (Direction::Inbound, true, true),
            (Direction::Outbound, false, true),
        ] {
            let mut e = env("s@y.test", &[all, all, all]);
            (e.direction, e.sender_verified) = (direction, verified);
            assert_eq!(e.reflects(), reflects);
            let c = three_results(&e, Some(Kind::Delivered), HOUR);
            let case = format!("{direction:?} verified={verified}");
            // What is passed on to the next hop too.
            let mut asked = e.dsn.clone();
            asked.ret = Some(crate::delivery::DsnRet::Full);
            asked.rcpts[1].notify = Some(notify::SUCCESS | notify::DELAY);
            asked.rcpts[2].notify = None;
            asked.limit_to_failures(4);
            assert_eq!(asked.ret, Some(crate::delivery::DsnRet::Hdrs));
            let notify_of = |i: usize| asked.rcpts[i].notify;
            assert_eq!(notify_of(0), Some(notify::FAILURE));
            assert_eq!(notify_of(1), Some(notify::NEVER));
            assert_eq!(notify_of(2), Some(notify::FAILURE), "none given");
            assert_eq!(notify_of(3), Some(notify::FAILURE), "no parameters");
            let mut none = crate::delivery::DsnRequest::default();
            none.limit_to_failures(2);
            assert_eq!(none.rcpts.len(), 2);
            assert_eq!(none.ret, Some(crate::delivery::DsnRet::Hdrs));
            assert_eq!(c.failed.len(), 1, "{case}");
            assert_eq!(c.succeeded.len(), usize::from(reflects), "{case}");
            assert_eq!(c.deferred.len(), usize::from(reflects), "{case}");
        }
    }

    #[test]
    fn delay_notices() {
        let line = RcptStatus {
            rcpt: "a@x.test".into(),
            status: "4.4.1".into(),
            diagnostic: String::new(),
            remote_mta: None,
            orcpt: None,
        };
        let some = std::slice::from_ref(&line);
        for (age, every, sent, deferred, want) in [
            (HOUR * 4, HOUR * 4, false, some, true),
            (HOUR * 3, HOUR * 4, false, some, false),
            (HOUR * 5, HOUR * 4, true, some, false),
            (HOUR * 5, HOUR * 4, false, &[][..], false),
            (HOUR * 5, Duration::ZERO, false, some, false),
        ] {
            assert_eq!(
                delay_notice_due(age, every, sent, deferred),
                want,
                "{age:?} {every:?} {sent}"
            );
        }
    }

    #[test]
    fn retry_steps() {
        let s = [60, 300, 1800].map(Duration::from_secs);
        for (attempt, want) in [
            (0, 60),
            (1, 60),
            (2, 300),
            (3, 1800),
            (4, 1800),
            (100, 1800),
        ] {
            assert_eq!(backoff(&s, attempt), Duration::from_secs(want), "{attempt}");
        }
        assert_eq!(backoff(&[], 3), Duration::from_secs(300));
    }
}
