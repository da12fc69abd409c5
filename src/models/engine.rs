//! One loaded model: its supervised llama-server child and everything that
//! belongs to that child alone (plan, slot table, cost model, tuner), plus
//! how long it may stay loaded once idle.
//!
//! An [`Engine`] is started by the [`super::fleet::Fleet`], which alone
//! decides when it stops; requests hold an [`EngineUse`] while they run,
//! so an engine in use is never unloaded under them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::{Config, CostConfig, KeepAlive, LlamaConfig};
use crate::cost::{self, CostModel, CostProfile};
use crate::gguf::ModelFacts;
use crate::hardware::Hardware;
use crate::plan::{self, BinaryCaps, LaunchPlan, PlanInputs};
use crate::slots::Scheduler;
use crate::status::StaticStatus;
use crate::supervisor::process::{OutputTail, Watchdog};
use crate::supervisor::{self, LaunchSpec, SupervisorHandle, SupervisorView};
use crate::sync::lock;

/// A model's launch plan and the cost profile it was planned with.
#[derive(Debug, Clone)]
pub struct Planned {
    pub facts: ModelFacts,
    pub plan: LaunchPlan,
    /// `[cost] profile`, or the cached measurement for `cost_key`.
    pub cost: Option<CostProfile>,
    /// The cache key of a measurement of this binary, model, machine and
    /// speed-relevant flags.
    pub cost_key: String,
}

impl Planned {
    /// What the model takes while loaded, as the planner counts it: the
    /// weights, the KV cache it allocates and the margin for buffers.
    pub fn footprint_bytes(&self) -> u64 {
        footprint_bytes(&self.plan)
    }
}

/// Weights + planned KV + margin.
pub fn footprint_bytes(plan: &LaunchPlan) -> u64 {
    let m = &plan.memory;
    m.model_bytes + m.kv_planned_bytes + m.margin_bytes
}

/// Plans one model: first without a measurement, which gives the key the
/// measurement is cached under, then with the measurement if one exists.
/// The error names what is wrong with `[cost] profile`.
#[allow(clippy::too_many_arguments)]
pub fn plan_model(
    hardware: &Hardware,
    facts: &ModelFacts,
    llama: &LlamaConfig,
    caps: BinaryCaps,
    cost_config: &CostConfig,
    binary: &Path,
    memory_limit: Option<u64>,
    rpc: &[crate::rpc::RpcWorker],
) -> Result<Planned, String> {
    let inputs = |cost| PlanInputs {
        caps,
        cost,
        keep_shape: None,
        memory_limit,
        rpc,
    };
    let unmeasured = plan::plan_with(hardware, facts, llama, inputs(None));
    let cost_key = cost::profile_key(binary, &facts.path, hardware, &unmeasured.speed_flags());
    let cost = match &cost_config.profile {
        Some(path) => Some(cost::read_profile(path)?),
        None => cost::cached_profile(&cost_key),
    };
    let plan = plan::plan_with(hardware, facts, llama, inputs(cost.as_ref()));
    Ok(Planned {
        facts: facts.clone(),
        plan,
        cost,
        cost_key,
    })
}

/// What starting a model's child needs, shared by every model.
pub struct Launcher {
    pub binary: PathBuf,
    pub caps: BinaryCaps,
    pub hardware: Hardware,
    pub config: Config,
    pub watchdog: Option<Watchdog>,
    pub listen: String,
    /// The RPC workers, as asked before the first child started (a worker
    /// serves one client at a time, so it is not asked again while a child
    /// holds it).
    pub rpc: Vec<crate::rpc::RpcWorker>,
}

/// A model loaded: its child (or, in tests, a scripted stand-in's view) and
/// its slot table.
pub struct Engine {
    /// The name requests use.
    pub name: String,
    pub path: PathBuf,
    pub status: StaticStatus,
    pub footprint_bytes: u64,
    pub supervisor: watch::Receiver<SupervisorView>,
    pub tail: OutputTail,
    pub scheduler: Arc<Scheduler>,
    pub loaded_at: SystemTime,
    /// An `[[upstream]]` the daemon routes to but does not run; `None` for
    /// the supervised child.
    pub remote: Option<Remote>,
    usage: std::sync::Mutex<Usage>,
    /// Told whenever this engine goes idle or its keep-alive changes.
    idle: Arc<Notify>,
    control: std::sync::Mutex<Option<Control>>,
}

