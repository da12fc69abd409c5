//! The models served by name, and which of them are loaded.
//!
//! The fleet owns every [`Engine`]. A request names a model; `acquire`
//! returns the loaded engine, or loads it first. Loads are one at a time
//! (a second request for a model that is loading waits for the same load
//! and gets the same engine). A model gets the plan it would get alone
//! within `[models] memory_mib`; when that does not fit next to the loaded
//! models, the least recently used idle ones are unloaded first, and only
//! when none is left to unload is the new model planned smaller. An idle
//! model unloads `keep_alive` after its last request (the reaper task).
//!
//! Invariants: an engine with a request holding it (`EngineUse`) is never
//! unloaded; the models loaded together fit the budget, except a single
//! model larger than the budget alone, which loads with the planner's
//! warning; an engine is stopped only after it left the list, and a new
//! one is started only once the engines it displaced have stopped.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use super::engine::{plan_model, Engine, EngineUse, Launcher, LoadedModel, Planned, REAPER_TICK};
use crate::config::KeepAlive;
use crate::sync::lock;

/// A model that can be served by name.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelSpec {
    pub name: String,
    /// Other names it answers to.
    pub aliases: Vec<String>,
    pub path: std::path::PathBuf,
    /// How long it stays loaded once idle.
    pub keep_alive: KeepAlive,
    /// `[llama] model`: loaded at start, and the one that may use `[llama] port`.
    pub primary: bool,
}

impl ModelSpec {
    fn answers_to(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
}

/// Why a model could not be had.
#[derive(Debug, Clone, PartialEq)]
pub enum FleetError {
    /// No model answers to this name.
    NotFound { name: String, served: Vec<String> },
    /// It does not fit next to the models in use, which cannot be unloaded.
    NoRoom {
        name: String,
        needs_bytes: u64,
        free_bytes: u64,
        busy: Vec<String>,
    },
    /// Its file could not be read or planned.
    Unloadable { name: String, why: String },
    /// The daemon runs no model itself (front only) and no upstream
    /// serving this one has joined yet.
    NoUpstreamYet { name: String },
    /// The daemon is shutting down.
    Stopping,
}

impl std::fmt::Display for FleetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MIB: f64 = (1 << 20) as f64;
        match self {
            FleetError::NotFound { name, served } => write!(
                f,
                "the model {name:?} is not served here; this daemon serves: {} \
                 (`contextpilotd models` lists them; or set [models] fallback to answer every name with one)",
                served.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
            ),
            FleetError::NoRoom { name, needs_bytes, free_bytes, busy } => write!(
                f,
                "the model {name:?} needs {:.0} MiB but only {:.0} MiB of the memory budget are free, \
                 and the models holding the rest are in use ({}); retry when they are idle, or raise [models] memory_mib",
                *needs_bytes as f64 / MIB,
                *free_bytes as f64 / MIB,
                busy.join(", ")
            ),
            FleetError::Unloadable { name, why } => write!(f, "the model {name:?} cannot be loaded: {why}"),
            FleetError::NoUpstreamYet { name } => write!(
                f,
                "no upstream serving {name:?} has answered yet: this daemon runs no model itself (an upstream joins once it answers)"
            ),
            FleetError::Stopping => f.write_str("the daemon is shutting down"),
        }
    }
}

/// Every servable model, the loaded ones, and the budget they share.
pub struct Fleet {
    specs: std::sync::RwLock<Vec<ModelSpec>>,
    /// The name of the model that answers names nothing else answers to
    /// (`[models] fallback`).
    fallback: Option<String>,
    /// Lists the servable models again (a model pulled or copied in since
    /// the last look), at most once per [`RESCAN_EVERY`], when a request
    /// names one not known.
    rescan: Option<Rescan>,
    last_scan: std::sync::Mutex<Instant>,
    /// `None` when models cannot be started here (tests over a scripted child).
    launcher: Option<Launcher>,
    budget_bytes: u64,
    engines: std::sync::Mutex<Vec<Arc<Engine>>>,
    /// Held while a model loads or unloads, so memory is counted one change
    /// at a time.
    changing: tokio::sync::Mutex<()>,
    /// Told when an engine goes idle or a keep-alive changes (the reaper).
    idle: Arc<Notify>,
    stopping: AtomicBool,
    /// Counts requests routed (round robin).
    turn: std::sync::atomic::AtomicUsize,
    routing: crate::config::RoutingConfig,
    /// Where each conversation or user went last (routing's stickiness).
    routes: std::sync::Mutex<RecentRoutes>,
}

