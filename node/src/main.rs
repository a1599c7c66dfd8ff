//! `nakshatra`: the command-line front of the node library.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nakshatra_node::datadir::DataDir;
use nakshatra_node::engine::pipeline::{generate, GenerateParams, LocalChain};
use nakshatra_node::engine::tokenizer::{Tokenizer, Utf8Stream};
use nakshatra_node::engine::{EngineConfig, SamplerSpec, SliceEngine};
use nakshatra_node::serve::LayerChoice;
use nakshatra_node::trace::StepTrace;
use nakshatra_node::{layers, slices};
use nakshatra_swarm::Multiaddr;

/// `println!` that ends the process quietly once stdout is closed
/// (`nakshatra ... | head`) instead of panicking, and returns other write
/// errors.
macro_rules! out {
    () => { out!("") };
    ($($arg:tt)*) => {{
        let mut o = std::io::stdout().lock();
        if let Err(e) = writeln!(o, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            return Err(e.into());
        }
    }};
}
use tracing_subscriber::EnvFilter;

/// How often a serving node checks whether its free session count changed
/// (and re-announces if so).
const CAPACITY_TICK: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(
    name = "nakshatra",
    version,
    about = "Run one large language model split across many machines"
)]
struct Cli {
    /// Where identities, slices and caches live (default: the platform's data dir).
    #[arg(long, global = true, env = "NAKSHATRA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Look at GGUF models.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Write the slice of a model holding layers A..B as a standalone GGUF.
    Slice {
        /// The whole model (GGUF; a split model by its first shard,
        /// `NAME-00001-of-0000N.gguf`).
        path: PathBuf,
        /// Layers to keep, half-open: `0..10` keeps layers 0 to 9.
        #[arg(long, value_parser = layers::parse_range)]
        layers: std::ops::Range<u32>,
        /// Output file.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Run a model in this process, optionally split into ranges run one
    /// after another (the reference for the network path).
    Run(RunArgs),
    /// Take part in a swarm.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Look at the swarm.
    Swarm {
        #[command(subcommand)]
        cmd: SwarmCmd,
    },
    /// Serve the HTTP API (OpenAI and Ollama protocols, `/metrics`, a page
    /// at `/`) from a client-only node that serves no layers.
    Api(ApiArgs),
}

/// Where the HTTP API listens and who may use it (`api`, `node join --api`).
#[derive(Args, Debug)]
struct ApiKeyArgs {
    /// Bearer key every API route but `/health` and the page asks for
    /// (`Authorization: Bearer KEY`); needed to listen on anything but
    /// loopback.
    #[arg(long, env = "NAKSHATRA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Args, Debug)]
struct ApiArgs {
    /// Address of the HTTP server (OpenAI and Ollama APIs, `/metrics`, the
    /// page at `/`). `127.0.0.1:0` picks a free port.
    #[arg(long, default_value = "127.0.0.1:11435")]
    listen: std::net::SocketAddr,
    /// Peers to bootstrap from (multiaddr, `/p2p/<id>` optional).
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// Do not look for peers on the LAN with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// libp2p addresses to listen on (as `node ask --listen`).
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    p2p_listen: Vec<Multiaddr>,
    /// Seconds an ask waits for a first peer.
    #[arg(long, default_value_t = 10)]
    wait: u64,
    #[command(flatten)]
    key: ApiKeyArgs,
    /// Used for every request whose model shares its vocabulary (others
    /// go without).
    #[command(flatten)]
    draft: DraftArgs,
    #[command(flatten)]
    direct: DirectArgs,
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Serve a range of a model's layers and announce it on the swarm.
    Join(Box<JoinArgs>),
    /// Ask the swarm: generate text with a model no single node holds.
    Ask(Box<AskArgs>),
    /// The devices llama.cpp sees on this host (names for `--device`),
    /// with their memory and the CPU features this build uses.
    Devices {
        /// One JSON array, as nodes announce them (`devices` of
        /// `swarm status --json`).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct AskArgs {
    /// Peers to bootstrap from (multiaddr, `/p2p/<id>` optional).
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// Do not look for peers on the LAN with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Addresses to listen on while asking (as for `node join`: each TCP
    /// address gets its QUIC twin). Serving peers behind NAT reach the
    /// asker through a relay; a listening socket lets DCUtR punch a direct
    /// connection from it (dials reuse its port), so nothing needs to be
    /// opened on the asker's router. An ephemeral port by default.
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    listen: Vec<Multiaddr>,
    /// The model: its id, its name as `swarm status` shows it
    /// (`smollm2:135m-q4_1`), the name's base (`smollm2`) when only one
    /// model has it, or an id prefix of 8+ characters (default: the only
    /// model the swarm serves). Names are announced by the servers, not
    /// verified: give the id to pin a model
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    gen: GenArgs,
    /// Hidden states between hops: f32 (exact) or f16 (half the bytes).
    #[arg(long, value_enum, default_value_t = Wire::F32)]
    wire: Wire,
    /// Send every decode step from here: the last hop streams each token
    /// back and waits for the next step, instead of feeding the token to
    /// the first hop itself (the ring, one link less per token; off
    /// anyway with --draft).
    #[arg(long)]
    no_ring: bool,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for a first peer.
    #[arg(long, default_value_t = 10)]
    wait: u64,
    /// Seconds one step may take.
    #[arg(long, default_value_t = 60)]
    step_timeout: u64,
    /// Check this fraction of steps (0..=1; the last always) on a replica
    /// chain of other peers serving the same layers, bit for bit; a peer
    /// caught returning wrong results is banned by this node.
    #[arg(long, value_name = "RATE", default_value_t = 0.0, value_parser = parse_rate)]
    verify: f64,
    /// Seconds a chain that lost a hop mid-answer waits for another peer
    /// to serve the lost layers before giving up.
    #[arg(long, default_value_t = 30)]
    recover_wait: u64,
    /// Seconds to keep asking (with growing pauses) when the chain's hops
    /// have no free session.
    #[arg(long, default_value_t = 120)]
    busy_wait: u64,
    /// Write every decode step's timings to this file (one line per step:
    /// when it started, was sent to the first hop and its token came back;
    /// see `benches/chain.rs`).
    #[arg(long)]
    trace_steps: Option<PathBuf>,
    #[command(flatten)]
    draft: DraftArgs,
    #[command(flatten)]
    direct: DirectArgs,
    /// Test-only: a repaired chain gets a new session id, so that no hop
    /// resumes its part and the history is replayed into every hop (the
    /// recovery benchmark's baseline).
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    test_fresh_recovery: bool,
    /// A system message before the prompt (the chat template's `system`
    /// role).
    #[arg(long, conflicts_with = "raw")]
    system: Option<String>,
    /// A conversation: read one user turn a line from standard input
    /// (PROMPT, if given, is the first), answer each with the whole
    /// conversation so far, until end of input. Each answer ends with a
    /// newline on stdout and a `stats:` line on stderr; a turn that fails
    /// is reported and left out of the conversation.
    #[arg(long, conflicts_with_all = ["raw", "json"])]
    chat: bool,
    /// The prompt; `-` reads it from standard input (to its end). With
    /// --chat: the first turn, optional.
    #[arg(required_unless_present = "chat")]
    prompt: Option<String>,
}

/// Direct streams (`node join`, `node ask`, `api`).
#[derive(Args, Debug)]
struct DirectArgs {
    /// TCP port for direct streams: a chain's activations and tokens on a
    /// TCP connection of their own (noise with this node's identity, no
    /// multiplexer), which costs less per step than a libp2p stream. 0:
    /// any free port. Peers outside the LAN reach it only where the
    /// firewall or router lets them (as for the libp2p port); peers that
    /// cannot use libp2p streams instead.
    #[arg(long, default_value_t = 0)]
    direct_port: u16,
    /// No direct streams: this node's links run on libp2p streams (for
    /// `node ask`, every link of its chains).
    #[arg(long)]
    no_direct: bool,
}

impl DirectArgs {
    /// The swarm's `direct_port`.
    fn port(&self) -> Option<u16> {
        (!self.no_direct).then_some(self.direct_port)
    }
}

/// Where llama.cpp runs the layers (GPU builds: `--features cuda`, ...).
#[derive(Args, Debug)]
struct OffloadArgs {
    /// The device to run the layers on, as llama.cpp names it (`CUDA0`,
    /// `Vulkan1`, `Metal`, `CPU`: no offload); default: every GPU, the
    /// layers split between them. A host with several GPUs can run one
    /// node per GPU instead, each with its own `--device`, `--data-dir`
    /// and range. `nakshatra swarm status` shows each node's devices.
    #[arg(long, value_name = "NAME")]
    device: Option<String>,
    /// Layers offloaded to the GPU: a number, or `all` (default). The rest
    /// run on the CPU. Ignored by CPU-only builds.
    #[arg(long, value_name = "N|all", default_value = "all", value_parser = parse_gpu_layers)]
    gpu_layers: i32,
}

impl OffloadArgs {
    /// `cfg` with these settings.
    fn apply(&self, cfg: EngineConfig) -> EngineConfig {
        EngineConfig {
            gpu_layers: self.gpu_layers,
            device: self.device.clone(),
            ..cfg
        }
    }
}

/// `all` (-1: llama.cpp offloads every layer) or a layer count.
fn parse_gpu_layers(s: &str) -> Result<i32, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(-1);
    }
    s.parse::<u16>()
        .map(i32::from)
        .map_err(|_| format!("expected a layer count or `all`, got {s:?}"))
}

/// Speculative decoding flags of `node ask` and `api`.
#[derive(Args, Debug)]
struct DraftArgs {
    /// Speculative decoding: a small model with the same vocabulary (a
    /// whole GGUF, run here) proposes tokens that the chain verifies
    /// several at a time, one pass for all. The answer is the same as
    /// without it, bit for bit; over slow links it comes in fewer passes.
    /// `nakshatra model draft` makes one from the model itself.
    #[arg(long, value_name = "MODEL.gguf")]
    draft: Option<PathBuf>,
    /// Tokens the draft proposes per step: a number (1..=16) or `auto`
    /// (chosen each step from the measured acceptance and link time).
    #[arg(long, value_name = "K", default_value = "auto", value_parser = parse_draft_k)]
    draft_k: nakshatra_node::ask::draft::DraftK,
    /// CPU threads for the draft model.
    #[arg(long, default_value_t = 1)]
    draft_threads: u32,
}

impl DraftArgs {
    /// The draft model, loaded, with room for `sessions` asks at once
    /// (`None` without `--draft`).
    fn load(&self, sessions: u32) -> Result<Option<nakshatra_node::ask::draft::Draft>> {
        let Some(path) = &self.draft else {
            return Ok(None);
        };
        let cfg = EngineConfig {
            threads: self.draft_threads,
            max_sessions: sessions,
            ..EngineConfig::default()
        };
        Ok(Some(nakshatra_node::ask::draft::Draft::load(
            path,
            self.draft_k,
            &cfg,
        )?))
    }
}

/// Generation flags shared by `run` and `node ask`.
#[derive(Args, Debug)]
struct GenArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k (0: off).
    #[arg(long, default_value_t = 40)]
    top_k: i32,
    /// Top-p (1.0: off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed of the random draw.
    #[arg(long, default_value_t = 0)]
    seed: u32,
    /// Tokenize the prompt as plain text (no chat template).
    #[arg(long)]
    raw: bool,
}