/// Who is using the engine and for how long it may stay idle.
struct Usage {
    users: usize,
    last_used: Instant,
    keep_alive: KeepAlive,
}

/// The engine's own tasks, taken once when it stops.
struct Control {
    supervisor: SupervisorHandle,
    tuner: Option<JoinHandle<()>>,
}

/// What `ps` shows of one loaded model.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct LoadedModel {
    pub name: String,
    /// "local" (the supervised child) or the upstream's URL.
    #[serde(default)]
    pub backend: String,
    pub path: String,
    /// The supervisor's state: "starting", "ready", "restarting", ….
    pub state: String,
    pub pid: Option<u32>,
    /// Weights + KV + margin, as planned.
    pub size_bytes: u64,
    pub slots: u32,
    pub ctx_per_slot: u32,
    /// Requests running on a slot.
    pub busy: usize,
    /// Requests waiting for a slot.
    pub queued: usize,
    /// Requests holding the model (waiting for it to be ready, queued or
    /// running).
    pub in_use: usize,
    /// "-1" (never), or seconds.
    pub keep_alive: String,
    /// Seconds until it unloads if nothing uses it; `None` while in use or
    /// when it never unloads.
    pub unloads_in_s: Option<f64>,
    pub loaded_at: String,
}

impl Engine {
    /// Starts the model's child under its own supervisor, and its tuner
    /// when nothing is measured for it yet.
    pub fn start(
        launcher: &Launcher,
        name: &str,
        planned: Planned,
        keep_alive: KeepAlive,
        idle: Arc<Notify>,
        own_port: bool,
    ) -> Engine {
        let config = &launcher.config;
        let plan = &planned.plan;
        let mut llama = config.llama.clone();
        if !own_port {
            // Only the model of `[llama] model` may have a fixed port.
            llama.port = 0;
        }
        // llama-server then reports the name requests use in every answer,
        // streamed chunks included (it splits `--alias` at commas).
        llama.model_alias = (!name.contains(',')).then(|| name.to_string());
        let ram_tokens = plan::planned_ram_cache_tokens(plan, &llama.extra_args);
        let cost_model = CostModel::new(
            planned
                .cost
                .clone()
                .unwrap_or_else(|| CostProfile::fallback(&launcher.hardware)),
        );
        let scheduler = Scheduler::new(
            plan.slots as usize,
            plan.concurrency as usize,
            config.server.max_queue,
            ram_tokens,
            cost_model,
        );
        scheduler.set_unified_pool(plan.kv_unified.then_some(plan.ctx_size));
        let status = StaticStatus::new(
            launcher.listen.clone(),
            &planned.facts,
            plan,
            &launcher.hardware,
            config.supervisor.ready_timeout_s,
        );
        let spec = LaunchSpec {
            binary: launcher.binary.clone(),
            model: planned.facts.path.clone(),
            plan: plan.clone(),
            llama: llama.clone(),
        };
        let handle = supervisor::start(spec, config.supervisor.clone(), launcher.watchdog.clone());
        let tuner = (config.cost.measure && planned.cost.is_none()).then(|| {
            let tuner = super::tuner::Tuner {
                key: planned.cost_key.clone(),
                ctx_per_slot: plan.ctx_per_slot,
                ram_tier: ram_tokens > 0,
                caps: launcher.caps,
                rpc: launcher.rpc.clone(),
                hardware: launcher.hardware.clone(),
                model: planned.facts.clone(),
                llama,
                plan: plan.clone(),
                replanner: handle.replanner(),
            };
            tokio::spawn(tuner.run(handle.view.clone(), scheduler.clone()))
        });
        let mut engine = Engine::from_parts(
            name,
            &planned.facts.path,
            status,
            footprint_bytes(plan),
            handle.view.clone(),
            handle.tail.clone(),
            scheduler,
            keep_alive,
            idle,
        );
        engine.control = std::sync::Mutex::new(Some(Control {
            supervisor: handle,
            tuner,
        }));
        engine
    }