/// Where conversations went, the most recent [`RecentRoutes::CAPACITY`].
#[derive(Default)]
struct RecentRoutes {
    backend: HashMap<u64, String>,
    order: VecDeque<u64>,
}

impl RecentRoutes {
    /// Enough for every live conversation of a team; an old one that falls
    /// out is only routed afresh.
    const CAPACITY: usize = 4096;

    fn remember(&mut self, key: u64, backend: &str) {
        if self.backend.insert(key, backend.to_string()).is_none() {
            self.order.push_back(key);
            if self.order.len() > Self::CAPACITY {
                if let Some(oldest) = self.order.pop_front() {
                    self.backend.remove(&oldest);
                }
            }
        }
    }
}

/// What lists the servable models.
pub type Rescan = Box<dyn Fn() -> Vec<ModelSpec> + Send + Sync>;

/// The shortest time between two looks for models a request named.
pub const RESCAN_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl Fleet {
    /// A fleet that starts models with `launcher`, within `budget_bytes`;
    /// `rescan` lists the servable models again when a name is not known.
    pub fn new(
        rescan: Rescan,
        fallback: Option<&str>,
        launcher: Launcher,
        budget_bytes: u64,
    ) -> Fleet {
        let mut fleet = Fleet::over(rescan(), fallback, Vec::new());
        fleet.rescan = Some(rescan);
        fleet.launcher = Some(launcher);
        fleet.budget_bytes = budget_bytes;
        fleet
    }

    /// A fleet over engines started elsewhere; it cannot load others.
    pub fn over(specs: Vec<ModelSpec>, fallback: Option<&str>, engines: Vec<Arc<Engine>>) -> Fleet {
        Fleet {
            specs: std::sync::RwLock::new(specs),
            fallback: fallback.map(str::to_string),
            rescan: None,
            last_scan: std::sync::Mutex::new(Instant::now()),
            launcher: None,
            budget_bytes: u64::MAX,
            engines: std::sync::Mutex::new(engines),
            changing: tokio::sync::Mutex::new(()),
            idle: Arc::new(Notify::new()),
            stopping: AtomicBool::new(false),
            turn: std::sync::atomic::AtomicUsize::new(0),
            routing: crate::config::RoutingConfig::default(),
            routes: Default::default(),
        }
    }

    /// Requests are spread over a model's backends by `routing`.
    pub fn with_routing(mut self, routing: crate::config::RoutingConfig) -> Fleet {
        self.routing = routing;
        self
    }

    /// An `[[upstream]]`'s engine: served under its model's name next to
    /// the local one, never unloaded (it uses no memory here). Upstreams
    /// keep the configuration's order, whenever each joins.
    pub fn add_upstream(&self, engine: Arc<Engine>) {
        let position = engine.remote.as_ref().map_or(usize::MAX, |r| r.position);
        let mut engines = lock(&self.engines);
        let at = engines
            .iter()
            .position(|e| e.remote.as_ref().is_some_and(|r| r.position > position))
            .unwrap_or(engines.len());
        engines.insert(at, engine);
    }

    /// What engines report their idleness to.
    pub fn idle_signal(&self) -> Arc<Notify> {
        self.idle.clone()
    }

    pub fn specs(&self) -> Vec<ModelSpec> {
        crate::sync::read(&self.specs).clone()
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// The model a request naming `name` gets (`None`: the primary one).
    /// A name not known sends the fleet looking again (a model pulled since
    /// the last look is found), unless it looked a moment ago.
    pub fn resolve(&self, name: Option<&str>) -> Result<ModelSpec, FleetError> {
        let wanted = name.filter(|n| !n.is_empty());
        if let Some(spec) = self.find(wanted) {
            return Ok(spec);
        }
        if let (Some(name), Some(rescan)) = (wanted, &self.rescan) {
            let due = {
                let mut last = lock(&self.last_scan);
                let due = last.elapsed() >= RESCAN_EVERY;
                if due {
                    *last = Instant::now();
                }
                due
            };
            if due {
                tracing::debug!(requested = %name, "looking for models again");
                *crate::sync::write(&self.specs) = rescan();
                if let Some(spec) = self.find(wanted) {
                    return Ok(spec);
                }
            }
        }
        let fallback = self.fallback.as_deref().and_then(|f| self.find(Some(f)));
        fallback.ok_or_else(|| FleetError::NotFound {
            name: wanted.unwrap_or_default().to_string(),
            served: self.specs().into_iter().map(|s| s.name).collect(),
        })
    }

    fn find(&self, name: Option<&str>) -> Option<ModelSpec> {
        let specs = crate::sync::read(&self.specs);
        match name {
            None => specs.iter().find(|s| s.primary).or(specs.first()).cloned(),
            Some(name) => specs.iter().find(|s| s.answers_to(name)).cloned(),
        }
    }

    /// Every backend serving `name`: the local engine first (when loaded),
    /// then the `[[upstream]]` engines, in configuration order. Routing
    /// chooses among them when there is more than one.
    pub fn backends(&self, name: &str) -> Vec<Arc<Engine>> {
        let engines = lock(&self.engines);
        let serving = engines.iter().filter(|e| e.name == name);
        let (local, remote): (Vec<_>, Vec<_>) = serving.partition(|e| e.remote.is_none());
        local.into_iter().chain(remote).cloned().collect()
    }

    /// How requests are spread over a model's backends.
    pub fn routing(&self) -> &crate::config::RoutingConfig {
        &self.routing
    }

    /// The backend the conversation or user `key` went to last.
    pub fn routed_before(&self, key: u64) -> Option<String> {
        lock(&self.routes).backend.get(&key).cloned()
    }

    /// `key`'s requests now go to `backend`.
    pub fn remember_route(&self, key: u64, backend: &str) {
        lock(&self.routes).remember(key, backend);
    }

    /// The next request's turn, for round robin.
    pub fn next_turn(&self) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed)
    }

    /// The engine of a loaded model.
    pub fn loaded(&self, name: &str) -> Option<Arc<Engine>> {
        lock(&self.engines)
            .iter()
            .find(|e| e.name == name && e.remote.is_none())
            .cloned()
    }

    /// Every loaded engine, in load order.
    pub fn engines(&self) -> Vec<Arc<Engine>> {
        lock(&self.engines).clone()
    }

    /// The primary model's engine, when loaded; else the first loaded.
    pub fn primary(&self) -> Option<Arc<Engine>> {
        let primary = self.find(None).filter(|s| s.primary).map(|s| s.name);
        let engines = lock(&self.engines);
        engines
            .iter()
            .find(|e| Some(&e.name) == primary.as_ref())
            .or(engines.first())
            .cloned()
    }

    pub fn ps(&self) -> Vec<LoadedModel> {
        self.engines().iter().map(|e| e.loaded_model()).collect()
    }

    /// The model's engine for one request, loading it first if need be;
    /// `keep_alive` (the request's) replaces the model's from now on.
    pub async fn acquire(
        &self,
        spec: &ModelSpec,
        keep_alive: Option<KeepAlive>,
    ) -> Result<EngineUse, FleetError> {
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return Err(FleetError::Stopping);
            }
            if let Some(engine) = self.use_loaded(&spec.name, keep_alive) {
                return Ok(engine);
            }
            // A fleet that starts nothing (front only) serves a model from
            // its upstreams; routing then picks among them.
            if self.launcher.is_none() {
                if let Some(upstream) = self.backends(&spec.name).first() {
                    return Ok(upstream.use_now(keep_alive));
                }
            }
            let _changing = self.changing.lock().await;
            // Someone else's load of this model may have finished while we waited.
            if self.loaded(&spec.name).is_some() {
                continue;
            }
            self.load_locked(spec).await?;
        }
    }

    fn use_loaded(&self, name: &str, keep_alive: Option<KeepAlive>) -> Option<EngineUse> {
        let engines = lock(&self.engines);
        engines
            .iter()
            .find(|e| e.name == name && e.remote.is_none())
            .map(|e| e.use_now(keep_alive))
    }

    /// Loads `spec` (no-op when loaded); for `POST /models/load`.
    pub async fn load(
        &self,
        spec: &ModelSpec,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Arc<Engine>, FleetError> {
        let engine = self.acquire(spec, keep_alive).await?;
        Ok(Arc::clone(&engine))
    }

    /// Unloads a model: its child stops now if nothing uses it, else right
    /// after its last request. Returns whether it was loaded.
    pub async fn unload(&self, name: &str) -> bool {
        let _changing = self.changing.lock().await;
        let Some(engine) = self.loaded(name) else {
            return false;
        };
        match self.take_idle(|e| Arc::ptr_eq(e, &engine)) {
            Some(idle) => idle.stop().await,
            // In use: it goes once its last request is done.
            None => engine.set_keep_alive(KeepAlive::After(std::time::Duration::ZERO)),
        }
        true
    }

    /// Takes out of the list the first engine (least recently used first)
    /// that `pick` chooses and nothing uses, checked under the same lock
    /// every use is taken under, so no request can start using it after.
    fn take_idle(&self, pick: impl Fn(&Arc<Engine>) -> bool) -> Option<Arc<Engine>> {
        let mut engines = lock(&self.engines);
        let index = engines
            .iter()
            .enumerate()
            // An upstream is not the fleet's to unload.
            .filter(|(_, e)| e.remote.is_none() && e.in_use() == 0 && pick(e))
            .min_by_key(|(_, e)| e.last_used())
            .map(|(i, _)| i)?;
        let engine = engines.remove(index);
        tracing::info!(model = %engine.name, "unloading the model");
        Some(engine)
    }

    /// Plans and starts `spec`, unloading idle models it needs room from.
    /// Called with `changing` held.
    async fn load_locked(&self, spec: &ModelSpec) -> Result<(), FleetError> {
        let Some(launcher) = &self.launcher else {
            return Err(FleetError::NoUpstreamYet {
                name: spec.name.clone(),
            });
        };
        if self.stopping.load(Ordering::Acquire) {
            return Err(FleetError::Stopping);
        }
        let unloadable = |why: String| FleetError::Unloadable {
            name: spec.name.clone(),
            why,
        };
        // A file cut short is refused here, with its sizes, rather than
        // after llama-server has tried to load it.
        let facts = crate::gguf::read_model_facts(&spec.path)
            .and_then(|f| crate::gguf::check_tensor_data(&spec.path, &f).map(|()| f))
            .map_err(|e| unloadable(e.to_string()))?;
        let plan = |limit| {
            plan_model(
                &launcher.hardware,
                &facts,
                &launcher.config.llama,
                launcher.caps,
                &launcher.config.cost,
                &launcher.binary,
                limit,
                &launcher.rpc,
            )
            .map_err(unloadable)
        };
        let alone = plan(Some(self.budget_bytes))?;
        let planned = loop {
            let used: u64 = self.engines().iter().map(|e| e.footprint_bytes).sum();
            let free = self.budget_bytes.saturating_sub(used);
            if used == 0 || alone.footprint_bytes() <= free {
                break alone;
            }
            if let Some(victim) = self.take_idle(|_| true) {
                tracing::info!(
                    model = %victim.name,
                    "unloaded as the least recently used model, to make room for {}",
                    spec.name
                );
                victim.stop().await;
                continue;
            }
            let busy: Vec<String> = self.engines().iter().map(|e| e.name.clone()).collect();
            // Everything loaded is in use: the new model gets what is left,
            // if that is enough for it at all.
            let shrunk = plan(Some(free))?;
            if shrunk.footprint_bytes() <= free {
                break shrunk;
            }
            return Err(FleetError::NoRoom {
                name: spec.name.clone(),
                needs_bytes: alone.footprint_bytes(),
                free_bytes: free,
                busy,
            });
        };
        self.start(launcher, spec, planned);
        Ok(())
    }

    fn start(&self, launcher: &Launcher, spec: &ModelSpec, planned: Planned) {
        tracing::info!(
            model = %spec.name,
            path = %spec.path.display(),
            "loading the model: {} × {} tokens, {:.0} MiB",
            crate::plan::counted(planned.plan.slots, "slot"),
            planned.plan.ctx_per_slot,
            planned.footprint_bytes() as f64 / (1 << 20) as f64
        );
        for warning in &planned.plan.warnings {
            tracing::warn!(model = %spec.name, "{warning}");
        }
        let engine = Engine::start(
            launcher,
            &spec.name,
            planned,
            spec.keep_alive,
            self.idle.clone(),
            spec.primary,
        );
        lock(&self.engines).push(Arc::new(engine));
    }

    /// Unloads idle models whose keep-alive has run out, until the daemon
    /// stops; woken whenever a model goes idle or a keep-alive changes.
    pub async fn reap(self: Arc<Self>) {
        while !self.stopping.load(Ordering::Acquire) {
            let now = Instant::now();
            let next = self.engines().iter().filter_map(|e| e.unload_at()).min();
            match next {
                Some(at) if at <= now => {
                    let _changing = self.changing.lock().await;
                    let expired =
                        |e: &Arc<Engine>| e.unload_at().is_some_and(|at| at <= Instant::now());
                    while let Some(engine) = self.take_idle(expired) {
                        tracing::info!(model = %engine.name, "idle for its keep_alive");
                        engine.stop().await;
                    }
                }
                next => {
                    let wake = next.unwrap_or(now + REAPER_TICK).min(now + REAPER_TICK);
                    let _ = tokio::time::timeout_at(wake.into(), self.idle.notified()).await;
                }
            }
        }
    }

    /// No child is restarted any more; no model loads.
    pub fn drain(&self) {
        self.stopping.store(true, Ordering::Release);
        self.idle.notify_one();
        for engine in self.engines() {
            engine.drain();
        }
    }

    /// Stops every child and waits until they are gone.
    pub async fn shutdown(&self) {
        self.drain();
        let _changing = self.changing.lock().await;
        let engines = std::mem::take(&mut *lock(&self.engines));
        for engine in &engines {
            engine.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{CostModel, CostProfile};
    use crate::slots::Scheduler;
    use crate::supervisor::SupervisorView;

    fn spec(name: &str, aliases: &[&str], primary: bool) -> ModelSpec {
        ModelSpec {
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            path: format!("/models/{name}.gguf").into(),
            keep_alive: KeepAlive::Forever,
            primary,
        }
    }

    fn engine(name: &str, idle: Arc<Notify>) -> Arc<Engine> {
        let (_, view) = tokio::sync::watch::channel(SupervisorView::unloaded());
        let cost = CostModel::new(CostProfile::unmeasured(5.0, 1.0, 5.0));
        use crate::status::{HardwareStatus, ModelStatus, PlanStatus, StaticStatus};
        let status = StaticStatus {
            listen: String::new(),
            model: ModelStatus {
                path: name.into(),
                size_bytes: 1,
                architecture: "llama".into(),
                context_length: None,
            },
            plan: PlanStatus {
                slots: 1,
                concurrency: 1,
                ctx_per_slot: 512,
                ctx_size: 512,
                threads: 1,
                gpu_layers: 0,
                cache_reuse: 0,
            },
            hardware: HardwareStatus {
                chip: "test".into(),
                memory_bytes: 0,
                perf_cores: 1,
                efficiency_cores: 0,
                gpu_cores: None,
            },
            warnings: Vec::new(),
            cost_decisions: Vec::new(),
            ready_timeout_s: 60,
        };
        Arc::new(Engine::from_parts(
            name,
            std::path::Path::new(name),
            status,
            1,
            view,
            Default::default(),
            Scheduler::new(1, 1, 4, 0, cost),
            KeepAlive::After(std::time::Duration::ZERO),
            idle,
        ))
    }

    #[test]
    fn names_aliases_and_the_fallback_resolve() {
        let specs = vec![
            spec("smol", &["SmolLM2-135M"], true),
            spec("gemma", &[], false),
        ];
        let fleet = Fleet::over(specs.clone(), None, Vec::new());
        assert_eq!(fleet.resolve(Some("GEMMA")).unwrap().name, "gemma");
        assert_eq!(fleet.resolve(Some("smollm2-135m")).unwrap().name, "smol");
        assert_eq!(fleet.resolve(None).unwrap().name, "smol");
        assert_eq!(fleet.resolve(Some("")).unwrap().name, "smol");
        match fleet.resolve(Some("llama3.1:70b")) {
            Err(e @ FleetError::NotFound { .. }) => {
                let text = e.to_string();
                assert!(text.contains("\"smol\", \"gemma\""), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let with_fallback = Fleet::over(specs, Some("gemma"), Vec::new());
        assert_eq!(with_fallback.resolve(Some("gpt-4o")).unwrap().name, "gemma");
    }

    #[tokio::test]
    async fn an_engine_in_use_is_never_taken_and_goes_once_idle() {
        let fleet = Fleet::over(vec![spec("a", &[], true)], None, Vec::new());
        let a = engine("a", fleet.idle_signal());
        let b = engine("b", fleet.idle_signal());
        lock(&fleet.engines).extend([a.clone(), b.clone()]);
        let using_a = fleet.use_loaded("a", None).unwrap();
        let using_b = fleet.use_loaded("b", None).unwrap();
        assert!(fleet.take_idle(|_| true).is_none(), "both are in use");
        drop(using_b);
        let taken = fleet.take_idle(|_| true).expect("b is idle");
        assert_eq!(taken.name, "b");
        assert!(fleet.take_idle(|_| true).is_none(), "a is still in use");
        // An unload of a busy model waits for its last request.
        assert!(fleet.unload("a").await);
        assert_eq!(fleet.engines().len(), 1);
        assert_eq!(a.unload_at(), None, "in use: no unload time");
        drop(using_a);
        assert!(a.unload_at().is_some_and(|at| at <= Instant::now()));
        assert!(fleet.unload("a").await);
        assert!(fleet.engines().is_empty());
        assert!(!fleet.unload("a").await);
    }
}
