//! Durations as written in the config: a whole number and a unit, `250ms`, `5s`, `2m`, `1h`, `365d`.

use std::time::Duration;

pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like \"250ms\", \"5s\", \"2m\" or \"1h\""))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        _ => {
            return Err(format!(
                "{s:?} has no unit: write \"{n}s\", \"{n}ms\", \"{n}m\" or \"{n}h\""
            ));
        }
    };
    if d.is_zero() {
        return Err(format!("{s:?} is zero: a timeout must be positive"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("365d"), Ok(Duration::from_secs(31_536_000)));
        assert!(parse("5").is_err());
        assert!(parse("0s").is_err());
        assert!(parse("s").is_err());
    }
}
