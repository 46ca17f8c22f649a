//! How long a stored grant lives: Google's announced end, and the 7-day limit of apps in
//! Testing, with what to do before either hits.

use crate::clock::{format_age, format_time};

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

/// What to do about a refresh token that will soon stop working, if anything: Google announced
/// its end and that is within a day, or it is in its seventh day (apps in Testing get 7 days).
pub fn refresh_token_attention(
    email: &str,
    obtained_at: Option<i64>,
    expires_at: Option<i64>,
    now: i64,
) -> Option<String> {
    if let Some(end) = expires_at {
        return if end <= now {
            Some(format!(
                "Google ended this grant at {}; run `xoauth2-proxy login {email}`",
                format_time(end)
            ))
        } else if end - now < DAY {
            Some(format!(
                "Google ends this grant at {} (in {}); run `xoauth2-proxy login {email}` before then",
                format_time(end),
                format_age(end - now)
            ))
        } else {
            None
        };
    }
    let obtained_at = obtained_at?;
    let age = now - obtained_at;
    (6 * DAY..7 * DAY).contains(&age).then(|| {
        format!(
            "the refresh token is {} old: if the Google Cloud project is External and in Testing, Google ends it at 7 days ({}); publish the app (Google Auth Platform > Audience > Publish app) or run `xoauth2-proxy login {email}` before then",
            format_age(age),
            format_time(obtained_at + 7 * DAY)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600;

    #[test]
    fn a_token_in_its_seventh_day_warns_about_the_testing_limit() {
        assert_eq!(
            refresh_token_attention("a@x.com", Some(NOW - 5 * DAY), None, NOW),
            None
        );
        let text =
            refresh_token_attention("a@x.com", Some(NOW - 6 * DAY - 3 * HOUR), None, NOW).unwrap();
        assert!(text.contains("6 d 3 h old"), "{text}");
        assert!(text.contains("Publish app"), "{text}");
        assert!(text.contains("xoauth2-proxy login a@x.com"), "{text}");
        // Older than 7 days and still working: a published app, nothing to say.
        assert_eq!(
            refresh_token_attention("a@x.com", Some(NOW - 30 * DAY), None, NOW),
            None
        );
    }

    #[test]
    fn an_announced_end_is_reported_a_day_ahead() {
        assert_eq!(
            refresh_token_attention("a@x.com", Some(NOW), Some(NOW + 2 * DAY), NOW),
            None
        );
        let soon =
            refresh_token_attention("a@x.com", Some(NOW), Some(NOW + 5 * HOUR), NOW).unwrap();
        assert!(soon.contains("in 5 h 0 min"), "{soon}");
        let past = refresh_token_attention("a@x.com", Some(NOW), Some(NOW - 1), NOW).unwrap();
        assert!(past.contains("ended"), "{past}");
    }
}
