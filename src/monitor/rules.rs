//! Alert rules as a pure state machine: each watched condition (a primary down, the queue too long
//! or too old, the spool nearly full, another service failing) is observed as good or bad at a
//! given time, and [`Rule::observe`] says whether that observation is news: an alert fires once
//! when the condition has been bad for its hold time, is repeated at the reminder interval while it
//! stays bad, and one recovery alert follows when it turns good. Never a storm: between those
//! events nothing is sent, however often the condition is observed.

use crate::lock;
use crate::spool::{Queue, from_micros, to_micros};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// What an observation means for the people who get alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// The condition has been bad for its hold time: tell someone.
    Firing,
    /// Still bad, the reminder interval has passed since the last message.
    Reminder,
    /// It was firing and is good again.
    Recovered,
}

/// The state of one rule for one subject (a domain, the queue, a check).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    /// Since when the condition has been bad without interruption.
    #[serde(with = "micros", default, skip_serializing_if = "Option::is_none")]
    bad_since: Option<SystemTime>,
    /// An alert was sent and no recovery yet.
    #[serde(default)]
    firing: bool,
    /// When the last alert or reminder was sent.
    #[serde(with = "micros", default, skip_serializing_if = "Option::is_none")]
    last_sent: Option<SystemTime>,
}

impl Rule {
    /// Records whether the condition is `bad` at `now`. It fires once it has been bad for `hold`
    /// (zero: at once), reminds every `reminder` while firing (zero: never), and recovers once good.
    pub fn observe(&mut self, bad: bool, now: SystemTime, hold: Duration, reminder: Duration) -> Option<Event> {
        if !bad {
            self.bad_since = None;
            let was_firing = std::mem::take(&mut self.firing);
            self.last_sent = None;
            return was_firing.then_some(Event::Recovered);
        }
        let since = *self.bad_since.get_or_insert(now);
        if !self.firing {
            if elapsed(since, now) < hold {
                return None;
            }
            self.firing = true;
            self.last_sent = Some(now);
            return Some(Event::Firing);
        }
        let last = self.last_sent.unwrap_or(since);
        if !reminder.is_zero() && elapsed(last, now) >= reminder {
            self.last_sent = Some(now);
            return Some(Event::Reminder);
        }
        None
    }

    /// Since when the condition has been bad, if it is.
    pub fn bad_since(&self) -> Option<SystemTime> {
        self.bad_since
    }

    /// Is an alert out for it?
    pub fn is_firing(&self) -> bool {
        self.firing
    }
}

/// Every rule's state, by [`key`].
pub type RuleStates = BTreeMap<String, Rule>;

/// The document in the queue store that keeps [`RuleStates`], so that an alert that is firing
/// stays firing across a restart, and of several nodes sharing a store only one sends each alert.
const DOCUMENT: &str = "alerts";

/// The key of one rule's state: the rule and its subject, and the node for the rules about a
/// node's own things (its spool's disk, the checks it runs), which other nodes see differently.
pub fn key(rule: &str, subject: &str, node: Option<&str>) -> String {
    match node {
        Some(node) => format!("{rule} {subject} @{node}"),
        None => format!("{rule} {subject}"),
    }
}

/// One observation of a round: the state's key, whether the condition is bad, its hold time.
pub type Observation = (String, bool, Duration);

/// What an observation turned out to be: the event and since when the condition was bad.
pub type Decided = Option<(Event, Option<SystemTime>)>;

/// Applies a round's observations to the states kept in `queue` under compare-and-set, so that of
/// several nodes (or of a monitor and the one a reload replaces) only one sees each change as news.
/// When the store cannot be read or written, `known` (the states last read) decides: an alert sent
/// twice is better than one not sent. Blocking: the store may write a file or ask a database.
pub fn decide(queue: &dyn Queue, known: &Mutex<RuleStates>, seen: &[Observation], reminder: Duration) -> Vec<Decided> {
    let now = SystemTime::now();
    for _ in 0..10 {
        let stored = match queue.document(DOCUMENT) {
            Ok(stored) => stored,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the alert rules' state; deciding from the last known");
                break;
            }
        };
        let mut states = match &stored {
            Some((_, body)) => serde_json::from_slice(body).unwrap_or_else(|err| {
                tracing::warn!(error = %err, "the alert rules' stored state does not parse; starting afresh");
                RuleStates::default()
            }),
            None => RuleStates::default(),
        };
        let before = states.clone();
        let decided = apply(&mut states, seen, now, reminder);
        if states != before {
            let body = serde_json::to_vec(&states).unwrap_or_default();
            match queue.replace_document(DOCUMENT, stored.map(|(version, _)| version), body) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot store the alert rules' state; deciding from the last known");
                    break;
                }
            }
        }
        *lock(known) = states;
        return decided;
    }
    apply(&mut lock(known), seen, now, reminder)
}

fn apply(states: &mut RuleStates, seen: &[Observation], now: SystemTime, reminder: Duration) -> Vec<Decided> {
    let decided = seen
        .iter()
        .map(|(key, bad, hold)| {
            let state = states.entry(key.clone()).or_default();
            let since = state.bad_since();
            let event = state.observe(*bad, now, *hold, reminder)?;
            Some((event, if event == Event::Recovered { since } else { state.bad_since() }))
        })
        .collect();
    // A rule with nothing to remember is not kept: the document holds only what is going on.
    states.retain(|_, rule| *rule != Rule::default());
    decided
}

