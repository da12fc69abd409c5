//! The ContextPilot-compatible index API, for existing users of its HTTP
//! client: `POST /reorder` (and its older names `/build`, `/schedule`),
//! `/evict`, `/search`, `/insert`, `/update`, `/deduplicate`, `/reset`, and
//! `GET /requests`.
//!
//! `[reorder] index = "live"` (the default, like the reference server) keeps
//! one [`LiveIndex`] across calls: the first `/reorder` builds it, later ones
//! place their contexts against it and return request ids that `/evict`
//! removes. `"stateless"` clusters every call on its own; `/schedule` is
//! always stateless. Reordered contexts always come in scheduled order
//! (`reordered_contexts[i]` is input `original_indices[i]`), in both modes
//! and on every call. All index work runs on the blocking pool.

use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::prepare::read_body;
use super::{error, json, Body, Gateway};
use crate::config::{IndexMode, ReorderConfig};
use crate::reorder::cluster::{self, IndexResult};
use crate::reorder::live::{self, DedupResult, Key, LiveIndex};
use crate::sync::lock;

/// The compatibility API's state: the live index. Which request each slot
/// answered last is the slot table's (`slots::Scheduler::settle`).
pub struct CompatState {
    mode: IndexMode,
    limits: live::Limits,
    index: Arc<Mutex<LiveIndex>>,
}

impl CompatState {
    pub fn new(config: &ReorderConfig) -> Self {
        let limits = live::Limits {
            max_leaves: config.live_max_leaves,
            ttl: (config.live_ttl_s > 0).then(|| Duration::from_secs(config.live_ttl_s)),
        };
        CompatState {
            mode: config.index,
            limits,
            index: Arc::new(Mutex::new(LiveIndex::new(cluster::DEFAULT_ALPHA, limits))),
        }
    }

    /// After a panic in index work (a bug: request data is validated before
    /// it gets there) the index may be half-updated, so it starts over empty
    /// rather than being used as it is. This is what makes `sync::lock`'s
    /// tolerance of a poisoned lock sound for the index.
    fn recover(&self) {
        if self.index.is_poisoned() {
            *lock(&self.index) = LiveIndex::new(cluster::DEFAULT_ALPHA, self.limits);
            self.index.clear_poison();
            tracing::error!("index work panicked; the live index starts over empty");
        }
    }

    /// Request ids whose KV is gone from every slot (the slot table's
    /// settle says which) leave the live index: the daemon's own dispatch
    /// replaces the reference's hook into llama-server's KV removal (which
    /// missed partial overwrites).
    pub fn evict_displaced(&self, displaced: Vec<String>) {
        if displaced.is_empty() {
            return;
        }
        tracing::debug!(evicted = ?displaced, "slot overwritten: request ids leave the live index");
        // This runs as a request finishes, on a runtime worker: never wait
        // here for a long `/reorder` holding the index.
        match self.index.try_lock() {
            Ok(mut index) => {
                index.remove_requests(&displaced);
            }
            // Index work panicked and `recover` is about to empty it.
            Err(TryLockError::Poisoned(_)) => {}
            Err(TryLockError::WouldBlock) => {
                let index = self.index.clone();
                let remove = move || {
                    lock(&index).remove_requests(&displaced);
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => drop(runtime.spawn_blocking(remove)),
                    Err(_) => remove(),
                }
            }
        }
    }

    /// The live index's counters, for `/stats`.
    pub async fn index_stats(&self) -> Value {
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || {
            let mut index = lock(&index);
            index.expire_now();
            stats_json(&index)
        })
        .await
        .unwrap_or_default()
    }
}

fn stats_json(index: &LiveIndex) -> Value {
    let s = index.stats();
    json!({
        "num_nodes": s.num_nodes,
        "active_nodes": s.leaf_nodes,
        "leaf_nodes": s.leaf_nodes,
        "total_tokens": s.total_tokens,
        "num_requests": s.num_requests,
        "total_searches": s.total_searches,
        "total_insertions": s.total_insertions,
        "total_removals": s.total_removals,
        "expired_leaves": s.expired,
        "lru_evicted_leaves": s.lru_evicted,
        "string_blocks": s.strings,
        "avg_search_time_us": (s.avg_search_time_us * 100.0).round() / 100.0,
    })
}

fn bad(message: impl AsRef<str>) -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        message.as_ref(),
        "invalid_request_error",
    )
}

fn not_live() -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the index is not built yet: call POST /reorder first",
        "unavailable_error",
    )
}

async fn read_json(
    gateway: &Arc<Gateway>,
    request: Request<Incoming>,
) -> Result<Value, Response<Body>> {
    let raw = read_body(request, gateway.max_body_bytes)
        .await
        .map_err(super::ApiError::into_response)?;
    if raw.is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(&raw)
        .map_err(|e| bad(format!("the request body is not valid JSON: {e}")))
}

/// Runs index work on the blocking pool; a panic there (a bug) answers 500
/// and empties the index rather than leaving it half-updated.
async fn blocking<F>(gateway: &Gateway, work: F) -> Response<Body>
where
    F: FnOnce() -> Response<Body> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(response) => response,
        Err(e) => {
            gateway.compat.recover();
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("reordering failed ({e}); the live index was reset"),
                "server_error",
            )
        }
    }
}

// ---------------------------------------------------------------------------
// Parsing.

struct Contexts {
    keys: Vec<Vec<Key>>,
    strings: bool,
}

impl Contexts {
    fn input_type(&self) -> &'static str {
        if self.strings {
            "string"
        } else {
            "integer"
        }
    }
}

