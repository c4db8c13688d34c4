//! The operator's web console: one static page, its script and its style sheet, served
//! beside the operator API on the C2 server's HTTP port (`/console/`; `/` leads there).
//!
//! The files are compiled into the binary and hold no data: everything the page shows comes
//! from the operator routes ([`super::http`]), called with the operator token the person
//! types in. The token is kept in the tab's `sessionStorage` (gone when the tab closes),
//! sent only as an `Authorization` header, never put in a URL.
//!
//! Every answer carries a strict content security policy (scripts and styles from this
//! origin only, no inline code, no framing, requests to this origin only), `nosniff` and
//! `no-referrer`. The script writes device-supplied text with `textContent` only, never as
//! HTML.
//!
//! What the console does: the fleet (status, groups, revoke, terminate, deregister, reset,
//! join command, confidentiality), pending joins (accept with the words read on the
//! device, refuse), commands to a device or a group with their responses, enrollment
//! tokens, the server's counters, and a live feed of events (`GET /v1/c2/events`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// The page.
pub const INDEX_HTML: &str = include_str!("console/index.html");
/// Its script.
pub const CONSOLE_JS: &str = include_str!("console/console.js");
/// Its style sheet.
pub const CONSOLE_CSS: &str = include_str!("console/console.css");

/// The content security policy of every console answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The console's routes (no token needed: nothing in them is secret).
pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        // Browsers ask for it; there is none (a 204 keeps their consoles quiet).
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/console/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/console/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/console/console.css",
            get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
