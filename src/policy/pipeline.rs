//! The policy pipeline: the decisions a session asks for go through one ordered list of checks
//! per binding, stage by stage, as in Postfix's `smtpd_*_restrictions` or Haraka's hooks:
//!
//! ```text
//! connect ─▶ helo ─▶ mail ─▶ rcpt (per recipient) ─▶ data (end of data, header section)
//! ```
//!
//! A check is a small type implementing [`Check`] for one [`Stage`]; it sees a [`Request`]
//! (borrowed, no I/O, no clock: `now` is given) and answers a [`Decision`]:
//! `Continue` (no objection: the next check runs), `Reject` (this command or message is
//! refused, and with [`Refusal::close`] the session ends), `Defer` (the answer needs work off the
//! core — DNS, a callout, a signature — done by a [`crate::workers::Workers`] pool; the
//! session waits for it and the pipeline goes on with its answer), `AddHeader` (at `Data`: a
//! field prepended to the message; the runtime uses headers from that stage only) or `Mark`
//! (at `Rcpt`: a property of the recipient that routes and headers use, like the whitelist
//! verdict). The first `Reject` ends the stage.
//!
//! [`Pipeline::for_binding`] builds the list once per binding and configuration generation;
//! the runtime calls [`Pipeline::run`] and applies the outcome. Adding a check: a type in
//! `policy/`, its table tests next to it, one line in `for_binding` at the place in its stage
//! where it belongs.

use std::net::IpAddr;
use std::sync::Arc;

use crate::metrics::Reason;
use crate::proto::reply::Reply;

/// When a check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A new connection (after a PROXY header, the client it names), before the greeting.
    Connect,
    Helo,
    Mail,
    /// Once per recipient.
    Rcpt,
    /// The whole message was received; the header section is known.
    Data,
}

const STAGES: usize = 5;

impl Stage {
    fn index(self) -> usize {
        match self {
            Stage::Connect => 0,
            Stage::Helo => 1,
            Stage::Mail => 2,
            Stage::Rcpt => 3,
            Stage::Data => 4,
        }
    }
}

/// What a check sees. Fields that do not exist yet at a stage are empty.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub ip: IpAddr,
    pub authenticated: bool,
    pub helo: &'a str,
    /// Empty for the null sender `<>`.
    pub mail_from: &'a str,
    /// At `Rcpt`: the recipient being checked; empty before.
    pub rcpt: &'a str,
    /// At `Rcpt`: its domain (empty for the bare `<Postmaster>`).
    pub rcpt_domain: &'a str,
    /// Recipients refused as unknown so far in this session.
    pub unknown_rcpts: usize,
    /// At `Data`: the header section as received (up to and including the empty line, or
    /// everything held in memory when it did not end there).
    pub header: &'a [u8],
    /// At `Data`: `header` is the whole header section.
    pub header_complete: bool,
    /// At `Data`: the whole message as staged (memory and spill file).
    pub content: Option<&'a crate::spool::staging::Staged>,
    /// Seconds since the Unix epoch.
    pub now: u32,
    /// A monotonic clock in milliseconds (rate limits).
    pub clock_ms: u64,
}

impl<'a> Request<'a> {
    /// A request at connect time.
    pub fn new(ip: IpAddr, now: u32) -> Request<'a> {
        Request {
            ip,
            authenticated: false,
            helo: "",
            mail_from: "",
            rcpt: "",
            rcpt_domain: "",
            unknown_rcpts: 0,
            header: &[],
            header_complete: true,
            content: None,
            now,
            clock_ms: 0,
        }
    }
}

/// A refusal: the reply, the metrics reason and a few words for the log; with `close`, the
/// session then ends with that reply (counted as that reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reply: &'static Reply,
    pub reason: Reason,
    pub log: &'static str,
    pub close: Option<(&'static Reply, Reason)>,
    /// What the check established that led to it, for the log line (the SPF, DKIM and DMARC
    /// results of a message refused for DMARC).
    pub detail: Option<Arc<str>>,
}

impl Refusal {
    pub const fn new(reply: &'static Reply, reason: Reason, log: &'static str) -> Refusal {
        Refusal {
            reply,
            reason,
            log,
            close: None,
            detail: None,
        }
    }

    /// The same refusal, with `detail` for the log line.
    pub fn with_detail(self, detail: impl std::fmt::Display) -> Refusal {
        Refusal {
            detail: Some(detail.to_string().into()),
            ..self
        }
    }
}

/// Work off the core; its answer is the check's decision.
pub enum Job {
    /// Blocking work for the policy workers.
    Blocking(Box<dyn FnOnce() -> Decision + Send>),
    /// Work already running as a task elsewhere (lookups on the resolver's runtime, which
    /// wait for DNS without holding a thread); its answer arrives here.
    Running(tokio::sync::oneshot::Receiver<Decision>),
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Job::Blocking(_) => "Blocking",
            Job::Running(_) => "Running",
        })
    }
}