/// `Option<SystemTime>` as microseconds since the epoch, as the queue's own times are.
mod micros {
    use super::{SystemTime, from_micros, to_micros};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &Option<SystemTime>, serializer: S) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => serializer.serialize_i64(to_micros(*at)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SystemTime>, D::Error> {
        Ok(Option::<i64>::deserialize(deserializer)?.map(from_micros))
    }
}

/// Time from `from` to `to`; zero when the clock went backwards.
fn elapsed(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    const MIN: u64 = 60;

    /// Observes `bad` every minute from `from` to `to` (inclusive) and returns the events with times.
    fn run(rule: &mut Rule, bad: bool, from: u64, to: u64, hold: u64, reminder: u64) -> Vec<(u64, Event)> {
        (from..=to)
            .step_by(MIN as usize)
            .filter_map(|t| {
                rule.observe(bad, at(t), Duration::from_secs(hold), Duration::from_secs(reminder)).map(|e| (t, e))
            })
            .collect()
    }

    #[test]
    fn fires_once_after_the_hold_time_then_recovers_once() {
        let mut rule = Rule::default();
        // Down for an hour, observed every minute, hold 10 minutes, no reminders.
        let events = run(&mut rule, true, 0, 60 * MIN, 10 * MIN, 0);
        assert_eq!(events, vec![(10 * MIN, Event::Firing)]);
        assert!(rule.is_firing());
        assert_eq!(rule.bad_since(), Some(at(0)));
        let events = run(&mut rule, false, 61 * MIN, 90 * MIN, 10 * MIN, 0);
        assert_eq!(events, vec![(61 * MIN, Event::Recovered)]);
        assert!(!rule.is_firing());
        assert_eq!(rule.bad_since(), None);
    }

    #[test]
    fn reminders_at_the_interval_counted_from_the_last_message() {
        let mut rule = Rule::default();
        let events = run(&mut rule, true, 0, 5 * 60 * MIN, 30 * MIN, 2 * 60 * MIN);
        assert_eq!(events, vec![(30 * MIN, Event::Firing), (150 * MIN, Event::Reminder), (270 * MIN, Event::Reminder)]);
    }

    #[test]
    fn a_short_outage_says_nothing() {
        let mut rule = Rule::default();
        assert!(run(&mut rule, true, 0, 9 * MIN, 10 * MIN, 0).is_empty());
        assert!(run(&mut rule, false, 10 * MIN, 20 * MIN, 10 * MIN, 0).is_empty());
        // The next outage starts its own hold time.
        assert!(run(&mut rule, true, 21 * MIN, 30 * MIN, 10 * MIN, 0).is_empty());
        assert_eq!(run(&mut rule, true, 31 * MIN, 31 * MIN, 10 * MIN, 0), vec![(31 * MIN, Event::Firing)]);
    }

    #[test]
    fn each_change_of_state_is_told_once() {
        let mut rule = Rule::default();
        let hold = Duration::ZERO;
        let none = Duration::ZERO;
        let seen: Vec<Option<Event>> = [true, true, false, false, true, false]
            .iter()
            .enumerate()
            .map(|(i, &bad)| rule.observe(bad, at(i as u64 * MIN), hold, none))
            .collect();
        assert_eq!(
            seen,
            vec![Some(Event::Firing), None, Some(Event::Recovered), None, Some(Event::Firing), Some(Event::Recovered)]
        );
    }

    /// Two monitors over one store (two nodes, or a monitor and the one a reload replaced) see
    /// each change once between them, and the state survives in the store (a restart).
    #[test]
    fn the_store_keeps_the_state_and_one_monitor_tells() {
        let queue = crate::spool::MemoryQueue::new();
        let (node_a, node_b) = (Mutex::new(RuleStates::default()), Mutex::new(RuleStates::default()));
        let down = vec![(key("primary_down", "example.test", None), true, Duration::ZERO)];
        let first = decide(queue.as_ref(), &node_a, &down, Duration::ZERO);
        assert!(matches!(first[0], Some((Event::Firing, Some(_)))), "{first:?}");
        assert_eq!(decide(queue.as_ref(), &node_b, &down, Duration::ZERO), vec![None], "told once");
        assert!(lock(&node_b).values().all(Rule::is_firing), "the other node learnt it");
        let restarted = Mutex::new(RuleStates::default());
        assert_eq!(decide(queue.as_ref(), &restarted, &down, Duration::ZERO), vec![None], "kept across a restart");
        let up = vec![(key("primary_down", "example.test", None), false, Duration::ZERO)];
        let recovered = decide(queue.as_ref(), &node_b, &up, Duration::ZERO);
        assert!(matches!(recovered[0], Some((Event::Recovered, Some(_)))), "{recovered:?}");
        assert_eq!(decide(queue.as_ref(), &node_a, &up, Duration::ZERO), vec![None]);
        // Nothing going on: nothing kept.
        let (_, body) = queue.document(DOCUMENT).unwrap().unwrap();
        assert_eq!(body, b"{}");
        // A node's own rules are its own.
        let full_a = vec![(key("spool_space", "spool", Some("a")), true, Duration::ZERO)];
        let full_b = vec![(key("spool_space", "spool", Some("b")), true, Duration::ZERO)];
        assert!(decide(queue.as_ref(), &node_a, &full_a, Duration::ZERO)[0].is_some());
        assert!(decide(queue.as_ref(), &node_b, &full_b, Duration::ZERO)[0].is_some());
    }

    #[test]
    fn clock_going_backwards_does_not_fire() {
        let mut rule = Rule::default();
        assert_eq!(rule.observe(true, at(600), Duration::from_secs(60), Duration::ZERO), None);
        assert_eq!(rule.observe(true, at(0), Duration::from_secs(60), Duration::ZERO), None);
    }
}
