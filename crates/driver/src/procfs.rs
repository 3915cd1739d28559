//! CPU time and resident memory of a process, from `/proc` (what `ps` and `top` read).

use crate::Usage;

/// The usage of process `pid`, or `None` when it is gone.
pub(crate) fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    parse(&stat, &statm, ticks_per_second(), page_size())
}

/// Parses `/proc/PID/stat` (utime and stime are fields 14 and 15, counted after the command
/// name, which may hold spaces and parentheses) and `/proc/PID/statm` (resident pages second).
fn parse(stat: &str, statm: &str, ticks: f64, page: u64) -> Option<Usage> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state): utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(Usage {
        cpu_seconds: (utime + stime) / ticks,
        rss_bytes: resident * page,
    })
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let stat = "4242 (my (odd) app) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 1 0 \
                    100 1000000 300 18446744073709551615";
        let usage = parse(stat, "2500 300 200 1 0 400 0\n", 100.0, 4096).unwrap();
        assert_eq!(usage.cpu_seconds, 3.0);
        assert_eq!(usage.rss_bytes, 300 * 4096);
        assert!(parse("garbage", "1 2", 100.0, 4096).is_none());
    }

    #[test]
    fn this_process_uses_memory_and_cpu() {
        let mut spin = 0u64;
        for i in 0..3_000_000u64 {
            spin = spin.wrapping_add(i * i);
        }
        assert!(spin > 0);
        let mine = usage(std::process::id()).unwrap();
        assert!(mine.rss_bytes > 1 << 20, "{mine:?}");
        assert!(mine.cpu_seconds > 0.0, "{mine:?}");
        assert!(usage(u32::MAX - 1).is_none());
    }
}