impl Job {
    pub fn blocking(f: impl FnOnce() -> Decision + Send + 'static) -> Job {
        Job::Blocking(Box::new(f))
    }

    /// Do the work here, or wait for it (tests).
    #[cfg(test)]
    pub(crate) fn wait(self) -> Decision {
        match self {
            Job::Blocking(f) => f(),
            Job::Running(rx) => rx.blocking_recv().unwrap_or(Decision::Continue),
        }
    }
}

/// What SPF and DKIM established about a message (the `authenticate` check).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authenticated {
    /// The MAIL FROM domain, when SPF passed for it (lower case).
    pub spf: Option<String>,
    /// The `d=` domains of the DKIM signatures that passed (lower case).
    pub dkim: Vec<String>,
    /// The results as RFC 8601 words: SPF, each DKIM signature, DMARC.
    pub spf_result: &'static str,
    pub dkim_results: Vec<&'static str>,
    pub dmarc_result: &'static str,
    /// The From domain's DMARC policy is `reject`.
    pub dmarc_policy_reject: bool,
    /// The From domain's DMARC policy is `quarantine`.
    pub dmarc_policy_quarantine: bool,
    /// The From: address, lower case (empty unless the message has exactly one).
    pub from: String,
    /// DMARC has no single domain to judge: From: names addresses in more than one domain, or
    /// one that is no DNS name, or is written so that readers may see another domain than the
    /// parser (several From: fields, a domain split by a comment, an address with two `@`, a
    /// domain in the text that no parsed address has, an `@` in an encoded word), or the
    /// header block could not be read to its end.
    pub ambiguous_from: bool,
}

impl Authenticated {
    /// Failed DMARC where the From domain asks for quarantine, or for reject (a message that
    /// reaches the routes was not refused: `dmarc_reject` is off).
    /// A From: naming several domains (DMARC has no single answer for it) is quarantined too.
    pub fn quarantine(&self) -> bool {
        (self.dmarc_result == "fail" && (self.dmarc_policy_quarantine || self.dmarc_policy_reject))
            || self.ambiguous_from
    }
}

/// The results for a log line: `spf=pass dkim=pass,fail dmarc=pass` (`dkim=none` without a
/// signature verified).
impl std::fmt::Display for Authenticated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spf={} dkim=", self.spf_result)?;
        if self.dkim_results.is_empty() {
            f.write_str("none")?;
        }
        for (i, r) in self.dkim_results.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(r)?;
        }
        write!(f, " dmarc={}", self.dmarc_result)?;
        if self.dmarc_result == "fail" {
            // The policy applied (after pct= and t=y).
            f.write_str(if self.dmarc_policy_reject {
                " policy=reject"
            } else if self.dmarc_policy_quarantine {
                " policy=quarantine"
            } else {
                " policy=none"
            })?;
        }
        if self.ambiguous_from {
            f.write_str(" from=unjudgeable")?;
        }
        Ok(())
    }
}

/// A property set by a check: of a recipient (at `Rcpt`) or of the message (at `Data`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    /// The Auto Sender Whitelist's verdict for this sender and recipient.
    Whitelisted(bool),
    /// The sender authentication results of the message.
    Authenticated(Arc<Authenticated>),
}

/// A check's answer.
pub enum Decision {
    Continue,
    Reject(Refusal),
    Defer(Job),
    AddHeader(String),
    Mark(Mark),
    /// Several answers in order (e.g. a header and a mark); the first stop ends it.
    All(Vec<Decision>),
}

impl std::fmt::Debug for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Continue => f.write_str("Continue"),
            Decision::Reject(r) => f.debug_tuple("Reject").field(r).finish(),
            Decision::Defer(_) => f.write_str("Defer"),
            Decision::AddHeader(h) => f.debug_tuple("AddHeader").field(h).finish(),
            Decision::Mark(m) => f.debug_tuple("Mark").field(m).finish(),
            Decision::All(d) => f.debug_tuple("All").field(d).finish(),
        }
    }
}

/// One check at one stage.
pub trait Check: Send + Sync + std::fmt::Debug {
    /// Its name in logs.
    fn name(&self) -> &'static str;
    fn stage(&self) -> Stage;
    fn check(&self, r: &Request<'_>) -> Decision;
    /// How long its deferred work may take (`None`: the command timeout).
    fn time_limit(&self) -> Option<std::time::Duration> {
        None
    }
    /// The answer when its deferred work cannot run or does not finish in time: by default
    /// `451 4.3.0` (never a pass); a check whose failure means "no information", such as a
    /// DNS list, answers `Continue`.
    fn unavailable(&self) -> Decision {
        Decision::Reject(Refusal::new(
            &crate::proto::reply::POLICY_BUSY,
            Reason::Busy,
            "deferred: policy workers busy, failed or too slow",
        ))
    }
}

/// Where a stage's run stopped.
#[derive(Debug)]
pub enum Outcome {
    /// Every check passed (with the headers and marks they added).
    Accept(Effects),
    Reject(Refusal),
    /// Run `job` off the core, then [`Pipeline::resume`] with its decision.
    Defer(Deferred),
}

/// Headers and marks gathered during a run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    pub headers: Vec<String>,
    pub marks: Vec<Mark>,
}

