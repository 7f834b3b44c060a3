//! The OpenAPI 3.1 description of the JSON API, served at `/api/openapi.json` (a public contract).
//!
//! Kept by hand in `openapi.json` beside this file and compiled in: the tests below check that it
//! describes exactly the routes [`super::api::routes`] serves and that its `$ref`s resolve, and
//! `tests/api_openapi.rs` runs schemathesis against a running daemon with it.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /api/openapi.json`.
pub async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn parsed() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
    }

    /// The operations a document describes, as (method, path).
    fn operations(doc: &Value) -> BTreeSet<(String, String)> {
        let methods = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
        let paths = doc["paths"].as_object().expect("paths");
        paths
            .iter()
            .flat_map(|(path, item)| {
                methods.iter().filter(|m| item.get(**m).is_some()).map(|m| (m.to_string(), path.clone()))
            })
            .collect()
    }

    #[tokio::test]
    async fn served_as_json() {
        let response = document().await;
        assert_eq!(response.status(), 200);
        let content_type = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        assert_eq!(content_type, Some("application/json"));
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        let doc: Value = serde_json::from_slice(&body).expect("served document is JSON");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")), "{}", doc["openapi"]);
    }

    #[test]
    fn describes_every_route_and_no_other() {
        let served: BTreeSet<(String, String)> = crate::web::api::routes()
            .iter()
            .map(|route| (route.method.to_string(), format!("/api{}", route.path)))
            .collect();
        let described = operations(&parsed());
        let undescribed: Vec<_> = served.difference(&described).collect();
        assert!(undescribed.is_empty(), "routes missing from openapi.json: {undescribed:?}");
        let unserved: Vec<_> = described.difference(&served).collect();
        assert!(unserved.is_empty(), "openapi.json describes routes the API does not serve: {unserved:?}");
    }

    #[test]
    fn every_operation_has_an_id_and_its_path_parameters() {
        let doc = parsed();
        let mut ids = BTreeSet::new();
        for (method, path) in operations(&doc) {
            let op = &doc["paths"][&path][&method];
            let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            assert!(ids.insert(id.to_string()), "operationId {id} twice");
            assert!(op["responses"]["200"].is_object(), "{method} {path}: no 200");
            let declared: BTreeSet<String> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| resolve(&doc, p))
                .filter(|p| p["in"] == "path")
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect();
            let templated: BTreeSet<String> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .map(str::to_string)
                .collect();
            assert_eq!(declared, templated, "{method} {path}: path parameters");
        }
    }

    /// A parameter or its `$ref` target.
    fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
        match value["$ref"].as_str().and_then(|r| r.strip_prefix('#')) {
            Some(pointer) => doc.pointer(pointer).unwrap_or(&Value::Null),
            None => value,
        }
    }

    #[test]
    fn every_ref_resolves() {
        fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(target)) = map.get("$ref") {
                        out.push(target);
                    }
                    map.values().for_each(|v| refs(v, out));
                }
                Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc = parsed();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(found.len() > 20, "the document uses components: {}", found.len());
        for target in found {
            let pointer = target.strip_prefix('#').unwrap_or_else(|| panic!("{target}: not a local $ref"));
            assert!(doc.pointer(pointer).is_some(), "{target} does not resolve");
        }
    }

    #[test]
    fn links_name_existing_operations() {
        let doc = parsed();
        let ids: BTreeSet<&str> = operations(&doc)
            .iter()
            .filter_map(|(method, path)| doc["paths"][path][method]["operationId"].as_str())
            .collect();
        let mut links = 0;
        for (method, path) in operations(&doc) {
            for response in doc["paths"][&path][&method]["responses"].as_object().into_iter().flat_map(|r| r.values()) {
                for link in response["links"].as_object().into_iter().flat_map(|l| l.values()) {
                    let target = link["operationId"].as_str().unwrap_or_default();
                    assert!(ids.contains(target), "{method} {path}: link to unknown operation {target:?}");
                    links += 1;
                }
            }
        }
        assert!(links > 0);
    }
}