    /// An engine over a child someone else runs (tests' scripted child).
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        name: &str,
        path: &Path,
        status: StaticStatus,
        footprint_bytes: u64,
        supervisor: watch::Receiver<SupervisorView>,
        tail: OutputTail,
        scheduler: Arc<Scheduler>,
        keep_alive: KeepAlive,
        idle: Arc<Notify>,
    ) -> Engine {
        Engine {
            name: name.to_string(),
            path: path.to_path_buf(),
            status,
            footprint_bytes,
            supervisor,
            tail,
            scheduler,
            loaded_at: SystemTime::now(),
            usage: std::sync::Mutex::new(Usage {
                users: 0,
                last_used: Instant::now(),
                keep_alive,
            }),
            idle,
            control: std::sync::Mutex::new(None),
            remote: None,
        }
    }

    /// The engine of an `[[upstream]]` serving `name`: its slot table (what
    /// was routed there) and the view its prober keeps, which `view` sends
    /// on.
    pub fn upstream(
        name: &str,
        remote: Remote,
        slots: usize,
        max_queue: usize,
        cost: CostProfile,
        view: watch::Receiver<SupervisorView>,
        idle: Arc<Notify>,
    ) -> Engine {
        use crate::status::{HardwareStatus, ModelStatus, PlanStatus};
        let status = StaticStatus {
            model: ModelStatus {
                path: remote.url.clone(),
                ..ModelStatus::default()
            },
            plan: PlanStatus {
                slots: slots as u32,
                concurrency: slots as u32,
                ..PlanStatus::default()
            },
            hardware: HardwareStatus {
                chip: remote.url.clone(),
                ..HardwareStatus::default()
            },
            ..StaticStatus::default()
        };
        let scheduler = Scheduler::new(slots, slots, max_queue, 0, CostModel::new(cost));
        let mut engine = Engine::from_parts(
            name,
            Path::new(&remote.url),
            status,
            0,
            view,
            OutputTail::default(),
            scheduler,
            KeepAlive::Forever,
            idle,
        );
        engine.remote = Some(remote);
        engine
    }

    /// What this backend offers a request predicted at `predicted_ms`
    /// here, for routing.
    pub fn offer(&self, predicted_ms: f64) -> crate::models::route::Offer {
        let ready = self.supervisor.borrow().state == crate::supervisor::State::Ready;
        crate::models::route::Offer {
            healthy: ready,
            in_flight: self.scheduler.busy() + self.scheduler.queued(),
            concurrency: self.scheduler.concurrency(),
            predicted_ms,
            weight: self.remote.as_ref().map_or(1.0, |r| r.weight),
            // Conversations and sessions: not yet remembered per backend.
            sticky: false,
        }
    }

    /// Where its requests go: "local", or the upstream's URL.
    pub fn backend(&self) -> &str {
        self.remote.as_ref().map_or("local", |r| r.url.as_str())
    }

    /// What messages call it: "llama-server" for the child, "the upstream
    /// <url>" for an upstream.
    pub fn described(&self) -> String {
        match &self.remote {
            None => "llama-server".to_string(),
            Some(remote) => format!("the upstream {}", remote.url),
        }
    }

    /// A use of this engine by one request, until the returned guard drops.
    pub fn use_now(self: &Arc<Self>, keep_alive: Option<KeepAlive>) -> EngineUse {
        let mut usage = lock(&self.usage);
        usage.users += 1;
        usage.last_used = Instant::now();
        if let Some(keep_alive) = keep_alive {
            usage.keep_alive = keep_alive;
        }
        EngineUse(self.clone())
    }

    pub fn in_use(&self) -> usize {
        lock(&self.usage).users
    }

    /// When nothing has used it since `last use + keep_alive`: the moment it
    /// should unload; `None` while in use or when it never unloads.
    pub fn unload_at(&self) -> Option<Instant> {
        let usage = lock(&self.usage);
        (usage.users == 0)
            .then(|| usage.keep_alive.duration())
            .flatten()
            .map(|d| usage.last_used + d)
    }

    pub fn last_used(&self) -> Instant {
        lock(&self.usage).last_used
    }

    pub fn set_keep_alive(&self, keep_alive: KeepAlive) {
        lock(&self.usage).keep_alive = keep_alive;
        self.idle.notify_one();
    }

    /// The supervisor stops restarting the child (shutdown has begun).
    pub fn drain(&self) {
        if let Some(control) = lock(&self.control).as_ref() {
            control.supervisor.drain();
        }
    }

    /// Stops the child and waits until it is gone.
    pub async fn stop(&self) {
        let control = lock(&self.control).take();
        if let Some(control) = control {
            if let Some(tuner) = control.tuner {
                tuner.abort();
            }
            control.supervisor.shutdown().await;
        }
    }

    pub fn loaded_model(&self) -> LoadedModel {
        let view = self.supervisor.borrow().clone();
        let usage = lock(&self.usage);
        let unloads_in_s = (usage.users == 0)
            .then(|| usage.keep_alive.duration())
            .flatten()
            .map(|d| {
                let left = (usage.last_used + d).saturating_duration_since(Instant::now());
                (left.as_secs_f64() * 10.0).round() / 10.0
            });
        LoadedModel {
            backend: self.backend().to_string(),
            name: self.name.clone(),
            path: self.path.display().to_string(),
            state: view.state.as_str().to_string(),
            pid: view.pid,
            size_bytes: self.footprint_bytes,
            slots: self.status.plan.slots,
            ctx_per_slot: self.status.plan.ctx_per_slot,
            busy: self.scheduler.busy(),
            queued: self.scheduler.queued(),
            in_use: usage.users,
            keep_alive: usage.keep_alive.to_string(),
            unloads_in_s,
            loaded_at: supervisor::rfc3339_utc(self.loaded_at),
        }
    }
}