impl Effects {
    /// The whitelist verdict, when a check set one.
    pub fn whitelisted(&self) -> Option<bool> {
        self.marks.iter().find_map(|m| match m {
            Mark::Whitelisted(v) => Some(*v),
            Mark::Authenticated(_) => None,
        })
    }

    /// The sender authentication results, when the `authenticate` check gave them.
    pub fn authenticated(&self) -> Option<Arc<Authenticated>> {
        self.marks.iter().find_map(|m| match m {
            Mark::Authenticated(a) => Some(a.clone()),
            Mark::Whitelisted(_) => None,
        })
    }
}

/// A run waiting for work off the core: run `job` elsewhere, then hand its decision and
/// `resume` to [`Pipeline::resume`].
pub struct Deferred {
    pub job: Job,
    pub resume: Resume,
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred")
            .field("resume", &self.resume)
            .finish_non_exhaustive()
    }
}

/// Where a deferred run goes on.
#[derive(Debug)]
pub struct Resume {
    stage: Stage,
    /// The check that deferred.
    at: usize,
    effects: Effects,
}

impl Resume {
    /// The check the run waits for: its stage and place (the same when a check's work defers
    /// again, having moved elsewhere).
    pub fn waiting_for(&self) -> (Stage, usize) {
        (self.stage, self.at)
    }
}

/// The ordered checks of one binding.
#[derive(Debug, Default)]
pub struct Pipeline {
    stages: [Vec<Arc<dyn Check>>; STAGES],
}

impl Pipeline {
    /// A pipeline of `checks`, in the order given within each stage.
    pub fn new(checks: Vec<Arc<dyn Check>>) -> Pipeline {
        let mut p = Pipeline::default();
        for c in checks {
            if let Some(list) = p.stages.get_mut(c.stage().index()) {
                list.push(c);
            }
        }
        p
    }

    /// The names of a stage's checks, in order (for logs and tests).
    pub fn names(&self, stage: Stage) -> Vec<&'static str> {
        self.checks(stage).iter().map(|c| c.name()).collect()
    }

    fn checks(&self, stage: Stage) -> &[Arc<dyn Check>] {
        self.stages.get(stage.index()).map_or(&[], Vec::as_slice)
    }

    /// Run a stage's checks in order.
    pub fn run(&self, stage: Stage, r: &Request<'_>) -> Outcome {
        self.run_from(stage, 0, Effects::default(), r)
    }

    /// The check a deferred run waits for.
    fn deferred_check(&self, r: &Resume) -> Option<&Arc<dyn Check>> {
        self.checks(r.stage).get(r.at)
    }

    /// How long the deferred check may take (`None`: the caller's default).
    pub fn time_limit(&self, r: &Resume) -> Option<std::time::Duration> {
        self.deferred_check(r).and_then(|c| c.time_limit())
    }

    /// The deferred check's answer when its work cannot run or times out.
    pub fn unavailable(&self, r: &Resume) -> Decision {
        match self.deferred_check(r) {
            Some(c) => c.unavailable(),
            None => Decision::Continue,
        }
    }

    /// Go on after a deferred check answered `decision`.
    pub fn resume(&self, resume: Resume, decision: Decision, r: &Request<'_>) -> Outcome {
        let Resume {
            stage,
            at,
            mut effects,
        } = resume;
        match apply(decision, &mut effects) {
            Some(Applied::Stop(o)) => o,
            Some(Applied::Defer(job)) => Outcome::Defer(Deferred {
                job,
                resume: Resume { stage, at, effects },
            }),
            None => self.run_from(stage, at + 1, effects, r),
        }
    }

    fn run_from(
        &self,
        stage: Stage,
        start: usize,
        mut effects: Effects,
        r: &Request<'_>,
    ) -> Outcome {
        for (at, c) in self.checks(stage).iter().enumerate().skip(start) {
            match apply(c.check(r), &mut effects) {
                None => {}
                Some(Applied::Stop(o)) => return o,
                Some(Applied::Defer(job)) => {
                    return Outcome::Defer(Deferred {
                        job,
                        resume: Resume { stage, at, effects },
                    });
                }
            }
        }
        Outcome::Accept(effects)
    }
}

enum Applied {
    Stop(Outcome),
    Defer(Job),
}