fn parse_contexts(value: Option<&Value>, field: &str) -> Result<Contexts, String> {
    let Some(Value::Array(contexts)) = value else {
        return Err(format!(
            "`{field}` must be a list of lists of block ids or strings"
        ));
    };
    // A flat list is one context, as in the reference client.
    let contexts: Vec<Value> = if !contexts.is_empty() && contexts.iter().all(|c| !c.is_array()) {
        vec![Value::Array(contexts.clone())]
    } else {
        contexts.clone()
    };
    let strings = contexts
        .iter()
        .find_map(|c| c.as_array().and_then(|c| c.first()))
        .is_some_and(Value::is_string);
    let mut keys = Vec::with_capacity(contexts.len());
    for (i, context) in contexts.iter().enumerate() {
        let Value::Array(items) = context else {
            return Err(format!("{field}[{i}] must be a list"));
        };
        let parsed: Option<Vec<Key>> = if strings {
            items
                .iter()
                .map(|v| v.as_str().map(|s| Key::Str(s.to_string())))
                .collect()
        } else {
            items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .filter(|&n| n <= u64::from(u32::MAX))
                        .map(Key::Int)
                })
                .collect()
        };
        keys.push(parsed.ok_or_else(|| {
            if strings {
                format!("{field}[{i}] mixes strings and other values")
            } else {
                format!("{field}[{i}] must hold non-negative integers (or only strings)")
            }
        })?);
    }
    Ok(Contexts { keys, strings })
}

/// The largest `alpha` accepted (the reference default is 0.001).
const MAX_ALPHA: f64 = 1000.0;

fn parse_alpha(body: &Value) -> Result<f64, String> {
    match body.get("alpha") {
        None | Some(Value::Null) => Ok(cluster::DEFAULT_ALPHA),
        Some(v) => v
            .as_f64()
            // Past this, position terms swamp every distance into infinity.
            .filter(|a| a.is_finite() && (0.0..=MAX_ALPHA).contains(a))
            .ok_or_else(|| format!("`alpha` must be a number from 0 to {MAX_ALPHA}")),
    }
}

fn check_linkage(body: &Value) -> Result<(), String> {
    match body.get("linkage_method").and_then(Value::as_str) {
        None | Some("average") => Ok(()),
        Some(other) => Err(format!(
            "linkage_method {other:?} is not supported; use \"average\""
        )),
    }
}

fn opt_str<'a>(body: &'a Value, field: &str) -> Result<Option<&'a str>, String> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{field}` must be a string")),
    }
}

fn parse_parents(body: &Value, n: usize) -> Result<Vec<Option<String>>, String> {
    match body.get("parent_request_ids") {
        None | Some(Value::Null) => Ok(vec![None; n]),
        Some(Value::Array(ids)) => {
            if ids.len() != n {
                return Err(format!(
                    "`parent_request_ids` has {} entries for {n} contexts",
                    ids.len()
                ));
            }
            ids.iter()
                .map(|v| match v {
                    Value::Null => Ok(None),
                    Value::String(s) => Ok(Some(s.clone())),
                    _ => Err("`parent_request_ids` entries must be strings or null".to_string()),
                })
                .collect()
        }
        Some(_) => Err("`parent_request_ids` must be a list".to_string()),
    }
}

fn parse_path(body: &Value) -> Result<Vec<usize>, String> {
    match body.get("search_path") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(steps)) => steps
            .iter()
            .map(|v| v.as_u64().map(|n| n as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| "`search_path` must be a list of non-negative integers".to_string()),
        Some(_) => Err("`search_path` must be a list".to_string()),
    }
}

fn key_json(key: &Key) -> Value {
    match key {
        Key::Int(n) => json!(n),
        Key::Str(s) => json!(s),
    }
}

fn keys_json(keys: &[Key]) -> Value {
    Value::Array(keys.iter().map(key_json).collect())
}

// ---------------------------------------------------------------------------
// `/reorder`.

