//! Alert rules as a pure state machine: each watched condition (a primary down, the queue too long
//! or too old, the spool nearly full, another service failing) is observed as good or bad at a
//! given time, and [`Rule::observe`] says whether that observation is news: an alert fires once
//! when the condition has been bad for its hold time, is repeated at the reminder interval while it
//! stays bad, and one recovery alert follows when it turns good. Never a storm: between those
//! events nothing is sent, however often the condition is observed.

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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// Since when the condition has been bad without interruption.
    bad_since: Option<SystemTime>,
    /// An alert was sent and no recovery yet.
    firing: bool,
    /// When the last alert or reminder was sent.
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

    #[test]
    fn clock_going_backwards_does_not_fire() {
        let mut rule = Rule::default();
        assert_eq!(rule.observe(true, at(600), Duration::from_secs(60), Duration::ZERO), None);
        assert_eq!(rule.observe(true, at(0), Duration::from_secs(60), Duration::ZERO), None);
    }
}
