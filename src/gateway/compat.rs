//! The ContextPilot-compatible `POST /reorder`, for existing users of its
//! HTTP client: a batch of contexts (lists of block ids or strings) comes
//! back reordered for prefix sharing and scheduled so that contexts sharing
//! blocks run one after another.
//!
//! Every call is answered in the reference server's stateless shape; the
//! clustering runs on the blocking pool, never on a request worker.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::proxy::read_body;
use super::{error, json, Body, Gateway};
use crate::reorder::cluster::{self, IndexResult};

enum Contexts {
    Ints(Vec<Vec<u32>>),
    Strings(Vec<Vec<String>>),
}

fn parse(body: &Value) -> Result<(Contexts, f64), String> {
    let Some(Value::Array(contexts)) = body.get("contexts") else {
        return Err("`contexts` must be a list of lists of block ids or strings".into());
    };
    let alpha = match body.get("alpha") {
        None | Some(Value::Null) => 0.001,
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite() && *a >= 0.0)
            .ok_or("`alpha` must be a number >= 0")?,
    };
    match body.get("linkage_method").and_then(Value::as_str) {
        None | Some("average") => {}
        Some(other) => {
            return Err(format!(
                "linkage_method {other:?} is not supported; use \"average\""
            ))
        }
    }
    // A flat list is one context, as in the reference client.
    let contexts: Vec<Value> = if contexts.iter().all(|c| !c.is_array()) && !contexts.is_empty() {
        vec![Value::Array(contexts.clone())]
    } else {
        contexts.clone()
    };
    let strings = contexts
        .iter()
        .find_map(|c| c.as_array().and_then(|c| c.first()))
        .is_some_and(Value::is_string);
    let mut ints = Vec::new();
    let mut strs = Vec::new();
    for (i, context) in contexts.iter().enumerate() {
        let Value::Array(items) = context else {
            return Err(format!("contexts[{i}] must be a list"));
        };
        if strings {
            let items: Option<Vec<String>> = items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect();
            strs.push(items.ok_or(format!("contexts[{i}] mixes strings and other values"))?);
        } else {
            let items: Option<Vec<u32>> = items
                .iter()
                .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect();
            ints.push(items.ok_or(format!(
                "contexts[{i}] must hold non-negative integers (or only strings)"
            ))?);
        }
    }
    Ok((
        if strings {
            Contexts::Strings(strs)
        } else {
            Contexts::Ints(ints)
        },
        alpha,
    ))
}

fn respond(result: &IndexResult, names: Option<&[String]>, input_type: &str) -> Value {
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

/// `POST /reorder`.
pub(super) async fn reorder(gateway: &Arc<Gateway>, request: Request<Incoming>) -> Response<Body> {
    let raw = match read_body(request, gateway.max_body_bytes).await {
        Ok(raw) => raw,
        Err(response) => return response,
    };
    let body: Value = match serde_json::from_slice(&raw) {
        Ok(body) => body,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the request body is not valid JSON: {e}"),
                "invalid_request_error",
            )
        }
    };
    let (contexts, alpha) = match parse(&body) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message, "invalid_request_error"),
    };
    let work = tokio::task::spawn_blocking(move || match contexts {
        Contexts::Ints(ids) => respond(&cluster::build_index(&ids, alpha), None, "integer"),
        Contexts::Strings(strings) => {
            let (ids, names) = cluster::intern(&strings);
            respond(&cluster::build_index(&ids, alpha), Some(&names), "string")
        }
    });
    match work.await {
        Ok(answer) => json(StatusCode::OK, &answer),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("reordering failed: {e}"),
            "server_error",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(body: Value) -> Value {
        let (contexts, alpha) = parse(&body).unwrap();
        match contexts {
            Contexts::Ints(ids) => respond(&cluster::build_index(&ids, alpha), None, "integer"),
            Contexts::Strings(strings) => {
                let (ids, names) = cluster::intern(&strings);
                respond(&cluster::build_index(&ids, alpha), Some(&names), "string")
            }
        }
    }

    /// The reference system's batch example (its §8 case 5), in the HTTP
    /// shape: reordered contexts come in scheduled order.
    #[test]
    fn string_batch_in_the_stateless_shape() {
        let answer = run(
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
        let answer = run(json!({"contexts": [[5,1,9,2],[2,7,1,5],[8,3,4]]}));
        assert_eq!(answer["input_type"], "integer");
        assert_eq!(
            answer["reordered_contexts"],
            json!([[1, 2, 5, 9], [1, 2, 5, 7], [8, 3, 4]])
        );
        let single = run(json!({"contexts": [1, 2, 3]}));
        assert_eq!(single["reordered_contexts"], json!([[1, 2, 3]]));
    }

    #[test]
    fn bad_input_is_named() {
        for (body, needle) in [
            (json!({}), "`contexts`"),
            (json!({"contexts": [[1, "a"]]}), "contexts[0]"),
            (json!({"contexts": [["a", 1]]}), "mixes"),
            (json!({"contexts": [[-1]]}), "non-negative"),
            (json!({"contexts": [[1]], "alpha": "x"}), "alpha"),
            (json!({"contexts": [[1]], "linkage_method": "ward"}), "ward"),
        ] {
            let err = parse(&body).err().unwrap_or_default();
            assert!(err.contains(needle), "{body}: {err}");
        }
    }
}
