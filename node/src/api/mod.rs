//! The HTTP API: OpenAI's and Ollama's protocols, `/health`, Prometheus
//! `/metrics`, and a page at `/` that chats with the swarm and shows it
//! live (`docs/api.md` is the contract).
//!
//! Every request is an ask of one [`AskerService`] (the process's client
//! identity): the same planning, recovery and output as `node ask`,
//! concurrent requests as concurrent sessions. A background task keeps a
//! view of the swarm ([`VIEW_REFRESH`]) that model names are resolved
//! against and the page draws.
//!
//! Files: [`params`] (request bodies, checked), [`run`] (one request's
//! ask as a task), `openai`, `ollama`, [`error`] (status codes and error
//! shapes), [`stop`] (stop strings), `metrics`, and `assets/` (the page,
//! embedded in the binary).

pub mod error;
mod metrics;
mod ollama;
mod openai;
pub mod params;
pub mod run;
pub mod stop;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nakshatra_swarm::SwarmView;
use serde_json::json;
use tokio::sync::watch;

use crate::ask::AskerService;
use crate::engine::service::EngineService;
use error::ApiError;
use metrics::ApiMetrics;

/// How often the swarm view the API answers from is refreshed.
pub const VIEW_REFRESH: Duration = Duration::from_secs(2);
/// Longest one refresh of the view may take before it is given up.
pub const VIEW_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a request waits for the first view after the start.
pub const FIRST_VIEW_WAIT: Duration = Duration::from_secs(15);
/// Largest request body accepted, bytes.
pub const MAX_BODY: usize = 4 << 20;

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Address to listen on (`127.0.0.1:0`: a free port).
    pub listen: SocketAddr,
    /// Bearer key every route but `/health` and the page asks for.
    pub api_key: Option<String>,
    /// Speculative decoding for every request whose model it fits
    /// (`nakshatra api --draft`).
    pub draft: Option<crate::ask::draft::Draft>,
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A non-loopback address without a key.
    #[error("the API on {0} would be open to the network: give it a key (--api-key or NAKSHATRA_API_KEY), or listen on 127.0.0.1")]
    OpenToNetwork(SocketAddr),
}

/// A running API server.
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    refresher: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Stops serving.
    pub fn stop(self) {
        self.task.abort();
        self.refresher.abort();
    }
}

/// The swarm as last seen.
pub struct Snapshot {
    /// What `swarm status --json` shows.
    pub view: SwarmView,
    /// When it was taken.
    pub at: Instant,
    /// Peers connected then.
    pub peers: usize,
    /// Tokens this API generated per second over the last
    /// [`RATE_WINDOW`].
    pub tokens_per_s: f64,
}

/// The window the API's tokens per second are measured over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// See [`AppState`].
pub struct Shared {
    svc: AskerService,
    view: watch::Receiver<Option<Arc<Snapshot>>>,
    metrics: Arc<ApiMetrics>,
    api_key: Option<String>,
    /// The engine of the node this API runs in, if it serves layers (it
    /// changes when the node moves to another range).
    hop: Option<watch::Receiver<EngineService>>,
    /// The draft model every ask may use ([`ApiConfig::draft`]).
    draft: Option<crate::ask::draft::Draft>,
}

/// Starts the server: binds `cfg.listen`, starts the view refresher, and
/// serves until [`ApiServer::stop`] or the runtime ends. `hop`: the
/// serving node's engine, whose sessions `/metrics` reports.
pub async fn serve(
    cfg: ApiConfig,
    svc: AskerService,
    hop: Option<watch::Receiver<EngineService>>,
) -> Result<ApiServer, ServeError> {
    if !cfg.listen.ip().is_loopback() && cfg.api_key.is_none() {
        return Err(ServeError::OpenToNetwork(cfg.listen));
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let (view_tx, view) = watch::channel(None);
    let metrics = Arc::new(ApiMetrics::new(svc.meters(), hop.is_some()));
    let refresher = tokio::spawn(refresh_view(svc.clone(), metrics.clone(), view_tx));
    let st = AppState(Arc::new(Shared {
        svc,
        view,
        metrics,
        api_key: cfg.api_key.filter(|k| !k.is_empty()),
        hop,
        draft: cfg.draft.map(crate::ask::draft::Draft::optional),
    }));
    let app = router(st);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the API server stopped: {e}");
        }
    });
    Ok(ApiServer {
        addr,
        task,
        refresher,
    })
}

