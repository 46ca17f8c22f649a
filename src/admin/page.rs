//! The status page for people (`GET /`): accounts with their token health and what to do, and
//! the listeners. Rendered here with every value escaped; the script and style come from this
//! listener, so the page works offline under a strict Content-Security-Policy.

use std::fmt::Write;

use crate::account::AccountKey;
use crate::activity::Event;
use crate::clock::{format_age, format_time};
use crate::report::{AccountReport, CredentialKind};

/// Open sessions: account (normalized email) → protocol → count.
pub type Sessions =
    std::collections::BTreeMap<String, std::collections::BTreeMap<&'static str, usize>>;

/// What changes from second to second: also served as JSON for the page's live updates.
#[derive(serde::Serialize)]
pub struct Live {
    pub sessions: Sessions,
    pub events: Vec<Event>,
    pub listeners: Vec<String>,
}

/// `imap 2, pop3 1`, or `none`.
pub fn sessions_text(open: Option<&std::collections::BTreeMap<&'static str, usize>>) -> String {
    match open {
        Some(open) if !open.is_empty() => open
            .iter()
            .map(|(protocol, n)| format!("{protocol} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "none".into(),
    }
}

/// The policy every admin response carries: nothing but this origin's own script and style.
/// Forms post here only, but "Authorize" is answered with a redirect to the provider's consent
/// page, and browsers hold redirects of a form to `form-action` too: its origins are listed.
pub fn csp(consent_origins: &[String]) -> String {
    let mut form_action = String::from("'self'");
    for origin in consent_origins {
        form_action.push(' ');
        form_action.push_str(origin);
    }
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action {form_action}; frame-ancestors 'none'"
    )
}

pub const SCRIPT: &str = include_str!("app.js");
pub const STYLE: &str = include_str!("app.css");

/// Text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub fn render(rows: &[AccountReport], live: &Live, now: i64, csrf: &str) -> String {
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>xoauth2-proxy</title>\
         <link rel=\"stylesheet\" href=\"/app.css\"><script src=\"/app.js\" defer></script></head><body>\
         <h1>xoauth2-proxy</h1>",
    );
    let _ = write!(
        html,
        "<section><h2>Accounts ({})</h2><input id=\"filter\" type=\"search\" placeholder=\"Filter accounts\" aria-label=\"Filter accounts\">\
         <table id=\"accounts\"><thead><tr><th>Account</th><th>Credential</th><th>Access token</th>\
         <th>Refresh token age</th><th>Open sessions</th><th>App passwords</th><th>Needs attention</th></tr></thead><tbody>",
        rows.len()
    );
    for row in rows {
        account_row(&mut html, row, &live.sessions, now, csrf);
    }
    html.push_str("</tbody></table><nav id=\"pages\"></nav></section>");
    finish_form(&mut html, csrf);
    html.push_str("<section><h2>Listeners</h2><ul id=\"listeners\">");
    for listener in &live.listeners {
        let _ = write!(html, "<li>{}</li>", escape(listener));
    }
    let _ = write!(
        html,
        "</ul></section><section><h2>Recent logins</h2><p>The last {} logins and failures, newest first; this page updates itself.</p>\
         <table id=\"events\"><thead><tr><th>Time</th><th>User</th><th>Protocol</th><th>Client</th><th>Result</th></tr></thead><tbody>",
        crate::activity::RECENT
    );
    for e in &live.events {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&e.time),
            escape(&e.user),
            escape(e.protocol),
            escape(&e.peer),
            escape(e.result)
        );
    }
    html.push_str("</tbody></table></section></body></html>\n");
    html
}

/// Where a person pastes the address the provider's consent sent the browser to, when that
/// browser is not on this machine and so could not load it.
fn finish_form(html: &mut String, csrf: &str) {
    let _ = write!(
        html,
        "<section><h2>Finish an authorization from another device</h2>\
         <p>After Authorize, the provider sends the browser to an address on 127.0.0.1. If that browser is not on this proxy's machine, the page does not load: copy its whole address from the address bar and paste it here.</p>\
         <form method=\"post\" action=\"/authorize/finish\" id=\"finish\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <input name=\"redirect\" id=\"redirect\" placeholder=\"the address, 127.0.0.1:…/?state=…&amp;code=…\" aria-label=\"Redirected address\" required maxlength=\"8192\" size=\"60\">\
         <button type=\"submit\">Finish authorization</button></form></section>",
        escape(csrf)
    );
}

