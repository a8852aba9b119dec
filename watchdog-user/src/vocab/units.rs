//! Humane values and the clocks' units: durations, sizes, percents and signal names
//! parsed as people write them (each refusal names an example that works), sizes shown
//! as people read them, and the time formats of records and replies.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `90s`, `30m`, `1h 30m`: a positive duration (clap value parser).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration {text:?} ({e}): use a positive duration such as 90s, 30m or 2h")
    })?;
    if duration.is_zero() {
        return Err(format!(
            "invalid duration {text:?}: it must be more than 0, such as 90s or 30m"
        ));
    }
    Ok(duration)
}

/// `512MiB`, `2GiB`, `1.5G`: a positive size in bytes (clap value parser).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let size: bytesize::ByteSize = text
        .trim()
        .parse()
        .map_err(|e| format!("invalid size {text:?} ({e}): use a size such as 512MiB or 2GiB"))?;
    if size.as_u64() == 0 {
        return Err(format!(
            "invalid size {text:?}: it must be more than 0, such as 512MiB or 2GiB"
        ));
    }
    Ok(size.as_u64())
}

/// `bytes` for people, with one decimal in the largest unit that fits, rounded down
/// (`up`: up). Rounded down, a figure passed back as a limit is never more than `bytes`.
pub fn size_rounded(bytes: u64, up: bool) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let Some(unit) = (0..UNITS.len()).rev().find(|u| bytes >> (10 * (u + 1)) > 0) else {
        return format!("{bytes} B");
    };
    let scale = 1u128 << (10 * (unit + 1));
    let scaled = u128::from(bytes) * 10;
    let tenths = if up {
        scaled.div_ceil(scale)
    } else {
        scaled / scale
    };
    match tenths % 10 {
        0 => format!("{} {}", tenths / 10, UNITS[unit]),
        tenth => format!("{}.{tenth} {}", tenths / 10, UNITS[unit]),
    }
}

/// `80%` or `80`: the warning's percent of a limit, 1 to 99; `off` or `0`: none (clap
/// value parser).
pub fn parse_percent(text: &str) -> Result<u8, String> {
    let text = text.trim();
    if text == "off" {
        return Ok(0);
    }
    match text.trim_end_matches('%').trim().parse::<u8>() {
        Ok(p) if p < 100 => Ok(p),
        _ => Err(format!(
            "invalid percentage {text:?}: use 1% to 99% of the limit, such as 80%, or off"
        )),
    }
}

/// `SIGUSR1`, `USR1` or `sigusr1`: a signal a process can catch, by its full name.
/// SIGKILL and SIGSTOP cannot be caught, so they warn nobody.
pub fn parse_warn_signal(text: &str) -> Result<String, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    match name.parse::<nix::sys::signal::Signal>() {
        Ok(nix::sys::signal::Signal::SIGKILL | nix::sys::signal::Signal::SIGSTOP) => Err(format!(
            "the warning signal {name} cannot be caught, so it warns nobody: use one a \
             program can trap, such as SIGUSR1"
        )),
        Ok(signal) => Ok(signal.as_str().to_string()),
        Err(_) => Err(format!(
            "invalid signal {text:?}: use a signal name such as SIGUSR1, SIGUSR2 or SIGINT"
        )),
    }
}

pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, millis)
}

/// Milliseconds from `now` until `at`, negative when it has passed.
pub fn signed_ms_until(at: Instant, now: Instant) -> i64 {
    match at.checked_duration_since(now) {
        Some(left) => i64::try_from(left.as_millis()).unwrap_or(i64::MAX),
        None => -i64::try_from(now.duration_since(at).as_millis()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humane_values_parse_and_nonsense_is_refused_with_an_example() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        for bad in ["-5s", "0s", "soon"] {
            assert!(parse_duration(bad).unwrap_err().contains("90s"), "{bad}");
        }
        for bad in ["lots", "0", "-1MiB"] {
            assert!(parse_size(bad).unwrap_err().contains("512MiB"), "{bad}");
        }
    }

    #[test]
    fn sizes_rounded_down_parse_back_to_no_more_than_they_show() {
        let machine = 25_163_055_104; // 23.43 GiB
        assert_eq!(size_rounded(machine, false), "23.4 GiB");
        assert_eq!(size_rounded(machine, true), "23.5 GiB");
        assert_eq!(size_rounded(64 << 30, true), "64 GiB");
        assert_eq!(size_rounded(512, false), "512 B");
        assert!(parse_size(&size_rounded(machine, false)).unwrap() <= machine);
    }
}