/// Every route.
fn router(st: AppState) -> Router {
    let api = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{model}", get(openai::model))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/version", get(ollama::version))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/nakshatra/swarm", get(swarm))
        .route_layer(middleware::from_fn_with_state(st.clone(), auth));
    let open = Router::new()
        .route("/health", get(health))
        .route("/", get(page::index))
        .route("/app.js", get(page::script))
        .route("/style.css", get(page::style));
    api.merge(open)
        .route_layer(middleware::from_fn_with_state(st.clone(), track))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(st)
}

impl AppState {
    /// The latest view, waiting up to [`FIRST_VIEW_WAIT`] for the first.
    pub async fn snapshot(&self) -> Option<Arc<Snapshot>> {
        let mut rx = self.0.view.clone();
        let first = tokio::time::timeout(FIRST_VIEW_WAIT, rx.wait_for(Option::is_some)).await;
        match first {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        }
    }

    /// The full id of the model `name`d: an id, the model's name (or its
    /// base), or a unique id prefix of 8 or more characters
    /// ([`SwarmView::resolve`]); none: the swarm's only model.
    pub async fn resolve_model(&self, name: Option<&str>) -> Result<String, ApiError> {
        let snap = self
            .snapshot()
            .await
            .ok_or_else(|| ApiError::unavailable("no view of the swarm yet"))?;
        let id = resolve(&snap.view, name)?;
        if snap.view.models.iter().all(|m| m.id != id) {
            // A full id announced since the last refresh, maybe: the DHT
            // says whether anybody serves it.
            let peers = self.0.svc.client().model_peers(&id).await;
            if peers.map_or(true, |p| p.is_empty()) {
                return Err(ApiError::unknown_model(&id));
            }
        }
        Ok(id)
    }
}

/// See [`AppState::resolve_model`]: [`SwarmView::resolve`], its errors
/// as the API answers them.
fn resolve(view: &SwarmView, name: Option<&str>) -> Result<String, ApiError> {
    use nakshatra_swarm::ResolveError as R;
    view.resolve(name).map_err(|e| match e {
        R::NoModel => ApiError::unavailable(e.to_string()),
        R::Unknown(name) => ApiError::unknown_model(&name),
        R::NoneNamed(_) | R::Ambiguous { .. } => ApiError::bad_param("model", e.to_string()),
    })
}

/// The longest context a chain of `m`'s servers can give a session: for
/// each block the most any online holder gives, the least of those over
/// the blocks (0 while a block has no holder).
fn served_context(m: &nakshatra_swarm::ModelView) -> u32 {
    let best_holder = |holders: &Vec<nakshatra_swarm::PeerId>| {
        m.peers
            .iter()
            .filter(|p| holders.contains(&p.peer_id))
            .map(|p| p.context_per_session)
            .max()
            .unwrap_or(0)
    };
    m.coverage.iter().map(best_holder).min().unwrap_or(0)
}