/// A POST form to this listener with the CSRF token and the account.
fn form(html: &mut String, action: &str, csrf: &str, email: &str) {
    let _ = write!(
        html,
        "<form method=\"post\" action=\"{action}\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"account\" value=\"{email}\">",
        escape(csrf)
    );
}

fn account_row(html: &mut String, row: &AccountReport, sessions: &Sessions, now: i64, csrf: &str) {
    let email = escape(&row.email);
    let _ = write!(
        html,
        "<tr data-search=\"{}\"><td>{email}</td><td>{}",
        escape(&row.email.to_lowercase()),
        escape(row.credential.words())
    );
    let button = match row.credential {
        CredentialKind::Missing => Some("Authorize"),
        CredentialKind::Authorized => Some("Re-authorize"),
        CredentialKind::ServiceAccount | CredentialKind::AppOnly => None,
    };
    if let Some(button) = button {
        form(html, "/authorize", csrf, &email);
        let _ = write!(html, "<button type=\"submit\">{button}</button></form>");
    }
    html.push_str("</td>");
    match row.access_token_expires_at {
        Some(at) if at > now => {
            let _ = write!(
                html,
                "<td data-expires=\"{at}\">{}</td>",
                escape(&row.access_token)
            );
        }
        _ => {
            let _ = write!(html, "<td>{}</td>", escape(&row.access_token));
        }
    }
    let age = row
        .refresh_token_age_secs
        .map(format_age)
        .unwrap_or_default();
    let key = AccountKey::new(&row.email);
    let _ = write!(
        html,
        "<td>{}</td><td data-sessions=\"{}\">{}</td><td><ul>",
        escape(&age),
        escape(key.as_str()),
        escape(&sessions_text(sessions.get(key.as_str())))
    );
    for p in &row.password_labels {
        let _ = write!(
            html,
            "<li>{} <small>(created {})</small>",
            escape(&p.label),
            escape(&format_time(p.created_at))
        );
        form(html, "/passwords/remove", csrf, &email);
        let _ = write!(
            html,
            "<input type=\"hidden\" name=\"label\" value=\"{}\"><button type=\"submit\">Remove</button></form></li>",
            escape(&p.label)
        );
    }
    html.push_str("</ul>");
    form(html, "/passwords/add", csrf, &email);
    html.push_str("<input name=\"label\" placeholder=\"label, e.g. laptop\" aria-label=\"Label\" required maxlength=\"64\"><button type=\"submit\">Add password</button></form></td>");
    if row.attention.is_empty() {
        html.push_str("<td class=\"ok\">all good</td></tr>");
    } else {
        html.push_str("<td class=\"attention\"><ul>");
        for a in &row.attention {
            let _ = write!(html, "<li>{}</li>", escape(a));
        }
        html.push_str("</ul></td></tr>");
    }
}

/// A short page with a way back to the status page: what an action says.
fn small_page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <link rel=\"stylesheet\" href=\"/app.css\"></head><body>{body}\
         <p><a href=\"/\">Back to the status page</a></p></body></html>\n",
        escape(title)
    )
}

/// The page that shows a new app password, the only time it is shown.
pub fn new_password(email: &str, label: &str, password: &str) -> String {
    let body = format!(
        "<h1>New app password</h1><p>For {} (label {}). It is shown only this once; use it as the password in the mail client:</p>\
         <p><code id=\"password\">{}</code></p>",
        escape(email),
        escape(label),
        escape(password)
    );
    small_page("New app password", &body)
}

/// The page after a successful authorization.
pub fn authorized(email: &str) -> String {
    let body = format!(
        "<h1>Authorized</h1><p class=\"ok\" id=\"authorized\">{} is authorized: its refresh token is stored, and mail clients can log in.</p>",
        escape(email)
    );
    small_page("Authorized", &body)
}

/// A short page that says what went wrong with an action.
pub fn problem(text: &str) -> String {
    let body = format!("<p class=\"attention\">{}</p>", escape(text));
    small_page("xoauth2-proxy", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_may_lead_only_here_and_to_the_consent_origins() {
        let policy = csp(&["https://accounts.google.com".into()]);
        assert!(
            policy.contains("form-action 'self' https://accounts.google.com;"),
            "{policy}"
        );
        assert!(policy.starts_with("default-src 'none';"), "{policy}");
    }

    #[test]
    fn every_character_that_could_open_markup_is_escaped() {
        assert_eq!(
            escape("<script>alert(\"x\" & 'y')</script>"),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
    }
}
