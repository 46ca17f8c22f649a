//! The device authorization grant (RFC 8628): the user opens a short address on any device and
//! types a code, while this side polls the token endpoint at the interval the provider asks
//! for, slower after each `slow_down`. Google refuses the Gmail scope on this flow; Microsoft
//! offers it for IMAP, POP and SMTP.

use std::future::Future;
use std::time::Duration;

use oauth2::{
    DeviceAuthorizationUrl, RequestTokenError, Scope, StandardDeviceAuthorizationResponse,
};

use super::token_endpoint::{self, GrantError, Granted, Refusal, Sender};
use crate::config::OAuthClient;
use crate::provider::Provider;

/// However long the provider says its code lives, polling stops after this.
const MAX_WAIT: Duration = Duration::from_secs(30 * 60);
/// However long the provider asks to wait between polls, ask again after at most this.
const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// What the user is shown: where to go and what to type.
#[derive(Debug)]
pub struct DeviceCode {
    pub verification_uri: String,
    pub user_code: String,
    pub expires_in: Duration,
    pub interval: Duration,
    details: StandardDeviceAuthorizationResponse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceError {
    /// The user (or an admin policy) said no on the verification page.
    Declined { code: String },
    /// The code ran out before the user finished.
    Expired { user_code: String },
    /// The provider does not know the device code it issued.
    BadVerificationCode,
    /// Anything else the token endpoint said, with its provider's meaning.
    Refused(GrantError),
}

impl std::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceError::Declined { code } => write!(
                f,
                "the sign-in was declined ({code}): run the command again and accept on the verification page, signed in as the account being authorized"
            ),
            DeviceError::Expired { user_code } => write!(
                f,
                "the code {user_code} expired before the sign-in was finished (expired_token); run the command again and enter the new code within its time"
            ),
            DeviceError::BadVerificationCode => f.write_str(
                "the provider does not recognise the device code it issued (bad_verification_code); run the command again",
            ),
            DeviceError::Refused(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for DeviceError {}

/// Ask for a device code and a user code for `scopes`.
pub async fn start(
    http: &reqwest::Client,
    client: &OAuthClient,
    device_url: &str,
    scopes: &[&str],
) -> Result<DeviceCode, GrantError> {
    let url = DeviceAuthorizationUrl::new(device_url.to_string())
        .map_err(|e| GrantError::Client(format!("device_url {device_url:?} is not a URL: {e}")))?;
    let oauth = token_endpoint::oauth2_client(client)
        .map_err(GrantError::Client)?
        .set_device_authorization_url(url);
    let sender = Sender::new(http);
    let sent = oauth
        .exchange_device_code()
        .add_scopes(scopes.iter().map(|s| Scope::new(s.to_string())))
        .request_async(&sender)
        .await;
    let provider = client.provider;
    match sent {
        Ok(details) => Ok(DeviceCode {
            verification_uri: details.verification_uri().to_string(),
            user_code: details.user_code().secret().clone(),
            expires_in: details.expires_in().min(MAX_WAIT),
            interval: details.interval(),
            details,
        }),
        Err(e) => Err(match sender.outcome::<(), _>(Err(e)) {
            Err(e) => e.into_grant_error(|r| provider.refresh_refusal(r)),
            Ok(_) => GrantError::Temporary {
                detail: "the device authorization endpoint answered with a token instead of a device code".into(),
                retry_after: None,
            },
        }),
    }
}

/// Poll until the user finishes (or declines, or the code expires). `sleep` waits between
/// polls: `tokio::time::sleep` in use, a recorder in tests.
pub async fn poll<S, F>(
    http: &reqwest::Client,
    client: &OAuthClient,
    code: &DeviceCode,
    sleep: S,
) -> Result<Granted, DeviceError>
where
    S: Fn(Duration) -> F,
    F: Future<Output = ()>,
{
    let oauth = token_endpoint::oauth2_client(client)
        .map_err(|e| DeviceError::Refused(GrantError::Client(e)))?;
    let sender = Sender::new(http);
    let sent = oauth
        .exchange_device_access_token(&code.details)
        .request_async(
            &sender,
            |d| sleep(d.min(MAX_INTERVAL)),
            Some(code.expires_in),
        )
        .await;
    let provider = client.provider;
    let refused = |e: RequestTokenError<_, _>| {
        let outcome = sender.outcome::<(), oauth2::DeviceCodeErrorResponse>(Err(e));
        DeviceError::Refused(match outcome {
            Err(e) => e.into_grant_error(|r| provider.refresh_refusal(r)),
            Ok(_) => GrantError::Temporary {
                detail: "the token endpoint's answer was not understood".into(),
                retry_after: None,
            },
        })
    };
    match sent {
        Ok(_) => sender
            .outcome::<(), oauth2::DeviceCodeErrorResponse>(Ok(()))
            .map_err(|e| DeviceError::Refused(e.into_grant_error(|r| provider.refresh_refusal(r)))),
        Err(RequestTokenError::ServerResponse(e)) => Err(explain(
            e.error().as_ref(),
            e.error_description().cloned(),
            code,
            provider,
        )),
        Err(e) => Err(refused(e)),
    }
}

/// RFC 8628 §3.5's final answers (and Microsoft's `authorization_declined`) in words.
fn explain(
    code: &str,
    description: Option<String>,
    device: &DeviceCode,
    provider: &dyn Provider,
) -> DeviceError {
    match code {
        "access_denied" | "authorization_declined" => DeviceError::Declined {
            code: code.to_string(),
        },
        "expired_token" => DeviceError::Expired {
            user_code: device.user_code.clone(),
        },
        "bad_verification_code" => DeviceError::BadVerificationCode,
        _ => DeviceError::Refused(provider.refresh_refusal(&Refusal {
            status: 400,
            code: code.to_string(),
            description,
        })),
    }
}