/// Refreshes the shared view every [`VIEW_REFRESH`].
async fn refresh_view(
    svc: AskerService,
    metrics: Arc<ApiMetrics>,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
) {
    // (when, tokens streamed so far), over the last RATE_WINDOW.
    let mut samples: std::collections::VecDeque<(Instant, u64)> = Default::default();
    loop {
        let now = Instant::now();
        samples.push_back((now, metrics.streamed.get()));
        while samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            samples.pop_front();
        }
        let tokens_per_s = match (samples.front(), samples.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                (n1 - n0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let client = svc.client();
        match tokio::time::timeout(VIEW_TIMEOUT, client.swarm_view()).await {
            Ok(Ok(view)) => {
                let peers = client.stats().await.map(|s| s.connected_peers).unwrap_or(0);
                let snap = Snapshot {
                    view,
                    at: Instant::now(),
                    peers,
                    tokens_per_s,
                };
                if tx.send(Some(Arc::new(snap))).is_err() {
                    return;
                }
            }
            Ok(Err(_)) => return,
            Err(_) => tracing::warn!("the swarm view took over {VIEW_TIMEOUT:?}; trying again"),
        }
        tokio::time::sleep(VIEW_REFRESH).await;
    }
}

/// `GET /health`: the process answers.
async fn health(State(st): State<AppState>) -> Response {
    let peers = st.0.view.borrow().as_ref().map_or(0, |s| s.peers);
    Json(json!({"status": "ok", "peers": peers})).into_response()
}

/// `GET /metrics`.
async fn metrics_text(State(st): State<AppState>) -> Response {
    let peers =
        st.0.svc
            .client()
            .stats()
            .await
            .map(|s| s.connected_peers)
            .unwrap_or(0);
    let hop = st.0.hop.as_ref().map(|w| w.borrow().clone());
    let body = st.0.metrics.render(peers, hop.as_ref());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// `GET /nakshatra/swarm`: the view and this API's own figures.
async fn swarm(State(st): State<AppState>) -> Response {
    let Some(snap) = st.snapshot().await else {
        return ApiError::unavailable("no view of the swarm yet").openai();
    };
    let m = &st.0.metrics;
    Json(json!({
        "view": snap.view,
        "api": {
            "peers": snap.peers,
            "asks_in_flight": m.in_flight.get(),
            "sessions_open": st.0.svc.meters().sessions_open.get(),
            "tokens_per_s": snap.tokens_per_s,
            "view_age_s": snap.at.elapsed().as_secs_f64(),
            "refresh_s": VIEW_REFRESH.as_secs_f64(),
            "peer_id": st.0.svc.client().peer_id().to_string(),
        },
    }))
    .into_response()
}

/// Asks for the bearer key, when one is set.
async fn auth(
    State(st): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let Some(key) = &st.0.api_key else {
        return next.run(req).await;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if same(given.as_bytes(), key.as_bytes()) {
        next.run(req).await
    } else if req.uri().path().starts_with("/api/") {
        ApiError::unauthorized().ollama()
    } else {
        ApiError::unauthorized().openai()
    }
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Counts each answer by route and status.
async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |m| m.as_str().to_string());
    let r = next.run(req).await;
    let status = r.status().as_u16().to_string();
    ApiMetrics::count(
        &st.0.metrics.requests,
        &[("route", &route), ("status", &status)],
        1,
    );
    r
}

/// The page: three files compiled into the binary, no build step.
mod page {
    use super::*;

    const INDEX: &str = include_str!("assets/index.html");
    const SCRIPT: &str = include_str!("assets/app.js");
    const STYLE: &str = include_str!("assets/style.css");

    /// `GET /`.
    pub(super) async fn index() -> Response {
        asset("text/html; charset=utf-8", INDEX)
    }

    /// `GET /app.js`.
    pub(super) async fn script() -> Response {
        asset("text/javascript; charset=utf-8", SCRIPT)
    }

    /// `GET /style.css`.
    pub(super) async fn style() -> Response {
        asset("text/css; charset=utf-8", STYLE)
    }

    fn asset(kind: &'static str, body: &'static str) -> Response {
        (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, kind),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(ids: &[&str]) -> SwarmView {
        SwarmView {
            models: ids
                .iter()
                .map(|id| nakshatra_swarm::ModelView {
                    id: id.to_string(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn models_are_named_by_id_or_unique_prefix() {
        let a = format!("abcdef01{}", "0".repeat(56));
        let b = format!("abcdef02{}", "1".repeat(56));
        let v = view(&[&a, &b]);
        assert_eq!(resolve(&v, Some(&a)), Ok(a.clone()));
        assert_eq!(resolve(&v, Some("ABCDEF02")), Ok(b.clone()));
        assert_eq!(
            resolve(&v, Some("abcdef0")).map_err(|e| e.status),
            Err(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            resolve(&v, Some("nope")).map_err(|e| e.code),
            Err("model_not_found")
        );
        assert_eq!(
            resolve(&v, None).map_err(|e| e.status),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(resolve(&view(&[&a]), None), Ok(a.clone()));
        let e = resolve(&view(&[]), None).expect_err("no model");
        assert_eq!(
            (e.status, e.retry_after),
            (StatusCode::SERVICE_UNAVAILABLE, Some(error::RETRY_AFTER_S))
        );
        // A full id not in the view yet goes to the planner.
        let c = "c".repeat(64);
        assert_eq!(resolve(&v, Some(&c)), Ok(c.clone()));
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
    }
}