impl GenArgs {
    fn sampler(&self) -> SamplerSpec {
        SamplerSpec {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

/// A `--draft-k`: `auto` or a number of drafts.
fn parse_draft_k(s: &str) -> Result<nakshatra_node::ask::draft::DraftK, String> {
    use nakshatra_node::ask::draft::{DraftK, MAX_K};
    if s == "auto" {
        return Ok(DraftK::Adaptive);
    }
    match s.parse::<usize>() {
        Ok(k) if (1..=MAX_K).contains(&k) => Ok(DraftK::Fixed(k)),
        _ => Err(format!(
            "{s:?} is neither `auto` nor a number of drafts in 1..={MAX_K}"
        )),
    }
}

/// A `--verify` rate: a number in 0..=1.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a rate between 0 and 1")),
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Wire {
    F32,
    F16,
}

#[derive(Subcommand, Debug)]
enum SwarmCmd {
    /// Per model: which blocks are covered, by whom, and the gaps.
    Status {
        /// Peers to bootstrap from (multiaddr, `/p2p/<id>` optional).
        #[arg(long)]
        bootstrap: Vec<Multiaddr>,
        /// Do not look for peers on the LAN with mDNS.
        #[arg(long)]
        no_mdns: bool,
        /// Seconds to wait for a first peer.
        #[arg(long, default_value_t = 10)]
        wait: u64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct JoinArgs {
    /// The whole model (GGUF; a split model by its first shard,
    /// `NAME-00001-of-0000N.gguf`). Without it, `--model-id` fetches the layers
    /// from peers; with neither, the node serves the model the swarm needs
    /// most (the least covered), fetched from peers.
    #[arg(long, conflicts_with = "model_id")]
    model: Option<PathBuf>,
    /// The model to fetch from peers, verified piece by piece: its id (64
    /// hex), or its name as `swarm status` shows it (`smollm2:135m-q4_1`,
    /// the base `smollm2`, the tag cut at a `-`: `smollm2:135m`) or an id
    /// prefix, looked up in the swarm. Names are announced, not verified:
    /// the id pins the model
    #[arg(long)]
    model_id: Option<String>,
    /// Layers to serve, half-open (`0..10`), or `auto`: the blocks the swarm
    /// needs most that fit in `--max-memory`.
    #[arg(long, value_parser = parse_layers, default_value = "auto")]
    layers: LayerChoice,
    /// Memory for weights with `--layers auto` (e.g. `512MB`, `4GiB`);
    /// default: 80% of free memory.
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Peers to bootstrap from (multiaddr, `/p2p/<id>` optional).
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// Addresses to listen on. Each TCP address also gets QUIC on the same
    /// port number over UDP (`/ip4/IP/udp/PORT/quic-v1`), unless a QUIC
    /// address is given: then exactly the addresses given.
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    listen: Vec<Multiaddr>,
    #[command(flatten)]
    direct: DirectArgs,
    /// An address at which this node is reachable from the internet (a
    /// public IP, or a port forwarded by the router), e.g.
    /// `/ip4/203.0.113.7/udp/4001/quic-v1`: announced at once, without
    /// waiting for AutoNAT, and it makes this node a relay for nodes
    /// behind NAT. Repeatable.
    #[arg(long)]
    external_addr: Vec<Multiaddr>,
    /// A relay (`.../p2p/<id>`) to reserve a slot on while this node has no
    /// confirmed public address; it is announced as
    /// `<relay>/p2p-circuit`. Without it, bootstrap peers that offer the
    /// relay protocol are used once AutoNAT finds this node unreachable.
    #[arg(long)]
    relay: Vec<Multiaddr>,
    /// Do not look for peers on the LAN with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// llama.cpp threads (default: all cores). Nodes sharing a host must
    /// split the cores between them.
    #[arg(long)]
    threads: Option<u32>,
    #[command(flatten)]
    offload: OffloadArgs,
    /// Sessions served at once.
    #[arg(long, default_value_t = 8)]
    max_sessions: u32,
    /// Tokens one session holds.
    #[arg(long, default_value_t = 2048)]
    ctx_size: u32,
    /// Seconds an announcement lives (every node of a swarm must agree).
    #[arg(long, default_value_t = 90)]
    record_ttl: u64,
    /// Seconds between re-announcements.
    #[arg(long, default_value_t = 30)]
    refresh: u64,
    /// Seconds a session may stay idle before its KV cache is freed.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    /// Seconds without a step after which a session gives its slot up to
    /// a new one when no slot is free.
    #[arg(long, default_value_t = 30)]
    evict_idle_after: u64,
    /// With `--layers auto`: seconds between two checks of whether the
    /// swarm would be better balanced with this node serving other blocks
    /// (it moves after three such checks in a row; 0: never move).
    #[arg(long, default_value_t = 120)]
    rebalance_period: u64,
    /// With `--layers auto`: seconds a node keeps its blocks before it may
    /// move (after joining, and after each move).
    #[arg(long, default_value_t = 1800)]
    min_dwell: u64,
    /// Also serve the HTTP API here (OpenAI and Ollama protocols,
    /// `/metrics`, the page at `/`), e.g. `127.0.0.1:11435`. Its asks go
    /// out under an identity of their own, through this node's swarm.
    #[arg(long)]
    api: Option<std::net::SocketAddr>,
    #[command(flatten)]
    api_key: ApiKeyArgs,
    /// With `--api`: the draft model its requests use (as `nakshatra api
    /// --draft`).
    #[command(flatten)]
    api_draft: DraftArgs,
    /// Write every step's timings to this file (one line per step: when
    /// its frame came in, was decoded, computed, encoded and sent; see
    /// `benches/chain.rs`).
    #[arg(long)]
    trace_steps: Option<PathBuf>,
    /// Test-only fault injection (builds with the `fault-injection`
    /// feature only).
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true, value_enum)]
    fault: Option<nakshatra_node::faults::Fault>,
    /// Test-only: milliseconds of delay on every probe, activation frame
    /// and piece chunk (a slow link).
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    test_link_delay_ms: Option<u64>,
}

impl JoinArgs {
    /// The faults the hidden test flags ask for (none in a production
    /// build).
    fn faults(&self) -> nakshatra_node::faults::Faults {
        nakshatra_node::faults::Faults {
            #[cfg(feature = "fault-injection")]
            fault: self.fault,
            #[cfg(feature = "fault-injection")]
            link_delay: self
                .test_link_delay_ms
                .map(std::time::Duration::from_millis),
            #[cfg(feature = "fault-injection")]
            broke_link: Default::default(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum ModelCmd {
    /// Architecture, layers, sizes, per-block bytes and the content id.
    Inspect {
        /// The GGUF file (a split model by its first shard,
        /// `NAME-00001-of-0000N.gguf`).
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write an early-exit draft for `node ask --draft`: the model's first
    /// BLOCKS blocks and its own head, a small model with the very same
    /// vocabulary.
    Draft {
        /// The whole model (GGUF).
        path: PathBuf,
        /// Blocks to keep, from the first.
        #[arg(long)]
        blocks: u32,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The whole model (GGUF; a split model by its first shard,
    /// `NAME-00001-of-0000N.gguf`).
    #[arg(long)]
    model: PathBuf,
    /// Split points: `10,20` runs layers 0..10, 10..20 and 20..n as three ranges.
    #[arg(long, value_delimiter = ',')]
    split: Vec<u32>,
    #[command(flatten)]
    gen: GenArgs,
    /// llama.cpp threads (default: all cores).
    #[arg(long)]
    threads: Option<u32>,
    /// Tokens one session holds (prompt + output).
    #[arg(long, default_value_t = 2048)]
    ctx_size: u32,
    /// Physical micro-batch.
    #[arg(long, default_value_t = 512)]
    ubatch: u32,
    #[command(flatten)]
    offload: OffloadArgs,
    /// The prompt.
    prompt: String,
}

fn main() {
    let cli = Cli::parse();
    // A serving node logs what it does; one-shot commands stay quiet.
    // gossipsub warns once per message it cannot queue for a slow peer (a
    // peer that stops reading would flood the log); the swarm counts those
    // drops instead (`gossip_dropped`).
    let default_filter = match cli.cmd {
        Cmd::Node {
            cmd: NodeCmd::Join(_),
        } => "info,libp2p_kad=error,libp2p_gossipsub=error,llama-cpp-2=error",
        _ => "warn,libp2p_kad=error,libp2p_gossipsub=error,llama-cpp-2=error",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .init();
    if let Err(e) = real_main(cli) {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, each cause once: many messages
/// already name their source, which is then not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

fn real_main(cli: Cli) -> Result<()> {
    let data_dir = cli
        .data_dir
        .clone()
        .map(DataDir::new)
        .unwrap_or_else(DataDir::platform_default);
    match cli.cmd {
        Cmd::Model {
            cmd: ModelCmd::Inspect { path, json },
        } => inspect(&path, json),
        Cmd::Model {
            cmd: ModelCmd::Draft { path, blocks, out },
        } => {
            let info = nakshatra_slicer::write_early_exit(&path, blocks, &out)?;
            out!(
                "wrote {} ({} of {} blocks, {} bytes)",
                out.display(),
                blocks,
                nakshatra_slicer::model_layers(&path)?.n_layers,
                info.file_bytes
            );
            Ok(())
        }
        Cmd::Slice { path, layers, out } => {
            let o = nakshatra_slicer::write_slice(&path, layers.start, layers.end, &out)?;
            out!("wrote {} ({} bytes)", o.path.display(), o.bytes);
            if let Some(s) = o.embd_sidecar {
                out!("wrote {} (token embeddings for the first hop)", s.display());
            }
            Ok(())
        }
        Cmd::Run(args) => run(&data_dir, args),
        Cmd::Node {
            cmd: NodeCmd::Join(args),
        } => runtime()?.block_on(join(data_dir, *args)),
        Cmd::Node {
            cmd: NodeCmd::Ask(args),
        } => runtime()?.block_on(ask(data_dir, *args)),
        Cmd::Node {
            cmd: NodeCmd::Devices { json },
        } => {
            let devices = nakshatra_node::serve::device_infos(None);
            if json {
                out!("{}", serde_json::to_string(&devices)?);
                return Ok(());
            }
            for d in devices {
                out!(
                    "{}\t{}\t{}\t{} MiB free of {} MiB{}",
                    d.name,
                    d.backend,
                    d.description,
                    d.memory_free >> 20,
                    d.memory_total >> 20,
                    if d.features.is_empty() {
                        String::new()
                    } else {
                        format!("\t{}", d.features.join(" "))
                    }
                );
            }
            Ok(())
        }
        Cmd::Api(args) => runtime()?.block_on(api(data_dir, args)),
        Cmd::Swarm {
            cmd:
                SwarmCmd::Status {
                    bootstrap,
                    no_mdns,
                    wait,
                    json,
                },
        } => runtime()?.block_on(async move {
            let view = nakshatra_node::status::swarm_status(
                bootstrap,
                !no_mdns,
                std::time::Duration::from_secs(wait),
            )
            .await?;
            if json {
                out!("{}", serde_json::to_string(&view)?);
            } else {
                print!("{}", nakshatra_node::status::render(&view));
            }
            Ok(())
        }),
    }
}

/// Waits for Ctrl-C or SIGTERM.
async fn until_stopped() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Starts the HTTP API for `svc` and prints `api on http://ADDR`.
async fn start_api(
    listen: std::net::SocketAddr,
    key: ApiKeyArgs,
    svc: nakshatra_node::ask::AskerService,
    hop: Option<tokio::sync::watch::Receiver<nakshatra_node::engine::service::EngineService>>,
    draft: Option<nakshatra_node::ask::draft::Draft>,
) -> Result<nakshatra_node::api::ApiServer> {
    let cfg = nakshatra_node::api::ApiConfig {
        listen,
        api_key: key.api_key,
        draft,
    };
    let server = nakshatra_node::api::serve(cfg, svc, hop).await?;
    out!("api on http://{}", server.addr);
    Ok(server)
}

/// Asks of `nakshatra api` that draft at once; more run without a draft
/// (each draft session holds the draft model's KV cache).
const API_DRAFT_SESSIONS: u32 = 8;

async fn api(data_dir: DataDir, a: ApiArgs) -> Result<()> {
    use nakshatra_node::ask::{AskerConfig, AskerService};
    let svc = AskerService::start(AskerConfig {
        bootstrap: a.bootstrap,
        listen: a.p2p_listen,
        direct_port: a.direct.port(),
        mdns: !a.no_mdns,
        data_dir,
        connect_wait: std::time::Duration::from_secs(a.wait),
    })
    .await?;
    let draft = a.draft.load(API_DRAFT_SESSIONS)?;
    let server = start_api(a.listen, a.key, svc.clone(), None, draft).await?;
    until_stopped().await?;
    server.stop();
    svc.shutdown().await;
    Ok(())
}

async fn ask(data_dir: DataDir, a: AskArgs) -> Result<()> {
    use nakshatra_node::ask::{chain_line, recovery_line, AskOptions, AskerConfig, Prompt};
    use nakshatra_node::engine::tokenizer::ChatMessage;
    use nakshatra_swarm::protocol::act::{Sampling, WireDtype};
    let cfg = AskerConfig {
        bootstrap: a.bootstrap,
        listen: a.listen,
        direct_port: a.direct.port(),
        mdns: !a.no_mdns,
        data_dir,
        connect_wait: std::time::Duration::from_secs(a.wait),
    };
    let mut history: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    let first = match a.prompt {
        // `-`: the prompt is the whole of standard input (a document, a
        // long question), as read at once.
        Some(p) if p == "-" && !a.chat => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| anyhow::anyhow!("cannot read the prompt from standard input: {e}"))?;
            text
        }
        p => p.unwrap_or_default(),
    };
    let opts = AskOptions {
        model: a.model,
        prompt: if a.gen.raw {
            Prompt::Raw(first.clone())
        } else {
            let mut m = history.clone();
            m.push(ChatMessage::new("user", &first));
            Prompt::Chat(m)
        },
        max_tokens: a.gen.max_tokens,
        sampling: {
            let s = a.gen.sampler();
            Sampling {
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                seed: s.seed,
            }
        },
        wire: match a.wire {
            Wire::F32 => WireDtype::F32,
            Wire::F16 => WireDtype::F16,
        },
        direct: !a.direct.no_direct,
        step_timeout: std::time::Duration::from_secs(a.step_timeout),
        attempts: 4,
        verify: a.verify,
        recover_wait: std::time::Duration::from_secs(a.recover_wait),
        busy_wait: std::time::Duration::from_secs(a.busy_wait),
        #[cfg(feature = "fault-injection")]
        fresh_recovery: a.test_fresh_recovery,
        #[cfg(not(feature = "fault-injection"))]
        fresh_recovery: false,
        trace: step_trace(a.trace_steps.as_deref())?,
        draft: a.draft.load(1)?,
        ring: !a.no_ring,
    };
    if a.chat {
        let first = Some(first).filter(|p| !p.trim().is_empty());
        return chat(cfg, opts, history.split_off(0), first).await;
    }
    let json = a.json;
    let stdout = std::io::stdout();
    let out = nakshatra_node::ask::ask(
        cfg,
        opts,
        |chain| eprintln!("{}", chain_line(chain)),
        |text| {
            if !json {
                let mut o = stdout.lock();
                let _ = o.write_all(text.as_bytes());
                let _ = o.flush();
            }
        },
        |r| eprintln!("{}", recovery_line(r)),
    )
    .await?;
    if json {
        out!("{}", serde_json::to_string(&out)?);
    } else {
        out!();
    }
    print_stats(&out);
    Ok(())
}

/// `node ask --chat`: one asker for the whole conversation; each line of
/// standard input is a user turn, answered with the conversation so far
/// (`history`: the system message, if any; `first`: a first turn).
async fn chat(
    cfg: nakshatra_node::ask::AskerConfig,
    mut opts: nakshatra_node::ask::AskOptions,
    mut history: Vec<nakshatra_node::engine::tokenizer::ChatMessage>,
    first: Option<String>,
) -> Result<()> {
    use nakshatra_node::ask::{chain_line, recovery_line, AskEvents, AskerService, Prompt};
    use nakshatra_node::engine::tokenizer::ChatMessage;
    use std::io::BufRead;
    use std::ops::ControlFlow;
    let svc = AskerService::start(cfg).await?;
    // Standard input is read on a thread of its own (a blocking read);
    // one line at a time, so that a turn is read only when asked for.
    let (tx, mut lines) = tokio::sync::mpsc::channel::<String>(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(l) = line else { break };
            if tx.blocking_send(l).is_err() {
                break;
            }
        }
    });
    let tty = std::io::stdin().is_terminal();
    let (mut pending, mut failed) = (first, 0usize);
    loop {
        let line = match pending.take() {
            Some(p) => p,
            None => {
                if tty {
                    eprint!("> ");
                }
                match lines.recv().await {
                    Some(l) => l,
                    None => break,
                }
            }
        };
        let turn = line.trim();
        if turn.is_empty() {
            continue;
        }
        history.push(ChatMessage::new("user", turn));
        opts.prompt = Prompt::Chat(history.clone());
        let stdout = std::io::stdout();
        let r = svc
            .ask(
                &opts,
                AskEvents {
                    chain: &mut |chain| eprintln!("{}", chain_line(chain)),
                    text: &mut |text| {
                        let mut o = stdout.lock();
                        let _ = o.write_all(text.as_bytes());
                        let _ = o.flush();
                        ControlFlow::Continue(())
                    },
                    recovery: &mut |r| eprintln!("{}", recovery_line(r)),
                },
            )
            .await;
        out!();
        match r {
            Ok(out) => {
                print_stats(&out);
                history.push(ChatMessage::new("assistant", &out.text));
            }
            Err(e) => {
                // The turn is left out: the next one goes on from the
                // conversation before it.
                eprintln!("error: {e}");
                history.pop();
                failed += 1;
            }
        }
    }
    svc.shutdown().await;
    if failed > 0 {
        bail!("{failed} turn(s) of the conversation failed");
    }
    Ok(())
}

/// The `verify:`, `stats:` and `speculative:` lines an answer ends with
/// (stderr).
fn print_stats(out: &nakshatra_node::ask::AskOutcome) {
    let t = &out.timings;
    if let Some(v) = &out.verify {
        eprintln!(
            "verify: {} of {} steps checked against a replica chain ({}): all equal",
            v.checked,
            v.steps,
            v.replica.join(" -> ")
        );
    }
    eprintln!(
        "stats: prompt {} tokens, prefill {:.1} tok/s | {} tokens, decode {:.1} tok/s | hop overhead median {:.3} ms, p99 {:.3} ms | setup {:.2} s | links direct {}, libp2p {} | ring {} steps",
        t.prompt_tokens,
        t.prefill_tps,
        out.tokens.len(),
        t.decode_tps,
        t.hop_overhead_median_ms,
        t.hop_overhead_p99_ms,
        t.setup_s,
        t.links_direct,
        t.links_libp2p,
        t.ring_steps
    );
    if let Some(s) = &t.speculative {
        eprintln!(
            "speculative: k {} (mean {:.1}), {} of {} drafts accepted ({:.0} %), {:.2} tokens per pass",
            s.k,
            s.mean_k,
            s.accepted,
            s.drafted,
            s.acceptance * 100.0,
            s.tokens_per_step
        );
    }
}

fn parse_layers(s: &str) -> Result<LayerChoice> {
    if s == "auto" {
        Ok(LayerChoice::Auto)
    } else {
        Ok(layers::parse_range(s).map(LayerChoice::Range)?)
    }
}

fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("bad size {s:?}: try 512MB or 4GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        u => bail!("unknown size unit {u:?} in {s:?}"),
    };
    Ok((n * mult) as u64)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The step trace `--trace-steps` names, created (truncated) now.
fn step_trace(path: Option<&Path>) -> Result<Option<Arc<StepTrace>>> {
    path.map(|p| {
        StepTrace::create(p)
            .map(Arc::new)
            .with_context(|| format!("cannot create the step trace {}", p.display()))
    })
    .transpose()
}

async fn join(data_dir: DataDir, a: JoinArgs) -> Result<()> {
    use nakshatra_node::serve;
    let faults = a.faults();
    let trace = step_trace(a.trace_steps.as_deref())?;
    let source = match (a.model, a.model_id) {
        (Some(p), _) => serve::ModelSource::File(p),
        (None, Some(name)) => match nakshatra_swarm::whole_model_id(&name) {
            Some(id) => serve::ModelSource::Id(id),
            None => serve::ModelSource::Named(name),
        },
        (None, None) => serve::ModelSource::Swarm,
    };
    let opts = serve::JoinOptions {
        source,
        layers: a.layers,
        max_memory: a.max_memory,
        faults: faults.clone(),
        bootstrap: a.bootstrap.clone(),
        listen: a.listen,
        direct_port: a.direct.port(),
        external_addrs: a.external_addr,
        relays: a.relay,
        data_dir: data_dir.clone(),
        mdns: !a.no_mdns,
        engine: a.offload.apply(EngineConfig {
            threads: a
                .threads
                .unwrap_or_else(nakshatra_node::engine::default_threads),
            ctx_per_session: a.ctx_size,
            max_sessions: a.max_sessions,
            ..EngineConfig::default()
        }),
        record_ttl: std::time::Duration::from_secs(a.record_ttl),
        refresh: std::time::Duration::from_secs(a.refresh),
        idle_timeout: std::time::Duration::from_secs(a.idle_timeout),
        evict_idle_after: std::time::Duration::from_secs(a.evict_idle_after),
        rebalance: (a.rebalance_period > 0).then(|| serve::RebalanceOptions {
            period: std::time::Duration::from_secs(a.rebalance_period),
            min_dwell: std::time::Duration::from_secs(a.min_dwell),
        }),
        trace,
    };
    let mut node = serve::start(opts).await?;
    {
        let mut out = std::io::stdout().lock();
        for addr in &node.addrs {
            writeln!(out, "listening on {addr}")?;
        }
        out.flush()?;
    }
    if let Some(choice) = &node.chosen {
        eprintln!("model: {choice}");
    }
    eprintln!(
        "serving layers {}..{} of model {} as {}",
        node.info.start,
        node.info.end,
        node.info.model_id,
        node.swarm.peer_id()
    );
    // The API asks under an identity of its own (a node cannot be a hop
    // of its own chain otherwise: no stream to itself), through this node.
    let api = match a.api {
        Some(listen) => {
            use nakshatra_node::ask::{AskerConfig, AskerService};
            let mut bootstrap = node.addrs.clone();
            bootstrap.extend(a.bootstrap.iter().cloned());
            let svc = AskerService::start(AskerConfig {
                bootstrap,
                listen: vec!["/ip4/0.0.0.0/tcp/0".parse()?],
                direct_port: a.direct.port().map(|_| 0),
                mdns: !a.no_mdns,
                data_dir: data_dir.clone(),
                connect_wait: std::time::Duration::from_secs(10),
            })
            .await?;
            let draft = a.api_draft.load(API_DRAFT_SESSIONS)?;
            let server = start_api(
                listen,
                a.api_key,
                svc.clone(),
                Some(node.engine_watch()),
                draft,
            )
            .await?;
            Some((server, svc))
        }
        None => None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(CAPACITY_TICK);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                if let Err(e) = node.refresh_capacity().await {
                    tracing::warn!("re-announce failed: {e}");
                }
                match node.rebalance().await {
                    Ok(Some(to)) => eprintln!("moved to layers {}..{} of model {}", to.start, to.end, node.info.model_id),
                    Ok(None) => {}
                    Err(e) => {
                        eprintln!("leaving the swarm: the move failed and left nothing served: {e}");
                        break;
                    }
                }
                faults.on_tick(&node, &data_dir).await;
            }
        }
    }
    eprintln!("leaving the swarm");
    if let Some((server, svc)) = api {
        server.stop();
        svc.shutdown().await;
    }
    node.leave().await?;
    Ok(())
}

fn inspect(path: &std::path::Path, json: bool) -> Result<()> {
    let info = nakshatra_slicer::inspect(path)?;
    // What the family table says: supported or not, split exactly or
    // served whole only, and why.
    let family = nakshatra_slicer::family(&info.arch);
    let (family_json, family_line, splits_line) = match family {
        Ok(f) => (
            serde_json::json!({
                "name": f.name,
                "moe": f.moe,
                "splits": if f.hidden_input_refused.is_some() { "refused" } else { "exact" },
                "reason": f.hidden_input_refused,
            }),
            format!(
                "{} ({})",
                f.name,
                if f.moe { "mixture of experts" } else { "dense" }
            ),
            match f.hidden_input_refused {
                Some(why) => format!("refused: {why}"),
                None => "exact (split == whole, bit for bit)".to_string(),
            },
        ),
        Err(e) => (
            serde_json::json!({ "name": null, "splits": "refused", "reason": e.to_string() }),
            "not supported".to_string(),
            format!("refused: {e}"),
        ),
    };
    if json {
        let mut v = serde_json::to_value(&info)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("family".into(), family_json);
        }
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    out!("id:         {}", info.id);
    out!("name:       {}", info.name);
    out!("arch:       {}", info.arch);
    out!("family:     {family_line}");
    out!("splits:     {splits_line}");
    out!("layers:     {}", info.n_layers);
    out!("hidden:     {}", info.n_embd);
    out!("vocab:      {}", info.n_vocab);
    out!("tied:       {}", info.tied_embeddings);
    out!("file bytes: {}", info.file_bytes);
    if let Some(s) = &info.slice {
        out!(
            "slice:      layers {}..{} of {} from {}",
            s.start,
            s.end,
            s.n_layers_total,
            s.source_id
        );
    }
    for (i, (b, h)) in info.block_bytes.iter().zip(&info.block_hashes).enumerate() {
        out!("block {i:>3}: {b:>12} bytes  {h}");
    }
    Ok(())
}

fn run(data_dir: &DataDir, a: RunArgs) -> Result<()> {
    let info = nakshatra_slicer::inspect(&a.model)
        .with_context(|| format!("reading {}", a.model.display()))?;
    let ranges = layers::split_ranges(&a.split, info.n_layers)?;
    let cfg = a.offload.apply(EngineConfig {
        threads: a
            .threads
            .unwrap_or_else(nakshatra_node::engine::default_threads),
        ctx_per_session: a.ctx_size,
        max_sessions: 1,
        n_ubatch: a.ubatch,
        ..EngineConfig::default()
    });
    let tok = Tokenizer::load(&a.model)?;
    let text = if a.gen.raw {
        a.prompt.clone()
    } else {
        tok.chat_prompt(&a.prompt)?
    };
    let prompt = tok.tokenize(&text);
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if prompt.len() > a.ctx_size as usize {
        bail!(
            "prompt is {} tokens, longer than the context of {} tokens (raise --ctx-size)",
            prompt.len(),
            a.ctx_size
        );
    }
    let hashes = nakshatra_slicer::ModelHashes::from(&info);
    let mut stages = Vec::with_capacity(ranges.len());
    for r in &ranges {
        let p = slices::ensure_slice(data_dir, &a.model, &info.id, &hashes, r)?;
        stages.push(SliceEngine::load(&p, None, &cfg)?);
    }
    let mut chain = LocalChain::new(stages)?;
    let session = chain.open()?;
    let params = GenerateParams {
        max_tokens: a.gen.max_tokens,
        sampler: a.gen.sampler(),
        keep_logits: false,
    };
    let mut utf8 = Utf8Stream::default();
    let stdout = std::io::stdout();
    let g = generate(
        &mut chain,
        &session,
        &prompt,
        &params,
        |t| tok.is_eog(t),
        |t| {
            let s = utf8.push(&tok.piece(t));
            let mut out = stdout.lock();
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
        },
    )?;
    let rest = utf8.finish();
    let mut out = stdout.lock();
    out.write_all(rest.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()?;
    let split: Vec<String> = ranges
        .iter()
        .map(|r| format!("{}..{}", r.start, r.end))
        .collect();
    eprintln!(
        "stats: ranges {} | prompt {} tokens, prefill {:.1} tok/s | {} tokens, decode {:.1} tok/s",
        split.join(","),
        g.n_prompt,
        g.prefill_tps(),
        g.tokens.len(),
        g.decode_tps()
    );
    Ok(())
}
