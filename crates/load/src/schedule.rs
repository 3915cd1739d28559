//! When each request is due: arrival rates ramped linearly from stage to stage (k6's
//! `ramping-arrival-rate`).

use std::time::Duration;

use crate::Stage;

/// The due times (from the start) of every request of `stages`, starting at `start_rate`
/// requests a second. Request number `n` (from 0) is due when the integral of the rate reaches
/// `n`: a constant 200 rps for 2 s gives 400 requests, 5 ms apart, the first at once.
pub fn due_times(start_rate: f64, stages: &[Stage]) -> Vec<Duration> {
    let mut due = Vec::new();
    let (mut offset, mut sent_before, mut rate) = (0.0_f64, 0.0_f64, start_rate);
    let mut next = 0.0_f64;
    for stage in stages {
        let length = stage.duration.as_secs_f64();
        let (from, to) = (rate, stage.target);
        let in_stage = (from + to) / 2.0 * length;
        // Rounding must not add a request at the very end of a stage.
        while next < sent_before + in_stage - 1e-9 {
            let at = time_to_reach(from, to, length, next - sent_before);
            due.push(Duration::from_secs_f64(offset + at));
            next += 1.0;
        }
        offset += length;
        sent_before += in_stage;
        rate = to;
    }
    due
}

/// How many requests `due_times` gives, without making them: the area under the rate
/// (requests number 0, 1, … below it are due).
pub(crate) fn due_count(start_rate: f64, stages: &[Stage]) -> usize {
    let area = requests_due(start_rate, stages);
    (area - 1e-9).ceil().max(0.0) as usize
}

/// The area under the rate of `stages`: requests due in all, fractional.
pub(crate) fn requests_due(start_rate: f64, stages: &[Stage]) -> f64 {
    let (mut rate, mut sum) = (start_rate, 0.0);
    for stage in stages {
        sum += (rate + stage.target) / 2.0 * stage.duration.as_secs_f64();
        rate = stage.target;
    }
    sum
}

/// The time within a stage ramping from `from` to `to` requests a second over `length`
/// seconds at which `count` requests have been due: the root of
/// `(to - from) / (2 length) t² + from t = count`.
fn time_to_reach(from: f64, to: f64, length: f64, count: f64) -> f64 {
    let a = (to - from) / (2.0 * length);
    if a.abs() < 1e-12 {
        return if from > 0.0 { count / from } else { 0.0 };
    }
    let discriminant = (from * from + 4.0 * a * count).max(0.0);
    ((-from + discriminant.sqrt()) / (2.0 * a)).clamp(0.0, length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(seconds: u64, target: f64) -> Stage {
        Stage {
            duration: Duration::from_secs(seconds),
            target,
        }
    }

    #[test]
    fn a_constant_rate_is_evenly_spaced() {
        let due = due_times(200.0, &[stage(2, 200.0)]);
        assert_eq!(due.len(), 400);
        assert_eq!(due[0], Duration::ZERO);
        assert_eq!(due[1], Duration::from_millis(5));
        assert_eq!(due[399], Duration::from_millis(1995));
    }

    #[test]
    fn ramps_send_the_area_under_the_rate() {
        // 0 → 100 rps over 10 s, 100 for 10 s, 100 → 0 over 10 s: 500 + 1000 + 500.
        let due = due_times(0.0, &[stage(10, 100.0), stage(10, 100.0), stage(10, 0.0)]);
        assert_eq!(due.len(), 2000);
        assert!(due.windows(2).all(|w| w[0] <= w[1]), "in order");
        let in_second = |s: u64| due.iter().filter(|d| d.as_secs() == s).count();
        // The rising ramp sends 5 in its first second and 95 in its last.
        assert_eq!((in_second(0), in_second(9)), (5, 95));
        assert_eq!(in_second(15), 100);
        assert_eq!((in_second(20), in_second(29)), (95, 5));
        assert!(due[1999] < Duration::from_secs(30));
    }

    #[test]
    fn the_count_without_the_times_is_the_same() {
        let cases: [(f64, &[Stage]); 5] = [
            (200.0, &[stage(2, 200.0)]),
            (0.0, &[stage(10, 100.0), stage(10, 100.0), stage(10, 0.0)]),
            (0.0, &[stage(5, 0.0), stage(1, 10.0)]),
            (5.0, &[stage(10, 50.0), stage(1, 0.0)]),
            (0.0, &[stage(3, 0.0)]),
        ];
        for (start, stages) in cases {
            assert_eq!(
                due_count(start, stages),
                due_times(start, stages).len(),
                "{stages:?}"
            );
        }
    }

    #[test]
    fn a_stage_at_rate_zero_only_waits() {
        let due = due_times(0.0, &[stage(5, 0.0), stage(1, 10.0)]);
        assert_eq!(due.len(), 5);
        assert!(due.iter().all(|d| *d >= Duration::from_secs(5)), "{due:?}");
    }
}
