//! A local HTTP server shaped like a PCCS (v4 API) and AMD KDS, serving the test collateral
//! (VCEKs and AMD CRLs) and counting every request, for the fetcher tests and the benchmark.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dcap_qvl::QuoteCollateralV3;

/// What the server serves and how often each path was asked.
pub struct Pccs {
    collateral: QuoteCollateralV3,
    /// (product, hwid hex, query) -> VCEK DER.
    vceks: Vec<(String, String, String, Vec<u8>)>,
    /// product -> AMD CRL (DER); a product without one answers 404, as KDS without a CRL.
    crls: Mutex<HashMap<String, Vec<u8>>>,
    hits: Mutex<HashMap<String, usize>>,
    down: AtomicBool,
}

impl Pccs {
    /// Requests per path (product/hwid included for VCEKs).
    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
    /// All counted paths.
    pub fn all_hits(&self) -> HashMap<String, usize> {
        self.hits.lock().unwrap().clone()
    }
    /// Serves `der` as AMD's CRL of `product` (`Milan`, ...).
    pub fn set_crl(&self, product: &str, der: Vec<u8>) {
        self.crls.lock().unwrap().insert(product.into(), der);
    }
    /// Makes every request fail with 503 (`true`) or succeed again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    fn count(&self, path: String) -> bool {
        *self.hits.lock().unwrap().entry(path).or_default() += 1;
        !self.down.load(Ordering::SeqCst)
    }
}

fn chain_header(name: &'static str, pem: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let enc =
        percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC).to_string();
    h.insert(name, HeaderValue::from_str(&enc).unwrap());
    h
}

async fn pckcrl(State(s): State<Arc<Pccs>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let ca = q.get("ca").cloned().unwrap_or_default();
    if !s.count(format!("pckcrl?ca={ca}")) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    (
        chain_header(
            "SGX-PCK-CRL-Issuer-Chain",
            &s.collateral.pck_crl_issuer_chain,
        ),
        s.collateral.pck_crl.clone(),
    )
        .into_response()
}

async fn rootcacrl(State(s): State<Arc<Pccs>>) -> Response {
    if !s.count("rootcacrl".into()) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    // PCCS answers the root CA CRL hex-encoded.
    hex::encode(&s.collateral.root_ca_crl).into_response()
}

async fn tcb(State(s): State<Arc<Pccs>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let fmspc = q.get("fmspc").cloned().unwrap_or_default();
    if !s.count(format!("tcb?fmspc={fmspc}")) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let tcb: serde_json::Value = serde_json::from_str(&s.collateral.tcb_info).unwrap();
    if !tcb["fmspc"].as_str().unwrap().eq_ignore_ascii_case(&fmspc) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let body = format!(
        "{{\"tcbInfo\":{},\"signature\":\"{}\"}}",
        s.collateral.tcb_info,
        hex::encode(&s.collateral.tcb_info_signature)
    );
    (
        chain_header("TCB-Info-Issuer-Chain", &s.collateral.tcb_info_issuer_chain),
        body,
    )
        .into_response()
}

async fn qe_identity(State(s): State<Arc<Pccs>>) -> Response {
    if !s.count("qe/identity".into()) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let body = format!(
        "{{\"enclaveIdentity\":{},\"signature\":\"{}\"}}",
        s.collateral.qe_identity,
        hex::encode(&s.collateral.qe_identity_signature)
    );
    (
        chain_header(
            "SGX-Enclave-Identity-Issuer-Chain",
            &s.collateral.qe_identity_issuer_chain,
        ),
        body,
    )
        .into_response()
}

async fn vcek(
    State(s): State<Arc<Pccs>>,
    Path((product, hwid)): Path<(String, String)>,
    uri: axum::http::Uri,
) -> Response {
    let query = uri.query().unwrap_or_default().to_owned();
    if hwid == "crl" {
        if !s.count(format!("crl/{product}")) {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        return match s.crls.lock().unwrap().get(&product) {
            Some(der) => der.clone().into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        };
    }
    if !s.count(format!("vcek/{product}")) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    match s
        .vceks
        .iter()
        .find(|(p, h, q, _)| *p == product && *h == hwid && *q == query)
    {
        Some((_, _, _, der)) => der.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Starts the server on a free loopback port; it runs until the runtime ends.
pub async fn start(
    collateral: QuoteCollateralV3,
    vceks: Vec<(String, String, String, Vec<u8>)>,
) -> (SocketAddr, Arc<Pccs>) {
    let state = Arc::new(Pccs {
        collateral,
        vceks,
        crls: Mutex::new(HashMap::new()),
        hits: Mutex::new(HashMap::new()),
        down: AtomicBool::new(false),
    });
    let app = Router::new()
        .route("/sgx/certification/v4/pckcrl", get(pckcrl))
        .route("/sgx/certification/v4/rootcacrl", get(rootcacrl))
        .route("/tdx/certification/v4/tcb", get(tcb))
        .route("/tdx/certification/v4/qe/identity", get(qe_identity))
        .route("/vcek/v1/{product}/{hwid}", get(vcek))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, state)
}
