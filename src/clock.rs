//! Wall-clock time as the program shows and stores it: Unix seconds, and the two ways people
//! read them (a date, an age).

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

/// Unix time now, in seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-01-01 12:00:00 UTC`
pub fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// `6 d 3 h`, `5 h 12 min`, `42 min`, `30 s`
pub fn format_age(secs: i64) -> String {
    let secs = secs.max(0);
    if secs >= DAY {
        format!("{} d {} h", secs / DAY, secs % DAY / HOUR)
    } else if secs >= HOUR {
        format!("{} h {} min", secs / HOUR, secs % HOUR / 60)
    } else if secs >= 60 {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}