/// An upstream server: where it is and what it is.
#[derive(Debug, Clone)]
pub struct Remote {
    /// As configured (its name in records, `/stats` and `/metrics`).
    pub url: String,
    /// `http://host:port`, without a trailing `/v1`: request paths are
    /// appended to it.
    pub base: String,
    /// `Bearer <api_key>`.
    pub auth: Option<String>,
    pub kind: crate::config::UpstreamKind,
    pub weight: f64,
    /// Its place among the `[[upstream]]` entries: backends are listed in
    /// the configuration's order whatever order they joined in.
    pub position: usize,
    /// Tells the prober's view it failed a request (so routing leaves it
    /// out until a probe succeeds again).
    pub down: watch::Sender<SupervisorView>,
}

impl Remote {
    /// Whether requests to it carry `id_slot` and `cache_prompt` (only a
    /// llama-server's slots are the daemon's to choose).
    pub fn picks_slots(&self) -> bool {
        self.kind == crate::config::UpstreamKind::LlamaServer
    }

    /// A request to it failed outright: out until the next good probe.
    pub fn mark_down(&self, why: &str) {
        self.down.send_if_modified(|view| {
            let was_ready = view.state == crate::supervisor::State::Ready;
            if was_ready {
                view.state = crate::supervisor::State::Restarting;
                view.last_exit = Some(why.to_string());
            }
            was_ready
        });
    }
}

/// One request's hold on an engine: while any is held, the engine stays.
pub struct EngineUse(Arc<Engine>);

impl std::ops::Deref for EngineUse {
    type Target = Arc<Engine>;
    fn deref(&self) -> &Arc<Engine> {
        &self.0
    }
}

impl Drop for EngineUse {
    fn drop(&mut self) {
        let mut usage = lock(&self.0.usage);
        usage.users = usage.users.saturating_sub(1);
        usage.last_used = Instant::now();
        drop(usage);
        self.0.idle.notify_one();
    }
}

/// How long `unload_at` may lie in the past before the reaper acts; it is
/// woken by every change, so this only bounds a missed wake-up.
pub const REAPER_TICK: Duration = Duration::from_secs(30);
