//! Parsers for flag values shared by subcommands: byte sizes and durations.

use std::time::Duration;

/// Parses a byte size: `1048576`, `64KiB`, `1MiB`, `8M`, `2k` (K/M/G are binary units).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: usize = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 65536, 64KiB, 1MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB or GiB)"
            ))
        }
    };
    let size = number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if size == 0 {
        return Err("the size must be greater than zero".into());
    }
    Ok(size)
}

/// Parses a count that must be at least 1.
pub fn parse_positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

/// Parses a human duration (`100ms`, `5s`, `1m 30s`) of at most
/// [`hubcast::MAX_DURATION`] (issue #10: `500000000000y` was accepted, then overflowed).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration ({e}; examples: 100ms, 5s, 2m)"))?;
    if duration > hubcast::MAX_DURATION {
        return Err(format!(
            "{text:?} is longer than the longest duration allowed, {}",
            humantime::format_duration(hubcast::MAX_DURATION)
        ));
    }
    Ok(duration)
}

/// [`parse_duration`], and more than zero (for timeouts and intervals, where zero
/// cannot work: `--idle-timeout 0s` closed every client at once).
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("{text:?}: must be more than zero")),
        duration => Ok(duration),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn positive_counts() {
        assert_eq!(parse_positive("10"), Ok(10));
        assert!(parse_positive("0").is_err());
        assert!(parse_positive("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("500000000000y").is_err());
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_positive_duration("0s").is_err());
        assert!(parse_positive_duration("1ms").is_ok());
    }
}
