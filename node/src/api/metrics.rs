//! `GET /metrics`: Prometheus text (OpenMetrics) of what this process's
//! API and asks did, and of its engine when it serves layers.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::ask::meters::AskMeters;
use crate::engine::service::EngineService;

/// Upper bounds of the time-to-first-token buckets, seconds (planning,
/// the vocabulary on a first ask, the prefill).
pub const TTFT_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

/// Labels of a counter family.
type Labels = Vec<(&'static str, String)>;

/// The API's meters; every field is a shared handle.
pub struct ApiMetrics {
    registry: Registry,
    /// Requests answered, by `route` and `status`.
    pub requests: Family<Labels, Counter>,
    /// Asks ended, by `outcome`: `ok`, `error`, `cancelled` (the client
    /// left).
    pub asks: Family<Labels, Counter>,
    /// Asks running now.
    pub in_flight: Gauge,
    /// Tokens generated so far, counted as they stream (for the page's
    /// tokens per second).
    pub streamed: Counter,
    /// Tokens, by `kind`: `prompt`, `completion`.
    pub tokens: Family<Labels, Counter>,
    /// Drafted tokens (`--draft`), by `outcome`: `accepted` by the chain,
    /// `rejected`.
    pub drafts: Family<Labels, Counter>,
    /// From the request to the first token, seconds.
    pub ttft: Histogram,
    /// Peers this process is connected to (set at scrape time).
    peers: Gauge,
    /// The engine's sessions in use, parked ones included (a serving
    /// node's API only).
    hop_open: Gauge,
    /// The engine's session slots.
    hop_max: Gauge,
}

impl ApiMetrics {
    /// Registers the API's meters and the asker's (`ask`).
    pub fn new(ask: &AskMeters, serving: bool) -> Self {
        let mut m = ApiMetrics {
            requests: Family::default(),
            asks: Family::default(),
            in_flight: Gauge::default(),
            streamed: Counter::default(),
            tokens: Family::default(),
            drafts: Family::default(),
            ttft: Histogram::new(TTFT_BUCKETS),
            peers: Gauge::default(),
            hop_open: Gauge::default(),
            hop_max: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut m.registry;
        r.register(
            "nakshatra_api_requests",
            "HTTP requests answered, by route and status",
            m.requests.clone(),
        );
        r.register(
            "nakshatra_asks",
            "Asks ended, by outcome (ok, error, cancelled)",
            m.asks.clone(),
        );
        r.register(
            "nakshatra_asks_in_flight",
            "Asks running now",
            m.in_flight.clone(),
        );
        r.register(
            "nakshatra_asker_sessions_open",
            "Sessions this process holds open on chains",
            ask.sessions_open.clone(),
        );
        r.register(
            "nakshatra_tokens",
            "Tokens by kind (prompt, completion)",
            m.tokens.clone(),
        );
        r.register(
            "nakshatra_draft_tokens",
            "Tokens proposed by the draft model (--draft), by outcome (accepted, rejected)",
            m.drafts.clone(),
        );
        r.register(
            "nakshatra_step_seconds",
            "Wall time of one decode step through the chain",
            ask.step_seconds.clone(),
        );
        r.register(
            "nakshatra_ttft_seconds",
            "From the request to the first token",
            m.ttft.clone(),
        );
        r.register(
            "nakshatra_bytes",
            "Bytes on chain streams, by direction (out: steps, in: tokens)",
            ask.bytes.clone(),
        );
        r.register(
            "nakshatra_peers_connected",
            "Peers with an open connection",
            m.peers.clone(),
        );
        if serving {
            r.register(
                "nakshatra_hop_sessions_open",
                "Sessions this node's engine holds (parked ones included)",
                m.hop_open.clone(),
            );
            r.register(
                "nakshatra_hop_sessions_max",
                "Session slots of this node's engine",
                m.hop_max.clone(),
            );
        }
        m
    }

    /// The text exposition, with the gauges read now.
    pub fn render(&self, peers: usize, hop: Option<&EngineService>) -> String {
        self.peers.set(i64::try_from(peers).unwrap_or(i64::MAX));
        if let Some(e) = hop {
            let max = e.max_sessions();
            self.hop_max.set(max as i64);
            self.hop_open
                .set(max.saturating_sub(e.free_sessions()) as i64);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts one label value of a family.
    pub fn count(family: &Family<Labels, Counter>, labels: &[(&'static str, &str)], n: u64) {
        let l: Labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        family.get_or_create(&l).inc_by(n);
    }
}

/// Counts an ask as running while it lives.
pub struct InFlight(Gauge);

impl InFlight {
    /// One more ask running.
    pub fn new(m: &ApiMetrics) -> Self {
        m.in_flight.inc();
        InFlight(m.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_metric_is_exposed() {
        let ask = AskMeters::default();
        let m = ApiMetrics::new(&ask, true);
        ApiMetrics::count(
            &m.requests,
            &[("route", "/v1/models"), ("status", "200")],
            1,
        );
        ApiMetrics::count(&m.tokens, &[("kind", "prompt")], 12);
        ask.step_seconds.observe(0.02);
        let text = m.render(3, None);
        for name in [
            "nakshatra_api_requests_total{route=\"/v1/models\",status=\"200\"} 1",
            "nakshatra_asks_in_flight 0",
            "nakshatra_asker_sessions_open 0",
            "nakshatra_tokens_total{kind=\"prompt\"} 12",
            "nakshatra_step_seconds_bucket{le=\"0.02\"} 1",
            "nakshatra_ttft_seconds_count 0",
            "nakshatra_bytes_total{direction=\"out\"} 0",
            "nakshatra_peers_connected 3",
            "nakshatra_hop_sessions_open 0",
            "nakshatra_hop_sessions_max 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