fn apply(d: Decision, effects: &mut Effects) -> Option<Applied> {
    match d {
        Decision::Continue => None,
        Decision::AddHeader(h) => {
            effects.headers.push(h);
            None
        }
        Decision::Mark(m) => {
            effects.marks.push(m);
            None
        }
        Decision::Reject(r) => Some(Applied::Stop(Outcome::Reject(r))),
        Decision::Defer(job) => Some(Applied::Defer(job)),
        Decision::All(all) => all.into_iter().find_map(|d| apply(d, effects)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::reply;

    /// A check that answers from a table keyed by recipient.
    #[derive(Debug)]
    struct Table(Stage, &'static str, fn(&Request<'_>) -> Decision);
    impl Check for Table {
        fn name(&self) -> &'static str {
            self.1
        }
        fn stage(&self) -> Stage {
            self.0
        }
        fn check(&self, r: &Request<'_>) -> Decision {
            (self.2)(r)
        }
    }

    const DENIED: Refusal = Refusal::new(&reply::RELAY_DENIED, Reason::RelayDenied, "denied");
    const CLOSED: Refusal = Refusal {
        reply: &reply::RELAY_DENIED,
        reason: Reason::RelayDenied,
        log: "denied",
        close: Some((&reply::TOO_MANY_UNKNOWN, Reason::Harvest)),
        detail: None,
    };

    fn pipeline() -> Pipeline {
        Pipeline::new(vec![
            Arc::new(Table(Stage::Rcpt, "header", |_| {
                Decision::AddHeader("X-A: 1".into())
            })),
            Arc::new(Table(Stage::Rcpt, "deny-bad", |r| {
                if r.rcpt == "bad@x" {
                    Decision::Reject(DENIED)
                } else {
                    Decision::Continue
                }
            })),
            Arc::new(Table(Stage::Rcpt, "slow", |r| {
                if r.rcpt.starts_with("slow") {
                    let close = r.rcpt == "slow-close@x";
                    Decision::Defer(Job::blocking(move || {
                        if close {
                            Decision::Reject(CLOSED)
                        } else {
                            Decision::Mark(Mark::Whitelisted(true))
                        }
                    }))
                } else {
                    Decision::Continue
                }
            })),
            Arc::new(Table(Stage::Rcpt, "mark", |_| {
                Decision::Mark(Mark::Whitelisted(false))
            })),
            Arc::new(Table(Stage::Mail, "mail", |_| Decision::Continue)),
        ])
    }

    fn rcpt(to: &str) -> Request<'_> {
        Request {
            rcpt: to,
            ..Request::new([192, 0, 2, 1].into(), 0)
        }
    }

    #[test]
    fn checks_run_in_order_per_stage() {
        let p = pipeline();
        assert_eq!(p.names(Stage::Rcpt), ["header", "deny-bad", "slow", "mark"]);
        assert_eq!(p.names(Stage::Mail), ["mail"]);
        assert!(p.names(Stage::Connect).is_empty());
        assert!(matches!(
            p.run(Stage::Connect, &rcpt("a@x")),
            Outcome::Accept(e) if e == Effects::default()
        ));
    }

    #[test]
    fn outcomes() {
        let p = pipeline();
        match p.run(Stage::Rcpt, &rcpt("a@x")) {
            Outcome::Accept(e) => {
                assert_eq!(e.headers, ["X-A: 1"]);
                assert_eq!(e.whitelisted(), Some(false));
            }
            o => panic!("{o:?}"),
        }
        // The first refusal ends the stage: later checks add nothing.
        assert!(matches!(p.run(Stage::Rcpt, &rcpt("bad@x")), Outcome::Reject(r) if r == DENIED));
    }

    #[test]
    fn deferred_checks_resume_after_their_answer() {
        let p = pipeline();
        let r = rcpt("slow@x");
        let Outcome::Defer(d) = p.run(Stage::Rcpt, &r) else {
            panic!("not deferred")
        };
        // The job runs elsewhere; the run resumes with the checks after it.
        let answer = std::thread::spawn(move || d.job.wait()).join().unwrap();
        match p.resume(d.resume, answer, &r) {
            Outcome::Accept(e) => {
                assert_eq!(
                    e.headers,
                    ["X-A: 1"],
                    "headers from before the deferral are kept"
                );
                // The deferred mark first, then the later check's.
                assert_eq!(e.marks, [Mark::Whitelisted(true), Mark::Whitelisted(false)]);
            }
            o => panic!("{o:?}"),
        }
        let r = rcpt("slow-close@x");
        let Outcome::Defer(d) = p.run(Stage::Rcpt, &r) else {
            panic!("not deferred")
        };
        let answer = d.job.wait();
        assert!(matches!(p.resume(d.resume, answer, &r), Outcome::Reject(c) if c == CLOSED));
    }
}
