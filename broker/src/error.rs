//! The broker's errors: [`StartError`] stops the broker before it serves;
//! [`ApiError`] is every way a request can fail, mapped to a response in one
//! place ([`ApiError::status`] and [`ApiError::code`], used by the rescue
//! layer in `stack.rs`). Messages are one line and never contain a secret,
//! a token or a ticket.

use http::StatusCode;
use lever_policy::token::Denial;

/// The broker cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("state: {0}")]
    State(String),
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("audit log: {0}")]
    Audit(String),
    #[error("cannot start the jail workers: {0}")]
    Workers(std::io::Error),
}

/// A request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("this route needs a client certificate issued by the broker")]
    NoClientCert,
    #[error("the client certificate is not usable: {0}")]
    BadClientCert(String),
    #[error("identity `{0}` is revoked")]
    IdentityRevoked(String),
    #[error("identity `{0}` is not an agent of this instance")]
    UnknownAgent(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("missing bearer token (send `Authorization: Bearer <token>`)")]
    NoToken,
    #[error("capability token refused: {0}")]
    Token(Denial),
    #[error("enrolment ticket refused: {0}")]
    Ticket(&'static str),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("request body not received in time")]
    BodyTimeout,
    #[error("this request needs the Mcp-Session-Id header from `initialize`")]
    SessionRequired,
    #[error("unknown or expired MCP session: initialize again")]
    SessionUnknown,
    #[error("unsupported content type (send application/json)")]
    UnsupportedMediaType,
    #[error("{1}")]
    Upstream(StatusCode, String),
    /// Refused by the rate-limit lane named (`llm`, `tool`, `control`:
    /// the `lane` label of `lever_rate_limited_total`); retry after the
    /// duration.
    #[error("rate limit exceeded: {1}")]
    RateLimited(&'static str, String, std::time::Duration),
    #[error("{0}")]
    NotImplemented(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NoClientCert | ApiError::BadClientCert(_) | ApiError::NoToken => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Token(d) => match d {
                Denial::TooLarge
                | Denial::TooManyBlocks
                | Denial::Malformed
                | Denial::TooComplex
                | Denial::BadSignature
                | Denial::Expired
                | Denial::Revoked
                | Denial::StaleEpoch => StatusCode::UNAUTHORIZED,
                _ => StatusCode::FORBIDDEN,
            },
            ApiError::IdentityRevoked(_)
            | ApiError::UnknownAgent(_)
            | ApiError::Forbidden(_)
            | ApiError::Ticket(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) | ApiError::SessionRequired => StatusCode::BAD_REQUEST,
            ApiError::SessionUnknown => StatusCode::NOT_FOUND,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Upstream(s, _) => *s,
            ApiError::RateLimited(..) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::NoClientCert => "client_certificate_required",
            ApiError::BadClientCert(_) => "bad_client_certificate",
            ApiError::IdentityRevoked(_) => "identity_revoked",
            ApiError::UnknownAgent(_) => "unknown_agent",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NoToken => "token_required",
            ApiError::Token(d) => d.code(),
            ApiError::Ticket(_) => "ticket_refused",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::SessionRequired => "session_required",
            ApiError::SessionUnknown => "session_unknown",
            ApiError::BodyTooLarge(_) => "body_too_large",
            ApiError::BodyTimeout => "body_timeout",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Upstream(..) => "upstream_error",
            ApiError::RateLimited(..) => "rate_limited",
            ApiError::NotImplemented(_) => "not_implemented",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The rate-limit lane that refused, when one did.
    pub fn rate_limited_lane(&self) -> Option<&'static str> {
        match self {
            ApiError::RateLimited(lane, ..) => Some(lane),
            _ => None,
        }
    }

    /// The error `type` of an Anthropic-shaped error body (the `/llm` routes).
    pub fn anthropic_type(&self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        }
    }
}

/// A token refusal as the answer to a request. The one refusal that is not
/// about the token, too many new tokens verified for the caller, is a rate
/// limit (`429` with `retry-after`, counted in the `verify` lane).
impl From<Denial> for ApiError {
    fn from(d: Denial) -> Self {
        match d {
            Denial::Throttled => {
                ApiError::RateLimited("verify", d.to_string(), std::time::Duration::from_secs(1))
            }
            other => ApiError::Token(other),
        }
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        ApiError::Internal(e.to_string())
    }
}