/// `POST /reorder` and `/build` (live or stateless per config), `/schedule`
/// (always stateless).
pub(super) async fn reorder(
    gateway: &Arc<Gateway>,
    request: Request<Incoming>,
    always_stateless: bool,
) -> Response<Body> {
    let body = match read_json(gateway, request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let parsed = parse_contexts(body.get("contexts"), "contexts").and_then(|contexts| {
        check_linkage(&body)?;
        Ok((contexts, parse_alpha(&body)?))
    });
    let (contexts, alpha) = match parsed {
        Ok(parsed) => parsed,
        Err(message) => return bad(message),
    };
    if always_stateless || gateway.compat.mode == IndexMode::Stateless {
        return blocking(gateway, move || {
            json(StatusCode::OK, &stateless(&contexts, alpha))
        })
        .await;
    }
    let index = gateway.compat.index.clone();
    blocking(gateway, move || {
        match reorder_live(&index, &contexts, alpha, &body) {
            Ok(answer) => json(StatusCode::OK, &answer),
            Err(message) => bad(message),
        }
    })
    .await
}

fn stateless(contexts: &Contexts, alpha: f64) -> Value {
    if contexts.strings {
        let strings: Vec<Vec<&str>> = contexts
            .keys
            .iter()
            .map(|c| {
                c.iter()
                    .map(|k| match k {
                        Key::Str(s) => s.as_str(),
                        Key::Int(_) => "",
                    })
                    .collect()
            })
            .collect();
        let (ids, names) = cluster::intern(&strings);
        stateless_answer(&cluster::build_index(&ids, alpha), Some(&names), "string")
    } else {
        let ids: Vec<Vec<u32>> = contexts
            .keys
            .iter()
            .map(|c| {
                c.iter()
                    .map(|k| match k {
                        Key::Int(n) => *n as u32,
                        Key::Str(_) => 0,
                    })
                    .collect()
            })
            .collect();
        stateless_answer(&cluster::build_index(&ids, alpha), None, "integer")
    }
}

fn stateless_answer(result: &IndexResult, names: Option<&[String]>, input_type: &str) -> Value {
    let schedule = cluster::schedule(result);
    let render = |ids: &Vec<u32>| -> Value {
        match names {
            Some(names) => json!(ids
                .iter()
                .map(|&i| names[i as usize].as_str())
                .collect::<Vec<_>>()),
            None => json!(ids),
        }
    };
    let scheduled: Vec<Value> = schedule
        .order
        .iter()
        .map(|&i| render(&result.reordered[i]))
        .collect();
    json!({
        "status": "success",
        "message": "Contexts reordered and scheduled",
        "mode": "stateless",
        "input_type": input_type,
        "num_contexts": result.reordered.len(),
        "num_groups": schedule.groups.len(),
        "reordered_contexts": scheduled,
        "scheduled_contexts": scheduled,
        "original_indices": schedule.order,
        "groups": schedule.groups.iter().map(|g| json!([0, g])).collect::<Vec<_>>(),
        "stats": {
            "total_nodes": result.stats.total_nodes,
            "leaf_nodes": result.stats.leaf_nodes,
            "root_nodes": result.stats.root_nodes,
            "internal_nodes": result.stats.internal_nodes,
        },
    })
}

fn reorder_live(
    index: &Mutex<LiveIndex>,
    contexts: &Contexts,
    alpha: f64,
    body: &Value,
) -> Result<Value, String> {
    let conversation_id = opt_str(body, "conversation_id")?;
    let template = opt_str(body, "hint_template")?;
    let dedup = body
        .get("deduplicate")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let parents = parse_parents(body, contexts.keys.len())?;
    let mut index = lock(index);
    index.set_alpha_if_idle(alpha);
    let out = index.reorder(&contexts.keys, conversation_id);
    let scheduled: Vec<Value> = out
        .order
        .iter()
        .map(|&i| keys_json(&out.reordered[i]))
        .collect();
    let mapping: Map<String, Value> = out
        .request_ids
        .iter()
        .zip(&out.leaves)
        .map(|(rid, &leaf)| (rid.clone(), json!(leaf)))
        .collect();
    let mut answer = json!({
        "status": "success",
        "message": if out.mode == "initial" {
            "Index built successfully"
        } else {
            "Incremental reorder completed"
        },
        "mode": out.mode,
        "input_type": contexts.input_type(),
        "num_contexts": contexts.keys.len(),
        "matched_count": out.matched,
        "merged_count": out.merged,
        "inserted_count": contexts.keys.len(),
        "request_ids": out.request_ids,
        "request_id_mapping": mapping,
        "reordered_contexts": scheduled,
        "scheduled_contexts": scheduled,
        "original_indices": out.order,
        "num_groups": out.groups.len(),
        "groups": out.groups.iter().map(|g| json!([0, g])).collect::<Vec<_>>(),
        "stats": stats_json(&index),
    });
    if !out.warnings.is_empty() {
        answer["warnings"] = json!(out.warnings);
    }
    if dedup {
        // Pairing is by input index throughout: documents, request ids and
        // parents all line up (the reference mixed scheduled and input order).
        let results = index.deduplicate_chain(&contexts.keys, &out.request_ids, &parents, template);
        answer["deduplication"] = dedup_json(&results, &out.request_ids);
    }
    Ok(answer)
}

fn dedup_json(results: &[DedupResult], request_ids: &[String]) -> Value {
    let total: usize = results.iter().map(|r| r.overlapping.len()).sum();
    let items: Vec<Value> = results
        .iter()
        .zip(request_ids)
        .map(|(r, rid)| {
            json!({
                "request_id": rid,
                "original_docs": keys_json(&r.original),
                "deduplicated_docs": keys_json(&r.new),
                "overlapping_docs": keys_json(&r.overlapping),
                "new_docs": keys_json(&r.new),
                "reference_hints": r.hints,
                "doc_source_turns": r.source_turns.iter()
                    .map(|(k, t)| (k.to_string(), json!(t)))
                    .collect::<Map<String, Value>>(),
                "is_new_conversation": r.new_conversation,
                "blocks_deduped": 0,
                "blocks_total": 0,
                "block_chars_saved": 0,
            })
        })
        .collect();
    json!({
        "enabled": true,
        "results": items,
        "total_docs_deduplicated": total,
        "total_blocks_deduped": 0,
    })
}

// ---------------------------------------------------------------------------
// The other index endpoints.

/// `POST /evict {request_ids}`.
pub(super) async fn evict(gateway: &Arc<Gateway>, request: Request<Incoming>) -> Response<Body> {
    let body = match read_json(gateway, request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let ids: Option<Vec<String>> = body
        .get("request_ids")
        .and_then(Value::as_array)
        .and_then(|ids| ids.iter().map(|v| v.as_str().map(str::to_string)).collect());
    let Some(ids) = ids else {
        return bad("`request_ids` must be a list of strings");
    };
    let index = gateway.compat.index.clone();
    blocking(gateway, move || {
        let mut index = lock(&index);
        if !index.is_live() {
            return not_live();
        }
        let normalized = live::normalize_request_ids(&ids);
        let cleared: usize = normalized
            .iter()
            .map(|id| index.clear_conversation(id))
            .sum();
        let e = index.remove_requests(&normalized);
        let s = index.stats();
        json(
            StatusCode::OK,
            &json!({
                "status": "success",
                "conversations_cleared": cleared,
                "normalized_request_ids": normalized,
                "removed_count": e.removed,
                "evicted_node_ids": e.evicted_nodes,
                "evicted_request_ids": e.evicted_requests,
                "not_found": e.not_found,
                "nodes_remaining": s.num_nodes,
                "requests_remaining": s.num_requests,
            }),
        )
    })
    .await
}

/// `POST /search {context, update_access}`.
pub(super) async fn search(gateway: &Arc<Gateway>, request: Request<Incoming>) -> Response<Body> {
    let body = match read_json(gateway, request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let context = match parse_contexts(body.get("context"), "context") {
        Ok(c) if c.keys.len() == 1 => c.keys.into_iter().next().unwrap_or_default(),
        Ok(_) => return bad("`context` must be one list of block ids or strings"),
        Err(message) => return bad(message),
    };
    let update = body
        .get("update_access")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let index = gateway.compat.index.clone();
    blocking(gateway, move || {
        let mut index = lock(&index);
        if !index.is_live() {
            return not_live();
        }
        let found = index.search(&context, update);
        json(
            StatusCode::OK,
            &json!({
                "status": "success",
                "search_path": found.path,
                "node_id": found.node.map_or(-1, |n| n as i64),
                // The reference's name for the overlap count.
                "prefix_length": found.overlap,
                "has_prefix": found.has_prefix,
            }),
        )
    })
    .await
}

/// `POST /insert {context, search_path, total_tokens}`.
pub(super) async fn insert(gateway: &Arc<Gateway>, request: Request<Incoming>) -> Response<Body> {
    let body = match read_json(gateway, request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let parsed = parse_contexts(body.get("context"), "context").and_then(|c| {
        let path = parse_path(&body)?;
        let tokens = match body.get("total_tokens") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_i64().ok_or("`total_tokens` must be an integer")?,
        };
        Ok((c, path, tokens))
    });
    let (context, path, tokens) = match parsed {
        Ok((c, path, tokens)) if c.keys.len() == 1 => {
            (c.keys.into_iter().next().unwrap_or_default(), path, tokens)
        }
        Ok(_) => return bad("`context` must be one list of block ids or strings"),
        Err(message) => return bad(message),
    };
    let index = gateway.compat.index.clone();
    blocking(gateway, move || {
        let mut index = lock(&index);
        if !index.is_live() {
            return not_live();
        }
        let (node, rid) = index.insert(&context, &path, tokens);
        json(
            StatusCode::OK,
            &json!({
                "status": "success",
                "node_id": node,
                "search_path": index.path_of(node),
                "request_id": rid,
            }),
        )
    })
    .await
}

/// `POST /update {search_path, token_delta}` (the reference client calls
/// it; its server never had it).
pub(super) async fn update(gateway: &Arc<Gateway>, request: Request<Incoming>) -> Response<Body> {
    let body = match read_json(gateway, request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let path = match parse_path(&body) {
        Ok(path) => path,
        Err(message) => return bad(message),
    };
    let Some(delta) = body.get("token_delta").and_then(Value::as_i64) else {
        return bad("`token_delta` must be an integer");
    };
    let index = gateway.compat.index.clone();
    blocking(gateway, move || {
        let mut index = lock(&index);
        if !index.is_live() {
            return not_live();
        }
        match index.update_tokens(&path, delta) {
            Some((node, total)) => json(
                StatusCode::OK,
                &json!({"status": "success", "node_id": node, "total_tokens": total}),
            ),
            None => error(
                StatusCode::NOT_FOUND,
                &format!("no node at search_path {path:?}"),
                "not_found_error",
            ),
        }
    })
    .await
}

/// `POST /deduplicate {contexts, parent_request_ids | conversation_id,
/// hint_template}`: multi-turn dedup without touching the tree (documented
/// by the reference and called by its client, though its server dropped it).
pub(super) async fn deduplicate(
    gateway: &Arc<Gateway>,
    request: Request<Incoming>,
) -> Response<Body> {
    let body = match read_json(gateway, request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let contexts = match parse_contexts(body.get("contexts"), "contexts") {
        Ok(c) => c,
        Err(message) => return bad(message),
    };
    let index = gateway.compat.index.clone();
    blocking(gateway, move || {
        let run = || -> Result<Value, String> {
            let template = opt_str(&body, "hint_template")?;
            let mut index = lock(&index);
            if let Some(cid) = opt_str(&body, "conversation_id")? {
                let results = index.deduplicate_conversation(&contexts.keys, cid, template)?;
                let ids = vec![String::new(); results.len()];
                let mut answer = dedup_json(&results, &ids);
                answer["status"] = json!("success");
                return Ok(answer);
            }
            let parents = parse_parents(&body, contexts.keys.len())?;
            let ids: Vec<String> = (0..contexts.keys.len())
                .map(|_| index.new_tracked_id())
                .collect();
            let results = index.deduplicate_chain(&contexts.keys, &ids, &parents, template);
            let mut answer = dedup_json(&results, &ids);
            answer["status"] = json!("success");
            answer["request_ids"] = json!(ids);
            Ok(answer)
        };
        match run() {
            Ok(answer) => json(StatusCode::OK, &answer),
            Err(message) => bad(message),
        }
    })
    .await
}

/// `POST /reset`.
pub(super) async fn reset(gateway: &Arc<Gateway>) -> Response<Body> {
    let index = gateway.compat.index.clone();
    blocking(gateway, move || {
        let was_live = lock(&index).reset();
        json(
            StatusCode::OK,
            &json!({
                "status": "success",
                "message": if was_live {
                    "Index reset to initial state"
                } else {
                    "No index to reset (was not initialized)"
                },
                "conversation_tracker": "reset",
            }),
        )
    })
    .await
}

/// `GET /requests`.
pub(super) async fn requests(gateway: &Arc<Gateway>) -> Response<Body> {
    let index = gateway.compat.index.clone();
    blocking(gateway, move || {
        let mut index = lock(&index);
        if !index.is_live() {
            return not_live();
        }
        index.expire_now();
        let ids = index.request_ids();
        json(
            StatusCode::OK,
            &json!({"status": "success", "num_requests": ids.len(), "request_ids": ids}),
        )
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_index_work_empties_the_index_instead_of_using_it() {
        let state = CompatState::new(&ReorderConfig::default());
        lock(&state.index).reorder(&[vec![Key::Int(1), Key::Int(2)]], None);
        assert!(lock(&state.index).stats().num_requests > 0);
        let index = state.index.clone();
        let panicked = std::thread::spawn(move || {
            let _held = index.lock().unwrap();
            panic!("index work panicked half-way (expected by this test)");
        })
        .join();
        assert!(panicked.is_err() && state.index.is_poisoned());
        state.recover();
        assert!(!state.index.is_poisoned());
        assert_eq!(lock(&state.index).stats().num_requests, 0);
    }

    /// Request data that is odd but valid reaches the clustering code, and
    /// must not panic there (with the live index locked).
    #[test]
    fn odd_contexts_do_not_panic_either_index() {
        let cases = [
            json!({"contexts": [[]]}),
            json!({"contexts": [[], [], [1]]}),
            json!({"contexts": [[1, 1, 1], [1, 1], [1]]}),
            json!({"contexts": [[u64::MAX, 0], [0, u64::MAX]], "alpha": 1000}),
            json!({"contexts": [["a", "a"], ["", ""], ["a"]], "alpha": 0}),
            json!({"contexts": (0..40).map(|i| vec![i % 3, i % 7, i]).collect::<Vec<_>>()}),
        ];
        let state = CompatState::new(&ReorderConfig::default());
        for case in cases {
            // Refused at the door is fine too: that is validation.
            let Ok(contexts) = parse_contexts(case.get("contexts"), "contexts") else {
                continue;
            };
            let _ = run_stateless(case.clone());
            let alpha = parse_alpha(&case).unwrap();
            reorder_live(&state.index, &contexts, alpha, &case).unwrap();
            reorder_live(&state.index, &contexts, alpha, &case).unwrap();
        }
        assert!(!state.index.is_poisoned());
    }

    #[test]
    fn alpha_is_bounded() {
        assert!(parse_alpha(&json!({"alpha": 0.001})).is_ok());
        assert!(parse_alpha(&json!({"alpha": 1e300})).is_err());
        assert!(parse_alpha(&json!({"alpha": -1})).is_err());
    }

    fn run_stateless(body: Value) -> Value {
        let contexts = parse_contexts(body.get("contexts"), "contexts").unwrap();
        stateless(&contexts, parse_alpha(&body).unwrap())
    }

    fn run_live(index: &Mutex<LiveIndex>, body: Value) -> Value {
        let contexts = parse_contexts(body.get("contexts"), "contexts").unwrap();
        reorder_live(index, &contexts, cluster::DEFAULT_ALPHA, &body).unwrap()
    }

    fn fresh() -> Mutex<LiveIndex> {
        Mutex::new(LiveIndex::new(
            cluster::DEFAULT_ALPHA,
            live::Limits::default(),
        ))
    }

    /// The reference system's batch example (its §8 case 5), in the HTTP
    /// shape: reordered contexts come in scheduled order.
    #[test]
    fn string_batch_in_the_stateless_shape() {
        let answer = run_stateless(
            json!({"contexts": [["G","A","F","B","E","C"], ["X","Y","Z","W","V","U"], ["C","D","A","H","B","I"]]}),
        );
        assert_eq!(answer["input_type"], "string");
        assert_eq!(answer["original_indices"], json!([0, 2, 1]));
        assert_eq!(
            answer["reordered_contexts"],
            json!([
                ["A", "B", "C", "G", "F", "E"],
                ["A", "B", "C", "D", "H", "I"],
                ["X", "Y", "Z", "W", "V", "U"]
            ])
        );
        assert_eq!(answer["groups"], json!([[0, [0, 2]], [0, [1]]]));
        assert_eq!(answer["num_groups"], 2);
    }

    #[test]
    fn integer_batch_and_a_flat_list() {
        let answer = run_stateless(json!({"contexts": [[5,1,9,2],[2,7,1,5],[8,3,4]]}));
        assert_eq!(answer["input_type"], "integer");
        assert_eq!(
            answer["reordered_contexts"],
            json!([[1, 2, 5, 9], [1, 2, 5, 7], [8, 3, 4]])
        );
        let single = run_stateless(json!({"contexts": [1, 2, 3]}));
        assert_eq!(single["reordered_contexts"], json!([[1, 2, 3]]));
    }

    /// The live shape: the first call builds (same answer as stateless for
    /// the batch), later calls are incremental, and both come in scheduled
    /// order with request ids in input order.
    #[test]
    fn live_shape_initial_then_incremental() {
        let index = fresh();
        let first = run_live(
            &index,
            json!({"contexts": [["G","A","F","B","E","C"], ["X","Y","Z","W","V","U"], ["C","D","A","H","B","I"]]}),
        );
        assert_eq!(first["mode"], "initial");
        assert_eq!(first["original_indices"], json!([0, 2, 1]));
        assert_eq!(
            first["reordered_contexts"][1],
            json!(["A", "B", "C", "D", "H", "I"])
        );
        assert_eq!(first["request_ids"].as_array().unwrap().len(), 3);
        let second = run_live(&index, json!({"contexts": [["Q","R"], ["B","A","K"]]}));
        assert_eq!(second["mode"], "incremental");
        assert_eq!(second["matched_count"], 1);
        assert_eq!(second["merged_count"], 1);
        let order: Vec<usize> = serde_json::from_value(second["original_indices"].clone()).unwrap();
        let pos = order.iter().position(|&i| i == 1).unwrap();
        assert_eq!(second["reordered_contexts"][pos], json!(["A", "B", "K"]));
    }

    /// Case 16 in the HTTP shape: on a reused index, `reordered_contexts[k]`
    /// holds the documents of input `original_indices[k]` (the reference
    /// returned input order after its first call while its callers assumed
    /// scheduled order, pairing queries with another query's documents).
    #[test]
    fn pairing_holds_on_a_reused_index() {
        let index = fresh();
        run_live(&index, json!({"contexts": [["X1", "X2"]]}));
        let input = json!([["A", "B", "C"], ["P", "Q"], ["A", "B", "D"], ["Q", "X1"]]);
        for _ in 0..2 {
            let answer = run_live(&index, json!({ "contexts": input }));
            let order: Vec<usize> =
                serde_json::from_value(answer["original_indices"].clone()).unwrap();
            let mut seen = order.clone();
            seen.sort_unstable();
            assert_eq!(seen, [0, 1, 2, 3]);
            for (k, &i) in order.iter().enumerate() {
                let mut got: Vec<String> =
                    serde_json::from_value(answer["reordered_contexts"][k].clone()).unwrap();
                let mut want: Vec<String> = serde_json::from_value(input[i].clone()).unwrap();
                got.sort();
                want.sort();
                assert_eq!(got, want, "position {k} names input {i}");
            }
        }
    }

    #[test]
    fn live_dedup_pairs_by_input_index() {
        let index = fresh();
        let first = run_live(
            &index,
            json!({"contexts": [[1, 2, 3], [7, 8, 9]], "deduplicate": true}),
        );
        let rids = first["request_ids"].clone();
        let second = run_live(
            &index,
            json!({"contexts": [[7, 8, 10], [1, 2, 4]], "deduplicate": true,
                   "parent_request_ids": [rids[1], rids[0]]}),
        );
        let results = &second["deduplication"]["results"];
        assert_eq!(results[0]["overlapping_docs"], json!([7, 8]));
        assert_eq!(results[0]["new_docs"], json!([10]));
        assert_eq!(results[1]["overlapping_docs"], json!([1, 2]));
        assert_eq!(results[1]["request_id"], second["request_ids"][1]);
        assert_eq!(
            results[1]["reference_hints"][0],
            "Please refer to [Doc 1] from the previous conversation turn."
        );
        assert_eq!(second["deduplication"]["total_docs_deduplicated"], 4);
    }

    #[test]
    fn bad_input_is_named() {
        for (body, needle) in [
            (json!({}), "`contexts`"),
            (json!({"contexts": [[1, "a"]]}), "contexts[0]"),
            (json!({"contexts": [["a", 1]]}), "mixes"),
            (json!({"contexts": [[-1]]}), "non-negative"),
        ] {
            let err = parse_contexts(body.get("contexts"), "contexts")
                .err()
                .unwrap_or_default();
            assert!(err.contains(needle), "{body}: {err}");
        }
        assert!(parse_alpha(&json!({"alpha": "x"}))
            .unwrap_err()
            .contains("alpha"));
        assert!(check_linkage(&json!({"linkage_method": "ward"}))
            .unwrap_err()
            .contains("ward"));
        assert!(parse_parents(&json!({"parent_request_ids": [null]}), 2)
            .unwrap_err()
            .contains("1 entries for 2"));
        assert!(parse_path(&json!({"search_path": [-1]})).is_err());
    }
}

/// Any JSON gives an answer or a message, never a panic in the parsers or
/// in index work (which holds the live index's lock); answers keep their
/// promises: scheduled order is a permutation, and every reordered context
/// holds the documents of the input it names.
#[cfg(test)]
mod properties {
    use super::*;
    use crate::testing;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;
    use std::collections::BTreeSet;

    /// Any JSON value, numbers of every kind included.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            1 => Just(Value::Null),
            1 => any::<bool>().prop_map(Value::from),
            4 => (0..40u64).prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            1 => select(vec![u64::from(u32::MAX), u64::from(u32::MAX) + 1, u64::MAX])
                .prop_map(Value::from),
            1 => any::<i64>().prop_map(Value::from),
            1 => (-5..0i64).prop_map(Value::from),
            1 => any::<f64>().prop_map(|f| json!(f)),
            1 => Just(json!(1.0)),
            3 => select(&["a", "b", "c", "d", "e"][..]).prop_map(Value::from),
            1 => ".{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 64, 8, |inner| {
            prop_oneof![
                3 => vec(inner.clone(), 0..8).prop_map(Value::from),
                1 => vec(("[a-z_]{1,6}", inner), 0..3)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// A list of contexts the parser accepts: block ids (small, so that
    /// contexts share some, and up to `u32::MAX`) or strings.
    fn valid_contexts() -> impl Strategy<Value = Value> {
        let int = prop_oneof![
            8 => 0..24u64,
            1 => Just(u64::from(u32::MAX)),
            1 => any::<u32>().prop_map(u64::from),
        ];
        let ints = vec(
            vec(int.prop_map(Value::from), 0..8).prop_map(Value::from),
            0..12,
        );
        let string = prop_oneof![
            8 => select(&["a", "b", "c", "d", "e", "f", "g", "h"][..]).prop_map(str::to_string),
            1 => ".{0,4}",
        ];
        let strings = vec(
            vec(string.prop_map(Value::from), 0..8).prop_map(Value::from),
            0..12,
        );
        prop_oneof![ints, strings].prop_map(Value::from)
    }

    /// What `parse_contexts` is documented to do, said another way: a flat
    /// list is one context; all strings or all integers up to `u32::MAX`.
    fn expected_contexts(value: &Value) -> Option<Vec<Vec<Key>>> {
        let Value::Array(list) = value else {
            return None;
        };
        let contexts: Vec<&Value> = if !list.is_empty() && list.iter().all(|c| !c.is_array()) {
            vec![value]
        } else {
            list.iter().collect()
        };
        let lists: Vec<&Vec<Value>> = contexts
            .iter()
            .map(|c| c.as_array())
            .collect::<Option<_>>()?;
        let items = || lists.iter().flat_map(|l| l.iter());
        let key = |v: &Value| match v {
            Value::String(s) => Some(Key::Str(s.clone())),
            _ => v
                .as_u64()
                .filter(|&n| n <= u64::from(u32::MAX))
                .map(Key::Int),
        };
        let all_strings = items().all(Value::is_string);
        let all_ints = items().all(|v| !v.is_string() && key(v).is_some());
        (all_strings || all_ints).then(|| {
            lists
                .iter()
                .map(|l| l.iter().map(|v| key(v).unwrap()).collect())
                .collect()
        })
    }

    fn as_keys(value: &Value) -> Vec<Key> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| match v {
                Value::String(s) => Key::Str(s.clone()),
                v => Key::Int(v.as_u64().unwrap()),
            })
            .collect()
    }

    /// The promises of every `/reorder` answer, stateless or live.
    fn check_answer(answer: &Value, contexts: &Contexts) -> Result<(), TestCaseError> {
        let n = contexts.keys.len();
        prop_assert_eq!(&answer["status"], "success");
        prop_assert_eq!(&answer["num_contexts"], n);
        let order: Vec<usize> = serde_json::from_value(answer["original_indices"].clone()).unwrap();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        prop_assert_eq!(
            sorted,
            (0..n).collect::<Vec<_>>(),
            "original_indices is a permutation"
        );
        let reordered = answer["reordered_contexts"].as_array().unwrap();
        prop_assert_eq!(reordered.len(), n);
        prop_assert_eq!(&answer["scheduled_contexts"], &answer["reordered_contexts"]);
        for (k, &i) in order.iter().enumerate() {
            let got = as_keys(&reordered[k]);
            let set: BTreeSet<String> = got.iter().map(Key::to_string).collect();
            let want: BTreeSet<String> = contexts.keys[i].iter().map(Key::to_string).collect();
            prop_assert_eq!(set.len(), got.len(), "no document twice in {:?}", got);
            prop_assert_eq!(set, want, "position {} holds input {}", k, i);
        }
        let mut grouped: Vec<usize> = answer["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| serde_json::from_value::<Vec<usize>>(g[1].clone()).unwrap())
            .collect();
        grouped.sort_unstable();
        prop_assert_eq!(
            grouped,
            (0..n).collect::<Vec<_>>(),
            "groups partition the contexts"
        );
        Ok(())
    }

    fn fresh() -> Mutex<LiveIndex> {
        Mutex::new(LiveIndex::new(
            cluster::DEFAULT_ALPHA,
            live::Limits::default(),
        ))
    }

    /// The optional fields of a live `/reorder` body, sometimes of the
    /// wrong type; parents name earlier request ids by position.
    #[derive(Debug, Clone)]
    struct Options {
        fields: Vec<(&'static str, Value)>,
        parents: Option<Vec<Option<usize>>>,
    }

    fn options() -> impl Strategy<Value = Options> {
        let text = || prop_oneof![12 => ".{0,8}".prop_map(Value::from), 1 => any_json()];
        let alpha = prop_oneof![
            Just(json!(0)),
            Just(json!(1000)),
            (0.0..=MAX_ALPHA).prop_map(|a| json!(a)),
        ];
        let template = prop_oneof![
            select(
                &[
                    "Doc {doc_id}",
                    "{doc_id} from turn {turn} ({source})",
                    "{",
                    ""
                ][..]
            )
            .prop_map(Value::from),
            text(),
        ];
        (
            proptest::option::of(alpha.prop_map(|v| ("alpha", v))),
            proptest::option::of(text().prop_map(|v| ("conversation_id", v))),
            proptest::option::of(template.prop_map(|v| ("hint_template", v))),
            proptest::option::of(any::<bool>().prop_map(|v| ("deduplicate", Value::from(v)))),
            proptest::option::of(vec(proptest::option::of(0..64usize), 0..12)),
        )
            .prop_map(|(a, b, c, d, parents)| Options {
                fields: [a, b, c, d].into_iter().flatten().collect(),
                parents,
            })
    }

    proptest! {
        #![proptest_config(testing::config(256))]

        /// `contexts` of any shape parses exactly as documented.
        #[test]
        fn contexts_parse_as_documented(
            value in prop_oneof![any_json(), valid_contexts()],
            absent in proptest::bool::weighted(0.05),
        ) {
            let value = (!absent).then_some(value);
            let parsed = parse_contexts(value.as_ref(), "contexts");
            match (parsed, value.as_ref().and_then(expected_contexts)) {
                (Ok(contexts), Some(keys)) => {
                    prop_assert_eq!(&contexts.keys, &keys);
                    let any_string = keys.iter().flatten().any(|k| matches!(k, Key::Str(_)));
                    prop_assert_eq!(contexts.strings, any_string);
                }
                (Err(message), None) => prop_assert!(message.contains("contexts"), "{}", message),
                (Ok(contexts), None) => {
                    prop_assert!(false, "accepted {:?} as {:?}", value, contexts.keys)
                }
                (Err(message), Some(_)) => prop_assert!(false, "refused {:?}: {}", value, message),
            }
        }

        /// `alpha` is the default, a number from 0 to `MAX_ALPHA`, or an
        /// error; `parent_request_ids` has one entry per context or is an
        /// error.
        #[test]
        fn alpha_and_parents_are_bounded(
            alpha in proptest::option::of(any_json()),
            parents in proptest::option::of(prop_oneof![
                any_json(),
                vec(prop_oneof![Just(Value::Null), ".{0,4}".prop_map(Value::from)], 0..6)
                    .prop_map(Value::from),
            ]),
            n in 0..6usize,
        ) {
            let mut body = json!({});
            if let Some(alpha) = &alpha {
                body["alpha"] = alpha.clone();
            }
            if let Some(parents) = &parents {
                body["parent_request_ids"] = parents.clone();
            }
            let in_range = |v: &Value| v.as_f64().filter(|a| (0.0..=MAX_ALPHA).contains(a));
            match (parse_alpha(&body), alpha.as_ref().filter(|a| !a.is_null())) {
                (Ok(a), None) => prop_assert_eq!(a, cluster::DEFAULT_ALPHA),
                (Ok(a), Some(v)) => prop_assert_eq!(Some(a), in_range(v)),
                (Err(_), Some(v)) => prop_assert!(in_range(v).is_none()),
                (Err(e), None) => prop_assert!(false, "{}", e),
            }
            match parse_parents(&body, n) {
                Ok(ids) => {
                    prop_assert_eq!(ids.len(), n);
                    if let Some(Value::Array(given)) = &parents {
                        let want: Vec<Option<String>> =
                            given.iter().map(|v| v.as_str().map(str::to_string)).collect();
                        prop_assert_eq!(ids, want);
                    }
                }
                Err(e) => {
                    let fits = match &parents {
                        None | Some(Value::Null) => true,
                        Some(Value::Array(given)) => {
                            given.len() == n && given.iter().all(|v| v.is_null() || v.is_string())
                        }
                        Some(_) => false,
                    };
                    prop_assert!(!fits, "{}", e);
                }
            }
        }

        /// Stateless clustering of any accepted contexts.
        #[test]
        fn stateless_answers_keep_their_promises(
            value in prop_oneof![4 => valid_contexts(), 1 => any_json()],
            alpha in prop_oneof![
                Just(cluster::DEFAULT_ALPHA),
                Just(0.0),
                Just(MAX_ALPHA),
                0.0..=MAX_ALPHA,
            ],
        ) {
            if let Ok(contexts) = parse_contexts(Some(&value), "contexts") {
                let answer = stateless(&contexts, alpha);
                prop_assert_eq!(&answer["input_type"], contexts.input_type());
                check_answer(&answer, &contexts)?;
            }
        }
    }

    proptest! {
        #![proptest_config(testing::config(256))]

        /// Calls in a row on one live index, with dedup, parents, ids and
        /// templates of any kind: an answer or a message, and the index is
        /// never left poisoned.
        #[test]
        fn live_answers_keep_their_promises(
            calls in vec((valid_contexts(), options()), 1..4),
        ) {
            let index = fresh();
            let mut earlier: Vec<String> = Vec::new();
            for (value, options) in calls {
                let contexts = parse_contexts(Some(&value), "contexts").unwrap();
                let mut body = json!({ "contexts": value });
                for (key, field) in options.fields {
                    body[key] = field;
                }
                if let Some(mut parents) = options.parents {
                    // Mostly one per context, as a client sends them.
                    if parents.len() % 4 != 0 {
                        parents.resize(contexts.keys.len(), None);
                    }
                    body["parent_request_ids"] = parents
                        .into_iter()
                        .map(|p| p.and_then(|i| earlier.get(i % earlier.len().max(1)).cloned()))
                        .collect();
                }
                let alpha = parse_alpha(&body).unwrap();
                match reorder_live(&index, &contexts, alpha, &body) {
                    Ok(answer) => {
                        check_answer(&answer, &contexts)?;
                        let ids: Vec<String> =
                            serde_json::from_value(answer["request_ids"].clone()).unwrap();
                        prop_assert_eq!(ids.len(), contexts.keys.len());
                        if body["deduplicate"] == json!(true) {
                            let results = answer["deduplication"]["results"].as_array().unwrap();
                            prop_assert_eq!(results.len(), contexts.keys.len());
                        }
                        earlier.extend(ids);
                    }
                    Err(message) => prop_assert!(!message.is_empty()),
                }
                prop_assert!(!index.is_poisoned());
            }
        }
    }
}
