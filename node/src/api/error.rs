//! What an API request can fail with, as a status code and a body in the
//! shape each protocol's clients read: OpenAI's
//! `{"error":{"message","type","param","code"}}` or Ollama's
//! `{"error":"..."}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nakshatra_swarm::plan::PlanError;

use crate::ask::AskError;

/// Seconds a client is told to wait (`Retry-After`) when no chain can
/// serve it now: about the time a replacement node needs to appear in
/// the view.
pub const RETRY_AFTER_S: u64 = 5;

/// A failed request.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What happened, for a person.
    pub message: String,
    /// The parameter at fault, when one is.
    pub param: Option<String>,
    /// A stable code (`invalid_value`, `model_not_found`, ...).
    pub code: &'static str,
    /// `Retry-After` seconds (503 only).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400: a parameter `param` is wrong.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.to_string()),
            code: "invalid_value",
            retry_after: None,
        }
    }

    /// 400: the request as a whole is wrong (malformed JSON, ...).
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: None,
            code,
            retry_after: None,
        }
    }

    /// 404: no such model in the swarm.
    pub fn unknown_model(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{model}` is not served in this swarm (GET /v1/models lists those that are)"),
            param: Some("model".into()),
            code: "model_not_found",
            retry_after: None,
        }
    }

    /// 503: nothing can serve the request now; try again later.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            param: None,
            code: "no_chain",
            retry_after: Some(RETRY_AFTER_S),
        }
    }

    /// 401: a wrong or missing key.
    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "a wrong or missing API key: send `Authorization: Bearer KEY`".into(),
            param: None,
            code: "invalid_api_key",
            retry_after: None,
        }
    }

    /// OpenAI's error `type` for this status.
    fn kind(&self) -> &'static str {
        if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        }
    }

    /// The OpenAI-shaped body.
    pub fn openai_body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }

    /// As an OpenAI response.
    pub fn openai(self) -> Response {
        let body = self.openai_body();
        self.respond(body)
    }

    /// As an Ollama response.
    pub fn ollama(self) -> Response {
        let body = serde_json::json!({ "error": self.message });
        self.respond(body)
    }

    fn respond(self, body: serde_json::Value) -> Response {
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.openai()
    }
}

impl From<AskError> for ApiError {
    fn from(e: AskError) -> Self {
        let message = e.to_string();
        let status = |status: StatusCode, code: &'static str| ApiError {
            status,
            message: message.clone(),
            param: None,
            code,
            retry_after: None,
        };
        match &e {
            AskError::Plan(PlanError::NoModel { model_id }) => ApiError::unknown_model(model_id),
            AskError::Plan(PlanError::Lookup(_)) => ApiError {
                param: Some("model".into()),
                ..status(StatusCode::NOT_FOUND, "model_not_found")
            },
            AskError::Plan(_)
            | AskError::NoPeers(_)
            | AskError::Model(nakshatra_swarm::ResolveError::NoModel) => {
                ApiError::unavailable(message)
            }
            e if e.is_busy() => ApiError::unavailable(message),
            AskError::Model(nakshatra_swarm::ResolveError::Unknown(name)) => {
                ApiError::unknown_model(name)
            }
            AskError::Model(_) => ApiError {
                param: Some("model".into()),
                ..status(StatusCode::BAD_REQUEST, "invalid_value")
            },
            AskError::EmptyPrompt => ApiError::bad_param("messages", message),
            AskError::PromptTooLong { .. } => ApiError {
                param: Some("messages".into()),
                ..status(StatusCode::BAD_REQUEST, "context_length_exceeded")
            },
            AskError::Tokenizer(_) => status(StatusCode::BAD_REQUEST, "invalid_value"),
            AskError::Swarm(_) | AskError::Stopped(_) | AskError::Accept(_) => {
                status(StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
            }
            _ => status(StatusCode::BAD_GATEWAY, "chain_failed"),
        }
    }
}
